"""OLMoE: attention with RMSNorm over the full q and k projections (not per head), optional
clip_qkv; every layer is a routed-expert layer with no shared expert.

Semantics follow transformers' modeling_olmoe.py (float32 softmax router, optional top-k
renormalisation, plain causal mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..layers import (
    ACTIVATIONS,
    KVCache,
    Linear,
    RMSNorm,
    apply_rotary,
    args_from_dict,
    attention,
    rope_config,
)
from ._decoder import DecoderLM, MoEDecoderLayer


@dataclass
class ModelArgs:
    vocab_size: int = 50304
    hidden_size: int = 2048
    intermediate_size: int = 2048  # per expert
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None
    num_experts_per_tok: int = 8
    num_experts: int = 64
    norm_topk_prob: bool = False
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        cfg = {**cfg, "num_experts": cfg.get("num_experts", cfg.get("num_local_experts", 64))}
        a = args_from_dict(cls, cfg, rope=rope_config(cfg))
        a.num_key_value_heads = a.num_key_value_heads or a.num_attention_heads
        a.head_dim = a.head_dim or a.hidden_size // a.num_attention_heads
        if a.num_attention_heads * a.head_dim != a.hidden_size:
            raise UnsupportedModelError("olmoe with num_attention_heads * head_dim != hidden_size is not supported")
        if a.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {a.hidden_act!r} is not supported")
        return a

    def is_sparse(self, i: int) -> bool:
        return True  # every OLMoE layer routes


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.scale = self.head_dim**-0.5
        bias = a.attention_bias
        self.q_proj = Linear(a.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(a.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(a.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, a.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.n_heads * self.head_dim, a.rms_norm_eps)  # full width, not per head
        self.k_norm = RMSNorm(self.n_kv * self.head_dim, a.rms_norm_eps)
        self.clip = a.clip_qkv

    def forward(self, x, cos, sin, mask, cache: KVCache, layer: int, start_pos: int) -> torch.Tensor:
        b, t, _ = x.shape  # [B, T, H]
        q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)  # [B, T, n*D]
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, nH, T, D]
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, nKV, T, D]
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = cache.update(layer, k, v, start_pos)  # [B, nKV, S, D]
        o = attention(q, k, v, self.scale, mask)  # [B, T, nH, D]
        return self.o_proj(o.reshape(b, t, -1))


class DecoderLayer(MoEDecoderLayer):
    attention_cls = Attention


class Model(DecoderLM):
    layer_cls = DecoderLayer
