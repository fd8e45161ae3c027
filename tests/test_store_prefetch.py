"""Prefetch, lookahead and preload in the store: adopted without a second read, bounded by the budget,
never evicting what the open fetch uses, superseded cleanly, failures surfacing on use, exact bytes."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from formats.decoder import ParallelDecoder
from formats.reader import Archive
from tests.bounded import in_thread
from zipmoe_run.store.io import StoreIOError
from zipmoe_run.store.store import ExpertStore
from zipmoe_run.tiers import Tier



@pytest.fixture(scope="module")
def arc(store_archive):
    return store_archive(3)[0]


@pytest.fixture(scope="module")
def reference(store_archive):
    return store_archive(3)[1]


class _Open:
    def __init__(self, arc, budget=None, threads=2, **kw):
        self.ar = Archive(arc)
        self.dec = ParallelDecoder(threads)
        self.store = ExpertStore(self.ar, self.dec, budget=budget, **kw)
        self.total = self.store.expert_bytes

    def __enter__(self) -> ExpertStore:
        return self.store

    def __exit__(self, *exc) -> None:
        self.store.close()
        self.dec.close()
        self.ar.close()


def _check(store, reference, layer, ids):
    got = []
    for e, arr in store.fetch(layer, ids):
        want = reference[(None, layer, e)]
        assert np.array_equal(np.asarray(arr)[:want.shape[0]], want), (layer, e)
        got.append(e)
        del arr  # hold no expert past the next step (a tight budget may need its memory)
    assert sorted(got) == sorted(ids)


def _settled(store):
    store.drain_prefetch()
    st = store.stats()
    assert st["staging_bytes"] == 0 and st["draining_bytes"] == 0, st
    assert st["store_peak_bytes"] <= (st["budget_bytes"] or float("inf")), st
    assert all(not e.busy and not e.pins for e in store.table.entries.values())
    return st


def _read_once(store, got, pairs):
    """``got`` bytes read is each extent of ``pairs`` [(layer, ids)] read once (whole pages, but never
    past the end of the file)."""
    from zipmoe_run.store.buffers import ceil_align

    exts = [store.extents[(None, layer, e)] for layer, ids in pairs for e in ids]
    return sum(x.length for x in exts) <= got <= sum(ceil_align(x.length) for x in exts)


def test_prefetched_experts_are_adopted_without_a_second_read(arc, reference):
    with _Open(arc) as store:
        assert store.prefetch(0, [1, 4, 6], speculative=False) == 3
        store.drain_prefetch()  # done before the fetch: its experts wait decoded
        _check(store, reference, 0, [1, 4, 6])
        st = _settled(store)
        assert _read_once(store, st["bytes_read"], [(0, [1, 4, 6])])
        assert st["hits_full"] == 3 and st["hits_cold"] == 0
        # a fetch right behind its prefetch adopts whatever the I/O thread already took on
        assert store.prefetch(1, [0, 2, 3, 5], speculative=False) == 4
        _check(store, reference, 1, [0, 2, 3, 5])
        st = _settled(store)
        assert _read_once(store, st["bytes_read"], [(0, [1, 4, 6]), (1, [0, 2, 3, 5])])
        assert st["hits_prefetch"] + st["hits_cold"] + st["hits_full"] - 3 == 4
        assert store.prefetch(1, [0, 2]) == 0  # resident already: nothing queued


def test_speculation_is_counted_and_superseded(arc, reference):
    with _Open(arc) as store:
        store.prefetch(1, list(range(8)))  # speculative: a guess at layer 1
        store.prefetch(1, [2, 3])  # a newer guess drops (or cancels) the rest of the older one
        _check(store, reference, 1, [3, 7])
        st = _settled(store)
        assert st["prefetch_predicted"] == 10 and st["prefetch_correct"] == 1  # of the newer guess, 3 was asked for
        for e in range(8):
            _check(store, reference, 1, [e])
        _settled(store)
        # a guess of experts that are all resident queues nothing but is still scored
        assert store.prefetch(1, [0, 1]) == 0
        _check(store, reference, 1, [1, 6])
        st = _settled(store)
        assert st["prefetch_predicted"] == 12 and st["prefetch_correct"] == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_prefetch_stays_in_budget_and_spares_the_open_fetch(arc, reference, threads):
    with _Open(arc, threads=threads) as probe:
        big = max(probe.infos.values(), key=lambda i: i.full_bytes)
        budget = probe.min_budget + 2 * big.full_bytes
    with _Open(arc, budget=budget, threads=threads) as store:
        for rnd in range(6):
            layer = rnd % 2
            ids = [rnd % 8, (rnd + 3) % 8]
            seen = []
            for e, arr in store.fetch(layer, ids):
                if not seen:  # the fetch is open: guess the next layer behind it
                    store.prefetch(1 - layer, list(range(8)))
                    # what this fetch pinned or is decoding stays put
                    for k in ids:
                        assert store.table.entries[(None, layer, k)].busy or store.tier_of((None, layer, k)) == Tier.FULL
                want = reference[(None, layer, e)]
                assert np.array_equal(np.asarray(arr)[:want.shape[0]], want)
                seen.append(e)
                st = store.stats()
                assert st["store_bytes"] <= budget
            arr = None
            assert sorted(seen) == sorted(ids)
        _settled(store)


def test_failed_prefetch_surfaces_on_use_and_the_store_recovers(arc, reference):
    with _Open(arc, budget="60%") as store:
        real = store.reader.read
        started = threading.Event()
        calls = {"n": 0}

        def flaky(buf, offset, length, what, at=0):
            calls["n"] += 1
            if calls["n"] == 1:
                started.set()
                time.sleep(0.2)
                raise StoreIOError(f"{store.reader.path}: cannot read {what} at offset {offset}: Input/output error")
            return real(buf, offset, length, what, at)

        store.reader.read = flaky
        store.prefetch(0, [5], speculative=False)
        assert started.wait(10)
        with pytest.raises(StoreIOError, match="tensor model.layers.0.mlp.experts.5"):
            _check(store, reference, 0, [5])  # adopted while reading: its error is the fetch's
        _settled(store)
        store.prefetch(0, [6], speculative=False)  # fails unseen (calls 2+ succeed): a normal fetch follows
        _check(store, reference, 0, [5, 6])
        _settled(store)
        calls["n"] = 0
        store.prefetch(1, [1], speculative=False)
        store.drain_prefetch()  # failed before anyone asked: reverted, then read again on use
        _check(store, reference, 1, [1])
        st = _settled(store)
        assert st["prefetch_cancelled"] >= 1


def test_preload_fills_the_budget_without_evicting(arc, reference):
    with _Open(arc) as probe:
        total = probe.expert_bytes
    with _Open(arc, budget=int(total * 0.6)) as store:
        n = store.preload()
        st = _settled(store)
        assert 0 < n < len(store.extents)
        assert st["resident_experts"] == {"full": n} and st["preloaded"] == n
        assert not any(k.startswith("demote_") for k in st)
        assert st["requests"] == 0  # warm-up is not traffic
        for layer in (0, 1):
            _check(store, reference, layer, list(range(8)))
        _settled(store)
    with _Open(arc, budget=int(total * 1.2)) as store:
        assert store.preload() == len(store.extents)
        for layer in (0, 1):
            _check(store, reference, layer, list(range(8)))
        st = _settled(store)
        assert st["hits_full"] == 16 and _read_once(store, st["bytes_read"], [(0, range(8)), (1, range(8))])


def test_a_prefetch_never_evicts_an_expert_it_names(arc, reference):
    """Announcing [a, b] with a resident and no room for b beside it: b is not prefetched at a's
    expense (a is read once), and a fetch that needs the room still gets it."""
    with _Open(arc) as probe:
        a, b = (None, 0, 2), (None, 0, 5)
        budget = probe.min_budget + probe.infos[a].full_bytes // 2
    with _Open(arc, budget=budget, policy="lru") as store:  # FULL or nothing
        _check(store, reference, 0, [2])
        assert store.tier_of(a) == Tier.FULL
        store.prefetch(0, [2, 5], speculative=False)
        store.drain_prefetch()
        assert store.tier_of(a) == Tier.FULL and store.tier_of(b) == Tier.COLD
        _check(store, reference, 0, [2, 5])
        st = _settled(store)
        assert st["hits_full"] == 1 and st["hits_cold"] == 2 and _read_once(store, st["bytes_read"], [(0, [2, 5])])
        store.prefetch(1, [0, 1])  # held pins give way when a fetch needs the room
        _check(store, reference, 0, [2, 5, 7])
        _settled(store)


def _in_thread(fn, timeout=120):
    return in_thread(fn, timeout)


def test_preload_whose_wrap_raises_fails_with_that_error(arc, reference):
    """Keeping a preloaded expert runs ``wrap`` in a decoder callback: when it raises, preload fails
    with that one-line error (no hang), gives every staging byte back, and the store stays usable."""
    from formats.errors import FormatError

    calls = {"n": 0}

    def wrap(ext, arr):
        calls["n"] += 1
        if calls["n"] == 3:
            raise FormatError(f"{ext.label}: runtime cannot use tensors of dtype F8_E4M3 (injected)")
        return arr

    with _Open(arc) as probe:
        total = probe.expert_bytes
    with _Open(arc, budget=int(total * 1.2), wrap=wrap) as store:
        with pytest.raises(FormatError, match=r"\(injected\)$"):
            _in_thread(store.preload)
        st = _settled(store)
        assert 2 <= st["preloaded"] < len(store.extents)
        for layer in (0, 1):
            _check(store, reference, layer, list(range(8)))
        _settled(store)


def test_a_failed_preload_gives_back_what_its_cancelled_admissions_took(arc):
    """At a budget the preload fills, its admission waits for its own decodes with buffers in hand;
    when a failure cancels the preload there, those buffers go back too (no staging left)."""
    from formats.errors import FormatError

    with _Open(arc) as probe:
        total = probe.expert_bytes
    for at in range(2, 7):  # this budget preloads 6 experts
        calls = {"n": 0}

        def wrap(ext, arr, at=at, calls=calls):
            calls["n"] += 1
            if calls["n"] == at:
                raise FormatError(f"{ext.label}: cannot keep it (injected)")
            return arr

        with _Open(arc, budget=int(total * 0.45), threads=1, wrap=wrap) as store:
            with pytest.raises(FormatError, match="injected"):
                _in_thread(store.preload)
            _settled(store)
