"""A decode step's gated experts in two table calls (``moe_table``, taken by ``moe_one`` when the source
keeps fetched experts and the expert function is ``swiglu_expert``) give the bits of the general path."""
from __future__ import annotations

import pytest
import torch

from zipmoe_run import kernels, kernels_table, layers, moe_one
from zipmoe_run.errors import MissingWeightError

pytestmark = pytest.mark.skipif(not kernels.enabled() or kernels._NAN16 is None,
                                reason="numba kernel by address unavailable")

H, I = 64, 48


class Source:
    """One layer's experts; ``keeps`` says whether fetched tensors stay valid (no budget)."""

    def __init__(self, experts, keeps=True, drop=None, reverse=False):
        self.experts, self.keeps_fetched, self.drop, self.reverse, self.asked = experts, keeps, drop, reverse, []

    def fetch(self, layer, wanted, stack=None):
        self.asked.append((layer, list(wanted), stack))
        for e in (reversed(wanted) if self.reverse else wanted):
            if e != self.drop:
                yield e, self.experts[e]


class Block:
    """What a model's routed block gives ``moe_forward``: a bound ``_expert`` marked as swiglu_expert."""

    act = staticmethod(torch.nn.functional.silu)

    def _expert(self, x, w):
        return layers.swiglu_expert(x, w, self.act)

    _expert.swiglu = True


def _experts(g, n, names=("gate_proj", "up_proj", "down_proj"), dtype=torch.bfloat16):
    out = {}
    for e in range(n):
        gw, uw, dw = (torch.randn(I, H, generator=g) * 0.3, torch.randn(I, H, generator=g) * 0.3,
                      torch.randn(H, I, generator=g) * 0.3)
        out[e] = {names[0]: gw.to(dtype), names[1]: uw.to(dtype), names[2]: dw.to(dtype)}
    return out


def _choose(monkeypatch, gate_up: str, down: str):
    t = torch.get_num_threads()
    monkeypatch.setitem(kernels.CHOICE, (I, H, t), gate_up)
    monkeypatch.setitem(kernels.CHOICE, (H, I, t), down)


def _count_tables(monkeypatch) -> list[int]:
    calls = []
    real = kernels_table.gemv_table
    monkeypatch.setattr(kernels_table, "gemv_table", lambda prods, *a, **k: calls.append(len(prods)) or real(prods, *a, **k))
    return calls


def _general(monkeypatch, *args):
    """moe_forward by the grouping path (the bits moe_one must give)."""
    with monkeypatch.context() as m:
        m.setattr(layers, "moe_one", lambda *a: None)
        return layers.moe_forward(*args)


def _bits(t):
    return t.view(torch.int16)


@pytest.mark.parametrize("down", ["numba", "torch"])
@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
@pytest.mark.parametrize("reverse", [False, True])
def test_two_table_calls_give_the_bits_of_the_general_path(monkeypatch, down, names, reverse):
    _choose(monkeypatch, "numba", down)
    g = torch.Generator().manual_seed(len(down) + len(names[0]) + reverse)
    experts = _experts(g, 8, names)
    x = torch.randn(1, H, generator=g).bfloat16()
    ids, w = torch.tensor([[6, 1, 4, 3]]), torch.softmax(torch.randn(1, 4, generator=g), -1).bfloat16()
    calls = _count_tables(monkeypatch)
    src, opened = Source(experts, reverse=reverse), []
    out = layers.moe_forward(x, ids, w, src, 2, None, Block()._expert, lambda: opened.append(1))
    assert calls == ([8, 4] if down == "numba" else [8])  # all gates and ups; the downs where numba takes them
    ref = _general(monkeypatch, x, ids, w, Source(experts), 2, None, Block()._expert)
    assert torch.equal(_bits(out), _bits(ref))
    assert src.asked == [(2, [1, 3, 4, 6], None)] and opened == [1]


@pytest.mark.parametrize("case", ["budgeted source", "unmarked expert function", "torch chosen", "float32 weights",
                                  "fused gate_up"])
def test_otherwise_the_experts_go_one_by_one_with_the_same_bits(monkeypatch, case):
    _choose(monkeypatch, "torch" if case == "torch chosen" else "numba", "numba")
    g = torch.Generator().manual_seed(5)
    experts = _experts(g, 4, dtype=torch.float32 if case == "float32 weights" else torch.bfloat16)
    if case == "fused gate_up":
        for w in experts.values():
            w["gate_up_proj"] = torch.cat([w.pop("gate_proj"), w.pop("up_proj")])
    fn = (lambda x, w: layers.swiglu_expert(x, w)) if case == "unmarked expert function" else Block()._expert
    x = torch.randn(1, H, generator=g).bfloat16()
    ids, w = torch.tensor([[2, 0]]), torch.tensor([[0.75, 0.25]]).bfloat16()
    calls = _count_tables(monkeypatch)
    out = layers.moe_forward(x, ids, w, Source(experts, keeps=case != "budgeted source"), 0, None, fn)
    assert calls == []
    assert torch.equal(_bits(out), _bits(_general(monkeypatch, x, ids, w, Source(experts), 0, None, fn)))


def test_inside_a_batched_decode_step_the_rows_take_their_own_path(monkeypatch):
    _choose(monkeypatch, "numba", "numba")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, H, generator=g).bfloat16()
    assert moe_one.table_ready(x)
    with kernels.decode_rows_scope():
        assert not moe_one.table_ready(x)
    assert not moe_one.table_ready(x.float())
    assert not moe_one.table_ready(torch.randn(2, H).bfloat16())


