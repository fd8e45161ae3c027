"""Qwen3-MoE: GQA attention with per-head RMSNorm on q and k and an explicit head_dim; routed experts only.

Semantics follow transformers' modeling_qwen3_moe.py (float32 softmax router, optional top-k
renormalisation, dense MLP on ``mlp_only_layers`` and off the ``decoder_sparse_step`` grid, one
sliding window for every layer when ``use_sliding_window``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ._decoder import Attention as _Attention
from ._decoder import DecoderLM, MoEDecoderLayer, gqa_args


@dataclass
class ModelArgs:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = False
    mlp_only_layers: list[int] = field(default_factory=list)
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        a = gqa_args(cls, cfg, "num_experts", "num_local_experts")
        a.mlp_only_layers = list(a.mlp_only_layers or [])
        if not a.use_sliding_window:
            a.sliding_window = None
        return a

    def is_sparse(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0


class Attention(_Attention):
    """RMSNorm per head on q and k; ``attention_bias`` on every projection."""

    def __init__(self, a: ModelArgs):
        super().__init__(a, qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="head")



class DecoderLayer(MoEDecoderLayer):
    attention_cls = Attention


class Model(DecoderLM):
    layer_cls = DecoderLayer
