"""Prefill's bf16 matrix products on AVX-512 BF16 dot products (``vdpbf16ps``), where the CPU has them.

x [M, K] bf16 by w [N, K] bf16 -> float32 [M, N]. Each output element (m, n) is summed in one fixed
order, the same for every M, every thread count and every tile the loops happen to use (threads split
the output rows n only), so a row of the result never depends on the other rows of the product:

1. The K bf16 values of a row are taken as K/2 pairs (uint32 words: the even element in the low half,
   the odd in the high half); the pairs are padded with zero pairs to B = ceil(K/32) blocks of 16.
2. A 16-lane float32 accumulator starts at +0. For block b = 0 .. B-1, lane l takes pair p = 16 b + l
   of the weight row and of the input row and does what ``vdpbf16ps`` does (Intel SDM, "VDPBF16PS"):
   acc_l = R(acc_l + w_odd * x_odd), then acc_l = R(acc_l + w_even * x_even), where each step is a
   fused multiply-add (the product is exact, one rounding to float32, nearest-even), inputs denormal
   bf16 values are read as zero of their sign (DAZ), and R flushes a result that is tiny *after*
   rounding (|r| < 2^-126) to zero of its sign (FTZ). MXCSR is neither read nor written.
3. The 16 lanes are added pairwise in IEEE float32 (no DAZ/FTZ here): ((l0 + l1) + (l2 + l3)) + ...
4. ``prefill_linear`` (``kernels_rows``) adds the bias in float32 and rounds to bf16 with torch.

``dp_reference`` is this order in numpy (the tests compare bit for bit; the semantics of step 2,
including DAZ on the accumulator and tininess after rounding, were checked against the instruction on
Zen 4 over random bit patterns). The result differs from the one-row GEMV's order (``kernels``) and
from torch's; which kernel a prefill product uses is chosen per host, shape, thread count and M
(``kernel_select_rows``), never by the weights or where they come from.

Loops (they never change a bit): output rows in blocks of ``RW`` (4), ``PANEL`` blocks per task of
numba's threads; each block's 4 x M accumulators live in a small buffer while K is walked in chunks of
``KC`` blocks (4 KiB of weights, kept in L1 while every input passes it), the inputs ``RX`` (4) at a time,
so one pass feeds 16 independent accumulator chains (4 weight and 4 input vectors loaded per 16 dot
products), with 1-row and 1..3-input tiles at the edges; the first input tile of a chunk prefetches
each weight row ``PF`` lines (16 KiB) ahead into L2, which is what lets it stream from memory at the
few-row counts of routed experts. The input rows are padded to whole blocks (a
copy of the few inputs); a weight row's last partial block is copied word by word into a zeroed stack
buffer, never read past its end.

Availability: only where the CPU reports ``avx512_bf16`` and the compiler target numba uses has
``+avx512bf16`` and ``+avx512f`` (``NUMBA_CPU_NAME`` set without ``NUMBA_CPU_FEATURES`` that name
them counts as absent, as it emulates another CPU); elsewhere nothing here is compiled or called
(``available()``). ``ZIPMOE_DP=0`` turns it off.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

__all__ = ["available", "facts", "gemm_dp", "dp_reference", "ENV", "RW", "RX", "LANES"]

log = logging.getLogger(__name__)

ENV = "ZIPMOE_DP"
LANES = 16  # float32 lanes of one accumulator; a block is LANES bf16 pairs
RW, RX = 4, 4  # weight rows x input rows of the main tile
OPW = 16  # lanes per instruction: 16 (512-bit); 8 (256-bit, two per block) gives the same bits, no faster on Zen 4
_INTRIN = "llvm.x86.avx512bf16.dpbf16ps.512"
_state: dict = {"ok": None, "why": ""}


def facts() -> dict:
    """What availability is decided from: the CPU's flags, numba's target CPU name and features."""
    from .hostinfo import host_info

    out = {"cpu_flags": list(host_info()["isa"]), "cpu_name": None, "features": "", "env_cpu_name": None,
           "env_features": None, "disabled": os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no")}
    try:
        from numba.core import config
        from numba.core.registry import cpu_target

        cg = cpu_target.target_context.codegen()
        out.update(cpu_name=cg._get_host_cpu_name(), features=str(cg._tm_features or ""),
                   env_cpu_name=config.CPU_NAME, env_features=config.CPU_FEATURES)
    except Exception as exc:  # pragma: no cover - numba is a dependency
        out["features"] = ""
        log.info("numba target unknown (%s)", exc)
    return out


def supported(f: dict) -> tuple[bool, str]:
    """(usable, reason) from :func:`facts` (injectable for tests)."""
    if f.get("disabled"):
        return False, f"{ENV}=0"
    if "avx512_bf16" not in (f.get("cpu_flags") or ()):
        return False, "the CPU does not report avx512_bf16"
    feats = set(str(f.get("features") or "").split(","))
    if not {"+avx512bf16", "+avx512f"} <= feats:
        return False, "numba's compiler target lacks +avx512bf16/+avx512f"
    if f.get("env_cpu_name") not in (None, "", "host") and f.get("env_features") is None:
        return False, f"NUMBA_CPU_NAME={f.get('env_cpu_name')} without NUMBA_CPU_FEATURES (an emulated CPU)"
    return True, "avx512_bf16"


def available(fact_fn=facts) -> bool:
    """Whether the dp kernel can run here (decided once per process unless ``fact_fn`` is injected);
    compiles it on the first True."""
    if fact_fn is not facts:
        return supported(fact_fn())[0]
    if _state["ok"] is None:
        ok, why = supported(facts())
        if ok:
            try:
                w, x = np.zeros((1, 1), np.uint32), np.zeros((1, LANES), np.uint32)
                _kernel()(w, x, np.empty((1, 1), np.float32), KC, 1, 0)
            except Exception as exc:  # pragma: no cover - the target said it can
                ok, why = False, f"compile failed: {exc}"
        _state.update(ok=ok, why=why)
        log.info("bf16 dot-product prefill kernel: %s (%s)", "available" if ok else "unavailable", why)
    return bool(_state["ok"])


def reason() -> str:
    available()
    return _state["why"]


from .kernels_dp_ref import dp_reference  # noqa: E402,F401  (the order in numpy)


# ---- the kernel (compiled only where available() says so) ------------------------------------------------

from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it): the intrinsic's operands are <32 x bfloat>."""

    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


