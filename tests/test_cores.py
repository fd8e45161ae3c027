"""One core budget (zipmoe_run.cores) from injected calibration rates, and the store running with it:
decoder threads and read queue depth chosen by measurement, reads in flight bit-exact."""
import pytest

from zipmoe_run import calibrate
from zipmoe_run.cores import CorePlan, plan_cores

GB = 1e9


def test_fewest_decoder_threads_within_the_margin_beside_compute():
    # alone 2 threads gain 40 %; beside compute they gain 5 %: the contended rates decide -> 1 thread
    dec = {"1": 0.9 * GB, "2": 1.26 * GB, "1+compute": 0.80 * GB, "2+compute": 0.84 * GB}
    p = plan_cores(2, dec, None)
    assert (p.decode_threads, p.decode_bps, p.read_depth, p.read_bps) == (1, 0.80 * GB, 1, None)
    assert "beside compute" in p.why and "not calibrated" in p.why


def test_scaling_decoder_gets_the_cores_and_alone_rates_serve_without_contended():
    p = plan_cores(4, {"1": 1 * GB, "2": 1.9 * GB, "4": 3.6 * GB}, None)
    assert (p.decode_threads, p.decode_bps) == (4, 3.6 * GB) and "measured alone" in p.why
    # a rate measured for more threads than the budget allows is not used
    p = plan_cores(2, {"1": 1 * GB, "2": 1.9 * GB, "4": 3.6 * GB}, None)
    assert p.decode_threads == 2


def test_read_depth_is_the_fewest_within_the_margin():
    rd = {"read_bps": 1.0 * GB, "read_bps@2": 1.6 * GB, "read_bps@4": 1.7 * GB}
    p = plan_cores(2, {"1": GB}, rd)
    assert (p.read_depth, p.read_bps) == (2, 1.6 * GB)  # 4 is within 10 % of... 1.7 * 0.9 = 1.53 <= 1.6
    rd = {"read_bps": 1.0 * GB, "read_bps@2": 1.6 * GB, "read_bps@4": 2.0 * GB}
    assert plan_cores(2, {"1": GB}, rd).read_depth == 4


def test_two_reads_in_flight_unless_two_measured_slower():
    # alone one read at a time loses nothing (host C: 1.00 / 1.05 / 0.92 GB/s), but inside a run the I/O
    # thread's work between reads idles a one-deep queue: two are chosen where two are not slower
    p = plan_cores(2, {"1": GB}, {"read_bps": 1.00 * GB, "read_bps@2": 1.05 * GB, "read_bps@4": 0.92 * GB})
    assert (p.read_depth, p.read_bps) == (2, 1.05 * GB) and "at least 2" in p.why
    p = plan_cores(2, {"1": GB}, {"read_bps": 1.0 * GB, "read_bps@2": 0.95 * GB})  # within the margin: 2
    assert p.read_depth == 2
    p = plan_cores(2, {"1": GB}, {"read_bps": 1.0 * GB, "read_bps@2": 0.8 * GB})  # measured slower: 1
    assert (p.read_depth, p.read_bps) == (1, 1.0 * GB)
    assert plan_cores(2, {"1": GB}, {"read_bps": 1.0 * GB}).read_depth == 1  # only depth 1 measured


def test_no_calibration_means_every_core_decodes():
    p = plan_cores(3, None, None)
    assert (p.decode_threads, p.read_depth) == (3, 1) and isinstance(p, CorePlan)
    assert p.to_json()["decode_threads"] == 3


class _Fake:
    def decode(self, threads, codec=None):
        r = {1: 1.0 * GB, 2: 1.3 * GB}
        out = {str(t): r[t] for t in threads}
        out.update({f"{t}+compute": 0.8 * GB for t in threads})
        return out

    def read(self, path, spans, io_mode):
        return {"read_bps": 0.7 * GB, "depth_bps": {1: 0.7 * GB, 2: 1.2 * GB, 4: 1.25 * GB}, "read_method": "O_DIRECT"}


