"""One token's routed-expert sum (``moe_one``, the decode step's path of ``layers.moe_forward``) gives
the bits of the general grouping path, and calls the source and the hook as it does."""
from __future__ import annotations

import pytest
import torch

from zipmoe_run import layers
from zipmoe_run.errors import MissingWeightError


class Source:
    """Experts of one layer as {proj: tensor}; yields them in a given order; records what was asked."""

    def __init__(self, experts: dict[int, dict[str, torch.Tensor]], reverse: bool = False, drop: int | None = None):
        self.experts, self.reverse, self.drop, self.asked = experts, reverse, drop, []

    def fetch(self, layer, wanted, stack=None):
        self.asked.append((layer, list(wanted), stack))
        for e in (reversed(wanted) if self.reverse else wanted):
            if e != self.drop:
                yield e, self.experts[e]


def _experts(g, n_exp: int, h: int, inter: int, dtype) -> dict[int, dict[str, torch.Tensor]]:
    return {e: {"gate_proj": (torch.randn(inter, h, generator=g) * 0.2).to(dtype),
                "up_proj": (torch.randn(inter, h, generator=g) * 0.2).to(dtype),
                "down_proj": (torch.randn(h, inter, generator=g) * 0.2).to(dtype)} for e in range(n_exp)}


def _general(monkeypatch, *args):
    """moe_forward by the grouping path (as before moe_one)."""
    with monkeypatch.context() as m:
        m.setattr(layers, "moe_one", lambda *a: None)
        return layers.moe_forward(*args)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype is torch.bfloat16 else t.view(torch.int32)


@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                          (torch.float32, torch.float32)])
@pytest.mark.parametrize("layout", ["fresh", "offset view", "strided"])
@pytest.mark.parametrize("reverse", [False, True])
def test_one_token_gives_the_bits_of_the_grouping_path(monkeypatch, dtype, wdtype, layout, reverse):
    g = torch.Generator().manual_seed(7)
    h, inter = 64, 48
    experts = _experts(g, 8, h, inter, dtype)
    big = torch.randn(3, 2 * h + 1, generator=g).to(dtype)
    x = {"fresh": big[1, :h].clone()[None], "offset view": big[1:2, 1:h + 1], "strided": big[1:2, : 2 * h : 2]}[layout]
    ids = torch.tensor([[6, 1, 4, 3]])
    w = torch.softmax(torch.randn(1, 4, generator=g), -1).to(wdtype)
    src, ref_src = Source(experts, reverse), Source(experts, reverse)
    opened, ref_opened = [], []
    x0 = x.clone()
    out = layers.moe_forward(x, ids, w, src, 3, "s", layers.swiglu_expert, lambda: opened.append(1))
    ref = _general(monkeypatch, x, ids, w, ref_src, 3, "s", layers.swiglu_expert, lambda: ref_opened.append(1))
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape == (1, h)
    assert torch.equal(_bits(out), _bits(ref))
    assert src.asked == ref_src.asked == [(3, [1, 3, 4, 6], "s")]
    assert opened == ref_opened == [1]
    assert torch.equal(_bits(x), _bits(x0))  # the input is not written


def test_duplicate_ids_and_many_tokens_take_the_grouping_path(monkeypatch):
    g = torch.Generator().manual_seed(8)
    experts = _experts(g, 4, 32, 16, torch.bfloat16)
    x = torch.randn(1, 32, generator=g).bfloat16()
    ids, w = torch.tensor([[2, 2]]), torch.tensor([[0.5, 0.25]]).bfloat16()
    calls = []
    real = layers.moe_one
    monkeypatch.setattr(layers, "moe_one", lambda *a: calls.append(1) or real(*a))
    out = layers.moe_forward(x, ids, w, Source(experts), 0)
    assert calls == [1]
    assert torch.equal(_bits(out), _bits(_general(monkeypatch, x, ids, w, Source(experts), 0)))
    x2 = torch.randn(2, 32, generator=g).bfloat16()
    layers.moe_forward(x2, torch.tensor([[0, 1], [1, 3]]), torch.ones(2, 2).bfloat16(), Source(experts), 0)
    assert calls == [1]  # two tokens: moe_one is not asked


