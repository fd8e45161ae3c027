"""The store's records: an expert's entry, a task (one expert being read and decoded), a job (one
fetch or prefetch), the store's exception, and which chunks need which bytes. Shared by the engine
(``store``), its memory management (``memory``) and prefetch (``prefetch``)."""
from __future__ import annotations

import collections
import threading

from formats.errors import FormatError, ZmoeError

from .io import Buffer
from .tiers import ExpertInfo, Tier

_CAT = {Tier.FULL: "full", Tier.COMP: "comp", Tier.SM: "sm"}  # ledger category of a resident tier


def _ref_ends(ext, C: int, R: int, start: Tier) -> list[int]:
    """For each chunk of ``Archive.extent_refs(ext)`` (same order): how many bytes of the extent must be
    read before it can be decoded. Regions already resident (the SM planes of an SM-tier expert, all
    of a COMP-tier one) need nothing."""
    if start in (Tier.COMP, Tier.FULL):
        return [0] * sum(len(p.exp_chunks) if p.encoding != "raw" else len(p.data_xxh3) for p in ext.parts)
    o = ext.offset
    ends = []
    for p in ext.parts:
        if p.encoding == "raw":
            for i in range(len(p.data_xxh3)):
                end = min(p.data.length, (i + 1) * R) + p.data.offset - o
                ends.append(0 if start == Tier.SM else end)
            continue
        n = p.nbytes // 2
        for i, c in enumerate(p.exp_chunks):
            e = c.offset + c.length - o
            if start == Tier.COLD:
                e = max(e, p.sm.offset + min(n, (i + 1) * C) - o)
            ends.append(e)
    return ends


class StoreError(ZmoeError):
    """The store was used in a way it does not support (re-entered fetch, closed store)."""


class _Cancelled(Exception):
    pass


def _detach(exc: BaseException | None) -> BaseException | None:
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


class _Entry:
    __slots__ = ("tier", "dbuf", "rbuf", "weights", "pins", "busy")

    def __init__(self) -> None:
        self.tier = Tier.COLD
        self.dbuf: Buffer | None = None
        self.rbuf: Buffer | None = None
        self.weights = None
        self.pins = 0
        self.busy = False  # a task of the open fetch owns its buffers


class _Task:
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


class _Job:
    def __init__(self, tasks: list[_Task], speculative: bool = False):
        self.tasks = tasks
        self.speculative = speculative  # a prefetch: admitted without waiting, finished by the reaper
        self.certain = False  # a prefetch of what the next fetch will ask for: never superseded
        self.preload = False  # load-time warm-up: admitted without evicting, kept decoded (FULL)
        self.adopted: list[tuple["_Job", _Task]] = []  # prefetched tasks this fetch took over
        self.cond = threading.Condition()
        self.ready: collections.deque[_Task] = collections.deque()
        self.cancelled = False
        self.reader_done = not tasks
        self.inflight = 0
        self.pinned: list[tuple[tuple, _Entry]] = []  # FULL hits, yielded first
        self.lent: dict | None = None
        self.waiting = False  # the consumer is blocked in _next_ready
