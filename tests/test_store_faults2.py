"""Page faults the store spends at start-up: a preload reuses its read buffers instead of mapping (and
faulting) a fresh one per expert, and decoded bytes stay exact (issue: the CPU time of page faults)."""
from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np

from formats.decoder import ParallelDecoder
from formats.reader import Archive
from zipmoe_run.store.memory import Memory
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
