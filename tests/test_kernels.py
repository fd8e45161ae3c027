"""The bf16 GEMV kernel: one fixed IEEE summation order (bit for bit), NaN/Inf as torch, no fast-math."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.kernelforce import forced_kernel
from zipmoe_run import kernels

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba kernel unavailable")


@pytest.fixture(autouse=True)
def _numba_forced(monkeypatch):
    """These tests are about the numba GEMV: force it (auto would pick per host by measurement)."""
    with forced_kernel(monkeypatch, "numba"):
        yield


def _words(w: torch.Tensor) -> np.ndarray:
    n, k = w.shape
    return w.contiguous().view(torch.int32).numpy().view(np.uint32).reshape(n, k // 2)


@pytest.mark.parametrize("n,k", [(1, 2), (5, 30), (7, 64), (9, 66), (33, 1408), (17, 2048)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_equal_to_the_fixed_order_reference(n, k, threads):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = (torch.randn(n, k, generator=g) * torch.logspace(-3, 3, k)).bfloat16()  # magnitudes that round
    x = torch.randn(1, k, generator=g).bfloat16()
    kernels.set_threads(threads)
    y = kernels.linear(x, w)  # [1, N] bf16
    ref = kernels.gemv_reference(_words(w), x.reshape(k).float().numpy())  # [N] float32
    assert torch.equal(y.view(-1).view(torch.int16), torch.from_numpy(ref).bfloat16().view(torch.int16))


@pytest.mark.parametrize("layout", ["odd offset", "strided", "batched view"])
def test_an_input_that_is_not_a_plain_row_gives_the_same_sums(layout):
    """The kernel reads the input as bf16 pairs (``bf16_words``): a view at an odd bf16 offset (not a
    whole uint32) or with a stride is copied first, never misread."""
    k = 66
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(5, k, generator=g) * torch.logspace(-3, 3, k)).bfloat16()
    big = torch.randn(3, 2 * k + 2, generator=g).bfloat16()
    x = {"odd offset": big[1:2, 1:k + 1], "strided": big[1:2, : 2 * k : 2],
         "batched view": big[1:2, 1:k + 1].view(1, 1, k)}[layout]
    assert x.storage_offset() % 2 or not x.is_contiguous()
    y = kernels.linear(x, w)
    ref = kernels.gemv_reference(_words(w), x.reshape(k).float().numpy())
    assert y.shape == (*x.shape[:-1], 5)
    assert torch.equal(y.reshape(-1).view(torch.int16), torch.from_numpy(ref).bfloat16().view(torch.int16))
    words = kernels.bf16_words(x, k)  # [1, K/2] uint32: even element in the low half
    assert np.array_equal((words << np.uint32(16)).view(np.float32)[0], x.reshape(k)[0::2].float().numpy())
    assert np.array_equal((words & np.uint32(0xFFFF0000)).view(np.float32)[0], x.reshape(k)[1::2].float().numpy())


def _raw(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """The kernel's float32 row sums, before the cast to bf16."""
    n, k = w.shape
    out = np.empty(n, np.float32)
    kernels._gemv(_words(w), kernels.bf16_words(x, k)[0], out)  # x as bf16 pairs [K/2]
    return out


def test_float32_sums_bitwise_equal_to_reference():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 2048 + 6, generator=g).bfloat16()  # a tail after the last whole block
    x = torch.randn(1, 2048 + 6, generator=g).bfloat16()
    ref = kernels.gemv_reference(_words(w), x.reshape(-1).float().numpy())
    assert np.array_equal(_raw(x, w).view(np.uint32), ref.view(np.uint32))


def test_nan_and_inf_propagate_as_in_torch():
    k = 96
    g = torch.Generator().manual_seed(2)
    w = torch.randn(12, k, generator=g).bfloat16()
    x = torch.randn(1, k, generator=g).bfloat16()
    inf, nan = float("inf"), float("nan")
    w[0, 5] = inf  # +inf * x[5]
    w[1, 40] = -inf
    w[2, 3] = nan
    w[3, 7], w[3, 70] = inf, -inf  # inf - inf: NaN
    w[4, 33] = inf
    x[0, 33] = 0.0  # inf * 0: NaN
    w[5, 90] = inf
    w[5, 91] = inf  # same sign twice: inf
    x[0, 60] = inf  # every row with a nonzero w[:, 60] gets +-inf, unless already NaN
    w[6, 60] = 0.0  # 0 * inf: NaN
    w[7, 60] = -w[7, 60].abs() - 1  # -inf
    y = kernels.linear(x, w).float().view(-1)
    ref = F.linear(x.float(), w.float()).view(-1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), (y, ref)
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(y[torch.isinf(ref)], ref[torch.isinf(ref)])  # same signs
    assert torch.isnan(y).sum() >= 4 and torch.isinf(y).sum() >= 4  # the cases above are exercised


def test_compiled_without_fast_math():
    from numba import njit

    kernels.linear(torch.ones(1, 64).bfloat16(), torch.ones(3, 64).bfloat16())
    assert not kernels._gemv.targetoptions.get("fastmath")
    # a kernel loaded from numba's disk cache has no IR to inspect: compile the same function afresh
    opts = {k: v for k, v in kernels._gemv.targetoptions.items() if k != "cache"}
    fresh = njit(**opts)(kernels._gemv.py_func)
    fresh(np.zeros((1, 1), np.uint32), np.zeros(1, np.uint32), np.empty(1, np.float32))
    ir = "".join(fresh.inspect_llvm().values())
    assert "fadd" in ir and "fmul" in ir  # the body is in the inspected module
    for flag in (" fast ", " reassoc ", " nnan ", " ninf ", " contract ", " afn "):
        assert flag not in ir, f"fast-math flag{flag}in the kernel's IR"


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="needs mprotect from the C library")
@pytest.mark.parametrize("k", [64, 576, 2048])
def test_the_weights_prefetch_ahead_is_a_hint_at_the_end_of_a_mapping(k):
    """The GEMVs ask for the weights ``kernels.PREFETCH`` bytes ahead of the block they sum: past the last
    row that is past the end of the matrix. A weight matrix that ends where a PROT_NONE page begins (any
    load there would fault) gives the fixed order's sums, bit for bit, on 1 and 2 threads."""
    import ctypes
    import mmap

    n, page = 24, mmap.PAGESIZE
    nbytes = n * k * 2
    span = -(-nbytes // page) * page
    mm = mmap.mmap(-1, span + page)
    buf = np.frombuffer(mm, dtype=np.uint8)
    libc = ctypes.CDLL(None)
    guard = ctypes.c_void_p(buf.ctypes.data + span)
    g = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=g).bfloat16()
    buf[span - nbytes:span] = w.view(torch.uint8).numpy().reshape(-1)
    wm = torch.from_numpy(buf[span - nbytes:span]).view(torch.bfloat16).view(n, k)  # [N, K], ends at the guard
    x = torch.randn(1, k, generator=g).bfloat16()
    ref = torch.from_numpy(kernels.gemv_reference(_words(w), x.reshape(k).float().numpy())).bfloat16()
    assert libc.mprotect(guard, page, 0) == 0  # PROT_NONE
    try:
        for threads in (1, 2):
            kernels.set_threads(threads)
            y = kernels.linear(x, wm)  # [1, N]
            assert torch.equal(y.view(-1).view(torch.int16), ref.view(torch.int16))
    finally:
        libc.mprotect(guard, page, 3)  # PROT_READ | PROT_WRITE again before the mapping is freed
