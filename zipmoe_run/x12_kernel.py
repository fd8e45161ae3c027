"""Matrix-vector products that read the 12-bit form (``x12``) directly, bit for bit the bf16 GEMV's.

For each output row the kernel rebuilds the row's bf16 words into a small per-thread scratch (uint32
[Kp/2], a few KiB that stay in L1: nibble -> exponent, the row's escapes patched, merged with the
sign+mantissa bytes; ``x12.decode_row``) and then sums it with the very same code as the bf16 GEMV
(``kernels._row_blocks`` and the same sequential tail), so the float32 result of every row equals
``kernels.gemv_reference`` of the bf16 matrix bit for bit, on every instruction set and for any
thread count. Memory traffic per weight: 1.5 bytes (plus escapes) instead of 2.

``gemv(x12, x)`` takes x float32 [K] or [M, K] holding bf16 values (M input rows per weight row, batched
decode: the row is rebuilt once and summed M times; other float32 values are refused with ValueError:
the kernel reads the input as bf16 pairs, as the bf16 GEMV does) and returns float32 [N] / [M, N].
``K`` must be even (as for the bf16 GEMV). Threads: numba's pool (``kernels.set_threads``).

A variant that decoded each block into registers and summed it at once (no scratch; the same order
copied) was measured slower on an AVX-512 Zen 4 (24 vs 29 GB/s bf16-equivalent in cache, 1 thread):
the decode and the sum compete for the same vector pipes either way, and the two simple loops
schedule better than the fused one. The kernel is checked against the bf16 GEMV at first use
(:func:`available`).
"""
from __future__ import annotations

import logging

import numpy as np

from . import kernels as K
from .x12 import X12, decode_row

__all__ = ["gemv", "available", "ROWS_PER_TASK"]

log = logging.getLogger(__name__)

ROWS_PER_TASK = 16  # rows per parallel task: one scratch allocation each, enough tasks to balance threads

try:
    from numba import njit, prange
except ImportError:  # pragma: no cover
    njit = None


_checked: list[bool] = []  # [ok] once the self-check ran


def available() -> bool:
    """The kernel can run here (numba present, the bf16 kernels enabled) and passed its self-check."""
    if not _checked:
        _checked.append(njit is not None and K.njit is not None and K.enabled() and _self_check())
    return _checked[0]


def _check_case():
    """A small matrix with an escape in every row (in whole blocks and in the tail) and
    the bf16 GEMV's float32 sums of it: (X12, x float32 [K], ref float32 [N])."""
    from .x12 import from_bf16

    rng = np.random.default_rng(12)
    n, k = 37, 3 * 2 * WORDS + 6
    w = (rng.integers(0, 1 << 16, size=(n, k)) & 0x807F | rng.integers(118, 133, size=(n, k)) << 7).astype(np.uint16)
    w[np.arange(n), np.arange(n) * 3 % k] = 0x0005  # an escape (subnormal) in every row
    x = (rng.standard_normal(k).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # bf16
    ref = np.empty(n, np.float32)
    K._gemv_kernel(w.view(np.uint32).reshape(n, k // 2), input_words(x.reshape(1, k))[0], ref)
    return from_bf16(w), x, ref


def _self_check() -> bool:
    """Compare the kernel with the bf16 GEMV, bit for bit.

    numba's on-disk cache keys a compiled function on its own source file only, while these kernels
    inline code from ``kernels`` (the summation order) and ``x12`` (the decode): after an edit there a
    cached copy could be stale. On a mismatch the kernel is compiled again without the cache; if it
    still differs, x12 products are unavailable (callers decode to bf16 instead)."""
    global _x12_gemv
    enc, x, ref = _check_case()
    x2 = np.stack([x, x])  # one and two input rows
    for attempt in range(2):
        if (np.array_equal(gemv(enc, x).view(np.uint32), ref.view(np.uint32))
                and all(np.array_equal(r.view(np.uint32), ref.view(np.uint32)) for r in gemv(enc, x2))):
            return True
        log.warning("x12 GEMV differs from the bf16 GEMV%s", " (recompiling without numba's cache)" if not attempt
                    else "; x12 products decode to bf16 instead")
        _x12_gemv = njit(parallel=True, nogil=True)(_x12_gemv.py_func)
    return False


if njit is not None and K.njit is not None:
    _row_blocks, _u32_as_f32, WORDS = K._row_blocks, K._u32_as_f32, K.WORDS

    @njit(parallel=True, nogil=True, cache=True)  # no fastmath: the bf16 GEMV's IEEE order
    def _x12_gemv(nib, sm16, table, base, row_ptr, esc_col, esc_exp, xw, out, rows):
        # nib uint8 [N, K/2], sm16 uint16 [N, K/2]; xw uint32 [M, K/2] bf16 pairs; out f32 [M, N]
        n, kh = nib.shape
        m = xw.shape[0]
        nb = kh // WORDS
        hi = np.uint32(0xFFFF0000)
        sh = np.uint32(16)
        tasks = (n + rows - 1) // rows
        for c in prange(tasks):
            scratch = np.empty((1, kh), np.uint32)  # one decoded row, bf16 pairs
            for i in range(c * rows, min(n, (c + 1) * rows)):
                decode_row(nib, sm16, table, base, row_ptr, esc_col, esc_exp, i, scratch[0])
                for r in range(m):
                    xr = xw[r]
                    se, so = _row_blocks(scratch, 0, xr, nb)
                    for j in range(nb * WORDS, kh):  # the tail, in sequence (as kernels._gemv_kernel)
                        u, v = scratch[0, j], xr[j]
                        se += _u32_as_f32(np.uint32(u << sh)) * _u32_as_f32(np.uint32(v << sh))
                        so += _u32_as_f32(np.uint32(u & hi)) * _u32_as_f32(np.uint32(v & hi))
                    out[r, i] = se + so


def input_words(x: np.ndarray) -> np.ndarray:
    """x float32 [M, K] holding bf16 values -> uint32 [M, K/2] bf16 pairs (the kernels' input form);
    ValueError where a value is not a bf16 (low 16 bits not zero: it would be truncated)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    if (bits & np.uint32(0xFFFF)).any():
        raise ValueError("x12 gemv needs bf16 inputs (float32 values whose low 16 bits are zero)")
    return np.ascontiguousarray((bits >> np.uint32(16)).astype(np.uint16)).view(np.uint32)


def gemv(w: X12, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w [N, K] in x12 times x float32 [K] or [M, K] -> float32 [N] or [M, N] (each row's sum in the
    bf16 GEMV's fixed order)."""
    n, k = w.shape
    x = np.asarray(x, np.float32)
    one = x.ndim == 1
    x2 = x.reshape(1, -1) if one else x
    if k % 2 or x2.shape[1] != k:
        raise ValueError(f"x12 gemv needs an even K equal to the input's ({k} vs {x2.shape[1]})")
    xw = input_words(x2)  # [M, K/2]
    m = x2.shape[0]
    res = np.empty((m, n), np.float32) if out is None else out.reshape(m, n)
    _x12_gemv(w.nibbles, w.sm.view(np.uint16), w.table, w.kernel_base, w.row_ptr, w.esc_col,
              w.esc_exp, xw, res, ROWS_PER_TASK)
    return res[0] if one else res
