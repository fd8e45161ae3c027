"""The multi-row bf16 kernel: every row of a batch equals the one-row GEMV bit for bit (any M, any threads),
and ``decode_rows_scope`` makes every ``linear`` row-invariant."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.kernelforce import forced_kernel
from zipmoe_run import kernels

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba kernel unavailable")


@pytest.fixture(autouse=True)
def _numba_forced(monkeypatch):
    with forced_kernel(monkeypatch, "numba"):
        yield


def _words(w: torch.Tensor) -> np.ndarray:
    n, k = w.shape
    return w.contiguous().view(torch.int32).numpy().view(np.uint32).reshape(n, k // 2)


def _one_row_raw(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """The one-row kernel's float32 sums [N] for x [K]."""
    n, k = w.shape
    out = np.empty(n, np.float32)
    kernels._gemv(_words(w), kernels.bf16_words(x, k)[0], out)  # x as bf16 pairs [K/2]
    return out


@pytest.mark.parametrize("n,k", [(1, 2), (5, 30), (9, 66), (33, 1408), (17, 2048 + 6), (3, 34)])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_row_equals_the_reference_and_the_one_row_kernel(n, k, threads):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = (torch.randn(n, k, generator=g) * torch.logspace(-3, 3, k)).bfloat16()  # magnitudes that round
    kernels.set_threads(threads)
    for m in range(1, 10):
        x = torch.randn(m, k, generator=g).bfloat16()
        got = kernels.gemm_rows(x, w)  # [M, N] float32
        for r in range(m):
            ref = kernels.gemv_reference(_words(w), x[r].float().numpy())
            assert np.array_equal(got[r].view(np.uint32), ref.view(np.uint32)), (m, r)
            assert np.array_equal(got[r].view(np.uint32), _one_row_raw(x[r], w).view(np.uint32)), (m, r)


def test_nan_inf_rows_stay_in_their_row():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=g).bfloat16()
    x = torch.randn(4, 64, generator=g).bfloat16()
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    got = kernels.gemm_rows(x, w)
    for r in range(4):
        assert np.array_equal(got[r].view(np.uint32), _one_row_raw(x[r], w).view(np.uint32))
    assert np.isfinite(got[[0, 3]]).all() and np.isnan(got[2]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_in_decode_scope_is_row_invariant(dtype):
    """Inside decode_rows_scope a batch of M rows gives, per row, exactly the product of that row alone
    (bias included; float32 and odd K go one row at a time through torch)."""
    g = torch.Generator().manual_seed(5)
    for n, k in [(48, 256), (7, 33)]:
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        x = torch.randn(6, 1, k, generator=g).to(dtype)  # [B, T=1, K]: a decode step of 6 sequences
        with kernels.decode_rows_scope(bf16=dtype is torch.bfloat16):
            batch = kernels.linear(x, w, b)
            alone = [kernels.linear(x[i:i + 1], w, b) for i in range(6)]
        assert batch.shape == (6, 1, n)
        for i in range(6):
            assert torch.equal(batch[i:i + 1].view(torch.int16 if dtype is torch.bfloat16 else torch.int32),
                               alone[i].view(torch.int16 if dtype is torch.bfloat16 else torch.int32))
    if dtype is torch.bfloat16:  # and a bf16 row equals the one-row GEMV outside the scope (numba forced)
        w = torch.randn(40, 512, generator=g).bfloat16()
        x = torch.randn(5, 512, generator=g).bfloat16()
        with kernels.decode_rows_scope():
            batch = kernels.linear(x, w)
        for i in range(5):
            assert torch.equal(batch[i].view(torch.int16), kernels.linear(x[i:i + 1], w).view(-1).view(torch.int16))


def test_scope_restores_threads_and_flag():
    n = torch.get_num_threads()
    with kernels.decode_rows_scope():
        assert kernels._decode_rows
    assert not kernels._decode_rows and torch.get_num_threads() == n


def test_rows_follow_the_kernel_chosen_for_the_shape(monkeypatch):
    """Torch chosen for a shape: inside the scope each row is that one-row torch product, bit for bit."""
    from zipmoe_run import kernel_select

    monkeypatch.setenv(kernel_select.ENV, "torch")
    kernel_select.reset()
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(512, 1024, generator=g) * torch.logspace(-3, 3, 1024)).bfloat16()  # magnitudes that round
    x = torch.randn(5, 1, 1024, generator=g).bfloat16()
    with kernels.single_row_scope(True):
        alone = [kernels.linear(x[i:i + 1], w) for i in range(5)]  # the one-row path: torch
    with kernels.decode_rows_scope():
        batch = kernels.linear(x, w)
    assert kernels.CHOICE[(512, 1024, torch.get_num_threads())] == "torch"
    numba_rows = torch.from_numpy(kernels.gemm_rows(x.view(5, 1024), w)).bfloat16()
    assert not torch.equal(numba_rows.view(torch.int16), torch.cat(alone).view(5, 512).view(torch.int16))
    for i in range(5):  # the numba sums would differ somewhere; the rows follow torch's one-row product
        assert torch.equal(batch[i:i + 1].view(torch.int16), alone[i].view(torch.int16))


def test_nested_single_row_scope_keeps_the_outer_threads():
    """A batched step (decode_rows_scope) runs moe_forward, which opens its own single_row_scope: the
    inner scope must keep the outer arrangement (numba's team at torch's count), not read torch's count
    of 1 inside the outer scope and shrink the kernel to one thread."""
    import numba

    if not kernels.enabled() or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs the numba kernel and at least 2 numba threads")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernels.decode_rows_scope():
            with kernels.single_row_scope(True):
                assert kernels._scope_threads == 2
                assert numba.get_num_threads() == 2
                assert torch.get_num_threads() == 1
            assert kernels._scope_threads == 2 and numba.get_num_threads() == 2
        assert kernels._scope_threads == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