def _tile(rw: int, rx: int, tail: bool):
    """An intrinsic (w, xw, acc, i0, m0, c0, c1, pf) -> None that advances the accumulators acc[m0 + q, r]
    (float32 [M, RW, LANES], r < rw, q < rx) of weight rows i0 + r over blocks c0 .. c1 - 1, or (``tail``)
    over the one partial block at c0 = K/2 // LANES, whose weight words are copied into a zeroed stack
    buffer (never read past the row). w uint32 [N, K/2]; xw uint32 [M, Kp/2] zero-padded to whole blocks."""

    @intrinsic
    def tile(typingctx, w, xw, acc, i0, m0, c0, c1, pf):
        sig = types.void(w, xw, acc, i0, m0, c0, c1, pf)

        def codegen(context, builder, signature, args):
            wa = context.make_array(signature.args[0])(context, builder, value=args[0])
            xa = context.make_array(signature.args[1])(context, builder, value=args[1])
            aa = context.make_array(signature.args[2])(context, builder, value=args[2])
            i64, i32, i8p = ir.IntType(64), ir.IntType(32), ir.IntType(8).as_pointer()
            nh = LANES // OPW  # instructions per block (a block's 16 lanes as nh vectors of OPW lanes)
            vi, vh = ir.VectorType(i32, LANES), ir.VectorType(i32, OPW)
            vf, vb = ir.VectorType(ir.FloatType(), OPW), ir.VectorType(_BFloat(), 2 * OPW)
            mod = builder.module
            name = _INTRIN if OPW == 16 else _INTRIN.replace(".512", ".256")
            fn = mod.globals.get(name) or ir.Function(mod, ir.FunctionType(vf, [vf, vb, vb]), name=name)
            wstride = cgutils.unpack_tuple(builder, wa.strides, 2)[0]
            kh = cgutils.unpack_tuple(builder, wa.shape, 2)[1]  # words per weight row
            xstride = cgutils.unpack_tuple(builder, xa.strides, 2)[0]
            astride = cgutils.unpack_tuple(builder, aa.strides, 3)[0]  # bytes per input's RW accumulators

            def row(base, idx, stride, ty):
                return builder.bitcast(builder.gep(builder.bitcast(base, i8p), [builder.mul(idx, stride)]),
                                       ty.as_pointer())

            def at(b, h):  # index of half h of block b in OPW-word vectors
                return builder.add(builder.mul(b, ir.Constant(i64, nh)), ir.Constant(i64, h))

            wr = [row(wa.data, builder.add(args[3], ir.Constant(i64, r)), wstride, vh) for r in range(rw)]
            xr = [row(xa.data, builder.add(args[4], ir.Constant(i64, q)), xstride, vh) for q in range(rx)]
            ap = [builder.gep(row(aa.data, builder.add(args[4], ir.Constant(i64, q)), astride, vf),
                              [ir.Constant(i64, r * nh + h)]) for r in range(rw) for q in range(rx) for h in range(nh)]
            acc0 = [builder.load(p, align=4) for p in ap]  # [(r, q, h)]

            def step(acc, wv, b):  # wv [(r, h)]
                new = list(acc)
                for q in range(rx):
                    for h in range(nh):
                        xv = builder.bitcast(builder.load(builder.gep(xr[q], [at(b, h)]), align=4), vb)
                        for r in range(rw):
                            j = (r * rx + q) * nh + h
                            new[j] = builder.call(fn, [acc[j], wv[r * nh + h], xv])
                return new

            if tail:
                nb = builder.sdiv(kh, ir.Constant(i64, LANES))
                rem = builder.srem(kh, ir.Constant(i64, LANES))
                wt = []
                for r in range(rw):  # the rem words after the whole blocks, into a zeroed buffer
                    buf = cgutils.alloca_once(builder, vi)
                    builder.store(ir.Constant(vi, [0] * LANES), buf, align=4)
                    src = builder.bitcast(builder.gep(wr[r], [at(nb, 0)]), i32.as_pointer())
                    dst = builder.bitcast(buf, i32.as_pointer())
                    with cgutils.for_range(builder, rem) as lp:
                        builder.store(builder.load(builder.gep(src, [lp.index]), align=4),
                                      builder.gep(dst, [lp.index]), align=4)
                    hp = builder.bitcast(buf, vh.as_pointer())
                    wt += [builder.bitcast(builder.load(builder.gep(hp, [ir.Constant(i64, h)]), align=4), vb)
                           for h in range(nh)]
                fin = step(acc0, wt, nb)
            else:
                entry = builder.block
                loop, done = builder.append_basic_block("dp_loop"), builder.append_basic_block("dp_done")
                builder.cbranch(builder.icmp_signed("<", args[5], args[6]), loop, done)
                builder.position_at_end(loop)
                b = builder.phi(i64)
                acc = [builder.phi(vf) for _ in acc0]
                wv = [builder.bitcast(builder.load(builder.gep(wr[r], [at(b, h)]), align=4), vb)
                      for r in range(rw) for h in range(nh)]
                with builder.if_then(builder.icmp_signed(">", args[7], ir.Constant(i64, 0))):
                    pfn = mod.globals.get("llvm.prefetch.p0") or ir.Function(
                        mod, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name="llvm.prefetch.p0")
                    for r in range(rw):  # a hint (never faults): pf blocks ahead of each weight row, into L2
                        ahead = builder.bitcast(builder.gep(wr[r], [at(builder.add(b, args[7]), 0)]), i8p)
                        builder.call(pfn, [ahead, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
                nxt = step(acc, wv, b)
                b1, end = builder.add(b, ir.Constant(i64, 1)), builder.block
                b.add_incoming(args[5], entry)
                b.add_incoming(b1, end)
                for p, p0, q in zip(acc, acc0, nxt):
                    p.add_incoming(p0, entry)
                    p.add_incoming(q, end)
                builder.cbranch(builder.icmp_signed("<", b1, args[6]), loop, done)
                builder.position_at_end(done)
                fin = []
                for p0, q in zip(acc0, nxt):
                    p = builder.phi(vf)
                    p.add_incoming(p0, entry)
                    p.add_incoming(q, end)
                    fin.append(p)
            for p, v in zip(ap, fin):
                builder.store(v, p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_T = {(rw, rx, t): _tile(rw, rx, t) for rw in (1, RW) for rx in range(1, RX + 1) for t in (False, True)}
_c44, _c43, _c42, _c41 = (_T[(RW, q, False)] for q in (4, 3, 2, 1))
_e44, _e43, _e42, _e41 = (_T[(RW, q, True)] for q in (4, 3, 2, 1))
_c14, _c11, _e14, _e11 = _T[(1, RX, False)], _T[(1, 1, False)], _T[(1, RX, True)], _T[(1, 1, True)]
KC = 16  # blocks per K chunk: a chunk of RW weight rows (4 KiB) stays in L1 while every input passes it
PANEL = 8  # row blocks per thread task (one accumulator buffer each)
PF = 256  # software prefetch (prefetcht1) distance in blocks (64-byte lines) of a weight row: 16 KiB ahead,
# issued by the first input tile of each chunk. From memory, 2 threads, Zen 4: 1408x2048 at M = 2 / 4 / 8
# 31.5 / 23.0 / 18.1 GB/s against 21.6 / 17.3 / 15.4 without (into L1 or 2-8 KiB ahead: little or nothing)


@njit(nogil=True, cache=True, inline="always")
def _chunk(w, xw, acc, i0, m, c0, c1, tail, pf):
    """Advance the accumulators of weight rows i0 .. i0 + RW - 1 for all m inputs over blocks c0 .. c1 - 1
    (or the partial last block: ``tail``), RX inputs per tile."""
    full = m - m % RX
    for m0 in range(0, full, RX):
        if tail:
            _e44(w, xw, acc, i0, m0, c0, c1, pf if m0 == 0 else 0)
        else:
            _c44(w, xw, acc, i0, m0, c0, c1, pf if m0 == 0 else 0)
    r = m - full
    if r == 3:
        if tail:
            _e43(w, xw, acc, i0, full, c0, c1, pf if full == 0 else 0)
        else:
            _c43(w, xw, acc, i0, full, c0, c1, pf if full == 0 else 0)
    elif r == 2:
        if tail:
            _e42(w, xw, acc, i0, full, c0, c1, pf if full == 0 else 0)
        else:
            _c42(w, xw, acc, i0, full, c0, c1, pf if full == 0 else 0)
    elif r == 1:
        if tail:
            _e41(w, xw, acc, i0, full, c0, c1, pf if full == 0 else 0)
        else:
            _c41(w, xw, acc, i0, full, c0, c1, pf if full == 0 else 0)


@njit(nogil=True, cache=True, inline="always")
def _chunk1(w, xw, acc, i, m, c0, c1, tail, pf):
    """As ``_chunk`` for the single weight row i (accumulators acc[:, 0])."""
    full = m - m % RX
    for m0 in range(0, full, RX):
        if tail:
            _e14(w, xw, acc, i, m0, c0, c1, pf if m0 == 0 else 0)
        else:
            _c14(w, xw, acc, i, m0, c0, c1, pf if m0 == 0 else 0)
    for mm in range(full, m):
        if tail:
            _e11(w, xw, acc, i, mm, c0, c1, pf if mm == 0 else 0)
        else:
            _c11(w, xw, acc, i, mm, c0, c1, pf if mm == 0 else 0)


@njit(nogil=True, cache=True, inline="always")
def _lanes(a):
    """The 16 lanes a[0..15] added pairwise: ((l0 + l1) + (l2 + l3)) + ... (float32)."""
    b0, b1, b2, b3 = (a[0] + a[1]) + (a[2] + a[3]), (a[4] + a[5]) + (a[6] + a[7]), \
        (a[8] + a[9]) + (a[10] + a[11]), (a[12] + a[13]) + (a[14] + a[15])
    return (b0 + b1) + (b2 + b3)


@njit(nogil=True, cache=True, inline="always")
def _fill(w, xw, acc, i0, kc, pf):
    """acc [M, RW, LANES] = the lanes of weight rows i0 .. i0 + RW - 1 (all present) for every input."""
    kh = w.shape[1]
    nb = kh // LANES
    acc[:] = 0.0
    for c0 in range(0, nb, kc):
        _chunk(w, xw, acc, i0, xw.shape[0], c0, min(c0 + kc, nb), False, pf)
    if kh % LANES != 0:
        _chunk(w, xw, acc, i0, xw.shape[0], nb, nb + 1, True, 0)


@njit(nogil=True, cache=True, inline="always")
def _fill1(w, xw, acc, i, kc, pf):
    """acc[:, 0] = the lanes of weight row i alone for every input (the edge of the row blocks)."""
    kh = w.shape[1]
    nb = kh // LANES
    acc[:] = 0.0
    for c0 in range(0, nb, kc):
        _chunk1(w, xw, acc, i, xw.shape[0], c0, min(c0 + kc, nb), False, pf)
    if kh % LANES != 0:
        _chunk1(w, xw, acc, i, xw.shape[0], nb, nb + 1, True, 0)


@njit(nogil=True, cache=True)
def _block(w, xw, out, acc, i0, kc, pf):
    """Output rows i0 .. i0 + RW - 1 (or to N) for every input: out f32 [M, N]; acc f32 [M, RW, LANES] scratch."""
    n, m = w.shape[0], xw.shape[0]
    if i0 + RW <= n:
        _fill(w, xw, acc, i0, kc, pf)
        for r in range(RW):
            for mm in range(m):
                out[mm, i0 + r] = _lanes(acc[mm, r])
    else:
        for i in range(i0, min(i0 + RW, n)):
            _fill1(w, xw, acc, i, kc, pf)
            for mm in range(m):
                out[mm, i] = _lanes(acc[mm, 0])


@njit(parallel=True, nogil=True, cache=True)  # threads over panels of output rows only
def _dp_kernel(w, xw, out, kc, panel, pf):  # w uint32 [N, K/2]; xw uint32 [M, Kp/2] zero-padded; out f32 [M, N]
    n = w.shape[0]
    m = xw.shape[0]
    nblk = (n + RW - 1) // RW
    for p in prange((nblk + panel - 1) // panel):
        acc = np.empty((m, RW, LANES), np.float32)  # [M, RW, 16]: the accumulators of one row block
        for ib in range(p * panel, min((p + 1) * panel, nblk)):
            _block(w, xw, out, acc, ib * RW, kc, pf)


def _kernel():
    return _dp_kernel


def gemm_dp(x: torch.Tensor, w: torch.Tensor, kc: int = KC, panel: int = PANEL, pf: int | None = None) -> np.ndarray:
    """float32 [M, N] of x [M, K] bf16 by w [N, K] bf16 (contiguous, K even) in this module's order;
    ``kc`` (blocks per K chunk), ``panel`` (row blocks per thread task) and ``pf`` (prefetch distance,
    0: none) change the loops, never a bit."""
    from .kernels import bf16_words

    n, k = w.shape
    kh = k // 2
    xw = bf16_words(x, k)  # [M, K/2] bf16 pairs
    kp = -(-kh // LANES) * LANES
    if kp != kh or not xw.flags.c_contiguous:
        xp = np.zeros((xw.shape[0], kp), np.uint32)  # [M, Kp/2]: zero pairs after the row
        xp[:, :kh] = xw
        xw = xp
    out = np.empty((xw.shape[0], n), dtype=np.float32)
    pf = PF if pf is None else pf
    _kernel()(w.view(torch.int32).numpy().view(np.uint32).reshape(n, kh), xw, out, kc, panel, pf)
    return out
