"""Page-aligned buffers the store charges page by page, and the pool of free ones.

Two granules, kept apart:

* the **page** (``PAGE``: the host's, ``mmap.PAGESIZE``; 4, 16 or 64 KiB): what a buffer's size,
  its charged bytes and its ``madvise(MADV_DONTNEED)`` ranges are multiples of. The store takes it
  as a parameter (``page=``) so accounting can be tested for other kernels' page sizes;
* the **I/O alignment** (``ALIGN`` = 4096: the archive's extent alignment, specs/zmoe.md section 1,
  and the ``O_DIRECT`` granule of common block devices): what read offsets and lengths are
  multiples of (``io.ExpertReader``). A page is always a multiple of it.

Where this host pays for them (``hugepages.decide``: measured once, cached; ``ZIPMOE_HUGEPAGES`` forces
it), a buffer of at least one huge page (``HUGE``: the kernel's transparent huge page, 2 MiB on x86-64;
0 where there is none) is mapped at a length that is a multiple of it, which Linux places on a
huge-page boundary, and asks for huge pages (``MADV_HUGEPAGE``) on the whole huge pages inside its bytes;
the rest of the mapping (the part-used last one and the slack after it) is marked ``MADV_NOHUGEPAGE``,
so nothing outside the charged bytes is ever faulted in. A matrix-vector
product streams a decoded expert about a third faster from 2 MiB pages than from 4 KiB ones here
(fewer TLB misses; the page walks of a 4 KiB stream cost what the arithmetic does). Only buffers
charged whole get them, and a buffer that drops pages (``set_bounds``) gives them up first
(``MADV_NOHUGEPAGE`` on all of it): a huge-page region is never partly uncharged, and the kernel's
background collapse (``khugepaged``) cannot fill dropped pages back in.

A buffer lends its bytes explicitly (``lend``): each lent view is counted until the last object
derived from it (a numpy slice, a tensor made with ``torch.frombuffer``) is gone, then
``weakref.finalize`` gives it back. ``busy()`` is that count, so whether a buffer may be reused never
depends on an interpreter's reference counts.
"""
from __future__ import annotations

import bisect
import logging
import mmap
import os
import threading
import weakref

import numpy as np

__all__ = ["ALIGN", "PAGE", "HUGE", "huge_page_size", "use_huge", "anon_huge_bytes", "ceil_to", "floor_to",
           "ceil_align", "Buffer", "BufferPool"]

log = logging.getLogger(__name__)

ALIGN = 4096  # the archive's alignment and the O_DIRECT granule
PAGE = mmap.PAGESIZE  # the host's page size
_MAX_HUGE = 32 << 20  # a larger PMD page (64 KiB base pages: 512 MiB) would round buffers up too far


def huge_page_size(sysfs: str = "/sys/kernel/mm/transparent_hugepage") -> int:
    """The transparent huge page size buffers may ask for: 0 unless the kernel offers them on request
    (mode ``always`` or ``madvise``), Python has ``MADV_HUGEPAGE`` and the size is a page multiple of
    at most 32 MiB. Whether they are used is ``use_huge``'s decision."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    try:
        with open(os.path.join(sysfs, "enabled")) as f:
            mode = f.read()
        with open(os.path.join(sysfs, "hpage_pmd_size")) as f:
            size = int(f.read().strip())
    except (OSError, ValueError):
        return 0
    if "[never]" in mode or size <= PAGE or size % PAGE or size > _MAX_HUGE:
        return 0
    return size


HUGE = huge_page_size()


def use_huge() -> int:
    """The huge page size new buffers ask for (0: none): ``hugepages.decide`` for this host."""
    if not HUGE:
        return 0
    from .hugepages import decide

    return decide(HUGE)


def anon_huge_bytes(path: str = "/proc/self/smaps_rollup") -> int | None:
    """This process's anonymous memory on transparent huge pages (``AnonHugePages``), None where the
    kernel does not say."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ceil_to(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def floor_to(n: int, m: int) -> int:
    return int(n) // m * m


def ceil_align(n: int) -> int:
    """``n`` rounded up to the I/O alignment (what a read of ``n`` bytes transfers)."""
    return ceil_to(n, ALIGN)


