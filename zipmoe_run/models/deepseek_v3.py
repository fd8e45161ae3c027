"""DeepSeek-V3 / R1: DeepSeek-V2's MLA and shared experts with sigmoid, bias-corrected group routing.

Routing follows transformers' modeling_deepseek_v3.py (``noaux_tc``): scores = sigmoid(logits);
experts are chosen on scores + e_score_correction_bias within the topk_group groups whose two best
corrected scores sum highest; weights are the uncorrected scores of the chosen experts, renormalised
when norm_topk_prob (at any top_k, as transformers does) and times routed_scaling_factor.
RoPE rotates interleaved pairs in the model dtype (rope_interleave, the default) or rotate_half.
Multi-token-prediction layers (index >= num_hidden_layers) are ignored. FP8 checkpoints (the
published V3/R1 weights) are rejected: dequantize them to BF16 first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import deepseek_v2


@dataclass
class ModelArgs(deepseek_v2.ModelArgs):
    FAMILY: ClassVar[str] = "deepseek_v3"
    ROUTING: ClassVar[tuple[str, ...]] = ("noaux_tc",)
    SCORING: ClassVar[str] = "sigmoid"
    ROPE_MODE: ClassVar[str] = "pairs"

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    max_position_embeddings: int = 4096
    first_k_dense_replace: int = 3
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    moe_intermediate_size: int = 2048
    num_experts_per_tok: int | None = 8
    topk_method: str | None = "noaux_tc"
    scoring_func: str | None = "sigmoid"
    n_group: int | None = 8
    topk_group: int | None = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        a = super().from_dict(cfg)
        a.mlp_bias = False  # V3's MLPs never have biases
        return a

    def validate(self) -> None:
        super().validate()
        if any(self.is_sparse(i) for i in range(self.num_hidden_layers)):
            g, _ = self.groups()
            if self.n_routed_experts // g < 2:
                self._reject(f"n_group={g} leaves fewer than 2 experts per group (noaux_tc sums the top 2)")


Model = deepseek_v2.Model  # what differs (routing, RoPE layout) is in ModelArgs
