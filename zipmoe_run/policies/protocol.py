"""The policy protocol: which tier a fetched expert stays in, and what to demote for room.

A policy is plain Python: no torch, no I/O, no buffers, no import of the store. It sees the store
(or a simulator) through ``ResidencyView`` and answers three questions:

* ``on_access(key, tier, now)``: an expert was requested while held in ``tier`` (``now`` counts
  fetch calls);
* ``placement(key, res)``: the expert was just fetched (its decoded buffer and its extent bytes are
  both in hand): which tier should it stay in? (``Tier.COLD``: drop it);
* ``victim(res, pinned)``: memory is needed: which resident expert should move down, and to which
  tier (one of ``tiers.DEMOTIONS[its tier]``)? ``None`` when nothing can move.

The store applies the answers, charges the ledger and keeps the budget; the benchmark-side
simulator (``zipmoe.bench.sim``) drives the same objects with ``ExpertInfo`` sizes and a recorded
routing trace, without weights.

Policies (:func:`make_policy` names): ``zipmoe`` (the default, :mod:`.zipmoe`), ``density``
(:mod:`.density`) and ``lru`` (:mod:`.lru`).
"""
from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol, runtime_checkable

from zipmoe_run.tiers import CostModel, ExpertInfo, Tier

__all__ = ["ResidencyView", "Policy", "fits", "make_policy", "POLICIES", "DEFAULT_POLICY"]

POLICIES = ("zipmoe", "density", "lru")
DEFAULT_POLICY = "zipmoe"


@runtime_checkable
class ResidencyView(Protocol):
    capacity: int | None  # bytes; None = unlimited
    now: int

    def info(self, key) -> ExpertInfo: ...

    def tier_of(self, key) -> Tier: ...

    def resident(self) -> Iterable[tuple[object, Tier]]:
        """(key, tier) of every expert held in FULL, COMP or SM and not being fetched right now."""

    @property
    def resident_bytes(self) -> int: ...

    @property
    def reserve(self) -> int:
        """Bytes to keep free for the staging of the next cold fetch."""


@runtime_checkable
class Policy(Protocol):
    name: str

    def on_access(self, key, tier: Tier, now: int) -> None: ...

    def placement(self, key, res: ResidencyView) -> Tier: ...

    def victim(self, res: ResidencyView, pinned: Collection) -> tuple[object, Tier] | None: ...


def fits(res: ResidencyView, extra: int) -> bool:
    return res.capacity is None or res.resident_bytes + extra + res.reserve <= res.capacity


def make_policy(policy: str | Policy | None, cost: CostModel | None = None) -> Policy:
    """The one policy factory: a name of :data:`POLICIES` (``None``: :data:`DEFAULT_POLICY`) with the
    store's cost model, or an object implementing :class:`Policy`, returned as is."""
    if policy is None:
        policy = DEFAULT_POLICY
    if isinstance(policy, str):
        cost = cost if cost is not None else CostModel()
        if policy == "zipmoe":  # score + tier shares from the planner
            from .zipmoe import ZipMoEPolicy

            return ZipMoEPolicy(cost)
        if policy == "density":
            from .density import DensityPolicy

            return DensityPolicy(cost)
        if policy == "lru":
            from .lru import LRUPolicy

            return LRUPolicy()
        raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a name or implement the Policy protocol, not {type(policy).__name__}")
    return policy
