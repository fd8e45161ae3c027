"""Placement and eviction policies: which tier a fetched expert stays in, and what to demote for room.

A policy is plain Python: no torch, no I/O, no buffers. It sees the store (or a simulator) through
``ResidencyView`` and answers three questions:

* ``on_access(key, tier, now)``: an expert was requested while held in ``tier`` (``now`` counts
  fetch calls);
* ``placement(key, res)``: the expert was just fetched (its decoded buffer and its extent bytes are
  both in hand): which tier should it stay in? (``Tier.COLD``: drop it);
* ``victim(res, pinned)``: memory is needed: which resident expert should move down, and to which
  tier (one of ``tiers.DEMOTIONS[its tier]``)? ``None`` when nothing can move.

The store applies the answers, charges the ledger and keeps the budget; a trace-replay simulator can
drive the same objects with ``ExpertInfo`` sizes and a recorded routing trace, without weights.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol, runtime_checkable

from .tiers import DEMOTIONS, CostModel, ExpertInfo, Tier

__all__ = ["ResidencyView", "Policy", "DensityPolicy", "LRUPolicy", "make_policy", "POLICIES", "HULL_TIE"]

HULL_TIE = 0.02  # a tier within 2 % of the hull chord counts as on the hull


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


def _fits(res: ResidencyView, extra: int) -> bool:
    return res.capacity is None or res.resident_bytes + extra + res.reserve <= res.capacity


class DensityPolicy:
    """Keep the bytes that save the most fetch time per byte (a multiple-choice knapsack, greedily).

    Each expert has a decayed access count ``f`` (half-life ``half_life`` fetch calls). Holding it
    in tier ``t`` saves ``f * cost.saving(info, t)`` seconds per future access window. Per expert,
    the tiers on the upper concave hull of (bytes, saving) are the useful ones (a tier below the
    hull is never worth its bytes); the *score* of an expert held in ``t`` is ``f`` times the
    saving per byte of its last hull step (from the tier below ``t`` up to ``t``).

    * victim: the resident, unpinned expert with the lowest score moves one hull step down;
    * placement: the highest hull tier that fits without displacing anyone (keeping ``reserve``
      free), else the highest whose score beats the current lowest resident score, else COLD.

    The cost model's ``read_share`` makes the choice follow the bottleneck: when reads dominate,
    SM/COMP (which remove most of the read) win per byte; when decoding dominates, only FULL helps.
    """

    name = "density"

    def __init__(self, cost: CostModel | None = None, half_life: float = 64.0, tie: float = HULL_TIE):
        self.cost = cost if cost is not None else CostModel()
        self.half_life = float(half_life)
        self.tie = float(tie)
        self._f: dict[object, tuple[float, int]] = {}

    # -- frequency --------------------------------------------------------------------------------
    def freq(self, key, now: int) -> float:
        v = self._f.get(key)
        if v is None:
            return 0.0
        f, t = v
        return f * 0.5 ** ((now - t) / self.half_life)

    def on_access(self, key, tier: Tier, now: int) -> None:
        self._f[key] = (self.freq(key, now) + 1.0, now)

    # -- hull -------------------------------------------------------------------------------------
    def hull(self, info: ExpertInfo) -> list[Tier]:
        """Tiers on the upper concave hull of (bytes, saving), ascending, starting with COLD."""
        pts = sorted(((info.bytes(t), self.cost.saving(info, t), t) for t in info.tiers), key=lambda p: (p[0], -p[1]))
        out: list[tuple[int, float, Tier]] = []
        for p in pts:
            if out and p[1] <= out[-1][1]:  # more bytes, no more saving: dominated
                continue
            while len(out) >= 2:
                (x1, y1, _), (x2, y2, _) = out[-2], out[-1]
                # drop the middle point when it lies below the segment p1 -> p; within `tie` of it
                # (SM and COMP are collinear when reads dominate) it stays: finer steps pack better
                if (y2 - y1) * (p[0] - x1) < (1.0 - self.tie) * (p[1] - y1) * (x2 - x1):
                    out.pop()
                else:
                    break
            out.append(p)
        return [p[2] for p in out]

    def _down(self, info: ExpertInfo, t: Tier, hull: list[Tier]) -> Tier:
        below = [x for x in hull if x < t and x in DEMOTIONS[t]]
        return max(below) if below else Tier.COLD

    def score(self, key, info: ExpertInfo, t: Tier, now: int, hull: list[Tier] | None = None) -> float:
        """``f`` times the saving per byte of the cheapest hull step up to ``t`` (the top step on a
        concave hull; the lowest one when near-collinear tiers were kept)."""
        hull = hull if hull is not None else self.hull(info)
        down = self._down(info, t, hull)
        steps = [x for x in hull if x < t] + [t]
        dens = []
        for lo, hi in zip(steps, steps[1:]):
            db = info.bytes(hi) - info.bytes(lo)
            dens.append((self.cost.saving(info, hi) - self.cost.saving(info, lo)) / max(db, 1))
        if down not in steps[:-1]:  # demoting past several steps at once: their average
            dens.append((self.cost.saving(info, t) - self.cost.saving(info, down))
                        / max(info.bytes(t) - info.bytes(down), 1))
        return self.freq(key, now) * (min(dens) if dens else 0.0)

    def victim(self, res: ResidencyView, pinned: Collection) -> tuple[object, Tier] | None:
        best = None
        for key, t in res.resident():
            if key in pinned:
                continue
            info = res.info(key)
            hull = self.hull(info)
            s = (self.score(key, info, t, res.now, hull), -int(t))  # ties: move the higher tier first
            if best is None or s < best[0]:
                best = (s, key, self._down(info, t, hull))
        return None if best is None else (best[1], best[2])

    def _min_score(self, res: ResidencyView, exclude) -> float | None:
        lo = None
        for key, t in res.resident():
            if key == exclude:
                continue
            s = self.score(key, res.info(key), t, res.now)
            lo = s if lo is None or s < lo else lo
        return lo

    def placement(self, key, res: ResidencyView) -> Tier:
        info = res.info(key)
        hull = self.hull(info)
        lowest = None
        for t in reversed(hull):
            if t == Tier.COLD:
                return Tier.COLD
            if _fits(res, info.bytes(t)):
                return t
            if lowest is None:
                lowest = self._min_score(res, key)
            if lowest is not None and self.score(key, info, t, res.now, hull) > lowest:
                return t
        return Tier.COLD


class LRUPolicy:
    """Plain least-recently-used over decoded experts: keep everything FULL, evict the oldest to COLD.

    The reference point (and what a runtime without tiers does)."""

    name = "lru"

    def __init__(self) -> None:
        self._seen: dict[object, tuple[int, int]] = {}
        self._seq = 0

    def on_access(self, key, tier: Tier, now: int) -> None:
        self._seq += 1
        self._seen[key] = (now, self._seq)

    def placement(self, key, res: ResidencyView) -> Tier:
        return Tier.FULL

    def victim(self, res: ResidencyView, pinned: Collection) -> tuple[object, Tier] | None:
        best = None
        for key, t in res.resident():
            if key in pinned:
                continue
            seen = self._seen.get(key, (-1, -1))
            if best is None or seen < best[0]:
                best = (seen, key)
        return None if best is None else (best[1], Tier.COLD)


POLICIES = {"density": DensityPolicy, "lru": LRUPolicy}


def make_policy(policy: str | Policy | None, cost: CostModel) -> Policy:
    if policy is None or policy == "zipmoe":  # default: score + tier shares from the planner (section 10)
        from zipmoe_run.policies.store_policy import ZipMoEStorePolicy

        return ZipMoEStorePolicy(cost)
    if policy == "density":
        return DensityPolicy(cost)
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} (known: {', '.join([*POLICIES, 'zipmoe'])})")
        return POLICIES[policy]()
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a name or implement the Policy protocol, not {type(policy).__name__}")
    return policy
