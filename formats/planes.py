"""Split BF16 words into an exponent plane and a sign+mantissa plane, and merge them back.

For a BF16 word ``u`` (the uint16 bit pattern)::

    exp = (u >> 7) & 0xFF                      # 8 exponent bits
    sm  = ((u >> 15) << 7) | (u & 0x7F)        # sign bit on top of the 7 mantissa bits

and the inverse is ``u = ((sm >> 7) << 15) | (exp << 7) | (sm & 0x7F)``. The mapping is a bijection
on all 65,536 patterns (signed zeros, subnormals, infinities and NaN payloads included), so the round
trip is bit-exact by construction.

The fast kernels are numba ``@njit(nogil=True, cache=True)`` loops: they release the GIL, so several
threads can run them at once, and they keep no state, so they are thread-safe as long as two threads
do not write the same output range. ``split_bf16_numpy`` / ``merge_bf16_numpy`` are the reference
implementations the tests compare against.

``merge_bf16_le_bytes`` writes the merged words as little-endian byte pairs into a ``uint8`` buffer
at any byte offset (no alignment or host byte order assumptions); it is what the decoder uses to
write straight into an output buffer. ``split_bf16``/``merge_bf16`` work on native ``uint16`` arrays
(on a little-endian host, which every supported platform is, these are the safetensors bytes).

The first call of each kernel for a new array type compiles it (about a second); ``cache=True``
stores the machine code next to this module, so later processes load it in milliseconds.
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "split_bf16",
    "merge_bf16",
    "merge_bf16_le_bytes",
    "split_bf16_numpy",
    "merge_bf16_numpy",
    "warm_up",
]


@njit(nogil=True, cache=True)
def _split_kernel(src, exp_out, sm_out):  # pragma: no cover - compiled
    for i in range(src.shape[0]):
        u = src[i]
        exp_out[i] = (u >> 7) & 0xFF
        sm_out[i] = ((u >> 8) & 0x80) | (u & 0x7F)


@njit(nogil=True, cache=True)
def _merge_kernel(exp, sm, out):  # pragma: no cover - compiled
    for i in range(exp.shape[0]):
        s = np.uint16(sm[i])
        e = np.uint16(exp[i])
        out[i] = ((s & 0x80) << 8) | (e << 7) | (s & 0x7F)


@njit(nogil=True, cache=True)
def _merge_bytes_kernel(exp, sm, out):  # pragma: no cover - compiled
    for i in range(exp.shape[0]):
        s = sm[i]
        e = exp[i]
        out[2 * i] = ((e & 1) << 7) | (s & 0x7F)
        out[2 * i + 1] = (s & 0x80) | (e >> 1)


def _check_1d(name: str, arr: np.ndarray, dtype: type) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1:
        got = f"{arr.dtype}[{arr.ndim}d]" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise TypeError(f"{name} must be a 1-D {np.dtype(dtype).name} array, got {got}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def _check_split_args(src: np.ndarray, exp_out: np.ndarray, sm_out: np.ndarray) -> None:
    _check_1d("src", src, np.uint16)
    _check_1d("exp_out", exp_out, np.uint8)
    _check_1d("sm_out", sm_out, np.uint8)
    n = src.shape[0]
    if exp_out.shape[0] != n or sm_out.shape[0] != n:
        raise ValueError(f"plane lengths {exp_out.shape[0]}/{sm_out.shape[0]} != {n} source elements")
    if not (exp_out.flags.writeable and sm_out.flags.writeable):
        raise ValueError("output planes must be writeable")


def _check_merge_args(exp: np.ndarray, sm: np.ndarray, out: np.ndarray, out_dtype: type, per: int) -> None:
    _check_1d("exp", exp, np.uint8)
    _check_1d("sm", sm, np.uint8)
    _check_1d("out", out, out_dtype)
    n = exp.shape[0]
    if sm.shape[0] != n:
        raise ValueError(f"sm plane has {sm.shape[0]} elements, exponent plane {n}")
    if out.shape[0] != per * n:
        raise ValueError(f"out has {out.shape[0]} items, expected {per * n}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")


def split_bf16(src: np.ndarray, exp_out: np.ndarray, sm_out: np.ndarray) -> None:
    """Split native ``uint16`` BF16 words into ``exp_out`` and ``sm_out`` (both ``uint8``, same length).

    Releases the GIL; thread-safe for distinct output arrays.
    """
    _check_split_args(src, exp_out, sm_out)
    _split_kernel(src, exp_out, sm_out)


def merge_bf16(exp: np.ndarray, sm: np.ndarray, out: np.ndarray) -> None:
    """Inverse of :func:`split_bf16`: write native ``uint16`` words into ``out`` (same length).

    Releases the GIL; thread-safe for distinct output arrays.
    """
    _check_merge_args(exp, sm, out, np.uint16, 1)
    _merge_kernel(exp, sm, out)


def merge_bf16_le_bytes(exp: np.ndarray, sm: np.ndarray, out: np.ndarray) -> None:
    """Merge into a ``uint8`` buffer of ``2 * len(exp)`` bytes as little-endian BF16 words.

    ``out`` may start at any byte offset (e.g. an odd slice of a larger buffer). Releases the GIL;
    thread-safe for distinct output ranges.
    """
    _check_merge_args(exp, sm, out, np.uint8, 2)
    _merge_bytes_kernel(exp, sm, out)


def split_bf16_numpy(src: np.ndarray, exp_out: np.ndarray, sm_out: np.ndarray) -> None:
    """Reference implementation of :func:`split_bf16` in plain numpy (slow, obviously correct)."""
    _check_split_args(src, exp_out, sm_out)
    u = src.astype(np.uint16, copy=False)
    exp_out[...] = ((u >> 7) & 0xFF).astype(np.uint8)
    sm_out[...] = (((u >> 15) << 7) | (u & 0x7F)).astype(np.uint8)


def merge_bf16_numpy(exp: np.ndarray, sm: np.ndarray, out: np.ndarray) -> None:
    """Reference implementation of :func:`merge_bf16` in plain numpy (slow, obviously correct)."""
    _check_merge_args(exp, sm, out, np.uint16, 1)
    s = sm.astype(np.uint16)
    e = exp.astype(np.uint16)
    out[...] = ((s >> 7) << 15) | (e << 7) | (s & 0x7F)


def warm_up() -> None:
    """Compile (or load from the numba cache) the kernels for the array types the decoder uses."""
    src = np.zeros(4, dtype=np.uint16)
    exp = np.empty(4, dtype=np.uint8)
    sm = np.empty(4, dtype=np.uint8)
    split_bf16(src, exp, sm)
    merge_bf16(exp, sm, np.empty(4, dtype=np.uint16))
    merge_bf16_le_bytes(exp, sm, np.empty(8, dtype=np.uint8))
    ro_exp = exp.copy()
    ro_sm = sm.copy()
    ro_exp.flags.writeable = False
    ro_sm.flags.writeable = False
    merge_bf16_le_bytes(exp, ro_sm, np.empty(8, dtype=np.uint8))
    merge_bf16_le_bytes(ro_exp, ro_sm, np.empty(8, dtype=np.uint8))
