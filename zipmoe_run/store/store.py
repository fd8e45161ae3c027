"""``ExpertStore``: routed experts under a memory budget, in four tiers, fetched with cache affinity.

The store composes a few objects, each owning one thing (specs/runtime.md):

* ``ExpertBytes`` (``bytesource``): where expert bytes come from (a ``.zmoe`` archive read with
  honest I/O by an ``ExpertReader``);
* ``Memory`` (``memory``): the ledger, the buffer pool and the buffers still lent to the caller;
* ``TierTable`` (``table``): which tier each expert is in, and the moves the policy asks for;
* ``IOWorker`` (``worker``): the task queue and its I/O thread (admit, read, decode);
* ``Prefetcher`` (``prefetch``): prefetch, preload and what they hand over to fetches.

One ``fetch(layer, experts)`` call (one MoE layer; ``experts`` may be the union several sequences
route to), top to bottom in ``fetch`` below:

1. every requested expert is looked up; FULL ones are pinned and yielded first, at once;
2. prefetched ones are adopted and yielded as their decodes complete;
3. the others become tasks ordered by Johnson's rule (``scheduler``) on their estimated read and
   decode times, run by the I/O worker, and are yielded in completion order; when the model asks for
   the next one, the table places the previous one (FULL / COMP / SM / dropped) through the policy.

The model sums expert outputs in a fixed order, so results never depend on this timing.

Memory: every buffer is charged before it is allocated; ``used <= budget`` at all times. Buffers
the model may still reference (a lent view alive) are never reused and stay charged (``draining``)
until returned. Errors (a failing read, a corrupt chunk, a truncated file) surface in the consumer
as the original one-line exception; the job is then cancelled, in-flight work is awaited, every
reservation is returned and resident data is restored, so the store stays usable.

Not re-entrant: a second ``fetch`` while one is open raises ``StoreError``. Torch-free: the caller
turns decoded buffers into tensors through ``wrap(extent, uint8 array)``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from formats.decoder import ParallelDecoder
from zipmoe_run.policies.protocol import Policy, make_policy
from zipmoe_run.tiers import CostModel, Tier, info_from_extent

from .budget import Budget, BudgetError, fmt_bytes, parse_budget
from .buffers import PAGE, ceil_to
from .bytesource import ArchiveBytes, ExpertBytes
from .io import ExpertReader
from .memory import Memory
from .prefetch import Prefetcher
from .preloader import bulk_preload
from .report import store_stats, verdict
from .scheduler import FlowTask, johnson_order
from .state import Job, Stats, StoreError, Task
from .table import TierTable
from .worker import EWMA, IOWorker

__all__ = ["ExpertStore", "StoreError"]

log = logging.getLogger(__name__)

CLOSE_JOIN_S = 30.0  # how long close() waits for the I/O thread before leaving the resources to it


class ExpertStore:
    """The tiered, budgeted expert store of one open ``formats.reader.Archive`` (or of any
    ``ExpertBytes`` given as ``source``; ``archive`` is then unused)."""

    def __init__(self, archive, decoder: ParallelDecoder, *, budget: Budget | str | int | None = None,
                 policy: str | Policy | None = None, io_mode: str = "auto", io_throttle_bps: float | None = None,
                 wrap: Callable[[object, np.ndarray], object] | None = None, dense_bytes: int = 0,
                 cost: CostModel | None = None, page_size: int | None = None, source: ExpertBytes | None = None,
                 read_depth: int = 1):
        self.archive, self.decoder = archive, decoder
        self.wrap = wrap if wrap is not None else (lambda ext, arr: arr)
        self.page = page_size or PAGE
        if source is None:
            source = ArchiveBytes(archive, ExpertReader(archive.path, io_mode, throttle_bps=io_throttle_bps))
        self.source = source
        try:
            self._size(budget, dense_bytes)
            self.cost = cost if cost is not None else CostModel()
            self.policy = make_policy(policy, self.cost)
        except BaseException:  # a bad budget, page size or policy name: nothing stays open
            self.source.close()
            raise
        self.reader = source.reader  # the ExpertReader (its mode, throttle and counters are reported)
        self.counters = Stats()
        self.cond = threading.Condition(threading.Lock())  # the store lock: memory, table, prefetch state
        self.memory = Memory(self.capacity, self.cond, self.page)
        self.memory.ledger.charge("fixed", self.fixed_bytes)
        self.memory.keep = self._reserve  # the policies leave this much room for staging
        self.table = TierTable(self.extents, self.infos, self.memory, self.policy, self.counters, self._reserve,
                               self.source.scratch_elements)
        self.prefetcher = Prefetcher(self.table, self.counters, self.cond, self.wrap, self._help)
        self.worker = IOWorker(self.source, decoder, self.memory, self.table, self.cost, self.counters, self.cond,
                               self.prefetcher, self._on_decoded, read_depth=read_depth)
        self.prefetcher.worker = self.worker
        self.worker.on_exit = self._free
        self.persistent = self.capacity is None  # no budget: yielded dicts are the resident ones
        self.bulk_preload = os.environ.get("ZIPMOE_BULK_PRELOAD", "1") != "0"  # preloader; 0: the task pipeline
        self._active: Job | None = None
        self._closed = False
        self._freed = False
        log.info("expert store: budget %s; io %s, %d read(s) in flight; %d decoder thread(s); policy %s",
                 self.budget.how, self.reader.mode, self.worker.read_depth, self.decoder.threads, self.policy.name)
        if hasattr(self.policy, "replan_soon") and hasattr(self.cost.drift, "listeners"):  # re-plan on a drift
            self.cost.drift.listeners.append(lambda _name: self.policy.replan_soon())
        self.read_bps_calibrated = self.cost.read_bps
        self.compression = verdict(self)
        if self.compression is not None:
            (log.info if self.compression["pays"] else log.warning)("%s", self.compression["why"])

    def _size(self, budget, dense_bytes: int) -> None:
        """Byte facts, the minimum budget and the budget itself (refused below the minimum)."""
        self.extents = self.source.extents
        self.infos = {k: info_from_extent(e, self.page) for k, e in self.extents.items()}
        self.expert_bytes = sum(e.decoded_nbytes for e in self.extents.values())
        self.extent_bytes = sum(e.length for e in self.extents.values())
        C = self.source.scratch_elements  # decoder scratch (one chunk per worker and one for the
        # consumer, which decodes queued chunks while it waits: ``_next_ready``) + split scratch
        self.helping = hasattr(self.decoder, "help")
        self.fixed_bytes = ceil_to((self.decoder.threads + self.helping) * C, self.page) + ceil_to(C, self.page)
        big = max(self.infos.values(), key=lambda i: i.min_working_set, default=None)
        self.min_budget = (big.min_working_set if big else 0) + self.fixed_bytes
        need_all = sum(i.full_bytes for i in self.infos.values()) + self.min_budget
        if not isinstance(budget, Budget):
            budget = parse_budget(budget, expert_bytes=self.expert_bytes, need_all=need_all, dense_bytes=dense_bytes)
        self.budget, self.capacity = budget, budget.nbytes
        if budget.nbytes is not None and budget.nbytes < self.min_budget:
            raise BudgetError(
                f"memory budget {fmt_bytes(budget.nbytes)} is below the minimum {fmt_bytes(self.min_budget)} "
                f"({self.min_budget} bytes): one expert's read buffer {fmt_bytes(big.comp_bytes)} + decode buffer "
                f"{fmt_bytes(big.full_bytes)} + decoder scratch {fmt_bytes(self.fixed_bytes)} "
                f"({self.extents[big.key].label})")
        self._reserve = big.staging(Tier.COLD) if (big and budget.nbytes is not None) else 0

    # -- what callers may look at (the policy sees the TierTable) -----------------------------------
    def tier_of(self, key) -> Tier:
        return self.table.tier_of(key)

    def resident(self):
        """(key, tier) of every expert held in FULL, COMP or SM and not being fetched right now."""
        return self.table.resident()

    @property
    def ledger(self):
        return self.memory.ledger

    @property
    def io_mode(self) -> str:
        return self.reader.mode

    # -- fetch ------------------------------------------------------------------------------------
    def fetch(self, layer: int, experts: Sequence[int], stack: str | None = None
              ) -> Iterator[tuple[int, object]]:
        """Yield (expert id, wrap(extent, decoded bytes)) for each requested expert as it is ready.

        ``experts`` may be the union several sequences route to (repeats are served once). Resident
        (FULL) experts come first; the rest in decode-completion order. With a budget a yielded dict
        is emptied when the caller asks for the next expert; without one it stays valid.
        """
        keys = self._keys(layer, experts, stack)
        held = self._all_full(keys)
        if held is not None:  # no budget, every one decoded, nothing in flight: the dicts themselves
            for key, weights in zip(keys, held):
                yield key[2], weights
            return
        job = self._open(keys)
        try:
            while job.pinned:  # 1. resident experts, at once
                key, ent = job.pinned[0]
                yield key[2], self._lend(job, ent.weights)  # no local: the frame must not keep it alive
                self._unlend(job)
                with self.cond:
                    ent.pins -= 1
                    job.pinned.pop(0)
                    self.cond.notify_all()
            for sj, task in job.adopted:  # 2. what a prefetch already read, as its decode completes
                self.prefetcher.await_task(sj, task)
                if task.state != "ready":
                    raise StoreError(f"internal error: prefetched {task.ext.label} was never decoded")
                yield from self._serve(job, task)
            for _ in range(len(job.tasks)):  # 3. the rest, read and decoded now, in completion order
                yield from self._serve(job, self._next_ready(job))
        finally:
            self._unlend(job)
            self._finish(job)

    def _all_full(self, keys: list[tuple]) -> list | None:
        """The weights of every key when the store has no budget (nothing is ever evicted, so nothing
        needs a pin), all of them are FULL and no fetch, prefetch or held set is open; counted as the
        hits they are (the policy's scores only order evictions, which never happen here). Else None."""
        if not self.persistent:
            return None
        with self.cond:
            pf = self.prefetcher
            if self._closed or self._active is not None or pf.jobs or pf.held or pf.predicted:
                return None
            ents = [self.table.entries.get(k) for k in keys]
            if not all(e is not None and e.tier == Tier.FULL for e in ents):
                return None
            self.table.now += 1
            self.counters.add("fetch_calls")
            self.counters.add("requests", len(keys))
            self.counters.add("hits_full", len(keys))
            return [e.weights for e in ents]

    def _keys(self, layer: int, experts: Sequence[int], stack: str | None) -> list[tuple]:
        """Distinct keys in request order (a batch's union may name an expert more than once)."""
        keys = list(dict.fromkeys((stack, int(layer), int(e)) for e in experts))
        for k in keys:
            if k not in self.extents:
                self.source.missing(k)  # raises the one-line error naming it
        return keys

    def _open(self, keys: list[tuple]) -> Job:
        """Pin the FULL hits, adopt prefetched tasks, claim the rest as tasks in Johnson's order."""
        pf = self.prefetcher
        if pf.jobs and self._active is None:
            pf.settle(keys)
        with self.cond:
            if self._closed:
                raise StoreError("expert store is closed")
            if self._active is not None:
                raise StoreError("ExpertStore.fetch() called while another fetch is still open "
                                 "(consume or close the previous generator first)")
            pf.reap()
            if pf.held:
                pf.release_held()
            adopted = pf.adopt(keys) if pf.jobs else []
            if pf.predicted:
                pf.score(keys)
            taken = {t.key for _, t in adopted}
            self.table.now += 1
            self.counters.add("fetch_calls")
            pinned, tasks = [], []
            for k in keys:
                t = self.table.tier_of(k)
                self.policy.on_access(k, t, self.table.now)
                self.counters.add("requests")
                if k in taken:
                    self.counters.add("hits_prefetch")
                    continue
                self.counters.add(f"hits_{t.label}")
                task = self.table.claim(k)
                if task is None:
                    pinned.append((k, self.table.entries[k]))
                else:
                    tasks.append(task)
            job = Job(self._schedule(tasks))
            job.pinned, job.adopted = pinned, adopted
            self._active = job
        if job.tasks:
            self.worker.submit(job)
        return job

    def _schedule(self, tasks: list[Task]) -> list[Task]:
        """Johnson's order on estimated (read, decode) seconds; updates the cost model's read share."""
        flow = []
        for task in tasks:
            task.est = (self.cost.read_s(task.info.read_bytes(task.start)), self.cost.decode_s(task.info.decoded))
            flow.append(FlowTask(task, *task.est))
        if flow:
            sa, sd = sum(f.read_s for f in flow), sum(f.decode_s for f in flow)
            if sa + sd > 0 and not self.cost.frozen:
                self.cost.read_share += EWMA * (sa / (sa + sd) - self.cost.read_share)
        return [f.key for f in johnson_order(flow)]

    def _serve(self, job: Job, task: Task) -> Iterator[tuple[int, object]]:
        """Yield a decoded task's expert to the caller, then place it when the caller moves on."""
        if task.error is not None:
            raise task.error
        task.weights = self.wrap(task.ext, task.dbuf.lend(task.ext.decoded_nbytes))
        task.state = "lent"
        yield task.key[2], self._lend(job, task.weights)
        self._unlend(job)
        with self.cond:
            self.table.place(task)

    def _lend(self, job: Job, weights):
        """What the caller gets: the resident dict itself without a budget, else a copy emptied on resume."""
        if self.persistent or not isinstance(weights, dict):
            return weights
        job.lent = dict(weights)
        return job.lent

    def _unlend(self, job: Job) -> None:
        if job.lent is not None:
            job.lent.clear()  # the caller's references to this expert's tensors go with it
            job.lent = None

    def _next_ready(self, job: Job) -> Task:
        """The next decoded task; while none is, this (the compute) thread decodes queued chunks
        itself (``ParallelDecoder.help``) instead of sleeping, so a decode's tail has every core."""
        with self.counters.timer("stall_s"):
            try:
                while True:
                    with job.cond:
                        job.waiting = True
                        if job.ready:
                            return job.ready.popleft()
                        if job.reader_done and job.inflight == 0:
                            raise StoreError("internal error: the fetch ended before every expert was decoded")
                    if self._help():
                        continue
                    with job.cond:
                        if not job.ready and not (job.reader_done and job.inflight == 0):
                            job.cond.wait()  # the worker notifies on each decode batch it queues
            finally:
                with job.cond:
                    job.waiting = False

    def _help(self) -> bool:
        """Decode one queued chunk on this thread (counted in ``helped_chunks``)."""
        if not self.helping or not self.decoder.help():
            return False
        self.counters.add("helped_chunks")
        return True

    def _finish(self, job: Job) -> None:
        """The fetch ends (done, failed or abandoned): stop its work, place what was served, revert the rest."""
        job.cancelled = True
        with self.cond:
            self.cond.notify_all()
        with job.cond:
            while not (job.reader_done and job.inflight == 0):
                job.cond.wait(timeout=0.1)
        for sj, task in job.adopted:
            if task.state not in ("lent", "placed"):
                self.prefetcher.await_task(sj, task)
        with self.cond:
            for _, ent in job.pinned:
                ent.pins -= 1
            job.pinned = []
            for task in [t for _, t in job.adopted] + job.tasks:
                if task.state == "lent":
                    self.table.place(task)
                elif task.state != "placed":
                    self.table.revert(task)
            job.adopted = []
            self._active = None
            self.cond.notify_all()

    def _on_decoded(self, job: Job, task: Task) -> None:
        """The worker's completion hook: a preloaded expert is kept decoded (FULL) at once, so its
        read buffer is free for the next one. A failure here fails the preload with its error."""
        if not job.preload:
            return
        with self.cond:
            try:
                task.weights = self.wrap(task.ext, task.dbuf.lend(task.ext.decoded_nbytes))
                self.table.place(task, Tier.FULL)
                self.counters.add("preloaded")
            except BaseException as exc:
                task.weights = None
                if self.prefetcher.preload_error is None:
                    self.prefetcher.preload_error = exc
                for sj in self.prefetcher.jobs:  # stop the rest of the preload
                    if sj.preload:
                        sj.cancelled = True
                raise

    # -- prefetch and preload -----------------------------------------------------------------------
    def prefetch(self, layer: int, experts: Sequence[int], stack: str | None = None, *,
                 speculative: bool = True, _preload: bool = False) -> int:
        """Start reading and decoding ``experts`` of ``layer`` in the background; returns how many were
        queued (experts already resident or already being prefetched are skipped). ``speculative=False``
        marks a request the model is certain to make next. Never blocks, never raises for a full budget.
        """
        keys = []
        for e in experts:
            k = (stack, int(layer), int(e))
            if k in self.extents and k not in keys:
                keys.append(k)
        if self._closed:
            return 0
        return self.prefetcher.prefetch((stack, int(layer)), keys, speculative=speculative, preload=_preload)

    def preload(self) -> int:
        """Load-time warm-up (section 5.6): decode experts, layer by layer, into FULL until the budget has
        no room beside the working reserve (nothing is evicted). Blocks; returns how many were preloaded.
        A failure to keep one (its ``wrap``) fails the preload with that error; a corrupt chunk surfaces
        on first use."""
        t0 = time.perf_counter()
        before = self.counters.get("preloaded")
        layers: dict = {}
        for k in self.extents:
            layers.setdefault((k[0] or "", k[1], k[0]), []).append(k[2])
        order = sorted(layers.items(), key=lambda kv: kv[0][:2])
        if self.bulk_preload and not self._closed:  # GIL-free batches (preloader); what they leave, below
            bulk_preload(self, [(stack, layer, e) for (_, layer, stack), experts in order for e in sorted(experts)],
                         self.decoder.threads)
        for (_, layer, stack), experts in order:
            if self.prefetcher.preload_error is not None:
                break
            cold = [e for e in sorted(experts) if self.table.tier_of((stack, layer, e)) == Tier.COLD]
            if cold:  # a prefetch would hold (pin) the resident ones
                self.prefetch(layer, cold, stack, speculative=False, _preload=True)
        self.drain_prefetch()
        self.counters.add("preload_s", time.perf_counter() - t0)
        with self.cond:
            err, self.prefetcher.preload_error = self.prefetcher.preload_error, None
        if err is not None:
            raise err
        return int(self.counters.get("preloaded") - before)

    def drain_prefetch(self) -> None:
        """Block until every prefetch has finished, and settle what nobody adopted (placed or reverted)."""
        self.prefetcher.drain()

    # -- reporting and shutdown ---------------------------------------------------------------------
    def stats(self) -> dict:
        return store_stats(self)

    def close(self) -> None:
        """Cancel what runs and stop the I/O thread. Its file descriptors and buffers are freed by the
        thread itself as it ends: never under a thread that may still read into them (a read stuck
        for more than ``CLOSE_JOIN_S`` is logged and left to finish)."""
        with self.cond:
            if self._closed:
                return
            self._closed = True
            if self._active is not None:
                self._active.cancelled = True
            self.prefetcher.cancel_all()
            self.cond.notify_all()
        if not self.worker.stop(CLOSE_JOIN_S):
            log.error("expert store: the I/O thread is still reading %s after %g s; its file descriptors and "
                      "buffers are released when it ends", self.reader.path, CLOSE_JOIN_S)
        finish = getattr(getattr(self.cost, "drift", None), "finish", None)
        if finish is not None:
            finish()  # the run's mean rates, where they drifted, into the calibration cache (calibrate)

    def _free(self) -> None:
        """On the I/O thread, after its last job (close): release buffers and file descriptors."""
        with self.cond:
            if self._freed:
                return
            self._freed = True
            self.table.clear()
            self.memory.close()
        self.source.close()
