"""The dp kernel as the one-row (decode) product (``kernels_dp1``): by address, bf16 written by the kernel,
bit for bit ``gemm_dp`` + the bias in float32 + torch's rounding, for any M, thread count and loop
parameters; ``kernels.linear``, ``linear_many`` and batched decode steps follow a "dp" choice, every row of a
batch equal to that row alone. Skipped where the CPU (or numba's target) lacks AVX-512 BF16."""
from __future__ import annotations

import pytest
import torch

from tests.kernelforce import forced_kernel
from zipmoe_run import kernel_select as ks
from zipmoe_run import kernels
from zipmoe_run import kernels_dp as D

here = pytest.mark.skipif(not (kernels.enabled() and D.available()),
                          reason="no AVX-512 BF16 here (or numba's target lacks it): the kernel is never used")
pytestmark = here


@pytest.fixture(autouse=True)
def _dp_forced(monkeypatch):
    with forced_kernel(monkeypatch, "dp"):
        yield


def _i16(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _expected(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """gemm_dp's float32 sums, the bias added in float32, rounded by torch: [..., N] bf16."""
    y = torch.from_numpy(D.gemm_dp(x.reshape(-1, x.shape[-1]), w))
    if b is not None:
        y += b.float()
    return y.bfloat16().view(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("n,k", [(1, 2), (5, 30), (9, 66), (7, 1408), (17, 2048 + 6), (33, 512)])
@pytest.mark.parametrize("threads", [1, 2])
def test_by_address_equals_gemm_dp_and_torch_rounding(n, k, threads):
    from zipmoe_run.kernels_dp1 import dp_bf16

    if kernels._NAN16 is None:
        pytest.skip("torch's bf16 rounding here is not the kernel's: the by-address path is not used")
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = (torch.randn(n, k, generator=g) * torch.logspace(-3, 3, k)).bfloat16()  # magnitudes that round
    b = torch.randn(n, generator=g).bfloat16()
    kernels.set_threads(threads)
    for m in (1, 2, 3, 5):
        x = torch.randn(m, k, generator=g).bfloat16()
        if m == 3:
            x[1, 0], x[2, k - 1] = float("inf"), float("nan")
        for bias in (None, b):
            want = _expected(x, w, bias)
            got = dp_bf16(x, w, bias, kernels._NAN16)
            assert torch.equal(_i16(got), _i16(want)), (m, bias is None)
            for kc, panel, pf in ((1, 1, 0), (3, 2, 7), (64, 32, 512)):  # loops never change a bit
                assert torch.equal(_i16(dp_bf16(x, w, bias, kernels._NAN16, kc, panel, pf)), _i16(want))
            for r in range(m):  # a row alone: the same bits
                assert torch.equal(_i16(dp_bf16(x[r:r + 1], w, bias, kernels._NAN16)), _i16(want[r:r + 1]))


def test_linear_follows_a_dp_choice_for_one_row_and_batched_rows(monkeypatch):
    from zipmoe_run import kernels_dp1

    calls = []
    real = kernels_dp1.linear_dp
    monkeypatch.setattr(kernels_dp1, "linear_dp", lambda x, w, b=None: calls.append(x.numel()) or real(x, w, b))
    g = torch.Generator().manual_seed(4)
    n, k = 48, 256
    w = (torch.randn(n, k, generator=g) * torch.logspace(-3, 3, k)).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(6, 1, k, generator=g).bfloat16()  # [B, T=1, K]: a decode step of 6 sequences
    with kernels.single_row_scope(True):
        alone = [kernels.linear(x[i:i + 1], w, b) for i in range(6)]
        assert kernels._one_row_kernel(x[:1], w) == "dp"
    with kernels.decode_rows_scope():
        batch = kernels.linear(x, w, b)
    assert batch.shape == (6, 1, n)
    assert calls == [k] * 6 + [6 * k]  # each row alone, then one dp call over the batch's rows
    want = _expected(x, w, b)
    for i in range(6):
        assert torch.equal(_i16(alone[i]), _i16(want[i:i + 1]))
        assert torch.equal(_i16(batch[i:i + 1]), _i16(alone[i]))


def test_linear_many_follows_a_dp_choice():
    from zipmoe_run import kernels_addr

    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 1, 128, generator=g).bfloat16()
    prods = [(torch.randn(n, 128, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16() if n != 16 else None)
             for n in (64, 16, 32)]
    with kernels.single_row_scope(True):
        got = kernels_addr.linear_many(x, prods)
        for (w, b), y in zip(prods, got):
            assert torch.equal(_i16(y), _i16(_expected(x, w, b)))
            assert torch.equal(_i16(y), _i16(kernels.linear(x, w, b)))


def test_the_measurement_times_dp_here():
    clock = iter(range(10 ** 6))
    got = ks.measure([(16, 64)], 1, ks.available(), timer=lambda: next(clock) * 1e-3)
    assert set(got[(16, 64)]) == {"numba", "torch", "dp"}


def test_compiled_without_fast_math():
    from zipmoe_run import kernels_dp1

    for fn in (kernels_dp1._dp16_rows, kernels_dp1._dp16_kernel, kernels_dp1._block16, kernels_dp1._emit):
        assert not fn.targetoptions.get("fastmath"), fn
