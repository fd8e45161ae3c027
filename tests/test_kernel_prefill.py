"""Prefill's few-row bf16 products (a prompt's routed experts): through the multi-row kernel up to a
crossover M measured per host, shape and thread count (injected timings here, never the clock), cached,
reported; beyond it torch's. Rows that take the kernel are bit for bit the decode path's rows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zipmoe_run import kernel_select as ks
from zipmoe_run import kernels, layers
from zipmoe_run.calibrate import Calibrator

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba kernel unavailable")

#: fake bytes/s per shape and M: (64, 128) multi-row faster up to M = 3, torch from 4; (32, 32) torch at 2
ROWS = {(64, 128): {2: {"numba": 9e9, "torch": 3e9}, 3: {"numba": 6e9, "torch": 5.8e9},
                    4: {"numba": 4e9, "torch": 6e9}, 6: {"numba": 3e9, "torch": 6e9}, 8: {"numba": 2e9, "torch": 6e9}},
        (32, 32): {m: {"numba": 1e9, "torch": 2e9} for m in ks.ROW_COUNTS}}


class FakeRows:
    def __init__(self, table=ROWS):
        self.table, self.calls = table, []

    def __call__(self, shapes, threads):
        self.calls.append((sorted(shapes), threads))
        return {s: dict(self.table[s]) for s in shapes}


def _flat(shapes, threads, kerns):  # one-row rates: numba faster everywhere
    return {s: {k: (2e9 if k == "numba" else 1e9) for k in kerns} for s in shapes}


def _cal(tmp_path, cpu="CPU A"):
    info = {"cpu": cpu, "isa": ["avx2"], "cores": 2, "machine": "x86_64"}
    return Calibrator(tmp_path, info=info, version="test", force=False)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    for var in (ks.ENV, ks.ROWS_ENV, "ZIPMOE_RUN_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    ks.reset()
    yield
    ks.reset()
    kernels.set_threads(torch.get_num_threads())


def test_crossover_is_measured_cached_and_reported(tmp_path):
    fake = FakeRows()
    rep = ks.choose(list(ROWS), 2, measure_fn=_flat, measure_rows_fn=fake, calibrator=_cal(tmp_path))
    assert fake.calls == [(sorted(ROWS), 2)]
    assert kernels.ROWS_UPTO == {(64, 128, 2): 3, (32, 32, 2): 1}  # 3: within the margin, kept
    assert rep["rows"]["64x128@2"]["upto"] == 3 and rep["rows"]["64x128@2"]["how"] == "measured"
    assert rep["rows"]["64x128@2"]["gbps"]["4"] == {"numba": 4.0, "torch": 6.0}
    assert "64x128@2 3" in ks.line(rep) and "32x32@2 1" in ks.line(rep)
    (f,) = (tmp_path / "hosts").glob("kernels-*.json")
    rates = json.loads(f.read_text())["rates"]
    assert rates["64x128@2:rows2:numba"] == 9e9 and rates["64x128@2:numba"] == 2e9  # beside the one-row rates
    ks.reset()  # a new process on the same host: nothing measured, the same crossover
    again = FakeRows({s: {m: {"numba": 1.0, "torch": 1e12} for m in ks.ROW_COUNTS} for s in ROWS})
    rep = ks.choose(list(ROWS), 2, measure_fn=_flat, measure_rows_fn=again, calibrator=_cal(tmp_path))
    assert again.calls == [] and kernels.ROWS_UPTO == {(64, 128, 2): 3, (32, 32, 2): 1}
    assert rep["rows"]["64x128@2"]["how"] == "cached"


def test_an_older_cache_without_crossovers_measures_only_them(tmp_path):
    ks.choose(list(ROWS), 2, measure_fn=_flat, measure_rows_fn=FakeRows(), calibrator=_cal(tmp_path))
    (f,) = (tmp_path / "hosts").glob("kernels-*.json")
    d = json.loads(f.read_text())
    d["rates"] = {k: v for k, v in d["rates"].items() if ":rows" not in k}  # as written before this change
    f.write_text(json.dumps(d))
    ks.reset()
    one, rows = [], FakeRows()
    ks.choose(list(ROWS), 2, measure_fn=lambda *a: one.append(a) or _flat(*a), measure_rows_fn=rows,
              calibrator=_cal(tmp_path))
    assert one == [] and len(rows.calls) == 1 and kernels.ROWS_UPTO[(64, 128, 2)] == 3


@pytest.mark.parametrize("env,forced,want", [("5", None, 5), ("0", None, 1), ("", "torch", 1),
                                             ("", "numba", ks.ROW_COUNTS[-1])])
def test_forced_crossover_is_honoured_without_measuring(tmp_path, monkeypatch, env, forced, want):
    monkeypatch.setenv(ks.ROWS_ENV, env)
    if forced:
        monkeypatch.setenv(ks.ENV, forced)
    fake = FakeRows()
    rep = ks.choose(list(ROWS), 2, measure_fn=_flat, measure_rows_fn=fake, calibrator=_cal(tmp_path))
    assert fake.calls == [] and set(kernels.ROWS_UPTO.values()) == {want}
    assert {v["how"] for v in rep["rows"].values()} == {"forced"}


def test_measure_rows_stops_where_torch_wins():
    clock = iter(range(10**6))
    got = ks.measure_rows([(16, 64)], 1, timer=lambda: next(clock) * 1e-3)  # every pass 1 ms: ties
    assert sorted(got[(16, 64)]) == list(ks.ROW_COUNTS)  # a tie keeps the multi-row kernel: all counts
    assert set(got[(16, 64)][2]) == {"numba", "torch"}


def _one_row(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The decode path's product of each row alone (the one-row GEMV), rows stacked."""
    return torch.cat([kernels._gemv_linear(r.view(1, -1), w, None).view(1, -1) for r in x])


