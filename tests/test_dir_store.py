"""A checkpoint directory under a memory budget: experts read from the shards by the ExpertStore.

Bit-identical to the unbudgeted directory run and to the archive run at every budget; the budget is
never exceeded; a cold fetch reads the aligned ranges enclosing the expert's bytes; a shard that
changes on disk stops generation with one line; shards that refuse O_DIRECT fall back with a note.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import shutil

import pytest
import torch

from formats.errors import InputError
from zipmoe_pack.pack import PackOptions, pack
from zipmoe_run.api import load, open_source
from zipmoe_run.source import DirectorySource
from zipmoe_run.store import dirbytes
from zipmoe_run.store.budget import BudgetError
from zipmoe_run.store.dirbytes import ShardChangedError
from zipmoe_run.tiers import Tier

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]
STEPS = 3
DIMS = {"experts": 16, "top_k": 2, "layers": 2}
CASES = [("qwen2_moe", "per-expert"), ("qwen2_moe", "fused"), ("mixtral", "per-expert"), ("olmoe", "fused")]


def _run(path, **kw) -> tuple[list[torch.Tensor], dict]:
    """Prompt logits, then STEPS greedy one-token steps: every logits tensor, and the source's stats."""
    lm = load(path, threads=2, **kw)
    try:
        model, out = lm.model, []
        with torch.no_grad():
            cache = model.new_cache(1, len(PROMPT) + STEPS + 1)
            x = model(torch.tensor([PROMPT]), cache, 0)  # [1, T, V]
            out.append(x.clone())
            for i in range(STEPS):
                x = model(x[:, -1:].argmax(-1), cache, len(PROMPT) + i)  # [1, 1, V]
                out.append(x.clone())
        return out, lm.source.stats()
    finally:
        lm.close()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request, checkpoint_factory, tmp_path_factory):
    family, layout = request.param
    src = checkpoint_factory(family, layout=layout, seed=3, dims=DIMS)
    arc = tmp_path_factory.mktemp(f"dirstore-{family}-{layout}") / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=4096))
    return src, arc


def _random_budget(src) -> int:
    with DirectorySource(src, memory_budget="100%", preload=False) as s:
        lo, hi = s.store.min_budget, s.store.expert_bytes
    return random.Random(7).randrange(lo + (hi - lo) // 10, hi)


def test_budgets_bit_identical_to_unbudgeted_and_archive(case):
    src, arc = case
    ref, st0 = _run(src)
    assert "budget_bytes" not in st0  # no budget: the mapped directory as before
    arch, _ = _run(arc, memory_budget="30%")
    assert all(torch.equal(a, b) for a, b in zip(ref, arch))
    for budget in ("15%", "30%", "60%", "100%", _random_budget(src)):
        got, st = _run(src, memory_budget=budget)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), budget
        assert st["store_peak_bytes"] <= st["budget_bytes"], budget
        assert st["resident_comp_bytes"] == st["resident_sm_bytes"] == 0
        assert st["hits_comp"] == st["hits_sm"] == 0
        assert st["io_mode"] in ("O_DIRECT", "buffered+DONTNEED")
        if budget == "100%":  # a budget of the experts' size preloads them while the directory opens
            assert st["preloaded"] > 0 and st["hits_full"] > 0


def test_store_offers_full_and_cold_only(case):
    src, _ = case
    with DirectorySource(src, memory_budget="30%", threads=2) as s:
        infos = s.store.infos
        assert infos and all(i.tiers == (Tier.COLD, Tier.FULL) for i in infos.values())
        assert s.store.expert_bytes == sum(e.decoded_nbytes for e in s.store.extents.values())


def test_directory_store_starts_from_this_hosts_calibration(case, monkeypatch):
    """Like an archive's store, a directory's starts from the host's calibration (reads measured on
    a shard's expert bytes) and reports it with the host in its stats."""
    from zipmoe_run import calibrate

    seen = {}
    real = calibrate.current

    def spy(path=None, spans=None, *a, **kw):
        seen.update(path=path, spans=spans)
        return real(path, spans, *a, **kw)

    monkeypatch.setattr(calibrate, "current", spy)
    src, _ = case
    with DirectorySource(src, memory_budget="30%", threads=2) as s:
        st = s.stats()
        assert s.store.cost.to_json() == {k: v for k, v in st["calibration"].items()
                                          if k not in ("drift", "drift_events")}
    assert seen["path"].parent == src and seen["path"].suffix == ".safetensors" and seen["spans"]
    assert all(0 < off and 0 < n for off, n in seen["spans"])
    assert st["host"]["cores"] >= 1 and "drift" in st["calibration"]


