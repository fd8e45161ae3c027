"""Tier planner: how to split a memory budget across FULL / COMP / SM slots (:class:`Split`).

Model (the ZipMoE paper's delay model, generalised to three tiers; assumptions in
specs/runtime.md):

* Activation statistics are ``rank_probs[l, r]``: the probability that a token uses, in layer
  ``l``, the expert that was ``r``-th (0 = first) by the policy's online score just before the
  access (``sum_r rank_probs[l, r] = k``). They come from a running policy (the ``zipmoe`` policy's
  rank histogram) or from a trace (the simulator's ``zipmoe.bench.sim.stats``); without any,
  routing is taken as uniform.
* The cache is assumed to hold the best-ranked experts: with one pool for all layers, the
  (layer, rank) pairs in decreasing probability go to FULL slots first, then COMP, then SM;
  with per-layer pools (the paper's layout) each layer's best ranks do.
* The k accesses of a layer are independent draws over the tiers with the probabilities of their
  ranks (a multinomial), and the layer waits for the Johnson makespan of its non-FULL experts
  (``zipmoe_run.tiers.makespan``). The modelled time per token is the sum over layers; the planner returns the
  split (on a grid of ``step``) with the smallest one, except that a split with fewer tiers
  within :data:`PREFER_SIMPLE` of it wins.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from zipmoe_run.tiers import CostModel, Tier, TierSizes, makespan

__all__ = ["Split", "ActivationStats", "PlanResult", "expected_time", "plan", "splits", "PREFER_SIMPLE",
           "DEFAULT_ALPHA"]

#: weight of the all-time activation rate in the ``zipmoe`` score (request count + alpha x rate)
DEFAULT_ALPHA = 4.0

#: a split with fewer tiers is preferred unless a richer one is modelled this much faster: the
#: model is optimistic for mixed layouts (it lets FULL victims fall to COMP, which the store
#: cannot do without re-encoding; measured about 3 % on the shipped traces)
PREFER_SIMPLE = 0.02


@dataclass(frozen=True)
class Split:
    """Shares of the budget per tier (sum 1)."""

    full: float = 1.0
    compressed: float = 0.0
    sm: float = 0.0

    def __post_init__(self) -> None:
        vals = (self.full, self.compressed, self.sm)
        if any(v < 0 or not math.isfinite(v) for v in vals) or abs(sum(vals) - 1.0) > 1e-6:
            raise ValueError(f"tier shares must be >= 0 and sum to 1, got {vals}")

    def share(self, tier: int) -> float:
        return {Tier.FULL: self.full, Tier.COMP: self.compressed, Tier.SM: self.sm}.get(Tier(tier), 0.0)

    def as_dict(self) -> dict:
        return {"full": round(self.full, 4), "compressed": round(self.compressed, 4), "sm": round(self.sm, 4)}

    def __str__(self) -> str:
        return f"full {self.full:.0%} / compressed {self.compressed:.0%} / sm {self.sm:.0%}"


@dataclass(frozen=True)
class ActivationStats:
    rank_probs: np.ndarray  # [layers, experts], rows sum to k
    k: int
    tokens: float
    source: str = ""

    @property
    def layers(self) -> int:
        return int(self.rank_probs.shape[0])

    @property
    def experts(self) -> int:
        return int(self.rank_probs.shape[1])

    @classmethod
    def uniform(cls, layers: int, experts: int, k: int) -> "ActivationStats":
        return cls(np.full((layers, experts), k / experts), k, 0.0, "uniform (no statistics yet)")

    @classmethod
    def from_histogram(cls, hist: np.ndarray, k: int, tokens: float, source: str) -> "ActivationStats":
        hist = np.asarray(hist, dtype=np.float64)
        if tokens <= 0:
            return cls.uniform(hist.shape[0], hist.shape[1], k)
        return cls(hist / tokens, k, float(tokens), source)


@dataclass(frozen=True)
class PlanResult:
    split: Split
    seconds_per_token: float
    candidates: list  # (Split, seconds per token), best first
    stats_source: str
    assumptions: str = ("cache holds the best-ranked experts; accesses independent across a layer's "
                        "k draws; Johnson flow shop read->decode; compute, latency and contention "
                        "not modelled")

    def as_dict(self) -> dict:
        return {"split": self.split.as_dict(), "ms_per_token": round(1e3 * self.seconds_per_token, 4),
                "stats": self.stats_source, "assumptions": self.assumptions,
                "top": [{"split": s.as_dict(), "ms_per_token": round(1e3 * t, 4)} for s, t in self.candidates[:5]]}


def splits(tiers: tuple[int, ...] = (Tier.FULL, Tier.COMP, Tier.SM), step: float = 0.05,
           min_full: float = 0.0) -> list[Split]:
    """All shares on a grid of ``step`` over ``tiers`` (the others get 0)."""
    n = int(round(1 / step))
    out = []
    for combo in itertools.product(range(n + 1), repeat=len(tiers)):
        if sum(combo) != n:
            continue
        share = {Tier(t): c / n for t, c in zip(tiers, combo)}
        s = Split(share.get(Tier.FULL, 0.0), share.get(Tier.COMP, 0.0), share.get(Tier.SM, 0.0))
        if s.full + 1e-9 >= min_full:
            out.append(s)
    return out


@functools.lru_cache(maxsize=8)
def _makespan_table(k: int, a_sm: float, a_cold: float, b: float) -> np.ndarray:
    M = np.zeros((k + 1, k + 1, k + 1))
    for c in range(k + 1):
        for s in range(k + 1 - c):
            for z in range(k + 1 - c - s):
                M[c, s, z] = makespan(c, s, z, a_sm, a_cold, b)
    return M


@functools.lru_cache(maxsize=8)
def _outcomes(k: int) -> tuple[np.ndarray, ...]:
    """(hF, hC, hS, h0, multinomial coefficient) for k draws, as arrays over the outcomes."""
    out = []
    for f in range(k + 1):
        for c in range(k + 1 - f):
            for s in range(k + 1 - f - c):
                z = k - f - c - s
                coef = math.factorial(k) // (math.factorial(f) * math.factorial(c) * math.factorial(s)
                                             * math.factorial(z))
                out.append((f, c, s, z, float(coef)))
    f, c, s, z, coef = (np.array(col) for col in zip(*out))
    return f.astype(np.int64), c.astype(np.int64), s.astype(np.int64), z.astype(np.int64), coef


def _tier_probs(stats: ActivationStats, slots: dict, per_layer: bool) -> np.ndarray:
    """q[l, tier]: probability that one access of layer l is served from each tier (0 = COLD)."""
    pr = np.minimum(stats.rank_probs / stats.k, 1.0)
    L, E = pr.shape
    q = np.zeros((L, 4))
    order_tiers = (Tier.FULL, Tier.COMP, Tier.SM)
    if per_layer:
        for l in range(L):
            srt = np.sort(pr[l])[::-1]
            lo = 0
            for t in order_tiers:
                n = min(slots[t] // L, E - lo)
                q[l, t] = srt[lo:lo + n].sum()
                lo += n
    else:
        flat = pr.reshape(-1)
        idx = np.argsort(-flat, kind="stable")
        lo = 0
        for t in order_tiers:
            n = min(slots[t], flat.size - lo)
            sel = idx[lo:lo + n]
            np.add.at(q[:, t], sel // E, flat[sel])
            lo += n
    q[:, 0] = np.clip(1.0 - q[:, 1:].sum(axis=1), 0.0, 1.0)
    return q


def expected_time(stats: ActivationStats, split: Split, budget: int, sizes: TierSizes, cal: CostModel,
                  per_layer: bool = False) -> float:
    """Modelled seconds per token of the cache layout ``split`` (see the module docstring)."""
    k = stats.k
    t = cal.times(sizes)
    M = _makespan_table(k, t["read_sm"], t["read_cold"], t["decode"])
    slots = {tt: int(split.share(tt) * budget // sizes.resident(tt)) for tt in (Tier.FULL, Tier.COMP, Tier.SM)}
    if per_layer:
        L = stats.layers
        slots = {tt: L * int(split.share(tt) * (budget // L) // sizes.resident(tt)) for tt in slots}
    q = _tier_probs(stats, slots, per_layer)
    f, c, s, z, coef = _outcomes(k)
    p = (coef[:, None] * q[None, :, Tier.FULL] ** f[:, None] * q[None, :, Tier.COMP] ** c[:, None]
         * q[None, :, Tier.SM] ** s[:, None] * q[None, :, 0] ** z[:, None])  # [outcomes, L]
    return float(p.sum(axis=1) @ M[c, s, z])


def plan(stats: ActivationStats | None, budget: int, sizes: TierSizes, cal: CostModel, *,
         layers: int | None = None, experts: int | None = None, k: int | None = None,
         tiers: tuple[int, ...] = (Tier.FULL, Tier.COMP, Tier.SM), step: float = 0.05,
         min_full: float = 0.0, per_layer: bool = False, prefer_simple: float = PREFER_SIMPLE) -> PlanResult:
    """The split of ``budget`` minimising :func:`expected_time` on a grid; among the splits within
    ``prefer_simple`` (relative) of that minimum, the one with the fewest tiers (then the fastest).
    Without ``stats``, ``layers``, ``experts`` and ``k`` give uniform routing."""
    if stats is None:
        if layers is None or experts is None or k is None:
            raise ValueError("plan() needs statistics or layers, experts and k")
        stats = ActivationStats.uniform(layers, experts, k)
    cands = [(s, expected_time(stats, s, budget, sizes, cal, per_layer)) for s in splits(tiers, step, min_full)]
    if not cands:
        raise ValueError(f"no split on a {step} grid satisfies min_full={min_full}")
    cands.sort(key=lambda st: (round(st[1], 12), -st[0].full))
    best = cands[0][1]
    ok = [c for c in cands if c[1] <= best * (1.0 + prefer_simple) + 1e-15]
    pick = min(ok, key=lambda c: (sum(v > 0 for v in (c[0].full, c[0].compressed, c[0].sm)), round(c[1], 12)))
    return PlanResult(pick[0], pick[1], cands, stats.source)
