"""Honest I/O: expert bytes never sit in an unbudgeted page cache.

Expert extents are read with ``O_DIRECT`` into page-aligned anonymous buffers when the file system
supports it (probed when the reader opens: one aligned 4 KiB read). Offsets are 4096-aligned in the
file (specs/zmoe.md section 1) and lengths are rounded up to 4096, so every read is aligned.
Otherwise the reader uses plain ``pread`` and drops the pages it read with
``posix_fadvise(POSIX_FADV_DONTNEED)``. ``ExpertReader.mode`` says which: ``"O_DIRECT"`` or
``"buffered+DONTNEED"``. A caller may read bytes that are mostly in the page cache already through it
(``ExpertReader.fd_for``; the bulk preload does): the cached pages are copied from memory, the others
read and dropped again, so the cache ends as it began.

Buffers (``buffers.Buffer``, re-exported here) are anonymous private mappings, page-aligned (as
``O_DIRECT`` wants), freed to the kernel on close; their pages can be dropped (``MADV_DONTNEED``),
which is how an expert goes from compressed-resident to sign/mantissa-resident without a copy.

An optional bandwidth cap (``ExpertReader(throttle_bps=...)``) emulates slower storage (eMMC, UFS)
for benchmarks: the reader behaves like a device that serves bytes one after another at
``throttle_bps``, sleeping after a read until the bytes it has delivered fit that rate. The sleep
holds no lock, so decoding of earlier pieces goes on meanwhile.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np

from formats.errors import FormatError, ZmoeError

from .buffers import ALIGN, PAGE, Buffer, BufferPool, ceil_align

__all__ = ["ALIGN", "PAGE", "Buffer", "BufferPool", "ExpertReader", "ReadCounters", "StoreIOError",
           "probe_direct", "drop_page_cache", "cached_pages", "uncached_runs", "STORAGE_PRESETS", "parse_storage"]

log = logging.getLogger(__name__)

# emulated storage for benchmarks: sustained sequential read rates, bytes/s
STORAGE_PRESETS = {"emmc": 300_000_000, "ufs": 2_000_000_000}
CACHED_SHARE = 0.5  # ExpertReader.fd_for reads a range through the page cache from this share of it cached


def parse_storage(spec: str | int | float | None) -> int | None:
    """``None``/``"none"``/``"disk"``: no cap; ``"emmc"`` (300 MB/s), ``"ufs"`` (2 GB/s); or bytes/s
    as a number, optionally with a decimal suffix (``"500M"``, ``"1.5G"``, ``"800MB"``)."""
    if spec is None:
        return None
    if isinstance(spec, (int, float)):
        v = float(spec)
    else:
        t = str(spec).strip().lower()
        if t in ("", "none", "disk", "real"):
            return None
        if t in STORAGE_PRESETS:
            return STORAGE_PRESETS[t]
        t = t.removesuffix("/s").removesuffix("b")
        mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(t[-1:], 1.0)
        try:
            v = float(t[:-1] if mult != 1.0 else t) * mult
        except ValueError:
            raise ValueError(f"storage must be emmc, ufs or bytes per second, not {spec!r}") from None
    if not v > 0:
        raise ValueError(f"storage rate must be > 0 bytes/s, not {spec!r}")
    return int(v)


class StoreIOError(ZmoeError):
    """Reading expert bytes failed (I/O error); the message names the file, tensor and offset."""


def probe_direct(path: str | os.PathLike) -> str | None:
    """None if ``O_DIRECT`` reads of ``path`` work (one aligned 4 KiB read), else the reason."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return "this platform has no O_DIRECT"
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        return f"open with O_DIRECT failed ({e.strerror})"
    try:
        buf = mmap.mmap(-1, ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            buf.close()
    except OSError as e:
        return f"aligned O_DIRECT read failed ({e.strerror})"
    finally:
        os.close(fd)
    return None


def preadv1(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


def read_aligned(fd: int, view: memoryview, offset: int, pread=preadv1) -> int:
    """Fill ``view`` (a whole number of aligned pieces) from file ``offset`` with ``pread`` calls,
    stopping early only at the end of the file (a short, unaligned piece, after which O_DIRECT cannot
    go on). Returns the bytes read; an ``OSError`` propagates with ``.at``, the offset it failed at."""
    got, n = 0, len(view)
    try:
        while got < n:
            r = pread(fd, view[got:], offset + got)
            if r <= 0:
                break
            got += r
            if got % ALIGN:
                break
    except OSError as e:
        e.at = offset + got
        raise
    return got


def drop_pages(fd: int, offset: int, n: int) -> None:
    """Evict what a buffered read of [offset, offset + n) left in the page cache (advisory)."""
    try:
        os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):  # AttributeError: a platform without posix_fadvise
        pass


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
        lib.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        lib.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        _LIBC = lib
    return _LIBC


def cached_pages(fd: int, offset: int, length: int) -> np.ndarray | None:
    """Which pages of the file's bytes [offset, offset + length) are in the page cache now: one byte per
    page from ``offset`` rounded down to the page size, 1 where cached (``mincore`` on a shared
    read-only mapping of the range, which reads and faults in nothing). None where it cannot be told
    (no ``mincore`` or ``mmap`` through the C library, a mapping refused)."""
    if length <= 0 or offset < 0:
        return None
    start = offset - offset % PAGE  # a mapping starts at a multiple of the page size
    n = offset + length - start
    try:
        lib = _libc()
        addr = lib.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    except (OSError, AttributeError, ValueError, ctypes.ArgumentError):  # not a POSIX C library, or off_t too narrow
        return None
    if not addr or addr == ctypes.c_void_p(-1).value:  # MAP_FAILED
        return None
    try:
        vec = np.zeros((n + PAGE - 1) // PAGE, np.uint8)
        return vec & 1 if lib.mincore(addr, n, vec.ctypes.data) == 0 else None
    finally:
        lib.munmap(addr, n)


def uncached_runs(resident: np.ndarray, offset: int) -> list[tuple[int, int]]:
    """(offset, length) in bytes of each run of pages ``resident`` (``cached_pages`` of a range that
    starts at ``offset``) marks as not cached."""
    miss = np.flatnonzero(resident == 0)
    if not miss.size:
        return []
    cut = np.flatnonzero(np.diff(miss) != 1)
    starts, ends = np.r_[miss[0], miss[cut + 1]], np.r_[miss[cut], miss[-1]] + 1
    base = offset - offset % PAGE
    return [(base + int(a) * PAGE, int(b - a) * PAGE) for a, b in zip(starts, ends)]


def drop_page_cache(path: str | os.PathLike) -> None:
    """Write back and evict ``path``'s pages from the page cache (cold-start benchmarks)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fdatasync(fd)
        except OSError:
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Throttle:
    """Emulated storage of a sustained rate (bytes/s), shared by every reader of one device.

    It keeps the time at which a device of that rate, serving reads back to back, would have
    finished the bytes read so far (``free_at``); a read starting when that device is idle restarts
    it from the read's start. After each read the reader sleeps (no lock held) until that time, so
    the bytes returned by any moment never exceed ``bps`` times the time since the device was last
    idle. ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(self, bps: float, clock=time.monotonic, sleep=time.sleep):
        if not bps > 0:
            raise ValueError(f"io throttle must be > 0 bytes/s, not {bps!r}")
        self.bps = float(bps)
        self.clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self.free_at = 0.0
        self.slept_s = 0.0  # total time slept

    def after(self, started: float, nbytes: int) -> None:
        """A read that began at ``started`` (this clock) returned ``nbytes``: wait until they fit."""
        if nbytes <= 0:
            return
        with self._lock:
            self.free_at = max(self.free_at, started) + nbytes / self.bps
            until = self.free_at
        wait = until - self.clock()
        if wait > 0:  # outside the lock: other readers book their bytes, decoders keep going
            self._sleep(wait)
            with self._lock:
                self.slept_s += wait


class ReadCounters:
    """Bytes, reads and seconds of a reader's reads (``bytes_read``, ``reads``, ``read_s``); thread-safe,
    since the store keeps several reads in flight (specs/runtime.md section 13)."""

    def __init__(self) -> None:
        self.bytes_read = self.reads = 0
        self.read_s = 0.0
        self._count = threading.Lock()

    def count(self, seconds: float = 0.0, nbytes: int = 0, reads: int = 0) -> None:
        with self._count:
            self.read_s += seconds
            self.bytes_read += nbytes
            self.reads += reads


class ExpertReader(ReadCounters):
    """Aligned reads of archive byte ranges into ``Buffer``s; one instance per archive.

    ``mode``: ``"auto"`` (O_DIRECT when the probe succeeds), ``"direct"`` (O_DIRECT or an error) or
    ``"buffered"`` (pread + POSIX_FADV_DONTNEED). Thread-safe (pread has no shared file position).

    ``throttle_bps``: emulate storage of that sustained rate (bytes/s; :class:`Throttle`). ``clock``
    and ``sleep`` are injectable for tests.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "auto", *, throttle_bps: float | None = None,
                 clock=time.monotonic, sleep=time.sleep):
        if mode not in ("auto", "direct", "buffered"):
            raise ValueError(f"io mode must be auto, direct or buffered, not {mode!r}")
        self.throttle = Throttle(throttle_bps, clock, sleep) if throttle_bps is not None else None
        self.path = Path(path)
        self.why_not_direct: str | None = None
        self._fd_direct: int | None = None
        if mode in ("auto", "direct"):
            self.why_not_direct = probe_direct(self.path)
            if self.why_not_direct is None:
                self._fd_direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            elif mode == "direct":
                raise StoreIOError(f"{self.path}: {self.why_not_direct}")
        else:
            self.why_not_direct = "buffered I/O requested"
        self._fd = os.open(self.path, os.O_RDONLY)
        self.mode = "O_DIRECT" if self._fd_direct is not None else "buffered+DONTNEED"
        if self._fd_direct is None:
            log.info("%s: reading experts with pread + POSIX_FADV_DONTNEED (%s)", self.path, self.why_not_direct)
        ReadCounters.__init__(self)

    def file_size(self) -> int:
        return os.fstat(self._fd).st_size

    def read(self, buf: Buffer, offset: int, length: int, what: str, at: int = 0) -> int:
        """Read file bytes [offset, offset + ceil4k(length)) into ``buf`` from byte ``at``.

        ``what`` names the tensor for error messages. Raises ``FormatError`` when the file ends
        before ``offset + length`` (a truncated archive) and ``StoreIOError`` on I/O errors.
        Returns the number of bytes transferred.
        """
        if offset % ALIGN or at % ALIGN:
            raise FormatError(f"{self.path}: {what}: read at offset {offset} is not {ALIGN}-aligned")
        n = ceil_align(length)
        if at + n > buf.nbytes:
            raise ValueError(f"read of {n} bytes at {at} does not fit a {buf.nbytes}-byte buffer")
        fd = self._fd_direct if self._fd_direct is not None else self._fd
        view = memoryview(buf.mm)[at:at + n]
        t0 = time.perf_counter()
        c0 = self.throttle.clock() if self.throttle is not None else 0.0
        try:
            got = read_aligned(fd, view, offset)
        except OSError as e:
            raise StoreIOError(f"{self.path}: cannot read {what} at offset {e.at}: "
                               f"{e.strerror or errno.errorcode.get(e.errno, e)}") from None
        finally:
            view.release()
        if self._fd_direct is None:
            drop_pages(self._fd, offset, n)
        if self.throttle is not None:
            self.throttle.after(c0, got)
        self.count(seconds=time.perf_counter() - t0)
        if got < length:
            raise FormatError(f"{self.path}: archive truncated: {what} needs bytes [{offset}, {offset + length}) "
                              f"but the file ends at {offset + got}")
        self.count(nbytes=got, reads=1)
        return got

    def fd_for(self, offset: int, length: int) -> tuple[int, list[tuple[int, int]], bool]:
        """(descriptor, byte ranges to drop from the page cache after the read, read through the page
        cache) for a caller that reads the file's bytes [offset, offset + length) itself. Where at least
        ``CACHED_SHARE`` of their pages are in the page cache already (``cached_pages``: an archive just
        packed or read before), the buffered descriptor, and afterwards the pages that were not cached
        are dropped again: the cached ones are copied from memory and the cache ends as it began (but
        for readahead past the range). Else what ``read`` uses: ``O_DIRECT``, or buffered with the whole
        range dropped after. A throttled reader (emulated storage) never reads from the cache."""
        if self.throttle is None:
            resident = cached_pages(self._fd, offset, length)
            if resident is not None and resident.mean() >= CACHED_SHARE:
                return self._fd, uncached_runs(resident, offset), True
        if self._fd_direct is not None:
            return self._fd_direct, [], False
        return self._fd, [(offset, length)], False

    @property
    def throttle_bps(self) -> float | None:
        return self.throttle.bps if self.throttle is not None else None

    @property
    def throttle_s(self) -> float:
        """Total time slept by the throttle."""
        return self.throttle.slept_s if self.throttle is not None else 0.0

    @property
    def _free_at(self) -> float:
        return self.throttle.free_at if self.throttle is not None else 0.0

    def close(self) -> None:
        for fd in (self._fd_direct, self._fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd_direct = None
        self._fd = None  # type: ignore[assignment]
