"""``formats.workpool.WorkPool`` and the store's waiting consumer that decodes queued chunks itself."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch

from formats.workpool import WorkPool
from tests.bounded import in_thread
from zipmoe_run.api import load


def test_help_runs_the_oldest_queued_call_on_the_calling_thread():
    gate, started = threading.Event(), threading.Event()
    pool = WorkPool(1, "t")
    try:
        blocker = pool.submit(lambda: (started.set(), gate.wait(30)))
        assert started.wait(30)  # the only worker is busy: later calls stay queued
        ran = []
        futs = [pool.submit(lambda i=i: ran.append((i, threading.get_ident())) or i * i) for i in range(3)]
        assert pool.pending() == 3
        assert pool.help() and pool.help()
        assert [i for i, _ in ran] == [0, 1]  # FIFO
        assert {t for _, t in ran} == {threading.get_ident()}
        assert [f.result(0) for f in futs[:2]] == [0, 1] and not futs[2].done()
        gate.set()
        assert futs[2].result(30) == 4 and blocker.result(30) is not None
        assert not pool.help()  # nothing queued
    finally:
        gate.set()
        pool.shutdown()


def test_errors_reach_the_future_and_shutdown_drains_then_refuses():
    pool = WorkPool(2, "t")
    bad = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.result(30)
    done = [pool.submit(lambda i=i: i) for i in range(20)]
    pool.shutdown(wait=True)
    assert [f.result(0) for f in done] == list(range(20))
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    with pytest.raises(ValueError):
        WorkPool(0)


def _tensors(w) -> dict:
    """{proj: tensor} of what the store yields (the archive source's ``_Decoded``, or a dict)."""
    return w.tensors() if hasattr(w, "tensors") else w


def test_a_waiting_fetch_decodes_its_chunks_itself_when_the_pool_is_busy(store_archive):
    """With every decoder thread blocked, a fetch still completes, bit-exact: the consumer decodes
    the queued chunks while it waits (without that it would wait for the pool forever)."""
    arc, _ = store_archive(3)
    with load(arc, memory_budget="40%", threads=2) as lm:
        store, dec = lm.source.store, lm.source.decoder
        experts = [e.expert for e in lm.source.archive.index.experts if e.layer == 0]
        want = {e: {k: v.clone() for k, v in _tensors(w).items()} for e, w in store.fetch(0, experts)}  # reference
        gate, started = threading.Event(), threading.Semaphore(0)
        blockers = [dec._get_pool().submit(lambda: (started.release(), gate.wait(60))) for _ in range(dec.threads)]
        for _ in blockers:  # every decoder thread is now busy: nothing but the consumer can decode
            assert started.acquire(timeout=30)
        try:
            before = store.counters.get("helped_chunks")
            got = in_thread(lambda: {e: {k: v.clone() for k, v in _tensors(w).items()} for e, w in store.fetch(0, experts)},
                            60)
            helped = store.counters.get("helped_chunks") - before
        finally:
            gate.set()
            for b in blockers:
                b.result(30)
        assert sorted(got) == sorted(want)
        for e in want:
            for k in want[e]:
                assert np.array_equal(got[e][k].view(-1).view(torch.uint8).numpy(),
                                      want[e][k].view(-1).view(torch.uint8).numpy()), (e, k)
        cold = store.counters.get("hits_cold")
        assert cold > 0 and helped >= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are a Linux feature")
def test_nice_lowers_the_workers_priority_and_not_the_callers():
    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    pool = WorkPool(2, "t", nice=5)
    try:
        got = {pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result(30)
               for _ in range(8)}
    finally:
        pool.shutdown()
    assert got == {min(19, me + 5)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me  # the caller keeps its own


def test_decode_nice_default_and_override(monkeypatch):
    from zipmoe_run import cores

    monkeypatch.delenv("ZIPMOE_DECODE_NICE", raising=False)
    assert cores.decode_nice() == cores.DECODE_NICE
    for v, want in (("0", 0), ("7", 7), ("99", 19), ("-3", 0), ("x", cores.DECODE_NICE)):
        monkeypatch.setenv("ZIPMOE_DECODE_NICE", v)
        assert cores.decode_nice() == want


def test_spread_cpus_binds_only_a_pool_with_a_thread_for_every_cpu(monkeypatch):
    """``spread_cpus`` gives each worker its own CPU when the pool has one thread per usable CPU, and
    leaves placement to the OS for one thread or for fewer or more threads than CPUs."""
    from formats import workpool

    monkeypatch.setattr(workpool.os, "sched_getaffinity", lambda _pid: {5, 1, 4, 0}, raising=False)
    assert workpool.spread_cpus(4) == [0, 1, 4, 5]
    assert workpool.spread_cpus(2) is None and workpool.spread_cpus(5) is None
    monkeypatch.setattr(workpool.os, "sched_getaffinity", lambda _pid: {3}, raising=False)
    assert workpool.spread_cpus(1) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="per-thread affinity is a Linux feature")
def test_bound_workers_run_on_their_cpu_and_the_caller_keeps_its_affinity():
    mine = os.sched_getaffinity(0)
    cpu = min(mine)
    pool = WorkPool(2, "t", cpus=[cpu])
    try:
        seen = {frozenset(pool.submit(lambda: os.sched_getaffinity(0)).result(30)) for _ in range(8)}
    finally:
        pool.shutdown()
    assert seen == {frozenset({cpu})}
    assert os.sched_getaffinity(0) == mine


def test_decoder_spread_follows_the_environment(monkeypatch):
    """A decoder pool that ``spread_cpus`` places binds its workers unless ZIPMOE_DECODE_SPREAD=0 or
    ``spread=False``; the calibration's decode rates are cached apart for the two placements."""
    from formats import decoder
    from formats.decoder import ParallelDecoder
    from zipmoe_run.calibrate import Calibrator

    monkeypatch.setattr(decoder, "spread_cpus", lambda n: list(range(n)) if n > 1 else None)
    monkeypatch.delenv("ZIPMOE_DECODE_SPREAD", raising=False)
    cal = Calibrator.__new__(Calibrator)
    cal.key = {"cpu": "x"}
    with ParallelDecoder(2) as a, ParallelDecoder(2, spread=False) as b, ParallelDecoder(1) as c:
        assert a.cpus == [0, 1] and b.cpus is None and c.cpus is None
    assert cal.decode_key("huf4x")["decode_placement"] == "spread"
    monkeypatch.setenv("ZIPMOE_DECODE_SPREAD", "0")
    with ParallelDecoder(2) as d:
        assert d.cpus is None
    assert "decode_placement" not in cal.decode_key("huf4x")
