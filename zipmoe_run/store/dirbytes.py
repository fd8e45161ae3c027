"""``DirectoryBytes``: routed experts read straight from a checkpoint folder's safetensors shards.

The ``ExpertBytes`` of a plain checkpoint directory (specs/runtime.md section 3.1). Experts are
grouped as the packer groups them (``formats.extent_plan``: the tensors of one expert, or its slice
of each fused [E, ...] tensor). Each expert becomes a ``DirExtent`` whose parts are raw bytes: a
fetch reads the 4096-aligned ranges enclosing its parts (adjacent parts in one shard share a range)
into the read buffer, one after another, and copies each part into the decoded buffer (the same
layout as an archive's: parts in (proj, name) order at multiples of 64 bytes). There are no coded
exponents, so only FULL and COLD are offered (``tiers.info_from_extent``), as on a ``--raw``
archive; any dtype works (the bytes are copied, never cast).

Honest I/O as ``io.ExpertReader`` does it: ``O_DIRECT`` per shard when its probe succeeds, else
``pread`` + ``POSIX_FADV_DONTNEED`` (one logged note names the shards that fall back; a shard whose
``O_DIRECT`` reads start failing with ``EINVAL`` falls back the same way). After every read the
shard is ``fstat``-ed: a size or mtime other than the one seen when it was opened raises
``ShardChangedError`` (one line naming the shard), which stops generation.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from formats.decoder import KIND_RAW, ChunkRef, ParallelDecoder
from formats.errors import InputError
from formats.extent_plan import out_offsets, plan_extents
from formats.names import ExpertName
from zipmoe_run.tiers import Tier

from .buffers import ALIGN, Buffer, ceil_align, floor_to
from .io import ReadCounters, StoreIOError, Throttle, drop_pages, preadv1, probe_direct, read_aligned

__all__ = ["ShardTensor", "DirPart", "DirExtent", "ShardFile", "ShardReaders", "DirectoryBytes", "CopyDecoder",
           "ShardChangedError"]

log = logging.getLogger(__name__)

COPY_PIECE = 2 << 20  # parts are copied in pieces of this size, each as soon as its bytes are read


class ShardChangedError(InputError):
    """A shard's size or mtime changed since the run opened it: its bytes can no longer be trusted."""


@dataclass(frozen=True)
class ShardTensor:
    """An expert tensor of a shard (what ``formats.extent_plan`` groups)."""

    name: str
    shard: int  # index into the shard list
    dtype: str  # safetensors spelling: BF16, F32, F16, ...
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute byte offset in the shard
    role: ExpertName


@dataclass(frozen=True)
class DirPart:
    tensor: str
    slice: int | None
    proj: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    out_offset: int  # in the decoded buffer
    at: int  # in the read buffer
    encoding: str = "raw"


@dataclass(frozen=True)
class Span:
    """One aligned read: shard bytes [file, file + length) into the read buffer at ``at``; only the
    first ``avail`` of them exist (a range that ends with its file ends early)."""

    shard: int
    file: int
    length: int
    at: int
    avail: int


@dataclass(frozen=True)
class DirExtent:
    """The store's view of one expert (the fields of ``formats.index.Extent`` it uses). ``offset`` is 0:
    offsets are positions in the read buffer. ``length`` (the read buffer) is at least the decoded
    size, so COMP is never offered; ``read_bytes`` is what a cold fetch reads."""

    stack: str | None
    layer: int
    expert: int
    parts: tuple[DirPart, ...]
    spans: tuple[Span, ...]
    decoded_nbytes: int
    length: int
    read_bytes: int
    offset: int = 0
    exp_length: int = 0

    @property
    def key(self) -> tuple[str | None, int, int]:
        return (self.stack, self.layer, self.expert)

    @property
    def label(self) -> str:
        s = f"{self.stack}." if self.stack else ""
        return f"expert {s}layer {self.layer} expert {self.expert}"


def build_extent(plan, sizes: Sequence[int]) -> DirExtent:
    """A ``DirExtent`` from a ``formats.extent_plan.ExtentPlan`` of ``ShardTensor``s."""
    ranges: dict[int, list[list[int]]] = {}
    for pp in sorted(plan.parts, key=lambda p: (p.tensor.shard, p.src_offset)):
        if not pp.nbytes:
            continue
        lo, hi = floor_to(pp.src_offset, ALIGN), ceil_align(pp.src_offset + pp.nbytes)
        rs = ranges.setdefault(pp.tensor.shard, [])
        if rs and lo <= rs[-1][1]:
            rs[-1][1] = max(rs[-1][1], hi)
        else:
            rs.append([lo, hi])
    spans, at = [], 0
    for shard in sorted(ranges):
        for lo, hi in ranges[shard]:
            spans.append(Span(shard, lo, hi - lo, at, min(hi, sizes[shard]) - lo))
            at += hi - lo
    offs, decoded = out_offsets(plan.parts)
    parts = []
    for pp, out in zip(plan.parts, offs):
        t = pp.tensor
        where = 0
        for sp in spans:
            if sp.shard == t.shard and sp.file <= pp.src_offset < sp.file + sp.length:
                where = sp.at + pp.src_offset - sp.file
                break
        parts.append(DirPart(t.name, pp.slice, t.role.proj, t.dtype, tuple(pp.shape), pp.nbytes, out, where))
    return DirExtent(plan.stack, plan.layer, plan.expert, tuple(parts), tuple(spans), decoded,
                     max(at, ceil_align(decoded)), at)


