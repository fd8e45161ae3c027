"""Page faults the store spends at start-up: a preload reuses its read buffers instead of mapping (and
faulting) a fresh one per expert, and decoded bytes stay exact (issue: the CPU time of page faults)."""
from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future

import numpy as np

from formats.decoder import ParallelDecoder
from formats.reader import Archive
from zipmoe_run.store.buffers import PAGE, Buffer, BufferPool
from zipmoe_run.store.memory import Memory
from zipmoe_run.store import store as store_mod
from zipmoe_run.store.store import ExpertStore
from zipmoe_run.store.worker import READ_AHEAD
from zipmoe_run.tiers import CostModel


class SlowDecoder:
    """A decoder far slower than the reads (as on a host whose disk outruns its cores): each batch waits
    on one thread behind the previous ones, then decodes with the real decoder."""

    def __init__(self, real: ParallelDecoder, delay: float = 0.01):
        self.real, self.delay, self.threads = real, delay, 1
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def submit(self, refs, out, verify: bool = True) -> Future:
        fut: Future = Future()

        def run():
            with self._lock:  # one batch at a time, in submission order
                self._stop.wait(self.delay)
                try:
                    fut.set_result(self.real.submit(refs, out, verify).result())
                except BaseException as exc:  # noqa: BLE001 - the store reads it from the future
                    fut.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        return fut


def test_preload_reuses_read_buffers_and_stays_exact(store_archive, monkeypatch):
    """With reads far ahead of the decoder, the preload used to map a fresh read buffer for nearly every
    expert (each faulted page by page: a third of the demo's start-up page faults); it now waits for a
    decoded expert's read buffer to return to the pool once READ_AHEAD experts are in flight."""
    arc, ref = store_archive(3)
    sizes = []
    real = Memory.alloc
    monkeypatch.setattr(Memory, "alloc", lambda self, n, cat="staging": sizes.append(n) or real(self, n, cat))
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        store = ExpertStore(ar, dec, budget=None, cost=CostModel(frozen=True))
        store.decoder = store.worker.decoder = SlowDecoder(dec)
        try:
            assert store.preload() == len(ref) >= 3 * READ_AHEAD
            decoded = {i.full_bytes for i in store.infos.values()}
            reads = [n for n in sizes if n not in decoded]
            assert len(sizes) - len(reads) == len(ref)  # every expert's decoded buffer: kept (FULL)
            assert 0 < len(reads) <= READ_AHEAD + 2, reads  # before: one per expert
            assert store.counters.get("hits_cold") == 0
            for (stack, layer, e), want in ref.items():
                (got_e, arr), = list(store.fetch(layer, [e], stack))
                assert got_e == e
                assert np.asarray(arr).view(np.uint8)[:want.nbytes].tobytes() == want.view(np.uint8).tobytes()
            assert store.counters.get("hits_full") == len(ref)
            led = store.memory.ledger.bytes
            assert led["full"] == sum(store.infos[k].full_bytes for k in ref)
            assert led["pool"] == sum(b.charged for b in store.memory.pool._free)
            assert led["staging"] == led["draining"] == 0
        finally:
            store.close()


def test_a_new_read_buffer_is_mapped_at_the_size_that_serves_its_neighbours():
    P = PAGE
    pool = BufferPool(slack=0.125, page=P)
    sizes = [16 * P, 17 * P, 18 * P, 40 * P]
    assert pool.size_for(16 * P, sizes) == 18 * P  # 18 <= 16 + 2 (the slack): it serves 16, 17 and 18
    assert pool.size_for(16 * P - 100, sizes) == 18 * P  # requests are rounded to pages first
    assert pool.size_for(40 * P, sizes) == 40 * P
    assert pool.size_for(30 * P, sizes) == 30 * P  # nothing in reach: its own size
    b = Buffer(pool.size_for(17 * P, sizes), P)
    pool.put(b)
    assert pool.take(18 * P) is b  # before: a buffer mapped for 17 pages could not serve 18
    b.close()


def test_cold_fetches_reuse_read_buffers_of_other_sizes(store_archive, monkeypatch):
    """Experts whose extents differ by a page or two, fetched cold one at a time, each a little longer
    than the last: the pool holds the previous read buffer. Before, a pooled buffer smaller than the next
    extent was of no use and every size mapped (and faulted) its own (at a budget the pool then gave
    the biggest back first and the churn went on: the demo at 40 %: 47 read buffers mapped for 202 cold
    fetches; now 2); now the first is mapped at the size that serves them all. Bytes exact."""
    arc, ref = store_archive(11)
    info = store_mod.info_from_extent

    def wider(ext, page):  # extents 0-2 pages longer (this small archive's differ by a few bytes only)
        i, k = info(ext, page), ext.key[2] % 3 * page
        return dataclasses.replace(i, comp_bytes=i.comp_bytes + k, sm_bytes=i.sm_bytes + k, read_cold=i.read_cold + k)

    monkeypatch.setattr(store_mod, "info_from_extent", wider)
    sizes = []
    real = Memory.alloc
    monkeypatch.setattr(Memory, "alloc", lambda self, n, cat="staging": sizes.append(n) or real(self, n, cat))
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        store = ExpertStore(ar, dec, budget=None, cost=CostModel(frozen=True))
        try:
            comp = {i.comp_bytes for i in store.infos.values()}
            full = {i.full_bytes for i in store.infos.values()}
            assert len(comp) == 3 and not comp & full
            for key in sorted(ref, key=lambda k: (k[1], k[2] // 3, k[2] % 3)):  # sizes 0, 1, 2, 0, 1, 2, ...
                (e, w), = list(store.fetch(key[1], [key[2]], key[0]))
                want = ref[key].view(np.uint8)
                assert e == key[2] and np.asarray(w).view(np.uint8)[:want.nbytes].tobytes() == want.tobytes()
            reads = [n for n in sizes if n not in full]
            assert store.counters.get("hits_cold") == len(ref)
            assert store.memory.ledger.bytes["full"] == sum(i.full_bytes for i in store.infos.values())
        finally:
            store.close()
    assert reads == [max(comp)]  # before: one per size, each mapped and faulted
