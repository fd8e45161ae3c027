"""A prefill that wants only the last position's logits (``forward(..., last_only=True)``: generation,
the engine) runs the last layer's block on the last position alone, as llama.cpp does: attention still
writes every position's K/V, but the other positions' block outputs are never read. The last MoE layer
then fetches only the experts the last position routes to (under a budget: reads them), and the
greedy continuation is the one the whole-prompt computation gives."""
from __future__ import annotations

import pytest
import torch

from zipmoe_run.api import load

PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31, 77]]
DIMS = {"experts": 8, "top_k": 2, "hidden": 64, "layers": 3}


def _fetches(lm, fn):
    """{layer: set of experts fetched} while ``fn()`` runs."""
    got: dict[int, set] = {}
    real = lm.source.fetch

    def fetch(layer, experts, *a, **k):
        got.setdefault(layer, set()).update(int(e) for e in experts)
        return real(layer, experts, *a, **k)

    lm.source.fetch = fetch
    try:
        fn()
    finally:
        lm.source.fetch = real
    return got


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v2"])
def test_last_layer_block_runs_on_the_last_position_only(family, checkpoint_factory):
    src = checkpoint_factory(family, seed=5, dims=DIMS, peaky_router=False)
    with load(src, dtype="float32", threads=1) as lm:
        m = lm.model
        ids = torch.tensor(PROMPT)
        cache_all, cache_last = m.new_cache(1, 16), m.new_cache(1, 16)
        whole = {}
        fetched_all = _fetches(lm, lambda: whole.setdefault("x", m(ids, cache_all, 0)))
        last = {}
        fetched_last = _fetches(lm, lambda: last.setdefault("x", m(ids, cache_last, 0, last_only=True)))
        top = max(fetched_all)
        assert fetched_last[top] <= fetched_all[top] and len(fetched_last[top]) <= DIMS["top_k"], fetched_last
        assert len(fetched_all[top]) > DIMS["top_k"]  # the whole prompt routes to more experts
        for layer in fetched_all:
            if layer != top:
                assert fetched_last[layer] == fetched_all[layer]
        assert last["x"].shape == (1, 1, whole["x"].shape[-1])
        # every position's K/V is written either way, bit for bit (attention runs before the block)
        for a, b in zip([*cache_all.k, *cache_all.v], [*cache_last.k, *cache_last.v]):
            assert torch.equal(a, b)
        # the same next token, and logits of the same computation in another row grouping
        assert int(last["x"][0, -1].argmax()) == int(whole["x"][0, -1].argmax())
        torch.testing.assert_close(last["x"][0, -1], whole["x"][0, -1], rtol=1e-4, atol=1e-4)