def test_a_missing_expert_is_named():
    g = torch.Generator().manual_seed(9)
    experts = _experts(g, 4, 32, 16, torch.bfloat16)
    with pytest.raises(MissingWeightError, match=r"layer 5: .* experts \[2\]"):
        layers.moe_forward(torch.randn(1, 32).bfloat16(), torch.tensor([[0, 2]]), torch.ones(1, 2).bfloat16(),
                           Source(experts, drop=2), 5)


def _torch_sum(x, ys, w, tok, bounds):
    """What moe_forward computed before decode_ops.weighted_sum: (y * w).to(bf16) index_add_-ed into zeros."""
    out = torch.zeros_like(x)
    for e, y in enumerate(ys):
        lo, hi = bounds[e], bounds[e + 1]
        out.index_add_(0, torch.as_tensor(tok[lo:hi]), (y * w[lo:hi, None]).to(x.dtype))
    return out


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,e", [(1, 1), (1, 4), (1, 8), (5, 3), (9, 6)])
def test_weighted_sum_matches_the_torch_operations_bit_for_bit(wdtype, n, e):
    from zipmoe_run import decode_ops

    g = torch.Generator().manual_seed(10 + n * 10 + e)
    h = 97  # odd: no vector-width assumption
    x = torch.randn(n, h, generator=g).bfloat16()
    # values that round differently, -0 and +0, bf16 subnormals, values near the bf16 maximum (overflow to
    # inf after a rounding), infinities that stay infinite
    specials = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 3.3e38, -3.38e38, float("inf"), 1.0 + 2**-8, 3 * 2**-9],
                            dtype=torch.float32)
    ys, tok, bounds = [], [], [0]
    for i in range(e):
        rows = torch.randperm(n, generator=g)[: 1 + i % n]  # distinct tokens of this expert
        y = (torch.randn(len(rows), h, generator=g) * 10 ** (i % 3 - 1)).bfloat16()
        y[:, :len(specials)] = specials.roll(i).bfloat16()
        ys.append(y)
        tok += rows.tolist()
        bounds.append(len(tok))
    w = (torch.rand(len(tok), generator=g) * 3).to(wdtype)
    w[0] = 1.0
    assert decode_ops.takes_sum(x, ys, w)
    got = decode_ops.weighted_sum(x, ys, w, tok, bounds)
    ref = _torch_sum(x, ys, w, tok, bounds)
    nan = torch.isnan(ref)  # inf - inf: which NaN bits torch writes is its build's choice; the kernel's is 0x7FC0
    assert got.shape == ref.shape and torch.equal(torch.isnan(got), nan)
    assert torch.equal(got.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])
    assert (~nan).sum() > 0.9 * nan.numel()  # mostly finite: the comparison covers the rounding


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_many_tokens_give_the_bits_of_the_torch_sum(monkeypatch, wdtype):
    """moe_forward of a prompt's tokens (one numba sum) against the same path with the torch sum."""
    g = torch.Generator().manual_seed(12)
    experts = _experts(g, 8, 64, 48, torch.bfloat16)
    x = torch.randn(7, 64, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(7)])  # [7, 3], distinct per token
    w = torch.softmax(torch.randn(7, 3, generator=g), -1).to(wdtype)
    out = layers.moe_forward(x, ids, w, Source(experts, reverse=True), 2)
    with monkeypatch.context() as m:
        from zipmoe_run import decode_ops

        m.setattr(decode_ops, "takes_sum", lambda *a: False)
        ref = layers.moe_forward(x, ids, w, Source(experts), 2)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_weighted_sum_is_not_taken_for_other_layouts():
    from zipmoe_run import decode_ops

    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    y = torch.ones(1, 8, dtype=torch.bfloat16)
    w = torch.ones(2, dtype=torch.bfloat16)
    assert decode_ops.takes_sum(x, [y, y], w)
    assert not decode_ops.takes_sum(x.float(), [y, y], w)  # float32 runs keep torch's operations
    assert not decode_ops.takes_sum(x, [y, y.float()], w)
    assert not decode_ops.takes_sum(x, [y, torch.ones(1, 16, dtype=torch.bfloat16)[:, ::2]], w)  # strided
    assert not decode_ops.takes_sum(x, [y], w)  # one weight per output row
    assert not decode_ops.takes_sum(x, [y, y], w.half())
