"""``Prefetcher``: start reading and decoding experts before the model asks for them.

``prefetch(layer, experts)`` queues a *speculative job* on the ``IOWorker`` behind whatever it is
doing and returns at once. Its tasks differ from a fetch's in three ways (specs/runtime.md 5.5):

* admission never waits and never evicts a pinned or in-flight expert (those of the fetch that is
  open, i.e. what the current layer needs): when the budget has no room left after the policy's
  victims, the rest of the prefetch is dropped;
* the next ``fetch`` *adopts* every prefetched task of an expert it asks for that has been admitted
  (it is yielded when its decode completes, with no second read); prefetched tasks not yet admitted
  are dropped and the fetch reads those experts itself; a prefetch still reading an expert the
  fetch does not ask for is cancelled, so the fetch's own reads are not kept waiting;
* what nobody adopted is finished by ``reap`` (under the store lock, from ``fetch``, ``prefetch``,
  admission, ``stats`` and ``close``): decoded experts are placed by the policy like any other,
  failed or cancelled ones are reverted.

A newer ``prefetch`` supersedes an older speculative one: tasks of experts it no longer names are
dropped (or cancelled while reading); a certain one (``speculative=False``) is left to its fetch.
Accuracy is counted for speculative calls: of the experts predicted for a layer, how many the next
fetch of that layer asked for. ``preload`` (section 5.6) is a certain prefetch of every layer whose
experts stay decoded (FULL) as they complete.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from .state import Job, Stats, Task
from .table import TierTable

__all__ = ["Prefetcher"]


class Prefetcher:
    """Owns the speculative jobs, the experts a prefetch pinned (``held``) and the guesses to score.
    ``cond`` is the store lock's condition; ``wrap`` turns a decoded buffer into the weights."""

    def __init__(self, table: TierTable, stats: Stats, cond: threading.Condition, wrap: Callable,
                 help: Callable[[], bool] = lambda: False):
        self.table, self.stats, self.cond, self.wrap = table, stats, cond, wrap
        self.help = help  # decode one queued chunk on the waiting thread (the store's ``_help``)
        self.worker = None  # the IOWorker (set by the store: the two refer to each other)
        self.jobs: list[Job] = []  # speculative jobs, oldest first
        self.held: set = set()  # resident experts a prefetch named: pinned until the next fetch opens
        self.predicted: dict[tuple, set] = {}  # (stack, layer) -> experts a speculative call predicted
        self.preload_error: BaseException | None = None
        self.closed = False

    # -- without the lock ---------------------------------------------------------------------------
    def prefetch(self, layer_key: tuple, keys: list[tuple], *, speculative: bool, preload: bool = False) -> int:
        """Queue the COLD experts of ``keys`` (all of layer ``layer_key`` = (stack, layer))."""
        with self.cond:
            if self.closed:
                return 0
            self.reap()
            keep = set(keys)
            taken = set()
            for sj in self.jobs:
                for t in sj.tasks:
                    if t.adopted or t.state == "placed":
                        continue
                    if t.key in keep or sj.certain:
                        taken.add(t.key)
                    elif t.state == "queued":
                        self.drop_queued(t)
                    else:
                        t.cancel = True
            if speculative and not preload:
                self.predicted[layer_key] = {k[2] for k in keys}
                self.stats.add("prefetch_predicted", len(keys))
            tasks = []
            for k in keys:
                if k in taken:
                    continue
                if k not in self.held and self.table.hold(k):
                    self.held.add(k)  # named as needed next: no prefetch may evict it before that fetch
                task = self.table.claim_cold(k)
                if task is not None:
                    tasks.append(task)
            if not tasks:
                return 0
            job = Job(tasks, speculative=True)
            job.certain = not speculative
            job.preload = preload
            self.jobs.append(job)
            self.stats.add("prefetch_queued", len(tasks))
        self.worker.submit(job)
        return len(tasks)

    def drain(self) -> None:
        """Block until every prefetch has finished, and settle what nobody adopted."""
        while True:
            with self.cond:
                self.reap()
                live = list(self.jobs)
            if not live:
                return
            _wait_done(live[0])

    def settle(self, keys: list[tuple]) -> None:
        """Wait until no cancelled prefetch still owns one of ``keys`` (it is reverted, then fetched)."""
        want = set(keys)
        while True:
            with self.cond:
                self.reap()
                busy = next((sj for sj in self.jobs for t in sj.tasks
                             if t.key in want and t.cancel and not t.adopted and t.state != "placed"), None)
            if busy is None:
                return
            _wait_done(busy)

    def await_task(self, sj: Job, task: Task) -> None:
        """Block until the adopted ``task`` of speculative job ``sj`` is decoded (or failed)."""
        with self.stats.timer("stall_s"):
            while True:
                with sj.cond:
                    if task.state == "ready" or (sj.reader_done and sj.inflight == 0):
                        return
                if self.help():
                    continue
                with sj.cond:
                    if task.state != "ready" and not (sj.reader_done and sj.inflight == 0):
                        sj.cond.wait(timeout=0.1)

    # -- under the store lock -------------------------------------------------------------------------
    def release_held(self) -> None:
        """The next fetch has opened (it pins what it uses) or memory is needed: unpin what prefetch held."""
        for k in self.held:
            self.table.unpin(k)
        self.held.clear()

    def drop_queued(self, t: Task) -> None:
        """A prefetched task the I/O thread has not admitted: forget it (an admission cancelled half-way
        gives back the buffers it had taken)."""
        if t.rbuf is not None or t.dbuf is not None:
            self.table.revert(t)
        t.state = "placed"
        self.table.forget(t.key)
        self.stats.add("prefetch_dropped")

    def reap(self) -> None:
        """Finish the speculative jobs the I/O thread and the decoder are done with."""
        if not self.jobs:
            return
        live = []
        for sj in self.jobs:
            with sj.cond:
                done = sj.reader_done and sj.inflight == 0
            if not done:
                live.append(sj)
                continue
            for t in sj.tasks:
                if t.adopted or t.state == "placed":
                    continue
                if t.state == "ready" and t.error is None:
                    t.weights = self.wrap(t.ext, t.dbuf.lend(t.ext.decoded_nbytes))
                    self.table.place(t)
                    self.stats.add("prefetch_unused")
                elif t.state == "queued":
                    self.drop_queued(t)
                else:
                    self.table.revert(t)
                    self.stats.add("prefetch_cancelled")
        self.jobs = live

    def adopt(self, keys: list[tuple]) -> list[tuple[Job, Task]]:
        """At the start of a fetch: take over the prefetched tasks of ``keys`` that are admitted,
        drop the queued ones, cancel unwanted reads. Returns [(job, task)] in queue order."""
        want = set(keys)
        adopted = []
        for sj in self.jobs:
            for t in sj.tasks:
                if t.adopted or t.state == "placed":
                    continue
                if t.state == "queued":
                    self.drop_queued(t)  # the fetch reads it itself if it wants it
                elif t.key in want and not t.cancel:
                    t.adopted = True
                    adopted.append((sj, t))
                elif t.key not in want:
                    t.cancel = True
        if adopted:
            self.stats.add("prefetch_adopted", len(adopted))
        return adopted

    def score(self, keys: list[tuple]) -> None:
        """A fetch of a layer a speculative call guessed: count the guessed experts it asks for."""
        for lk in {(k[0], k[1]) for k in keys}:
            pred = self.predicted.pop(lk, None)
            if pred is not None:
                self.stats.add("prefetch_correct", len(pred & {k[2] for k in keys if (k[0], k[1]) == lk}))

    def cancel_all(self) -> None:
        """The store closes: no new prefetch; the queued ones stop."""
        self.closed = True
        for sj in self.jobs:
            sj.cancelled = True


def _wait_done(job: Job) -> None:
    with job.cond:
        while not (job.reader_done and job.inflight == 0):
            job.cond.wait(timeout=0.1)
