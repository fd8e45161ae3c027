"""``IOWorker``: the task queue and the one I/O thread that runs it (specs/runtime.md sections 5.3-5.4).

A job (one fetch's missing experts, or one prefetch) is a list of tasks in schedule order. For each
task the thread

1. **admits** it: reserves its read and decode buffers in ``Memory`` (reuse a pooled buffer,
   allocate, shrink the pool, demote the policy's victim through the ``TierTable``, or wait for the
   consumer to hand buffers back; a speculative job never waits). A preload waits for a read buffer
   to come back to the pool (a decoded expert's, placed FULL) once ``READ_AHEAD`` of its tasks are in
   flight, instead of mapping a fresh one whose pages are all faulted again: reads far ahead of the
   decoders gain nothing, and the faults cost the CPU that start-up (``import torch``) shares with it;
2. **reads** what its tier lacks from the ``ExpertBytes`` source in aligned pieces that end where
   chunks end (``read_pieces``), queued all at once to ``read_depth`` read threads (they sleep in the
   kernel and take the next piece as soon as one ends, so the device's queue stays full while this
   thread admits and submits; the depth comes from calibration, ``zipmoe_run.cores``), submitting
   each chunk to the ``ParallelDecoder`` as soon as the bytes it needs are in memory, in file order;
3. when the read and every decode batch are done, **completes** it: runs the job's ``on_decoded``
   hook (preload keeps it decoded), then hands it to the consumer (``job.ready``).

Errors never escape the thread or a decoder callback: they become the task's ``error`` (the original
one-line exception) and the job's consumer raises it. ``inflight`` is decremented on every path, so
nothing waiting on a job can hang.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from zipmoe_run.tiers import CostModel, Tier

from .budget import fmt_bytes
from .buffers import ALIGN
from .memory import Memory
from .state import Cancelled, Job, Stats, StoreError, Task, detach
from .table import TierTable

__all__ = ["IOWorker", "READ_PIECE", "MIN_PIECE", "EWMA", "read_pieces"]

log = logging.getLogger(__name__)

EWMA = 0.25
READ_PIECE = 2 << 20  # reads are issued in aligned pieces of at most this size; chunks are decoded as they complete
MIN_PIECE = 256 << 10  # a piece ends where a chunk's bytes end, unless that would make it shorter than this
READ_AHEAD = 2  # preload tasks in flight (reading or decoding) before admission waits for a read buffer to return


def read_pieces(ends: list[int], length: int, piece: int | None = None, min_piece: int | None = None,
                align: int = ALIGN, depth: int = 1) -> list[tuple[int, int]]:
    """(start, size) of the aligned reads that cover ``[0, length)``, in file order. A piece ends where
    a chunk's bytes end (``ends``, rounded up to ``align``), so each completed read releases the chunks
    it completes and the last one holds only what the last chunk lacks: decoding overlaps the rest of
    the read and little is left to decode once it ends. Pieces are at most ``piece`` bytes (longer
    spans are split) and at least ``min_piece`` (a chunk end closer than that to the previous cut is
    not a cut) except the last. With ``depth`` reads in flight the last span is split into ``depth``
    pieces: reads in flight together complete together, and only the last chunk is then left."""
    piece = READ_PIECE if piece is None else piece
    min_piece = MIN_PIECE if min_piece is None else min_piece
    step = max(align, piece // align * align)
    cuts = sorted({c for c in (-(-e // align) * align for e in ends) if 0 < c < length})  # a chunk's end is in its piece
    bounds = [0]
    for c in [*cuts, length]:
        while c - bounds[-1] > step:
            bounds.append(bounds[-1] + step)
        if c == length or c - bounds[-1] >= min_piece:
            bounds.append(c)
    if depth > 1 and len(bounds) > 1:  # the last span, in ``depth`` aligned pieces
        lo = bounds[-2]
        part = -(-(length - lo) // depth // align) * align
        bounds[-1:] = [min(length, lo + i * part) for i in range(1, depth + 1)]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]


class IOWorker:
    """Runs jobs on one thread. ``cond`` is the store lock's condition (memory and the table are
    only touched under it); ``prefetch`` supplies ``reap()``, ``held`` and ``release_held()``."""

    def __init__(self, source, decoder, memory: Memory, table: TierTable, cost: CostModel, stats: Stats,
                 cond: threading.Condition, prefetch, on_decoded: Callable[[Job, Task], None], read_depth: int = 1):
        self.source, self.decoder = source, decoder
        self.read_depth = max(1, int(read_depth))
        self._readers = (ThreadPoolExecutor(self.read_depth, thread_name_prefix="zmoe-read")
                         if self.read_depth > 1 else None)
        self._busy_lock = threading.Lock()
        self._busy = [0, 0.0, 0]  # reads in flight, start of the busy period, bytes read in it
        self.memory, self.table, self.cost, self.stats = memory, table, cost, stats
        self.cond, self.prefetch, self.on_decoded = cond, prefetch, on_decoded
        self.closing = False
        self.recycling = 0  # preload tasks admitted and not yet complete (their read buffers come back then)
        self._read_sizes = sorted({i.comp_bytes for i in table.infos.values()})  # what cold tasks read
        self.on_exit: Callable[[], None] | None = None  # runs on the thread after its last job (close)
        self._jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="zmoe-io", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def stop(self, timeout: float) -> bool:
        """Ask the thread to finish; True when it has within ``timeout`` seconds."""
        self.closing = True
        self._jobs.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- the thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                try:
                    for task in job.tasks:
                        if job.cancelled or not self._run(job, task):
                            break
                finally:
                    with job.cond:
                        job.reader_done = True
                        job.cond.notify_all()
        finally:
            if self._readers is not None:  # no read is in flight here: each task drains its own
                self._readers.shutdown(wait=True)
            if self.on_exit is not None:
                self.on_exit()

    def _run(self, job: Job, task: Task) -> bool:
        """Admit, read (in pieces) and decode one task; False when the job must stop."""
        try:
            with self.cond:
                if job.speculative:
                    if task.state != "queued" or task.cancel:
                        return True  # dropped or superseded before the thread got to it
                    if not self.admit(job, task, wait=False, evict=not job.preload):
                        for t in job.tasks:
                            if t.state == "queued":
                                self.prefetch.drop_queued(t)
                        return False
                else:
                    self.admit(job, task)
                task.state = "admitted"
                if job.preload:
                    self.recycling += 1
        except Cancelled:
            return False
        except BaseException as exc:  # noqa: BLE001 - surfaces in the consumer, which cancels the job
            task.error = detach(exc)
            with job.cond:
                job.ready.append(task)
                job.cond.notify_all()
            return False
        return self._read_and_decode(job, task)

    def _read_and_decode(self, job: Job, task: Task) -> bool:
        """Chunks are submitted as soon as the bytes they need are in memory, so the decoding of an
        expert overlaps the rest of its own read (specs/runtime.md section 5.3). A preload's task is
        instead one unit of work on a decoder thread (``_whole``)."""
        ext = task.ext
        with job.cond:
            job.inflight += 1
        task.pending, task.batch_errors = 1, {}
        task.t_submit = time.perf_counter()
        task.state = "submitted"
        if job.preload:
            return self._whole(job, task)
        ok = True
        inflight: deque = deque()  # (bytes, future) of reads in flight, in file order
        refs = out = None
        try:  # an error anywhere here (a bad extent too) fails the task, never the I/O thread
            refs, ends = self.source.chunks(ext, task.view, task.start)
            out = task.dbuf.arr[:ext.decoded_nbytes]
            length = self.source.read_length(ext, task.start)
            order = sorted(range(len(refs)), key=ends.__getitem__)
            pieces = read_pieces(ends, length, depth=self.read_depth)
            done = k = batch = issued = 0  # issued: pieces
            while True:
                j = k
                while j < len(order) and ends[order[j]] <= done:
                    j += 1
                if j > k or (done >= length and k < len(order)):
                    j = len(order) if done >= length else j
                    with job.cond:
                        clean = job.inflight == 1
                    self._decode(job, task, [refs[i] for i in order[k:j]], out, batch, clean and j == len(order))
                    batch += 1
                    k = j
                if done >= length:
                    break
                if job.cancelled or self.closing or task.cancel:
                    raise Cancelled
                if self._readers is None:
                    lo, n = pieces[issued]
                    issued += 1
                    self._read(task, lo, n)
                    done += n
                    continue
                while issued < len(pieces):  # all at once: the read threads take the next as one ends
                    lo, n = pieces[issued]
                    issued += 1
                    inflight.append((n, self._readers.submit(self._read, task, lo, n)))
                n, fut = inflight.popleft()
                fut.result()
                done += n
            task.read_done = True
        except Cancelled:
            task.read_error = StoreError("fetch cancelled")
            ok = False
        except BaseException as exc:  # noqa: BLE001 - surfaces in the consumer, which cancels the job
            task.read_error = detach(exc)
            ok = False
        finally:
            for _, fut in inflight:  # reads not started yet are dropped
                fut.cancel()
            for _, fut in inflight:  # nothing may still write into the buffers once the task lets go
                if fut.cancelled():
                    continue
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001 - the task has already failed or been cancelled
                    pass
            del refs, out
            self._release_hold(job, task)
        return ok

    def _whole(self, job: Job, task: Task) -> bool:
        """Hand the task to a decoder thread, which reads its bytes in one read and decodes them in one
        call (``_whole_run``). A preload runs while the process starts (``import torch``): per expert this
        takes the interpreter lock about three times, where reading in pieces and decoding chunk by chunk
        took it some twenty times, each a chance to stall the importing thread on two shared cores."""
        try:
            fut = self.decoder.call(self._whole_run, job, task)
        except BaseException as exc:  # noqa: BLE001 - e.g. the pool was shut down
            task.read_error = detach(exc)
            self._release_hold(job, task)
            return False
        fut.add_done_callback(partial(self._whole_done, job, task))
        return True

    def _whole_run(self, job: Job, task: Task) -> None:
        if job.cancelled or self.closing or task.cancel:
            raise Cancelled
        ext = task.ext
        refs, _ = self.source.chunks(ext, task.view, task.start)
        length = self.source.read_length(ext, task.start)
        if length:
            self._read(task, 0, length)
        task.read_done = True
        self.decoder.decode_here(refs, task.dbuf.arr[:ext.decoded_nbytes])

    def _whole_done(self, job: Job, task: Task, fut) -> None:
        try:
            exc = fut.exception()
        except BaseException as e:  # noqa: BLE001 - a cancelled future
            exc = e
        if isinstance(exc, Cancelled):
            exc = StoreError("fetch cancelled")
        if exc is not None:
            with job.cond:
                if task.read_done:
                    task.batch_errors[0] = detach(exc)
                else:
                    task.read_error = detach(exc)
        self._release_hold(job, task)

    def _read(self, task: Task, lo: int, n: int) -> None:
        """One piece (on this thread, or a read thread with ``read_depth`` > 1). ``read_s`` sums the
        reads' own durations; ``read_busy_s`` is the time at least one read was in flight, and the
        read-rate estimate is the bytes of each busy period over its length."""
        t0 = time.perf_counter()
        with self._busy_lock:
            if self._busy[0] == 0:
                self._busy[1], self._busy[2] = t0, 0
            self._busy[0] += 1
        got = 0
        try:
            got = self.source.read(task.ext, task.rbuf, lo, n, task.what)
        finally:
            t1 = time.perf_counter()
            with self._busy_lock:
                self._busy[0] -= 1
                self._busy[2] += got
                period = (t1 - self._busy[1], self._busy[2]) if self._busy[0] == 0 else None
            self.stats.add("bytes_read", got)
            self.stats.add("reads")
            self.stats.add("read_s", t1 - t0)
            if period is not None:
                self.stats.add("read_busy_s", period[0])
                if period[1] >= 1 << 20 and period[0] > 0:
                    self.cost.observe("read_bps", period[1] / period[0], EWMA)

    def _decode(self, job: Job, task: Task, refs, out, batch: int, last: bool) -> None:
        with job.cond:
            task.pending += 1
        nbytes = sum(2 * r.n if r.kind == "bf16-split" else r.n for r in refs)
        try:
            fut = self.decoder.submit(refs, out)
        except BaseException:  # e.g. the pool was shut down: this batch never completes
            with job.cond:
                task.pending -= 1
            raise
        with job.cond:  # a consumer waiting on this job may decode the queued chunks itself
            job.cond.notify_all()
        fut.add_done_callback(partial(self._batch_done, job, task, batch, nbytes if last else 0, time.perf_counter()))

    def _batch_done(self, job: Job, task: Task, batch: int, clean_bytes: int, t0: float, fut) -> None:
        try:
            exc = fut.exception()
            if exc is not None:
                with job.cond:
                    task.batch_errors[batch] = exc
            else:  # timed from its first chunk's start: the queue wait before it is not decode speed
                started = fut.result()
                dt = time.perf_counter() - (started if started is not None else t0)
                if clean_bytes >= 1 << 20 and dt > 0:
                    self.cost.observe("decode_bps", clean_bytes / dt, EWMA)
        except BaseException as e:  # noqa: BLE001 - a cancelled future: the batch failed
            with job.cond:
                task.batch_errors[batch] = e
        finally:
            self._release_hold(job, task)

    def _release_hold(self, job: Job, task: Task) -> None:
        """The read or one decode batch of ``task`` is done; the last one completes the task."""
        with job.cond:
            task.pending -= 1
            if task.pending:
                return
            errs = task.batch_errors
            exc = detach(errs[min(errs)] if errs else task.read_error)
        try:
            if exc is None:
                self.stats.add("experts_decoded")
                self.stats.add("bytes_decoded", task.ext.decoded_nbytes)
                self.stats.add("expert_decode_s", time.perf_counter() - task.t_submit)
                self.on_decoded(job, task)
        except BaseException as e:  # noqa: BLE001 - the hook failed: the task failed with its error
            exc = detach(e)
            log.debug("completing %s failed", task.ext.label, exc_info=True)
        finally:
            with job.cond:
                task.error = exc
                if task.state != "placed":
                    task.state = "ready"
                job.inflight -= 1
                job.ready.append(task)
                job.cond.notify_all()
            if job.preload:  # its read buffer is back in the pool (placed FULL) unless it failed
                with self.cond:
                    self.recycling -= 1
                    self.cond.notify_all()

    # -- admission (under the store lock) ----------------------------------------------------------------
    def _exact_size(self, task: Task, need_r: int, need_d: int) -> bool:
        """Unmap a buffer of ``task`` that was reused from the pool larger than it needs (up to the
        pool's slack), so that it can be allocated at its exact size; True when one was. At a tight
        budget the slack can be exactly what the task's other buffer lacks."""
        mem = self.memory
        for name, need in (("rbuf", need_r), ("dbuf", need_d)):
            b = getattr(task, name)
            if b is None or not need or b.nbytes <= mem.ceil(need):
                continue  # need 0: a COMP or SM task's read buffer holds its resident bytes
            mem.ledger.charge("staging", -b.charged)
            b.close()
            setattr(task, name, None)
            return True
        return False

    def admit(self, job: Job, task: Task, wait: bool = True, evict: bool = True) -> bool:
        """Reserve and attach the buffers ``task`` needs, evicting or waiting as required.

        ``wait=False`` (a prefetch): where a fetch would wait, give the buffers back and return False.
        """
        mem, info = self.memory, task.info
        need_r = info.comp_bytes if task.start == Tier.COLD else 0
        need_d = info.full_bytes
        t0 = time.perf_counter()
        waited = stuck = 0
        while True:
            if job.cancelled or self.closing:
                raise Cancelled
            mem.reap()
            if wait:
                self.prefetch.reap()
            if need_r and task.rbuf is None:
                task.rbuf = mem.reuse(need_r)
            if task.dbuf is None:
                task.dbuf = mem.reuse(need_d)
            grow = 0
            if task.start == Tier.SM and not task.grown:
                grow = task.rbuf.head  # the dropped exponent pages come back with the read
            missing = (need_r if need_r and task.rbuf is None else 0) + (need_d if task.dbuf is None else 0)
            if missing == 0 and grow == 0:
                break
            if need_r and task.rbuf is None and job.preload and self.recycling >= READ_AHEAD:
                self.cond.wait(timeout=0.02)  # a read buffer comes back to the pool as a decode completes
                continue
            if mem.fits(missing + grow):
                if need_r and task.rbuf is None:  # mapped at its size class where that fits too
                    r = mem.pool.size_for(need_r, self._read_sizes)
                    task.rbuf = mem.alloc(r if mem.fits(missing + grow + r - need_r) else need_r)
                if task.dbuf is None:
                    task.dbuf = mem.alloc(need_d)
                if grow:
                    mem.ledger.charge("staging", task.rbuf.set_bounds(0, task.rbuf.tail))
                    task.grown = grow
                continue
            if mem.shrink_pool(excess_only=True):
                continue
            if evict and self.table.evict_one(self.prefetch.held):
                continue
            if mem.shrink_pool():  # nothing else gives way: the kept buffers go too
                continue
            if self._exact_size(task, need_r, need_d):  # a reused buffer's slack was the missing room
                continue
            if wait and self.prefetch.held:  # a fetch needs the room: what prefetch protected gives way
                self.prefetch.release_held()
                continue
            if not wait:
                if job.preload:
                    with job.cond:
                        busy = job.inflight > 0
                    if busy:  # what is in flight frees its read buffer when placed
                        self.cond.wait(timeout=0.02)
                        continue
                mem.release(task.rbuf, "staging")
                mem.release(task.dbuf, "staging")
                task.rbuf = task.dbuf = None
                return False
            # nothing to evict: wait for the consumer to hand buffers back
            waited += 1
            with job.cond:
                blocked = job.waiting and not job.ready and job.inflight == 0
            stuck = stuck + 1 if blocked else 0
            if stuck >= 50:  # ~1 s with the consumer waiting on us and nothing else in flight
                raise StoreError(
                    f"memory budget {fmt_bytes(mem.capacity)} exhausted while fetching {task.ext.label}: "
                    f"{fmt_bytes(mem.ledger.bytes['draining'])} of expert buffers are still referenced "
                    f"by the caller (keep no expert tensors past the next fetch step)")
            self.cond.wait(timeout=0.02)  # wake on release; the timeout re-checks draining buffers
        if waited:
            self.stats.add("admit_wait_s", time.perf_counter() - t0)
        return True
