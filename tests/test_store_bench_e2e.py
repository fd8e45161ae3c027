"""`zipmoe bench e2e --quick`: runs end to end, writes the table, JSON and plot. No timing is asserted."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from zipmoe.bench.cli import app
from zipmoe.bench.e2e_proc import MemCap, kv_cache_bytes, prompt_ids


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    wd = tmp_path_factory.mktemp("e2e")
    out = wd / "r.json"
    res = CliRunner().invoke(app, ["e2e", "--quick", "--budgets", "30", "--workdir", str(wd), "--out", str(out),
                                   "--systems", "zipmoe,zipmoe-lookahead,raw,hf-offload,resident"])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text()), res.output


def test_rows_and_exactness(quick):
    result, text = quick
    rows = result["rows"]
    by = {(r["system"], r["budget_pct"]) for r in rows}
    assert {("zipmoe", 30.0), ("zipmoe-lookahead", 30.0), ("raw", 30.0), ("hf-offload", 30.0), ("resident", None)} <= by
    ours = [r for r in rows if r["system"] in ("zipmoe", "zipmoe-lookahead", "raw", "resident")]
    assert all(r["ok"] for r in ours), [r.get("error") for r in ours]
    for r in ours:
        assert r["tok_s"] > 0 and r["ttft_s"] > 0 and r["io_mode"] in ("O_DIRECT", "buffered+DONTNEED")
        assert set(r["hits"]) == {"full", "comp", "sm", "cold", "prefetch"} and r["peak_rss_bytes"] > 0
        assert (r["prefetch_predicted"] > 0) == (r["system"] == "zipmoe-lookahead")
        assert len(r["tokens"]) == result["config"]["new_tokens"] and r["tokens_warm"] == r["tokens"]
    capped = [r for r in ours if r["system"] != "resident"]
    assert all(r["store_peak_bytes"] <= r["budget_bytes"] for r in capped)
    assert all(r["capped"] or r["cap_note"] for r in rows)  # every uncapped figure says why
    exact = next(t for t in result["targets"] if t["target"].startswith("identical tokens"))
    assert exact["met"]
    la = next(t for t in result["targets"] if "lookahead" in t["target"])
    assert la["value"] > 0 and "accuracy" in la["note"]
    assert "tok/s" in text and "30% budget" in text
    assert result["model"]["expert_bytes"] > 0 and result["machine"]["note"]


def test_emulated_storage_is_labelled(quick, tmp_path_factory):
    """--storage: zipmoe and raw read through the capped reader, resident does not, hf-offload is
    skipped; the JSON and the table say the storage is emulated. Tokens are unchanged."""
    result0, _ = quick
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
        assert len(rows[s]["tok_s_runs"]) == 2 and rows[s]["tok_s"] in rows[s]["tok_s_runs"]  # --repeat: median row
        assert rows[s]["io_throttle_bps"] == 200_000_000 and "(emulated)" in rows[s]["io_mode"]
    assert rows["resident"]["io_throttle_bps"] is None
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
    assert result["model"]["expert_bytes"] > 0
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
        assert r["store_peak_bytes"] <= r["budget_bytes"] and r["tok_s"] > 0
    exact = next(t for t in result["targets"] if t["target"].startswith("identical tokens"))
    assert exact["met"] and not any("hf-offload" in t["target"] for t in result["targets"])
    assert "switch_transformers" in res.output


def test_cli_rejects_bad_arguments(tmp_path):
    r = CliRunner().invoke(app, ["e2e", "--quick", "--systems", "nope", "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and "unknown systems" in r.output
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
    assert (parent is not None and version in (1, 2)) or why
