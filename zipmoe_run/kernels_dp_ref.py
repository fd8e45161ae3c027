"""The dp kernel's summation order (``kernels_dp``, section 11 of specs/runtime.md) in numpy, for tests
and for hosts without the instruction: ``vdpbf16ps`` emulated exactly as the Intel SDM defines it (two
fused multiply-adds per lane, the odd element of a pair first; exact products, one nearest-even rounding
to float32; denormal inputs and accumulator read as zero of their sign; results tiny after rounding
flushed to zero of their sign), then the 16 lanes added pairwise."""
from __future__ import annotations

import numpy as np

__all__ = ["dp_reference", "LANES"]

LANES = 16  # float32 lanes of one accumulator; a block is LANES bf16 pairs
_MIN_NORMAL = 2.0 ** -126


def _bf16_to_f64(u16: np.ndarray) -> np.ndarray:
    """bf16 bits -> float64 (exact), denormals as zero of their sign (DAZ)."""
    with np.errstate(invalid="ignore"):
        f = (u16.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return np.where((u16 & np.uint16(0x7F80)) == 0, np.copysign(0.0, f), f)


def _fma_ftz(acc: np.ndarray, p: np.ndarray) -> np.ndarray:
    """float32 R(acc + p) for exact float64 products p: one nearest-even rounding (float64 sum made
    round-to-odd with its exact error, then rounded to float32: no double rounding), tiny after rounding
    -> zero of its sign; DAZ on acc."""
    a = np.where(np.abs(acc) < np.float32(_MIN_NORMAL), np.copysign(np.float32(0), acc), acc).astype(np.float64)
    with np.errstate(all="ignore"):
        s = a + p
        bb = s - a
        e = (a - (s - bb)) + (p - bb)  # s + e == a + p exactly (TwoSum)
        odd = np.nextafter(s, np.where(e > 0, np.inf, -np.inf))
        s = np.where(np.isfinite(s) & (e != 0) & ((s.view(np.int64) & 1) == 0), odd, s)
        r = s.astype(np.float32)
        unb = (s * 2.0 ** 64).astype(np.float32).astype(np.float64) * 2.0 ** -64  # 24 bits, exponent unbounded
        tiny = np.isfinite(s) & (np.abs(unb) < _MIN_NORMAL)
    return np.where(tiny, np.copysign(np.float32(0), r), r).astype(np.float32)


def dp_reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The order of the module doc in numpy: w uint32 [N, K/2], x uint32 [M, K/2] (bf16 pairs) -> f32 [M, N]."""
    n, kh = w.shape
    nb = -(-kh // LANES)
    pad = nb * LANES - kh
    wp = np.pad(w, ((0, 0), (0, pad))).view(np.uint16).reshape(n, nb, LANES, 2)
    xp = np.pad(x, ((0, 0), (0, pad))).view(np.uint16).reshape(x.shape[0], nb, LANES, 2)
    acc = np.zeros((x.shape[0], n, LANES), np.float32)
    for b in range(nb):
        for h in (1, 0):  # odd element first, then even (the instruction's order)
            p = _bf16_to_f64(xp[:, None, b, :, h]) * _bf16_to_f64(wp[None, :, b, :, h])  # [M, N, 16] exact
            acc = _fma_ftz(acc, p)
    lanes = [acc[:, :, i] for i in range(LANES)]
    with np.errstate(all="ignore"):
        while len(lanes) > 1:
            lanes = [lanes[2 * i] + lanes[2 * i + 1] for i in range(len(lanes) // 2)]
    return lanes[0]
