"""`zipmoe bench e2e --quick`: runs end to end, writes the table, JSON and plot. No timing is asserted:
the tokens, byte counts, hit counts, budgets and every figure derived from another are."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from formats.reader import Archive
from zipmoe.bench.cli import app
from zipmoe.bench.e2e import QUICK_DIMS, SWITCH_QUICK_DIMS
from zipmoe.bench.e2e_proc import MemCap, kv_cache_bytes, prompt_ids

RUNTIME = ("zipmoe", "zipmoe-lookahead", "raw", "resident")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    wd = tmp_path_factory.mktemp("e2e")
    out = wd / "r.json"
    res = CliRunner().invoke(app, ["e2e", "--quick", "--budgets", "30", "--workdir", str(wd), "--out", str(out),
                                   "--systems", "zipmoe,zipmoe-lookahead,raw,hf-offload,resident"])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text()), res.output, wd


def _passes(result):
    return ("", "_warm") if result["config"]["warm_pass"] else ("",)


def _check_row(r: dict, result: dict) -> None:
    """What holds for every successful row, whatever the timings."""
    new = result["config"]["new_tokens"]
    for tag in _passes(result):
        assert len(r["tokens" + tag]) == new
        # tokens/s counts the tokens after the first over the time after the first
        assert r["tok_s" + tag] == pytest.approx((new - 1) / r["decode_s" + tag], rel=1e-9)
        assert r["tpot_s" + tag] == pytest.approx(r["decode_s" + tag] / (new - 1), rel=1e-9)
        assert r["ttft_s" + tag] >= r["prefill_s" + tag] >= 0
    if r["system"] in RUNTIME:
        assert r["io_mode"].split(",")[0] in ("O_DIRECT", "buffered+DONTNEED")
        assert set(r["hits"]) == {"full", "comp", "sm", "cold", "prefetch"}
        assert r["prefetch_correct"] <= r["prefetch_predicted"]
        assert (r["prefetch_predicted"] > 0) == (r["system"] == "zipmoe-lookahead")
        assert r["dense_bytes"] == result["model"]["dense_bytes"]
    pct = r["budget_pct"]
    if pct is None:
        assert r["budget_bytes"] is None
    else:  # the budget is the share of the routed experts' decoded bytes, and the store kept to it
        assert r["budget_bytes"] == int(result["model"]["expert_bytes"] * pct / 100)
        if r["system"] != "hf-offload":
            assert r["store_peak_bytes"] <= r["budget_bytes"]
    if r["capped"]:  # the kernel held the child to its cap
        assert r["cap_note"] is None and r["cap_limit_bytes"] > 0
        if r.get("cap_peak_bytes") is not None:
            assert r["cap_peak_bytes"] <= r["cap_limit_bytes"]
    else:
        assert r["cap_note"]  # every uncapped figure says why


def _accesses(r: dict, tag: str = "") -> int:
    return sum(r["hits" + tag].values())


def test_rows_and_exactness(quick):
    result, text, wd = quick
    rows = result["rows"]
    assert {(r["system"], r["budget_pct"]) for r in rows} == {
        ("zipmoe", 30.0), ("zipmoe-lookahead", 30.0), ("raw", 30.0), ("hf-offload", 30.0), ("resident", None)}
    assert all(r["ok"] for r in rows), [r.get("error") for r in rows]
    for r in rows:
        _check_row(r, result)
    by = {r["system"]: r for r in rows}
    ref = by["resident"]["tokens"]
    for r in rows:  # every system, both passes: the same greedy tokens
        assert r["tokens"] == ref and r["tokens_warm"] == ref, r["system"]
    # the same tokens route the same way: every runtime system, every pass, asks for as many experts
    d = QUICK_DIMS
    n = _accesses(by["resident"])
    assert all(_accesses(by[s], tag) == n for s in RUNTIME for tag in _passes(result))
    new = result["config"]["new_tokens"]
    assert (new - 1) * d["layers"] * d["top_k"] + d["layers"] * d["top_k"] <= n
    assert n <= (new - 1) * d["layers"] * d["top_k"] + d["layers"] * d["experts"]
    # resident decoded every expert before timing: nothing read, everything found decoded
    for tag in _passes(result):
        assert by["resident"]["bytes_read" + tag] == 0 and by["resident"]["hits" + tag]["full"] == n
    # experts are cold at the start: the first pass reads; the raw archive reads whole BF16 extents
    (raw_archive,) = wd.glob("*-raw.zmoe")
    with Archive(raw_archive) as a:
        lengths = {e.length for e in a.index.experts}
        assert lengths == {e.decoded_nbytes for e in a.index.experts}  # raw: stored as decoded
    (length,) = lengths
    for s in ("zipmoe", "zipmoe-lookahead", "raw"):
        r = by[s]
        assert r["hits"]["cold"] > 0 and r["bytes_read"] > 0, s
    raw = by["raw"]
    for tag in _passes(result):
        got = raw["hits" + tag]["cold"] + raw["hits" + tag]["prefetch"]
        assert raw["bytes_read" + tag] % length == 0 and raw["bytes_read" + tag] // length >= got
    # the model: routed experts' decoded bytes from the dimensions, compressed smaller
    m = result["model"]
    assert m["expert_bytes"] == d["layers"] * d["experts"] * 3 * d["hidden"] * d["moe_intermediate"] * 2
    assert 0 < m["extent_bytes"] < m["expert_bytes"]
    # the targets are computed from the rows
    t = {x["target"]: x for x in result["targets"]}
    assert t["identical tokens: zipmoe and raw at every budget (both passes) vs resident"]["met"] is True
    raw_t = t["30% budget: zipmoe tokens/s >= 1.3x raw"]
    assert raw_t["value"] == pytest.approx(by["zipmoe"]["tok_s"] / raw["tok_s"], rel=1e-12)
    assert raw_t["met"] == (raw_t["value"] >= 1.3)
    hf_t = t["30% budget: zipmoe tokens/s >= 5.0x hf-offload"]
    assert hf_t["value"] == pytest.approx(by["zipmoe"]["tok_s"] / by["hf-offload"]["tok_s"], rel=1e-12)
    la, z = by["zipmoe-lookahead"], by["zipmoe"]
    la_t = t["30% budget: router lookahead prefetch tokens/s vs without"]
    assert la_t["value"] == pytest.approx(la["tok_s"] / z["tok_s"], rel=1e-12)
    assert f"accuracy {la['prefetch_correct'] / la['prefetch_predicted']:.0%} of {la['prefetch_predicted']} " \
           f"guesses" in la_t["note"]
    assert "tok/s" in text and "30% budget" in text and result["machine"]["note"]
    assert result["primed"]["ok"] is True and "Host primed by one uncapped run" in " ".join(text.split())
    assert result["machine"]["cpus"] >= 1 and result["config"]["quick"] is True


def test_emulated_storage_is_labelled(quick, tmp_path_factory):
    """--storage: zipmoe and raw read through the capped reader, resident does not, hf-offload is
    skipped; the JSON and the table say the storage is emulated. Tokens are unchanged."""
    result0, _, _ = quick
    assert result0["storage"]["emulated"] is False
    wd = tmp_path_factory.mktemp("e2e-emu")
    out = wd / "r.json"
    res = CliRunner().invoke(app, ["e2e", "--quick", "--budgets", "30", "--workdir", str(wd), "--out", str(out),
                                   "--systems", "zipmoe,raw,hf-offload,resident", "--storage", "200M",
                                   "--no-warm-pass", "--repeat", "2"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    sto = result["storage"]
    assert sto["emulated"] and sto["bps"] == 200_000_000 and sto["skipped"] == ["hf-offload"]
    assert "EMULATED" in res.output and "hf-offload skipped" in " ".join(res.output.split())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"zipmoe", "raw", "resident"}
    assert all(r["ok"] for r in rows.values()), [r.get("error") for r in rows.values()]
    for s in ("zipmoe", "raw"):
        runs = rows[s]["tok_s_runs"]  # --repeat 2: the row of the median (lower middle) run
        assert len(runs) == 2 and rows[s]["tok_s"] == sorted(runs)[0] and rows[s]["runs_failed"] == 0
        assert rows[s]["io_throttle_bps"] == 200_000_000 and "(emulated)" in rows[s]["io_mode"]
    assert rows["resident"]["io_throttle_bps"] is None
    # the spread: run j of zipmoe over run j of raw (alternated, adjacent in time), and each row's range
    from zipmoe.bench.e2e_report import _tok_s

    t = next(x for x in result["targets"] if x["target"] == "30% budget: zipmoe tokens/s >= 1.3x raw")
    want = [a / b for a, b in zip(rows["zipmoe"]["tok_s_runs"], rows["raw"]["tok_s_runs"])]
    assert t["paired"] == pytest.approx(want, rel=1e-12) and f"{min(want):.2f}-{max(want):.2f}x" in t["note"]
    lo, hi = min(rows["zipmoe"]["tok_s_runs"]), max(rows["zipmoe"]["tok_s_runs"])
    assert _tok_s(rows["zipmoe"]) == f"{rows['zipmoe']['tok_s']:.2f} ({lo:.1f}-{hi:.1f})"
    assert _tok_s({"tok_s": 3.0}) == "3.00"
    for r in rows.values():
        _check_row(r, result)
    ref = {r["system"]: r["tokens"] for r in result0["rows"] if r["budget_pct"] in (30.0, None)}
    for s in ("zipmoe", "raw", "resident"):
        assert rows[s]["tokens"] == ref[s]
    r = CliRunner().invoke(app, ["e2e", "--quick", "--storage", "fast", "--workdir", str(wd)])
    assert r.exit_code == 2


def test_switch_family_quick(tmp_path):
    """--family switch_transformers: the encoder-decoder runs through the same budgets; zipmoe and raw
    give resident's tokens; hf-offload is skipped and the JSON and table say so. No timing is asserted."""
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["e2e", "--quick", "--family", "switch_transformers", "--budgets", "30",
                                   "--workdir", str(tmp_path), "--out", str(out),
                                   "--systems", "zipmoe,raw,hf-offload,resident"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["model"]["family"] == "switch_transformers" and result["model"]["dims"]["top_k"] == 1
    d = SWITCH_QUICK_DIMS  # wi [d_ff, d_model] + wo [d_model, d_ff] BF16, sparse blocks in encoder and decoder
    assert result["model"]["expert_bytes"] == 2 * d["sparse_layers"] * d["experts"] * 2 * d["hidden"] * d["intermediate"] * 2
    assert result["hf_offload"]["skipped"] and "hf-offload skipped" in " ".join(res.output.split())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"zipmoe", "raw", "resident"}
    assert all(r["ok"] for r in rows.values()), [r.get("error") for r in rows.values()]
    ref = rows["resident"]["tokens"]
    assert len(ref) == result["config"]["new_tokens"]
    assert len(set(ref)) > 1  # the untied head: the decoder does not echo its start token at every step
    for s in ("zipmoe", "raw"):
        r = rows[s]
        assert r["budget_pct"] == 30.0 and r["tokens"] == ref and r["tokens_warm"] == ref
        _check_row(r, result)
    exact = next(t for t in result["targets"] if t["target"].startswith("identical tokens"))
    assert exact["met"] and not any("hf-offload" in t["target"] for t in result["targets"])
    assert "switch_transformers" in res.output