class Buffer:
    """A page-aligned anonymous mapping with a uint8 numpy view (``arr``, the store's own).

    Only bytes ``[head, tail)`` count as resident (``charged``): pages below ``head`` and from
    ``tail`` on have been dropped (``MADV_DONTNEED``) or never touched. ``lend(n)`` hands out a view
    of the first ``n`` bytes; while any lent view (or anything made from it) lives the buffer is
    ``busy()`` and the store never reuses it.
    """

    __slots__ = ("mm", "arr", "nbytes", "head", "tail", "page", "huge", "_users", "_ulock", "__weakref__")

    def __init__(self, nbytes: int, page: int = PAGE, huge: int | None = None):
        """``huge``: the huge page size to ask for (None: ``use_huge()``; 0: none, e.g. a buffer that
        will be charged only in part)."""
        if page <= 0 or page % ALIGN:
            raise ValueError(f"page size {page} is not a positive multiple of {ALIGN}")
        n = max(page, ceil_to(nbytes, page))
        if huge is None:
            huge = use_huge() if n >= HUGE > 0 else 0
        self.huge = huge if huge and n >= huge else 0
        span = ceil_to(n, self.huge) if self.huge else n  # a huge-page multiple: mapped on a boundary
        self.page = page
        self.mm = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.arr = np.frombuffer(self.mm, dtype=np.uint8, count=n)
        if self.huge:
            self._ask_huge(n, span)
        self.nbytes = n
        self.head = 0
        self.tail = n
        self._users = 0
        self._ulock = threading.Lock()  # finalizers run in whichever thread drops the last reference

    def _ask_huge(self, n: int, span: int) -> None:
        body = floor_to(n, self.huge)
        try:
            self.mm.madvise(mmap.MADV_HUGEPAGE, 0, body)
            if span > body:
                self.mm.madvise(mmap.MADV_NOHUGEPAGE, body, span - body)
        except OSError as exc:  # a kernel without the advice: small pages, as before
            log.debug("huge pages not available for a %d-byte buffer: %s", n, exc)
            self.huge = 0
            return
        from . import hugepages

        if hugepages.watching():  # fault the huge pages in now, timed (the caller writes them all anyway)
            hugepages.observe(hugepages.fault_in(self.arr, body, self.huge))

    @property
    def charged(self) -> int:
        return max(0, self.tail - self.head)

    def lend(self, n: int) -> np.ndarray:
        """A view of bytes [0, n) for the caller, counted until it (and all made from it) is gone."""
        view = np.frombuffer(self.mm, dtype=np.uint8, count=int(n))  # its slices keep it alive
        with self._ulock:
            self._users += 1
        weakref.finalize(view, self._returned)
        return view

    def _returned(self) -> None:
        with self._ulock:
            self._users -= 1

    def busy(self) -> bool:
        with self._ulock:
            return self._users > 0

    def set_bounds(self, head: int, tail: int, *, drop: bool = True) -> int:
        """Count exactly the pages of [head, tail) (head rounded down, tail up, to pages).

        Pages leaving the range are dropped when ``drop`` (skip it for pages never touched); pages
        joining it will be written by the caller. Returns the change of ``charged``.
        """
        head = floor_to(max(0, head), self.page)
        tail = min(self.nbytes, ceil_to(tail, self.page))
        tail = max(tail, head)
        before = self.charged
        if drop:
            if head > self.head:
                self._drop(self.head, min(head, self.tail))
            if tail < self.tail:
                self._drop(max(tail, self.head), self.tail)
        self.head, self.tail = head, tail
        return self.charged - before

    def _drop(self, lo: int, hi: int) -> None:
        if hi > lo:
            if self.huge:  # no huge page may straddle dropped bytes, now or by a later collapse
                self.huge = 0
                self.mm.madvise(mmap.MADV_NOHUGEPAGE, 0, len(self.mm))
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Unmap now if nothing references the memory, else leave it to the garbage collector."""
        arr, self.arr = self.arr, None
        del arr
        try:
            self.mm.close()
        except BufferError:  # still exported (a lent view somewhere): freed when that goes
            pass


class BufferPool:
    """Free buffers kept for reuse (mapping and faulting fresh pages costs ~0.8 ms per MiB here).

    ``take(n)`` returns the smallest pooled buffer with ``n <= nbytes <= n * (1 + slack)``.
    Accounting is the caller's (the ledger's ``pool`` category).
    """

    def __init__(self, slack: float = 0.125, page: int = PAGE):
        self.slack = slack
        self.page = page
        self._free: list[Buffer] = []

    def __len__(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(b.charged for b in self._free)

    def put(self, buf: Buffer) -> None:
        self._free.append(buf)

    def take(self, n: int) -> Buffer | None:
        n = ceil_to(n, self.page)
        best = None
        for b in self._free:
            if n <= b.nbytes <= n + max(self.page, int(n * self.slack)) and (best is None or b.nbytes < best.nbytes):
                best = b
        if best is not None:
            self._free.remove(best)
        return best

    def size_for(self, n: int, sizes: list[int]) -> int:
        """The size to map a new buffer for ``n`` bytes at: the largest of ``sizes`` (sorted, the sizes
        requests come in) that ``take(n)`` would hand out, so that once pooled it serves the requests of
        about its size, not only those no bigger than ``n``: a store's read buffers differ by a few pages,
        and a fetch that found only smaller ones pooled mapped and faulted a fresh one."""
        n = ceil_to(n, self.page)
        i = bisect.bisect_right(sizes, n + max(self.page, int(n * self.slack))) - 1
        return max(n, ceil_to(sizes[i], self.page)) if i >= 0 else n

    def pop_any(self) -> Buffer | None:
        """The largest free buffer (to give its memory back), or None."""
        if not self._free:
            return None
        b = max(self._free, key=lambda x: x.charged)
        self._free.remove(b)
        return b

    def clear(self) -> list[Buffer]:
        out, self._free = self._free, []
        return out
