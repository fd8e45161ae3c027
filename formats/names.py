"""Which checkpoint tensors are routed experts: an explicit name table, one entry per family.

Everything that no template matches is dense (attention, norms, embeddings, routers, shared
experts). The table is the single place that knows Hugging Face tensor names; the archive index
records the parsed role, so readers never need it again.

A *per-expert* template names one expert's matrix (``{E}`` is in the name). A *fused* template names
a 3-D (or higher) tensor whose first dimension is the expert index; the packer cuts it into one
slice per expert and unpack glues the slices back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ExpertName", "TEMPLATES", "FAMILIES", "parse_expert_name"]


@dataclass(frozen=True)
class ExpertName:
    stack: str | None  # "encoder" / "decoder" for encoder-decoder models, else None
    layer: int  # block index within its stack
    expert: int | None  # None for a fused tensor (every expert at once, dimension 0)
    proj: str  # projection as named in the checkpoint: gate_proj, w1, wi, gate_up_proj, ...
    fused: bool


@dataclass(frozen=True)
class Template:
    families: tuple[str, ...]
    pattern: re.Pattern
    fused: bool


def _t(families: str, regex: str, fused: bool = False) -> Template:
    return Template(tuple(families.split()), re.compile(regex), fused)


TEMPLATES: tuple[Template, ...] = (
    # qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 (and FP8 scale_inv siblings of v3):
    # model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight
    _t(
        "qwen2_moe qwen3_moe olmoe deepseek_v2 deepseek_v3",
        r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\."
        r"(?P<proj>gate_proj|up_proj|down_proj)\.(?:weight|weight_scale_inv)",
    ),
    # mixtral, phimoe: model.layers.{L}.block_sparse_moe.experts.{E}.w{1,2,3}.weight
    _t(
        "mixtral phimoe",
        r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\."
        r"(?P<proj>w1|w2|w3)\.(?:weight|weight_scale_inv)",
    ),
    # switch_transformers: {encoder,decoder}.block.{L}.layer.{i}.mlp.experts.expert_{E}.{wi,wo}.weight
    # (gated variants: wi_0, wi_1)
    _t(
        "switch_transformers",
        r"(?P<stack>encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.\d+\.mlp\.experts\."
        r"expert_(?P<expert>\d+)\.(?P<proj>wi_0|wi_1|wi|wo)\.weight",
    ),
    # transformers 5 fused layouts (any decoder-only family above, mixtral included):
    # model.layers.{L}.{mlp,block_sparse_moe}.experts.gate_up_proj [E, 2I, H], .down_proj [E, H, I];
    # gpt-oss style MXFP4 siblings (_blocks, _scales) and biases are fused the same way.
    _t(
        "qwen2_moe qwen3_moe olmoe deepseek_v2 deepseek_v3 mixtral phimoe gpt_oss",
        r"model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\."
        r"(?P<proj>(?:gate_up_proj|down_proj|gate_proj|up_proj)(?:_blocks|_scales|_bias)?)",
        fused=True,
    ),
)

FAMILIES: tuple[str, ...] = tuple(sorted({f for t in TEMPLATES for f in t.families}))


def parse_expert_name(name: str) -> ExpertName | None:
    """Return the expert role of a tensor name, or None when the tensor is dense."""
    for t in TEMPLATES:
        m = t.pattern.fullmatch(name)
        if m is None:
            continue
        g = m.groupdict()
        proj = g["proj"]
        if name.endswith("weight_scale_inv"):
            proj += ".scale_inv"
        return ExpertName(
            stack=g.get("stack"),
            layer=int(g["layer"]),
            expert=None if t.fused else int(g["expert"]),
            proj=proj,
            fused=t.fused,
        )
    return None
