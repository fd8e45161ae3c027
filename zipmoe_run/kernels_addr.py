"""The one-row bf16 GEMV of ``kernels`` called with raw addresses, writing its bf16 output itself.

A decode step makes about 40 one-row products; around the kernel's own microseconds each call paid
about 10 us of conversions: the weight and the input turned into numpy views, a float32 numpy output
wrapped as a tensor and converted to bf16 by torch. Here the kernel gets the tensors' addresses
(ints: numba types them in a fraction of the time it takes to type an array) and writes the bf16
result into a torch tensor allocated by the caller.

Exactly the old results, bit for bit: each row's float32 sum is the same code (``kernels._row_sum_pf``:
``_row_sum``'s blocks and sequential tail, in the same order, with the weights prefetched ahead), a bias is
added as the float32 ``y += b.float()`` did, and the rounding to bf16 is torch's: round to nearest even on the
float32 bits, which is what torch's float32 -> bf16 conversion does for every value that is not NaN. For NaN
torch gives one fixed pattern that depends on its build and CPU capability (0xFFFF from its AVX2/AVX-512
loops, 0x7FC0 from its scalar code): ``nan_pattern`` asks torch which it is on this host, for NaNs of every
sign and payload at several lengths and positions, and checks the rounding of finite, infinite, subnormal and
halfway values too; where torch's answers are not that (one NaN pattern, round to nearest even elsewhere) this
path is not used and ``kernels`` converts as before.
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels as _kernels
from .kernels import WORDS, _row_sum_pf, _u32_as_f32, njit

__all__ = ["gemv_bf16", "gemv_many", "linear_many", "nan_pattern", "round_reference", "takes_bias"]

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
        s = _row_sum_pf(w, i, xw, nb)
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


@njit(parallel=True, nogil=True, cache=True)  # no fastmath: each row as _gemv_bf16_rows computes it
def _gemv3_bf16_rows(w1, w2, w3, xw, o1, o2, o3, b1, b2, b3, nan16):
    # up to three products of one input xw uint32 [K/2] in one parallel loop over all their rows: wj uint32
    # [Nj, K/2], oj uint16 [Nj], bj uint16 [Nj] or [0] (no bias); an unused product has Nj = 0
    sh = np.uint32(16)
    nb = xw.shape[0] // WORDS
    n1, n2 = w1.shape[0], w2.shape[0]
    for r in prange(n1 + n2 + w3.shape[0]):
        if r < n1:
            s = _row_sum_pf(w1, r, xw, nb)
            if b1.shape[0] != 0:
                s += _u32_as_f32(np.uint32(np.uint32(b1[r]) << sh))
            o1[r] = _round16(s, nan16)
        elif r < n1 + n2:
            i = r - n1
            s = _row_sum_pf(w2, i, xw, nb)
            if b2.shape[0] != 0:
                s += _u32_as_f32(np.uint32(np.uint32(b2[i]) << sh))
            o2[i] = _round16(s, nan16)
        else:
            i = r - n1 - n2
            s = _row_sum_pf(w3, i, xw, nb)
            if b3.shape[0] != 0:
                s += _u32_as_f32(np.uint32(np.uint32(b3[i]) << sh))
            o3[i] = _round16(s, nan16)


@njit(nogil=True, cache=True, inline="always")
def _round16(s, nan16):
    """float32 -> bf16 bits as ``_gemv_bf16_rows`` rounds (nearest even; NaN -> nan16)."""
    if s != s:
        return np.uint16(nan16)
    b = _f32_bits(s)
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(nogil=True, cache=True)
def _gemv3_bf16_kernel(kh, xa, w1, n1, b1, o1, w2, n2, b2, o2, w3, n3, b3, o3, nan16):
    # the arrays of _gemv3_bf16_rows from addresses (bias address 0: none; a product with n 0: unused)
    _gemv3_bf16_rows(carray(_u32_at(w1), (n1, kh)), carray(_u32_at(w2), (n2, kh)), carray(_u32_at(w3), (n3, kh)),
                     carray(_u32_at(xa), (kh,)), carray(_u16_at(o1), (n1,)), carray(_u16_at(o2), (n2,)),
                     carray(_u16_at(o3), (n3,)), carray(_u16_at(b1), (n1 if b1 != 0 else 0,)),
                     carray(_u16_at(b2), (n2 if b2 != 0 else 0,)), carray(_u16_at(b3), (n3 if b3 != 0 else 0,)),
                     nan16)


def gemv_many(x: torch.Tensor, prods: list[tuple[torch.Tensor, torch.Tensor | None]], nan16: int) -> list[torch.Tensor]:
    """Two or three ``gemv_bf16`` products of the same one-row x [..., K] in one kernel call (one parallel
    loop over all their output rows): [(w [N_j, K], b or None), ...] -> [bf16 [..., N_j], ...], each the bits
    ``gemv_bf16(x, w, b, nan16)`` gives. The caller checks what ``gemv_bf16`` needs of each product."""
    k = x.shape[-1]
    if not x.is_contiguous() or x.storage_offset() % 2:  # 4-byte words need an even start
        x = x.clone(memory_format=torch.contiguous_format)
    args, outs = [], []
    for w, b in prods:
        y = torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.bfloat16)
        outs.append(y)
        args += [w.data_ptr(), w.shape[0], 0 if b is None else b.data_ptr(), y.data_ptr()]
    while len(args) < 12:
        args += [x.data_ptr(), 0, 0, x.data_ptr()]  # unused: no rows
    _gemv3_bf16_kernel(k // 2, x.data_ptr(), *args, nan16)
    return outs


def linear_many(x: torch.Tensor, prods: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    """``[kernels.linear(x, w, b) for w, b in prods]`` (two or three products of one input, e.g. gate and
    up, or q, k and v): one kernel call (``gemv_many``, the same bits) where x is one bf16 row outside a
    batched step and every product is one the numba GEMV takes on this host; else one ``linear`` each."""
    k = _kernels
    if (k._NAN16 is not None and not k._decode_rows and x.dtype is torch.bfloat16 and x.numel() == x.shape[-1]
            and x.is_cpu and all(w.shape[-1] == x.shape[-1] and w.is_cpu and takes_bias(b, w.shape[0])
                                 and k._one_row_kernel(x, w) == "numba" for w, b in prods)):
        return gemv_many(x, prods, k._NAN16)
    return [k.linear(x, w, b) for w, b in prods]
