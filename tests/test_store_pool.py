"""The buffer pool keeps the next fetch's read and decode buffers: mapping and faulting fresh pages
costs far more than reusing them, and the policies leave that much room (the staging reserve) anyway."""
from __future__ import annotations

import threading

import numpy as np

from formats.decoder import ParallelDecoder
from formats.reader import Archive
from zipmoe_run.store.buffers import PAGE
from zipmoe_run.store.memory import Memory
from zipmoe_run.store.store import ExpertStore


def test_shrinking_the_excess_keeps_what_the_next_fetch_needs():
    cond = threading.Condition()
    cond.acquire()  # Memory runs under the store lock
    mem = Memory(64 * PAGE, cond, PAGE)
    mem.keep = 8 * PAGE
    b = mem.alloc(6 * PAGE)
    mem.release(b, "staging")
    assert not mem.shrink_pool(excess_only=True) and len(mem.pool) == 1  # within keep: kept
    c = mem.alloc(6 * PAGE)
    mem.release(c, "staging")
    assert mem.shrink_pool(excess_only=True) and len(mem.pool) == 1  # 12 pages > keep: one goes
    assert not mem.shrink_pool(excess_only=True)
    assert mem.shrink_pool() and len(mem.pool) == 0  # when nothing else can give way, all of it
    assert mem.ledger.bytes["pool"] == 0


def test_cold_fetches_at_a_budget_reuse_buffers_and_stay_exact(store_archive, monkeypatch):
    """Cycling every expert through a 30 % budget: nearly every fetch reuses pooled buffers (before, the
    pool was emptied to make room before the policy's victim was evicted, and nearly every fetch
    mapped two fresh buffers); every expert stays byte-exact."""
    arc, ref = store_archive(11)
    allocs = []
    real = Memory.alloc
    monkeypatch.setattr(Memory, "alloc", lambda self, n, cat="staging": allocs.append(n) or real(self, n, cat))
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        store = ExpertStore(ar, dec, budget="30%")
        try:
            layers = sorted({k[1] for k in store.extents})
            for _ in range(3):
                for layer in layers:
                    es = sorted(k[2] for k in store.extents if k[1] == layer)
                    for e, w in store.fetch(layer, es):
                        assert np.array_equal(np.asarray(w).view(np.uint8), ref[(None, layer, e)].view(np.uint8))
            cold = store.counters.get("hits_cold")
        finally:
            store.close()
    assert cold >= 20
    assert len(allocs) <= cold // 6, (len(allocs), cold)
