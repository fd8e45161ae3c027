"""A faster bfloat16 matrix-vector product for one-token decode steps.

A decode step is a chain of matrix-vector products over bf16 weights (routed and shared experts,
attention projections, lm_head), so its speed is how fast weights stream through the cores. Torch's
CPU bf16 kernel for a single input row reaches roughly a third of memory bandwidth; this numba loop
(bf16 -> f32 by a shift, float32 accumulation, output rows split over threads) roughly doubles that.

Numerics: IEEE float32 throughout (no fast-math: NaN and infinities propagate as in torch, nothing
is reassociated or contracted by the compiler). A product of two bf16 values is exact in float32.
Each output row is summed by one thread in one fixed order, the same on every CPU and for any
thread count, so results are bitwise reproducible: the row's K/2 bf16 pairs are cut into blocks of
``WORDS`` pairs; even and odd weights each have ``WORDS`` accumulators, accumulator l summing the
products of pair l of every block in block order; the accumulators are added pairwise
(((a0 + a1) + (a2 + a3)) + ...), then the pairs after the last whole block in sequence, and the row is
even + odd. Each product is an ``fmul`` rounded to float32 (exact here) and each sum an ``fadd``:
no fused multiply-add (measured no faster from memory: specs/runtime.md section 11).
``gemv_reference`` is that order in numpy (``_row_sum`` in numba). Results can differ from torch's bf16
kernel in the last bit. Only bf16 weights with a bf16 single-row input take this path (a prefill's M-row
products: ``kernels_rows.prefill_linear``, the multi-row kernel, dp or torch's as ``kernel_select_rows``
chose); every other case (float32 runs) is ``torch.nn.functional.linear``.

Input form: the bf16 input is read as uint32 pairs too (``bf16_words``, a view), split like the weights
into exactly ``x.float()``'s values (at K = 5632 a float32 input overflowed L1: 14 vs 26-32 GB/s, Zen 4).

Batched decode (``decode_rows_scope``, the engine's steps of several sequences): every row of a
product gets exactly what ``linear`` gives that row alone. Where that is this GEMV (the kernel
chosen for the shape), the M rows go through ``_gemm_kernel``, which computes each output row in
exactly the order above (the same ``_row_blocks`` and tail; 4 inputs per pass over a weight row),
so row m of a batch equals the one-row result bit for bit, for any M and thread count (``kernels_rows``).
Where dp was chosen, one dp call takes all M rows (its order is the same for any M). Where torch was
chosen or the kernel cannot take the product (float32, odd K, non-contiguous weights), the rows run
one at a time through the same one-row call, reading the weights once per row.

Which kernel a shape uses (this one, dp or torch's) is chosen per host by measurement: see
``kernel_select`` (``CHOICE`` holds the choices; ``ZIPMOE_KERNEL`` forces one). Set
``ZIPMOE_RUN_KERNELS=0`` to disable this kernel (then everything is torch).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["linear", "enabled", "enabled_by_env", "set_threads", "single_row_scope", "decode_rows_scope",
           "gemv_reference", "gemm_rows", "bf16_words", "run_kernel", "CHOICE", "ROWS_UPTO"]

log = logging.getLogger(__name__)

_ENABLED = os.environ.get("ZIPMOE_RUN_KERNELS", "1") not in ("0", "false", "no")
_gemv = None
CHOICE: dict[tuple[int, int, int], str] = {}  # (out, in, threads) -> "numba" | "dp" | "torch" (kernel_select)
CHOICE_EPOCH = 0  # bumped whenever CHOICE changes (kernel_select), so what was derived from it is redone
ROWS_UPTO: dict[tuple[int, int, int], int] = {}  # (out, in, threads) -> most rows a prefill product sends
# through the multi-row kernel (kernel_select measures it; ``kernels_rows.prefill_linear``)
_scope_threads = 0  # torch's thread count while a single_row_scope is active (torch itself runs on 1 then)
_decode_rows = False  # inside a decode_rows_scope: every product is row-invariant (see the module doc)
_addr = None  # kernels_addr once enabled() found it usable
_NAN16: int | None = None  # the bf16 bits of NaN in torch's conversion here (None: _gemv_linear converts with torch)


WORDS = 16  # uint32 words (32 bf16 weights) per block of the fixed summation order
LANES = 8  # float32 lanes per accumulator vector: WORDS // LANES vectors for even and for odd weights
PREFETCH = 16 << 10  # the GEMVs ask for the weights this far ahead of the block they sum (prefetcht1 on x86),
# as the dp kernel does: host A (Intel, 2 threads, from memory) 14-19 -> 22-32 GB/s, 9-10 -> 13-15 on one
# thread, emulating AVX2 16-22 -> 28-33; 8 KiB alike, 32 KiB a little less, into L1 (prefetcht0) less

try:  # module level, so numba's on-disk cache can find the kernel again (closures recompile every run)
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; torch only without it
    njit = None

if njit is not None:
    @intrinsic
    def _u32_as_f32(typingctx, v):
        sig = types.float32(types.uint32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen

    def open_blocks(builder, nb, n_acc: int, name: str):
        """Start a block loop (none if ``nb`` <= 0): entry, loop, done, index phi, ``n_acc`` accumulators."""
        entry = builder.block
        loop, done = builder.append_basic_block(name), builder.append_basic_block(name + "_done")
        builder.cbranch(builder.icmp_signed(">", nb, ir.Constant(ir.IntType(64), 0)), loop, done)
        builder.position_at_end(loop)
        b = builder.phi(ir.IntType(64))
        return entry, loop, done, b, [builder.phi(ir.VectorType(ir.FloatType(), LANES)) for _ in range(n_acc)]

    def close_blocks(builder, entry, loop, done, b, acc, nxt, nb, nvec: int) -> list:
        """End a block loop of the fixed order: the back edge (``b`` + 1 < ``nb``) and the phi inputs
        (zero on entry), then in ``done`` the pairwise lane sums ((l0 + l1) + (l2 + l3)) + ... of each
        run of ``nvec`` accumulator vectors in ``nxt`` (even weights, then odd, per input row)."""
        i64, i32 = ir.IntType(64), ir.IntType(32)
        zero = ir.Constant(acc[0].type, [0.0] * LANES)
        b1, end = builder.add(b, ir.Constant(i64, 1)), builder.block
        b.add_incoming(ir.Constant(i64, 0), entry)
        b.add_incoming(b1, end)
        for p, q in zip(acc, nxt):
            p.add_incoming(zero, entry)
            p.add_incoming(q, end)
        builder.cbranch(builder.icmp_signed("<", b1, nb), loop, done)
        builder.position_at_end(done)
        fin = []
        for q in nxt:
            p = builder.phi(acc[0].type)
            p.add_incoming(zero, entry)
            p.add_incoming(q, end)
            fin.append(p)
        sums = []
        for g in range(0, len(fin), nvec):
            s = [builder.extract_element(v, ir.Constant(i32, lane)) for v in fin[g:g + nvec] for lane in range(LANES)]
            while len(s) > 1:
                s = [builder.fadd(s[2 * m], s[2 * m + 1]) for m in range(len(s) // 2)]
            sums.append(s[0])
        return sums

    def split_words(builder, u):
        """bf16 pairs [LANES] uint32 -> (even, odd) values as float32 vectors (a shift and a mask)."""
        vi, vf = u.type, ir.VectorType(ir.FloatType(), LANES)
        shift, mask = ir.Constant(vi, [16] * LANES), ir.Constant(vi, [0xFFFF0000 - (1 << 32)] * LANES)
        return builder.bitcast(builder.shl(u, shift), vf), builder.bitcast(builder.and_(u, mask), vf)

    def prefetch_ahead(builder, vp, k, ahead: int) -> None:
        """Ask for the cache line of ``vp[k + ahead]`` (a vector pointer): ``llvm.prefetch`` (read, locality
        2 = prefetcht1 on x86, data cache). A hint: it never faults, whatever the address."""
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        mod = builder.module
        pfn = mod.globals.get("llvm.prefetch.p0") or ir.Function(
            mod, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name="llvm.prefetch.p0")
        at = builder.bitcast(builder.gep(vp, [builder.add(k, ir.Constant(k.type, ahead))]), i8p)
        builder.call(pfn, [at, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])

    def weight_row(context, builder, signature, args):
        """(row ``args[1]`` of the weights ``args[0]`` as a pointer to [LANES] uint32 vectors, the input
        ``args[2]``'s array struct) for an intrinsic whose arguments begin (w, i, xw)."""
        wa = context.make_array(signature.args[0])(context, builder, value=args[0])
        xa = context.make_array(signature.args[2])(context, builder, value=args[2])
        vi = ir.VectorType(ir.IntType(32), LANES)
        row = builder.mul(args[1], cgutils.unpack_tuple(builder, wa.strides, 2)[0])  # bytes
        i8p = ir.IntType(8).as_pointer()
        return builder.bitcast(builder.gep(builder.bitcast(wa.data, i8p), [row]), vi.as_pointer()), xa

    def row_blocks_ir(context, builder, signature, args, prefetch: int = 0):
        """The code of ``_row_blocks`` (``prefetch`` > 0: ``_row_blocks_pf``, which also asks for the line
        ``prefetch`` 32-byte vectors ahead of each block; a hint, never a change of any value)."""
        i64, vi = ir.IntType(64), ir.VectorType(ir.IntType(32), LANES)
        wv, xa = weight_row(context, builder, signature, args)
        xv = builder.bitcast(xa.data, vi.as_pointer())
        nvec = WORDS // LANES
        entry, loop, done, b, acc = open_blocks(builder, args[3], 2 * nvec, "blocks")  # even, then odd
        nxt = list(acc)
        k0 = builder.mul(b, ir.Constant(i64, nvec))
        if prefetch > 0:
            prefetch_ahead(builder, wv, k0, prefetch)
        for v in range(nvec):
            k = builder.add(k0, ir.Constant(i64, v))
            lo, hi = split_words(builder, builder.load(builder.gep(wv, [k]), align=4))  # weights
            xe, xo = split_words(builder, builder.load(builder.gep(xv, [k]), align=4))  # inputs
            nxt[v] = builder.fadd(acc[v], builder.fmul(lo, xe))
            nxt[nvec + v] = builder.fadd(acc[nvec + v], builder.fmul(hi, xo))
        sums = close_blocks(builder, entry, loop, done, b, acc, nxt, args[3], nvec)
        return context.make_tuple(builder, signature.return_type, sums)

    @intrinsic
    def _row_blocks(typingctx, w, i, xw, nb):
        """(even, odd) partial sums of row i over its first nb blocks, in the order of the module doc;
        xw uint32 [K/2] is the input as bf16 pairs, split like the weights.

        Written as LLVM vector IR rather than left to the auto-vectorizer: without fast-math LLVM may
        not reorder a float sum, so it would stay scalar; here the reordering is explicit, the same
        on every instruction set (an 8-lane vector is one AVX register, two SSE or NEON registers,
        half an AVX-512 one; every lane is the same IEEE float32 arithmetic).
        """
        return types.UniTuple(types.float32, 2)(w, i, xw, nb), row_blocks_ir

    @intrinsic
    def _row_blocks_pf(typingctx, w, i, xw, nb):
        """``_row_blocks`` (the same operations on the same values, so the same sums) that also asks for
        the weights ``PREFETCH`` bytes ahead of each block (see ``PREFETCH``)."""
        return types.UniTuple(types.float32, 2)(w, i, xw, nb), partial(row_blocks_ir, prefetch=PREFETCH // 32)

    @njit(nogil=True, cache=True, inline="always")
    def _row_tail(w, i, xw, nb, se, so):
        """The row's sums ``se``, ``so`` after its blocks, with the tail added in sequence: even + odd."""
        hi = np.uint32(0xFFFF0000)
        sh = np.uint32(16)
        for j in range(nb * WORDS, w.shape[1]):  # the tail, in sequence
            u, v = w[i, j], xw[j]
            se += _u32_as_f32(np.uint32(u << sh)) * _u32_as_f32(np.uint32(v << sh))
            so += _u32_as_f32(np.uint32(u & hi)) * _u32_as_f32(np.uint32(v & hi))
        return se + so

    @njit(nogil=True, cache=True, inline="always")
    def _row_sum(w, i, xw, nb):
        """Row i's float32 sum in the fixed order: ``_row_blocks``, the tail in sequence, even + odd."""
        se, so = _row_blocks(w, i, xw, nb)
        return _row_tail(w, i, xw, nb, se, so)

    @njit(nogil=True, cache=True, inline="always")
    def _row_sum_pf(w, i, xw, nb):
        """``_row_sum`` with the weights prefetched ahead (``_row_blocks_pf``): the same bits. For the GEMVs
        that stream a matrix row after row."""
        se, so = _row_blocks_pf(w, i, xw, nb)
        return _row_tail(w, i, xw, nb, se, so)

    @njit(parallel=True, nogil=True, cache=True)  # no fastmath: IEEE float32, the order written here
    def _gemv_kernel(w, xw, out):  # w uint32 [N, K/2]: bf16 pairs (little endian); xw uint32 [K/2] too; out f32 [N]
        nb = w.shape[1] // WORDS
        for i in prange(w.shape[0]):
            out[i] = _row_sum_pf(w, i, xw, nb)

def gemv_reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The kernel's summation order in plain numpy (for tests): w uint32 [N, K/2], x float32 [K] -> [N]."""
    n, kh = w.shape
    wf = np.stack([(w << np.uint32(16)).view(np.float32), (w & np.uint32(0xFFFF0000)).view(np.float32)])
    prod = wf * np.stack([x[0::2], x[1::2]])[:, None, :]  # [2, N, K/2]: exact in float32
    nb = kh // WORDS
    acc = np.zeros((2, n, WORDS), np.float32)
    for b in range(nb):
        acc += prod[:, :, b * WORDS:(b + 1) * WORDS]
    lanes = [acc[:, :, m] for m in range(WORDS)]
    while len(lanes) > 1:
        lanes = [lanes[2 * m] + lanes[2 * m + 1] for m in range(len(lanes) // 2)]
    s = lanes[0]  # [2, N]
    for j in range(nb * WORDS, kh):
        s = s + prod[:, :, j]
    return s[0] + s[1]


def _build():
    if njit is None:
        raise ImportError("numba is not installed")
    return _gemv_kernel


def enabled() -> bool:
    global _ENABLED, _gemv
    if _ENABLED and _gemv is None:
        n = torch.get_num_threads()
        try:
            _gemv = _build()
            # Start numba's OpenMP pool here, on a tiny input: its launch resets the process-wide
            # OpenMP thread count, which torch shares, so put torch's back right after.
            _gemv(np.zeros((1, 1), np.uint32), np.zeros(1, np.uint32), np.empty(1, np.float32))
        except Exception as exc:  # numba missing or broken: torch only
            log.warning("bf16 decode kernel unavailable (%s); using torch", exc)
            _ENABLED = False
        else:
            _prepare_addr()
        finally:
            torch.set_num_threads(n)
    return _ENABLED


def _prepare_addr() -> None:
    """The address-taking GEMV (``kernels_addr``: the same sums, bf16 written by the kernel), where its
    rounding reproduces torch's on this host; else ``_gemv_linear`` converts with torch as before."""
    global _addr, _NAN16
    try:
        from . import kernels_addr as mod

        nan16 = mod.nan_pattern()
        if nan16 is not None:
            mod.gemv_bf16(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.bfloat16), None, nan16)
            _addr, _NAN16 = mod, nan16
        else:
            log.info("bf16 GEMV: torch's bf16 rounding here is not the kernel's; converting with torch")
    except Exception as exc:  # pragma: no cover - same dependencies as the kernel itself
        log.warning("bf16 GEMV by address unavailable (%s); converting with torch", exc)


def enabled_by_env() -> bool:
    return os.environ.get("ZIPMOE_RUN_KERNELS", "1") not in ("0", "false", "no")


def set_threads(n: int) -> None:
    """Threads for the kernel (numba's pool), capped at what numba started with."""
    try:
        import numba

        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    except ImportError:
        pass


@contextmanager
def single_row_scope(active: bool) -> Iterator[None]:
    """Around a one-token bf16 forward: the kernel gets torch's thread count and torch runs on one thread.

    The remaining torch work of a decode step is small element-wise ops; keeping torch's own OpenMP
    team idle avoids two thread pools competing for the same cores.
    """
    global _scope_threads
    if not active or not enabled() or _scope_threads:  # nested: the outer scope's arrangement holds
        yield
        return
    n, outer = torch.get_num_threads(), _scope_threads
    set_threads(n)
    torch.set_num_threads(1)
    _scope_threads = n
    try:
        yield
    finally:
        _scope_threads = outer
        torch.set_num_threads(n)


@contextmanager
def decode_rows_scope(active: bool = True, bf16: bool = True) -> Iterator[None]:
    """Around one decode step of several independent sequences (one row each): the one place that
    says "this forward is a batched decode step". Inside it every ``linear`` computes each row exactly
    as a one-row product in this scope would, whatever the number of rows (``_gemm_kernel`` for bf16,
    one ``F.linear`` per row otherwise), and a bf16 step gets ``single_row_scope``'s thread arrangement.
    Meant for the one thread that runs the model (the engine's)."""
    if not active:
        yield
        return
    global _decode_rows
    outer = _decode_rows
    _decode_rows = True
    try:
        with single_row_scope(bf16):
            yield
    finally:
        _decode_rows = outer


def _torch_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with torch's own thread count, also inside a ``single_row_scope``."""
    n = _scope_threads
    if n <= 1:
        return F.linear(x, w, b)
    torch.set_num_threads(n)
    try:
        return F.linear(x, w, b)
    finally:
        torch.set_num_threads(1)


def run_kernel(kernel: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One-row product x [1, K] bf16 by w [N, K] bf16 with the named kernel (``kernel_select`` times it)."""
    if kernel == "dp":
        return _dp(x, w, None)
    return _gemv_linear(x, w, None) if kernel == "numba" else _torch_linear(x, w)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (x [..., K], w [N, K], b [N]); one bf16 input row goes through the kernel chosen for
    this shape on this host (``kernel_select``): this module's GEMV, the dp kernel (``kernels_dp1``) or
    torch's; M bf16 rows (a prefill): ``kernels_rows.prefill_linear`` (multi-row kernel, dp or torch's)."""
    if _decode_rows:
        return _rows_linear(x, w, b)
    if x.dtype is torch.bfloat16 and x.numel() != x.shape[-1]:  # several rows of a prefill
        from .kernels_rows import prefill_linear

        return prefill_linear(x, w, b)
    return _linear1(x, w, b)


def _one_row_kernel(x: torch.Tensor, w: torch.Tensor) -> str:
    """What ``linear`` runs for one row x [..., K] of this product: "numba", "dp", "torch" or "plain"."""
    k = x.shape[-1]
    if (x.dtype is not torch.bfloat16 or w.dtype is not torch.bfloat16 or k % 2
            or not w.is_contiguous() or w.storage_offset() % 2 or w.dim() != 2):
        return "plain"
    n = w.shape[0]
    t = _scope_threads or torch.get_num_threads()
    kern = CHOICE.get((n, k, t))
    if kern is None:
        from .kernel_select import kernel_for

        kern = kernel_for(n, k, t)
    return kern if kern in ("numba", "dp") and enabled() and (kern == "numba" or _dp(None, w, None)) else "torch"


def _dp(x: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor | None):
    """``kernels_dp1.linear_dp`` (x None: whether the dp kernel is available here)."""
    from . import kernels_dp, kernels_dp1

    return kernels_dp.available() if x is None else kernels_dp1.linear_dp(x, w, b)


def _linear1(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    kern = "plain" if x.numel() != x.shape[-1] else _one_row_kernel(x, w)
    if kern == "plain":
        return F.linear(x, w, b)
    if kern == "dp":
        return _dp(x, w, b)
    return _gemv_linear(x, w, b) if kern == "numba" else _torch_linear(x, w, b)


def _gemv_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    n, k = w.shape  # [N, K] bf16, contiguous; x [..., K] bf16 of one row
    if _NAN16 is not None and x.shape[-1] == k and w.is_cpu and x.is_cpu and _addr.takes_bias(b, n):
        return _addr.gemv_bf16(x, w, b, _NAN16)  # the same bits, without the conversions below
    out = np.empty(n, dtype=np.float32)
    _gemv(w.view(torch.int32).numpy().view(np.uint32).reshape(n, k // 2), bf16_words(x, k)[0], out)
    y = torch.from_numpy(out)
    if b is not None:
        y += b.float()
    return y.to(torch.bfloat16).view(*x.shape[:-1], n)


def bf16_words(x: torch.Tensor, k: int) -> np.ndarray:
    """bf16 rows x [..., K] (K even) as uint32 [M, K/2] bf16 pairs (a view where x allows one), the input
    form of the kernels."""
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous() or x2.storage_offset() % 2:  # 4-byte words need an even start
        x2 = x2.clone(memory_format=torch.contiguous_format)
    return x2.view(torch.int32).numpy().view(np.uint32)


def gemm_rows(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """float32 row sums [M, N] of x [M, K] bf16 by w [N, K] bf16, each row in the one-row kernel's order
    (``kernels_rows``)."""
    from .kernels_rows import gemm_rows as rows

    return rows(x, w)


def _rows_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """A product inside ``decode_rows_scope`` (x [..., K] -> [..., N]): every row gets exactly what
    ``linear`` gives that row alone (x of shape [1, ..., 1, K]). Where that is the numba GEMV (the
    kernel chosen for this shape, section 11 of specs/runtime.md) all rows go through the multi-row
    kernel, one pass over the weights; where it is dp, one dp call over all rows (its order is the same
    for any M); otherwise (torch chosen for the shape, float32, odd K) one product per row."""
    k, n = x.shape[-1], w.shape[0]
    m = x.numel() // k if k else 0
    if m <= 1:
        return _linear1(x, w, b)
    kern = _one_row_kernel(x, w)
    if kern == "dp":
        return _dp(x, w, b)  # [..., N]: each row as alone
    if kern == "numba":
        y = torch.from_numpy(gemm_rows(x, w))  # [M, N] float32, each row as _gemv_linear sums it
        if b is not None:
            y += b.float()
        return y.to(torch.bfloat16).view(*x.shape[:-1], n)
    one = (1,) * (x.dim() - 1) + (k,)
    return torch.cat([_linear1(r.view(one), w, b).reshape(1, n) for r in x.reshape(m, k)]).view(*x.shape[:-1], n)
