"""The generation benchmark (`zipmoe bench run`) on a tiny checkpoint, one run: the tokens of both
systems agree with each other and with the runtime's own API, the weight bytes per token are the
checkpoint's tensor sizes, and every derived figure follows from the ones it is derived from.
No timing thresholds."""
from __future__ import annotations

import io
import json
import math
import statistics

import pytest

pytest.importorskip("transformers")

NEW, PROMPT = 5, 6


@pytest.fixture(scope="module")
def bench(checkpoint_factory):
    import torch

    from zipmoe.bench.run import run

    ckpt = checkpoint_factory("qwen2_moe", seed=0)
    before = torch.get_num_threads()
    r = run(ckpt, runs=2, new_tokens=NEW, prompt_tokens=PROMPT, threads=1, dtype="float32")
    assert torch.get_num_threads() == before  # the thread count is put back
    return ckpt, r


def _numel(ckpt) -> dict[str, int]:
    """Elements of every tensor of the checkpoint, from the safetensors headers."""
    out: dict[str, int] = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        raw = shard.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        for name, t in header.items():
            if name != "__metadata__":
                out[name] = math.prod(t["shape"])
    return out


def test_tokens_identical_across_systems(bench):
    from zipmoe_run.api import load
    from zipmoe_run.generate import Sampling

    ckpt, r = bench
    ours, ref = r["systems"]["zipmoe"], r["systems"]["transformers"]
    assert len(ours["tokens"]) == NEW and ours["tokens"] == ref["tokens"]
    assert r["first_divergence"] is None
    # the prompt is the benchmark's seeded one; the runtime's public API gives the same tokens
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, json.loads((ckpt / "config.json").read_text())["vocab_size"], (PROMPT,),
                           generator=g).tolist()
    lm = load(ckpt, dtype="float32", threads=1)
    try:
        toks = [ev.token_id for ev in lm.stream([prompt], max_new_tokens=NEW, sampling=Sampling(greedy=True))]
    finally:
        lm.close()
    if len(toks) == NEW:  # the API stops at EOS; the benchmark ignores it
        assert toks == ours["tokens"]
    else:
        assert toks == ours["tokens"][:len(toks)]


def test_schema_and_derived_values(bench):
    _, r = bench
    assert json.loads(json.dumps(r)) == r
    assert (r["benchmark"], r["dtype"], r["threads"], r["runs"]) == ("run", "float32", 1, 2)
    assert (r["prompt_tokens"], r["new_tokens"], r["model_type"]) == (PROMPT, NEW, "qwen2_moe")
    for name in ("zipmoe", "transformers"):
        row = r["systems"][name]
        runs = row["decode_runs_tok_s"]
        assert len(runs) == 2 and all(x > 0 for x in runs)
        assert row["decode_tok_s"] == statistics.median(runs) and row["decode_best_tok_s"] == max(runs)
        assert row["ttft_best_s"] <= row["ttft_s"]
        assert row["prompt_tok_s"] == pytest.approx(PROMPT / row["ttft_s"], rel=1e-12)
        assert row["load_s"] >= 0
    ours, ref = r["systems"]["zipmoe"], r["systems"]["transformers"]
    assert r["decode_ratio"] == pytest.approx(ours["decode_tok_s"] / ref["decode_tok_s"], rel=1e-12)
    assert r["ttft_ratio"] == pytest.approx(ref["ttft_s"] / ours["ttft_s"], rel=1e-12)
    assert set(ref["implementation"]) == {"attention", "experts"}
    assert r["kernels"]["mode"] == "unused" and r["kernels"]["shapes"] == {}  # float32: torch only


def test_decode_step_breakdown_adds_up(bench):
    _, r = bench
    step = r["decode_step"]
    parts = ("attention_s", "routed_experts_s", "shared_expert_s", "router_s", "lm_head_s")
    assert all(step[p] >= 0 for p in parts) and step["other_s"] >= 0
    measured = sum(step[p] for p in parts)
    # other_s is what the hooks did not see: the parts add up to the step unless they overshoot it
    assert measured + step["other_s"] == pytest.approx(max(step["step_s"], measured), rel=1e-9)
    assert step["effective_gb_s"] == pytest.approx(step["weight_bytes_total"] / step["step_s"] / 1e9, rel=1e-12)


def test_weight_bytes_are_the_checkpoints_tensor_sizes(bench):
    """Bytes one decode token reads, by part, against the tensors in the checkpoint (float32: 4 bytes)."""
    ckpt, r = bench
    cfg = json.loads((ckpt / "config.json").read_text())
    numel = _numel(ckpt)

    def total(*suffixes: str) -> int:
        return sum(n for name, n in numel.items() if name.endswith(suffixes))

    e, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    routed = total(".gate_proj.weight", ".up_proj.weight", ".down_proj.weight") - total(
        "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight")
    want = {
        "attention": total("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight") * 4,
        "routed_experts": routed * k // e * 4,  # k of the e experts of every layer
        "shared_expert": total("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                               "shared_expert.down_proj.weight", "shared_expert_gate.weight") * 4,
        "router": total("mlp.gate.weight") * 4,
        "lm_head": total("lm_head.weight") * 4,
    }
    assert r["decode_step"]["weight_bytes"] == want
    assert r["decode_step"]["weight_bytes_total"] == sum(want.values())


def test_table_shows_both_systems(bench):
    from rich.console import Console

    from zipmoe.bench.run import render_table

    _, r = bench
    buf = io.StringIO()
    Console(width=250, file=buf).print(render_table(r))
    text = buf.getvalue()
    assert "zipmoe" in text and "transformers" in text
    assert f"{r['decode_ratio']:.2f}x" in text
    assert f"{r['systems']['zipmoe']['decode_tok_s']:.2f}" in text
    assert "kernels (unused): one-row kernels serve bf16 runs only" in text


def test_bad_requests(checkpoint_factory):
    from zipmoe.bench.errors import BenchInputError
    from zipmoe.bench.run import run

    ckpt = checkpoint_factory("qwen2_moe", seed=0)
    with pytest.raises(BenchInputError, match="unknown system 'nope'"):
        run(ckpt, systems=("nope",))
    with pytest.raises(BenchInputError, match="new_tokens >= 2"):
        run(ckpt, new_tokens=1)
    with pytest.raises(BenchInputError, match="dtype"):
        run(ckpt, dtype="int8")
    with pytest.raises(BenchInputError, match="unknown size"):
        run(None, size="huge")


def test_every_system_loads_its_checkpoint_cold(checkpoint_factory, monkeypatch):
    """The runtime and transformers drop the checkpoint's pages before loading it, as the llama.cpp
    peer does for its GGUF (the same page-cache state for every system: readahead's folios, not what
    the checkpoint's writer left)."""
    from zipmoe.bench import e2e_proc
    from zipmoe.bench.run import run

    ckpt = checkpoint_factory("qwen2_moe", seed=0)
    dropped: list[list[str]] = []
    real = e2e_proc._drop
    monkeypatch.setattr(e2e_proc, "_drop", lambda paths: (dropped.append([str(p) for p in paths]), real(paths)))
    r = run(ckpt, runs=1, new_tokens=2, prompt_tokens=3, threads=1, dtype="float32",
            systems=("zipmoe", "transformers"), breakdown=False)
    assert set(r["systems"]) == {"zipmoe", "transformers"}
    assert dropped == [[str(ckpt)], [str(ckpt)]]  # once per system, before its load
