"""Qwen1.5-MoE / Qwen2-MoE: GQA attention with qkv bias, routed experts plus a sigmoid-gated shared expert.

Semantics follow transformers' modeling_qwen2_moe.py: softmax router in float32, optional
renormalisation of the top-k probabilities (norm_topk_prob), sparse layers every
``decoder_sparse_step`` except ``mlp_only_layers``, optional sliding-window layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layers import Linear, causal_mask, announce, moe_forward
from ..source import WeightSource
from ._decoder import Attention as _Attention
from ._decoder import MLP, DecoderLM, MoEDecoderLayer, RoutedMoE, gqa_args


@dataclass
class ModelArgs:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    num_experts_per_tok: int = 4
    num_experts: int = 60
    norm_topk_prob: bool = False
    mlp_only_layers: list[int] = field(default_factory=list)
    qkv_bias: bool = True
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        a = gqa_args(cls, cfg, "num_experts", "num_local_experts")
        a.mlp_only_layers = list(a.mlp_only_layers or [])
        if a.layer_types is None:
            a.layer_types = [
                "sliding_attention"
                if (i + 1) % 2 and i < a.max_window_layers and a.use_sliding_window
                else "full_attention"
                for i in range(a.num_hidden_layers)
            ]
        return a

    def is_sparse(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    def window(self, i: int) -> int | None:
        if self.layer_types[i] == "sliding_attention" and self.use_sliding_window:
            return self.sliding_window or None
        return None


class Attention(_Attention):
    """Biases on q, k and v (``qkv_bias``), none on the output."""

    def __init__(self, a: ModelArgs):
        super().__init__(a, qkv_bias=a.qkv_bias)



class SparseMoeBlock(RoutedMoE):
    """Routed experts plus a sigmoid-gated shared expert.

    Order: route, announce the layer's experts (the missing ones are read while the shared expert
    computes), shared expert, routed experts; the sum is routed + gate * shared, as transformers adds.
    """

    def __init__(self, a: ModelArgs, layer: int, source: WeightSource):
        super().__init__(a, layer, source)
        self.shared_expert = MLP(a.hidden_size, a.shared_expert_intermediate_size, a.hidden_act)
        self.shared_expert_gate = Linear(a.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, after_open=None) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.view(-1, h)  # [N, H]
        top_w, top_i = self.route(flat)  # [N, K]
        announce(self.source, self.layer, top_i)  # the missing experts are read during the shared expert
        shared = self.shared_expert(flat)  # [N, H]
        out = moe_forward(flat, top_i, top_w, self.source, self.layer, None, self._expert, after_open)
        out = out + F.sigmoid(self.shared_expert_gate(flat)) * shared
        return out.view(b, t, h)


class DecoderLayer(MoEDecoderLayer):
    """Each layer attends with the mask of its own sliding window (None: full attention)."""

    attention_cls = Attention
    moe_cls = SparseMoeBlock

    def __init__(self, a: ModelArgs, layer: int, source: WeightSource):
        super().__init__(a, layer, source)
        self.window = a.window(layer)

    def attention_mask(self, masks):
        return masks[self.window]


class Model(DecoderLM):
    """Layers may have different sliding windows: each gets the mask of its own window."""

    layer_cls = DecoderLayer

    def __init__(self, args: ModelArgs, source: WeightSource, dtype: torch.dtype = torch.bfloat16):
        super().__init__(args, source, dtype)
        self.windows = sorted({layer.window for layer in self.model.layers}, key=lambda w: w or 0)

    def masks(self, t: int, start_pos: int, dtype: torch.dtype):
        return {w: causal_mask(t, start_pos, dtype, w) for w in self.windows}
