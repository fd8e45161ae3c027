"""OLMoE: attention with RMSNorm over the full q and k projections (not per head), optional
clip_qkv; every layer is a routed-expert layer with no shared expert.

Semantics follow transformers' modeling_olmoe.py (float32 softmax router, optional top-k
renormalisation, plain causal mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedModelError
from ._decoder import Attention as _Attention
from ._decoder import DecoderLM, MoEDecoderLayer, gqa_args


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
        a = gqa_args(cls, cfg, "num_experts", "num_local_experts")
        if a.num_attention_heads * a.head_dim != a.hidden_size:
            raise UnsupportedModelError("olmoe with num_attention_heads * head_dim != hidden_size is not supported")
        return a

    def is_sparse(self, i: int) -> bool:
        return True  # every OLMoE layer routes


class Attention(_Attention):
    """RMSNorm over the full q and k projections (not per head), then optional clip_qkv."""

    def __init__(self, a: ModelArgs):
        super().__init__(a, qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="full", clip=a.clip_qkv)



class DecoderLayer(MoEDecoderLayer):
    attention_cls = Attention


class Model(DecoderLM):
    layer_cls = DecoderLayer
