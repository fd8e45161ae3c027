"""Self-calibration (zipmoe_run.calibrate) and the host line (zipmoe_run.hostinfo): injected rates and
fake clocks, never timing thresholds; every cache in a temporary directory."""
from __future__ import annotations

import json
import logging
import os

import pytest

from zipmoe_run import calibrate
from zipmoe_run.calibrate import Calibrator
from zipmoe_run.hostinfo import _cpuinfo, host_info, host_line, usable_cores
from zipmoe_run.tiers import CostModel

X86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n"
       "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n"
INFO = {"cpu": "Test CPU", "isa": ["avx2"], "machine": "x86_64", "system": "Linux", "cores": 2, "page_bytes": 4096}


class Clock:
    """A fake clock: each reading advances by ``step`` seconds."""

    def __init__(self, step: float = 0.01):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


class Fake:
    """Injected measurements that count their calls."""

    def __init__(self, decode=None, read=1.0e9):
        self.decode_rates = decode or {1: 1.0e9, 2: 1.8e9, 4: 3.0e9}
        self.read_bps = read
        self.decode_calls: list[list[int]] = []
        self.read_calls = 0

    def decode(self, threads, codec=None):
        self.decode_calls.append(list(threads))
        return {str(t): self.decode_rates[t] for t in threads}

    def read(self, path, spans, io_mode):
        self.read_calls += 1
        return None if self.read_bps is None else {"read_bps": self.read_bps, "read_method": "O_DIRECT"}


def cal(tmp_path, fake, info=INFO, version="1.0", **kw) -> Calibrator:
    return Calibrator(tmp_path / "cache", decode_fn=fake.decode, read_fn=fake.read, info=info, version=version,
                      clock=Clock(), **kw)


