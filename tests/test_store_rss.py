"""Peak RSS stays within base + dense + KV + budget + FIXED_OVERHEAD (specs/runtime.md section 8).

Runs in a fresh process so the peak (VmHWM, reset after imports and warm-up) belongs to this run
only. The archive's routed experts are ~7x the budget, so a store that kept what it read would fail.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zipmoe_pack.pack import PackOptions, pack

FIXED_OVERHEAD = 96 << 20  # specs/runtime.md section 8
DIMS = {"experts": 32, "top_k": 4, "hidden": 512, "moe_intermediate": 1024, "layers": 2, "vocab": 1024}

CHILD = textwrap.dedent("""
    import json, sys
    from zipmoe.bench.e2e_proc import _reset_peak, _rss, _status, kv_cache_bytes, prompt_ids, warm_up_runtime
    from zipmoe_run.api import load
    from zipmoe_run.generate import Sampling

    arc, budget, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    warm_up_runtime(threads)
    base = _rss()
    if not _reset_peak():
        print(json.dumps({"skip": "cannot reset VmHWM"}))
        sys.exit(0)
    lm = load(arc, dtype="bfloat16", threads=threads, memory_budget=budget)
    ids = prompt_ids(12, lm.source.config["vocab_size"])
    toks = [ev.token_id for ev in lm.stream(ids, max_new_tokens=10, sampling=Sampling(greedy=True))]
    st = lm.source.stats()
    print(json.dumps({"base": base, "peak": _status("VmHWM"), "dense": st["dense_bytes"],
                      "kv": kv_cache_bytes(lm.source.config, 1, 12 + 10), "budget": st["budget_bytes"],
                      "store_peak": st["store_peak_bytes"], "bytes_read": st["bytes_read"],
                      "expert_bytes": st["expert_bytes"], "tokens": len(toks)}))
""")


@pytest.fixture(scope="module")
def arc(checkpoint_factory, tmp_path_factory):
    src = checkpoint_factory("qwen2_moe", seed=21, dims=DIMS, peaky_router=False)
    out = tmp_path_factory.mktemp("rss") / "m.zmoe"
    pack(src, out, PackOptions(threads=2))
    return out


@pytest.mark.parametrize("budget", ["15%", "40%"])
def test_peak_rss_within_budget(arc, budget):
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", CHILD, str(arc), budget, "2"], capture_output=True, text=True,
                       timeout=600, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if "skip" in r:
        pytest.skip(r["skip"])
    assert r["tokens"] == 10
    if budget == "15%":
        assert r["bytes_read"] > 2 * r["budget"]  # experts really streamed through the budget
    assert r["store_peak"] <= r["budget"]
    limit = r["base"] + r["dense"] + r["kv"] + r["budget"] + FIXED_OVERHEAD
    assert r["peak"] <= limit, {k: v / 2**20 for k, v in r.items()}
    # a store keeping every expert it read would have needed this much more than the budget
    assert r["expert_bytes"] > 2 * r["budget"]
