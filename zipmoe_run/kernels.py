"""A faster bfloat16 matrix-vector product for one-token decode steps.

A decode step is a chain of matrix-vector products over bf16 weights (routed and shared experts,
attention projections, lm_head), so its speed is how fast weights stream through the cores. Torch's
CPU bf16 kernel for a single input row reaches roughly a third of memory bandwidth; this numba loop
(bf16 -> f32 by a shift, float32 accumulation, output rows split over threads) roughly doubles that.

Numerics: products are exact in float32 and each output row is summed by one thread in a fixed
order, so results are bitwise reproducible for any thread count; they can differ from torch's
bf16 kernel in the last bit. Only bf16 weights with a bf16 single-row input take this path; every
other case (float32 runs, prefill, batched decode) is ``torch.nn.functional.linear``.

Set ``ZIPMOE_RUN_KERNELS=0`` to disable (then everything is torch).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["linear", "enabled", "set_threads", "single_row_scope"]

log = logging.getLogger(__name__)

_ENABLED = os.environ.get("ZIPMOE_RUN_KERNELS", "1") not in ("0", "false", "no")
_gemv = None


try:  # module level, so numba's on-disk cache can find the kernel again (closures recompile every run)
    from llvmlite import ir
    from numba import njit, prange, types
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

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def _gemv_kernel(w, x, out):  # w uint32 [N, K/2]: bf16 pairs (little endian); x f32 [K]; out f32 [N]
        n, kh = w.shape
        hi = np.uint32(0xFFFF0000)
        sh = np.uint32(16)
        for i in prange(n):
            acc0 = np.float32(0.0)
            acc1 = np.float32(0.0)
            for j in range(kh):
                u = w[i, j]
                acc0 += _u32_as_f32(np.uint32(u << sh)) * x[2 * j]
                acc1 += _u32_as_f32(np.uint32(u & hi)) * x[2 * j + 1]
            out[i] = acc0 + acc1


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
            _gemv(np.zeros((1, 1), np.uint32), np.zeros(2, np.float32), np.empty(1, np.float32))
        except Exception as exc:  # numba missing or broken: torch only
            log.warning("bf16 decode kernel unavailable (%s); using torch", exc)
            _ENABLED = False
        finally:
            torch.set_num_threads(n)
    return _ENABLED


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
    if not active or not enabled():
        yield
        return
    n = torch.get_num_threads()
    set_threads(n)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (x [..., K], w [N, K], b [N]); one bf16 input row goes through the fast kernel."""
    k = x.shape[-1]
    if (x.dtype is not torch.bfloat16 or w.dtype is not torch.bfloat16 or x.numel() != k or k % 2
            or not w.is_contiguous() or w.storage_offset() % 2 or not enabled()):
        return F.linear(x, w, b)
    n = w.shape[0]
    xf = x.reshape(k).float().numpy()
    out = np.empty(n, dtype=np.float32)
    _gemv(w.view(torch.int32).numpy().view(np.uint32).reshape(n, k // 2), xf, out)
    y = torch.from_numpy(out)
    if b is not None:
        y += b.float()
    return y.to(torch.bfloat16).view(*x.shape[:-1], n)
