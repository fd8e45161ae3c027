"""The simulator (zipmoe.bench.sim: trace derivation, replay policies, Belady, replay) and the runtime's
planner and cost model (zipmoe_run.policies.planner, zipmoe_run.tiers): exactness and invariants.

No timing thresholds: everything here is about counts, bytes and determinism.
"""
from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import pytest

from zipmoe.bench.sim.policy import make_replay_policy
from zipmoe.bench.sim.simulate import PrefetchConfig, next_uses, replay
from zipmoe.bench.sim.stats import stats_from_policy, stats_from_sequence
from zipmoe.bench.sim.trace import ReplaySequence, Trace, build_sequence, derive_tokens, infer_top_k, load_trace
from zipmoe_run.policies.planner import ActivationStats, Split, expected_time, plan, splits
from zipmoe_run.tiers import (CostModel, Tier, TierSizes, johnson_makespan, layer_time, load_calibration,
                              save_calibration)

N = 1 << 20
SIZES = TierSizes(N)
CAL = CostModel()


def seq_from_steps(steps, layers, experts, prompt_lengths=None) -> ReplaySequence:
    steps = np.asarray(steps, dtype=np.int16)
    if steps.ndim == 1:
        steps = steps[:, None]
    tokens = steps.shape[0] // layers
    if prompt_lengths is None:
        prompt_lengths = [tokens]
    starts = np.concatenate([[0], np.cumsum(prompt_lengths) * layers]).astype(np.int64)
    assert starts[-1] == steps.shape[0]
    return ReplaySequence(steps, layers, experts, steps.shape[1], starts, "test")


def random_counts(rng, prompts, layers, experts, k, max_tokens=12) -> np.ndarray:
    """Feasible per-prompt counts: built from random tokens."""
    out = np.zeros((prompts, layers, experts), np.int16)
    for p in range(prompts):
        T = int(rng.integers(1, max_tokens + 1))
        for _ in range(T):
            for l in range(layers):
                out[p, l, rng.choice(experts, k, replace=False)] += 1
    return out


# -- trace derivation ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
def test_derivation_reproduces_counts_exactly(k):
    rng = np.random.default_rng(k)
    counts = random_counts(rng, 30, 3, 9, k)
    seq = build_sequence(Trace(counts, k, "synthetic"), seed=5)
    assert np.array_equal(seq.counts(), counts)
    # every token gets k distinct experts per layer
    assert all(len(set(row.tolist())) == k for row in seq.steps)
    assert seq.tokens == int(counts[:, 0].sum()) // k


def test_derivation_is_deterministic_and_seeded():
    rng = np.random.default_rng(0)
    counts = random_counts(rng, 5, 4, 16, 2, max_tokens=20)
    a = derive_tokens(counts[2], 2, seed=3, prompt=2)
    b = derive_tokens(counts[2], 2, seed=3, prompt=2)
    c = derive_tokens(counts[2], 2, seed=4, prompt=2)
    assert np.array_equal(a, b)
    assert a.shape == c.shape and not np.array_equal(a, c)


def test_derivation_extreme_rows():
    # an expert used by every token, and a prompt of one token
    row = np.array([[3, 3, 2, 1, 1, 2]])  # T = 12 / 4 = 3, k = 4
    tok = derive_tokens(row, 4)
    assert tok.shape == (3, 1, 4)
    assert all(len(set(t[0].tolist())) == 4 for t in tok)
    assert np.array_equal(np.bincount(tok.reshape(-1), minlength=6), row[0])
    assert derive_tokens(np.array([[0, 1, 0]]), 1).tolist() == [[[1]]]


@pytest.mark.parametrize("bad, msg", [
    (np.array([[[1, 1, 1]]]), "not a multiple"),
    (np.array([[[2, 2, 0], [4, 0, 0]]]), "more than"),
    (np.array([[[2, 2, 0], [1, 1, 0]]]), "tokens"),
])
def test_trace_validation(tmp_path, bad, msg):
    p = tmp_path / "bad.npy"
    np.save(p, bad.astype(np.int16))
    with pytest.raises(ValueError, match=msg):
        load_trace(p, k=2)


