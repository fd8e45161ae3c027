"""Routing replay: a model's routed experts taken from a plan instead of its routers (benchmarks).

A *plan* is an integer array ``[positions, layers, k]``: the experts token position ``p`` of the sequence
uses in MoE layer ``l`` (model layer ``l``: layer ``l`` of a trace drives layer ``l`` of the model).
:func:`install_replay` makes a decoder model (``models._decoder.DecoderLM``) route by the plan:

* each MoE block's ``route`` (a bound method of our own ``RoutedMoE`` class) is shadowed by an instance
  attribute set on that module object, a function returning the plan's experts for the rows being
  routed. Nothing of a library is patched; :func:`uninstall_replay` deletes the attributes again;
* the model's ``forward`` (and ``decode_step``) is shadowed the same way by a wrapper that tells the
  plan which sequence positions the rows of the coming routes are (``start_pos .. start_pos + T`` for
  each of the ``B`` sequences; the positions given to ``decode_step``), then calls the original.

Routes are keyed by position, not by call count, so a second generation from position 0 replays the
same choices, and a router lookahead (``zipmoe_run.lookahead``) that applies the next layer's ``route``
gets the next layer's replayed experts: an oracle, not a guess; benchmarks leave lookahead out of
replayed runs.

Top-k weights (``weights="router"``, the default): the router still runs; its float32 softmax
probabilities are taken at the replayed experts (renormalised to sum to 1 when the block's
``norm_topk`` is set) and cast as the block casts them, so the routed sum stays a weighted sum of the
experts' outputs as the router weighs them. ``weights="uniform"``: 1/k each. Blocks that are not a
softmax top-k ``RoutedMoE`` (DeepSeek's grouped router) get uniform weights; :attr:`ReplayPlan.weights_used`
says which blocks got which.

A route outside a replayed forward, a position beyond the plan, or an expert id the block does not
have raises ``GenerationError`` (one line).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from .errors import GenerationError

__all__ = ["ReplayPlan", "install_replay", "uninstall_replay", "WEIGHT_MODES"]

log = logging.getLogger(__name__)

WEIGHT_MODES = ("router", "uniform")


class ReplayPlan:
    """Replayed expert choices ``[positions, layers, k]`` and the positions of the rows being routed."""

    def __init__(self, choices, weights: str = "router", label: str = "replayed routing"):
        arr = np.asarray(choices)
        if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
            raise GenerationError(f"routing replay: expected integer choices [positions, layers, k], got "
                                  f"{arr.dtype} {arr.shape}")
        if arr.size and arr.min() < 0:
            raise GenerationError("routing replay: negative expert id in the plan")
        if weights not in WEIGHT_MODES:
            raise GenerationError(f"routing replay: weights must be one of {', '.join(WEIGHT_MODES)}, not {weights!r}")
        self.choices = torch.from_numpy(arr.astype(np.int64))  # [P, L, K]
        self.weights, self.label = weights, label
        self.rows: torch.Tensor | None = None  # [N] positions of the rows the next routes see
        self.per_seq = 1  # rows per sequence in ``rows`` (T of a forward [B, T])
        self.weights_used: dict[int, str] = {}

    @property
    def positions(self) -> int:
        return int(self.choices.shape[0])

    @property
    def layers(self) -> int:
        return int(self.choices.shape[1])

    @property
    def k(self) -> int:
        return int(self.choices.shape[2])

    def set_rows(self, positions: torch.Tensor, per_seq: int = 1) -> None:
        """The positions of the rows routed next ([B * T], sequence by sequence, ``per_seq`` = T each)."""
        self.rows = positions.to(torch.int64).reshape(-1)
        self.per_seq = max(1, int(per_seq))

    def experts(self, layer: int, n: int) -> torch.Tensor:
        """The replayed experts of the ``n`` rows being routed in ``layer``: [n, K] int64. ``n`` may also be
        one row per sequence: the last layer of a forward that wants only the last logits routes each
        sequence's last position alone (``MoEDecoderLayer.forward``'s ``last_only``)."""
        rows = self.rows
        if rows is not None and rows.numel() != n and self.per_seq > 1 and n * self.per_seq == rows.numel():
            rows = rows.view(n, self.per_seq)[:, -1]  # [B]: each sequence's last position
        if rows is None or rows.numel() != n:
            raise GenerationError(f"routing replay: layer {layer} routed {n} rows outside a replayed forward "
                                  f"({0 if rows is None else rows.numel()} positions set)")
        if n and int(rows.max()) >= self.positions:
            raise GenerationError(f"routing replay: position {int(rows.max())} is beyond the plan's "
                                  f"{self.positions} positions")
        return self.choices[rows, layer]  # [n, K]


def _replay_route(block, layer: int, plan: ReplayPlan, mode: str):
    def route(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flat [N, H] -> (weights [N, K], replayed expert ids [N, K] int64)."""
        ids = plan.experts(layer, flat.shape[0])  # [N, K]
        if mode == "uniform":
            return torch.full(ids.shape, 1.0 / ids.shape[1], dtype=flat.dtype), ids
        logits = block.gate(flat)  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # [N, E] float32
        w = probs.gather(1, ids)  # [N, K]
        if block.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return (w if block.keep_float32 else w.to(logits.dtype)), ids

    return route


