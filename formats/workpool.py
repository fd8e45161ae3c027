"""``WorkPool``: worker threads that run queued calls in FIFO order, and let a waiting caller help.

A thread pool like :class:`concurrent.futures.ThreadPoolExecutor`, with one addition: :meth:`help`
takes the oldest queued call (if any) and runs it on the calling thread. A consumer that would
otherwise sleep until its results are ready (the expert store waiting for an expert's chunks to
decode, while its compute thread has nothing else to do) lends its core to the queue instead, so
the tail of a decode does not wait for the pool's threads alone.

Every call runs exactly once, on some thread, and its future gets its result or exception. What a
call computes must not depend on which thread runs it (the decoder's calls each write a disjoint
output range with a per-thread decoder object). Thread-safe. Worker threads are daemons: a process
that exits without :meth:`shutdown` does not hang on them.

``nice``: on Linux the worker threads lower their own scheduling priority by that much (threads are
scheduled one by one there; no privilege is needed to lower it), so that threads of the process
that wait on a device or compute on the critical path are served first when the cores are all busy;
elsewhere, or where the call fails, it is ignored.

``cpus``: worker ``i`` binds itself to CPU ``cpus[i % len(cpus)]`` (Linux; ignored elsewhere or where
the call fails). :func:`spread_cpus` gives a pool with a thread for every usable CPU one CPU each.
Why: on Linux, workers that all sleep on one condition and are woken together by one submitter were
often queued on the same CPU while the other CPU stayed idle until the next scheduler tick (measured on
a 2-vCPU VM, kernel 6.18: after 30 ms idle, two unbound decoder threads took 13.7 ms for 16 chunks,
exactly as long as one; bound to distinct CPUs, 7.4-7.9 ms; /proc schedstat showed each unbound
worker waiting 4-9 ms on a run queue per decode).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

__all__ = ["WorkPool", "spread_cpus", "spread_default"]

log = logging.getLogger(__name__)


class WorkPool:
    def __init__(self, threads: int, name: str = "workpool", nice: int = 0, cpus=None) -> None:
        if threads < 1:
            raise ValueError(f"a WorkPool needs at least one thread, got {threads}")
        self.nice = int(nice)
        self.cpus = [int(c) for c in cpus] if cpus else None
        self._queue: deque = deque()  # (future, fn, args), oldest first
        self._cv = threading.Condition(threading.Lock())
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args) -> Future:
        """Queue ``fn(*args)``; RuntimeError after :meth:`shutdown` (as ThreadPoolExecutor)."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.append((fut, fn, args))
            self._cv.notify()
        return fut

    def help(self) -> bool:
        """Run the oldest queued call on this thread; False when nothing is queued."""
        with self._cv:
            if not self._queue:
                return False
            item = self._queue.popleft()
        _run(item)
        return True

    def pending(self) -> int:
        """Calls queued and not yet started."""
        with self._cv:
            return len(self._queue)

    def shutdown(self, wait: bool = True) -> None:
        """Take no new calls; the threads finish what is queued, then end (joined with ``wait``)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()

    def _loop(self, index: int) -> None:
        if self.nice > 0:
            _lower_priority(self.nice)
        if self.cpus:
            _bind(self.cpus[index % len(self.cpus)])
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return  # closed and drained
                item = self._queue.popleft()
            _run(item)


def _lower_priority(delta: int) -> None:
    """This thread's nice value + ``delta`` (Linux: per thread; nothing elsewhere)."""
    if not sys.platform.startswith("linux") or not hasattr(threading, "get_native_id"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + delta))
    except OSError as exc:  # a sandbox that forbids it: the pool still works
        log.debug("cannot lower the priority of %s: %s", threading.current_thread().name, exc)


def _bind(cpu: int) -> None:
    """Bind this thread to ``cpu`` (Linux: ``sched_setaffinity(0)`` is per thread; nothing elsewhere)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # a CPU taken away since, or a sandbox that forbids it: the pool still works
        log.debug("cannot bind %s to CPU %d: %s", threading.current_thread().name, cpu, exc)


def spread_default() -> bool:
    """Whether pools that may bind their workers (the decoder's) do so unless told otherwise: yes,
    unless the environment sets ``ZIPMOE_DECODE_SPREAD=0``."""
    return os.environ.get("ZIPMOE_DECODE_SPREAD", "1").strip() != "0"


def spread_cpus(threads: int) -> list[int] | None:
    """CPUs for a pool of ``threads`` workers, one each, when the pool has exactly as many threads as
    this process may use CPUs (then one per CPU is what any good placement gives); None (placement
    left to the OS) otherwise, for one thread, or where the OS has no per-thread affinity. With CPUs
    to spare the OS finds an idle one at each wake-up, and on a shared host a fixed CPU may be one
    another process keeps busy."""
    if threads < 2 or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return allowed if len(allowed) == threads else None


def _run(item) -> None:
    fut, fn, args = item
    if not fut.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the future carries it to whoever waits
        fut.set_exception(exc)
    else:
        fut.set_result(result)
