"""The simulator's policies: numba models of cache policies over slot pools, for replaying routing
traces fast (the runtime's policies are :mod:`zipmoe_run.policies`; ``lru`` and ``zipmoe`` here are
models of the runtime's, compared with them on traces in the tests; ``lfu``, ``paper`` and
``belady`` exist only here, for comparison).

The caller (:mod:`.simulate`, or a test) tells the policy which experts a layer needs; the policy
answers where each one was (:class:`Decision.found`: the tier it is served from) and how the
resident set changes (:class:`Decision.moves`). The policy owns the bookkeeping; the caller mirrors
it::

    pol = make_replay_policy("zipmoe", layers=24, experts=60, budget=8 << 30, sizes=TierSizes(17_301_504))
    pol.begin_request()                      # a new prompt (resets within-request popularity)
    d = pol.access(layer, [3, 17, 41, 59])   # d.found: [Tier.FULL, Tier.COLD, ...]
    for m in d.moves: ...                    # apply, in order (demotions and evictions come first)

Move semantics (one row per key, consolidated): ``new < old`` frees memory: COLD evicts, SM keeps
only the sign+mantissa planes (from FULL: split the weights; from COMP: drop the coded
exponents). ``new > old`` only happens to experts of the same ``access`` call: keep the form the
store just read or decoded (COMP: the extent bytes it read, or the resident SM planes plus
the exponents it read; FULL: the decoded weights). The resident bytes, ``sum(sizes.resident(t))``,
never exceed the budget after the moves are applied. Experts of the current call are never
evicted by that call (except by Belady, which has no store).

Policies (``make_replay_policy`` names):

* ``lru``, ``lfu``: one tier, FULL, the whole budget; always admit; evict the least recently /
  least frequently (all-time count, ties: least recent) used.
* ``paper``: the ZipMoE paper's cache (arXiv 2601.21198, its public prototype): per-layer pools
  of FULL and SM slots split by a planned ratio (full share >= 0.3); an expert found COLD is
  placed by its popularity rank within the current request (rank < full slots: FULL, < full + SM
  slots: SM, else only into a free slot); victims by token-weighted LFU slot counts (1 on
  admission, +1 per hit), evicted to COLD.
* ``zipmoe`` (this project's default): one pool for all layers with FULL / COMP / SM slots
  split by the tier planner; score p = accesses in the current request + ``alpha`` x all-time
  activation rate (a Dirichlet-style estimate of the next token's routing, learned online). An
  accessed expert moves up to the tier with the largest positive saving: ``p_x`` times its cost
  reduction, less ``p_v`` times the cost increase of the weakest resident it displaces (which
  drops to SM, displacing SM's weakest, if ``demote`` (the default) and that loses less, else to
  COLD); costs per access from each tier come from the cost model (``CostModel.tier_costs``).
* ``belady``: offline, needs each access's next use: MIN with bypass. With one tier (FULL) it is
  the exact optimum of misses; with several tiers (``belady-tiered``) it is a heuristic estimate
  of the ceiling, not a proven bound.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from zipmoe_run.policies.planner import DEFAULT_ALPHA, Split
from zipmoe_run.tiers import CostModel, Tier, TierSizes

from . import kernels as K

__all__ = ["Move", "Decision", "ReplayPolicy", "make_replay_policy", "POLICIES", "slots_for", "tier_costs"]

POLICIES = ("lru", "lfu", "paper", "zipmoe", "belady", "belady-tiered")


@dataclass(frozen=True)
class Move:
    layer: int
    expert: int
    old: Tier
    new: Tier


@dataclass(frozen=True)
class Decision:
    found: list[Tier]
    moves: list[Move] = field(default_factory=list)


def slots_for(split: Split, budget: int, sizes: TierSizes, pools: int = 1) -> np.ndarray:
    """Slots per pool and tier ``[pools, 4]`` so that all pools together stay within ``budget``."""
    cap = np.zeros((pools, 4), np.int64)
    per_pool = budget // pools
    for t in (Tier.SM, Tier.COMP, Tier.FULL):
        share = split.share(t)
        if share > 0:
            cap[:, t] = int(share * per_pool // sizes.resident(t))
    return cap


def tier_costs(sizes: TierSizes, cost: CostModel | None = None) -> tuple[float, float, float, float]:
    """Seconds one access costs from COLD, SM, COMP, FULL (read + decode, unpipelined)."""
    return (cost or CostModel()).tier_costs(sizes)


class ReplayPolicy:
    """One policy's state (numpy arrays) and the per-layer entry points (see the module docstring).

    Not thread-safe: the store calls it under its own lock.
    """

    def __init__(self, kind: str, layers: int, experts: int, budget: int, sizes: TierSizes,
                 split: Split | None = None, *, per_layer: bool = False, alpha: float = DEFAULT_ALPHA,
                 demote: bool = False, name: str | None = None, learn: bool | None = None,
                 costs: Sequence[float] | None = None):
        if kind not in K.KIND_IDS:
            raise ValueError(f"unknown policy kind {kind!r} (known: {', '.join(K.KIND_IDS)})")
        if layers < 1 or experts < 1:
            raise ValueError(f"need layers >= 1 and experts >= 1, got {layers}, {experts}")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self.kind = kind
        self.name = name or kind
        self.layers, self.experts, self.budget, self.sizes = int(layers), int(experts), int(budget), sizes
        self.split = split or Split()
        self.per_layer = bool(per_layer)
        self.alpha = float(alpha)
        self.demote = bool(demote)
        self._kid = K.KIND_IDS[kind]
        pools = self.layers if self.per_layer else 1
        # seconds per access from each tier (COLD, SM, COMP, FULL): read + decode in isolation
        self.costs = tuple(float(c) for c in (costs if costs is not None else tier_costs(sizes)))
        self.st = K.new_state(self.layers, self.experts, pools, slots_for(self.split, self.budget, sizes, pools),
                              self.alpha, self.demote, self.per_layer, self.costs)
        (self.tier_of, self.pool, self.cap, self.used, self.mem, self.pos, self.F, self.scal, self.mark,
         *_) = self.st
        # rank histogram for the planner (.stats.stats_from_policy): the within-layer rank, by
        # the zipmoe score, of every accessed expert just before its access
        self.learn = (kind == "zipmoe") if learn is None else bool(learn)
        self.rank_hist = np.zeros((self.layers, self.experts))
        self._found = np.empty(0, np.int8)
        self._chg = np.empty((0, 3), np.int64)

    # -- the store's entry points ---------------------------------------------------------------
    def begin_request(self) -> None:
        """A new prompt starts: within-request popularity starts again from the prior."""
        K.begin_request(self._kid, self.st)

    def access(self, layer: int, experts: Sequence[int], next_uses: Sequence[float] | None = None) -> Decision:
        """Layer ``layer`` needs ``experts`` (distinct ids). ``next_uses`` only for Belady."""
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer} outside [0, {self.layers})")
        ex = np.asarray(list(experts), dtype=np.int64)
        if ex.size and (ex.min() < 0 or ex.max() >= self.experts):
            raise ValueError(f"expert ids must be in [0, {self.experts}), got {ex.tolist()}")
        if np.unique(ex).size != ex.size:
            raise ValueError(f"expert ids must be distinct, got {ex.tolist()}")
        if self.kind == "belady":
            if next_uses is None:
                raise ValueError("belady needs the next use of every access (offline only)")
            nx = np.asarray(next_uses, dtype=np.float64)
        else:
            nx = np.zeros(ex.size)
        m = ex.size
        if self.learn and m:
            self._learn(layer, ex)
        if self._found.size < m:
            self._found = np.empty(m, np.int8)
            self._chg = np.empty((8 * m + 8, 3), np.int64)
        n = K.step(self._kid, self.st, layer, ex, nx, self._found, self._chg)
        found = [Tier(int(t)) for t in self._found[:m]]
        return Decision(found, self._consolidate(self._chg[:n]))

    def _learn(self, layer: int, ex: np.ndarray) -> None:
        base = layer * self.experts
        tokens = self.scal[K.S_CLOCK] / self.layers
        sc = self.F[K.REQ, base:base + self.experts].copy()
        if tokens > 1:
            sc += self.alpha * self.F[K.GLOB, base:base + self.experts] / tokens
        idx = np.arange(self.experts)
        for e in ex.tolist():
            r = int((sc > sc[e]).sum() + ((sc == sc[e]) & (idx < e)).sum())
            self.rank_hist[layer, r] += 1.0

    def _consolidate(self, rows: np.ndarray) -> list[Move]:
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for key, old, new in rows.tolist():
            first.setdefault(key, old)
            last[key] = new
        moves = [Move(key // self.experts, key % self.experts, Tier(first[key]), Tier(last[key]))
                 for key in first if first[key] != last[key]]
        return sorted(moves, key=lambda mv: 0 if mv.new < mv.old else 1)

    def rebalance(self, split: Split) -> list[Move]:
        """Change the tier shares (e.g. after ``zipmoe_run.policies.plan`` learned new statistics). Tiers that
        shrink lose their weakest residents (to SM if ``demote`` and it has room, else COLD)."""
        pools = self.layers if self.per_layer else 1
        cap = slots_for(split, self.budget, self.sizes, pools)
        moves: list[Move] = []
        self.split = split
        for p in range(pools):
            for t in (Tier.FULL, Tier.COMP, Tier.SM):
                while self.used[p, t] > cap[p, t]:
                    v = int(K.victim(self._kid, self.st, p, int(t), -2, False))
                    new = Tier.COLD
                    if self.demote and t > Tier.SM and self.used[p, Tier.SM] < cap[p, Tier.SM]:
                        new = Tier.SM
                    K.move_key(self._kid, self.st, v, int(new))
                    moves.append(Move(v // self.experts, v % self.experts, Tier(t), new))
        self.cap[:] = cap
        return moves

    # -- queries --------------------------------------------------------------------------------
    def tier(self, layer: int, expert: int) -> Tier:
        return Tier(int(self.tier_of[layer * self.experts + expert]))

    def resident_bytes(self) -> int:
        return int(sum(int(self.used[:, t].sum()) * self.sizes.resident(t)
                       for t in (Tier.SM, Tier.COMP, Tier.FULL)))

    def capacity_bytes(self) -> int:
        return int(sum(int(self.cap[:, t].sum()) * self.sizes.resident(t)
                       for t in (Tier.SM, Tier.COMP, Tier.FULL)))

    def resident(self) -> dict[tuple[int, int], Tier]:
        keys = np.flatnonzero(self.tier_of)
        return {(int(x) // self.experts, int(x) % self.experts): Tier(int(self.tier_of[x])) for x in keys}

    def slots(self) -> dict[str, int]:
        return {"full": int(self.cap[:, Tier.FULL].sum()), "compressed": int(self.cap[:, Tier.COMP].sum()),
                "sm": int(self.cap[:, Tier.SM].sum())}

    def predict(self, layer: int, m: int) -> list[int]:
        """The ``m`` experts of ``layer`` most likely next (prefetch candidates): current-request
        count + alpha x all-time rate, as the ``zipmoe`` score."""
        if not 0 <= layer < self.layers:
            return []
        base = layer * self.experts
        tokens = self.scal[K.S_CLOCK] / self.layers
        g = self.F[K.GLOB, base:base + self.experts] / tokens if tokens > 0 else 0.0
        score = self.F[K.REQ, base:base + self.experts] + self.alpha * g
        order = np.lexsort((np.arange(self.experts), -score))
        return [int(e) for e in order[:max(0, int(m))]]

    def __repr__(self) -> str:
        return (f"ReplayPolicy({self.name}, budget={self.budget}, split={self.split}, slots={self.slots()}, "
                f"resident={self.resident_bytes()})")


def make_replay_policy(name: str, layers: int, experts: int, budget: int, sizes: TierSizes,
                       split: Split | None = None, **kw) -> ReplayPolicy:
    """A replay policy by name (:data:`POLICIES`) with its tier layout; ``split`` overrides the tier
    shares (``paper`` / ``zipmoe`` / ``belady-tiered`` otherwise need one from the planner)."""
    if name in ("lru", "lfu", "belady"):
        return ReplayPolicy(name, layers, experts, budget, sizes, split or Split(1.0, 0.0, 0.0), **kw)
    if name == "paper":
        kw.setdefault("per_layer", True)
        return ReplayPolicy("paper", layers, experts, budget, sizes, split or Split(0.5, 0.0, 0.5), **kw)
    if name == "zipmoe":
        kw.setdefault("demote", True)
        return ReplayPolicy("zipmoe", layers, experts, budget, sizes, split or Split(0.5, 0.5, 0.0), **kw)
    if name == "belady-tiered":
        kw.setdefault("demote", True)
        return ReplayPolicy("belady", layers, experts, budget, sizes, split or Split(0.5, 0.5, 0.0),
                      name="belady-tiered", **kw)
    raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})")
