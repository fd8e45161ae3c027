"""Router lookahead: guess the next MoE layer's experts from the current hidden state, and prefetch them.

While layer L's experts compute, the residual stream ``h`` (after L's attention) is already a good
estimate of what layer L+1's router will see (h plus L's MoE and L+1's attention outputs). The
lookahead applies layer L+1's own normalisation and router to ``h`` and asks the source to prefetch
the top-k experts it picks (``prefetch(..., speculative=True)``: bounded by the store, never
evicting what the open fetch uses; specs/runtime.md section 5.5). Single-token steps only (decode):
a prefill batch needs most experts anyway. The last MoE layer has no lookahead (the next token's
first layer depends on a token not yet sampled).

A family opts in by giving its MoE block ``route(x [N, H]) -> (weights [N, K], ids [N, K])`` and its
decoder layer a ``lookahead`` attribute it calls as ``hook = self.lookahead(h)`` (None when off).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Lookahead", "link_lookahead"]


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


def link_lookahead(layers: nn.ModuleList, source, enabled: bool) -> int:
    """Give each decoder layer whose next layer routes a ``lookahead`` (or None); returns how many."""
    n = 0
    can = enabled and hasattr(source, "prefetch")
    for i, layer in enumerate(layers):
        if not hasattr(layer, "lookahead"):
            continue
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        ok = (can and nxt is not None and hasattr(layer.mlp, "route") and hasattr(nxt.mlp, "route"))
        layer.lookahead = Lookahead(source, nxt.post_attention_layernorm, nxt.mlp, nxt.layer) if ok else None
        n += ok
    return n
