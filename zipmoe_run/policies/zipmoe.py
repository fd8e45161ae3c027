"""``zipmoe`` (the default policy), behind the policy protocol (:mod:`.protocol`).

The same decisions as the simulator's ``zipmoe`` kernel (``zipmoe.bench.sim``), on the store's live
state:

* score ``p`` of an expert = its accesses in the current request + ``alpha`` x its all-time access
  rate (as of the request's start); a request begins at :meth:`ZipMoEPolicy.begin_request` or,
  without that call, at a prefill: a fetch of the first MoE layer asking for more experts than the
  smallest fetch seen so far (a one-token decode step asks for k); a fetch no wider than that counts
  its accesses at once, a wider one (a batched step, a prefill) at the end of its sweep of the layers,
  so within a sweep the scores hold as of its start; among equal scores the most recently accessed
  expert goes first (what a repeating sweep needs furthest ahead);
* tier shares: the tier planner (:func:`.planner.plan`) on the statistics learned so far (the rank
  histogram of accessed experts), the store's measured read and decode speeds, and the budget less
  the store's staging reserve; re-planned at each new request (uniform routing before the first);
* ``placement``: the tier with the largest positive saving ``p (c[COLD] - c[t])`` less what the
  weakest expert of that tier would lose when it has to make room (``t`` over its share);
* ``victim``: first the weakest expert of a tier over its share; else the expert whose demotion
  loses the least per byte freed (``p (c[lower] - c[t]) / bytes freed``); FULL and COMP drop
  to SM when that tier is offered and the demotion allows it, else to COLD.

Costs per access ``c[t]`` (read + decode, seconds: ``CostModel.access_costs``) use the store's current
cost model. Plain Python, no torch, no I/O. Not thread-safe (the store calls it under its lock).
"""
from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np

from zipmoe_run.tiers import CostModel, Tier, TierSizes

from .planner import DEFAULT_ALPHA, ActivationStats, Split, plan

__all__ = ["ZipMoEPolicy", "DEFAULT_ALPHA"]

log = logging.getLogger(__name__)


