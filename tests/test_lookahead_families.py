"""Router lookahead in every family that routes (decoder-only skeleton and DeepSeek-V2/V3): prefetching
the next layer's guessed experts changes timing only, never a bit, and links only consecutive MoE layers.

Each archive runs a prompt and a few greedy decode steps with no budget (the reference), then at tight
budgets with ``prefetch="lookahead"``: logits ``torch.equal``, guesses made (``prefetch_predicted``).
"""
from __future__ import annotations

import pytest
import torch

from zipmoe_pack.pack import PackOptions, pack
from zipmoe_run.api import load
from zipmoe_run.lookahead import moe_block

PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 8]]
STEPS = 4
DIMS = {"experts": 8, "top_k": 2, "hidden": 64, "layers": 3}

# (family, config overrides, how many layers get a lookahead: MoE layers followed by an MoE layer)
CASES = {
    "qwen2_moe": ("qwen2_moe", None, 2),
    "qwen3_moe": ("qwen3_moe", None, 2),
    "olmoe": ("olmoe", None, 2),
    "mixtral": ("mixtral", None, 2),  # block_sparse_moe, found through the layer's moe accessor
    "deepseek_v2": ("deepseek_v2", None, 1),  # layer 0 dense (first_k_dense_replace=1), layers 1-2 MoE
    "deepseek_v3": ("deepseek_v3", None, 1),
    # MoE, dense, MoE, MoE: only layer 2 has a next MoE layer
    "qwen2_moe-mlp_only": ("qwen2_moe", {"num_hidden_layers": 4, "mlp_only_layers": [1]}, 1),
    # dense, MoE, MoE, MoE
    "deepseek_v2-4layers": ("deepseek_v2", {"num_hidden_layers": 4}, 2),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, checkpoint_factory, tmp_path_factory):
    family, overrides, links = CASES[request.param]
    src = checkpoint_factory(family, seed=11, dims=DIMS, peaky_router=False, config_overrides=overrides)
    arc = tmp_path_factory.mktemp("lookahead") / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=4096))
    return arc, links


def _run(arc, **opts):
    """Logits of the prompt and of STEPS greedy decode steps, and the store's stats."""
    with load(arc, dtype="bfloat16", threads=2, **opts) as lm:
        m = lm.model
        out = []
        cache = m.new_cache(1, len(PROMPT[0]) + STEPS + 1)
        x = m(torch.tensor(PROMPT), cache, 0)  # [1, T, V]
        out.append(x.clone())
        tok = x[:, -1:].argmax(-1)  # [1, 1]
        for i in range(STEPS):
            y = m(tok, cache, len(PROMPT[0]) + i)  # [1, 1, V]
            out.append(y.clone())
            tok = y[:, -1:].argmax(-1)
        lm.source.store.drain_prefetch()  # a cancelled guess may still be in flight
        return out, lm.source.stats()


def test_set_lookahead_links_consecutive_moe_layers(case):
    arc, links = case
    with load(arc, threads=2) as lm:
        layers = lm.model.model.layers
        assert lm.model.set_lookahead(True) == links
        for i, layer in enumerate(layers):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            linked = moe_block(layer) is not None and nxt is not None and moe_block(nxt) is not None
            assert (layer.lookahead is not None) == linked, i
            if linked:
                assert layer.lookahead.block is moe_block(nxt) and layer.lookahead.layer == nxt.layer
        assert lm.model.set_lookahead(False) == 0
        assert all(layer.lookahead is None for layer in layers)


def test_lookahead_at_tight_budgets_is_exact(case):
    arc, links = case
    reference, _ = _run(arc)
    with load(arc, threads=2) as lm:
        minimum, need = lm.source.store.min_budget, lm.source.store.expert_bytes
    for budget in (minimum, max(minimum, int(need * 0.4))):
        got, st = _run(arc, memory_budget=budget, prefetch="lookahead")
        assert len(got) == len(reference)
        for a, b in zip(got, reference):
            assert torch.equal(a, b)
        assert st["store_peak_bytes"] <= st["budget_bytes"], st
        assert st["staging_bytes"] == 0 and st["draining_bytes"] == 0
        assert (st["prefetch_predicted"] > 0) == (links > 0), st


def test_deepseek_dense_layer_between_moe_layers_breaks_the_link(checkpoint_factory, tmp_path):
    """DeepSeek's moe_layer_freq can put a dense layer between MoE layers (the synthetic checkpoints only
    make the first_k_dense_replace prefix dense, so the pattern dense, MoE, dense, MoE is made by hand)."""
    src = checkpoint_factory("deepseek_v2", seed=11, dims=DIMS, peaky_router=False,
                             config_overrides={"num_hidden_layers": 4})
    arc = tmp_path / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=4096))
    with load(arc, threads=2) as lm:
        layers = lm.model.model.layers
        assert [moe_block(layer) is not None for layer in layers] == [False, True, True, True]
        assert lm.model.set_lookahead(True) == 2
        layers[2].mlp = layers[0].mlp  # dense, MoE, dense, MoE
        assert lm.model.set_lookahead(True) == 0
        assert all(layer.lookahead is None for layer in layers)
