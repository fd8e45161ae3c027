"""The multi-row bf16 kernel of batched decode steps (``kernels.decode_rows_scope``) and of prefill's
products with few rows (``prefill_linear``).

x [M, K] bf16 by w [N, K] bf16 -> [M, N]: every output row is summed in exactly the fixed order of the
one-row GEMV of ``kernels`` (the same ``_row_blocks`` blocks, pairwise lane sums and sequential tail),
so row m equals the one-row result bit for bit for any M and any thread count. Output rows are split
over threads; each weight row is read from memory once and applied to the M inputs while it is in
cache, 4 inputs per pass (``_rows_blocks``: one weight load, each input's own accumulators). The
inputs are read as bf16 pairs (``kernels.bf16_words``: xw uint32 [M, K/2]), as in the one-row GEMV.

Prefill (``prefill_linear``, any bf16 product of M > 1 rows outside a batched decode step): a routed
expert of a prompt gets the tokens routed to it (a few to a few dozen), attention, the shared expert and
lm_head get them all. Up to ``kernels.ROWS_UPTO[(out, in, threads)]`` rows the product is this kernel,
so each such row is bit for bit the one-row GEMV's result for that row (the decode path's); more rows
run the kernel ``kernel_select_rows`` chose for that shape, thread count and M: the AVX-512 BF16
dot-product kernel (``kernels_dp``, its own fixed order; only where the CPU has it) or torch's product.
The choice depends only on host, shape, thread count and M, never on where the weights come from.
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels as K
from .kernels import LANES, WORDS, njit

__all__ = ["ROWS", "gemm_rows", "prefill_linear", "rows_upto"]

if njit is None:  # pragma: no cover - numba is a dependency
    raise ImportError("numba is not installed")

from llvmlite import ir  # noqa: E402
from numba import prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from .kernels import (PREFETCH, _row_sum_pf, _u32_as_f32, bf16_words, close_blocks, open_blocks,  # noqa: E402
                      prefetch_ahead, split_words, weight_row)

ROWS = 4  # inputs that share one pass over a weight row in the multi-row kernel


@intrinsic
def _rows_blocks(typingctx, w, i, xw, m0, nb):
    """``_row_blocks`` of row i for the ROWS inputs m0..m0+ROWS-1 of xw [M, K/2] (bf16 pairs) in one
    pass: each weight vector is loaded once and used for every input; each input keeps its own
    accumulators, updated in exactly ``_row_blocks``' order (so its sums are bit-identical), and the
    ROWS independent chains keep the core busy where one input's dependency chain would stall it.
    Returns (even_0, odd_0, even_1, odd_1, ...)."""
    sig = types.UniTuple(types.float32, 2 * ROWS)(w, i, xw, m0, nb)

    def codegen(context, builder, signature, args):
        i64, i8p = ir.IntType(64), ir.IntType(8).as_pointer()
        vi = ir.VectorType(ir.IntType(32), LANES)
        wv, xa = weight_row(context, builder, signature, args)
        stride = cgutils.unpack_tuple(builder, xa.strides, 2)[0]  # bytes per input row
        base = builder.bitcast(xa.data, i8p)
        xs = [builder.bitcast(builder.gep(base, [builder.mul(builder.add(args[3], ir.Constant(i64, r)), stride)]),
                              vi.as_pointer()) for r in range(ROWS)]
        nvec = WORDS // LANES
        entry, loop, done, b, acc = open_blocks(builder, args[4], ROWS * 2 * nvec, "rblocks")  # per input: even, odd
        nxt = list(acc)
        prefetch_ahead(builder, wv, builder.mul(b, ir.Constant(i64, nvec)), PREFETCH // 32)  # as the one-row GEMV
        for v in range(nvec):
            k = builder.add(builder.mul(b, ir.Constant(i64, nvec)), ir.Constant(i64, v))
            lo, hi = split_words(builder, builder.load(builder.gep(wv, [k]), align=4))  # loaded once
            for r in range(ROWS):
                a = r * 2 * nvec
                xe_r, xo_r = split_words(builder, builder.load(builder.gep(xs[r], [k]), align=4))
                nxt[a + v] = builder.fadd(acc[a + v], builder.fmul(lo, xe_r))
                nxt[a + nvec + v] = builder.fadd(acc[a + nvec + v], builder.fmul(hi, xo_r))
        sums = close_blocks(builder, entry, loop, done, b, acc, nxt, args[4], nvec)  # as _row_blocks, per input
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@njit(parallel=True, nogil=True, cache=True)  # the one-row order of ``kernels``, for each of M rows
def _gemm_kernel(w, xw, out):  # w uint32 [N, K/2]; xw uint32 [M, K/2] bf16 pairs, C-contiguous; out f32 [M, N]
    n, kh = w.shape
    m_rows = xw.shape[0]
    hi = np.uint32(0xFFFF0000)
    sh = np.uint32(16)
    nb = kh // WORDS
    full = m_rows - m_rows % ROWS
    for i in prange(n):  # weight row i is read from memory once, then stays in cache for all M
        for m0 in range(0, full, ROWS):
            sums = _rows_blocks(w, i, xw, m0, nb)
            for r in range(ROWS):
                se, so = sums[2 * r], sums[2 * r + 1]
                for j in range(nb * WORDS, kh):  # the tail, in sequence
                    u, v = w[i, j], xw[m0 + r, j]
                    se += _u32_as_f32(np.uint32(u << sh)) * _u32_as_f32(np.uint32(v << sh))
                    so += _u32_as_f32(np.uint32(u & hi)) * _u32_as_f32(np.uint32(v & hi))
                out[m0 + r, i] = se + so
        for m in range(full, m_rows):
            out[m, i] = _row_sum_pf(w, i, xw[m], nb)  # the one-row GEMV's sum (weights prefetched ahead)


def gemm_rows(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """float32 row sums [M, N] of x [M, K] bf16 by w [N, K] bf16, each row in the one-row kernel's order."""
    n, k = w.shape
    xw = bf16_words(x, k)  # [M, K/2] bf16 pairs
    out = np.empty((xw.shape[0], n), dtype=np.float32)
    _gemm_kernel(w.view(torch.int32).numpy().view(np.uint32).reshape(n, k // 2), xw, out)
    return out


def rows_upto(n: int, k: int, t: int) -> int:
    """The most rows of an [n, k] bf16 product at t threads that go through this kernel (chosen now if
    it has not been: ``kernel_select_rows.rows_for``)."""
    got = K.ROWS_UPTO.get((n, k, t))
    if got is None:
        from .kernel_select_rows import rows_for

        got = rows_for(n, k, t)
    return got


def prefill_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of M > 1 bf16 rows x [..., K] by w [N, K] (+ b [N]) -> [..., N]: this kernel up to
    ``rows_upto`` rows (each row then equals the one-row GEMV's), beyond it the dot-product kernel or
    torch's as chosen for this shape and M (torch at torch's thread count, also inside a
    ``single_row_scope``). Called for every product of a prefill (a few hundred per prompt: one per
    routed expert's projection), so the per-call work is a few dictionary look-ups, no imports."""
    k, n = x.shape[-1], w.shape[0]
    if (w.dtype is not torch.bfloat16 or k % 2 or w.dim() != 2 or not w.is_contiguous() or w.storage_offset() % 2
            or w.shape[1] != k or not (x.is_cpu and w.is_cpu) or not K.enabled()):
        return K._torch_linear(x, w, b)
    m = x.numel() // k
    scoped = K._scope_threads
    t = scoped or torch.get_num_threads()
    upto = K.ROWS_UPTO.get((n, k, t))
    if m <= (upto if upto is not None else rows_upto(n, k, t)):
        rows = gemm_rows
    elif _select().beyond_for(n, k, t, m) == "dp":
        rows = _dp().gemm_dp
    else:
        return K._torch_linear(x, w, b)
    if scoped:  # numba's team already has torch's thread count, torch idles
        y = torch.from_numpy(rows(x, w))  # [M, N] float32: each row in its kernel's fixed order
    else:
        with K.single_row_scope(True):  # numba's team at torch's thread count, torch idle
            y = torch.from_numpy(rows(x, w))
    if b is not None:
        y += b.float()
    return y.to(torch.bfloat16).view(*x.shape[:-1], n)


_lazy: dict = {}  # module name -> module, imported on first use


def _select():
    """``kernel_select_rows``, imported on first use (it imports this module's callers)."""
    mod = _lazy.get("select")
    if mod is None:
        from . import kernel_select_rows as mod

        _lazy["select"] = mod
    return mod


def _dp():
    """``kernels_dp``, imported on first use (only a prefill beyond the crossover needs it)."""
    mod = _lazy.get("dp")
    if mod is None:
        from . import kernels_dp as mod

        _lazy["dp"] = mod
    return mod