def test_infer_top_k():
    rng = np.random.default_rng(1)
    counts = random_counts(rng, 40, 2, 10, 3, max_tokens=6)
    assert infer_top_k(counts, "x.npy") == 3
    assert infer_top_k(counts, "qwen1.5-moe-a2.7b.npy") == 4


def test_real_traces_derivation(shared_dir):
    for name, k in (("qwen1.5-moe-a2.7b.npy", 4), ("switch-large-128.npy", 1)):
        tr = load_trace(shared_dir / "traces" / name)
        assert tr.k == k
        part = tr.head(40)
        seq = build_sequence(part)
        assert np.array_equal(seq.counts(), np.asarray(part.counts))



def _with_dense(counts: np.ndarray, layers: tuple[int, ...]) -> np.ndarray:
    """``counts`` with all-zero layers inserted at ``layers`` (a model whose first layers are dense)."""
    out = np.asarray(counts)
    for layer in sorted(layers):
        out = np.insert(out, layer, 0, axis=1)
    return out


def test_dense_layers_replay_without_traffic(tmp_path):
    rng = np.random.default_rng(4)
    counts = random_counts(rng, 12, 3, 10, 2)
    p = tmp_path / "dense.npy"
    np.save(p, _with_dense(counts, (0, 1)))
    tr = load_trace(p, k=2)
    assert tr.dense == (0, 1) and tr.layers == 5 and tr.moe_layers == (2, 3, 4)
    assert np.array_equal(tr.tokens_per_prompt(), counts[:, 0].sum(axis=1) // 2)
    seq, ref = build_sequence(tr, seed=3), build_sequence(Trace(counts, 2, "ref"), seed=3)
    assert seq.layers == 3 and seq.dense == (0, 1)
    assert np.array_equal(seq.steps, ref.steps) and np.array_equal(seq.prompt_start, ref.prompt_start)
    assert np.array_equal(seq.counts(), counts)
    assert np.array_equal(build_sequence(tr.head(4)).steps, build_sequence(Trace(counts[:4], 2, "r")).steps)


def test_layer_zero_for_some_prompts_only_is_refused(tmp_path):
    rng = np.random.default_rng(6)
    counts = _with_dense(random_counts(rng, 5, 3, 8, 2), (0,))
    counts[3, 0, :2] = 1  # layer 0 routed one token of prompt 3: not a dense layer
    p = tmp_path / "bad.npy"
    np.save(p, counts)
    with pytest.raises(ValueError, match=r"prompt 0 layer 0 has 0 tokens"):
        load_trace(p, k=2)


def test_real_traces_with_dense_layers(shared_dir, tmp_path):
    for name in ("qwen1.5-moe-a2.7b.npy", "switch-large-128.npy"):
        tr = load_trace(shared_dir / "traces" / name).head(30)
        p = tmp_path / name
        np.save(p, _with_dense(tr.counts, (0, 1, 2)))
        got = load_trace(p, k=tr.k)
        assert got.dense == (0, 1, 2)
        assert np.array_equal(build_sequence(got).steps, build_sequence(tr).steps)


def test_bench_cache_says_which_layers_are_dense(tmp_path):
    rng = np.random.default_rng(8)
    p = tmp_path / "dense.npy"
    np.save(p, _with_dense(random_counts(rng, 6, 2, 8, 2), (0,)))
    r = _run_cli(["bench", "cache", "--trace", str(p), "--expert-bytes", str(N), "--budget", "30%", "--top-k", "2",
                  "--policies", "lru,zipmoe", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["trace"]["dense_layers"] == [0] and res["trace"]["layers"] == 2
    assert [b["bytes"] for b in res["budgets"]] == [int(0.3 * 2 * 8 * N)]
    table = _run_cli(["bench", "cache", "--trace", str(p), "--expert-bytes", str(N), "--budget", "30%",
                      "--top-k", "2", "--policies", "lru,zipmoe"])
    assert table.exit_code == 0 and "dense layer 0: no expert traffic" in " ".join(table.output.split())

# -- Belady ----------------------------------------------------------------------------------------


def brute_force_misses(accesses: list[int], slots: int) -> int:
    """Fewest misses of any offline policy with ``slots`` slots (bypass allowed), by search."""

    @functools.lru_cache(maxsize=None)
    def best(i: int, cache: frozenset) -> int:
        if i == len(accesses):
            return 0
        x = accesses[i]
        if x in cache:
            return best(i + 1, cache)
        options = [best(i + 1, cache)]  # bypass
        if len(cache) < slots:
            options.append(best(i + 1, cache | {x}))
        else:
            options += [best(i + 1, (cache - {y}) | {x}) for y in cache]
        return 1 + min(options)

    return best(0, frozenset())


@pytest.mark.parametrize("case", range(40))
def test_belady_single_tier_is_optimal(case):
    rng = np.random.default_rng(100 + case)
    layers, experts, k = int(rng.integers(1, 3)), int(rng.integers(2, 6)), int(rng.integers(1, 3))
    k = min(k, experts)
    tokens = int(rng.integers(3, 8))
    steps = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens * layers)])
    seq = seq_from_steps(steps, layers, experts)
    slots = int(rng.integers(1, 4))
    pol = make_replay_policy("belady", layers, experts, slots * N, SIZES)
    res = replay(seq, pol, SIZES, CAL)
    flat = [(s % layers) * experts + int(e) for s in range(steps.shape[0]) for e in steps[s]]
    assert res.found["cold"] == brute_force_misses(flat, slots)
    assert res.exact


