"""``kernels_rows.prefill_linear``'s per-call path (run for every product of a prefill): the kernel is
looked up at every call, so a choice changed at run time (``kernels.ROWS_UPTO``, ``kernel_select_rows.BEYOND``,
a replaced ``kernels_dp.gemm_dp``) takes effect at once, inside a ``single_row_scope`` as outside it, and the
result is the chosen kernel's float32 rows rounded to bf16 by torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zipmoe_run import kernel_select as ks
from zipmoe_run import kernel_select_rows as R
from zipmoe_run import kernels, kernels_dp, kernels_rows

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba kernel unavailable")

N, K = 24, 96


@pytest.fixture
def choice(monkeypatch):
    """An injected choice for the (N, K) product at the current thread count; restored afterwards."""
    for var in (ks.ENV, R.ROWS_ENV, R.PREFILL_ENV, "ZIPMOE_RUN_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    ks.reset()
    t = torch.get_num_threads()
    key = (N, K, t)
    yield key
    ks.reset()
    kernels.set_threads(t)


def _data(m, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.1).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    x = torch.randn(m, K, generator=g).bfloat16()
    return x, w, b


def _marker(value):
    """A stand-in kernel: float32 [M, N] filled with ``value``, recording its calls."""
    calls = []

    def fn(x, w, *a, **kw):
        calls.append(x.shape[0])
        return np.full((x.shape[0], w.shape[0]), value, np.float32)

    return fn, calls


@pytest.mark.parametrize("scoped", [False, True])
def test_choice_changed_between_calls_takes_effect(monkeypatch, choice, scoped):
    x, w, b = _data(5)
    dp, dp_calls = _marker(2.0)
    rows, rows_calls = _marker(3.0)
    monkeypatch.setattr(kernels_dp, "gemm_dp", dp)
    monkeypatch.setattr(kernels_rows, "gemm_rows", rows)
    monkeypatch.setitem(kernels.ROWS_UPTO, choice, 1)
    monkeypatch.setitem(R.BEYOND, choice, ((2, "dp"),))
    with kernels.single_row_scope(scoped):
        got = kernels_rows.prefill_linear(x, w, b)
        want = (torch.full((5, N), 2.0) + b.float()).bfloat16()  # dp's rows + bias, rounded by torch
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)) and dp_calls == [5]
        kernels.ROWS_UPTO[choice] = 8  # now the multi-row kernel takes 5 rows
        got = kernels_rows.prefill_linear(x, w, None)
        assert torch.equal(got, torch.full((5, N), 3.0).bfloat16()) and rows_calls == [5]
        kernels.ROWS_UPTO[choice] = 1
        R.BEYOND[choice] = ((2, "torch"),)  # now torch's product
        got = kernels_rows.prefill_linear(x, w, b)
        assert torch.equal(got, torch.nn.functional.linear(x, w, b)) and dp_calls == [5] and rows_calls == [5]


def test_rows_keep_their_shape_and_scope(choice, monkeypatch):
    """[B, T, K] in, [B, T, N] out; the thread arrangement after the call is the one before it."""
    x, w, b = _data(6)
    monkeypatch.setitem(kernels.ROWS_UPTO, choice, 8)
    before = torch.get_num_threads()
    got = kernels_rows.prefill_linear(x.view(2, 3, K), w, b)
    assert got.shape == (2, 3, N) and torch.get_num_threads() == before and kernels._scope_threads == 0
    ref = torch.from_numpy(kernels_rows.gemm_rows(x, w)) + b.float()
    assert torch.equal(got.view(-1, N).view(torch.int16), ref.bfloat16().view(torch.int16))