def _layers(model) -> Sequence:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or getattr(model, "is_encoder_decoder", False):
        raise GenerationError(f"routing replay: {type(model).__module__} is not a decoder-only model of this runtime")
    return layers


def install_replay(model, plan: ReplayPlan) -> int:
    """Route ``model``'s MoE layers by ``plan`` (module doc); returns the number of layers replayed.

    Refused (``GenerationError``, one line) when the model has more layers than the plan, when the
    plan's k is not the model's top-k, or when the plan names an expert a layer does not have."""
    from .models._decoder import RoutedMoE

    layers = _layers(model)
    if len(layers) > plan.layers:
        raise GenerationError(f"routing replay: the model has {len(layers)} layers, the trace only {plan.layers}")
    done = 0
    for layer in layers:
        block = layer.moe
        if block is None:
            continue
        top_k = getattr(block, "top_k", plan.k)
        if top_k != plan.k:
            raise GenerationError(f"routing replay: layer {layer.layer} routes top-{top_k}, the trace top-{plan.k}")
        n_exp = block.gate.out_features if hasattr(block, "gate") and hasattr(block.gate, "out_features") else None
        if n_exp is not None and plan.positions and int(plan.choices[:, layer.layer].max()) >= n_exp:
            raise GenerationError(f"routing replay: the trace names expert {int(plan.choices[:, layer.layer].max())} "
                                  f"in layer {layer.layer}, which has {n_exp} experts")
        mode = plan.weights if isinstance(block, RoutedMoE) else "uniform"
        block.route = _replay_route(block, layer.layer, plan, mode)  # instance attribute shadows the method
        plan.weights_used[layer.layer] = mode
        done += 1
    fwd, step = model.forward, getattr(model, "decode_step", None)

    def forward(input_ids, cache, start_pos, *args, **kwargs):
        b, t = input_ids.shape
        plan.set_rows(torch.arange(start_pos, start_pos + t).repeat(b), t)  # [B * T], row order of flat [N, H]
        return fwd(input_ids, cache, start_pos, *args, **kwargs)

    model.forward = forward
    if step is not None:
        def decode_step(token_ids, caches, positions):
            plan.set_rows(torch.tensor([int(p) for p in positions]))
            return step(token_ids, caches, positions)

        model.decode_step = decode_step
    model.routing_replay = plan
    log.info("routing replay: %d layers route by a plan of %d positions (%s weights)", done, plan.positions,
             plan.weights)
    return done


def uninstall_replay(model) -> None:
    """Undo :func:`install_replay` (the class's methods are visible again)."""
    for layer in _layers(model):
        block = layer.moe if hasattr(layer, "moe") else None
        if block is not None:
            block.__dict__.pop("route", None)
    for name in ("forward", "decode_step", "routing_replay"):
        model.__dict__.pop(name, None)