def test_cold_fetch_reads_the_experts_bytes(case):
    """Bytes read per cold fetch: the 4096-aligned ranges enclosing the expert's parts (BF16 bytes + less
    than two pages per range), and the tensors equal the mapped ones."""
    src, _ = case
    experts = [3, 0, 11, 7]
    with DirectorySource(src) as plain, DirectorySource(src, memory_budget="100%", preload=False, threads=2,
                                                             policy="lru") as s:
        want = {e: {k: v.clone() for k, v in w.items()} for e, w in plain.fetch(1, experts)}
        before = s.stats()["bytes_read"]
        got = {e: {k: v.clone() for k, v in w.items()} for e, w in s.fetch(1, experts)}
        read = s.stats()["bytes_read"] - before
        exts = [s.store.extents[(None, 1, e)] for e in experts]
        bf16 = sum(p.nbytes for x in exts for p in x.parts)
        assert read == sum(x.read_bytes for x in exts)
        assert bf16 <= read < bf16 + sum(2 * 4096 * len(x.spans) for x in exts)
        assert all(p.dtype == "BF16" for x in exts for p in x.parts)
        assert s.stats()["experts_decoded"] == len(experts)
        assert set(got) == set(want)
        for e in experts:
            assert set(got[e]) == set(want[e])
            assert all(torch.equal(got[e][k], want[e][k]) for k in want[e])
        again = dict(s.fetch(1, experts))  # FULL now: nothing read
        assert s.stats()["bytes_read"] - before == read and len(again) == len(experts)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_bf16_experts(checkpoint_factory, dtype):
    """Experts of any dtype are copied, never cast: the fetched tensors equal the mapped ones byte for byte,
    and every budget gives the same logits. (Against the mapped run, fp32 weights give logits ~1e-7 apart
    in the one-token steps, as the archive run does: the kernels see differently aligned fp32 weights.)"""
    src = checkpoint_factory("qwen2_moe", seed=4, dims=DIMS, dtype=dtype)
    st_dtype = {"float32": "F32", "float16": "F16"}[dtype]
    with DirectorySource(src) as plain, DirectorySource(src, memory_budget="30%", preload=False) as s:
        assert {p.dtype for x in s.store.extents.values() for p in x.parts} == {st_dtype}
        want = {e: {k: v.clone() for k, v in w.items()} for e, w in plain.fetch(0, [2, 9])}
        for e, w in s.fetch(0, [2, 9]):
            assert all(w[k].dtype == want[e][k].dtype and torch.equal(w[k], want[e][k]) for k in want[e])
    ref, st = _run(src, dtype="float32", memory_budget="30%")
    assert st["store_peak_bytes"] <= st["budget_bytes"] and st["experts_decoded"] > 0
    for budget in ("15%", "100%"):
        got, st = _run(src, dtype="float32", memory_budget=budget)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), budget
        assert st["store_peak_bytes"] <= st["budget_bytes"]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _touch_shard(d):
    shard = sorted(d.glob("*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    return shard


def test_changed_shard_stops_generation_with_one_line(checkpoint_factory, tmp_path):
    src = _copy(checkpoint_factory("qwen2_moe", seed=3, dims=DIMS, shards=1), tmp_path / "m")
    lm = load(src, threads=2, memory_budget="30%")
    try:
        shard = _touch_shard(src)
        with pytest.raises(ShardChangedError) as ei:
            lm.generate([PROMPT], max_new_tokens=2)
        msg = str(ei.value)
        assert isinstance(ei.value, InputError) and "\n" not in msg
        assert msg.startswith(f"{shard}: changed on disk") and "modification time" in msg
    finally:
        lm.close()
    with DirectorySource(src, memory_budget="30%", preload=False) as s:  # reopened: the new file is used
        with open(sorted(src.glob("*.safetensors"))[0], "ab") as f:
            f.write(b"\0" * 10)
        with pytest.raises(ShardChangedError, match=r"size \d+ bytes, was \d+"):
            dict(s.fetch(0, [1]))


def test_o_direct_refused_falls_back_with_a_note(case, monkeypatch, caplog):
    src, _ = case
    ref, _ = _run(src, memory_budget="30%")
    monkeypatch.setattr(dirbytes, "probe_direct", lambda path: "injected refusal")
    with caplog.at_level(logging.WARNING, logger="zipmoe_run.store.dirbytes"):
        got, st = _run(src, memory_budget="30%")
    assert st["io_mode"] == "buffered+DONTNEED"
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    notes = [r.getMessage() for r in caplog.records if "O_DIRECT" in r.getMessage()]
    assert len(notes) == 1 and str(src) in notes[0] and "injected refusal" in notes[0]


def test_o_direct_read_failing_mid_run_falls_back(case, monkeypatch, caplog):
    src, _ = case
    ref, _ = _run(src, memory_budget="30%")
    with DirectorySource(src, memory_budget="30%", preload=False) as s:
        if s.store.io_mode != "O_DIRECT":
            pytest.skip("this file system refuses O_DIRECT (the probe path is tested above)")
    real = dirbytes.ShardFile._pread

    def flaky(self, fd, view, offset):
        if fd == self.fd_direct:
            raise OSError(errno.EINVAL, "Invalid argument (injected)")
        return real(self, fd, view, offset)

    monkeypatch.setattr(dirbytes.ShardFile, "_pread", flaky)
    with caplog.at_level(logging.WARNING, logger="zipmoe_run.store.dirbytes"):
        got, st = _run(src, memory_budget="30%")
    assert st["io_mode"] == "buffered+DONTNEED"
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert any("O_DIRECT read refused" in r.getMessage() for r in caplog.records)


def test_budget_below_minimum_and_plain_open(checkpoint_factory):
    src = checkpoint_factory("qwen2_moe", seed=3, dims=DIMS)
    with pytest.raises(BudgetError) as ei:
        DirectorySource(src, memory_budget=4096)
    assert "below the minimum" in str(ei.value) and "\n" not in str(ei.value)
    s = open_source(src, threads=2, policy="lru")  # store options without a budget: the mapped directory
    try:
        assert s.store is None and s.budget is None and not hasattr(s, "prefetch")
    finally:
        s.close()
    s = open_source(src, threads=2, memory_budget="50%", policy="lru")
    try:
        assert s.store is not None and s.budget.nbytes == s.stats()["budget_bytes"]
        assert s.stats()["policy"] == "lru"
    finally:
        s.close()


def test_cli_directory_budget_and_changed_shard(checkpoint_factory, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from zipmoe_run.cli import app

    src = _copy(checkpoint_factory("qwen2_moe", seed=3, dims=DIMS), tmp_path / "m")

    def run(*extra):
        return CliRunner().invoke(app, [str(src), "--prompt-ids", "5,17,42", "-n", "4", "--json", *extra])

    plain, budgeted = run(), run("--memory-budget", "100%", "--preload", "off")  # auto would preload
    assert plain.exit_code == 0 and budgeted.exit_code == 0, budgeted.output
    a, b = json.loads(plain.stdout), json.loads(budgeted.stdout)
    assert a["token_ids"] == b["token_ids"] and "budget_bytes" not in a["stats"]
    assert b["stats"]["store_peak_bytes"] <= b["stats"]["budget_bytes"] and b["stats"].get("preloaded", 0) == 0
    real = dirbytes.ShardFile._pread

    def touch_then_read(self, fd, view, offset):  # the shard is modified while the run reads it
        _touch_shard(src)
        return real(self, fd, view, offset)

    monkeypatch.setattr(dirbytes.ShardFile, "_pread", touch_then_read)
    r = run("--memory-budget", "30%")
    assert r.exit_code != 0 and "Traceback" not in r.output
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "changed on disk while the model was running" in msg
    assert str(sorted(src.glob("*.safetensors"))[0]) in msg and not r.stdout


def test_encoder_decoder_experts_by_stack(checkpoint_factory):
    """switch_transformers: experts keyed by (stack, layer, expert) come out of the shards unchanged."""
    src = checkpoint_factory("switch_transformers", seed=3)
    with DirectorySource(src) as plain, DirectorySource(src, memory_budget="30%", preload=False, threads=2) as s:
        keys = sorted(s.store.extents, key=lambda k: (k[0], k[1], k[2]))
        assert {k[0] for k in keys} == {"encoder", "decoder"}
        for stack in ("encoder", "decoder"):
            layer = min(k[1] for k in keys if k[0] == stack)
            experts = sorted(k[2] for k in keys if k[:2] == (stack, layer))[:3]
            want = {e: {k: v.clone() for k, v in w.items()} for e, w in plain.fetch(layer, experts, stack)}
            for e, w in s.fetch(layer, experts, stack):
                assert set(w) == set(want[e]) and all(torch.equal(w[k], want[e][k]) for k in w)
        assert s.stats()["store_peak_bytes"] <= s.stats()["budget_bytes"]


def test_io_direct_refused_is_one_line_and_throttle(checkpoint_factory, monkeypatch):
    from zipmoe_run.store.buffers import Buffer
    from zipmoe_run.store.io import StoreIOError

    src = checkpoint_factory("qwen2_moe", seed=3, dims=DIMS, shards=1)
    monkeypatch.setattr(dirbytes, "probe_direct", lambda path: "injected refusal")
    with pytest.raises(StoreIOError) as ei:
        DirectorySource(src, memory_budget="30%", io_mode="direct")
    assert str(ei.value) == f"{src / 'model.safetensors'}: injected refusal"
    # the throttle: one device for every shard, sleeping until the bytes fit the rate (injected clock)
    shard = src / "model.safetensors"
    now, slept = [0.0], []
    f = dirbytes.ShardFile(shard, shard.stat().st_size, "buffered")
    r = dirbytes.ShardReaders(src, [f], throttle_bps=1e6, clock=lambda: now[0], sleep=slept.append)
    buf = Buffer(3 * 4096)
    try:
        assert [r.read(0, buf, 4096 * i, 4096, 4096 * i, "t") for i in range(3)] == [4096] * 3
        assert slept == pytest.approx([0.004096, 0.008192, 0.012288]) and r.mode == "buffered+DONTNEED"
        with open(shard, "rb") as fh:
            assert bytes(buf.arr[:3 * 4096]) == fh.read(3 * 4096)
    finally:
        buf.close()
        r.close()
