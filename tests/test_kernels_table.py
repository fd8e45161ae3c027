"""Several one-row products in one call (``kernels_table.gemv_table``) give each product's
``kernels_addr.gemv_bf16`` bits, whatever their inputs, widths, biases, the chunking and the threads."""
from __future__ import annotations

import pytest
import torch

from zipmoe_run import kernels

pytestmark = pytest.mark.skipif(not kernels.enabled() or kernels._NAN16 is None,
                                reason="numba kernel by address unavailable")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _prods(g: torch.Generator, shapes, bias: bool, specials: bool = False):
    out = []
    for n, k in shapes:
        w = (torch.randn(n, k, generator=g) * torch.logspace(-3, 3, k)).bfloat16()
        if specials:
            flat = w.view(-1)
            at = torch.randint(0, flat.numel(), (8,), generator=g)
            flat[at] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-40, 0.0, -0.0]
                                    ).bfloat16()
        x = (torch.randn(1, k, generator=g) * 10).bfloat16()
        b = (torch.randn(n, generator=g) * 100).bfloat16() if bias else None
        out.append((x, w, b))
    return out


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("grain", [4, 256, 64 << 10])
@pytest.mark.parametrize("bias", [False, True])
def test_each_product_has_the_bits_of_its_own_call(threads, grain, bias):
    from zipmoe_run.kernels_addr import gemv_bf16
    from zipmoe_run.kernels_table import gemv_table

    g = torch.Generator().manual_seed(threads * 31 + grain + bias)
    shapes = [(33, 1408), (7, 64), (1, 2), (130, 34), (60, 2048), (9, 66), (200, 30)]
    prods = _prods(g, shapes, bias, specials=True)
    kernels.set_threads(threads)
    got = gemv_table(prods, kernels._NAN16, grain=grain)
    assert len(got) == len(prods)
    for (x, w, b), y in zip(prods, got):
        want = gemv_bf16(x, w, b, kernels._NAN16)
        assert y.dtype is torch.bfloat16 and y.shape == want.shape == (1, w.shape[0])
        assert torch.equal(_bits(y), _bits(want))
    assert any(torch.isnan(y).any() for y in got)  # the special values reached the sums


def test_inputs_of_odd_offset_and_strided_layout_are_read_as_values():
    from zipmoe_run.kernels_addr import gemv_bf16
    from zipmoe_run.kernels_table import gemv_table

    g = torch.Generator().manual_seed(3)
    k = 66
    base = torch.randn(3, 2 * k + 1, generator=g).bfloat16()
    xs = [base[0, 1:k + 1].view(1, k), base[1, ::2][:k].view(1, k), base[2:3, :k]]  # odd offset, strided, plain
    ws = [torch.randn(n, k, generator=g).bfloat16() for n in (5, 17, 3)]
    got = gemv_table([(x, w, None) for x, w in zip(xs, ws)], kernels._NAN16)
    for x, w, y in zip(xs, ws, got):
        assert torch.equal(_bits(y), _bits(gemv_bf16(x.contiguous(), w, None, kernels._NAN16)))


def test_an_empty_table_is_no_call():
    from zipmoe_run.kernels_table import gemv_table

    assert gemv_table([], kernels._NAN16) == []
