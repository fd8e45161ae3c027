"""Smoke test of the generation benchmark (tiny checkpoint, one run; no timing thresholds)."""
from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("transformers")


def test_bench_run_tiny(checkpoint_factory):
    from rich.console import Console

    from zipmoe.bench.run import render_table, run

    ckpt = checkpoint_factory("qwen2_moe", seed=0)
    r = run(ckpt, runs=1, new_tokens=4, prompt_tokens=5, threads=1)
    json.dumps(r)
    for s in ("zipmoe", "transformers"):
        row = r["systems"][s]
        assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0 and len(row["tokens"]) == 4
    assert r["decode_ratio"] > 0
    step = r["decode_step"]
    assert step["step_s"] > 0 and step["weight_bytes_total"] > 0
    Console(width=200, file=io.StringIO()).print(render_table(r))
    with pytest.raises(ValueError, match="system"):
        run(ckpt, systems=("nope",))
