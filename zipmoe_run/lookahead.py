"""Router lookahead: guess the next MoE layer's experts from the current hidden state, and prefetch them.

While layer L's experts compute, the residual stream ``h`` (after L's attention) is already a good
estimate of what layer L+1's router will see (h plus L's MoE and L+1's attention outputs). The
lookahead applies layer L+1's own normalisation and router to ``h`` and asks the source to prefetch
the top-k experts it picks (``prefetch(..., speculative=True)``: bounded by the store, never
evicting what the open fetch uses; specs/runtime.md section 5.5). Single-token steps only (decode):
a prefill batch needs most experts anyway. The last MoE layer has no lookahead (the next token's
first layer depends on a token not yet sampled).

A family opts in by giving its decoder layer:

* a ``moe`` accessor: the layer's routed-expert block, or None on a dense layer (the block's attribute
  name is the checkpoint's spelling, ``mlp`` or Mixtral's ``block_sparse_moe``, so it is not looked up
  by name); the block has ``route(x [N, H]) -> (weights [N, K], ids [N, K])``;
* ``post_attention_layernorm`` (the norm in front of the block) and ``layer`` (its index in the source);
* a ``lookahead`` attribute it calls as ``hook = self.lookahead(h)`` (None when off) and passes to its
  block as ``after_open``.

Only consecutive MoE layers are linked: a layer whose next layer is dense (or which is dense itself)
gets no lookahead.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Lookahead", "link_lookahead", "moe_block"]


class Lookahead:
    def __init__(self, source, norm: nn.Module, block: nn.Module, layer: int, stack: str | None = None):
        self.source, self.norm, self.block, self.layer, self.stack = source, norm, block, layer, stack

    def __call__(self, h: torch.Tensor) -> Callable[[], None] | None:
        """A callable that prefetches the next layer's guessed experts for h [B, T, H], or None."""
        if h.shape[0] * h.shape[1] != 1:
            return None

        def fire() -> None:
            _, ids = self.block.route(self.norm(h).view(-1, h.shape[-1]))  # [1, K]
            self.source.prefetch(self.layer, ids.view(-1).tolist(), self.stack, speculative=True)

        return fire


def moe_block(layer: nn.Module) -> nn.Module | None:
    """A decoder layer's routed-expert block (its ``moe`` accessor) if it can route, else None."""
    block = getattr(layer, "moe", None)
    return block if hasattr(block, "route") else None


def link_lookahead(layers: nn.ModuleList, source, enabled: bool) -> int:
    """Give each MoE decoder layer whose next layer is also MoE a ``lookahead`` (others None); returns how many."""
    n = 0
    can = enabled and hasattr(source, "prefetch")
    for i, layer in enumerate(layers):
        if not hasattr(layer, "lookahead"):
            continue
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        ok = can and nxt is not None and moe_block(layer) is not None and moe_block(nxt) is not None
        layer.lookahead = Lookahead(source, nxt.post_attention_layernorm, moe_block(nxt), nxt.layer) if ok else None
        n += ok
    return n
