"""Per-host choice of the one-row bf16 kernel: measured once (injected timings here, never the clock),
cached per host key, reused, forced by ZIPMOE_KERNEL, reported in the stats, re-measured when corrupt."""
from __future__ import annotations

import json

import os

import pytest
import torch

from zipmoe_run import kernel_select as ks
from zipmoe_run import kernel_select_rows as R
from zipmoe_run import kernels
from zipmoe_run.calibrate import Calibrator

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba kernel unavailable: nothing to choose")

SHAPES = [(64, 128), (128, 64), (32, 32)]
#: fake bytes/s: numba faster on the first two shapes, torch on the third
FAKE = {(64, 128): {"numba": 9e9, "torch": 3e9}, (128, 64): {"numba": 8e9, "torch": 7e9},
        (32, 32): {"numba": 1e9, "torch": 2e9}}


class FakeMeasure:
    def __init__(self, table=FAKE):
        self.table, self.calls = table, []

    def __call__(self, shapes, threads, kerns):
        self.calls.append((list(shapes), threads, list(kerns)))
        return {s: {k: self.table[s][k] for k in kerns} for s in shapes}


def _cal(tmp_path, cpu="CPU A"):
    info = {"cpu": cpu, "isa": ["avx2"], "cores": 2, "machine": "x86_64"}
    return Calibrator(tmp_path, info=info, version="test", force=False)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(ks.ENV, raising=False)
    monkeypatch.delenv(R.ROWS_ENV, raising=False)
    monkeypatch.delenv(R.PREFILL_ENV, raising=False)
    monkeypatch.delenv("ZIPMOE_RUN_KERNELS", raising=False)
    monkeypatch.setattr(ks, "_dp_available", lambda: False)  # the dp tests below inject it
    # prefill choices (tests/test_kernel_prefill.py): injected, never the clock; torch at every M here
    monkeypatch.setattr(R, "measure_rows", lambda shapes, threads: {
        s: {m: {"numba": 1e9, "dp": 1e9, "torch": 2e9} for m in R.ROW_COUNTS} for s in shapes})
    ks.reset()
    yield
    ks.reset()


def test_fastest_per_shape_is_chosen_and_reported(tmp_path):
    fake = FakeMeasure()
    rep = ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert len(fake.calls) == 1 and sorted(fake.calls[0][0]) == sorted(SHAPES) and fake.calls[0][1] == 2
    assert kernels.CHOICE == {(64, 128, 2): "numba", (128, 64, 2): "numba", (32, 32, 2): "torch"}
    assert rep["mode"] == "auto" and rep["measured_shapes"] == 3
    assert rep["shapes"]["32x32@2"] == {"kernel": "torch", "gbps": {"numba": 1.0, "torch": 2.0}, "how": "measured"}
    assert rep["shapes"]["64x128@2"]["gbps"] == {"numba": 9.0, "torch": 3.0}
    assert "32x32@2 torch (numba 1.0, torch 2.0 GB/s)" in ks.line(rep)