def test_current_carries_the_core_budget(tmp_path, store_archive):
    from formats.reader import Archive

    path, _ = store_archive(0)
    cal = calibrate.Calibrator(tmp_path / "c", decode_fn=_Fake().decode, read_fn=_Fake().read, version="t")
    with Archive(path) as ar:
        spans = [(e.offset, e.length) for e in ar.index.experts]
    cost = calibrate.current(path, spans, 2, calibrator=cal)
    plan = cost.extra["cores"]
    assert (plan["decode_threads"], plan["read_depth"]) == (1, 2)
    assert (cost.decode_bps, cost.read_bps, cost.cores) == (0.8 * GB, 1.2 * GB, 1)


@pytest.mark.parametrize("depth", [1, 3])
def test_store_reads_with_depth_are_bit_exact_and_counted(store_archive, monkeypatch, depth):
    """Several reads in flight (pieces of 8 KiB here, so each expert is many) fill the same bytes as one
    at a time; the busy time is counted once, not once per read."""
    from tests.storefetch import fetch_all_exact
    from zipmoe_run.store import worker

    monkeypatch.setattr(worker, "READ_PIECE", 8192)
    path, ref = store_archive(0)
    st = fetch_all_exact(path, ref, depth)
    assert st["reads"] > len(ref)  # many pieces per expert
    assert 0 < st["read_busy_s"] <= st["read_s"] * (1 + 1e-9)


def test_compression_verdict_from_rates():
    from zipmoe_run.cores import compression_verdict

    # 100 MB decoded, 66 MB read: at 1 GB/s disk and 3 GB/s decode a miss is 66 ms against 100 ms raw
    v = compression_verdict(1e9, 3e9, 66_000_000, 100_000_000)
    assert v["pays"] and v["cold_miss_ms"] == 66.0 and v["raw_read_ms"] == 100.0 and "pays" in v["why"]
    # decode at 0.8 GB/s: 125 ms of decode against 100 ms of raw read
    v = compression_verdict(1e9, 0.8e9, 66_000_000, 100_000_000)
    assert not v["pays"] and v["speed_vs_raw"] == 0.8 and "does not pay" in v["why"] and "34%" in v["why"]
    assert compression_verdict(1e9, 1e9, 100_000_000, 100_000_000) is None  # not compressed


def test_store_says_when_compression_does_not_pay(store_archive, caplog):
    from formats.decoder import ParallelDecoder
    from formats.reader import Archive
    from zipmoe_run.store.store import ExpertStore
    from zipmoe_run.tiers import CostModel

    path, _ = store_archive(0)
    with Archive(path) as ar, ParallelDecoder(1) as dec:
        for decode_bps, pays in ((5e9, True), (0.2e9, False)):
            caplog.clear()
            with caplog.at_level("INFO", logger="zipmoe_run.store.store"):
                store = ExpertStore(ar, dec, budget=None, cost=CostModel(read_bps=1e9, decode_bps=decode_bps,
                                                                         frozen=True))
            try:
                st = store.stats()
            finally:
                store.close()
            assert st["compression"]["pays"] is pays and st["compression_now"] == st["compression"]
            per_expert = sum(i.decoded for i in store.infos.values()) // len(store.infos)  # one expert, not all
            assert st["compression"]["raw_read_ms"] == round(per_expert / 1e9 * 1e3, 3)
            rec = [r for r in caplog.records if "compression" in r.getMessage()]
            assert len(rec) == 1 and rec[0].levelname == ("INFO" if pays else "WARNING")
            assert st["decode_threads"] == 1 and st["read_depth"] == 1 and st["disk_utilisation"] is None


def test_a_drift_makes_the_store_plan_again(store_archive, tmp_path):
    """The zipmoe policy plans its tier split at each new request; a calibration drift in between asks
    for a plan at the next placement."""
    from formats.decoder import ParallelDecoder
    from formats.reader import Archive
    from zipmoe_run.drift import Drift
    from zipmoe_run.store.store import ExpertStore
    from zipmoe_run.tiers import CostModel

    path, _ = store_archive(0)
    cost = CostModel(read_bps=1e9, decode_bps=3e9)
    cost.drift = Drift(cost, {"read_bps": (None, "read_bps")}, None)
    with Archive(path) as ar, ParallelDecoder(1) as dec:
        store = ExpertStore(ar, dec, budget="50%", policy="zipmoe", cost=cost)
        try:
            store.policy._need_plan = False
            for _ in range(7):  # within the first observations: no drift judged yet
                cost.observe("read_bps", 0.2e9, 0.25)
            assert not store.policy._need_plan
            for _ in range(10):  # five times slower than calibrated: a drift
                cost.observe("read_bps", 0.2e9, 0.25)
            assert cost.drift.events == 1 and store.policy._need_plan
        finally:
            store.close()


