"""The AVX-512 BF16 dot-product kernel (``kernels_dp``) as a decode step's one-row (and few-row) product.

``kernel_select`` may choose "dp" for a one-row bf16 shape where ``kernels_dp.available()``; then
``kernels.linear`` sends the row here, and a batched decode step (``kernels.decode_rows_scope``) sends
all its rows here in one call: the dp order is the same for any M and thread count (threads split the
output rows only), so row m of that call equals row m decoded alone, bit for bit.

Like ``kernels_addr`` for the numba GEMV, the call passes the tensors' addresses (no numpy views) and
the kernel writes the bf16 result itself: each element's float32 sum in the dp order
(``kernels_dp``: the same ``_fill``/``_lanes`` code, the same tiles and prefetch), plus the bias in
float32 (as ``y += b.float()``), rounded to nearest even with torch's NaN pattern (``_round16``),
exactly what ``gemm_dp`` + torch's conversion give (the fallback ``linear_dp`` takes where torch's
rounding is not that here, or the bias is not a contiguous bf16 [N]). An input row whose K/2 pairs are
not whole blocks of 16 is copied into a zero-padded buffer (the weight's partial last block is read
by the kernel's tail tile, never past the row).
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels as K
from .kernels import _u32_as_f32
from .kernels_addr import _round16, _u16_at, _u32_at, takes_bias
from .kernels_dp import KC, LANES, PANEL, PF, RW, _fill, _fill1, _lanes, gemm_dp

from numba import carray, njit, prange  # noqa: E402  (kernels_dp already needs numba)

__all__ = ["linear_dp", "dp_bf16", "PANEL1"]

PANEL1 = PANEL  # row blocks per thread task of the decode entry


@njit(nogil=True, cache=True, inline="always")
def _emit(acc, out, bias, i, q, mm, nan16):
    """out[mm, i] = bf16 of lane sum acc[mm, q] (+ bias[i] in float32)."""
    s = _lanes(acc[mm, q])
    if bias.shape[0] != 0:
        s += _u32_as_f32(np.uint32(np.uint32(bias[i]) << np.uint32(16)))
    out[mm, i] = _round16(s, nan16)


@njit(nogil=True, cache=True)
def _block16(w, xw, out, bias, acc, i0, kc, pf, nan16):
    """``kernels_dp._block`` writing bf16 bits: out u16 [M, N], bias u16 [N] or [0]."""
    n, m = w.shape[0], xw.shape[0]
    if i0 + RW <= n:
        _fill(w, xw, acc, i0, kc, pf)
        for r in range(RW):
            for mm in range(m):
                _emit(acc, out, bias, i0 + r, r, mm, nan16)
    else:
        for i in range(i0, min(i0 + RW, n)):
            _fill1(w, xw, acc, i, kc, pf)
            for mm in range(m):
                _emit(acc, out, bias, i, 0, mm, nan16)


@njit(parallel=True, nogil=True, cache=True)  # threads over panels of output rows only
def _dp16_rows(w, xw, out, bias, nan16, kc, panel, pf):
    # w u32 [N, K/2]; xw u32 [M, Kp/2] zero-padded to whole blocks; out u16 [M, N]; bias u16 [N] or [0]
    n = w.shape[0]
    m = xw.shape[0]
    nblk = (n + RW - 1) // RW
    for p in prange((nblk + panel - 1) // panel):
        acc = np.empty((m, RW, LANES), np.float32)  # [M, RW, 16]
        for ib in range(p * panel, min((p + 1) * panel, nblk)):
            _block16(w, xw, out, bias, acc, ib * RW, kc, pf, nan16)


@njit(nogil=True, cache=True)
def _dp16_kernel(wa, n, kh, xa, m, kp, oa, ba, nan16, kc, panel, pf):
    # the arrays of _dp16_rows from addresses (ba 0: no bias); not parallel itself (see kernels_addr)
    _dp16_rows(carray(_u32_at(wa), (n, kh)), carray(_u32_at(xa), (m, kp)), carray(_u16_at(oa), (m, n)),
               carray(_u16_at(ba), (n if ba != 0 else 0,)), nan16, kc, panel, pf)


def dp_bf16(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, nan16: int, kc: int = KC,
            panel: int = PANEL1, pf: int = PF) -> torch.Tensor:
    """x [..., K] bf16 (M rows) by w [N, K] bf16 (contiguous, even storage offset, K even) + b (``takes_bias``)
    -> bf16 [..., N] in the dp order; ``kc``, ``panel``, ``pf`` change the loops, never a bit."""
    n, k = w.shape
    kh = k // 2
    kp = -(-kh // LANES) * LANES
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if kp != kh:  # [M, Kp]: zero pairs after the row
        xp = torch.zeros(m, 2 * kp, dtype=torch.bfloat16)
        xp[:, :k] = x2
        x2 = xp
    elif not x2.is_contiguous() or x2.storage_offset() % 2:  # 4-byte words need an even start
        x2 = x2.clone(memory_format=torch.contiguous_format)
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    _dp16_kernel(w.data_ptr(), n, kh, x2.data_ptr(), m, kp, y.data_ptr(), 0 if b is None else b.data_ptr(),
                 nan16, kc, panel, pf)
    return y


def linear_dp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bf16 by w [N, K] bf16 (+ b [N]) -> bf16 [..., N], every row in the dp order: by address
    (``dp_bf16``) where it reproduces torch's rounding, else ``gemm_dp`` then torch's conversion."""
    n, k = w.shape
    if K._NAN16 is not None and x.is_cpu and w.is_cpu and takes_bias(b, n):
        return dp_bf16(x, w, b, K._NAN16)
    y = torch.from_numpy(gemm_dp(x.reshape(-1, k), w))  # [M, N] float32
    if b is not None:
        y += b.float()
    return y.to(torch.bfloat16).view(*x.shape[:-1], n)