class ZipMoEPolicy:
    name = "zipmoe"

    def __init__(self, cost: CostModel | None = None, *, alpha: float = DEFAULT_ALPHA, split: Split | None = None,
                 demote: bool = True, replan: bool = True, plan_step: float = 0.1):
        self.cost = cost if cost is not None else CostModel()
        self.alpha = float(alpha)
        self.fixed_split = split
        self.split = split or Split(0.0, 1.0, 0.0)
        self.demote = bool(demote)
        self.replan = bool(replan) and split is None
        self.plan_step = float(plan_step)
        self._R = np.zeros((0, 0))  # accesses in the current request, [layer index, expert]
        self._G = np.zeros((0, 0))  # all-time accesses
        self._hist = np.zeros((0, 0))  # rank histogram (ActivationStats)
        # mirror of the store's tiers and of each expert's bytes / costs per tier (filled on first
        # sight); resynchronised from res.resident() at every new request
        self._T = np.zeros((0, 0), np.int8)
        self._fetching = np.zeros((0, 0), bool)  # experts of the open fetch: not evictable
        self._nbytes = np.zeros((4, 0, 0))
        self._cost = np.zeros((4, 0, 0))
        self._sm_ok = np.zeros((0, 0), bool)
        self._known = np.zeros((0, 0), bool)
        self._used = np.zeros(4)
        self._rowkey: list = []
        self._need_sync = False
        self._layers: dict = {}  # (stack, layer) -> row
        self._experts = 0
        self._fetches = 0
        self._tokens_at_req = 0.0
        self._now = -1
        self._fetch_keys: list = []
        self._fetch_first = False
        self._settled = True
        self._begun = False
        self._min_fetch: int | None = None
        self._P = np.zeros((0, 0))  # accesses of the current step, counted into _R and _G when it ends
        self._last = np.zeros((0, 0))  # fetch number of each expert's latest access (ties: newest goes first)
        self._need_plan = True
        self.requests = 0
        self.plans: list = []

    # -- learning ---------------------------------------------------------------------------------
    def _tokens(self) -> float:
        return self._fetches / max(1, len(self._layers))

    def _row(self, key) -> int:
        lk = (key[0], key[1])
        row = self._layers.get(lk)
        if row is None:
            row = self._layers[lk] = len(self._layers)
            self._rowkey.append(lk)
        e = int(key[2])
        if row >= self._R.shape[0] or e >= self._R.shape[1]:
            r0, c0 = self._R.shape  # grow each axis geometrically, and only the axis that overflowed
            shape = (r0 if row < r0 else max(row + 1, 2 * r0), c0 if e < c0 else max(e + 1, 2 * c0))
            for name in ("_R", "_G", "_P", "_hist", "_T", "_fetching", "_sm_ok", "_known", "_last"):
                old = getattr(self, name)
                new = np.zeros(shape, old.dtype)
                new[:old.shape[0], :old.shape[1]] = old
                setattr(self, name, new)
            for name in ("_nbytes", "_cost"):
                old = getattr(self, name)
                new = np.zeros((4,) + shape)
                new[:, :old.shape[1], :old.shape[2]] = old
                setattr(self, name, new)
        self._experts = max(self._experts, e + 1)
        return row

    def _learn_info(self, res, key, row: int, e: int) -> None:
        if self._known[row, e]:
            return
        info = res.info(key)
        self._known[row, e] = True
        for t in range(4):
            self._nbytes[t, row, e] = info.bytes(t) if t in info.tiers or t == 0 else np.inf
        self._cost[:, row, e] = self.cost.access_costs(info)
        self._sm_ok[row, e] = 1 in info.tiers

    def _set(self, row: int, e: int, t: int) -> None:
        old = int(self._T[row, e])
        if old:
            self._used[old] -= self._nbytes[old, row, e]
        if t:
            self._used[t] += self._nbytes[t, row, e]
        self._T[row, e] = t

    def _sync(self, res) -> None:
        """Rebuild the mirror from the store (its demotions may differ from what was asked)."""
        self._need_sync = False
        self._T[:] = 0
        self._used[:] = 0.0
        for key, t in res.resident():
            row = self._row(key)
            e = int(key[2])
            self._learn_info(res, key, row, e)
            self._set(row, e, int(t))

    def _scores(self, row: int, pending: bool = False) -> np.ndarray:
        s = self._R[row] + self._P[row] if pending else self._R[row].copy()
        if self._tokens_at_req > 0:
            s += self.alpha * (self._G[row] + self._P[row] if pending else self._G[row]) / self._tokens_at_req
        return s

    def score(self, key) -> float:
        row = self._layers.get((key[0], key[1]))
        if row is None:
            return 0.0
        e = int(key[2])
        g = self._G[row, e] / self._tokens_at_req if self._tokens_at_req > 0 else 0.0
        return float(self._R[row, e] + self.alpha * g)

    def _own(self, row: int, e: int) -> float:
        """What this sweep's accesses of one expert add to its score once counted (placement: an expert
        just fetched is weighed with its own access, as the step will count it)."""
        p = float(self._P[row, e])
        return p * (1.0 + self.alpha / self._tokens_at_req) if self._tokens_at_req > 0 else p

    def _pick(self, vals: np.ndarray) -> int | None:
        """Flat index of the smallest of ``vals`` (inf: not a candidate); among equal ones the most
        recently accessed goes first (what a repeating sweep of the layers needs furthest ahead)."""
        lo = vals.min() if vals.size else np.inf
        if not np.isfinite(lo):
            return None
        return int(np.where(vals == lo, self._last, -1.0).argmax())

    def begin_request(self) -> None:
        """A new prompt: within-request counts start again (the store forwards this when told)."""
        self._end_step()
        self._R[:] = 0.0
        self._tokens_at_req = self._tokens()
        self.requests += 1
        self._need_plan = True
        self._need_sync = True

    def replan_soon(self) -> None:
        """The cost model's rates moved (a calibration drift): plan the split again at the next placement."""
        self._need_plan = True

    def on_access(self, key, tier, now: int) -> None:
        if now != self._now:  # a new fetch call
            self._settle()
            self._end_fetch()
            self._now = now
            self._fetches += 1
            self._fetch_keys = []
            self._settled = False
            self._fetch_first = self._is_first_layer(key)
            if self._fetch_first:  # a new sweep of the layers: the last one's accesses count from now on
                self._end_step()
            self._fetching[:] = False
        row = self._row(key)
        e = int(key[2])
        self._fetch_keys.append((row, e))
        self._fetching[row, e] = True
        if tier != Tier.FULL and self._T[row, e]:  # the store takes it out while it is fetched
            self._set(row, e, 0)
        if self._fetch_first and self._min_fetch is not None and len(self._fetch_keys) > self._min_fetch \
                and not self._begun:
            # a prefill: start a request; this fetch's earlier keys (pending in _P) count into it
            self._begun = True
            pending, self._P = self._P, np.zeros_like(self._P)
            self.begin_request()
            self._P = pending
        sc = self._scores(row, pending=True)
        self._hist[row, int((sc > sc[e]).sum())] += 1.0
        self._P[row, e] += 1.0
        self._last[row, e] = self._fetches

    def _settle(self) -> None:
        """Once the open fetch's keys are all known: a narrow one (no more experts than the smallest fetch
        seen, a one-token step) counts its accesses at once, so a single stream keeps its recency; a wider
        one (a batched step, a prefill) waits for the end of its sweep (``_end_step``)."""
        if self._settled:
            return
        self._settled = True
        if self._min_fetch is None or len(self._fetch_keys) <= self._min_fetch:
            for r, x in self._fetch_keys:
                self._P[r, x] -= 1.0
                self._R[r, x] += 1.0
                self._G[r, x] += 1.0

    def _end_step(self) -> None:
        """Count the accesses of the sweep that ended into the scores. Within a sweep the scores stay as
        of its start: a batched step asks for nearly every expert of every layer, and counting each
        layer's accesses at once ranked the experts it had just used (needed again only one sweep later)
        above the later layers' (needed next), so the policy evicted exactly what came next."""
        if self._P.any():
            self._R += self._P
            self._G += self._P
            self._P[:] = 0.0

    def _is_first_layer(self, key) -> bool:
        lays = [lay for (st, lay) in self._layers if st == key[0]]
        return not lays or key[1] <= min(lays)

    def _end_fetch(self) -> None:
        n = len(self._fetch_keys)
        if n:
            self._min_fetch = n if self._min_fetch is None else min(self._min_fetch, n)
        self._begun = False

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, res, info) -> None:
        self._need_plan = False
        if not self.replan:
            return
        cap = res.capacity
        if cap is None:
            self.split = Split(1.0, 0.0, 0.0)
            return
        room = max(0, int(cap) - int(res.reserve))
        try:
            sizes = TierSizes.from_info(info)
        except ValueError:
            return
        k = max(1, self._min_fetch or 1)
        L, E = len(self._layers), self._experts
        hist = self._hist[:L, :E]
        if L and E and hist.sum() > 0:
            rows = hist.sum(axis=1, keepdims=True)
            probs = np.where(rows > 0, hist / np.maximum(rows, 1e-12) * k, k / E)
            stats = ActivationStats(probs, k, self._tokens(), "learned online")
        else:
            stats = ActivationStats.uniform(max(1, len(self._layers)), max(1, self._experts), k)
        tiers = tuple(t for t in (Tier.FULL, Tier.COMP, Tier.SM) if t in info.tiers)
        got = plan(stats, room, sizes, self.cost, tiers=tiers or (Tier.FULL,), step=self.plan_step)
        self.split = got.split
        self.plans.append((self.requests, got.split, got.seconds_per_token))
        log.info("zipmoe policy: tier split %s (modelled %.1f ms/token, %s)", got.split,
                 1e3 * got.seconds_per_token, stats.source)

    # -- the store's questions --------------------------------------------------------------------
    def _scores_all(self) -> np.ndarray:
        s = self._R.copy()
        if self._tokens_at_req > 0:
            s += self.alpha * self._G / self._tokens_at_req
        return s

    def _share(self, res, t: int) -> float:
        if res.capacity is None:
            return float("inf")
        return self.split.share(t) * max(0, int(res.capacity) - int(res.reserve))

    def _weakest(self, S: np.ndarray, t: int, pinned_mask=None):
        m = (self._T == t) & ~self._fetching
        if pinned_mask is not None:
            m &= ~pinned_mask
        if not m.any():
            return None
        idx = self._pick(np.where(m, S, np.inf))
        if idx is None:
            return None
        row, e = np.unravel_index(idx, S.shape)
        return int(row), int(e), float(S[row, e])

    def _least_loss(self, S: np.ndarray, pm, res, spare_fetch: bool):
        """(row, expert, tier, lower tier) of the demotion that loses the least per byte freed, or None.
        ``spare_fetch``: experts of the open fetch are not candidates (the usual case)."""
        best = None
        for t in (3, 2, 1):
            m = self._T == t
            if spare_fetch:
                m &= ~self._fetching
            if pm is not None:
                m &= ~pm
            if not m.any():
                continue
            sm_fits = (self.demote and t > 1 and self.split.share(1) > 0
                       and self._used[1] + self._nbytes[1] <= self._share(res, 1)) & self._sm_ok
            down = np.where(sm_fits, 1, 0) if t > 1 else np.zeros(S.shape, int)
            nb_down = np.where(down == 1, self._nbytes[1], 0.0)
            c_down = np.where(down == 1, self._cost[1], self._cost[0])
            freed = np.maximum(self._nbytes[t] - nb_down, 1.0)
            loss = np.where(m, S * (c_down - self._cost[t]) / freed, np.inf)
            idx = self._pick(loss)
            if idx is not None and (best is None or loss.flat[idx] < best[0]):
                row, e = np.unravel_index(idx, S.shape)
                best = (float(loss.flat[idx]), int(row), int(e), t, int(down[row, e]))
        return best[1:] if best is not None else None

    def _down(self, row: int, e: int, t: int, extra_sm: float, res) -> int:
        if self.demote and t > 1 and self._sm_ok[row, e] and self.split.share(1) > 0 \
                and self._used[1] + extra_sm + self._nbytes[1, row, e] <= self._share(res, 1):
            return 1
        return 0

    def placement(self, key, res):
        self._settle()
        info = res.info(key)
        if self._need_sync:
            self._sync(res)
        if self._need_plan:
            self._plan(res, info)
        row = self._row(key)
        e = int(key[2])
        self._learn_info(res, key, row, e)
        if res.capacity is None:
            best = int(max(info.tiers))
        else:
            c = self._cost[:, row, e]
            S = self._scores_all()
            px = S[row, e] + self._own(row, e)
            best, best_g = 0, 0.0
            for t in (3, 2, 1):
                if t not in info.tiers or self.split.share(t) <= 0:
                    continue
                g = px * (c[0] - c[t])
                if self._used[t] + self._nbytes[t, row, e] > self._share(res, t):
                    w = self._weakest(S, t)
                    if w is None:
                        continue
                    vr, ve, pv = w
                    down = self._down(vr, ve, t, 0.0, res)
                    g -= pv * (self._cost[down, vr, ve] - self._cost[t, vr, ve])
                if g > best_g:
                    best, best_g = t, g
        self._fetching[row, e] = False
        self._set(row, e, best)
        return Tier(best)

    def victim(self, res, pinned: Collection, _retry: bool = False):
        self._settle()
        if self._need_sync:
            self._sync(res)
        S = self._scores_all()
        pm = None
        if pinned:
            pm = np.zeros(S.shape, bool)
            for key in pinned:
                lk = self._layers.get((key[0], key[1]))
                if lk is not None:
                    pm[lk, int(key[2])] = True
        pick = None
        for t in (3, 2, 1):  # a tier over its share gives up its weakest first
            if self._used[t] > self._share(res, t):
                w = self._weakest(S, t, pm)
                if w is not None:
                    pick = (w[0], w[1], t, self._down(w[0], w[1], t, 0.0, res))
                    break
        if pick is None:  # the demotion that loses the least per byte freed
            pick = self._least_loss(S, pm, res, spare_fetch=True)
        if pick is None:  # only experts of the open fetch are left: those the store has not pinned
            pick = self._least_loss(S, pm, res, spare_fetch=False)  # (already served) may go
        if pick is None:
            if not _retry and any(True for _ in res.resident()):  # the mirror lost track: resync once
                self._sync(res)
                return self.victim(res, pinned, _retry=True)
            return None
        row, e, t, down = pick
        stack, layer = self._rowkey[row]
        key = (stack, layer, e)
        if int(res.tier_of(key)) != t:  # the mirror drifted: resynchronise and ask again
            self._sync(res)
            return self.victim(res, pinned) if self._T[row, e] != t else None
        self._set(row, e, down)
        return key, Tier(down)
