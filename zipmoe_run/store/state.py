"""The store's records: an expert's entry in the tier table, a task (one expert being read and
decoded), a job (one fetch or prefetch: what the I/O worker runs), the counters, and the store's
exceptions. Plain data: the objects that own them (``table``, ``worker``, ``prefetch``, ``store``)
say who may change what."""
from __future__ import annotations

import collections
import threading
import time

from formats.errors import FormatError, ZmoeError
from zipmoe_run.tiers import ExpertInfo, Tier

from .buffers import Buffer

CAT = {Tier.FULL: "full", Tier.COMP: "comp", Tier.SM: "sm"}  # ledger category of a resident tier


class StoreError(ZmoeError):
    """The store was used in a way it does not support (re-entered fetch, closed store)."""


class Cancelled(Exception):
    """The job was cancelled (an error, an abandoned fetch, close): stop its work."""


def detach(exc: BaseException | None) -> BaseException | None:
    """Drop the tracebacks of an expected (one-line) error: their frames reference the buffers of
    the failed task, which could otherwise not be reused while the caller holds the exception."""
    if isinstance(exc, ZmoeError):
        seen = set()
        e = exc
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = None
            e = e.__cause__ or e.__context__
    return exc


class Entry:
    __slots__ = ("tier", "dbuf", "rbuf", "weights", "pins", "busy")

    def __init__(self) -> None:
        self.tier = Tier.COLD
        self.dbuf: Buffer | None = None
        self.rbuf: Buffer | None = None
        self.weights = None
        self.pins = 0
        self.busy = False  # a task of the open fetch owns its buffers


class Task:
    __slots__ = ("key", "ext", "info", "start", "rbuf", "dbuf", "grown", "read_done", "error", "t_submit",
                 "state", "weights", "est", "pending", "batch_errors", "read_error", "cancel", "adopted")

    def __init__(self, key, ext, info: ExpertInfo, start: Tier):
        self.key, self.ext, self.info, self.start = key, ext, info, start
        self.rbuf: Buffer | None = None
        self.dbuf: Buffer | None = None
        self.grown = 0  # SM refill bytes charged
        self.read_done = False
        self.error: BaseException | None = None
        self.t_submit = 0.0
        self.state = "queued"  # queued -> submitted -> ready -> lent -> placed
        self.weights = None
        self.est = (0.0, 0.0)
        self.pending = 0  # decode batches in flight + the reader's hold
        self.batch_errors: dict[int, BaseException] = {}
        self.read_error: BaseException | None = None
        self.cancel = False  # a prefetch nobody asks for any more: stop reading it
        self.adopted = False  # a prefetched task a fetch took over

    def view(self, offset: int, length: int):
        lo = offset - self.ext.offset
        if lo < 0 or lo + length > self.rbuf.nbytes:
            raise FormatError(f"{self.ext.label}: region [{offset}, {offset + length}) outside its extent")
        return self.rbuf.arr[lo:lo + length]

    @property
    def what(self) -> str:
        first = self.ext.parts[0].tensor if self.ext.parts else "?"
        return f"tensor {first} ({self.ext.label})"


class Job:
    def __init__(self, tasks: list[Task], speculative: bool = False):
        self.tasks = tasks
        self.speculative = speculative  # a prefetch: admitted without waiting, finished by the reaper
        self.certain = False  # a prefetch of what the next fetch will ask for: never superseded
        self.preload = False  # load-time warm-up: admitted without evicting, kept decoded (FULL)
        self.adopted: list[tuple["Job", Task]] = []  # prefetched tasks this fetch took over
        self.cond = threading.Condition()
        self.ready: collections.deque[Task] = collections.deque()
        self.cancelled = False
        self.reader_done = not tasks
        self.inflight = 0
        self.pinned: list[tuple[tuple, Entry]] = []  # FULL hits, yielded first
        self.lent: dict | None = None
        self.waiting = False  # the consumer is blocked in _next_ready


class Stats:
    """The store's counters (``stats()``); thread-safe: the I/O thread, decoder callbacks and the
    consumer all count."""

    def __init__(self) -> None:
        self._c: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: float = 1) -> None:
        with self._lock:
            self._c[name] += n

    def get(self, name: str) -> float:
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._c)

    def timer(self, name: str) -> "_Timer":
        """``with stats.timer("stall_s"):`` adds the seconds the block took."""
        return _Timer(self, name)


class _Timer:
    def __init__(self, stats: Stats, name: str):
        self.stats, self.name = stats, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.stats.add(self.name, time.perf_counter() - self.t0)
