"""Policies without weights: the same objects a trace-replay simulator would drive."""
from __future__ import annotations

import random

import pytest

from zipmoe_run.store.policy import DensityPolicy, LRUPolicy, Policy, make_policy
from zipmoe_run.store.tiers import DEMOTIONS, CostModel, ExpertInfo, Tier


def _info(key, raw=False):
    if raw:
        return ExpertInfo(key, 2000 * 4096, 2000 * 4096, 2000 * 4096, 2000 * 4096, 0, 2000 * 4096,
                          (Tier.COLD, Tier.FULL))
    return ExpertInfo(key, 2000 * 4096, 1333 * 4096, 1000 * 4096, 1333 * 4096, 334 * 4096, 2000 * 4096,
                      (Tier.COLD, Tier.SM, Tier.COMP, Tier.FULL))


class Sim:
    """A minimal weightless residency (what a trace replay would keep): tiers and bytes only."""

    def __init__(self, infos, capacity, policy):
        self.infos, self.capacity, self.policy = infos, capacity, policy
        self.tiers: dict = {}
        self.now = 0
        self.reserve = max(i.min_working_set for i in infos.values())
        self.hits = {t: 0 for t in Tier}

    def info(self, key):
        return self.infos[key]

    def tier_of(self, key):
        return self.tiers.get(key, Tier.COLD)

    def resident(self):
        return [(k, t) for k, t in self.tiers.items() if t != Tier.COLD]

    @property
    def resident_bytes(self):
        return sum(self.infos[k].bytes(t) for k, t in self.tiers.items())

    def access(self, keys):
        self.now += 1
        for k in keys:
            t = self.tier_of(k)
            self.policy.on_access(k, t, self.now)
            self.hits[t] += 1
        for k in keys:
            if self.tier_of(k) != Tier.FULL:
                self.tiers.pop(k, None)
                while self.resident_bytes + self.reserve > self.capacity:
                    v = self.policy.victim(self, ())
                    assert v is not None
                    key, to = v
                    assert to in DEMOTIONS[self.tiers[key]] and to in self.infos[key].tiers
                    self.tiers[key] = to
                keep = self.policy.placement(k, self)
                assert keep in self.infos[k].tiers
                self.tiers[k] = keep
        assert self.resident_bytes <= self.capacity


def _trace(n_experts, steps, seed, hot=5):
    rng = random.Random(seed)
    return [sorted(set(rng.sample(range(hot), 2)) | set(rng.sample(range(n_experts), 3))) for _ in range(steps)]


def test_protocol_and_factory():
    cost = CostModel()
    assert isinstance(DensityPolicy(cost), Policy) and isinstance(LRUPolicy(), Policy)
    from zipmoe_run.policies.store_policy import ZipMoEStorePolicy
    assert isinstance(make_policy(None, cost), ZipMoEStorePolicy)
    assert isinstance(make_policy("density", cost), DensityPolicy) and isinstance(make_policy("lru", cost), LRUPolicy)
    with pytest.raises(ValueError):
        make_policy("belady", cost)
    with pytest.raises(TypeError):
        make_policy(object(), cost)


def test_hull_drops_tiers_not_worth_their_bytes():
    i = _info(0)
    assert DensityPolicy(CostModel(read_bps=1e9, decode_bps=1e6, read_share=0.0)).hull(i) == [Tier.COLD, Tier.FULL]
    read_bound = DensityPolicy(CostModel(read_bps=1e6, decode_bps=1e12, read_share=1.0)).hull(i)
    assert read_bound[:2] == [Tier.COLD, Tier.SM] and Tier.FULL not in read_bound
    assert DensityPolicy().hull(_info(0, raw=True)) == [Tier.COLD, Tier.FULL]


@pytest.mark.parametrize("cost,expect", [
    (CostModel(read_bps=1e6, decode_bps=1e12, read_share=1.0, frozen=True), {Tier.COMP, Tier.SM}),
    (CostModel(read_bps=1e12, decode_bps=1e6, read_share=0.0, frozen=True), {Tier.FULL}),
])
def test_density_policy_follows_the_bottleneck_in_a_weightless_replay(cost, expect):
    infos = {k: _info(k) for k in range(24)}
    sim = Sim(infos, capacity=int(sum(i.full_bytes for i in infos.values()) * 0.4), policy=DensityPolicy(cost))
    for keys in _trace(24, 300, seed=3):
        sim.access(keys)
    kept = {t for _, t in sim.resident()}
    assert kept and kept <= expect
    assert sim.hits[Tier.COLD] < 300 * 5


def test_density_beats_lru_on_a_skewed_trace_when_reads_dominate():
    cost = CostModel(read_bps=1e6, decode_bps=1e12, read_share=1.0, frozen=True)
    infos = {k: _info(k) for k in range(32)}
    cap = int(sum(i.full_bytes for i in infos.values()) * 0.3)
    trace = _trace(32, 400, seed=9)
    read = {}
    for name, pol in (("density", DensityPolicy(cost)), ("lru", LRUPolicy())):
        sim = Sim(infos, cap, pol)
        total = 0
        for keys in trace:
            total += sum(infos[k].read_bytes(sim.tier_of(k)) for k in keys)
            sim.access(keys)
        read[name] = total
    assert read["density"] < read["lru"]
