"""DeepSeek-V2 / V3 runtime models against transformers' eager implementation (the oracle), float32.

Each case: synthetic hub-layout checkpoint -> max |Δlogit| <= 1e-4 over the prompt and over 16 cached
decode steps, and the same 16 greedy tokens as transformers' own generate().
"""
from __future__ import annotations

import pytest
import torch

from zipmoe_run.errors import UnsupportedModelError
from zipmoe_run.generate import generate
from zipmoe_run.models import build_model
from zipmoe_run.models import deepseek_v2 as ds2
from zipmoe_run.models import deepseek_v3 as ds3
from zipmoe_run.source import DirectorySource
from zipmoe_pack.synth import build_config

transformers = pytest.importorskip("transformers")

TOL = 1e-4
STEPS = 16
PROMPT = [[3, 17, 250, 41, 9, 77, 120, 5, 300, 64, 11, 201], [8, 8, 400, 2, 99, 150, 6, 33, 71, 12, 499, 4]]

YARN_SPLIT_MSCALE = {"type": "yarn", "factor": 8, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 32,
                     "beta_slow": 1, "original_max_position_embeddings": 4096}
CASES = {
    # DeepSeek-V2 template: q_lora_rank set, group_limited_greedy, routed_scaling_factor 16, shared experts
    "v2_qlora": ("deepseek_v2", {}, {}),
    # q_proj path, greedy routing, yarn with attention_factor != 1 (mscale != mscale_all_dim)
    "v2_noqlora": ("deepseek_v2", {"layout": "fused"},
                   {"q_lora_rank": None, "topk_method": "greedy", "rope_scaling": YARN_SPLIT_MSCALE,
                    "first_k_dense_replace": 2, "num_hidden_layers": 4}),
    # DeepSeek-V3 template: sigmoid + e_score_correction_bias, noaux_tc, norm_topk_prob, interleaved rope
    "v3": ("deepseek_v3", {}, {}),
    # V3 with rotate_half rope and a fused-expert checkpoint
    "v3_half_fused": ("deepseek_v3", {"layout": "fused"}, {"rope_interleave": False, "n_group": 2,
                                                          "topk_group": 1, "num_experts_per_tok": 3}),
}


@pytest.fixture
def make_ckpt(checkpoint_factory):
    def make(name: str):
        family, kw, overrides = CASES[name]
        return checkpoint_factory(family, config_overrides=overrides, **kw)

    return make


def load_ref(path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation="eager", attn_implementation="eager")
    return ref.eval()


def ref_greedy(ref, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                           do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ours_teacher_forced(model, seq: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Logits [B, T, V] for seq [B, T]: prefill of n_prompt tokens, then one cached step per token."""
    cache = model.new_cache(seq.shape[0], seq.shape[1])
    outs = [model(seq[:, :n_prompt], cache, 0)]
    for pos in range(n_prompt, seq.shape[1]):
        outs.append(model(seq[:, pos:pos + 1], cache, pos))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(make_ckpt, case):
    path = make_ckpt(case)
    ref = load_ref(path)
    with DirectorySource(path) as src:
        model = build_model(src, torch.float32)
        ours_tokens = generate(model, PROMPT[0], max_new_tokens=STEPS).token_ids[0]
        assert ours_tokens == ref_greedy(ref, PROMPT[0])
        # logits over the prompt and every cached decode step, batch of two
        seq = torch.tensor([PROMPT[0] + ours_tokens, PROMPT[1] + ours_tokens])
        ours = ours_teacher_forced(model, seq, len(PROMPT[0]))
        with torch.no_grad():
            theirs = ref(seq).logits.float()
        delta = (ours - theirs).abs().max().item()
        assert delta <= TOL, f"{case}: max |Δlogit| {delta:.3g}"
        assert theirs.std().item() > 0.05  # logits are not degenerate
        assert src.stats()["experts_fetched"] > 0


def test_v2_norm_topk_prob_follows_reference(checkpoint_factory, monkeypatch):
    """transformers' DeepSeek-V2 router ignores norm_topk_prob; DeepSeek's reference code renormalises the
    top-k weights (and then skips routed_scaling_factor). Patch the oracle to the reference and compare."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf

    path = checkpoint_factory("deepseek_v2", config_overrides={"norm_topk_prob": True})
    orig = hf.DeepseekV2TopkRouter.forward

    def reference_forward(self, hidden_states):
        logits, w, idx = orig(self, hidden_states)
        w = w / self.routed_scaling_factor
        return logits, w / (w.sum(dim=-1, keepdim=True) + 1e-20), idx

    monkeypatch.setattr(hf.DeepseekV2TopkRouter, "forward", reference_forward)
    ref = load_ref(path)
    ids = torch.tensor(PROMPT)
    with DirectorySource(path) as src, torch.no_grad():
        model = build_model(src, torch.float32)
        ours = model(ids, model.new_cache(2, 12), 0)
        delta = (ours - ref(ids).logits).abs().max().item()
    assert delta <= TOL


def test_bitwise_deterministic_bf16(make_ckpt):
    path = make_ckpt("v3")
    runs = []
    for _ in range(2):
        with DirectorySource(path) as src:
            model = build_model(src, torch.bfloat16)
            assert src.stats()["experts_fetched"] == 0  # experts only ever come through fetch()
            cache = model.new_cache(2, 12)
            logits = model(torch.tensor(PROMPT), cache, 0)
            toks = generate(model, PROMPT[1], max_new_tokens=8).token_ids[0]
            runs.append((logits, toks))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_dense_layer_pattern():
    cfg = build_config("deepseek_v2", config_overrides={"num_hidden_layers": 6, "first_k_dense_replace": 1,
                                                        "moe_layer_freq": 2})
    a = ds2.ModelArgs.from_dict(cfg)
    assert [a.is_sparse(i) for i in range(6)] == [False, False, True, False, True, False]
    a = ds2.ModelArgs.from_dict({**cfg, "n_routed_experts": None})
    assert not any(a.is_sparse(i) for i in range(6))


def test_softmax_scale_and_args():
    a = ds2.ModelArgs.from_dict(build_config("deepseek_v2"))
    assert a.rope["rope_type"] == "yarn" and a.rope["rope_theta"] == 10000
    m = 0.1 * 0.707 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert a.softmax_scale() == pytest.approx(24**-0.5 * m * m)
    v3 = ds3.ModelArgs.from_dict(build_config("deepseek_v3"))
    assert (v3.topk_method, v3.norm_topk_prob, v3.mlp_bias) == ("noaux_tc", True, False)
    assert ds3.ModelArgs.from_dict({"model_type": "deepseek_v3"}).n_group == 8  # transformers' defaults


@pytest.mark.parametrize("family,overrides,msg", [
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}, "quant_method 'fp8'"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method 'greedy'"),
    ("deepseek_v2", {"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ("deepseek_v2", {"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ("deepseek_v2", {"n_group": 3}, "n_group=3"),
    ("deepseek_v3", {"n_group": 8, "topk_group": 2}, "fewer than 2 experts"),
    ("deepseek_v2", {"hidden_act": "bogus"}, "hidden_act"),
])
def test_rejects_unsupported(family, overrides, msg):
    cfg = {**build_config(family), **overrides}
    mod = ds2 if family == "deepseek_v2" else ds3
    with pytest.raises(UnsupportedModelError, match=msg) as ei:
        mod.ModelArgs.from_dict(cfg)
    assert "\n" not in str(ei.value)
