"""Per-family knowledge for :mod:`zipmoe_pack.synth`: small config templates and the tensor list.

A config template is written the way the family's published checkpoints spell it (``torch_dtype`` or
``dtype``, ``rope_theta`` or ``rope_parameters``/``rope_scaling``), at tiny sizes. :func:`tensor_specs`
derives every tensor's name, shape and dtype from a config dict alone (the same arithmetic the
Hugging Face modeling code does), in module order, so that it serves both generated configs and
real ones read by ``make_from_index``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FAMILIES", "FUSED_FAMILIES", "TensorSpec", "template", "dim_keys", "check_config", "tensor_specs",
           "TOKENS", "TOKEN_STYLE", "token_ids"]

FAMILIES = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3", "switch_transformers",
            "phimoe")
# transformers 5 keeps routed experts of these as fused 3-D parameters (gate_up_proj [E, 2I, H], down_proj
# [E, H, I]); switch_transformers keeps a ModuleDict of per-expert Linear layers, so it has no fused layout.
FUSED_FAMILIES = tuple(f for f in FAMILIES if f != "switch_transformers")

# Router logits get this standard deviation for unit-RMS inputs when peaky_router is set: top-k margins are
# then ~1 logit wide, far above float32 summation noise. Sigmoid scoring (deepseek_v3) saturates, so less.
PEAKY_LOGIT_STD = {"deepseek_v3": 2.5}
PEAKY_LOGIT_STD_DEFAULT = 6.0
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "bfloat16" | "float16" | "float32"
    std: float = WEIGHT_STD
    mean: float = 0.0
    # (seed name, shape) pieces laid end to end fill the tensor; a fused expert tensor is made of the
    # per-expert pieces, so both layouts of one seed hold the same numbers. None: the tensor itself.
    parts: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    group: tuple | None = None  # (stack, layer) of a routed-expert tensor, else None
    expert: int | None = None  # expert index of a per-expert tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def pieces(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return self.parts if self.parts is not None else ((self.name, self.shape),)


# Special tokens per family, in id order from 0 (the synthetic tokenizer puts them first), and the roles
# config/tokenizer files refer to them by.
TOKENS = {
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
             {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None}),
    "olmoe": (["<|endoftext|>", "<|padding|>"],
              {"bos": None, "eos": "<|endoftext|>", "pad": "<|padding|>", "unk": None}),
    "llama": (["<unk>", "<s>", "</s>"], {"bos": "<s>", "eos": "</s>", "pad": None, "unk": "<unk>"}),
    "deepseek": (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
                 {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>",
                  "pad": "<｜end▁of▁sentence｜>", "unk": None}),
    "phi": (["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
            {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<unk>"}),
    "t5": (["<pad>", "</s>", "<unk>"], {"bos": None, "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}),
}
TOKEN_STYLE = {"qwen2_moe": "qwen", "qwen3_moe": "qwen", "olmoe": "olmoe", "mixtral": "llama",
               "deepseek_v2": "deepseek", "deepseek_v3": "deepseek", "phimoe": "phi",
               "switch_transformers": "t5"}


def token_ids(family: str) -> dict:
    """Role (bos/eos/pad/unk) -> token id (None where the family has no such token)."""
    specials, roles = TOKENS[TOKEN_STYLE[family]]
    return {r: (None if t is None else specials.index(t)) for r, t in roles.items()}


_COMMON = {"hidden_act": "silu", "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
           "tie_word_embeddings": False, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 3,
           "num_attention_heads": 4}


def template(family: str) -> dict:
    """A tiny config.json dict for ``family``, spelled as that family's hub checkpoints spell it."""
    ids = token_ids(family)
    if family == "qwen2_moe":  # Qwen1.5-MoE-A2.7B, reduced
        return {"architectures": ["Qwen2MoeForCausalLM"], **_COMMON, "bos_token_id": ids["pad"],
                "eos_token_id": ids["eos"], "intermediate_size": 128, "max_position_embeddings": 4096,
                "max_window_layers": 2, "model_type": "qwen2_moe", "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
                "rope_theta": 1000000.0, "sliding_window": 4096, "torch_dtype": "bfloat16",
                "transformers_version": "4.46.3", "use_sliding_window": False, "decoder_sparse_step": 1,
                "moe_intermediate_size": 32, "shared_expert_intermediate_size": 128, "num_experts_per_tok": 2,
                "num_experts": 8, "norm_topk_prob": False, "output_router_logits": False,
                "router_aux_loss_coef": 0.001}
    if family == "qwen3_moe":  # Qwen3-30B-A3B, reduced, saved by transformers 5 (dtype, rope_parameters)
        return {"architectures": ["Qwen3MoeForCausalLM"], **_COMMON, "attention_bias": False,
                "bos_token_id": ids["pad"], "decoder_sparse_step": 1, "dtype": "bfloat16",
                "eos_token_id": ids["eos"], "head_dim": 32, "intermediate_size": 128,
                "max_position_embeddings": 4096, "max_window_layers": 3, "mlp_only_layers": [],
                "model_type": "qwen3_moe", "moe_intermediate_size": 32, "norm_topk_prob": True,
                "num_experts": 8, "num_experts_per_tok": 2, "num_key_value_heads": 2,
                "output_router_logits": False, "rms_norm_eps": 1e-06,
                "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
                "router_aux_loss_coef": 0.001, "sliding_window": None, "transformers_version": "5.0.0",
                "use_sliding_window": False}
    if family == "olmoe":  # OLMoE-1B-7B-0924, reduced (experts use intermediate_size)
        return {"architectures": ["OlmoeForCausalLM"], **_COMMON, "attention_bias": False, "clip_qkv": None,
                "eos_token_id": ids["eos"], "intermediate_size": 32, "max_position_embeddings": 4096,
                "model_type": "olmoe", "norm_topk_prob": False, "num_experts": 8, "num_experts_per_tok": 2,
                "num_key_value_heads": 4, "output_router_logits": False, "pad_token_id": ids["pad"],
                "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01,
                "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0"}
    if family == "mixtral":  # Mixtral-8x7B-v0.1, reduced
        return {"architectures": ["MixtralForCausalLM"], **_COMMON, "bos_token_id": ids["bos"],
                "eos_token_id": ids["eos"], "intermediate_size": 48, "max_position_embeddings": 32768,
                "model_type": "mixtral", "num_experts_per_tok": 2, "num_key_value_heads": 2,
                "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05,
                "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
                "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0"}
    if family in ("deepseek_v2", "deepseek_v3"):
        cfg = {"architectures": ["DeepseekV2ForCausalLM"], **_COMMON, "attention_bias": False,
               "aux_loss_alpha": 0.001, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "ep_size": 1,
               "first_k_dense_replace": 1, "intermediate_size": 128, "kv_lora_rank": 32,
               "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 32,
               "moe_layer_freq": 1, "n_group": 4, "n_routed_experts": 8, "n_shared_experts": 2,
               "norm_topk_prob": False, "num_experts_per_tok": 2, "num_key_value_heads": 4,
               "pretraining_tp": 1, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
               "rms_norm_eps": 1e-06, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": True,
               "topk_group": 2, "topk_method": "group_limited_greedy", "v_head_dim": 16}
        yarn = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                "original_max_position_embeddings": 4096}
        if family == "deepseek_v2":  # DeepSeek-V2, reduced: legacy rope_theta + rope_scaling {"type": "yarn"}
            return {**cfg, "rope_scaling": {**yarn, "type": "yarn"}, "rope_theta": 10000,
                    "torch_dtype": "bfloat16", "transformers_version": "4.39.3"}
        # DeepSeek-V3, reduced, in transformers 5 spelling (dtype, rope_parameters)
        return {**cfg, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "dtype": "bfloat16",
                "norm_topk_prob": True, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
                "topk_method": "noaux_tc", "rope_interleave": True, "n_shared_experts": 1,
                "rope_parameters": {**yarn, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0,
                                    "rope_type": "yarn"}, "transformers_version": "5.0.0"}
    if family == "phimoe":  # Phi-3.5-MoE-instruct, reduced (LayerNorm with bias, biased attention and lm_head)
        return {"architectures": ["PhimoeForCausalLM"], **_COMMON, "attention_bias": True,
                "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "hidden_dropout": 0.0,
                "input_jitter_noise": 0.01, "intermediate_size": 48, "lm_head_bias": True,
                "max_position_embeddings": 131072, "model_type": "phimoe", "num_experts_per_tok": 2,
                "num_key_value_heads": 2, "num_local_experts": 8, "output_router_logits": False,
                "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "router_aux_loss_coef": 0.0,
                "router_jitter_noise": 0.01, "sliding_window": 131072, "dtype": "bfloat16",
                "transformers_version": "5.0.0"}
    if family == "switch_transformers":  # switch-large-128's own field names, reduced
        return {"add_router_probs": False, "architectures": ["SwitchTransformersForConditionalGeneration"],
                "d_ff": 128, "d_kv": 16, "d_model": 64, "decoder_sparse_step": 2, "dense_act_fn": "relu",
                "dropout_rate": 0.1, "encoder_sparse_step": 2, "eos_token_id": ids["eos"],
                # 8 experts x capacity 4 = 32 slots: a 40-token prompt overflows some expert in every sparse layer
                "expert_capacity": 4, "feed_forward_proj": "relu", "initializer_factor": 1.0,
                "is_encoder_decoder": True, "is_gated_act": False, "layer_norm_epsilon": 1e-06,
                "model_type": "switch_transformers", "num_decoder_layers": 4, "num_experts": 8, "num_heads": 4,
                "num_layers": 4, "num_sparse_decoder_layers": 2, "num_sparse_encoder_layers": 2,
                "pad_token_id": ids["pad"], "relative_attention_max_distance": 128,
                "relative_attention_num_buckets": 32, "router_aux_loss_coef": 0.001, "router_bias": False,
                "router_dtype": "float32", "router_ignore_padding_tokens": False, "router_jitter_noise": 0.01,
                "router_type": "tokens_masked", "router_z_loss_coef": 0.001, "torch_dtype": "bfloat16",
                "transformers_version": "4.25.0.dev0", "use_cache": True, "vocab_size": 512}
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def dim_keys(family: str) -> dict[str, tuple[str, ...]]:
    """Friendly ``dims`` names -> the config keys they set for ``family``."""
    if family == "switch_transformers":
        return {"hidden": ("d_model",), "intermediate": ("d_ff",), "moe_intermediate": ("d_ff",),
                "experts": ("num_experts",), "top_k": (), "layers": ("num_layers", "num_decoder_layers"),
                "sparse_layers": ("num_sparse_encoder_layers", "num_sparse_decoder_layers"),
                "vocab": ("vocab_size",), "heads": ("num_heads",), "head_dim": ("d_kv",),
                "expert_capacity": ("expert_capacity",)}
    per_expert = "intermediate_size" if family in ("olmoe", "mixtral", "phimoe") else "moe_intermediate_size"
    experts = {"mixtral": "num_local_experts", "phimoe": "num_local_experts",
               "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}.get(family, "num_experts")
    keys = {"hidden": ("hidden_size",), "intermediate": ("intermediate_size",),
            "moe_intermediate": (per_expert,), "experts": (experts,), "top_k": ("num_experts_per_tok",),
            "layers": ("num_hidden_layers",), "vocab": ("vocab_size",), "heads": ("num_attention_heads",),
            "kv_heads": ("num_key_value_heads",), "head_dim": ("head_dim",)}
    if family == "qwen2_moe":
        keys["shared_intermediate"] = ("shared_expert_intermediate_size",)
    if family.startswith("deepseek"):
        keys.update(kv_heads=("num_key_value_heads",), head_dim=(), shared_experts=("n_shared_experts",),
                    q_lora_rank=("q_lora_rank",), kv_lora_rank=("kv_lora_rank",),
                    qk_rope_head_dim=("qk_rope_head_dim",), qk_nope_head_dim=("qk_nope_head_dim",),
                    v_head_dim=("v_head_dim",), n_group=("n_group",), topk_group=("topk_group",))
    return keys


def check_config(family: str, cfg: dict) -> None:
    """ValueError for sizes the modeling code cannot build (heads, kv heads, expert groups, top-k)."""
    keys = dim_keys(family)
    experts = cfg[keys["experts"][0]]
    top_k = cfg.get("num_experts_per_tok", 1)
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k {top_k} must be between 1 and the number of experts ({experts})")
    if family == "switch_transformers":
        return
    if "head_dim" not in cfg and cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"hidden {cfg['hidden_size']} is not a multiple of heads {cfg['num_attention_heads']}")
    if cfg["num_attention_heads"] % (cfg.get("num_key_value_heads") or cfg["num_attention_heads"]):
        raise ValueError("heads must be a multiple of kv_heads")
    if family.startswith("deepseek") and cfg.get("n_group"):
        if experts % cfg["n_group"] or cfg["topk_group"] > cfg["n_group"]:
            raise ValueError(f"{experts} experts do not split into n_group={cfg['n_group']} groups "
                             f"with topk_group={cfg['topk_group']}")
        if family == "deepseek_v3" and experts // cfg["n_group"] < 2:
            raise ValueError("deepseek_v3 group scores need >= 2 experts per group")


