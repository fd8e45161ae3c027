"""Prefill's bf16 products of M > 1 rows (a prompt's routed experts, attention, the shared expert):
the multi-row kernel up to a crossover M, beyond it the dp kernel or torch's, chosen per host, shape,
thread count and M by measurement (injected timings here, never the clock), cached, reported. Rows that
take the multi-row kernel are bit for bit the decode path's rows."""
from __future__ import annotations

import json

import pytest
import torch

from zipmoe_run import kernel_select as ks
from zipmoe_run import kernel_select_rows as R
from zipmoe_run import kernels, layers
from zipmoe_run.calibrate import Calibrator

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="numba kernel unavailable")


def _rates(numba, dp, torch_):
    return {"numba": numba, "dp": dp, "torch": torch_}


#: fake bytes/s per shape and M: (64, 128) the multi-row kernel up to M = 3 (3: within the margin), then dp
#: (which also beats torch at 2 and 3) to 16, torch from 24 (by more than the margin); (32, 32) torch at every M
ROWS = {(64, 128): {2: _rates(9e9, 5e9, 3e9), 3: _rates(6e9, 6.5e9, 5.8e9), 4: _rates(4e9, 7e9, 6e9),
                    6: _rates(3e9, 8e9, 6e9), 8: _rates(2e9, 8e9, 7e9), 12: _rates(1e9, 9e9, 8e9),
                    16: _rates(1e9, 9e9, 8.5e9), 24: _rates(1e9, 9e9, 11e9), 32: _rates(1e9, 9e9, 12e9)},
        (32, 32): {m: _rates(1e9, 1e9, 2e9) for m in R.ROW_COUNTS}}


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
    for var in (ks.ENV, R.ROWS_ENV, R.PREFILL_ENV, "ZIPMOE_RUN_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(R, "dp_available", lambda: True)  # the choice logic on any host (no dp call here)
    ks.reset()
    yield
    ks.reset()
    kernels.set_threads(torch.get_num_threads())


def test_crossover_is_measured_cached_and_reported(tmp_path):
    fake = FakeRows()
    rep = ks.choose(list(ROWS), 2, measure_fn=_flat, measure_rows_fn=fake, calibrator=_cal(tmp_path))
    assert fake.calls == [(sorted(ROWS), 2)]
    assert kernels.ROWS_UPTO == {(64, 128, 2): 3, (32, 32, 2): 1}  # 3: within the margin, kept
    assert R.BEYOND == {(64, 128, 2): ((2, "dp"), (24, "torch")), (32, 32, 2): ((2, "torch"),)}
    assert [R.beyond_for(64, 128, 2, m) for m in (4, 5, 16, 23, 24, 40)] == ["dp"] * 4 + ["torch"] * 2
    assert R.beyond_for(32, 32, 2, 7) == "torch"
    got = rep["rows"]["64x128@2"]
    assert got["upto"] == 3 and got["how"] == "measured" and got["beyond"] == {"2": "dp", "24": "torch"}
    assert got["gbps"]["4"] == {"numba": 4.0, "dp": 7.0, "torch": 6.0}
    assert "64x128@2 rows<=3 dp>=4 torch>=24" in ks.line(rep) and "32x32@2 rows<=1 torch>=2" in ks.line(rep)
    (f,) = (tmp_path / "hosts").glob("kernels-*.json")
    rates = json.loads(f.read_text())["rates"]
    assert rates["64x128@2:rows2:numba"] == 9e9 and rates["64x128@2:rows32:dp"] == 9e9
    assert rates["64x128@2:numba"] == 2e9  # beside the one-row rates
    ks.reset()  # a new process on the same host: nothing measured, the same choices
    again = FakeRows({s: {m: _rates(1.0, 1.0, 1e12) for m in R.ROW_COUNTS} for s in ROWS})
    rep = ks.choose(list(ROWS), 2, measure_fn=_flat, measure_rows_fn=again, calibrator=_cal(tmp_path))
    assert again.calls == [] and kernels.ROWS_UPTO == {(64, 128, 2): 3, (32, 32, 2): 1}
    assert R.BEYOND[(64, 128, 2)] == ((2, "dp"), (24, "torch"))
    assert rep["rows"]["64x128@2"]["how"] == "cached"


def test_the_multi_row_kernel_is_not_measured_after_it_loses(tmp_path):
    """Only the counts up to its first loss need its rate (the cache is complete without the rest)."""
    table = {(64, 128): {m: ({k: v for k, v in p.items() if k != "numba"} if m > 4 else p)
                         for m, p in ROWS[(64, 128)].items()}}
    ks.choose([(64, 128)], 2, measure_fn=_flat, measure_rows_fn=FakeRows(table), calibrator=_cal(tmp_path))
    assert kernels.ROWS_UPTO[(64, 128, 2)] == 3
    ks.reset()
    again = FakeRows(table)
    ks.choose([(64, 128)], 2, measure_fn=_flat, measure_rows_fn=again, calibrator=_cal(tmp_path))
    assert again.calls == []


@pytest.mark.parametrize("dp", [True, False])
def test_an_older_cache_is_measured_again_for_the_prefill_only(tmp_path, monkeypatch, dp):
    """A cache written before the dp kernel (rows to M = 8, numba and torch) or without a count: the
    prefill choice is measured again, the one-row rates are kept."""
    monkeypatch.setattr(R, "dp_available", lambda: dp)
    ks.choose(list(ROWS), 2, measure_fn=_flat, measure_rows_fn=FakeRows(), calibrator=_cal(tmp_path))
    (f,) = (tmp_path / "hosts").glob("kernels-*.json")
    d = json.loads(f.read_text())
    d["rates"] = {k: v for k, v in d["rates"].items()
                  if ":rows" not in k or (k.split(":")[-1] != "dp" and int(k.split(":rows")[1].split(":")[0]) <= 8)}
    f.write_text(json.dumps(d))
    ks.reset()
    one, rows = [], FakeRows()
    ks.choose(list(ROWS), 2, measure_fn=lambda *a: one.append(a) or _flat(*a), measure_rows_fn=rows,
              calibrator=_cal(tmp_path))
    assert one == [] and len(rows.calls) == 1 and kernels.ROWS_UPTO[(64, 128, 2)] == 3
    assert {kn for _, kn in R.BEYOND[(64, 128, 2)]} == ({"dp", "torch"} if dp else {"torch"})


@pytest.mark.parametrize("env,prefill,forced,want,beyond", [
    ("5", "torch", None, 5, "torch"), ("0", "dp", None, 1, "dp"), ("", "", "torch", 1, "torch"),
    ("", "", "numba", R.FORCED_NUMBA_UPTO, "torch"), ("", "dp", "numba", R.FORCED_NUMBA_UPTO, "dp")])
def test_forced_choices_are_honoured_without_measuring(tmp_path, monkeypatch, env, prefill, forced, want, beyond):
    monkeypatch.setenv(R.ROWS_ENV, env)
    monkeypatch.setenv(R.PREFILL_ENV, prefill)
    if forced:
        monkeypatch.setenv(ks.ENV, forced)
    fake = FakeRows()
    rep = ks.choose(list(ROWS), 2, measure_fn=_flat, measure_rows_fn=fake, calibrator=_cal(tmp_path))
    assert fake.calls == [] and set(kernels.ROWS_UPTO.values()) == {want}
    assert {R.beyond_for(n, k, 2, 9) for n, k in ROWS} == {beyond}
    assert {v["how"] for v in rep["rows"].values()} == {"forced"}


def test_one_forced_choice_leaves_the_other_measured(tmp_path, monkeypatch):
    monkeypatch.setenv(R.ROWS_ENV, "6")
    fake = FakeRows()
    rep = ks.choose(list(ROWS), 2, measure_fn=_flat, measure_rows_fn=fake, calibrator=_cal(tmp_path))
    assert len(fake.calls) == 1 and kernels.ROWS_UPTO[(64, 128, 2)] == 6
    assert R.beyond_for(64, 128, 2, 8) == "dp" and rep["rows"]["64x128@2"]["how"] == "measured+forced"


def test_measure_rows_alternates_all_kernels_at_every_count():
    clock = iter(range(10**6))
    got = R.measure_rows([(16, 64)], 1, kernels=["numba", "torch"], timer=lambda: next(clock) * 1e-3)
    assert sorted(got[(16, 64)]) == list(R.ROW_COUNTS)  # a tie keeps the multi-row kernel: all counts
    assert set(got[(16, 64)][2]) == {"numba", "torch"}


def _one_row(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The decode path's product of each row alone (the one-row GEMV), rows stacked."""
    return torch.cat([kernels._gemv_linear(r.view(1, -1), w, None).view(1, -1) for r in x])


def test_prefill_rows_take_the_multi_row_kernel_up_to_the_crossover(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "dp_available", lambda: False)  # beyond the crossover: torch (dp: test_kernels_dp)
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
    monkeypatch.setenv(R.ROWS_ENV, "8")
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


def test_measure_rows_takes_each_kernel_fastest_pass_and_drops_the_multi_row_kernel_once_it_loses(monkeypatch):
    """Injected costs (no clock): torch's rate beats the multi-row kernel's by more than the margin at
    M = 4, so the multi-row kernel is not timed at larger M while dp and torch are timed at every count;
    disturbed passes (all but the last of torch's at M = 2) are not the rate: each kernel's fastest pass is."""
    now, calls = [0.0], []
    cost = {"numba": {2: 1.0, 3: 1.5, 4: 2.0}, "torch": {2: 2.0, 3: 2.0, 4: 1.0}, "dp": {2: 1.5, 3: 1.5, 4: 1.5}}

    def fake_kernel(kern, x, w):
        calls.append((kern, x.shape[0]))
        timed = calls.count((kern, x.shape[0])) - 1  # after the warm-up: 16 products per pass
        extra = 50.0 if kern == "torch" and x.shape[0] == 2 and 0 < timed <= 16 * (ks.REPS - 1) else 0.0
        now[0] += cost[kern].get(x.shape[0], 1.0) + extra

    monkeypatch.setattr(R, "_rows_kernel", fake_kernel)
    got = R.measure_rows([(8, 32)], 1, kernels=["numba", "dp", "torch"], timer=lambda: now[0])
    nbytes = 8 * 32 * 2
    assert sorted(got[(8, 32)]) == list(R.ROW_COUNTS)
    assert got[(8, 32)][2] == {"numba": pytest.approx(nbytes / 1.0), "dp": pytest.approx(nbytes / 1.5),
                               "torch": pytest.approx(nbytes / 2.0)}
    assert got[(8, 32)][4]["torch"] == pytest.approx(nbytes / 1.0)
    assert {m for kn, m in calls if kn == "numba"} == {2, 3, 4}
    assert {m for kn, m in calls if kn == "dp"} == set(R.ROW_COUNTS) == {m for kn, m in calls if kn == "torch"}