def test_belady_bounds_online_single_tier():
    rng = np.random.default_rng(7)
    seq = build_sequence(Trace(random_counts(rng, 20, 2, 12, 2), 2, "t"))
    misses = {}
    for name in ("lru", "lfu", "belady"):
        misses[name] = replay(seq, make_replay_policy(name, 2, 12, 5 * N, SIZES), SIZES, CAL).found["cold"]
    assert misses["belady"] <= min(misses["lru"], misses["lfu"])


def test_belady_needs_next_uses():
    pol = make_replay_policy("belady", 1, 4, 2 * N, SIZES)
    with pytest.raises(ValueError, match="next use"):
        pol.access(0, [1])


# -- policy invariants -----------------------------------------------------------------------------

POLICY_SPLITS = [
    ("lru", None), ("lfu", None), ("paper", Split(0.5, 0.0, 0.5)), ("zipmoe", Split(0.2, 0.5, 0.3)),
    ("zipmoe", Split(0.0, 1.0, 0.0)), ("belady-tiered", Split(0.4, 0.3, 0.3)),
]


@pytest.mark.parametrize("name, split", POLICY_SPLITS)
@pytest.mark.parametrize("budget_slots", [0, 1, 3, 7])
def test_policy_invariants_step_by_step(name, split, budget_slots):
    rng = np.random.default_rng(budget_slots)
    layers, experts, k = 3, 8, 2
    budget = int(budget_slots * N * 0.9)  # not a multiple of any tier size
    pol = make_replay_policy(name, layers, experts, budget, SIZES, split)
    assert pol.capacity_bytes() <= budget
    mirror: dict = {}
    seq = build_sequence(Trace(random_counts(rng, 6, layers, experts, k), k, "t"))
    nexts = next_uses(seq)
    for s, row in enumerate(seq.steps):
        if s in seq.prompt_start:
            pol.begin_request()
        layer = s % layers
        before = {e: mirror.get((layer, int(e)), Tier.COLD) for e in row}
        d = pol.access(layer, row.tolist(), nexts[s] if pol.kind == "belady" else None)
        assert [before[e] for e in row] == d.found
        downs = [m for m in d.moves if m.new < m.old]
        ups = [m for m in d.moves if m.new > m.old]
        assert d.moves == downs + ups  # demotions and evictions first
        for m in d.moves:
            assert mirror.get((m.layer, m.expert), Tier.COLD) == m.old
            if m.new > m.old:  # promotions only for this step's experts
                assert m.layer == layer and m.expert in row.tolist()
            if Tier.COLD < m.new < m.old:  # the store can only demote to SM
                assert m.new == Tier.SM
            if m.new == Tier.COLD:
                mirror.pop((m.layer, m.expert), None)
            else:
                mirror[(m.layer, m.expert)] = m.new
        assert mirror == pol.resident()
        assert pol.resident_bytes() <= budget
        assert sum(SIZES.resident(t) for t in mirror.values()) == pol.resident_bytes()
        if pol.kind != "belady":  # the current step's experts are never evicted by it
            assert all(m.new != Tier.COLD or (m.layer, m.expert) not in {(layer, int(e)) for e in row}
                       for m in d.moves)


