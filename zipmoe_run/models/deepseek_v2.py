"""DeepSeek-V2 (and the pieces DeepSeek-V3 reuses): multi-head latent attention plus shared + routed experts.

Semantics follow transformers' modeling_deepseek_v2.py (eager), with two settings transformers drops
taken from DeepSeek's reference code instead: ``moe_layer_freq`` (layer i is sparse iff
i >= first_k_dense_replace and i % moe_layer_freq == 0) and ``norm_topk_prob`` (top_k > 1 and set:
renormalise the top-k softmax weights and do *not* apply routed_scaling_factor; otherwise scale).

MLA: q = q_b(norm(q_a(x))) (or q_proj(x) when q_lora_rank is None); the latent c = norm(kv_a(x))
is expanded per head by kv_b into k_nope and v; k_rot (one shared head) carries RoPE on
interleaved pairs (x0, x1), (x2, x3), ...; yarn's mscale enters both cos/sin (attention_factor)
and the softmax scale (qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2).

Cache: the *expanded* per-head keys [B, H, S, dn+dr] and values [B, H, S, dv] (shared KVCache), so
kv_b runs once per token; that costs H*(dn+dr+dv) numbers per token and layer instead of the
latent's kv_lora_rank+dr, which is fine at the context lengths this runtime targets.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingWeightError, UnsupportedModelError
from ..layers import (
    ACTIVATIONS,
    KVCache,
    Linear,
    RMSNorm,
    announce,
    apply_rotary,
    args_from_dict,
    attention,
    moe_forward,
    rope_config,
    swiglu_expert,
)
from ..source import WeightSource
from ._decoder import MLP, DecoderLM, MoEDecoderLayer

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


@dataclass
class ModelArgs:
    FAMILY: ClassVar[str] = "deepseek_v2"
    ROUTING: ClassVar[tuple[str, ...]] = ("greedy", "group_limited_greedy")
    SCORING: ClassVar[str] = "softmax"
    ROPE_MODE: ClassVar[str] = "pairs_f32"  # with rope_interleave; see Attention

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_routed_experts: int | None = 64
    n_shared_experts: int | None = 2
    moe_intermediate_size: int = 1407
    num_experts_per_tok: int | None = None
    topk_method: str | None = "greedy"
    scoring_func: str | None = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rope_interleave: bool = True
    quantization_config: dict | None = None
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        a = args_from_dict(cls, cfg, rope=rope_config(cfg))
        a.validate()
        return a

    def _reject(self, what: str) -> None:
        raise UnsupportedModelError(f"{self.FAMILY}: {what}")

    def validate(self) -> None:
        if self.quantization_config:
            method = self.quantization_config.get("quant_method", "?")
            self._reject(f"quantized checkpoints (quant_method {method!r}) are not supported; "
                         "dequantize to BF16 first")
        if self.hidden_act not in ACTIVATIONS:
            self._reject(f"hidden_act {self.hidden_act!r} is not supported")
        nkv = self.num_key_value_heads or self.num_attention_heads
        if nkv != self.num_attention_heads:
            self._reject(f"num_key_value_heads={nkv} != num_attention_heads={self.num_attention_heads} "
                         "is not defined for MLA")
        if self.qk_rope_head_dim % 2:
            self._reject(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if float(self.rope.get("partial_rotary_factor", 1.0)) != 1.0:
            self._reject("partial_rotary_factor is not supported")
        if self.moe_layer_freq < 1:
            self._reject(f"moe_layer_freq={self.moe_layer_freq} must be >= 1")
        if not any(self.is_sparse(i) for i in range(self.num_hidden_layers)):
            return
        e, k = self.n_routed_experts, self.num_experts_per_tok
        if not k or not 0 < k <= e:
            self._reject(f"num_experts_per_tok={k} must be in 1..n_routed_experts={e}")
        if (self.scoring_func or self.SCORING) != self.SCORING:
            self._reject(f"scoring_func {self.scoring_func!r} is not supported (expected {self.SCORING!r})")
        method = self.topk_method or self.ROUTING[0]
        if method not in self.ROUTING:
            self._reject(f"topk_method {self.topk_method!r} is not supported (supported: {', '.join(self.ROUTING)})")
        if method != "greedy":
            g, tg = self.groups()
            if e % g or not 0 < tg <= g:
                self._reject(f"n_group={g}, topk_group={tg} do not divide n_routed_experts={e}")

    def groups(self) -> tuple[int, int]:
        return self.n_group or 1, self.topk_group or 1

    def is_sparse(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def rope_mode(self) -> str:
        return self.ROPE_MODE if self.rope_interleave else "half"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times yarn's mscale(factor, mscale_all_dim)^2 for any non-default rope type."""
        scale = self.qk_head_dim**-0.5
        rp = self.rope
        m_all = rp.get("mscale_all_dim") or 0
        if rp.get("rope_type", "default") != "default" and m_all:
            factor = rp.get("factor") or self.max_position_embeddings / rp["original_max_position_embeddings"]
            m = 1.0 if factor <= 1 else 0.1 * m_all * math.log(factor) + 1.0
            scale = scale * m * m
        return scale


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x [B, H, T, D] by cos/sin [T, D/2].

    The result is laid out de-interleaved (all first members, then all second members); q and k
    both get that permutation, so their dot products are those of the interleaved layout.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Multi-head latent attention. ``rope_mode``: "pairs_f32" (V2: interleaved pairs rotated in
    float32), "pairs" (V3 rope_interleave: pairs rotated in the model dtype), "half" (rotate_half)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.h, self.dn, self.dr, self.dv = a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.r, self.rope_mode, self.scale = a.kv_lora_rank, a.rope_mode, a.softmax_scale()
        qk = self.h * a.qk_head_dim
        if a.q_lora_rank is None:
            self.q_proj = Linear(a.hidden_size, qk, bias=False)
        else:
            self.q_a_proj = Linear(a.hidden_size, a.q_lora_rank, bias=a.attention_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(a.q_lora_rank, qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(a.hidden_size, self.r + self.dr, bias=a.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.r, self.h * (self.dn + self.dv), bias=False)
        self.o_proj = Linear(self.h * self.dv, a.hidden_size, bias=a.attention_bias)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_mode == "half":
            return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype))
        half = cos.shape[-1] // 2
        if self.rope_mode == "pairs_f32":
            return rope_pairs(x.float(), cos[:, :half], sin[:, :half]).to(x.dtype)
        return rope_pairs(x, cos[:, :half].to(x.dtype), sin[:, :half].to(x.dtype))

    def forward(self, x, cos, sin, mask, cache: KVCache, layer: int, start_pos: int) -> torch.Tensor:
        b, t, _ = x.shape  # [B, T, hidden]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [B, T, H*(dn+dr)]
        q = q.view(b, t, self.h, -1).transpose(1, 2)  # [B, H, T, dn+dr]
        q_nope, q_rot = q.split([self.dn, self.dr], dim=-1)
        c, k_rot = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)  # [B, T, r], [B, T, dr]
        kv = self.kv_b_proj(self.kv_a_layernorm(c))  # [B, T, H*(dn+dv)]
        kv = kv.view(b, t, self.h, -1).transpose(1, 2)  # [B, H, T, dn+dv]
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q_rot = self._rope(q_rot, cos, sin)
        k_rot = self._rope(k_rot.view(b, 1, t, self.dr), cos, sin)  # [B, 1, T, dr]
        q = torch.cat((q_nope, q_rot), dim=-1)  # [B, H, T, dn+dr]
        k = torch.cat((k_nope, k_rot.expand(-1, self.h, -1, -1)), dim=-1)
        k, v = cache.update(layer, k, v, start_pos)  # [B, H, S, dn+dr], [B, H, S, dv]
        o = attention(q, k, v, self.scale, mask)  # [B, T, H, dv]
        return self.o_proj(o.reshape(b, t, -1))


