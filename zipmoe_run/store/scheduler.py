"""Cache-affinity scheduling of one MoE layer's missing experts: a two-stage flow shop (read, decode).

Model (specs/runtime.md section 5): task j has a read time ``a_j`` on the single I/O thread and a
decode time ``b_j`` of work split into chunks that a FIFO pool of ``W`` workers decodes; ``d_j =
b_j / W``. The I/O thread reads tasks back to back in the scheduled order; a task's chunks join the
pool's queue when its read completes (tasks with nothing to read join at once, in order).

Order: Johnson's rule on (a_j, d_j): first the tasks with ``a_j <= d_j`` by ascending ``a_j``,
then the others by descending ``d_j`` (ties by request order, so the order is deterministic).
Guarantee (proved in the spec):

    makespan <= max(Σ a_j, Σ d_j) + max_j min(a_j, d_j) + 2 c_max

where ``c_max`` is the longest single chunk (0 when W = 1 and tasks are not split). With W = 1 and
unsplit tasks Johnson's order is also optimal. ``simulate`` is the reference model of the executor
in ``store.py``; the property tests check the bound on random task sets against it.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["FlowTask", "johnson_order", "flow_makespan", "simulate", "bound"]


@dataclass(frozen=True)
class FlowTask:
    key: object
    read_s: float  # a_j
    decode_s: float  # d_j = (total decode work of the task) / workers
    chunks: tuple[float, ...] = field(default=())  # per-chunk decode work (worker-seconds); () = one chunk

    def chunk_work(self, workers: int) -> tuple[float, ...]:
        return self.chunks if self.chunks else (self.decode_s * workers,)


def johnson_order(tasks: Sequence[FlowTask]) -> list[FlowTask]:
    """Johnson's rule; stable (ties keep the given order)."""
    idx = {id(t): i for i, t in enumerate(tasks)}
    first = sorted((t for t in tasks if t.read_s <= t.decode_s), key=lambda t: (t.read_s, idx[id(t)]))
    last = sorted((t for t in tasks if t.read_s > t.decode_s), key=lambda t: (-t.decode_s, idx[id(t)]))
    return first + last


def flow_makespan(order: Sequence[FlowTask]) -> float:
    """Exact makespan of the two-machine flow shop (decode stage as one machine of speed W)."""
    c1 = c2 = 0.0
    for t in order:
        c1 += t.read_s
        c2 = max(c2, c1) + t.decode_s
    return c2


def simulate(order: Sequence[FlowTask], workers: int) -> float:
    """Event simulation of the executor: one reader in ``order``; chunks in a FIFO pool of ``workers``.

    Returns the time the last chunk finishes (0 for no tasks).
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    # release times of each task's chunks, in FIFO order
    queue: list[tuple[float, float]] = []  # (release, work)
    t = 0.0
    for task in order:
        t += task.read_s
        for w in task.chunk_work(workers):
            queue.append((t, w))
    free = [0.0] * workers  # heap of times each worker becomes free
    heapq.heapify(free)
    end = 0.0
    for release, work in queue:  # FIFO: chunks start in queue order
        start = max(heapq.heappop(free), release)
        done = start + work
        heapq.heappush(free, done)
        end = max(end, done)
    return end


def bound(tasks: Sequence[FlowTask], workers: int = 1) -> float:
    """The guaranteed makespan bound of Johnson's order executed as in ``simulate``."""
    if not tasks:
        return 0.0
    sa = sum(t.read_s for t in tasks)
    sd = sum(t.decode_s for t in tasks)
    tail = max(min(t.read_s, t.decode_s) for t in tasks)
    cmax = max(max(t.chunk_work(workers)) for t in tasks)
    granularity = 0.0 if workers == 1 and all(len(t.chunk_work(workers)) == 1 for t in tasks) else 2 * cmax
    return max(sa, sd) + tail + granularity