@pytest.mark.parametrize("name, split", POLICY_SPLITS)
def test_replay_accounting(name, split):
    rng = np.random.default_rng(3)
    seq = build_sequence(Trace(random_counts(rng, 25, 4, 10, 2), 2, "t"))
    budget = 9 * N
    res = replay(seq, make_replay_policy(name, 4, 10, budget, SIZES, split), SIZES, CAL)
    assert sum(res.found.values()) == res.accesses == seq.steps.size
    assert res.tokens == seq.tokens
    expect_read = res.found["cold"] * SIZES.read(Tier.COLD) + res.found["sm"] * SIZES.read(Tier.SM)
    assert res.bytes_read == expect_read
    assert res.seconds > 0
    assert res.as_dict()["hit_rate_total"] == pytest.approx(1 - res.found["cold"] / res.accesses, abs=1e-6)


def test_replay_is_deterministic():
    rng = np.random.default_rng(11)
    counts = random_counts(rng, 30, 3, 12, 2)
    runs = []
    for _ in range(2):
        seq = build_sequence(Trace(counts, 2, "t"), seed=2)
        pol = make_replay_policy("zipmoe", 3, 12, 10 * N, SIZES, Split(0.3, 0.4, 0.3))
        runs.append(replay(seq, pol, SIZES, CAL, PrefetchConfig(True)).as_dict())
    assert runs[0] == runs[1]


def test_policy_object_and_replay_agree():
    """The store's per-layer entry point and the replay kernel make the same decisions."""
    rng = np.random.default_rng(5)
    seq = build_sequence(Trace(random_counts(rng, 12, 3, 10, 2), 2, "t"))
    for name, split in POLICY_SPLITS[:4]:
        pol = make_replay_policy(name, 3, 10, 8 * N, SIZES, split)
        found = {"cold": 0, "sm": 0, "compressed": 0, "full": 0}
        names = {Tier.COLD: "cold", Tier.SM: "sm", Tier.COMP: "compressed", Tier.FULL: "full"}
        for s, row in enumerate(seq.steps):
            if s in seq.prompt_start:
                pol.begin_request()
            for t in pol.access(s % 3, row.tolist()).found:
                found[names[t]] += 1
        res = replay(seq, make_replay_policy(name, 3, 10, 8 * N, SIZES, split), SIZES, CAL)
        assert res.found == found, name


def test_lru_matches_reference():
    """Single-tier LRU against a textbook implementation."""
    from collections import OrderedDict

    rng = np.random.default_rng(9)
    seq = build_sequence(Trace(random_counts(rng, 15, 2, 9, 2), 2, "t"))
    slots = 4
    cache: OrderedDict = OrderedDict()
    misses = 0
    for s, row in enumerate(seq.steps):
        keys = [(s % 2, int(e)) for e in row]
        for key in keys:
            if key in cache:
                cache.move_to_end(key)
            else:
                misses += 1
        for key in keys:
            if key not in cache:
                if len(cache) >= slots:
                    victim = next(v for v in cache if v not in keys)
                    del cache[victim]
                cache[key] = True
    res = replay(seq, make_replay_policy("lru", 2, 9, slots * N, SIZES), SIZES, CAL)
    assert res.found["cold"] == misses


