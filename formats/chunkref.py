"""``ChunkRef``: one independently decodable piece of a tensor, and the checks every decoder applies.

Shared by the per-chunk path (``formats.decoder``) and the fused one (``formats.fused``), so both reject
the same refs with the same one-line errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from formats.codec import get_codec
from formats.errors import CodecError

__all__ = ["KIND_BF16_SPLIT", "KIND_RAW", "ChunkRef", "as_u8", "check_layout", "check_out", "check_ref", "ref_out_size"]

KIND_BF16_SPLIT = "bf16-split"
KIND_RAW = "raw"


@dataclass(frozen=True)
class ChunkRef:
    """One independently decodable piece of one tensor: a ``bf16-split`` chunk (entropy-coded exponent plane
    ``data`` + raw sign+mantissa plane ``sm``, ``n`` elements, ``2 * n`` output bytes; ``codec`` names the
    exponent codec) or a ``raw`` chunk (``n`` plain bytes), written at ``out_offset``; ``where`` names it
    in errors."""

    kind: str
    codec: str | None
    data: object
    sm: object | None
    n: int
    data_xxh3: int
    sm_xxh3: int | None
    out_offset: int
    where: str


def ref_out_size(ref: ChunkRef) -> int:
    """Bytes ``ref`` writes into the output: ``2 * n`` for bf16-split, ``n`` for raw."""
    if ref.kind == KIND_BF16_SPLIT:
        return 2 * int(ref.n)
    if ref.kind == KIND_RAW:
        return int(ref.n)
    raise CodecError(f"{ref.where}: unknown chunk kind {ref.kind!r}")


def check_ref(ref: ChunkRef) -> None:
    if not isinstance(ref, ChunkRef):
        raise CodecError(f"expected a ChunkRef, got {type(ref).__name__}")
    ref_out_size(ref)
    if int(ref.n) < 0 or int(ref.out_offset) < 0:
        raise CodecError(f"{ref.where}: negative size {ref.n} or output offset {ref.out_offset}")
    if ref.kind == KIND_BF16_SPLIT:
        get_codec(ref.codec)
        if ref.sm is None:
            raise CodecError(f"{ref.where}: bf16-split chunk without an sm plane")
    elif ref.codec is not None or ref.sm is not None:
        raise CodecError(f"{ref.where}: raw chunk must have codec=None and sm=None")


def check_out(out: np.ndarray) -> None:
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1 \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise CodecError("output buffer must be a writeable contiguous 1-D uint8 array")


def check_layout(refs: Sequence[ChunkRef], out: np.ndarray) -> None:
    """:class:`CodecError` unless every ref is well-formed, fits in ``out`` and no two overlap."""
    check_out(out)
    size = out.shape[0]
    spans = []
    for ref in refs:
        check_ref(ref)
        start = int(ref.out_offset)
        end = start + ref_out_size(ref)
        if end > size:
            raise CodecError(f"{ref.where}: output bytes [{start}, {end}) exceed the {size}-byte buffer")
        spans.append((start, end, ref.where))
    spans.sort(key=lambda s: (s[0], s[1]))
    prev = None
    for span in spans:
        if span[1] == span[0]:
            continue  # an empty chunk writes nothing
        if prev is not None and span[0] < prev[1]:
            raise CodecError(f"{span[2]}: output bytes [{span[0]}, {span[1]}) overlap "
                             f"{prev[2]} [{prev[0]}, {prev[1]})")
        prev = span


def as_u8(buf) -> np.ndarray:
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    if arr.dtype != np.uint8:
        arr = arr.view(np.uint8)
    return arr.reshape(-1)
