"""Memory-mapped `.zmoe` reader (specs/zmoe.md). Returns views, never copies.

Thread safety: an open `Archive` is read-only; `view`, `part_refs` and `extent_refs` may be called
from any thread. Decoding goes through `formats.decoder.ParallelDecoder`, which the caller owns.

Lifetime: the file descriptor is closed as soon as the file is mapped; `close` (or leaving the
`with` block) releases the map. Views handed out earlier keep the mapped memory alive until they
are released themselves; the archive refuses further reads once closed.
"""
from __future__ import annotations

import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from formats.decoder import ChunkRef, ParallelDecoder
from formats.errors import FormatError
from formats.index import Extent, Index, Part, Region
from formats.index_parse import parse_index
from formats.preamble import PREAMBLE_SIZE, Preamble, read_preamble, xxh3

log = logging.getLogger(__name__)

View = Callable[[int, int], object]  # (absolute offset, length) -> buffer


def _open_regular(path: Path, where: str) -> tuple[int, int]:
    """Open `path` read-only without blocking and return (fd, size). Anything but a regular file
    (a symlink to one is fine) is refused, so a FIFO or a device never hangs the reader."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise FormatError(f"{where}: cannot open ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{where}: is a directory, not a .zmoe archive")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{where}: is not a regular file (a FIFO, socket or device), not a .zmoe archive")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FormatError(f"{where}: cannot open ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
        os.close(fd)
        raise FormatError(f"{where}: is not a regular file, not a .zmoe archive")
    return fd, st.st_size


class Archive:
    """An open archive: the checked preamble and index, and a read-only map of the whole file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = str(self.path)
        self._map: mmap.mmap | None = None
        self._mv: memoryview | None = None
        self._parts: dict[str, list[Part]] | None = None
        fd, size = _open_regular(self.path, where)
        try:
            head = os.pread(fd, PREAMBLE_SIZE, 0)
            self.preamble: Preamble = read_preamble(head, size, where)
            raw = os.pread(fd, self.preamble.index_length, PREAMBLE_SIZE)
            if len(raw) != self.preamble.index_length or xxh3(raw) != self.preamble.index_xxh3:
                raise FormatError(f"{where}: index checksum mismatch (index bytes at offset 64 are corrupt)")
            self.index: Index = parse_index(raw, version=self.preamble.version,
                                            data_offset=self.preamble.data_offset, file_length=size,
                                            where=where)
            self.index_bytes = raw
            try:
                self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise FormatError(f"{where}: cannot map the file ({getattr(e, 'strerror', None) or e})") from None
        except OSError as e:
            raise FormatError(f"{where}: cannot read ({e.strerror})") from None
        finally:
            os.close(fd)
        self._mv = memoryview(self._map)
        log.debug("opened %s: %d tensors, %d expert extents", where, len(self.index.tensors),
                  len(self.index.experts))

    # -- raw access -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.preamble.file_length

    @property
    def closed(self) -> bool:
        return self._mv is None

    def view(self, offset: int, length: int) -> memoryview:
        if self._mv is None:
            raise FormatError(f"{self.path}: archive is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(f"{self.path}: read [{offset}, {offset + length}) outside the file")
        return self._mv[offset:offset + length]

    def region(self, r: Region) -> memoryview:
        return self.view(r.offset, r.length)

    def dense_view(self, name: str) -> memoryview:
        """The stored bytes of a dense tensor, zero-copy (checksums are checked by `verify`)."""
        t = self.index.tensors.get(name)
        if t is None or t.role != "dense":
            raise FormatError(f"{self.path}: no dense tensor named {name}")
        return self.region(t.data)

    def file_bytes(self, path: str) -> bytes | None:
        for f in self.index.files:  # a handful of entries: a scan is fine
            if f.path == path and f.kind == "blob":
                data = bytes(self.region(f.data))
                if xxh3(data) != f.xxh3:
                    raise FormatError(f"{self.path}: file {path} at offset {f.data.offset} fails its checksum")
                return data
        return None

    # -- experts --------------------------------------------------------------------------------
    def extent(self, layer: int, expert: int, stack: str | None = None) -> Extent:
        return self.index.extent(layer, expert, stack)

    def part_refs(self, part: Part, out_offset: int = 0, view: View | None = None) -> list[ChunkRef]:
        return part_refs(part, self.index.chunk_elements, self.index.raw_chunk_bytes,
                         view or self.view, out_offset)

    def extent_refs(self, extent: Extent, view: View | None = None) -> list[ChunkRef]:
        """Chunk references that decode the whole extent into a buffer of `extent.decoded_nbytes`."""
        refs: list[ChunkRef] = []
        for p in extent.parts:
            refs += self.part_refs(p, p.out_offset, view)
        return refs

    def decode_extent(self, extent: Extent, decoder: ParallelDecoder, out: np.ndarray | None = None
                      ) -> np.ndarray:
        if out is None:
            out = np.empty(extent.decoded_nbytes, dtype=np.uint8)
        decoder.decode(self.extent_refs(extent), out)
        return out

    def tensor_parts(self, tensor: str) -> list[Part]:
        """The parts of an expert tensor in tensor order (the one part, or slices 0, 1, ...).

        The tensor -> parts table is built once, on first use, in one pass over the extents, so
        walking every tensor (verify, unpack) is linear in the index size."""
        if self._parts is None:
            table: dict[str, list[Part]] = {}
            for e in self.index.experts:
                for p in e.parts:
                    table.setdefault(p.tensor, []).append(p)
            for lst in table.values():
                lst.sort(key=lambda p: -1 if p.slice is None else p.slice)
            self._parts = table
        return self._parts.get(tensor, [])

    def iter_part_bytes(self, tensor: str, decoder: ParallelDecoder) -> Iterator[np.ndarray]:
        """Yield the original bytes of an expert tensor, one expert part at a time, in order."""
        t = self.index.tensors.get(tensor)
        if t is None or t.role != "expert":
            raise FormatError(f"{self.path}: no expert tensor named {tensor}")
        parts = self.tensor_parts(tensor)
        for p in parts:
            out = np.empty(p.nbytes, dtype=np.uint8)
            decoder.decode(self.part_refs(p), out)
            yield out
        if not parts and t.nbytes:
            raise FormatError(f"{self.path}: tensor {tensor} has no expert parts")

    def close(self) -> None:
        """Release the map (idempotent). Views still held elsewhere keep the mapped memory alive
        until they go; the archive itself refuses further reads."""
        mv, self._mv = self._mv, None
        m, self._map = self._map, None
        if mv is not None:
            mv.release()
        if m is not None:
            try:
                m.close()
            except BufferError:  # a caller still holds a view; the mapping goes with the last one
                log.debug("archive %s closed with views still alive", self.path)

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def part_refs(part: Part, C: int, R: int, view: View, out_offset: int = 0) -> list[ChunkRef]:
    """Chunk references of one part; `view(offset, length)` maps absolute file offsets to buffers."""
    refs = []
    if part.encoding == "raw":
        d = part.data
        for i, x in enumerate(part.data_xxh3):
            lo = i * R
            n = min(R, d.length - lo)
            refs.append(ChunkRef("raw", None, view(d.offset + lo, n), None, n, x, None, out_offset + lo,
                                 f"tensor {part.tensor} piece {i} at offset {d.offset + lo}"))
        return refs
    n_total = part.nbytes // 2
    for i, (c, sx) in enumerate(zip(part.exp_chunks, part.sm_xxh3)):
        lo = i * C
        n = min(C, n_total - lo)
        refs.append(ChunkRef("bf16-split", part.codec, view(c.offset, c.length), view(part.sm.offset + lo, n),
                             n, c.xxh3, sx, out_offset + 2 * lo,
                             f"tensor {part.tensor}" + (f" slice {part.slice}" if part.slice is not None else "")
                             + f" chunk {i} at offset {c.offset}"))
    return refs


def open_archive(path: str | os.PathLike) -> Archive:
    return Archive(path)


__all__ = ["Archive", "open_archive", "part_refs"]
