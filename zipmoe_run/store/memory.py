"""``Memory``: every byte the store holds, charged to the ledger before it is touched
(specs/runtime.md sections 1 and 2).

It owns the ``Ledger`` (bytes per category), the ``BufferPool`` (free buffers kept for reuse) and
the buffers the store released while a lent view still referenced them (``draining``: charged until
they are returned). Buffers come in whole pages of ``page`` bytes. Not thread-safe by itself: every
method runs under the store lock, whose condition ``cond`` is notified whenever memory is freed.
"""
from __future__ import annotations

import threading

from .budget import Ledger
from .buffers import PAGE, Buffer, BufferPool, ceil_to, floor_to

__all__ = ["Memory"]

_UNLIMITED_POOL = 8  # free buffers kept for reuse when there is no budget


class Memory:
    def __init__(self, capacity: int | None, cond: threading.Condition, page: int = PAGE):
        self.capacity = capacity
        self.page = page
        self.ledger = Ledger(capacity)
        self.pool = BufferPool(page=page)
        self.draining: list[Buffer] = []
        self.cond = cond
        self.keep = 0  # pooled bytes worth keeping (the staging reserve): given back only when nothing else can

    def ceil(self, n: int) -> int:
        return ceil_to(n, self.page)

    def floor(self, n: int) -> int:
        return floor_to(n, self.page)

    def fits(self, n: int) -> bool:
        return self.ledger.fits(n)

    # -- getting buffers ----------------------------------------------------------------------------
    def alloc(self, n: int, cat: str = "staging") -> Buffer:
        """A new buffer of ``n`` bytes (whole pages), charged to ``cat``; the caller checked ``fits``."""
        b = Buffer(n, self.page)
        self.ledger.charge(cat, b.charged)
        return b

    def reuse(self, n: int) -> Buffer | None:
        """A pooled buffer for ``n`` bytes, whole again, charged to staging (None if none fits)."""
        b = self.pool.take(n)
        if b is None:
            return None
        extra = b.nbytes - b.charged
        if extra and not self.ledger.fits(extra):
            self.pool.put(b)
            return None
        self.ledger.move("pool", "staging", b.charged)
        self.ledger.charge("staging", b.set_bounds(0, b.nbytes))
        return b

    def shrink_pool(self, excess_only: bool = False) -> bool:
        """Unmap the largest pooled buffer; False when the pool is empty (with ``excess_only``: when it
        holds no more than ``keep`` bytes, the next fetches' read and decode buffers, which are faster
        reused than mapped and faulted afresh, and which the policies leave room for anyway)."""
        if excess_only and self.pool.nbytes <= self.keep:
            return False
        b = self.pool.pop_any()
        if b is None:
            return False
        self.ledger.charge("pool", -b.charged)
        b.close()
        return True

    def bounded(self, n: int, head: int, tail: int, cat: str) -> Buffer | None:
        """A buffer of ``n`` bytes of which only [head, tail) is charged (to ``cat``), or None when
        that does not fit. Pooled buffers first; the pages outside stay dropped or untouched."""
        want = self.ceil(tail) - self.floor(head)
        b = self.pool.take(n)
        if b is not None:
            if want - b.charged > 0 and not self.ledger.fits(want - b.charged):
                self.pool.put(b)
            else:
                self.ledger.move("pool", cat, b.charged)
                self.ledger.charge(cat, b.set_bounds(head, tail))
                return b
        if not self.ledger.fits(want):
            return None
        whole = self.floor(head) == 0 and self.ceil(tail) >= self.ceil(n)
        b = Buffer(n, self.page, huge=None if whole else 0)  # huge pages only where all is charged
        self.ledger.charge(cat, b.set_bounds(head, tail, drop=False) + b.nbytes)
        return b

    # -- giving them back ---------------------------------------------------------------------------
    def release(self, buf: Buffer | None, cat: str) -> None:
        """``buf`` leaves ``cat``: to the pool, or to ``draining`` while a lent view still lives."""
        if buf is None:
            return
        if buf.busy():
            self.ledger.move(cat, "draining", buf.charged)
            self.draining.append(buf)
        elif self.capacity is None and len(self.pool) >= _UNLIMITED_POOL:
            self.ledger.charge(cat, -buf.charged)
            buf.close()
        else:
            self.ledger.move(cat, "pool", buf.charged)
            self.pool.put(buf)
        self.cond.notify_all()

    def reap(self) -> None:
        """Move the draining buffers whose lent views are all gone to the pool."""
        if not self.draining:
            return
        keep = []
        for b in self.draining:
            if b.busy():
                keep.append(b)
            else:
                self.ledger.move("draining", "pool", b.charged)
                self.pool.put(b)
        self.draining = keep

    def trim(self, buf: Buffer, head: int, tail: int, cat: str) -> None:
        """Shrink ``buf`` to the pages of [head, tail) (dropping the others) and credit ``cat``."""
        delta = buf.set_bounds(head, tail)
        if delta > 0:
            raise AssertionError("trimming a buffer cannot grow it")
        self.ledger.charge(cat, delta)

    def close(self) -> None:
        for b in self.pool.clear() + self.draining:
            b.close()
        self.draining = []
