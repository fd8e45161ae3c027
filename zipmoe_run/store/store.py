"""``ExpertStore``: routed experts under a memory budget, in four tiers, fetched with cache affinity.

One ``fetch(layer, experts)`` call (one MoE layer):

1. every requested expert is looked up; FULL ones are pinned and yielded first, at once;
2. the others become tasks ordered by Johnson's rule (``scheduler``) on their estimated read and
   decode times; the I/O thread admits each task (reserving its staging bytes, evicting through the
   policy when needed, waiting when everything left is pinned), reads what its tier lacks with
   honest I/O, and submits its chunks to the ``ParallelDecoder`` pool;
3. decoded experts are yielded in completion order; when the model asks for the next one, the
   policy places the previous one (FULL / COMP / SM / dropped).

The model sums expert outputs in a fixed order, so results never depend on this timing.

Memory: every buffer is charged to the ``Ledger`` before it is allocated; ``used <= budget`` at all
times. Buffers the model may still reference are never reused (``Buffer.busy``) and stay charged
(``draining``) until released. Errors (a failing read, a corrupt chunk, a truncated file) surface
in the consumer as the original one-line exception; the job is then cancelled, in-flight work is
awaited, every reservation is returned and resident data is restored, so the store stays usable and
can never deadlock on its own reservations.

Not re-entrant: a second ``fetch`` while one is open raises ``StoreError``. Torch-free: the caller
turns decoded buffers into tensors through ``wrap(extent, uint8 array)``.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numpy as np

from formats.decoder import ParallelDecoder

from .budget import Budget, BudgetError, Ledger, fmt_bytes, parse_budget
from .io import Buffer, BufferPool, ExpertReader, ceil_page
from .policy import Policy, make_policy
from .memory import MemoryMixin
from .prefetch import PrefetchMixin
from .scheduler import FlowTask, johnson_order
from .state import _CAT, StoreError, _Cancelled, _detach, _Entry, _Job, _ref_ends, _Task
from .tiers import CostModel, ExpertInfo, Tier, info_from_extent

__all__ = ["ExpertStore", "StoreError"]

log = logging.getLogger(__name__)

_EWMA = 0.25
READ_PIECE = 2 << 20  # reads are issued in aligned pieces of this size; chunks are decoded as they complete


class ExpertStore(MemoryMixin, PrefetchMixin):
    """The tiered, budgeted expert store of one open ``formats.reader.Archive``."""

    def __init__(self, archive, decoder: ParallelDecoder, *, budget: Budget | str | int | None = None,
                 policy: str | Policy | None = None, io_mode: str = "auto", io_throttle_bps: float | None = None,
                 wrap: Callable[[object, np.ndarray], object] | None = None, dense_bytes: int = 0,
                 cost: CostModel | None = None):
        self.archive = archive
        self.decoder = decoder
        self.wrap = wrap if wrap is not None else (lambda ext, arr: arr)
        idx = archive.index
        self.extents = {e.key: e for e in idx.experts}
        self.infos = {k: info_from_extent(e) for k, e in self.extents.items()}
        self.expert_bytes = sum(e.decoded_nbytes for e in idx.experts)
        self.extent_bytes = sum(e.length for e in idx.experts)
        # decoder scratch (one exponent chunk per worker) + split scratch: chunks never exceed a part
        C = min(idx.chunk_elements, max((p.nbytes // 2 for e in idx.experts for p in e.parts), default=1))
        self.fixed_bytes = ceil_page(decoder.threads * C) + ceil_page(C)
        big = max(self.infos.values(), key=lambda i: i.min_working_set, default=None)
        self.min_budget = (big.min_working_set if big else 0) + self.fixed_bytes
        need_all = sum(i.full_bytes for i in self.infos.values()) + self.min_budget
        if not isinstance(budget, Budget):
            budget = parse_budget(budget, expert_bytes=self.expert_bytes, need_all=need_all, dense_bytes=dense_bytes)
        self.budget = budget
        if budget.nbytes is not None and budget.nbytes < self.min_budget:
            ext = self.extents[big.key]
            raise BudgetError(
                f"memory budget {fmt_bytes(budget.nbytes)} is below the minimum {fmt_bytes(self.min_budget)} "
                f"({self.min_budget} bytes): one expert's read buffer {fmt_bytes(big.comp_bytes)} + decode buffer "
                f"{fmt_bytes(big.full_bytes)} + decoder scratch {fmt_bytes(self.fixed_bytes)} ({ext.label})")
        self.capacity = budget.nbytes
        self.ledger = Ledger(budget.nbytes)
        self.ledger.charge("fixed", self.fixed_bytes)
        self._reserve = big.staging(Tier.COLD) if (big and budget.nbytes is not None) else 0
        self.reader = ExpertReader(archive.path, io_mode, throttle_bps=io_throttle_bps)
        self.cost = cost if cost is not None else CostModel()
        self.policy = make_policy(policy, self.cost)
        self.pool = BufferPool()
        self.draining: list[Buffer] = []
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.Lock()
        self._mem = threading.Condition(self._lock)
        self._stat_lock = threading.Lock()
        self._split_scratch = np.empty(C, dtype=np.uint8)
        self.persistent = budget.nbytes is None  # no budget: yielded dicts are the resident ones
        self.now = 0
        self._active: _Job | None = None
        self._closed = False
        self._stats = collections.Counter()
        self._jobs: queue.Queue = queue.Queue()
        self._init_prefetch()
        self._thread = threading.Thread(target=self._reader_loop, name="zmoe-io", daemon=True)
        self._thread.start()
        log.info("expert store: budget %s; io %s; policy %s", budget.how, self.reader.mode, self.policy.name)

    # -- ResidencyView (for the policy) ------------------------------------------------------------
    def info(self, key) -> ExpertInfo:
        return self.infos[key]

    def tier_of(self, key) -> Tier:
        e = self._entries.get(key)
        return e.tier if e is not None else Tier.COLD

    def resident(self):
        for k, e in self._entries.items():
            if e.tier != Tier.COLD and not e.pins and not e.busy:
                yield k, e.tier

    @property
    def resident_bytes(self) -> int:
        return self.ledger.resident

    @property
    def reserve(self) -> int:
        return self._reserve

    # -- fetch ------------------------------------------------------------------------------------
    def fetch(self, layer: int, experts: Sequence[int], stack: str | None = None
              ) -> Iterator[tuple[int, object]]:
        """Yield (expert id, wrap(extent, decoded bytes)) for each requested expert as it is ready.

        Resident (FULL) experts come first; the rest in decode-completion order. A yielded value stays
        valid while the caller references it (the store never reuses a referenced buffer).
        """
        keys: list[tuple] = []
        for e in experts:
            k = (stack, int(layer), int(e))
            if k not in self.extents:
                self.archive.index.extent(int(layer), int(e), stack)  # raises a FormatError naming it
            if k not in keys:
                keys.append(k)
        job = self._open(keys)
        try:
            while job.pinned:
                key, ent = job.pinned[0]
                yield key[2], self._lend(job, ent.weights)  # no local: the frame must not keep it alive
                self._unlend(job)
                with self._lock:
                    ent.pins -= 1
                    job.pinned.pop(0)
                    self._mem.notify_all()
            for sj, task in job.adopted:
                self._await(sj, task)
                if task.state != "ready":
                    raise StoreError(f"internal error: prefetched {task.ext.label} was never decoded")
                yield from self._serve(job, task)
            for _ in range(len(job.tasks)):
                yield from self._serve(job, self._next_ready(job))
        finally:
            self._unlend(job)
            self._finish(job)

    def _serve(self, job: "_Job", task: _Task) -> Iterator[tuple[int, object]]:
        """Yield a decoded task's expert to the caller, then place it when the caller moves on."""
        if task.error is not None:
            raise task.error
        yield self._hand_out(job, task)
        self._unlend(job)
        with self._lock:
            self._place(task)

    def _hand_out(self, job: "_Job", task: _Task) -> tuple[int, object]:
        task.weights = self.wrap(task.ext, task.dbuf.arr[:task.ext.decoded_nbytes])
        task.state = "lent"
        return task.key[2], self._lend(job, task.weights)

    def _lend(self, job: "_Job", weights):
        """What the caller gets: the resident dict itself without a budget, else a copy emptied on resume."""
        if self.persistent or not isinstance(weights, dict):
            return weights
        job.lent = dict(weights)
        return job.lent

    def _unlend(self, job: "_Job") -> None:
        if job.lent is not None:
            job.lent.clear()  # the caller's references to this expert's tensors go with it
            job.lent = None

    def _open(self, keys: list[tuple]) -> _Job:
        tasks: list[_Task] = []
        pinned: list[tuple[tuple, _Entry]] = []
        if self._spec and self._active is None:
            self._settle(keys)
        with self._lock:
            if self._closed:
                raise StoreError("expert store is closed")
            if self._active is not None:
                raise StoreError("ExpertStore.fetch() called while another fetch is still open "
                                 "(consume or close the previous generator first)")
            self._reap_spec()
            if self._held:
                self._release_held()
            adopted = self._adopt(keys) if self._spec else []
            if self._predicted:
                self._score_guesses(keys)
            taken = {t.key for _, t in adopted}
            self.now += 1
            st = self._stats
            st["fetch_calls"] += 1
            for k in keys:
                ent = self._entries.get(k)
                t = ent.tier if ent is not None else Tier.COLD
                self.policy.on_access(k, t, self.now)
                st["requests"] += 1
                if k in taken:
                    st["hits_prefetch"] += 1
                    continue
                st[f"hits_{t.label}"] += 1
                if t == Tier.FULL:
                    ent.pins += 1
                    pinned.append((k, ent))
                    continue
                task = _Task(k, self.extents[k], self.infos[k], t)
                if t in (Tier.COMP, Tier.SM):  # its resident extent bytes become the task's read buffer
                    task.rbuf, ent.rbuf = ent.rbuf, None
                    self.ledger.move(_CAT[t], "staging", task.rbuf.charged)
                    ent.tier = Tier.COLD
                    ent.busy = True
                elif ent is not None:
                    ent.busy = True
                else:
                    self._entries[k] = e2 = _Entry()
                    e2.busy = True
                tasks.append(task)
            flow = []
            for task in tasks:
                a = self.cost.read_s(task.info.read_bytes(task.start))
                d = self.cost.decode_s(task.info.decoded)
                task.est = (a, d)
                flow.append(FlowTask(task, a, d))
            if flow:
                sa, sd = sum(f.read_s for f in flow), sum(f.decode_s for f in flow)
                if sa + sd > 0 and not self.cost.frozen:
                    self.cost.read_share += _EWMA * (sa / (sa + sd) - self.cost.read_share)
            job = _Job([f.key for f in johnson_order(flow)])
            job.pinned = pinned
            job.adopted = adopted
            self._active = job
        if job.tasks:
            self._jobs.put(job)
        return job

    def _next_ready(self, job: _Job) -> _Task:
        t0 = time.perf_counter()
        with job.cond:
            job.waiting = True
            try:
                while not job.ready:
                    if job.reader_done and job.inflight == 0:
                        raise StoreError("internal error: the fetch ended before every expert was decoded")
                    job.cond.wait()
                task = job.ready.popleft()
            finally:
                job.waiting = False
        with self._stat_lock:
            self._stats["stall_s"] += time.perf_counter() - t0
        return task

    # -- the I/O thread ---------------------------------------------------------------------------
    def _reader_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                for task in job.tasks:
                    if job.cancelled:
                        break
                    try:
                        if not self._run_task(job, task):
                            break
                    except _Cancelled:
                        break
                    except BaseException as exc:  # surfaces in the consumer, which cancels the job
                        task.error = _detach(exc)
                        with job.cond:
                            job.ready.append(task)
                            job.cond.notify_all()
                        break
            finally:
                with job.cond:
                    job.reader_done = True
                    job.cond.notify_all()

    def _run_task(self, job: _Job, task: _Task) -> bool:
        """Admit, read (in pieces) and decode one task; False when the job must stop (an error).

        Chunks are submitted to the decoder as soon as the bytes they need are in memory, so the
        decoding of an expert overlaps the rest of its own read (specs/runtime.md section 5.3).
        """
        with self._lock:
            if job.speculative:
                if task.state != "queued" or task.cancel:
                    return True  # dropped or superseded before the I/O thread got to it
                if not self._admit(job, task, wait=False, evict=not job.preload):
                    for t in job.tasks:
                        if t.state == "queued":
                            self._drop_queued(t)
                    return False
            else:
                self._admit(job, task)
            task.state = "admitted"
        ext = task.ext
        refs = self.archive.extent_refs(ext, view=task.view)
        ends = _ref_ends(ext, self.archive.index.chunk_elements, self.archive.index.raw_chunk_bytes, task.start)
        out = task.dbuf.arr[:ext.decoded_nbytes]
        length = {Tier.COLD: ext.length, Tier.SM: ext.exp_length}.get(task.start, 0)
        order = sorted(range(len(refs)), key=ends.__getitem__)
        with job.cond:
            job.inflight += 1
        task.pending, task.batch_errors = 1, {}
        task.t_submit = time.perf_counter()
        task.state = "submitted"
        ok = True
        try:
            done = k = batch = 0
            while True:
                j = k
                while j < len(order) and ends[order[j]] <= done:
                    j += 1
                if j > k or (done >= length and k < len(order)):
                    j = len(order) if done >= length else j
                    with job.cond:
                        clean = job.inflight == 1
                    self._submit(job, task, [refs[i] for i in order[k:j]], out, batch, clean and j == len(order))
                    batch += 1
                    k = j
                if done >= length:
                    break
                if job.cancelled or self._closed or task.cancel:
                    raise _Cancelled
                n = min(READ_PIECE, length - done)
                self._timed_read(task, ext.offset + done, n, at=done)
                done += n
            task.read_done = True
        except _Cancelled:
            task.read_error = StoreError("fetch cancelled")
            ok = False
        except BaseException as exc:  # noqa: BLE001 - surfaces in the consumer, which cancels the job
            task.read_error = _detach(exc)
            ok = False
        finally:
            del refs, out
            self._release_hold(job, task)
        return ok

    def _submit(self, job: _Job, task: _Task, refs, out, batch: int, last: bool) -> None:
        with self._stat_lock:
            task.pending += 1
        nbytes = sum(2 * r.n if r.kind == "bf16-split" else r.n for r in refs)
        t0 = time.perf_counter()
        fut = self.decoder.submit(refs, out)
        fut.add_done_callback(partial(self._batch_done, job, task, batch, nbytes if last else 0, t0))

    def _timed_read(self, task: _Task, offset: int, length: int, at: int) -> None:
        t0 = time.perf_counter()
        n = self.reader.read(task.rbuf, offset, length, task.what, at=at)
        dt = time.perf_counter() - t0
        with self._stat_lock:
            self._stats["bytes_read"] += n
            self._stats["reads"] += 1
            self._stats["read_s"] += dt
            if n >= 1 << 20 and dt > 0 and not self.cost.frozen:
                self.cost.read_bps += _EWMA * (n / dt - self.cost.read_bps)

    def _batch_done(self, job: _Job, task: _Task, batch: int, clean_bytes: int, t0: float, fut) -> None:
        exc = fut.exception()
        dt = time.perf_counter() - t0
        with self._stat_lock:
            if exc is not None:
                task.batch_errors[batch] = exc
            elif clean_bytes >= 1 << 20 and dt > 0 and not self.cost.frozen:  # the pool had only this work
                self.cost.decode_bps += _EWMA * (clean_bytes / dt - self.cost.decode_bps)
        self._release_hold(job, task)

    def _release_hold(self, job: _Job, task: _Task) -> None:
        with self._stat_lock:
            task.pending -= 1
            if task.pending:
                return
            errs = task.batch_errors
            exc = errs[min(errs)] if errs else task.read_error
            exc = _detach(exc)
            if exc is None:
                self._stats["experts_decoded"] += 1
                self._stats["bytes_decoded"] += task.ext.decoded_nbytes
                self._stats["expert_decode_s"] += time.perf_counter() - task.t_submit
        if job.preload and exc is None:  # kept decoded at once: its read buffer is free for the next one
            with self._lock:
                task.weights = self.wrap(task.ext, task.dbuf.arr[:task.ext.decoded_nbytes])
                self._place(task, Tier.FULL)
                self._stats["preloaded"] += 1
        with job.cond:
            task.error = exc
            if task.state != "placed":
                task.state = "ready"
            job.inflight -= 1
            job.ready.append(task)
            job.cond.notify_all()

    def _finish(self, job: _Job) -> None:
        job.cancelled = True
        with self._lock:
            self._mem.notify_all()
        with job.cond:
            while not (job.reader_done and job.inflight == 0):
                job.cond.wait(timeout=0.1)
        for sj, task in job.adopted:
            if task.state not in ("lent", "placed"):
                self._await(sj, task)
        with self._lock:
            for _, ent in job.pinned:
                ent.pins -= 1
            job.pinned = []
            for _, task in job.adopted:
                if task.state == "lent":
                    self._place(task)
                elif task.state != "placed":
                    self._revert(task)
            job.adopted = []
            for task in job.tasks:
                if task.state == "placed":
                    continue
                if task.state == "lent":
                    self._place(task)
                else:
                    self._revert(task)
            self._active = None
            self._mem.notify_all()

    # -- reporting and shutdown ---------------------------------------------------------------------
    @property
    def io_mode(self) -> str:
        return self.reader.mode

    def stats(self) -> dict:
        with self._lock:
            self._reap_spec()
            self._reap()
            led = self.ledger.snapshot()
            tiers = collections.Counter(e.tier.label for e in self._entries.values() if e.tier != Tier.COLD)
        with self._stat_lock:
            st = dict(self._stats)
        for t in ("full", "comp", "sm", "cold"):
            st.setdefault(f"hits_{t}", 0)
        for k in ("bytes_read", "reads", "read_s", "experts_decoded", "bytes_decoded", "expert_decode_s", "stall_s",
                  "fetch_calls", "requests", "hits_prefetch", "prefetch_predicted", "prefetch_correct"):
            st.setdefault(k, 0)
        st.update(
            budget_bytes=self.budget.nbytes, budget=self.budget.how, min_budget_bytes=self.min_budget,
            io_mode=self.reader.mode, io_throttle_bps=self.reader.throttle_bps, throttle_s=self.reader.throttle_s,
            policy=self.policy.name,
            store_bytes=led["used"], store_peak_bytes=led["peak"],
            resident_full_bytes=led["full"], resident_comp_bytes=led["comp"], resident_sm_bytes=led["sm"],
            staging_bytes=led["staging"], pool_bytes=led["pool"], draining_bytes=led["draining"],
            fixed_bytes=led["fixed"], resident_experts=dict(tiers),
            read_bps_est=self.cost.read_bps, decode_bps_est=self.cost.decode_bps, read_share=self.cost.read_share,
            expert_bytes=self.expert_bytes, extent_bytes=self.extent_bytes,
        )
        return st

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._active is not None:
                self._active.cancelled = True
            for sj in self._spec:
                sj.cancelled = True
            self._mem.notify_all()
        self._jobs.put(None)
        self._thread.join(timeout=30)
        with self._lock:
            for ent in self._entries.values():
                ent.weights = None
                for b in (ent.dbuf, ent.rbuf):
                    if b is not None:
                        b.close()
                ent.dbuf = ent.rbuf = None
                ent.tier = Tier.COLD
            for b in self.pool.clear() + self.draining:
                b.close()
            self.draining = []
        self.reader.close()
