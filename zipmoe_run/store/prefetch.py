"""Prefetch for ``ExpertStore``: start reading and decoding experts before the model asks for them.

``prefetch(layer, experts)`` queues a *speculative job* behind whatever the I/O thread is doing and
returns at once. Its tasks differ from a fetch's in three ways (specs/runtime.md section 5.5):

* admission never waits and never evicts a pinned or in-flight expert (those of the fetch that is
  open, i.e. what the current layer needs): when the budget has no room left after the policy's
  victims, the rest of the prefetch is dropped;
* the next ``fetch`` *adopts* every prefetched task of an expert it asks for that has been admitted
  (it is yielded when its decode completes, with no second read); prefetched tasks not yet admitted
  are dropped and the fetch reads those experts itself; a prefetch still reading an expert the
  fetch does not ask for is cancelled, so the fetch's own reads are not kept waiting;
* what nobody adopted is finished by the reaper (``_reap_spec``, under the store lock, from
  ``fetch``, ``prefetch``, admission, ``stats`` and ``close``): decoded experts are placed by the
  policy like any other, failed or cancelled ones are reverted.

A newer ``prefetch`` supersedes an older speculative one: tasks of experts it no longer names are
dropped (or cancelled while reading); a certain one (``speculative=False``) is left to its fetch. Accuracy is counted for speculative calls: of the experts predicted for a
layer, how many the next fetch of that layer asked for.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from .state import _Entry, _Job, _Task
from .tiers import Tier

__all__ = ["PrefetchMixin"]


class PrefetchMixin:
    """Mixed into ``ExpertStore``; uses its lock, entries, queue and ``_place``/``_revert``."""

    def _init_prefetch(self) -> None:
        self._spec: list = []  # speculative jobs, oldest first
        self._held: set = set()  # resident experts a prefetch named: pinned until the next fetch opens
        self._predicted: dict[tuple, set] = {}  # (stack, layer) -> experts a speculative call predicted

    def prefetch(self, layer: int, experts: Sequence[int], stack: str | None = None, *,
                 speculative: bool = True, _preload: bool = False) -> int:
        """Start reading and decoding ``experts`` of ``layer`` in the background; returns how many were
        queued (experts already resident or already being prefetched are skipped).

        ``speculative=False`` marks a request the model is certain to make next (it only moves the
        reads earlier); speculative calls are counted for accuracy. Never blocks, never raises for
        a full budget: what does not fit is simply not prefetched.
        """
        want = []
        for e in experts:
            k = (stack, int(layer), int(e))
            if k in self.extents and k not in want:
                want.append(k)
        with self._lock:
            if self._closed:
                return 0
            self._reap_spec()
            keep = set(want)
            taken = set()
            for sj in self._spec:
                for t in sj.tasks:
                    if t.adopted or t.state == "placed":
                        continue
                    if t.key in keep or sj.certain:
                        taken.add(t.key)
                    elif t.state == "queued":
                        self._drop_queued(t)
                    else:
                        t.cancel = True
            if speculative and not _preload:
                self._predicted[(stack, int(layer))] = {k[2] for k in want}
                self._stats["prefetch_predicted"] += len(want)
            tasks = []
            for k in want:
                if k in taken:
                    continue
                ent = self._entries.get(k)
                if ent is not None and ent.tier != Tier.COLD and not ent.busy and k not in self._held:
                    ent.pins += 1  # named as needed next: no prefetch may evict it before that fetch
                    self._held.add(k)
                if ent is not None and (ent.tier != Tier.COLD or ent.busy):
                    continue  # resident, or owned by the open fetch
                if ent is None:
                    ent = self._entries[k] = _Entry()
                ent.busy = True
                tasks.append(_Task(k, self.extents[k], self.infos[k], Tier.COLD))
            if not tasks:
                return 0
            job = _Job(tasks, speculative=True)
            job.certain = not speculative
            job.preload = _preload
            self._spec.append(job)
            self._stats["prefetch_queued"] += len(tasks)
        self._jobs.put(job)
        return len(tasks)

    def preload(self) -> int:
        """Load-time warm-up: read and decode experts, layer by layer, into FULL until the budget has
        no room left beside the store's working reserve (nothing is evicted). Blocks; returns how
        many experts were preloaded. Errors (a corrupt chunk) surface later, on first use."""
        t0 = time.perf_counter()
        with self._lock:
            before = self._stats["preloaded"]
            layers: dict = {}
            for k in self.extents:
                layers.setdefault((k[0] or "", k[1], k[0]), []).append(k[2])
        for (_, layer, stack), experts in sorted(layers.items(), key=lambda kv: kv[0][:2]):
            self.prefetch(layer, sorted(experts), stack, speculative=False, _preload=True)
        self.drain_prefetch()
        with self._lock:
            n = self._stats["preloaded"] - before
            self._stats["preload_s"] += time.perf_counter() - t0
        return n

    def drain_prefetch(self) -> None:
        """Block until every prefetch has finished, and settle what nobody adopted (placed or reverted)."""
        while True:
            with self._lock:
                self._reap_spec()
                live = list(self._spec)
            if not live:
                return
            sj = live[0]
            with sj.cond:
                while not (sj.reader_done and sj.inflight == 0):
                    sj.cond.wait(timeout=0.1)

    # -- under self._lock ---------------------------------------------------------------------------
    def _release_held(self) -> None:
        """The next fetch has opened (it pins what it uses) or the store closes: unpin what prefetch held."""
        for k in self._held:
            ent = self._entries.get(k)
            if ent is not None and ent.pins:
                ent.pins -= 1
        self._held.clear()

    def _drop_queued(self, t) -> None:
        """A prefetched task the I/O thread has not admitted: forget it (it holds no buffers)."""
        t.state = "placed"
        ent = self._entries.get(t.key)
        if ent is not None:
            ent.busy = False
        self._stats["prefetch_dropped"] += 1

    def _reap_spec(self) -> None:
        """Finish the speculative jobs the I/O thread and the decoder are done with."""
        if not self._spec:
            return
        live = []
        for sj in self._spec:
            with sj.cond:
                done = sj.reader_done and sj.inflight == 0
            if not done:
                live.append(sj)
                continue
            for t in sj.tasks:
                if t.adopted or t.state == "placed":
                    continue
                if t.state == "ready" and t.error is None:
                    t.weights = self.wrap(t.ext, t.dbuf.arr[:t.ext.decoded_nbytes])
                    self._place(t)
                    self._stats["prefetch_unused"] += 1
                elif t.state == "queued":
                    self._drop_queued(t)
                else:
                    self._revert(t)
                    self._stats["prefetch_cancelled"] += 1
        self._spec = live

    def _adopt(self, keys: list[tuple]) -> list:
        """At the start of a fetch: take over the prefetched tasks of ``keys`` that are admitted,
        drop the queued ones, cancel unwanted reads. Returns [(job, task)] in queue order."""
        want = set(keys)
        adopted = []
        for sj in self._spec:
            for t in sj.tasks:
                if t.adopted or t.state == "placed":
                    continue
                if t.state == "queued":
                    self._drop_queued(t)  # the fetch reads it itself if it wants it
                elif t.key in want and not t.cancel:
                    t.adopted = True
                    adopted.append((sj, t))
                elif t.key not in want:
                    t.cancel = True
        if adopted:
            self._stats["prefetch_adopted"] += len(adopted)
        return adopted

    def _score_guesses(self, keys: list[tuple]) -> None:
        """A fetch of a layer a speculative call guessed: count the guessed experts it asks for."""
        for lk in {(k[0], k[1]) for k in keys}:
            pred = self._predicted.pop(lk, None)
            if pred is not None:
                self._stats["prefetch_correct"] += len(pred & {k[2] for k in keys if (k[0], k[1]) == lk})

    # -- without the lock ----------------------------------------------------------------------------
    def _settle(self, keys: list[tuple]) -> None:
        """Wait until no cancelled prefetch still owns one of ``keys`` (it is reverted, then fetched)."""
        want = set(keys)
        while True:
            with self._lock:
                self._reap_spec()
                busy = next((sj for sj in self._spec for t in sj.tasks
                             if t.key in want and t.cancel and not t.adopted and t.state != "placed"), None)
            if busy is None:
                return
            with busy.cond:
                while not (busy.reader_done and busy.inflight == 0):
                    busy.cond.wait(timeout=0.1)

    def _await(self, sj, task) -> None:
        """Block until the adopted ``task`` of speculative job ``sj`` is decoded (or failed)."""
        t0 = time.perf_counter()
        with sj.cond:
            while task.state != "ready" and not (sj.reader_done and sj.inflight == 0):
                sj.cond.wait(timeout=0.1)
        with self._stat_lock:
            self._stats["stall_s"] += time.perf_counter() - t0