def test_policy_rejects_bad_input():
    pol = make_replay_policy("zipmoe", 2, 4, 3 * N, SIZES)
    with pytest.raises(ValueError):
        pol.access(2, [0])
    with pytest.raises(ValueError):
        pol.access(0, [4])
    with pytest.raises(ValueError):
        pol.access(0, [1, 1])
    with pytest.raises(ValueError):
        make_replay_policy("nope", 2, 4, N, SIZES)
    with pytest.raises(ValueError):
        Split(0.5, 0.6, 0.0)


def test_rebalance_keeps_budget():
    rng = np.random.default_rng(2)
    seq = build_sequence(Trace(random_counts(rng, 10, 2, 10, 2), 2, "t"))
    pol = make_replay_policy("zipmoe", 2, 10, 8 * N, SIZES, Split(0.0, 1.0, 0.0))
    for s, row in enumerate(seq.steps):
        pol.access(s % 2, row.tolist())
    before = pol.resident()
    moves = pol.rebalance(Split(1.0, 0.0, 0.0))
    assert all(m.new < m.old for m in moves)
    assert pol.used[:, Tier.COMP].sum() == 0
    assert pol.resident_bytes() <= 8 * N
    assert len(pol.resident()) == len(before) - sum(m.new == Tier.COLD for m in moves)


# -- costs, planner --------------------------------------------------------------------------------


def test_johnson_makespan_is_optimal():
    rng = np.random.default_rng(4)
    for _ in range(30):
        jobs = [(float(a), float(b)) for a, b in rng.uniform(0, 1, (int(rng.integers(1, 6)), 2))]

        def span(order):
            t1 = t2 = 0.0
            for a, b in order:
                t1 += a
                t2 = max(t2, t1) + b
            return t2

        assert johnson_makespan(jobs) == pytest.approx(min(span(p) for p in itertools.permutations(jobs)))


def test_compiled_makespan_is_the_cost_model_s():
    """The replay compiles the planner's makespan with numba: the same float, bit for bit."""
    from zipmoe.bench.sim.replay_kernels import makespan as compiled
    from zipmoe_run.tiers import makespan

    rng = np.random.default_rng(3)
    for _ in range(300):
        c, s_, z, pf = (int(x) for x in rng.integers(0, 5, 4))
        a_sm, a_cold, b, r0 = (float(x) for x in rng.exponential(1e-3, 4))
        assert compiled(c, s_, z, a_sm, a_cold, b, pf, r0) == makespan(c, s_, z, a_sm, a_cold, b, pf, r0)


def test_layer_time_tiers():
    t = CAL.times(SIZES)
    assert layer_time([Tier.FULL] * 4, SIZES, CAL) == 0.0
    assert layer_time([Tier.COMP], SIZES, CAL) == pytest.approx(t["decode"])
    assert layer_time([Tier.COLD], SIZES, CAL) == pytest.approx(t["read_cold"] + t["decode"])
    assert layer_time([Tier.COLD], SIZES, CAL, prefetched=[True]) == pytest.approx(t["decode"])
    assert layer_time([Tier.SM, Tier.COLD], SIZES, CAL) < layer_time([Tier.COLD, Tier.COLD], SIZES, CAL)


def test_tier_sizes():
    s = TierSizes(1000)
    assert (s.resident(Tier.FULL), s.resident(Tier.COMP), s.resident(Tier.SM)) == (1000, 665, 500)
    assert (s.read(Tier.COLD), s.read(Tier.SM), s.read(Tier.COMP)) == (665, 165, 0)
    with pytest.raises(ValueError):
        TierSizes(0)


def test_planner_picks_the_modelled_minimum():
    stats = ActivationStats.uniform(4, 16, 2)
    budget = 20 * N
    res = plan(stats, budget, SIZES, CAL, step=0.1, prefer_simple=0.0)
    every = [expected_time(stats, s, budget, SIZES, CAL) for s in splits(step=0.1)]
    assert res.seconds_per_token == pytest.approx(min(every))
    simple = plan(stats, budget, SIZES, CAL, step=0.1)  # fewer tiers within 2 % of the minimum
    assert simple.seconds_per_token <= 1.02 * min(every) + 1e-12
    assert sum(v > 0 for v in simple.split.as_dict().values()) <= sum(v > 0 for v in res.split.as_dict().values())
    # budget for everything decoded: all FULL costs nothing
    full = plan(stats, 64 * N, SIZES, CAL, step=0.25)
    assert full.seconds_per_token == 0.0 and full.split.full == 1.0
    paper = plan(stats, budget, SIZES, CAL, tiers=(Tier.FULL, Tier.SM), min_full=0.3, per_layer=True, step=0.1)
    assert paper.split.compressed == 0.0 and paper.split.full >= 0.3