class Router(nn.Module):
    """Top-k expert choice; float32 throughout (transformers keeps gate.weight in float32)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.top_k, self.n_exp = a.num_experts_per_tok, a.n_routed_experts
        self.method = a.topk_method or a.ROUTING[0]
        self.n_group, self.topk_group = a.groups()
        self.norm, self.rsf = bool(a.norm_topk_prob), float(a.routed_scaling_factor)
        self.register_buffer("weight", torch.empty(self.n_exp, a.hidden_size), persistent=False)
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.empty(self.n_exp), persistent=False)

    def load(self, source: WeightSource, prefix: str) -> None:
        for name, buf in list(self.named_buffers()):
            t = source.dense(prefix + name)
            if tuple(t.shape) != tuple(buf.shape):
                raise MissingWeightError(f"tensor {prefix + name!r} has shape {tuple(t.shape)}, "
                                         f"expected {tuple(buf.shape)}")
            setattr(self, name, t.to(torch.float32))

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[N, G] group scores -> [N, E] bool mask of the experts in the topk_group best groups."""
        idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, idx, 1)
        return mask.unsqueeze(-1).expand(-1, self.n_group, self.n_exp // self.n_group).reshape(-1, self.n_exp).bool()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> expert ids [N, K] (int64), weights [N, K] (float32)."""
        logits = F.linear(x.float(), self.weight)  # [N, E]
        if self.method == "noaux_tc":
            return self._noaux_tc(logits)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if self.method == "group_limited_greedy":
            group_scores = scores.view(-1, self.n_group, self.n_exp // self.n_group).max(dim=-1).values
            scores = scores.masked_fill(~self._group_mask(group_scores), 0.0)
        w, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm:  # DeepSeek-V2 reference semantics (transformers ignores the flag)
            return ids, w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, w * self.rsf

    def _noaux_tc(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.sigmoid()  # [N, E]
        choice = scores + self.e_score_correction_bias
        group_scores = choice.view(-1, self.n_group, self.n_exp // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        if self.norm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, w * self.rsf


class MoE(nn.Module):
    def __init__(self, a: ModelArgs, layer: int, source: WeightSource):
        super().__init__()
        self.layer, self.source, self.act = layer, source, ACTIVATIONS[a.hidden_act]
        self.gate = Router(a)
        if a.n_shared_experts:
            inter = a.moe_intermediate_size * a.n_shared_experts
            self.shared_experts = MLP(a.hidden_size, inter, a.hidden_act, a.mlp_bias)

    def _expert(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        if any(k.endswith(".scale_inv") for k in w) or any(t.dtype.itemsize == 1 for t in w.values()):
            raise UnsupportedModelError(f"layer {self.layer}: FP8 expert weights are not supported; "
                                        "dequantize to BF16 first")
        return swiglu_expert(x, w, self.act)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flat [N, hidden] -> weights [N, K] (float32), expert ids [N, K] (the lookahead's interface)."""
        ids, w = self.gate(flat)  # [N, K]
        return w, ids

    def forward(self, x: torch.Tensor, after_open: Callable[[], None] | None = None) -> torch.Tensor:
        """Route, announce the layer's experts (the missing ones are read while the shared experts
        compute), shared experts, routed experts; the sum is routed + shared, as transformers adds."""
        b, t, h = x.shape
        flat = x.view(-1, h)  # [N, hidden]
        w, ids = self.route(flat)  # [N, K]
        shared = None
        if hasattr(self, "shared_experts"):
            announce(self.source, self.layer, ids)
            shared = self.shared_experts(flat)  # [N, hidden]
        out = moe_forward(flat, ids, w, self.source, self.layer, None, self._expert, after_open)
        if shared is not None:
            out = out + shared
        return out.view(b, t, h)


class DecoderLayer(MoEDecoderLayer):
    attention_cls = Attention
    moe_cls = MoE

    def dense_block(self, a: ModelArgs) -> nn.Module:
        return MLP(a.hidden_size, a.intermediate_size, a.hidden_act, a.mlp_bias)


class Model(DecoderLM):
    """The shared skeleton with MLA: cos/sin in float32 over the rotated part of a head (the
    attention casts them), float32 routers loaded after the weights are bound, and a KV cache of
    the expanded per-head keys and values."""

    layer_cls = DecoderLayer
    rope_dtype = torch.float32

    def __init__(self, args: ModelArgs, source: WeightSource, dtype: torch.dtype = torch.bfloat16):
        super().__init__(args, source, dtype)
        for name, mod in self.named_modules():
            if isinstance(mod, Router):
                mod.load(source, name + ".")

    @property
    def rope_dim(self) -> int:
        return self.args.qk_rope_head_dim

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, batch, max_len, a.num_attention_heads, a.qk_head_dim, a.v_head_dim,
                       self.dtype)
