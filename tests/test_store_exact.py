"""The budgeted store changes nothing: logits equal the all-resident run bit for bit at every budget.

Random budgets (from the minimum up to more than everything), decoder thread counts, policies, I/O
modes and cost models (a slow-disk model pushes experts into the COMP and SM tiers, so every tier and
every demotion path is exercised), on per-expert, fused and ``--raw`` archives.
"""
from __future__ import annotations

import random

import pytest
import torch

from zipmoe_pack.pack import PackOptions, pack
from zipmoe_run.api import load
from zipmoe_run.policies import DensityPolicy
from zipmoe_run.tiers import CostModel

PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11, 64, 8]]
STEPS = 5
DIMS = {"experts": 16, "top_k": 4, "hidden": 128, "moe_intermediate": 256, "layers": 2}


@pytest.fixture(scope="module", params=[("qwen2_moe", "per-expert", False), ("qwen2_moe", "fused", False),
                                        ("olmoe", "per-expert", False), ("qwen2_moe", "per-expert", True)],
                ids=lambda p: f"{p[0]}-{p[1]}" + ("-raw" if p[2] else ""))
def archive(request, checkpoint_factory, tmp_path_factory):
    family, layout, raw = request.param
    src = checkpoint_factory(family, layout=layout, seed=7, dims=DIMS, peaky_router=False)
    arc = tmp_path_factory.mktemp("store-exact") / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=4096, raw=raw))
    return arc


def _logits(arc, **opts):
    lm = load(arc, dtype="bfloat16", threads=opts.pop("threads", 2), **opts)
    try:
        m = lm.model
        out = []
        with torch.no_grad():
            cache = m.new_cache(1, len(PROMPT[0]) + STEPS + 1)
            x = m(torch.tensor(PROMPT), cache, 0)
            out.append(x.clone())
            tok = x[:, -1:].argmax(-1)
            for i in range(STEPS):
                y = m(tok, cache, len(PROMPT[0]) + i)
                out.append(y.clone())
                tok = y[:, -1:].argmax(-1)
        lm.source.store.drain_prefetch()  # a cancelled guess may still be in flight
        st = lm.source.stats()
        return out, st
    finally:
        lm.close()


@pytest.fixture(scope="module")
def reference(archive):
    """The all-resident logits at each thread count (computed on first use): which one-row kernel a
    shape runs is chosen per host and thread count (``kernel_select``), and kernels sum in different
    orders, so a budgeted run is compared with the resident run at its own thread count."""
    refs: dict[int, list] = {}

    def at(threads: int) -> list:
        if threads not in refs:
            refs[threads] = _logits(archive, threads=threads)[0]
        return refs[threads]
    return at


def _check(archive, reference, **opts):
    ref = reference(opts.get("threads", 2))
    got, st = _logits(archive, **opts)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    led_ok = st["store_peak_bytes"] <= (st["budget_bytes"] or float("inf"))
    assert led_ok, st
    assert st["staging_bytes"] == 0 and st["draining_bytes"] == 0  # every reservation came back
    return st


def test_minimum_budget_is_exact(archive, reference):
    with load(archive, threads=2) as lm:
        minimum = lm.source.store.min_budget
    st = _check(archive, reference, memory_budget=minimum)
    assert st["hits_cold"] > 0


def test_random_budgets_threads_policies(archive, reference):
    rng = random.Random(1234)
    with load(archive, threads=2) as lm:
        minimum, need = lm.source.store.min_budget, lm.source.store.expert_bytes
    seen_tiers = set()
    for _ in range(8):
        budget = rng.randint(minimum, int(need * 1.3))
        slow_disk = rng.random() < 0.5
        cost = CostModel(read_bps=2e6 if slow_disk else 3e9, decode_bps=2e9, read_share=1.0 if slow_disk else 0.2,
                         frozen=True)
        st = _check(archive, reference, memory_budget=budget, threads=rng.randint(1, 3),
                    policy=rng.choice(["density", "lru"]), io_mode=rng.choice(["auto", "buffered"]), cost=cost)
        seen_tiers |= {t for t in ("full", "comp", "sm", "cold") if st[f"hits_{t}"]}
    assert {"full", "cold"} <= seen_tiers


def test_slow_disk_uses_lower_tiers_exactly(archive, reference):
    """A slow-disk cost model and a tight budget: the density policy keeps COMP/SM experts."""
    with load(archive, threads=2) as lm:
        minimum, need = lm.source.store.min_budget, lm.source.store.expert_bytes
        raw = all(p.encoding == "raw" for e in lm.source.archive.index.experts for p in e.parts)
    cost = CostModel(read_bps=1e6, decode_bps=2e9, read_share=1.0, frozen=True)
    policy = DensityPolicy(cost, tie=0.1)  # tiny experts: page rounding costs SM a few % vs COMP
    st = _check(archive, reference, memory_budget=max(minimum, int(need * 0.45)), cost=cost, policy=policy)
    placed_lower = st.get("placed_comp", 0) + st.get("placed_sm", 0) + st.get("demote_full_sm", 0) \
        + st.get("demote_comp_sm", 0)
    if raw:
        assert placed_lower == 0  # raw archive: only FULL and COLD are worth anything
    else:
        assert placed_lower > 0 and st["hits_comp"] + st["hits_sm"] > 0


def test_unlimited_and_percent_budgets(archive, reference):
    for b in (None, "100%", "auto", "35%"):
        _check(archive, reference, memory_budget=b)


def test_lookahead_prefetch_and_preload_are_exact(archive, reference):
    """Router lookahead and load-time preload change timing only, never a bit."""
    rng = random.Random(99)
    with load(archive, threads=2) as lm:
        minimum, need = lm.source.store.min_budget, lm.source.store.expert_bytes
        lookahead = lm.model.set_lookahead(True) if hasattr(lm.model, "set_lookahead") else 0
    for _ in range(3):
        budget = rng.randint(minimum, int(need * 0.8))
        st = _check(archive, reference, memory_budget=budget, prefetch="lookahead", threads=rng.randint(1, 2))
        assert (st["prefetch_predicted"] > 0) == (lookahead > 0)
    st = _check(archive, reference, memory_budget=int(need * 1.1), prefetch="lookahead")
    assert st["preloaded"] == st["experts_decoded"] > 0 and st["hits_cold"] == 0
    st = _check(archive, reference, memory_budget="50%", preload=True)
    assert st["preloaded"] > 0
