"""A bf16 prefill's routed-expert block (``layers.moe_forward`` of several tokens) keeps one thread
arrangement from its first expert to its sum: the experts' kernels on numba's team, the sum of their
outputs (one numba call, ``decode_ops.weighted_sum``, or where it does not apply ``index_add_`` per expert
on torch's single thread) inside the same ``single_row_scope`` rather than on a fork of torch's team right
after numba's (whose spinning threads hold the cores: on a busy 2-core host each such fork waited
milliseconds). The bits are those of the sum on torch's team."""
from __future__ import annotations

import pytest
import torch

from zipmoe_run import kernels, layers, moe_one

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba kernel unavailable")

H, I, E, TOP = 64, 96, 6, 2


class Source:
    def __init__(self, experts):
        self.experts = experts

    def fetch(self, layer, wanted, stack=None):
        for e in wanted:
            yield e, self.experts[e]


def _setup(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    experts = {e: {name: (torch.randn(*shape, generator=g) * 0.1).bfloat16()
                   for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))}
               for e in range(E)}
    x = torch.randn(n, H, generator=g).bfloat16()
    probs = torch.softmax(torch.randn(n, E, generator=g), dim=-1)
    top_w, top_i = torch.topk(probs, TOP, dim=-1)
    return x, top_i, top_w.bfloat16(), Source(experts)


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)
    kernels.set_threads(saved)


def test_prefill_sum_runs_on_torchs_single_thread_in_the_scope(monkeypatch, two_threads):
    x, top_i, top_w, src = _setup()
    seen = []
    real = moe_one.sum_outputs

    def spy(*a):
        seen.append((torch.get_num_threads(), kernels._scope_threads))
        return real(*a)

    from zipmoe_run import decode_ops

    with monkeypatch.context() as m:  # the torch sum (where decode_ops.weighted_sum does not take it)
        m.setattr(layers, "sum_outputs", spy)
        m.setattr(decode_ops, "takes_sum", lambda *a: False)
        fallback = layers.moe_forward(x, top_i, top_w, src, 0)
    assert seen == [(1, 2)]  # torch on one thread, numba's team at torch's count of 2
    assert torch.get_num_threads() == 2 and kernels._scope_threads == 0  # restored after the block
    out = layers.moe_forward(x, top_i, top_w, src, 0)  # one numba call for the sum: the same bits
    assert torch.equal(out.view(torch.int16), fallback.view(torch.int16))
    # the same bits as summing on torch's team, outside any scope
    with kernels.single_row_scope(True):
        outs, wanted, rows = [], [], []
        for e in range(E):
            tok = (top_i == e).any(-1).nonzero().flatten()
            if len(tok):
                w = top_w[tok][top_i[tok] == e][:, None]
                outs.append((layers.swiglu_expert(x[tok], src.experts[e]) * w).to(x.dtype))
                wanted.append(e)
                rows.append(tok)
    want = real(x, outs, wanted, 0, lambda i: rows[i])
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