def test_a_missing_expert_is_still_named(monkeypatch):
    _choose(monkeypatch, "numba", "numba")
    g = torch.Generator().manual_seed(9)
    with pytest.raises(MissingWeightError, match=r"layer 5: .* experts \[2\]"):
        layers.moe_forward(torch.randn(1, H, generator=g).bfloat16(), torch.tensor([[0, 2]]),
                           torch.ones(1, 2).bfloat16(), Source(_experts(g, 4), drop=2), 5, None, Block()._expert)


def _mlp(g, bias: bool):
    from zipmoe_run.models._decoder import MLP

    m = MLP(H, 40, "silu", bias=bias)
    for p in (m.gate_proj, m.up_proj, m.down_proj):
        p.weight = torch.nn.Parameter((torch.randn(p.weight.shape, generator=g) * 0.3).bfloat16(), requires_grad=False)
        if bias:
            p.bias = torch.nn.Parameter((torch.randn(p.weight.shape[0], generator=g)).bfloat16(), requires_grad=False)
    return m


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dense_down", ["numba", "torch"])
def test_a_shared_expert_joins_the_two_calls_with_its_own_bits(monkeypatch, bias, dense_down):
    _choose(monkeypatch, "numba", "numba")
    t = torch.get_num_threads()
    monkeypatch.setitem(kernels.CHOICE, (40, H, t), "numba")
    monkeypatch.setitem(kernels.CHOICE, (H, 40, t), dense_down)
    g = torch.Generator().manual_seed(11 + bias)
    experts, mlp = _experts(g, 6), _mlp(g, bias)
    x = torch.randn(1, H, generator=g).bfloat16()
    ids, w = torch.tensor([[5, 0, 3]]), torch.softmax(torch.randn(1, 3, generator=g), -1).bfloat16()
    calls = _count_tables(monkeypatch)
    out, shared = layers.moe_forward(x, ids, w, Source(experts), 1, None, Block()._expert, None, mlp)
    assert calls == ([8, 4] if dense_down == "numba" else [8, 3])  # 3 experts' and the MLP's gates and ups
    ref, ref_shared = _general(monkeypatch, x, ids, w, Source(experts), 1, None, Block()._expert, None, mlp)
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(_bits(shared), _bits(ref_shared)) and torch.equal(_bits(shared), _bits(mlp(x)))


def test_a_shared_expert_another_kernel_takes_runs_as_itself(monkeypatch):
    _choose(monkeypatch, "numba", "numba")
    monkeypatch.setitem(kernels.CHOICE, (40, H, torch.get_num_threads()), "torch")
    g = torch.Generator().manual_seed(12)
    experts, mlp = _experts(g, 4), _mlp(g, False)
    x = torch.randn(1, H, generator=g).bfloat16()
    ids, w = torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.5]]).bfloat16()
    calls = _count_tables(monkeypatch)
    out, shared = layers.moe_forward(x, ids, w, Source(experts), 0, None, Block()._expert, None, mlp)
    assert calls == [4, 2]
    assert torch.equal(_bits(shared), _bits(mlp(x)))
    ref, _ = _general(monkeypatch, x, ids, w, Source(experts), 0, None, Block()._expert, None, mlp)
    assert torch.equal(_bits(out), _bits(ref))


def test_many_tokens_get_the_shared_expert_beside_the_routed_sum():
    g = torch.Generator().manual_seed(13)
    experts, mlp = _experts(g, 4), _mlp(g, False)
    x = torch.randn(3, H, generator=g).bfloat16()
    out, shared = layers.moe_forward(x, torch.tensor([[0, 1], [1, 2], [3, 0]]), torch.ones(3, 2).bfloat16(),
                                     Source(experts), 0, None, Block()._expert, None, mlp)
    assert out.shape == shared.shape == (3, H)
    assert torch.equal(_bits(shared), _bits(mlp(x)))


@pytest.mark.parametrize("keeps", [True, False])
def test_a_prefills_one_token_experts_take_two_table_calls(monkeypatch, keeps):
    """Many tokens: the experts that got exactly one token run as table calls (one row each, their own
    input), the others as before; every output has the bits of the path without tables."""
    _choose(monkeypatch, "numba", "numba")
    g = torch.Generator().manual_seed(14)
    experts = _experts(g, 8)
    x = torch.randn(4, H, generator=g).bfloat16()
    ids = torch.tensor([[0, 5], [5, 2], [7, 5], [2, 3]])  # one token: experts 0, 7 and 3; several: 5 and 2
    w = torch.softmax(torch.randn(4, 2, generator=g), -1).bfloat16()
    calls = _count_tables(monkeypatch)
    src, opened = Source(experts, keeps=keeps), []
    out = layers.moe_forward(x, ids, w, src, 4, None, Block()._expert, lambda: opened.append(1))
    assert calls == ([6, 3] if keeps else [])
    assert src.asked == [(4, [0, 2, 3, 5, 7], None)] and opened == [1]
    with monkeypatch.context() as m:
        m.setattr(layers, "one_token_outputs", lambda *a: None)
        ref = layers.moe_forward(x, ids, w, Source(experts), 4, None, Block()._expert)
    assert torch.equal(_bits(out), _bits(ref))
