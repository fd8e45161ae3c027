"""Memory-mapped `.zmoe` reader (specs/zmoe.md). Returns views, never copies.

Thread safety: an open `Archive` is read-only; `view`, `part_refs` and `extent_refs` may be called
from any thread. Decoding goes through `formats.decoder.ParallelDecoder`, which the caller owns.
"""
from __future__ import annotations

import logging
import mmap
import os
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


class Archive:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = str(self.path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"{where}: cannot open ({e.strerror})") from None
        try:
            if os.path.isdir(self.path):
                raise FormatError(f"{where}: is a directory, not a .zmoe archive")
            size = os.fstat(fd).st_size
            head = os.pread(fd, PREAMBLE_SIZE, 0)
            self.preamble: Preamble = read_preamble(head, size, where)
            raw = os.pread(fd, self.preamble.index_length, PREAMBLE_SIZE)
            if xxh3(raw) != self.preamble.index_xxh3:
                raise FormatError(f"{where}: index checksum mismatch (index bytes at offset 64 are corrupt)")
            self.index: Index = parse_index(raw, version=self.preamble.version,
                                            data_offset=self.preamble.data_offset, file_length=size,
                                            where=where)
            self.index_bytes = raw
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._mv = memoryview(self._map)
        log.debug("opened %s: %d tensors, %d expert extents", where, len(self.index.tensors),
                  len(self.index.experts))

    # -- raw access -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.preamble.file_length

    def view(self, offset: int, length: int) -> memoryview:
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
        for f in self.index.files:
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

    def iter_part_bytes(self, tensor: str, decoder: ParallelDecoder) -> Iterator[np.ndarray]:
        """Yield the original bytes of an expert tensor, one expert part at a time, in order."""
        t = self.index.tensors[tensor]
        parts = [(e, p) for e in self.index.experts for p in e.parts if p.tensor == tensor]
        parts.sort(key=lambda ep: -1 if ep[1].slice is None else ep[1].slice)
        for _, p in parts:
            out = np.empty(p.nbytes, dtype=np.uint8)
            decoder.decode(self.part_refs(p), out)
            yield out
        if not parts and t.nbytes:
            raise FormatError(f"{self.path}: tensor {tensor} has no expert parts")

    def close(self) -> None:
        try:
            self._mv.release()
            self._map.close()
        except (BufferError, ValueError):  # a caller still holds a view; the map closes with it
            log.debug("archive %s still has exported views", self.path)

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