def test_cpuinfo_parsing():
    assert _cpuinfo(X86) == ("AMD EPYC 9B14", ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"])
    assert _cpuinfo(ARM) == ("", ["asimd", "sve", "bf16", "i8mm"])
    h = host_info()
    assert set(h) - {"huge_pages"} == {"cpu", "isa", "machine", "system", "cores", "page_bytes", "huge_page_bytes"}
    assert h["cores"] >= 1
    line = host_line(INFO, CostModel(read_bps=6.4e8, decode_bps=1.25e9, decode_bps_per_core=1.05e9, cores=2,
                                     read_method="O_DIRECT", source="test").to_json())
    assert line == ("host: Test CPU | avx2 | 2 cores | page 4096 | disk 0.64 GB/s (O_DIRECT) | "
                    "decode 1.05 GB/s 1T, 1.25 GB/s 2T | calibration: test")
    plan = {"decode_threads": 2, "read_depth": 2, "why": "decode 2 of 2 threads: ... measured beside compute (...)"}
    line = host_line(INFO, CostModel(read_bps=6.4e8, decode_bps=1.25e9, decode_bps_per_core=1.05e9, cores=2,
                                     read_method="O_DIRECT", source="test", extra={"cores": plan}).to_json())
    assert "| decode 1.05 GB/s 1T, 1.25 GB/s 2T beside compute | core budget: 2 decoder thread(s)" in line
    assert host_line({**INFO, "huge_page_bytes": 2 << 20}).startswith("host: Test CPU | avx2 | 2 cores | page 4096, huge 2 MiB")
    assert host_line({**INFO, "huge_page_bytes": 0}).endswith("| page 4096, huge none")
    verdict = {"use": 0, "how": "measured", "measured": {"huge_ms_per_mib": 3.3, "small_ms_per_mib": 0.52}}
    assert host_line({**INFO, "huge_page_bytes": 2 << 20, "huge_pages": verdict}).endswith(
        "| page 4096, huge 2 MiB not used (measured: fault 3.30 vs 0.52 ms/MiB)")


def test_decode_cache_hit_miss_per_host_key(tmp_path):
    fake = Fake()
    first = cal(tmp_path, fake).decode(2)
    assert not first["cached"] and first["rates"] == {"1": 1.0e9, "2": 1.8e9}
    assert first["seconds"] == pytest.approx(0.01)  # one tick of the fake clock
    again = cal(tmp_path, fake).decode(2)
    assert again["cached"] and again["rates"] == first["rates"] and fake.decode_calls == [[1, 2]]
    # a larger pool measures only the missing thread count
    wider = cal(tmp_path, fake).decode(4)
    assert fake.decode_calls[-1] == [4] and wider["rates"] == {"1": 1.0e9, "2": 1.8e9, "4": 3.0e9}
    # another CPU, other ISA flags or another core count is another host
    for other in ({**INFO, "cpu": "Other CPU"}, {**INFO, "isa": ["avx2", "avx512f"]}, {**INFO, "cores": 4}):
        n = len(fake.decode_calls)
        assert not cal(tmp_path, fake, info=other).decode(2)["cached"] and len(fake.decode_calls) == n + 1


def test_an_emulated_instruction_set_has_its_own_decode_entry(tmp_path, monkeypatch):
    """The decoder is compiled code: NUMBA_CPU_NAME (with ATEN_CPU_CAPABILITY, an emulated AVX2) measures
    and caches its own decode rates instead of reading and refining the native host's entry."""
    for k in ("ATEN_CPU_CAPABILITY", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_OPT"):
        monkeypatch.delenv(k, raising=False)
    fake = Fake()
    native = cal(tmp_path, fake).decode(2)
    monkeypatch.setenv("NUMBA_CPU_NAME", "haswell")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    fake.decode_rates = {1: 3.0e9, 2: 3.3e9}
    emulated = cal(tmp_path, fake).decode(2)
    assert not emulated["cached"] and emulated["file"] != native["file"] and emulated["rates"]["1"] == 3.0e9
    assert cal(tmp_path, fake).decode(2)["cached"]
    monkeypatch.delenv("NUMBA_CPU_NAME")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    again = cal(tmp_path, fake).decode(2)  # the native entry as it was
    assert again["cached"] and again["file"] == native["file"] and again["rates"] == native["rates"]


def test_version_change_measures_again(tmp_path):
    fake = Fake()
    cal(tmp_path, fake, version="1.0").decode(2)
    fake.decode_rates = {1: 2.0e9, 2: 3.5e9}
    d = cal(tmp_path, fake, version="1.1").decode(2)
    assert not d["cached"] and d["rates"] == {"1": 2.0e9, "2": 3.5e9} and len(fake.decode_calls) == 2
    assert cal(tmp_path, fake, version="1.1").decode(2)["cached"]


def test_an_older_cache_format_is_measured_again_without_a_warning(tmp_path, caplog):
    fake = Fake()
    d = cal(tmp_path, fake).decode(2)
    old = json.loads(open(d["file"]).read())
    old["format"] = calibrate.FORMAT - 1
    open(d["file"], "w").write(json.dumps(old))
    with caplog.at_level(logging.INFO, logger="zipmoe_run.calibrate"):
        again = cal(tmp_path, fake).decode(2)
    assert not again["cached"] and len(fake.decode_calls) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("measuring again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 2, "key": {}, "rates": {"1": 1}}',
                                     b'{"format": 2, "key": null, "rates": {"1": -5}}', b'{"format": 9}', b"[]",
                                     b"\xff\xfe"])
def test_corrupt_cache_file_is_ignored_and_measured_again(tmp_path, caplog, content):
    fake = Fake()
    d = cal(tmp_path, fake).decode(2)
    with open(d["file"], "wb") as f:
        f.write(content)
    with caplog.at_level(logging.WARNING, logger="zipmoe_run.calibrate"):
        again = cal(tmp_path, fake).decode(2)
    assert not again["cached"] and again["rates"] == {"1": 1.0e9, "2": 1.8e9} and len(fake.decode_calls) == 2
    assert any("ignoring calibration cache" in r.getMessage() and d["file"] in r.getMessage() for r in caplog.records)
    assert cal(tmp_path, fake).decode(2)["cached"]  # rewritten whole


def test_forged_key_is_not_a_hit(tmp_path):
    fake = Fake()
    d = cal(tmp_path, fake).decode(2)
    obj = json.loads(open(d["file"]).read())
    obj["key"]["cpu"] = "someone else"
    open(d["file"], "w").write(json.dumps(obj))
    assert not cal(tmp_path, fake).decode(2)["cached"]


def test_read_cache_per_file_system_and_io_mode(tmp_path):
    fake = Fake(read=6.4e8)
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    r = cal(tmp_path, fake).read(f, [(0, 1)], "auto")
    assert not r["cached"] and r["rates"] == {"read_bps": 6.4e8} and r["read_method"] == "O_DIRECT"
    assert r["key"]["fs"] == calibrate.fs_key(f) and r["key"]["io_mode"] == "auto"
    g = tmp_path / "b.bin"  # same file system: the same entry
    g.write_bytes(b"y")
    assert cal(tmp_path, fake).read(g, [(0, 1)], "auto")["cached"] and fake.read_calls == 1
    assert not cal(tmp_path, fake).read(g, [(0, 1)], "buffered")["cached"] and fake.read_calls == 2
    # too little to measure: nothing cached, asked again next time
    small = Fake(read=None)
    assert cal(tmp_path / "s", small).read(f, [(0, 1)]) is None
    assert cal(tmp_path / "s", small).read(f, [(0, 1)]) is None and small.read_calls == 2


def test_current_builds_the_cost_model_and_throttle_caps_it(tmp_path, monkeypatch):
    monkeypatch.delenv(calibrate.ENV_MODE, raising=False)
    fake = Fake(read=6.4e8)
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    c = calibrate.current(f, [(0, 1)], 2, calibrator=cal(tmp_path, fake))
    assert (c.read_bps, c.decode_bps, c.decode_bps_per_core, c.cores) == (6.4e8, 1.8e9, 1.0e9, 2)
    assert c.read_method == "O_DIRECT" and "measured" in c.source and not c.frozen
    assert c.extra["host_key"]["cpu"] == "Test CPU" and c.extra["calibration_s"] == pytest.approx(0.02)
    c2 = calibrate.current(f, [(0, 1)], 2, calibrator=cal(tmp_path, fake))
    assert "cached" in c2.source and (c2.read_bps, c2.decode_bps) == (6.4e8, 1.8e9)
    t = calibrate.current(f, [(0, 1)], 2, throttle_bps=3e8, calibrator=cal(tmp_path, fake))
    assert t.read_bps == 3e8 and t.read_method == "O_DIRECT, throttled"
    assert t.drift.files["read_bps"][0] is None  # an emulated disk never overwrites the real one's entry


def test_off_and_file_overrides(tmp_path, monkeypatch):
    from zipmoe_run.tiers import save_calibration

    monkeypatch.setenv(calibrate.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.setenv(calibrate.ENV_MODE, "off")
    fake = Fake()
    c = calibrate.current(threads=2, calibrator=cal(tmp_path, fake))
    assert fake.decode_calls == [] and "self-calibration off" in c.source and c.decode_bps == CostModel().decode_bps
    assert not (tmp_path / "cache" / "hosts").exists()
    p = save_calibration(CostModel(read_bps=5e8, decode_bps=9e8), tmp_path / "mine.json")
    monkeypatch.setenv(calibrate.ENV_FILE, str(p))
    c = calibrate.current(threads=2, calibrator=cal(tmp_path, fake))
    assert (c.read_bps, c.decode_bps, c.source) == (5e8, 9e8, str(p)) and fake.decode_calls == []


def test_drift_logs_notes_and_updates_the_cache(tmp_path, caplog):
    fake = Fake(read=6.4e8)
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    c = calibrate.current(f, [(0, 1)], 2, calibrator=cal(tmp_path, fake), codec="huf4x")
    c.drift.clock = Clock(1.0)
    for _ in range(10):  # within 2x: no note
        c.observe("read_bps", 1.0e9, 0.25)
    assert c.drift.notes == [] and 6.4e8 < c.read_bps < 1.0e9
    with caplog.at_level(logging.INFO, logger="zipmoe_run.drift"):
        for _ in range(10):  # the decoder now runs beside compute: 4x slower
            c.observe("decode_bps", 0.45e9, 0.25)
    notes = c.drift.notes
    assert len(notes) == 1 and notes[0]["rate"] == "decode_bps" and notes[0]["calibrated_bps"] == 1.8e9
    assert notes[0]["online_bps"] < 0.9e9 and notes[0]["ratio"] < 0.5
    assert any("decode_bps: online estimate" in r.getMessage() for r in caplog.records)
    written = c.drift.finish()  # the run's mean (read_bps stayed within 2x)
    assert written.keys() == {"decode_bps"} and abs(written["decode_bps"] / 0.45e9 - 1) < 1e-9
    d = cal(tmp_path, fake).decode(2)  # the next store starts from the drifted estimate
    assert d["cached"] and d["rates"]["2"] == written["decode_bps"] and d["measured"]["2"] == 1.8e9
    assert d["rates"]["1"] == 1.0e9 and d["drift"][0]["rate"] == "2"


def test_noisy_rates_around_the_calibration_are_no_drift(tmp_path):
    """Contended fetches swing the store's fast estimate past 2x either way, again and again (a real run
    noted 16 drifts in 22 s): that is no drift, no note, no write."""
    c = calibrate.current(threads=2, calibrator=cal(tmp_path, Fake(decode={1: 1e9, 2: 0.9e9})), codec="huf4x")
    before = open(c.drift.files["decode_bps"][0]).read()
    for i in range(200):  # 4 fetches at a third of it, 4 at three times it, ...
        c.observe("decode_bps", (0.3e9, 2.7e9)[i // 4 % 2], 0.25)
    assert c.drift.notes == [] and c.drift.events == 0 and open(c.drift.files["decode_bps"][0]).read() == before


def test_a_run_that_swings_in_phases_writes_its_mean_once_at_the_end(tmp_path):
    """A real 30 % run's contended phases moved the slow average 4.65 -> 1.55 -> 0.77 -> 1.59 -> 3.19 GB/s;
    writing at each crossing (band re-centred) was four cache writes, and writing the first excursion
    made the next run start from one phase's rate and take the other's for a drift, run after run. In
    the run: notes and re-plans against a band that never moves, nothing written; at the end the mean of
    all the run's samples, written only where it lies outside the band."""
    c = calibrate.current(threads=2, calibrator=cal(tmp_path, Fake(decode={1: 2.8e9, 2: 4.65e9})), codec="huf4x")
    path, key = c.drift.files["decode_bps"]
    start = c.drift.base["decode_bps"]
    before = open(path).read()
    for phase in (1.2e9, 0.5e9, 1.6e9, 3.6e9, 1.0e9):  # 40 fetches each
        for _ in range(40):
            c.observe("decode_bps", phase, 0.25)
    assert open(path).read() == before  # nothing written during the run
    assert c.drift.base["decode_bps"] == start and all(n["calibrated_bps"] == start for n in c.drift.notes)
    back = [n for n in c.drift.notes if n.get("back")]
    assert len(c.drift.notes) == 3 and len(back) == 1 and c.drift.events == 3  # left, back (3.6), left (1.0)
    mean = (1.2e9 * 0.5e9 * 1.6e9 * 3.6e9 * 1.0e9) ** 0.2
    written = c.drift.finish()
    assert written.keys() == {"decode_bps"} and abs(written["decode_bps"] / mean - 1) < 1e-9
    assert c.drift.finish() == {}  # once
    d = json.loads(open(path).read())
    assert d["rates"][key] == written["decode_bps"] and len(d["drift"]) == 1 and d["measured"][key] == start


def test_phases_around_the_calibration_write_nothing_at_the_end(tmp_path):
    """Phases on both sides of the calibration (contended prefill, quieter decode steps) whose mean is
    within 2x of it: the next run starts from the same calibration."""
    c = calibrate.current(threads=2, calibrator=cal(tmp_path, Fake(decode={1: 1.0e9, 2: 0.9e9})), codec="huf4x")
    path = c.drift.files["decode_bps"][0]
    before = open(path).read()
    for phase in (0.35e9, 3.0e9, 0.4e9, 2.5e9):  # each beyond 2x, their mean within it
        for _ in range(40):
            c.observe("decode_bps", phase, 0.25)
    assert c.drift.events >= 2 and c.drift.finish() == {} and open(path).read() == before


def test_a_store_without_a_codec_never_writes_a_codecs_decode_entry(tmp_path):
    """A ``--raw`` archive (or a folder) has no codec: its store starts from the default codec's decode
    rates but its "decode" is a copy (4.5 GB/s here against 2 for huf4x), which it wrote into huf4x's
    entry; the next huf4x run then started from it. Only the codec's own store updates its entry."""
    raw = calibrate.current(threads=2, calibrator=cal(tmp_path, Fake(decode={1: 1e9, 2: 0.9e9})))
    coded = calibrate.current(threads=2, calibrator=cal(tmp_path, Fake(decode={1: 1e9, 2: 0.9e9})), codec="huf4x")
    assert raw.drift.files["decode_bps"][0] is None and coded.drift.files["decode_bps"][0] is not None
    path = coded.drift.files["decode_bps"][0]
    before = open(path).read()
    for _ in range(40):
        raw.observe("decode_bps", 4.5e9, 0.25)
    assert raw.drift.events == 1 and raw.drift.finish() == {} and open(path).read() == before


def test_an_average_at_the_band_edge_is_one_drift_not_a_toggle(tmp_path):
    """A 30 % run's read rate sat at half its calibration (0.55-0.62 GB/s against 1.2): eight notes of
    leaving and coming back, each a re-plan. Coming back takes a clearly smaller distance."""
    c = calibrate.current(threads=2, calibrator=cal(tmp_path, Fake(decode={1: 1e9, 2: 0.9e9})), codec="huf4x")
    base = c.drift.base["decode_bps"]
    for i in range(400):  # the samples alternate just outside and just inside the 2x band
        c.observe("decode_bps", base * (0.42, 0.58)[i // 6 % 2], 0.25)
    assert c.drift.events == 1 and not c.drift.notes[0].get("back")
    for _ in range(60):  # clearly back
        c.observe("decode_bps", base, 0.25)
    assert c.drift.events == 2 and c.drift.notes[-1]["back"]


def test_frozen_cost_model_ignores_observations():
    c = CostModel(frozen=True)
    c.observe("read_bps", 1.0, 0.5)
    assert c.read_bps == CostModel().read_bps
    c = CostModel()
    c.observe("read_bps", 0.4e9, 0.5)
    assert c.read_bps == 0.9e9


def test_to_json_leaves_out_the_drift_watcher(tmp_path):
    fake = Fake()
    c = calibrate.current(threads=2, calibrator=cal(tmp_path, fake))
    j = c.to_json()
    assert "drift" not in j and j["decode_bps"] == 1.8e9 and json.loads(json.dumps(j)) == j
    assert CostModel.from_json(j).decode_bps == 1.8e9


def test_measure_decode_and_read_on_a_fake_clock(store_archive):
    """The real measurement code, timed by a fake clock: rates are the bytes over the clock's ticks."""
    from formats.reader import Archive

    res = calibrate.measure_decode([1, 2], chunk_elements=4096, chunks=4, runs=2, clock=Clock(0.5))
    rate = 4 * 2 * 4096 / 0.5
    assert res == {"1": rate, "2": rate, "1+compute": rate, "2+compute": rate}  # alone, then beside compute
    path, _ = store_archive(0)
    with Archive(path) as ar:
        spans = [(e.offset, e.length) for e in ar.index.experts]
    while sum(-(-n // 4096) * 4096 for _, n in spans) > calibrate.READ_TARGET:  # what one pass reads whole
        spans.pop()
    r = calibrate.measure_read(path, spans, clock=Clock(0.25), depths=(1,))
    assert r["read_method"] in ("O_DIRECT", "buffered+DONTNEED")
    assert sum(-(-n // 4096) * 4096 for _, n in spans) <= calibrate.READ_TARGET  # this archive: all of it is read
    assert sum(n for _, n in spans) <= r["bytes"] <= calibrate.READ_TARGET and r["reads"] == len(spans)
    assert r["read_bps"] == r["bytes"] / 0.25
    assert calibrate.measure_read(path, spans[:1]) is None or spans[0][1] >= calibrate.READ_MIN
    deep = calibrate.measure_read(path, spans, clock=Clock(0.25), depths=(1, 2, 4))
    # the pieces are split between the depths (other bytes each time); each depth's rate is its own
    assert set(deep["depth_bps"]) in ({1, 2, 4}, {1}) and deep["read_bps"] == deep["depth_bps"][1]
    assert deep["bytes"] < r["bytes"] or set(deep["depth_bps"]) == {1}


def _seed_cache(path, threads: int) -> None:
    """Injected calibration for this host and ``path``'s file system (what the store must start from)."""
    c = Calibrator()
    c.record({1: 1.1e9, threads: 2.2e9}, path, "auto", 7.7e8, "O_DIRECT", how="test")


def test_archive_source_starts_from_the_calibration_and_reports_it(store_archive, tmp_path, monkeypatch):
    from zipmoe_run.archive_source import ArchiveSource

    monkeypatch.setenv(calibrate.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(calibrate.ENV_MODE, raising=False)
    path, _ = store_archive(0)
    _seed_cache(path, 2)
    with ArchiveSource(path, threads=2, memory_budget=None, preload=False) as src:
        assert (src.store.cost.read_bps, src.store.cost.decode_bps) == (7.7e8, 2.2e9)
        src.store.cost.observe("read_bps", 1.1e9, 0.5)
        st = src.stats()
    assert st["read_bps_est"] == 9.35e8  # the online estimate; the calibration is what it started from
    c = st["calibration"]
    assert (c["disk_bps"], c["decode_bps"], c["decode_bps_per_core"], c["cores"]) == (7.7e8, 2.2e9, 1.1e9, 2)
    assert c["read_method"] == "O_DIRECT" and "cached" in c["source"] and c["drift"] == [] and c["drift_events"] == 0
    assert st["host"] == host_info()
    json.dumps(st)  # the stats stay JSON


def test_run_cli_json_stats_carry_the_calibration(store_archive, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from zipmoe_run.cli import app

    monkeypatch.setenv(calibrate.ENV_DIR, str(tmp_path / "cache"))
    path, _ = store_archive(0)
    _seed_cache(path, os.cpu_count())  # the decoder pool's size when --threads is not given
    r = CliRunner().invoke(app, [str(path), "--prompt-ids", "1,2,3", "-n", "2", "--json",
                                 "--memory-budget", "50%"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)["stats"]
    assert st["calibration"]["disk_bps"] == 7.7e8 and st["calibration"]["decode_bps"] == 2.2e9
    assert st["host"]["cores"] == host_info()["cores"]


def test_bench_codec_reports_host_and_calibration(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from zipmoe.bench.cli import app

    monkeypatch.setenv(calibrate.ENV_DIR, str(tmp_path / "cache"))
    Calibrator().record({1: 1.1e9, usable_cores(): 2.2e9}, how="test")
    args = ["codec", "--elements", "3000", "--runs", "1", "--datasets", "mixed"]
    r = CliRunner().invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["host"] == host_info() and res["calibration"]["decode_bps_per_core"] == 1.1e9
    assert res["host_line"] == host_line(res["host"], res["calibration"])
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == res["host_line"]


def test_bench_io_writes_the_self_calibration(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from zipmoe.bench.cli import app

    monkeypatch.setenv(calibrate.ENV_DIR, str(tmp_path / "cache"))
    r = CliRunner().invoke(app, ["io", "--dir", str(tmp_path), "--size-mib", "8", "--read-mib", "1", "--runs", "1",
                                 "--cores", "1", "--json", "--out", str(tmp_path / "cal.json")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert len(res["self_calibration_files"]) == 2 and res["host"] == host_info()
    c = Calibrator()
    d = c.decode(1)
    assert d["cached"] and d["rates"]["1"] == res["decode"]["1"] and d["by"] == "zipmoe bench io"
    rd = c.read(tmp_path, [(0, 1)], "auto")
    assert rd["cached"] and rd["rates"]["read_bps"] == res["read"]["bps"]
    assert res["calibration"]["extra"]["host_key"] == c.key


def test_bad_calibration_files(tmp_path, monkeypatch, caplog):
    """A corrupt `bench io` file never stops a store from opening; a bad ZIPMOE_CALIBRATION is one line."""
    monkeypatch.setenv(calibrate.ENV_DIR, str(tmp_path))
    (tmp_path / "calibration.json").write_text('{"version": 1, "disk_bps": -1}')
    with caplog.at_level(logging.WARNING, logger="zipmoe_run.calibrate"):
        c = calibrate.current(threads=2, calibrator=cal(tmp_path, Fake()))
    assert c.decode_bps == 1.8e9 and c.read_method == "assumed, not measured"
    assert any("calibration.json" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(calibrate.ENV_FILE, str(tmp_path / "calibration.json"))
    with pytest.raises(calibrate.CalibrationError, match="ZIPMOE_CALIBRATION: .*calibration.json"):
        calibrate.current(threads=2, calibrator=cal(tmp_path, Fake()))


def test_bench_io_file_of_this_host_gives_read_and_compute(tmp_path, monkeypatch):
    from zipmoe_run.tiers import save_calibration

    monkeypatch.setenv(calibrate.ENV_DIR, str(tmp_path))
    c0 = cal(tmp_path, Fake())
    save_calibration(CostModel(read_bps=6e8, compute_bps=5e9, read_method="o_direct",
                               extra={"host_key": c0.key}))
    c = calibrate.current(threads=2, calibrator=c0)
    assert (c.read_bps, c.compute_bps, c.read_method) == (6e8, 5e9, "o_direct (bench io)")
    other = calibrate.current(threads=2, calibrator=cal(tmp_path, Fake(), info={**INFO, "cpu": "Other"}))
    assert (other.read_bps, other.compute_bps) == (CostModel().read_bps, CostModel().compute_bps)


def test_unwritable_cache_still_calibrates(tmp_path, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    fake = Fake()
    with caplog.at_level(logging.WARNING, logger="zipmoe_run.calibrate"):
        d = Calibrator(blocker, decode_fn=fake.decode, info=INFO, version="1").decode(2)
    assert d["rates"] == {"1": 1.0e9, "2": 1.8e9} and not d["cached"]
    assert any("cannot write calibration cache" in r.getMessage() for r in caplog.records)
