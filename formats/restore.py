"""Verify an archive end to end, and rewrite the original files byte for byte.

Both walk the same stream: for every file of the index, its bytes in order (blob; or safetensors
header followed by each tensor, expert tensors decoded part by part). `verify` hashes the stream and
checks every padding byte; `unpack` also writes it, into a temporary folder renamed at the end.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formats.decoder import ParallelDecoder
from formats.errors import CorruptDataError, InputError, ZmoeError
from formats.index import FileEntry, Region
from formats.preamble import PREAMBLE_SIZE, xxh3
from formats.reader import Archive

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class VerifyReport:
    files: int = 0
    tensors: int = 0
    extents: int = 0
    bytes_checked: int = 0
    source_checked: list[str] = field(default_factory=list)


def _check_pieces(ar: Archive, r: Region, hashes, what: str) -> memoryview:
    v = ar.region(r)
    R = ar.index.raw_chunk_bytes
    for i, h in enumerate(hashes):
        if xxh3(v[i * R:(i + 1) * R]) != h:
            raise CorruptDataError(f"{ar.path}: {what} piece {i} at offset {r.offset + i * R} fails its checksum")
    return v


def _tensor_stream(ar: Archive, name: str, dec: ParallelDecoder) -> Iterator[memoryview | np.ndarray]:
    t = ar.index.tensors[name]
    if t.role == "dense":
        v = _check_pieces(ar, t.data, t.xxh3, f"tensor {name}")
        if hashlib.sha256(v).hexdigest() != t.sha256:
            raise CorruptDataError(f"{ar.path}: tensor {name} at offset {t.data.offset} has bytes whose SHA-256 "
                                   f"differs from the recorded one")
        yield v
        return
    h = hashlib.sha256()
    for buf in ar.iter_part_bytes(name, dec):
        h.update(buf)
        yield buf
    if h.hexdigest() != t.sha256:
        raise CorruptDataError(f"{ar.path}: tensor {name} decodes to bytes whose SHA-256 differs from the original")


def file_stream(ar: Archive, f: FileEntry, dec: ParallelDecoder) -> Iterator[memoryview | np.ndarray]:
    """The original bytes of one file, in order, every checksum checked on the way."""
    if f.kind == "blob":
        v = ar.region(f.data)
        if xxh3(v) != f.xxh3:
            raise CorruptDataError(f"{ar.path}: file {f.path} at offset {f.data.offset} fails its checksum")
        yield v
        return
    v = ar.region(f.header)
    if xxh3(v) != f.header_xxh3:
        raise CorruptDataError(f"{ar.path}: safetensors header of {f.path} at offset {f.header.offset} "
                               f"fails its checksum")
    yield v
    for name in f.tensors:
        yield from _tensor_stream(ar, name, dec)


def check_padding(ar: Archive) -> None:
    """Every byte outside the preamble, the index and the regions must be zero."""
    idx = ar.index
    regions = [(0, PREAMBLE_SIZE + ar.preamble.index_length)]
    for f in idx.files:
        regions += [(r.offset, r.end) for r in (f.data, f.header) if r is not None]
    regions += [(t.data.offset, t.data.end) for t in idx.tensors.values() if t.data is not None]
    for e in idx.experts:
        for p in e.parts:
            regions += [(c.offset, c.offset + c.length) for c in p.exp_chunks]
            regions += [(r.offset, r.end) for r in (p.sm, p.data) if r is not None]
    regions.sort()
    pos = 0
    for lo, hi in regions + [(ar.size, ar.size)]:
        if lo > pos:
            gap = np.frombuffer(ar.view(pos, lo - pos), dtype=np.uint8)
            nz = np.flatnonzero(gap)
            if nz.size:
                raise CorruptDataError(f"{ar.path}: padding byte at offset {pos + int(nz[0])} is not zero")
        pos = max(pos, hi)


def verify(ar: Archive, dec: ParallelDecoder, source: str | os.PathLike | None = None,
           progress: Progress | None = None) -> VerifyReport:
    rep = VerifyReport()
    check_padding(ar)
    total = sum(f.size for f in ar.index.files)
    for f in ar.index.files:
        h = hashlib.sha256()
        for buf in file_stream(ar, f, dec):
            h.update(buf)
            rep.bytes_checked += len(memoryview(buf).cast("B"))
            if progress:
                progress(rep.bytes_checked, total)
        if h.hexdigest() != f.sha256:
            raise CorruptDataError(f"{ar.path}: file {f.path} restores to bytes whose SHA-256 differs from the original")
        rep.files += 1
        rep.tensors += len(f.tensors)
    rep.extents = len(ar.index.experts)
    if source is not None:
        rep.source_checked = compare_source(ar, Path(source))
    return rep


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def compare_source(ar: Archive, src: Path) -> list[str]:
    """Every file recorded in the archive exists in `src` with the same SHA-256, and vice versa."""
    if not src.is_dir():
        raise InputError(f"{src}: source is not a directory")
    recorded = {f.path: f for f in ar.index.files}
    present = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()
               and not any(part in (".git", ".cache", "__pycache__") for part in p.relative_to(src).parts)}
    for extra in sorted(present - recorded.keys()):
        raise CorruptDataError(f"{src / extra}: present in the source but not in the archive")
    for path, f in recorded.items():
        p = src / path
        if not p.is_file():
            raise CorruptDataError(f"{p}: recorded in the archive but missing from the source")
        if _sha256_file(p) != f.sha256:
            raise CorruptDataError(f"{p}: SHA-256 differs from the archive's record of it")
    return sorted(recorded)


def unpack(ar: Archive, dec: ParallelDecoder, dest: str | os.PathLike,
           progress: Progress | None = None) -> list[str]:
    """Rewrite every original file under `dest` (which must not exist, or be empty). Atomic."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest}: destination exists and is not an empty folder")
    parent = dest.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"{dest}: parent folder {parent} is missing or not writable")
    tmp = parent / f".{dest.name}.tmp-{os.getpid()}"
    done, total = 0, sum(f.size for f in ar.index.files)
    try:
        tmp.mkdir()
        root = tmp.resolve()
        for f in ar.index.files:
            p = tmp / f.path  # index paths are relative and without '..' (index_parse.check_path)
            if not p.resolve().is_relative_to(root):
                raise InputError(f"{ar.path}: file path {f.path!r} leads outside the destination")
            p.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with open(p, "wb") as fh:
                for buf in file_stream(ar, f, dec):
                    fh.write(buf)
                    h.update(buf)
                    done += len(memoryview(buf).cast("B"))
                    if progress:
                        progress(done, total)
                fh.flush()
                os.fsync(fh.fileno())
            if h.hexdigest() != f.sha256:
                raise CorruptDataError(f"{ar.path}: file {f.path} restores to bytes whose SHA-256 differs")
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except OSError as e:
        raise InputError(f"{dest}: cannot write ({e.strerror})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return [f.path for f in ar.index.files]


__all__ = ["verify", "unpack", "check_padding", "compare_source", "file_stream", "VerifyReport", "ZmoeError"]
