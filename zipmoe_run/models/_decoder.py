"""The decoder-only skeleton the qwen2_moe, qwen3_moe, olmoe and mixtral files share.

A family file defines its ModelArgs, attention, MoE block and ``DecoderLayer(args, layer, source)``
(``forward(x, cos, sin, mask, cache, start_pos)``), then ``class Model(DecoderLM)`` with
``layer_cls = DecoderLayer``; it overrides ``weight_names`` or ``masks`` where the family differs.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import single_row_scope
from ..lookahead import link_lookahead
from ..layers import KVCache, Linear, RMSNorm, RotaryEmbedding, bind_weights, causal_mask, rope_inv_freq
from ..source import WeightSource


class Backbone(nn.Module):
    def __init__(self, a, layer_cls, source: WeightSource):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(layer_cls(a, i, source) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class DecoderLM(nn.Module):
    layer_cls: type[nn.Module]

    def __init__(self, args, source: WeightSource, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.args, self.dtype = args, dtype
        with torch.device("meta"):
            self.model = Backbone(args, self.layer_cls, source)
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(*rope_inv_freq(args.rope, args.head_dim, args.max_position_embeddings))
        bind_weights(self, source, dtype, self.weight_names)
        self.source = source

    def set_lookahead(self, enabled: bool) -> int:
        """Router lookahead prefetch (zipmoe_run.lookahead) on or off; returns the layers that use it."""
        return link_lookahead(self.model.layers, self.source, enabled)

    def weight_names(self, name: str) -> list[str]:
        """Checkpoint spellings of a parameter, in order of preference (the LM head may be tied)."""
        if name == "lm_head.weight" and self.args.tie_word_embeddings:
            return ["model.embed_tokens.weight"]
        return [name]

    def masks(self, t: int, start_pos: int, dtype: torch.dtype):
        """What each layer's attention receives as its mask."""
        return causal_mask(t, start_pos, dtype, getattr(self.args, "sliding_window", None))

    @property
    def max_context(self) -> int:
        return self.args.max_position_embeddings

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, batch, max_len, a.num_key_value_heads, a.head_dim, None, self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.LongTensor, cache: KVCache, start_pos: int, last_only: bool = False):
        with single_row_scope(input_ids.numel() == 1 and self.dtype is torch.bfloat16):
            t = input_ids.shape[1]
            h = self.model.embed_tokens(input_ids)  # [B, T, H]
            cos, sin = self.rope(torch.arange(start_pos, start_pos + t), h.dtype)  # [T, D]
            mask = self.masks(t, start_pos, h.dtype)
            for layer in self.model.layers:
                h = layer(h, cos, sin, mask, cache, start_pos)
            h = self.model.norm(h[:, -1:] if last_only else h)
            return self.lm_head(h).float()  # [B, T, V]