def test_planner_statistics_from_trace_and_policy():
    rng = np.random.default_rng(6)
    seq = build_sequence(Trace(random_counts(rng, 20, 2, 8, 2), 2, "t"))
    st = stats_from_sequence(seq)
    assert st.rank_probs.shape == (2, 8)
    assert np.allclose(st.rank_probs.sum(axis=1), 2.0)
    pol = make_replay_policy("zipmoe", 2, 8, 4 * N, SIZES)
    for s, row in enumerate(seq.steps):
        if s in seq.prompt_start:
            pol.begin_request()
        pol.access(s % 2, row.tolist())
    learned = stats_from_policy(pol, 2)
    assert np.allclose(learned.rank_probs.sum(axis=1), 2.0)
    assert plan(learned, 4 * N, SIZES, CAL, step=0.25).split is not None
    assert plan(None, 4 * N, SIZES, CAL, layers=2, experts=8, k=2, step=0.25).stats_source.startswith("uniform")


def test_calibration_roundtrip(tmp_path):
    cal = CostModel(read_bps=2e9, decode_bps_per_core=1e9, cores=4, decode_bps=3.5e9, compute_bps=5e9,
                      read_method="o_direct", extra={"x": 1})
    p = save_calibration(cal, tmp_path / "c" / "cal.json")
    back = load_calibration(p)
    assert back.read_bps == 2e9 and back.cores == 4 and back.read_method == "o_direct" and back.extra == {"x": 1}
    with pytest.raises(ValueError):
        load_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1, "disk_bps": -1}))
    with pytest.raises(ValueError):
        load_calibration(tmp_path / "bad.json")


# -- prefetch and the benchmark CLI ----------------------------------------------------------------


def test_prefetch_accounting():
    rng = np.random.default_rng(8)
    seq = build_sequence(Trace(random_counts(rng, 20, 4, 10, 2), 2, "t"))
    base = replay(seq, make_replay_policy("zipmoe", 4, 10, 6 * N, SIZES), SIZES, CAL)
    hist = replay(seq, make_replay_policy("zipmoe", 4, 10, 6 * N, SIZES), SIZES, CAL, PrefetchConfig(True))
    perfect = replay(seq, make_replay_policy("zipmoe", 4, 10, 6 * N, SIZES), SIZES, CAL,
                     PrefetchConfig(True, oracle_accuracy=1.0))
    assert base.found == hist.found == perfect.found  # prefetch never changes what is resident
    pf = perfect.prefetch
    assert pf["used"] == pf["issued"] > 0 and pf["precision"] == 1.0
    assert perfect.seconds < base.seconds
    assert 0.0 <= hist.prefetch["precision"] <= 1.0
    assert hist.bytes_read >= base.bytes_read - hist.prefetch["used"] * SIZES.read(Tier.COLD)


def _run_cli(args):
    from typer.testing import CliRunner

    from zipmoe.cli import app

    return CliRunner().invoke(app, args)