def test_cache_is_reused_on_the_same_host_and_keyed_by_host(tmp_path):
    fake = FakeMeasure()
    ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    files = list((tmp_path / "hosts").glob("kernels-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["rates"]["32x32@2:torch"] == 2e9
    ks.reset()  # a new process on the same host: nothing measured, the same choices
    again = FakeMeasure({s: {"numba": 1.0, "torch": 1e12} for s in SHAPES})  # would pick torch everywhere
    rep = ks.choose(SHAPES, 2, measure_fn=again, calibrator=_cal(tmp_path))
    assert again.calls == []
    assert {k: v["kernel"] for k, v in rep["shapes"].items()} == {"64x128@2": "numba", "128x64@2": "numba",
                                                                   "32x32@2": "torch"}
    assert all(v["how"] == "cached" for v in rep["shapes"].values())
    ks.reset()  # another host (other CPU model): measured afresh, into its own file
    rep = ks.choose(SHAPES, 2, measure_fn=again, calibrator=_cal(tmp_path, cpu="CPU B"))
    assert len(again.calls) == 1
    assert all(v["kernel"] == "torch" for v in rep["shapes"].values())
    assert len(list((tmp_path / "hosts").glob("kernels-*.json"))) == 2
    ks.reset()  # another thread count on the first host: measured, not taken from the 2-thread entry
    fake3 = FakeMeasure()
    ks.choose(SHAPES, 1, measure_fn=fake3, calibrator=_cal(tmp_path))
    assert len(fake3.calls) == 1 and fake3.calls[0][1] == 1


def test_an_emulated_instruction_set_is_a_separate_cache_entry(tmp_path, monkeypatch):
    ks.choose(SHAPES, 2, measure_fn=FakeMeasure(), calibrator=_cal(tmp_path))
    ks.reset()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    fake = FakeMeasure()
    ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert len(fake.calls) == 1
    assert len(list((tmp_path / "hosts").glob("kernels-*.json"))) == 2


def test_in_process_choice_is_not_measured_twice(tmp_path):
    fake = FakeMeasure()
    ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    ks.choose(SHAPES[:2], 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert len(fake.calls) == 1


def test_corrupt_cache_is_measured_again(tmp_path):
    ks.choose(SHAPES, 2, measure_fn=FakeMeasure(), calibrator=_cal(tmp_path))
    (f,) = (tmp_path / "hosts").glob("kernels-*.json")
    for bad in (b"{not json", b'{"format": 1, "rates": {"a": 1, "a": 2}}', json.dumps({"format": 1}).encode()):
        f.write_bytes(bad)
        ks.reset()
        fake = FakeMeasure()
        rep = ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
        assert len(fake.calls) == 1 and rep["measured_shapes"] == 3
        assert json.loads(f.read_text())["rates"]["64x128@2:numba"] == 9e9  # rewritten whole


@pytest.mark.parametrize("old_format", [1, 2, 3, 4])
def test_rates_measured_for_an_older_gemv_are_measured_again(tmp_path, old_format):
    """Cache format 1 holds rates of the GEMV that read its input as two float32 vectors (slower at
    large K than the bf16-pair input of format 2), format 2 of the one called through numpy views
    (about 10 us more per call than the by-address call of format 3), format 3 rates timed over a span
    no larger than the cache (flattered; format 4 spans twice the largest cache), format 4 medians of one
    kernel's passes in a row (a busy spell decided the choice; format 5 alternates): not reused."""
    ks.choose(SHAPES, 2, measure_fn=FakeMeasure(), calibrator=_cal(tmp_path))
    (f,) = (tmp_path / "hosts").glob("kernels-*.json")
    old = json.loads(f.read_text())
    old["format"] = old_format
    f.write_text(json.dumps(old))
    ks.reset()
    fake = FakeMeasure()
    rep = ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert len(fake.calls) == 1 and rep["measured_shapes"] == 3
    assert json.loads(f.read_text())["format"] == ks.CACHE_FORMAT == 7


@pytest.mark.parametrize("forced", ["numba", "torch"])
def test_forced_kernel_is_honoured_without_measuring(tmp_path, monkeypatch, forced):
    monkeypatch.setenv(ks.ENV, forced)
    fake = FakeMeasure()
    rep = ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert fake.calls == [] and rep["mode"] == forced
    assert {v["kernel"] for v in rep["shapes"].values()} == {forced}
    assert all(v["how"] == "forced" for v in rep["shapes"].values())


def test_linear_dispatches_to_the_chosen_kernel(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g).bfloat16()
    x = torch.randn(1, 128, generator=g).bfloat16()
    t = torch.get_num_threads()
    called = []
    real = kernels._gemv_linear
    monkeypatch.setattr(kernels, "_gemv_linear", lambda *a: called.append("numba") or real(*a))
    ks.choose([(64, 128)], t, measure_fn=FakeMeasure(), calibrator=_cal(tmp_path))  # numba faster
    y = kernels.linear(x, w)
    assert called == ["numba"]
    ks.reset()
    ks.choose([(64, 128)], t, measure_fn=FakeMeasure({(64, 128): {"numba": 1e9, "torch": 5e9}}),
              calibrator=_cal(tmp_path / "other"))
    y2 = kernels.linear(x, w)
    assert called == ["numba"]  # torch's this time
    assert torch.equal(y2.view(torch.int16), torch.nn.functional.linear(x, w).view(torch.int16))
    assert y.shape == y2.shape == (1, 64)


def test_an_unknown_shape_is_chosen_on_first_use(monkeypatch, tmp_path):
    monkeypatch.setenv("ZIPMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ks, "measure", FakeMeasure({(48, 96): {"numba": 1e9, "torch": 4e9}}))
    kernels.linear(torch.ones(1, 96).bfloat16(), torch.ones(48, 96).bfloat16())
    assert kernels.CHOICE[(48, 96, torch.get_num_threads())] == "torch"
    assert ks.measure.calls and ks.report()["shapes"][f"48x96@{torch.get_num_threads()}"]["how"] == "measured"


def test_real_measurement_returns_a_rate_per_kernel_and_shape():
    fake_clock = iter(range(10**6))
    got = ks.measure([(16, 64), (8, 32)], 1, ["numba", "torch"], timer=lambda: next(fake_clock) * 1e-3)
    assert set(got) == {(16, 64), (8, 32)}
    for (n, k), per in got.items():
        assert set(per) == {"numba", "torch"}
        # every timed pass is 1 ms on the fake clock, divided over the shape's distinct matrices
        m = max(2, min(ks.MAX_MATS, -(-ks.span_bytes() // (n * k * 2)) + 1))
        assert per["numba"] == pytest.approx(n * k * 2 * m / 1e-3)
        assert per["torch"] == pytest.approx(n * k * 2 * m / 1e-3)


def test_stats_of_a_run_report_the_choice(checkpoint_factory, monkeypatch):
    from zipmoe_run import load

    monkeypatch.setenv(ks.ENV, "torch")
    ckpt = checkpoint_factory("qwen2_moe")
    with load(ckpt, dtype="bfloat16") as lm:
        res = lm.generate([1, 2, 3], max_new_tokens=3)
        stats: dict = {}
        list(lm.stream([1, 2, 3], max_new_tokens=3, stats=stats))
    for st in (res.stats, stats):
        rep = st["kernels"]
        assert rep["mode"] == "torch" and rep["shapes"]
        assert {v["kernel"] for v in rep["shapes"].values()} == {"torch"}
    shapes = {tuple(map(int, k.split("@")[0].split("x"))) for k in res.stats["kernels"]["shapes"]}
    assert set(ks.model_shapes(lm.model)) <= shapes
    with load(ckpt, dtype="float32") as lm:
        res = lm.generate([1, 2, 3], max_new_tokens=2)
    assert res.stats["kernels"]["mode"] == "unused" and res.stats["kernels"]["shapes"] == {}


def test_a_near_tie_keeps_the_fixed_order_kernel(tmp_path):
    """torch must beat the numba GEMV by the margin to be chosen: near-ties do not flip between fresh
    measurements, and the kernel whose result is the same on every instruction set is kept."""
    rates = {(32, 32): {"numba": 10.0e9, "torch": 10.9e9},  # 9 % faster: within the margin
             (64, 64): {"numba": 10.0e9, "torch": 11.2e9}}  # 12 % faster: torch

    def fake(shapes, threads, avail):
        return {s: {kn: rates[s][kn] for kn in avail} for s in shapes}

    ks.choose(list(rates), 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert kernels.CHOICE[(32, 32, 2)] == "numba" and kernels.CHOICE[(64, 64, 2)] == "torch"


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_routed_expert_shapes_are_chosen_at_load_alike_for_archive_and_directory(checkpoint_factory, tmp_path,
                                                                                 layout, monkeypatch):
    """The routed experts' shapes come from the source, the same for an archive and its directory, and
    are chosen when the model loads rather than inside the first decode step."""
    from zipmoe_pack.pack import PackOptions, pack
    from zipmoe_run.api import load

    src = checkpoint_factory("qwen2_moe", layout=layout, seed=2)
    arc = tmp_path / "m.zmoe"
    pack(src, arc, PackOptions(threads=2))
    asked = []
    real = ks.choose

    def spy(shapes, *a, **kw):
        asked.append(sorted(shapes))
        def flat(shapes_, threads, kerns):  # any shape: numba twice torch's rate
            return {sh: {k: (2e9 if k == "numba" else 1e9) for k in kerns} for sh in shapes_}

        kw.pop("measure_fn", None)  # load's own (which waits for a preload) is replaced by the flat one
        return real(shapes, *a, measure_fn=flat, calibrator=_cal(tmp_path), **kw)

    monkeypatch.setattr(ks, "choose", spy)
    got = {}
    for path in (src, arc):
        with load(path, dtype="bfloat16", threads=2) as lm:
            got[path] = lm.source.expert_shapes()
    assert got[src] == got[arc] and got[src]
    cfg = lm.source.config
    assert (cfg["hidden_size"], cfg["moe_intermediate_size"]) in got[src]  # down_proj, in both layouts
    assert len(asked) == 2 and asked[0] == asked[1] and set(got[src]) <= set(asked[0])


# ---- the dp kernel as a one-row candidate (availability and timings injected; tests/test_kernels_dp1.py runs it)

DP_FAKE = {(64, 128): {"numba": 9e9, "torch": 3e9, "dp": 12e9},  # dp 1.33x numba: dp
           (128, 64): {"numba": 8e9, "torch": 7e9, "dp": 8.5e9},  # dp within the margin: numba
           (32, 32): {"numba": 1e9, "torch": 2e9, "dp": 1.5e9}}  # torch


def test_dp_is_a_candidate_where_available_and_chosen_by_measurement(tmp_path, monkeypatch):
    monkeypatch.setattr(ks, "_dp_available", lambda: True)
    assert ks.available() == ["numba", "torch", "dp"]
    fake = FakeMeasure(DP_FAKE)
    rep = ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert fake.calls[0][2] == ["numba", "torch", "dp"]
    assert kernels.CHOICE == {(64, 128, 2): "dp", (128, 64, 2): "numba", (32, 32, 2): "torch"}
    assert rep["shapes"]["64x128@2"]["gbps"] == {"numba": 9.0, "torch": 3.0, "dp": 12.0}
    assert "64x128@2 dp (numba 9.0, torch 3.0, dp 12.0 GB/s)" in ks.line(rep)
    (f,) = (tmp_path / "hosts").glob("kernels-*.json")
    assert json.loads(f.read_text())["rates"]["64x128@2:dp"] == 12e9
    ks.reset()  # cached: the same choice without measuring
    again = FakeMeasure({s: {"numba": 1.0, "torch": 1.0, "dp": 1.0} for s in SHAPES})
    ks.choose(SHAPES, 2, measure_fn=again, calibrator=_cal(tmp_path))
    assert again.calls == [] and kernels.CHOICE[(64, 128, 2)] == "dp"


def test_dp_is_never_a_candidate_where_unavailable(tmp_path):
    assert ks.available() == ["numba", "torch"]
    fake = FakeMeasure(DP_FAKE)
    ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert fake.calls[0][2] == ["numba", "torch"] and "dp" not in set(kernels.CHOICE.values())


def test_a_cache_without_dp_rates_is_measured_again_where_dp_is_available(tmp_path, monkeypatch):
    ks.choose(SHAPES, 2, measure_fn=FakeMeasure(DP_FAKE), calibrator=_cal(tmp_path))  # no dp: numba, torch
    ks.reset()
    monkeypatch.setattr(ks, "_dp_available", lambda: True)
    fake = FakeMeasure(DP_FAKE)
    rep = ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert len(fake.calls) == 1 and sorted(fake.calls[0][0]) == sorted(SHAPES) and "dp" in fake.calls[0][2]
    assert rep["measured_shapes"] == 3 and kernels.CHOICE[(64, 128, 2)] == "dp"
    (f,) = (tmp_path / "hosts").glob("kernels-*.json")
    assert all(f"{n}x{k}@2:dp" in json.loads(f.read_text())["rates"] for n, k in SHAPES)


@pytest.mark.parametrize("dp_here", [True, False])
def test_forced_dp_kernel(tmp_path, monkeypatch, dp_here):
    """ZIPMOE_KERNEL=dp: dp for every shape where it is available, else the numba GEMV."""
    monkeypatch.setattr(ks, "_dp_available", lambda: dp_here)
    monkeypatch.setenv(ks.ENV, "dp")
    fake = FakeMeasure(DP_FAKE)
    rep = ks.choose(SHAPES, 2, measure_fn=fake, calibrator=_cal(tmp_path))
    assert fake.calls == [] and rep["mode"] == "dp"
    assert {v["kernel"] for v in rep["shapes"].values()} == {"dp" if dp_here else "numba"}


def test_the_timing_span_is_at_least_twice_the_largest_cache(tmp_path, monkeypatch):
    from zipmoe_run import hostinfo

    for i, (kind, size) in enumerate([("Data", "48K"), ("Instruction", "32K"), ("Unified", "2048K"),
                                      ("Unified", "96M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    assert hostinfo.largest_cache_bytes(str(tmp_path)) == 96 << 20
    assert hostinfo.largest_cache_bytes(str(tmp_path / "absent")) == 0
    monkeypatch.setattr(hostinfo, "largest_cache_bytes", lambda: 96 << 20)
    assert ks.span_bytes() == 2 * (96 << 20)
    monkeypatch.setattr(hostinfo, "largest_cache_bytes", lambda: 0)
    assert ks.span_bytes() == ks.SPAN_BYTES
    monkeypatch.setattr(hostinfo, "largest_cache_bytes", lambda: 480 << 20)  # a VM's sysfs: its host's L3
    assert ks.span_bytes() == ks.SPAN_MAX == 256 << 20


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc/self/statm")
def test_a_small_shape_is_timed_without_touching_the_whole_span(monkeypatch):
    """The matrices of a small shape are spread over the span, but only they are written: the timing
    of 32 matrices of 64 KiB over a 256 MiB span faults in about 2 MiB, not the span."""
    from zipmoe_run import hostinfo

    monkeypatch.setattr(hostinfo, "largest_cache_bytes", lambda: 1 << 30)
    seen = []
    real = ks._mats

    def spy(elems, n, k, m):
        before = _rss_now()
        mats = real(elems, n, k, m)
        seen.append((_rss_now() - before, m, elems))
        return mats

    monkeypatch.setattr(ks, "_mats", spy)
    ks.measure([(32, 1024)], 1, ["torch"], timer=iter(range(10**6)).__next__)
    grown, m, elems = seen[0]
    assert m == ks.MAX_MATS and elems * 2 >= ks.SPAN_MAX
    assert grown < 16 << 20  # 32 x 64 KiB touched (plus page granularity), against a 256 MiB span


def test_a_busy_spell_does_not_decide_the_choice():
    """The kernels alternate pass by pass and keep their fastest pass: a busy spell over the first five
    passes (all of one kernel's, were they timed one kernel after the other) leaves both at 1 ms."""
    state = {"calls": 0, "now": 0.0}

    def timer():
        i = state["calls"]
        state["calls"] += 1
        if i % 2:  # the end of pass i // 2
            state["now"] += 10e-3 if i // 2 < 5 else 1e-3
        return state["now"]

    got = ks.measure([(16, 64)], 1, ["numba", "torch"], timer=timer)[(16, 64)]
    assert got["numba"] == pytest.approx(got["torch"])
    m = max(2, min(ks.MAX_MATS, -(-ks.span_bytes() // (16 * 64 * 2)) + 1))
    assert got["numba"] == pytest.approx(16 * 64 * 2 * m / 1e-3)