class ShardFile:
    """One shard opened for expert reads: its size and mtime when opened, an ``O_DIRECT`` descriptor
    when the probe allows it, and a plain one."""

    def __init__(self, path: Path, size: int, mode: str):
        self.path = path
        self._lock = threading.Lock()  # read threads (read depth > 1) may fall back at the same time
        self._retired: list[int] = []  # O_DIRECT descriptors given up: closed with the file, not under a read
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise InputError(f"{path}: cannot open ({e.strerror})") from None
        self.fd_direct: int | None = None
        try:
            st = os.fstat(self.fd)
            self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
            if self.size != size:
                raise ShardChangedError(f"{path}: changed on disk since it was opened (size {self.size} bytes, "
                                        f"was {size})")
            self.why_not_direct = probe_direct(path) if mode != "buffered" else "buffered I/O requested"
            if self.why_not_direct is None:
                self.fd_direct = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            elif mode == "direct":
                raise StoreIOError(f"{path}: {self.why_not_direct}")
        except BaseException:
            self.close()
            raise

    @property
    def mode(self) -> str:
        return "O_DIRECT" if self.fd_direct is not None else "buffered+DONTNEED"

    def check(self) -> None:
        """``ShardChangedError`` unless the shard has the size and mtime it had when opened."""
        try:
            st = os.fstat(self.fd)
        except OSError as e:
            raise StoreIOError(f"{self.path}: cannot stat ({e.strerror})") from None
        if st.st_size != self.size or st.st_mtime_ns != self.mtime_ns:
            what = (f"size {st.st_size} bytes, was {self.size}" if st.st_size != self.size
                    else "same size, new modification time")
            raise ShardChangedError(f"{self.path}: changed on disk while the model was running ({what}); "
                                    f"generation stopped (restart to use the new file)")

    def _pread(self, fd: int, view: memoryview, offset: int) -> int:  # tests inject faults here
        return preadv1(fd, view, offset)

    def read(self, buf: Buffer, offset: int, need: int, at: int, what: str) -> int:
        """Read shard bytes [offset, offset + ceil4k(need)) into ``buf`` at ``at`` (both aligned);
        returns the bytes transferred (at least ``need``)."""
        n = ceil_align(need)
        view = memoryview(buf.mm)[at:at + n]
        try:
            while True:
                direct = self.fd_direct is not None
                try:
                    got = read_aligned(self.fd_direct if direct else self.fd, view, offset, self._pread)
                    break
                except OSError as e:
                    if direct and e.errno == errno.EINVAL:  # the file system refuses O_DIRECT after all:
                        self._fall_back(e)  # read the whole range again, buffered
                        continue
                    raise StoreIOError(f"{self.path}: cannot read {what} at offset {e.at}: "
                                       f"{e.strerror or errno.errorcode.get(e.errno, e)}") from None
        finally:
            view.release()
        if self.fd_direct is None:
            drop_pages(self.fd, offset, n)
        self.check()
        if got < need:
            raise StoreIOError(f"{self.path}: {what} needs bytes [{offset}, {offset + need}) but the read "
                               f"stopped at {offset + got}")
        return got

    def _fall_back(self, e: OSError) -> None:
        """Stop using the O_DIRECT descriptor (once, whichever read thread gets here first). It stays open
        until ``close``: another read thread may be inside a read on it, and a closed number can be reused
        by the next ``open`` of anything."""
        with self._lock:
            if self.fd_direct is None:
                return
            log.warning("%s: O_DIRECT read refused (%s); reading its experts with pread + POSIX_FADV_DONTNEED",
                        self.path, e.strerror)
            self._retired.append(self.fd_direct)
            self.fd_direct = None
            self.why_not_direct = f"O_DIRECT read failed ({e.strerror})"

    def close(self) -> None:
        fds = [getattr(self, "fd_direct", None), getattr(self, "fd", None), *getattr(self, "_retired", ())]
        self.fd_direct = self.fd = None
        self._retired = []
        for fd in fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class ShardReaders(ReadCounters):
    """The shards of one folder as the store's ``reader``: mode, throttle and counters (the same
    throttle model as ``io.ExpertReader``, one device for all shards)."""

    def __init__(self, path: Path, files: list[ShardFile], throttle_bps: float | None = None,
                 clock=time.monotonic, sleep=time.sleep):
        self.path, self.files = path, files
        self.throttle = Throttle(throttle_bps, clock, sleep) if throttle_bps is not None else None
        ReadCounters.__init__(self)

    @property
    def throttle_bps(self) -> float | None:
        return self.throttle.bps if self.throttle is not None else None

    @property
    def throttle_s(self) -> float:
        return self.throttle.slept_s if self.throttle is not None else 0.0

    @property
    def mode(self) -> str:
        modes = {f.mode for f in self.files}
        return modes.pop() if len(modes) == 1 else "O_DIRECT+buffered+DONTNEED"

    @property
    def why_not_direct(self) -> str | None:
        why = [f"{f.path.name}: {f.why_not_direct}" for f in self.files if f.fd_direct is None]
        return "; ".join(why) or None

    def read(self, shard: int, buf: Buffer, offset: int, need: int, at: int, what: str) -> int:
        t0 = time.perf_counter()
        c0 = self.throttle.clock() if self.throttle is not None else 0.0
        got = self.files[shard].read(buf, offset, need, at, what)
        if self.throttle is not None:
            self.throttle.after(c0, got)
        self.count(time.perf_counter() - t0, got, 1)
        return got

    def close(self) -> None:
        for f in self.files:
            f.close()


