"""Replay a trace through any policy of the runtime's protocol (``zipmoe_run.policies``: ``on_access``
/ ``placement`` / ``victim``), in the same delay model as :mod:`.simulate`.

Plain Python (slow: use slices of a trace): it exists to compare the runtime's policies (``zipmoe``,
``density``, ``lru``) with each other and with the numba replay on equal terms. The fake store
holds resident experts within ``budget`` bytes (staging buffers are not counted, as in
:mod:`.simulate`), takes each non-FULL expert out while it is fetched, asks ``placement`` when the
layer is done, then ``victim`` until the residents fit.
"""
from __future__ import annotations

from zipmoe_run.tiers import TIER_NAMES, CostModel, Tier, TierSizes, makespan

from .simulate import ReplayResult
from .trace import ReplaySequence

__all__ = ["FakeStore", "replay_protocol"]


class FakeStore:
    """A ``ResidencyView`` over a dict of tiers."""

    def __init__(self, budget: int | None, sizes: TierSizes, reserve: int = 0):
        self.capacity = budget
        self.sizes = sizes
        self.now = 0
        self._reserve = reserve
        self.tiers: dict = {}
        self.busy: set = set()
        self._infos: dict = {}
        self.bytes = 0

    def info(self, key):
        i = self._infos.get(key)
        if i is None:
            i = self._infos[key] = self.sizes.info(key)
        return i

    def tier_of(self, key):
        return self.tiers.get(key, Tier.COLD)

    def resident(self):
        for k, t in self.tiers.items():
            if k not in self.busy:
                yield k, t

    @property
    def resident_bytes(self) -> int:
        return self.bytes

    @property
    def reserve(self) -> int:
        return self._reserve

    def set(self, key, t) -> None:
        old = self.tiers.get(key, Tier.COLD)
        self.bytes += self.info(key).bytes(t) - self.info(key).bytes(old)
        if t == Tier.COLD:
            self.tiers.pop(key, None)
        else:
            self.tiers[key] = Tier(t)


def replay_protocol(seq: ReplaySequence, policy, sizes: TierSizes, cal: CostModel, budget: int,
                    name: str | None = None) -> ReplayResult:
    st = FakeStore(budget, sizes)
    t = cal.times(sizes)
    found = {name: 0 for name in TIER_NAMES.values()}
    seconds = 0.0
    begin = getattr(policy, "begin_request", None)
    starts = set(int(x) for x in seq.prompt_start[:-1])
    over = 0
    for s, row in enumerate(seq.steps):
        if s in starts and begin is not None:
            begin()
        layer = s % seq.layers
        st.now += 1
        keys = [(None, layer, int(e)) for e in row]
        tiers = [st.tier_of(k) for k in keys]
        for k, ti in zip(keys, tiers):
            policy.on_access(k, ti, st.now)
            found[ti.long_name] += 1
        n = [tiers.count(x) for x in (Tier.COMP, Tier.SM, Tier.COLD)]
        seconds += makespan(n[0], n[1], n[2], t["read_sm"], t["read_cold"], t["decode"])
        moving = [k for k, ti in zip(keys, tiers) if ti != Tier.FULL]
        for k in moving:  # fetched: its resident bytes become staging
            st.set(k, Tier.COLD)
            st.busy.add(k)
        for k in moving:
            st.busy.discard(k)
            st.set(k, policy.placement(k, st))
            while budget is not None and st.bytes > budget:
                v = policy.victim(st, set(keys))
                if v is None:
                    over += 1
                    break
                st.set(v[0], v[1])
    read = found["cold"] * sizes.read(Tier.COLD) + found["sm"] * sizes.read(Tier.SM)
    res = ReplayResult(name or getattr(policy, "name", "?"), budget or 0, {}, {}, seq.tokens,
                       int(seq.steps.size), found, int(read), float(seconds),
                       note="store protocol" + (f"; over budget {over} times" if over else ""))
    res.split = getattr(getattr(policy, "split", None), "as_dict", lambda: {})()
    return res
