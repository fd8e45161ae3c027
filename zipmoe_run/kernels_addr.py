"""The one-row bf16 GEMV of ``kernels`` called with raw addresses, writing its bf16 output itself.

A decode step makes about 40 one-row products; around the kernel's own microseconds each call paid
about 10 us of conversions: the weight and the input turned into numpy views, a float32 numpy output
wrapped as a tensor and converted to bf16 by torch. Here the kernel gets the tensors' addresses
(ints: numba types them in a fraction of the time it takes to type an array) and writes the bf16
result into a torch tensor allocated by the caller.

Exactly the old results, bit for bit: each row's float32 sum is the same code (``kernels._row_sum``:
the blocks and the sequential tail, in the same order), a bias is added as the float32 ``y += b.float()``
did, and the rounding to bf16 is torch's: round to nearest even on the float32 bits, which is what
torch's float32 -> bf16 conversion does for every value that is not NaN. For NaN torch gives one
fixed pattern that depends on its build and CPU capability (0xFFFF from its AVX2/AVX-512 loops,
0x7FC0 from its scalar code): ``nan_pattern`` asks torch which it is on this host, for NaNs of every
sign and payload at several lengths and positions, and checks the rounding of finite, infinite,
subnormal and halfway values too; where torch's answers are not that (one NaN pattern, round to
nearest even elsewhere) this path is not used and ``kernels`` converts as before.
"""
from __future__ import annotations

import numpy as np
import torch

from .kernels import WORDS, _row_sum, _u32_as_f32, njit

__all__ = ["gemv_bf16", "nan_pattern", "round_reference", "takes_bias"]

if njit is None:  # pragma: no cover - numba is a dependency
    raise ImportError("numba is not installed")

from llvmlite import ir  # noqa: E402
from numba import carray, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402


@intrinsic
def _u32_at(typingctx, addr):
    """An integer address as a uint32 pointer."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(32).as_pointer())

    return types.CPointer(types.uint32)(addr), codegen


@intrinsic
def _u16_at(typingctx, addr):
    """An integer address as a uint16 pointer."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(16).as_pointer())

    return types.CPointer(types.uint16)(addr), codegen


@intrinsic
def _f32_bits(typingctx, v):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(parallel=True, nogil=True, cache=True)  # no fastmath: the order and operations of kernels._gemv_kernel
def _gemv_bf16_rows(w, xw, out, bias, nan16):
    # w uint32 [N, K/2] (bf16 pairs), xw uint32 [K/2], out uint16 [N] (bf16 bits), bias uint16 [N] or [0]
    # (none); nan16: the bf16 bits torch gives a NaN here
    sh = np.uint32(16)
    nb = w.shape[1] // WORDS
    has_bias = bias.shape[0] != 0
    for i in prange(w.shape[0]):
        s = _row_sum(w, i, xw, nb)
        if has_bias:
            s += _u32_as_f32(np.uint32(np.uint32(bias[i]) << sh))
        if s != s:
            out[i] = np.uint16(nan16)
        else:
            b = _f32_bits(s)
            out[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> sh) & np.uint32(1))) >> sh)


@njit(nogil=True, cache=True)
def _gemv_bf16_kernel(wa, n, kh, xa, oa, ba, nan16):
    # the arrays of _gemv_bf16_rows from addresses (ba 0: no bias). Not itself parallel: arrays made by
    # carray inside a parallel function were misread by its parallel loop (numba 0.68), so the loop is a
    # separate function taking them as arguments.
    _gemv_bf16_rows(carray(_u32_at(wa), (n, kh)), carray(_u32_at(xa), (kh,)), carray(_u16_at(oa), (n,)),
                    carray(_u16_at(ba), (n if ba != 0 else 0,)), nan16)


def round_reference(f: np.ndarray, nan16: int) -> np.ndarray:
    """float32 -> bf16 bits (uint16) as the kernel rounds: nearest even, NaN -> ``nan16``."""
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[np.isnan(f)] = nan16
    return r


def _probe_values() -> np.ndarray:
    """float32 values whose bf16 rounding tells the rules apart: NaNs of both signs and several payloads,
    infinities, the largest finite values (which round to infinity), subnormals, halfway cases."""
    bits = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC12345,
            0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x00000001, 0x80000001, 0x00008000,
            0x00018000, 0x007FFFFF, 0x3F808000, 0x3F818000, 0x3F808001, 0xBF808000, 0x00000000, 0x80000000]
    return np.array(bits, dtype=np.uint64).astype(np.uint32).view(np.float32)


def nan_pattern() -> int | None:
    """The bf16 bits torch's float32 -> bf16 conversion gives every NaN on this host, provided it rounds
    every other probed value to nearest even; None where it does something else (then the kernel's
    own rounding would not reproduce torch's, and is not used)."""
    vals = _probe_values()
    rng = np.random.default_rng(0)
    seen: set[int] = set()
    for n in (1, 3, 8, 15, 16, 17, 31, 33, 64, 100, 1000, 70001):
        f = rng.standard_normal(n).astype(np.float32)
        at = rng.integers(0, n, size=len(vals))
        f[at] = vals[: len(at)]  # later probes overwrite earlier ones at the same place: all lengths differ
        if n > 1000:  # longer than torch's grain for one thread: every chunk's end holds a probe
            f[::7] = vals[np.arange(0, n, 7) % len(vals)]
        got = torch.from_numpy(f).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        nan = np.isnan(f)
        seen.update(int(v) for v in got[nan])
        if not np.array_equal(got[~nan], round_reference(f, 0)[~nan]):
            return None
        if len(seen) > 1:
            return None
    return seen.pop() if len(seen) == 1 else None


def takes_bias(b: torch.Tensor | None, n: int) -> bool:
    """Whether ``gemv_bf16`` adds this bias itself (else the caller converts as before)."""
    return b is None or (b.dtype is torch.bfloat16 and b.dim() == 1 and b.numel() == n and b.is_contiguous()
                         and b.is_cpu)


def gemv_bf16(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, nan16: int) -> torch.Tensor:
    """x [..., K] bf16 (one row, on the CPU) by w [N, K] bf16 (on the CPU, contiguous, even storage offset; the
    caller checks the shapes agree: the kernel reads K values at x's address) + b (None or bf16 [N],
    contiguous: ``takes_bias``) -> bf16 [..., N]: what ``kernels._gemv_linear`` computed with its float32
    numpy output and torch's conversion."""
    n, k = w.shape
    if not x.is_contiguous() or x.storage_offset() % 2:  # 4-byte words need an even start (as bf16_words)
        x = x.clone(memory_format=torch.contiguous_format)
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    _gemv_bf16_kernel(w.data_ptr(), n, k // 2, x.data_ptr(), y.data_ptr(), 0 if b is None else b.data_ptr(),
                      nan16)
    return y
