"""Policies without weights: the same objects a trace-replay simulator would drive; the runtime's
policies import neither the store nor the benchmark side."""
from __future__ import annotations

import random

import pytest

from zipmoe_run.policies import DensityPolicy, LRUPolicy, Policy, ZipMoEPolicy, make_policy
from zipmoe_run.tiers import DEMOTIONS, CostModel, ExpertInfo, Tier


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
    assert isinstance(make_policy(None, cost), ZipMoEPolicy) and isinstance(make_policy("zipmoe"), ZipMoEPolicy)
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


# -- structure: one vocabulary, pure policies, the simulator on the benchmark side -------------------


def test_runtime_never_imports_the_benchmark_side():
    """Importing the store, the policies and the tiers loads nothing of ``zipmoe`` (the benchmarks and
    their simulator), and the policies load neither the store nor torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import zipmoe_run.policies, zipmoe_run.tiers\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('zipmoe', 'torch', 'numba')\n"
        "             or m.startswith('zipmoe_run.store'))\n"
        "assert not bad, ('policies', bad)\n"
        "import zipmoe_run.store, zipmoe_run.store.store\n"
        "from zipmoe_run.store.store import ExpertStore\n"
        "bad = sorted(m for m in sys.modules if m == 'zipmoe' or m.startswith('zipmoe.'))\n"
        "assert not bad, ('store', bad)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_one_tier_vocabulary_and_one_cost_model():
    import zipmoe_run.store.store as store
    import zipmoe_run.tiers as tiers

    # the store uses the shared names (no second definition anywhere in the store)
    assert store.Tier is tiers.Tier and store.CostModel is tiers.CostModel
    assert store.make_policy is make_policy
    assert [(t.name, int(t), t.label, t.long_name) for t in Tier] == [
        ("COLD", 0, "cold", "cold"), ("SM", 1, "sm", "sm"), ("COMP", 2, "comp", "compressed"),
        ("FULL", 3, "full", "full")]
    # the store's pipelined cost and the planner's per-tier times come from the same rates
    cost = CostModel(read_bps=2e9, decode_bps=4e9, read_share=1.0)
    info = _info(0)
    assert cost.fetch_cost(info, Tier.COLD) == info.read_cold / 2e9
    assert cost.access_costs(info) == (info.read_cold / 2e9 + info.decoded / 4e9,
                                       info.read_sm / 2e9 + info.decoded / 4e9, info.decoded / 4e9, 0.0)
    from zipmoe_run.tiers import TierSizes

    sizes = TierSizes(1 << 20)
    assert cost.tier_costs(sizes) == cost.access_costs(sizes.info("k"))


def test_cost_model_file_keeps_measurements_not_running_state(tmp_path):
    from dataclasses import replace

    from zipmoe_run.tiers import load_calibration, save_calibration

    cost = CostModel(read_bps=2.5e9, decode_bps=5e9, compute_bps=6e9, read_method="o_direct")
    back = load_calibration(save_calibration(replace(cost, read_share=0.9, frozen=True), tmp_path / "c.json"))
    assert (back.read_bps, back.decode_bps, back.compute_bps, back.read_share, back.frozen) == \
        (2.5e9, 5e9, 6e9, 0.5, False)
    assert "disk_bps" in cost.to_json() and "read_share" not in cost.to_json()
    with pytest.raises(ValueError, match="read_share"):
        CostModel(read_share=1.5)
    (tmp_path / "deep.json").write_text("[" * 100000)
    with pytest.raises(ValueError, match="deep.json"):
        load_calibration(tmp_path / "deep.json")


def test_info_from_extent_charges_whole_pages():
    from types import SimpleNamespace

    from zipmoe_run.tiers import info_from_extent

    ext = SimpleNamespace(key=(None, 0, 1), decoded_nbytes=100_000, length=66_000, exp_length=17_000)
    four, sixteen = info_from_extent(ext), info_from_extent(ext, page=16384)
    assert (four.full_bytes, four.comp_bytes, four.sm_bytes, four.read_sm) == (102400, 69632, 53248, 20480)
    assert (sixteen.full_bytes, sixteen.comp_bytes, sixteen.sm_bytes, sixteen.read_sm) == (114688, 81920, 65536, 20480)
    assert four.tiers == sixteen.tiers == (Tier.COLD, Tier.SM, Tier.COMP, Tier.FULL)
    with pytest.raises(ValueError, match="page size"):
        info_from_extent(ext, page=1000)