def test_cli_rejects_bad_arguments(tmp_path):
    r = CliRunner().invoke(app, ["e2e", "--quick", "--systems", "nope", "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and "unknown systems" in r.output and len(r.stderr.splitlines()) == 1
    r = CliRunner().invoke(app, ["e2e", "--quick", "--budgets", "x", "--workdir", str(tmp_path)])
    assert r.exit_code == 2
    r = CliRunner().invoke(app, ["e2e", "--quick", "--family", "mixtral", "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and "--family" in r.output


def test_helpers():
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4, "hidden_size": 2048}
    assert kv_cache_bytes(cfg, 1, 10) == 2 * 2 * 4 * 128 * 10 * 2
    sw = {"is_encoder_decoder": True, "num_layers": 4, "num_decoder_layers": 4, "num_heads": 16, "d_kv": 64}
    assert kv_cache_bytes(sw, 1, 10) == 2 * 2 * 4 * 16 * 64 * 10 * 2  # self + cross K/V of the decoder
    ids = prompt_ids(16, 4096)
    assert len(ids) == 16 and all(3 <= i < 4096 for i in ids)
    parent, version, why = MemCap.parent()
    if parent is None:  # no cgroup to cap with: version 0 and a reason
        assert version == 0 and why
    else:
        assert version in (1, 2) and why == "" and parent.is_dir()


def test_the_host_is_primed_by_one_short_uncapped_run_before_the_timed_ones(monkeypatch, tmp_path):
    """The runtime's first-sight measurements (kernels, huge pages) hold memory for a moment: one short
    uncapped run makes them before any capped run, at the smallest budget; its failure is reported."""
    from zipmoe.bench import e2e

    calls = []

    def fake_run_one(system, pct, prep, cfg, capped, idx):
        calls.append((system, pct, capped, cfg.new_tokens, cfg.prompt_tokens, cfg.warm_pass))
        return {"ok": len(calls) == 1, "wall_s": 1.5, "error": None if len(calls) == 1 else "exit 1: boom"}

    monkeypatch.setattr(e2e, "run_one", fake_run_one)
    cfg = e2e.E2EConfig(workdir=tmp_path, budgets=(60.0, 30.0), systems=("raw", "resident"), prompt_tokens=16)
    assert e2e.prime({}, cfg) == {"wall_s": 1.5, "ok": True}
    assert calls == [("zipmoe", 30.0, False, 2, 4, False)]
    assert e2e.prime({}, cfg) == {"wall_s": 1.5, "ok": False, "error": "exit 1: boom"}
    assert e2e.prime({}, e2e.E2EConfig(workdir=tmp_path, systems=("llamacpp",)))["skipped"]
    assert len(calls) == 2
