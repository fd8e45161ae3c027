"""Where an expert's bytes come from: the store's one dependency on the storage format.

The store asks an ``ExpertBytes`` for four things, and nothing else:

* ``extents``: key (stack, layer, expert) -> the extent (``formats.index.Extent``: ``offset``,
  ``length``, ``exp_length``, ``decoded_nbytes``, ``parts``, ``label``); ``missing(key)`` raises the
  one-line error naming an expert that has none;
* ``read(ext, buf, lo, n, what)``: bytes [lo, lo + n) of the extent into ``buf`` at ``lo``
  (aligned, honest I/O), returning how many were transferred;
* ``chunks(ext, view, start)``: the decoder's chunk references for the whole expert and, for each,
  how many extent bytes must be in memory before it can be decoded when the fetch starts from tier
  ``start``; ``read_length(ext, start)``: how many extent bytes such a fetch reads;
* ``scratch_elements``: the largest chunk a decode works on (sizes the decoder scratch);

and reports its ``reader`` (an ``io.ExpertReader``: mode, throttle; closed by ``close``).

``ArchiveBytes`` serves a ``.zmoe`` archive (coded exponent chunks + sign/mantissa planes, or raw
parts of a ``--raw`` archive). A source of raw bytes (the original safetensors shards of a
checkpoint folder) implements the same with raw parts only (``ExpertStore(source=...)``): its
experts then offer FULL and COLD alone (``tiers.info_from_extent``), and nothing else in the store
changes.
"""
from __future__ import annotations

from typing import Protocol

from zipmoe_run.tiers import Tier

from .io import ExpertReader

__all__ = ["ExpertBytes", "ArchiveBytes", "ref_ends"]


class ExpertBytes(Protocol):
    extents: dict
    scratch_elements: int
    reader: ExpertReader

    def missing(self, key) -> None: ...

    def read(self, ext, buf, lo: int, n: int, what: str) -> int: ...

    def chunks(self, ext, view, start: Tier) -> tuple[list, list[int]]: ...

    def read_length(self, ext, start: Tier) -> int: ...

    def close(self) -> None: ...


def ref_ends(ext, C: int, R: int, start: Tier) -> list[int]:
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


class ArchiveBytes:
    """The experts of one open ``formats.reader.Archive``, read with ``reader`` (an ``ExpertReader``)."""

    def __init__(self, archive, reader: ExpertReader):
        self.archive = archive
        self.reader = reader
        idx = archive.index
        self.extents = {e.key: e for e in idx.experts}
        # chunks never exceed a part
        self.scratch_elements = min(idx.chunk_elements,
                                    max((p.nbytes // 2 for e in idx.experts for p in e.parts), default=1))

    def missing(self, key) -> None:
        stack, layer, expert = key
        self.archive.index.extent(layer, expert, stack)  # raises a FormatError naming it

    def read(self, ext, buf, lo: int, n: int, what: str) -> int:
        return self.reader.read(buf, ext.offset + lo, n, what, at=lo)

    def chunks(self, ext, view, start: Tier) -> tuple[list, list[int]]:
        idx = self.archive.index
        return self.archive.extent_refs(ext, view=view), ref_ends(ext, idx.chunk_elements, idx.raw_chunk_bytes, start)

    def read_length(self, ext, start: Tier) -> int:
        return {Tier.COLD: ext.length, Tier.SM: ext.exp_length}.get(start, 0)

    def close(self) -> None:
        self.reader.close()