def test_prefill_rows_take_the_multi_row_kernel_up_to_the_crossover(tmp_path):
    t = torch.get_num_threads()
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(64, 128, generator=g) * torch.logspace(-2, 2, 128)).bfloat16()
    ks.choose([(64, 128)], t, measure_fn=_flat, measure_rows_fn=FakeRows(), calibrator=_cal(tmp_path))
    assert kernels.ROWS_UPTO[(64, 128, t)] == 3
    for m in (2, 3):  # the multi-row kernel: each row the decode path's bits
        x = torch.randn(m, 128, generator=g).bfloat16()
        got = kernels.linear(x, w)
        assert got.shape == (m, 64) and torch.equal(got.view(torch.int16), _one_row(x, w).view(torch.int16))
        x3 = x.view(1, m, 128)  # [B, T, K] as a model passes it
        assert torch.equal(kernels.linear(x3, w).view(torch.int16), got.view(1, m, 64).view(torch.int16))
    x = torch.randn(5, 128, generator=g).bfloat16()  # beyond the crossover: torch's product
    assert torch.equal(kernels.linear(x, w).view(torch.int16), torch.nn.functional.linear(x, w).view(torch.int16))


def test_float32_prefill_is_torch(tmp_path, monkeypatch):
    monkeypatch.setenv(ks.ROWS_ENV, "8")
    x, w = torch.randn(3, 64), torch.randn(16, 64)
    assert torch.equal(kernels.linear(x, w), torch.nn.functional.linear(x, w))


def test_moe_prefill_rows_equal_each_token_alone(monkeypatch):
    """A prompt's routed-expert sum: every token's row is bit for bit that token's decode step (the same
    experts, the one-row GEMV), because each expert's few rows take the multi-row kernel."""
    monkeypatch.setenv(ks.ENV, "numba")  # every shape: the one-row GEMV, prefill rows up to 8
    g = torch.Generator().manual_seed(11)
    h, inter, n_exp, n_tok = 64, 96, 6, 7
    experts = {e: {"gate_proj": (torch.randn(inter, h, generator=g) * 0.2).bfloat16(),
                   "up_proj": (torch.randn(inter, h, generator=g) * 0.2).bfloat16(),
                   "down_proj": (torch.randn(h, inter, generator=g) * 0.2).bfloat16()} for e in range(n_exp)}

    class Source:
        def fetch(self, layer, wanted, stack=None):
            for e in wanted:
                yield e, experts[e]

    x = torch.randn(n_tok, h, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(n_exp, generator=g)[:2] for _ in range(n_tok)])  # [T, 2]
    wts = torch.rand(n_tok, 2, generator=g).bfloat16()
    got = layers.moe_forward(x, ids, wts, Source(), 0)  # [T, H]
    for t in range(n_tok):
        with kernels.single_row_scope(True):  # as a decode step runs
            alone = layers.moe_forward(x[t:t + 1].clone(), ids[t:t + 1], wts[t:t + 1], Source(), 0)
        assert torch.equal(got[t:t + 1].view(torch.int16), alone.view(torch.int16)), t


def test_measure_rows_takes_each_kernel_fastest_pass_and_stops_where_torch_wins(monkeypatch):
    """Injected costs (no clock): torch's rate beats the multi-row kernel's by more than the margin at
    M = 4, so M = 6 and 8 are not measured; disturbed passes (all but the last of torch's at M = 2) are
    not the rate: each kernel's fastest pass is."""
    now, last, calls = [0.0], [None], []
    cost = {"numba": {2: 1.0, 3: 1.5, 4: 2.0}, "torch": {2: 2.0, 3: 2.0, 4: 1.0}}  # seconds per product

    def fake_kernel(kern, x, w):
        last[0] = (kern, x.shape[0])
        calls.append(last[0])
        timed = calls.count((kern, x.shape[0])) - 1  # after the warm-up: 16 products per pass
        extra = 50.0 if kern == "torch" and x.shape[0] == 2 and 0 < timed <= 16 * (ks.REPS - 1) else 0.0
        now[0] += cost[kern][x.shape[0]] + extra

    monkeypatch.setattr(ks, "_rows_kernel", fake_kernel)
    got = ks.measure_rows([(8, 32)], 1, timer=lambda: now[0])
    nbytes = 8 * 32 * 2
    assert sorted(got[(8, 32)]) == [2, 3, 4]
    assert got[(8, 32)][2] == {"numba": pytest.approx(nbytes / 1.0), "torch": pytest.approx(nbytes / 2.0)}
    assert got[(8, 32)][4]["torch"] == pytest.approx(nbytes / 1.0)
    assert {m for _, m in calls} == {2, 3, 4}
