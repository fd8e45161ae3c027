"""Mixtral: GQA attention without biases; every layer routes to experts w1/w3/w2 (SwiGLU).

Semantics follow transformers' modeling_mixtral.py: float32 softmax router whose top-k
probabilities are always renormalised and stay float32, optional sliding window on every layer.
Both checkpoint spellings are read: ``block_sparse_moe.*`` (original) and ``mlp.*`` (transformers 5).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..source import WeightSource
from ._decoder import Attention as _Attention
from ._decoder import DecoderLM, MoEDecoderLayer, RoutedMoE, gqa_args


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # per expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    num_experts_per_tok: int = 2
    num_local_experts: int = 8
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        return gqa_args(cls, cfg, "num_local_experts", "num_experts", default_theta=1e6)

    def is_sparse(self, i: int) -> bool:
        return True  # every Mixtral layer routes


class Attention(_Attention):
    """No biases."""

    def __init__(self, a: ModelArgs):
        super().__init__(a)



class SparseMoeBlock(RoutedMoE):
    """transformers' MixtralTopKRouter: the top-k probabilities are always renormalised and stay float32."""

    keep_float32 = True

    def __init__(self, a: ModelArgs, layer: int, source: WeightSource):
        super().__init__(a, layer, source, n_experts=a.num_local_experts, norm_topk=True)


class DecoderLayer(MoEDecoderLayer):
    attention_cls = Attention
    moe_cls = SparseMoeBlock
    block_name = "block_sparse_moe"  # the original checkpoint spelling; Model.weight_names also reads mlp.*


class Model(DecoderLM):
    layer_cls = DecoderLayer

    def weight_names(self, name: str) -> list[str]:
        names = super().weight_names(name)
        return names if names != [name] else [name, name.replace(".block_sparse_moe.", ".mlp.")]