def test_decode_is_calibrated_with_the_archive_codec(tmp_path):
    """A huf4x archive is planned with huf4x's decode speed, cached apart from the default codec's."""
    calls = []

    def decode(threads, codec=None):
        calls.append((tuple(threads), codec))
        return {str(t): (2e9 if codec == "huf4x" else 1e9) for t in threads}

    cal = calibrate.Calibrator(tmp_path / "c", decode_fn=decode, read_fn=lambda *a: None, version="t")
    assert cal.decode(1, "zstd-lit")["rates"]["1"] == 1e9 and cal.decode(1, "huf4x")["rates"]["1"] == 2e9
    assert cal.decode(1, "huf4x")["cached"] and calls == [((1,), "zstd-lit"), ((1,), "huf4x")]
    assert cal.decode(1)["cached"]  # no codec named: the packer's default (huf4x)
    c = calibrate.current(threads=1, calibrator=cal, codec="huf4x")
    assert c.decode_bps == 2e9


def test_real_decode_measurement_takes_the_codec():
    rates = calibrate.measure_decode([1], chunk_elements=4096, chunks=2, runs=1, contended=False, codec="huf4x")
    assert set(rates) == {"1"} and rates["1"] > 0


def test_eviction_never_takes_an_expert_the_open_fetch_has_pinned(store_archive):
    """A policy whose view lags the table may name an expert the open fetch pinned (it has not been
    yielded yet); the table must skip it, or the fetch would yield None weights."""
    from formats.decoder import ParallelDecoder
    from formats.reader import Archive
    from zipmoe_run.store.store import ExpertStore
    from zipmoe_run.tiers import CostModel, Tier

    path, ref = store_archive(0)
    stack, layer = sorted({k[:2] for k in ref}, key=str)[0]
    experts = sorted(k[2] for k in ref if k[:2] == (stack, layer))
    with Archive(path) as ar, ParallelDecoder(1) as dec:
        store = ExpertStore(ar, dec, budget="100%", cost=CostModel(frozen=True))
        try:
            for _ in store.fetch(layer, experts, stack):  # now FULL
                pass
            gen = store.fetch(layer, experts[:2], stack)
            first = next(gen)  # the fetch is open: experts[:2] are pinned until served
            pinned_key = (stack, layer, experts[1] if first[0] == experts[0] else experts[0])
            real = store.table.policy
            offered = []

            class Lagging:  # names the pinned expert first, then defers to the real policy
                name = "lagging"

                def victim(self, res, pinned):
                    offered.append(set(pinned))
                    if pinned_key not in pinned:
                        return pinned_key, Tier.COLD
                    return real.victim(res, pinned)

            store.table.policy = Lagging()
            with store.cond:
                store.table.evict_one(set())
            store.table.policy = real
            assert store.table.entries[pinned_key].tier == Tier.FULL and len(offered) >= 2
            rest = list(gen)
            assert all(w is not None for _, w in rest) and len(rest) == 1
        finally:
            store.close()


def test_closing_the_store_ends_the_drift_watch(store_archive):
    """The run's mean rates are judged (and, where they drifted, written to the calibration cache) when
    the store closes: after that no sample counts."""
    from formats.decoder import ParallelDecoder
    from formats.reader import Archive
    from zipmoe_run.drift import Drift
    from zipmoe_run.store.store import ExpertStore
    from zipmoe_run.tiers import CostModel

    path, _ = store_archive(0)
    cost = CostModel(read_bps=1e9, decode_bps=3e9)
    cost.drift = Drift(cost, {"read_bps": (None, "read_bps")}, None)
    with Archive(path) as ar, ParallelDecoder(1) as dec:
        store = ExpertStore(ar, dec, budget="50%", policy="zipmoe", cost=cost)
        for _ in range(10):
            cost.observe("read_bps", 0.2e9, 0.25)
        assert not cost.drift.finished
        store.close()
    assert cost.drift.finished and cost.drift.notes[-1]["run_mean"] and cost.drift.notes[-1]["samples"] == 10