class CopyDecoder(ParallelDecoder):
    """The decoder of a directory store: its chunks are raw copies with no stored checksum (safetensors
    carries none), so they are never verified."""

    def submit(self, refs, out, verify: bool = True, *, _checked: bool = False):
        return super().submit(refs, out, False, _checked=_checked)

    def decode_here(self, refs, out, verify: bool = True) -> None:
        super().decode_here(refs, out, False)


class DirectoryBytes:
    """The routed experts of a checkpoint folder (``ExpertBytes``). ``shards``: (path, size) of each
    shard as the caller validated it; ``tensors``: its expert tensors (``ShardTensor``)."""

    def __init__(self, root: str | os.PathLike, shards: Sequence[tuple[Path, int]], tensors: Sequence[ShardTensor],
                 io_mode: str = "auto", throttle_bps: float | None = None):
        if io_mode not in ("auto", "direct", "buffered"):
            raise ValueError(f"io mode must be auto, direct or buffered, not {io_mode!r}")
        self.root = Path(root)
        sizes = [s for _, s in shards]
        self.extents = {}
        for plan in plan_extents(tensors):
            ext = build_extent(plan, sizes)
            self.extents[ext.key] = ext
        used = sorted({sp.shard for e in self.extents.values() for sp in e.spans})
        files: list[ShardFile] = []
        self._file_of: dict[int, int] = {}
        try:
            for i in used:
                self._file_of[i] = len(files)
                files.append(ShardFile(Path(shards[i][0]), shards[i][1], io_mode))
        except BaseException:
            for f in files:
                f.close()
            raise
        self.reader = ShardReaders(self.root, files, throttle_bps)
        buffered = [f for f in files if f.fd_direct is None]
        if buffered and io_mode == "auto":
            log.warning("%s: %d of %d shards not readable with O_DIRECT (%s: %s); reading their experts with "
                        "pread + POSIX_FADV_DONTNEED", self.root, len(buffered), len(files), buffered[0].path.name,
                        buffered[0].why_not_direct)
        self.scratch_elements = 1  # copies need no decoder scratch

    def missing(self, key) -> None:
        stack, layer, expert = key
        s = f"{stack} " if stack else ""
        raise InputError(f"{self.root}: checkpoint has no weights for {s}layer {layer} expert {expert}")

    def read(self, ext: DirExtent, buf: Buffer, lo: int, n: int, what: str) -> int:
        """Read-buffer bytes [lo, lo + n) (``lo`` aligned): the parts of the spans they cover."""
        got = 0
        for sp in ext.spans:
            s, e = max(lo, sp.at), min(lo + n, sp.at + sp.length)
            if s >= e:
                continue
            rel = s - sp.at
            need = min(e - s, sp.avail - rel)
            if need > 0:
                got += self.reader.read(self._file_of[sp.shard], buf, sp.file + rel, need, s, what)
        return got

    def chunks(self, ext: DirExtent, view, start: Tier) -> tuple[list, list[int]]:
        refs, ends = [], []
        for p in ext.parts:
            for lo in range(0, p.nbytes, COPY_PIECE):
                n = min(COPY_PIECE, p.nbytes - lo)
                refs.append(ChunkRef(KIND_RAW, None, view(p.at + lo, n), None, n, 0, None, p.out_offset + lo,
                                     f"tensor {p.tensor} ({ext.label}) bytes [{lo}, {lo + n})"))
                ends.append(p.at + lo + n if start == Tier.COLD else 0)
        return refs, ends

    def read_length(self, ext: DirExtent, start: Tier) -> int:
        return ext.read_bytes if start == Tier.COLD else 0

    def close(self) -> None:
        self.reader.close()