def _router_std(family: str, hidden: int, peaky: bool) -> float:
    if not peaky:
        return WEIGHT_STD
    return PEAKY_LOGIT_STD.get(family, PEAKY_LOGIT_STD_DEFAULT) / math.sqrt(hidden)


def tensor_specs(family: str, cfg: dict, *, layout: str = "per-expert", dtype: str = "bfloat16",
                 peaky_router: bool = True) -> list[TensorSpec]:
    """Every tensor of the checkpoint ``cfg`` describes, in module (state_dict) order."""
    if family == "switch_transformers":
        if layout != "per-expert":
            raise ValueError("switch_transformers has no fused layout in transformers 5 (experts are a ModuleDict)")
        return _switch_specs(cfg, dtype, peaky_router)
    if layout not in ("per-expert", "fused"):
        raise ValueError(f"layout must be 'per-expert' or 'fused', not {layout!r}")
    return _decoder_specs(family, cfg, layout, dtype, peaky_router)


def _decoder_specs(family, cfg, layout, dt, peaky):
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    keys = dim_keys(family)
    E = cfg[keys["experts"][0]]
    I_moe = cfg[keys["moe_intermediate"][0]]
    out: list[TensorSpec] = []

    def w(name, *shape, std=WEIGHT_STD):
        out.append(TensorSpec(name, tuple(shape), dt, std))

    def norm(name, n, bias=False):
        out.append(TensorSpec(name + ".weight", (n,), dt, 0.05, 1.0))
        if bias:
            out.append(TensorSpec(name + ".bias", (n,), dt, 0.02))

    def lin(name, o, i, bias=False):
        w(name + ".weight", o, i)
        if bias:
            w(name + ".bias", o)

    def mlp(p, inter):
        lin(p + "gate_proj", inter, H), lin(p + "up_proj", inter, H), lin(p + "down_proj", H, inter)

    moe_prefix = "block_sparse_moe." if family in ("mixtral", "phimoe") else "mlp."
    names = ("w1", "w3", "w2") if family in ("mixtral", "phimoe") else ("gate_proj", "up_proj", "down_proj")
    w("model.embed_tokens.weight", V, H)
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        a = p + "self_attn."
        if family.startswith("deepseek"):
            qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
            qr, kvr = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
            if qr is None:
                lin(a + "q_proj", nh * qk, H)
            else:
                lin(a + "q_a_proj", qr, H, cfg.get("attention_bias", False)), norm(a + "q_a_layernorm", qr)
                lin(a + "q_b_proj", nh * qk, qr)
            lin(a + "kv_a_proj_with_mqa", kvr + cfg["qk_rope_head_dim"], H, cfg.get("attention_bias", False))
            norm(a + "kv_a_layernorm", kvr)
            lin(a + "kv_b_proj", nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), kvr)
            lin(a + "o_proj", H, nh * cfg["v_head_dim"], cfg.get("attention_bias", False))
        else:
            qkv_bias = cfg.get("qkv_bias", True) if family == "qwen2_moe" else cfg.get("attention_bias", False)
            lin(a + "q_proj", nh * hd, H, qkv_bias), lin(a + "k_proj", nkv * hd, H, qkv_bias)
            o_bias = qkv_bias and family in ("qwen3_moe", "olmoe", "phimoe")  # qwen2: q/k/v only; mixtral: none
            lin(a + "v_proj", nkv * hd, H, qkv_bias), lin(a + "o_proj", H, nh * hd, o_bias)
            if family == "qwen3_moe":
                norm(a + "q_norm", hd), norm(a + "k_norm", hd)
            elif family == "olmoe":
                norm(a + "q_norm", nh * hd), norm(a + "k_norm", nkv * (H // nh))
        if _is_sparse(family, cfg, L):
            m = p + moe_prefix
            gate = m + "gate.weight"
            router = TensorSpec(gate, (E, H), dt, _router_std(family, H, peaky))
            if layout == "fused":  # transformers 5 state_dict names (mixtral/phimoe renamed to mlp., router)
                f = p + "mlp."
                router = TensorSpec(f + ("router.weight" if family == "phimoe" else "gate.weight"), (E, H), dt,
                                    router.std, parts=((gate, (E, H)),))
            out.append(router)
            if family == "deepseek_v3":
                out.append(TensorSpec(m + "gate.e_score_correction_bias", (E,), "float32", 0.05))
            g, u, d = (m + "experts.{e}." + n + ".weight" for n in names)
            if layout == "fused":
                grp = (None, L)
                out.append(TensorSpec(f + "experts.gate_up_proj", (E, 2 * I_moe, H), dt, group=grp,
                                      parts=tuple(x for e in range(E) for x in ((g.format(e=e), (I_moe, H)),
                                                                                (u.format(e=e), (I_moe, H))))))
                out.append(TensorSpec(f + "experts.down_proj", (E, H, I_moe), dt, group=grp,
                                      parts=tuple((d.format(e=e), (H, I_moe)) for e in range(E))))
            else:
                gs, ds = (g, (I_moe, H)), (d, (H, I_moe))
                us = (u, (I_moe, H))
                order = (gs, ds, us) if family in ("mixtral", "phimoe") else (gs, us, ds)  # module order: w1 w2 w3
                for e in range(E):
                    for n, shape in order:
                        out.append(TensorSpec(n.format(e=e), shape, dt, group=(None, L), expert=e))
            if family == "qwen2_moe":
                mlp(m + "shared_expert.", cfg["shared_expert_intermediate_size"])
                w(m + "shared_expert_gate.weight", 1, H)
            elif family.startswith("deepseek"):
                mlp(m + "shared_experts.", I_moe * cfg["n_shared_experts"])
        else:
            mlp(p + "mlp.", cfg["intermediate_size"])
        norm(p + "input_layernorm", H, family == "phimoe")
        norm(p + "post_attention_layernorm", H, family == "phimoe")
    norm("model.norm", H, family == "phimoe")
    lin("lm_head", V, H, family == "phimoe" and cfg.get("lm_head_bias", False))
    return out


def _is_sparse(family, cfg, L):
    if family in ("qwen2_moe", "qwen3_moe"):
        step = cfg.get("decoder_sparse_step", 1)
        return (L not in (cfg.get("mlp_only_layers") or []) and cfg[dim_keys(family)["experts"][0]] > 0
                and (L + 1) % step == 0)
    if family.startswith("deepseek"):
        return L >= (cfg.get("first_k_dense_replace") or 0)
    return True


def _switch_specs(cfg, dt, peaky):
    D, V, F, E = cfg["d_model"], cfg["vocab_size"], cfg["d_ff"], cfg["num_experts"]
    inner = cfg["num_heads"] * cfg["d_kv"]
    tied = (("shared.weight", (V, D)),)
    out = [TensorSpec("shared.weight", (V, D), dt, 1.0)]

    def w(name, *shape, std=WEIGHT_STD, **kw):
        out.append(TensorSpec(name, tuple(shape), dt, std, **kw))

    def attn(p, rel):
        for x in "qkvo":
            w(f"{p}{x}.weight", *((D, inner) if x == "o" else (inner, D)))
        if rel:
            w(p + "relative_attention_bias.weight", cfg["relative_attention_num_buckets"], cfg["num_heads"],
              std=0.5)

    for stack, n_layers, n_sparse in (("encoder", cfg["num_layers"], cfg["num_sparse_encoder_layers"]),
                                      ("decoder", cfg.get("num_decoder_layers") or cfg["num_layers"],
                                       cfg["num_sparse_decoder_layers"])):
        w(f"{stack}.embed_tokens.weight", V, D, std=1.0, parts=tied)
        step = n_layers // n_sparse if n_sparse > 0 else n_layers  # as SwitchTransformersConfig computes it
        for i in range(n_layers):
            b = f"{stack}.block.{i}.layer."
            attn(b + "0.SelfAttention.", i == 0)
            w(b + "0.layer_norm.weight", D, std=0.05, mean=1.0)
            ff = 1
            if stack == "decoder":
                attn(b + "1.EncDecAttention.", False)
                w(b + "1.layer_norm.weight", D, std=0.05, mean=1.0)
                ff = 2
            m = f"{b}{ff}.mlp."
            if (i % step == 1 or step == 1) if step > 0 else False:
                w(m + "router.classifier.weight", E, D, std=_router_std("switch_transformers", D, peaky))
                for e in range(E):
                    w(f"{m}experts.expert_{e}.wi.weight", F, D, group=(stack, i), expert=e)
                    w(f"{m}experts.expert_{e}.wo.weight", D, F, group=(stack, i), expert=e)
            else:
                w(m + "wi.weight", F, D), w(m + "wo.weight", D, F)
            w(f"{b}{ff}.layer_norm.weight", D, std=0.05, mean=1.0)
        w(f"{stack}.final_layer_norm.weight", D, std=0.05, mean=1.0)
    w("lm_head.weight", V, D, std=1.0, parts=tied)
    return out