def test_bench_cache_synthetic(tmp_path):
    rng = np.random.default_rng(12)
    p = tmp_path / "trace.npy"
    np.save(p, random_counts(rng, 15, 3, 12, 2))
    out = tmp_path / "r.json"
    r = _run_cli(["bench", "cache", "--trace", str(p), "--expert-bytes", str(N), "--budget", "20%",
                  "--budget", str(5 * N), "--top-k", "2", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res == json.loads(out.read_text())
    assert [b["bytes"] for b in res["budgets"]] == [int(0.2 * 36 * N), 5 * N]
    for b in res["budgets"]:
        names = [x["policy"] for x in b["results"]]
        assert names == ["lru", "lfu", "paper", "zipmoe", "zipmoe+prefetch", "belady", "belady-tiered"]
        for x in b["results"]:
            assert sum(x["found"].values()) == x["accesses"] == res["trace"]["tokens"] * 3 * 2
        by = {x["policy"]: x for x in b["results"]}
        assert by["belady"]["found"]["cold"] <= min(by["lru"]["found"]["cold"], by["lfu"]["found"]["cold"])
        assert by["belady"]["exact"] and "gap_to_belady" in by["zipmoe"]
    table = _run_cli(["bench", "cache", "--trace", str(p), "--expert-bytes", str(N), "--budget", "30%",
                      "--policies", "lru,zipmoe"])
    assert table.exit_code == 0 and "zipmoe" in table.output and "planner picks" in table.output


def test_bench_cache_errors(tmp_path):
    p = tmp_path / "t.npy"
    np.save(p, np.ones((2, 2, 4), np.int16))
    r = _run_cli(["bench", "cache", "--trace", str(p), "--budget", "10%"])
    assert r.exit_code == 2 and "expert-bytes" in r.output
    r = _run_cli(["bench", "cache", "--trace", str(tmp_path / "none.npy"), "--expert-bytes", "10", "--budget", "1%"])
    assert r.exit_code == 2 and "none.npy" in r.output
    r = _run_cli(["bench", "cache", "--trace", str(p), "--expert-bytes", "10", "--budget", "lots"])
    assert r.exit_code == 2


def test_bench_cache_real_traces(shared_dir, tmp_path):
    for name, nbytes in (("qwen1.5-moe-a2.7b.npy", 17301504), ("switch-large-128.npy", 25165824)):
        r = _run_cli(["bench", "cache", "--trace", str(shared_dir / "traces" / name), "--expert-bytes", str(nbytes),
                      "--budget", "15%", "--prompts", "8", "--json", "--calibration",
                      str(save_calibration(CostModel(), tmp_path / "cal.json"))])
        assert r.exit_code == 0, r.output
        res = json.loads(r.output)
        assert res["trace"]["prompts"] == 8 and res["calibration"]["disk_bps"] == 1.4e9
        assert len(res["budgets"][0]["results"]) == 7


def test_bench_io_smoke(tmp_path):
    out = tmp_path / "cal.json"
    r = _run_cli(["bench", "io", "--dir", str(tmp_path), "--size-mib", "8", "--read-mib", "1", "--runs", "1",
                  "--cores", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    cal = load_calibration(out)
    assert cal.read_method in ("o_direct", "fadvise_dontneed") and cal.read_bps > 0 and cal.decode_bps > 0
    assert not list(tmp_path.glob("zipmoe-io-*"))  # the scratch file is gone


# -- bounds (defect: an access of more than 32 experts wrote past a 64-slot scratch) ---------------

_WIDE_ACCESS = """
import numpy as np
from zipmoe.bench.sim.policy import make_replay_policy as make_policy
from zipmoe_run.policies import Split
from zipmoe_run.tiers import TierSizes
sizes = TierSizes(1 << 20)
for name, split in (("lru", None), ("lfu", None), ("zipmoe", Split(0.5, 0.5, 0.0))):
    pol = make_policy(name, 2, 60, 20 << 20, sizes, split)
    d = pol.access(0, range(50))
    assert len(d.found) == 50 and all(int(t) == 0 for t in d.found), name
    d = pol.access(0, range(10, 60))
    assert sum(int(t) > 0 for t in d.found) > 0, name
print("ok")
"""


def test_wide_access_within_bounds(tmp_path):
    """A prefill naming 50 of 60 experts, with numba's bounds checks on (in a child with its own numba
    cache: cached kernels do not record whether they were compiled with bounds checks)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    r = subprocess.run([sys.executable, "-c", _WIDE_ACCESS], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_trace_docstring_names_the_repository_relative_traces():
    import zipmoe.bench.sim.trace as trace_mod

    assert "../shared/traces" in trace_mod.__doc__ and "/work/" not in trace_mod.__doc__
