"""The archive index as typed, immutable entries (specs/zmoe.md section 3).

`formats.index_parse.parse_index` builds them from the index JSON and trusts nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from formats.errors import FormatError

STACKS = (None, "encoder", "decoder")
ALIGNMENT_V1 = 4096
OUT_ALIGN = 64  # parts of a decoded expert buffer start at multiples of this


@dataclass(frozen=True)
class Region:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class FileEntry:
    path: str
    kind: str  # "blob" | "safetensors"
    size: int
    sha256: str
    data: Region | None = None  # blob bytes
    xxh3: int | None = None
    header: Region | None = None  # safetensors: length prefix + JSON header, verbatim
    header_xxh3: int | None = None
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str
    role: str  # "dense" | "expert"
    data: Region | None = None  # dense only
    xxh3: tuple[int, ...] = ()
    stack: str | None = None  # expert only
    layer: int | None = None
    proj: str | None = None
    fused: bool = False


@dataclass(frozen=True)
class ExpChunk:
    offset: int
    length: int
    xxh3: int


@dataclass(frozen=True)
class Part:
    tensor: str
    slice: int | None
    proj: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    out_offset: int
    encoding: str  # "bf16-split" | "raw"
    codec: str | None
    exp_chunks: tuple[ExpChunk, ...] = ()
    sm: Region | None = None
    sm_xxh3: tuple[int, ...] = ()
    data: Region | None = None
    data_xxh3: tuple[int, ...] = ()


@dataclass(frozen=True)
class Extent:
    stack: str | None
    layer: int
    expert: int
    offset: int
    exp_length: int
    length: int
    parts: tuple[Part, ...]

    @property
    def key(self) -> tuple[str | None, int, int]:
        return (self.stack, self.layer, self.expert)

    @property
    def decoded_nbytes(self) -> int:
        last = self.parts[-1] if self.parts else None
        return last.out_offset + last.nbytes if last else 0

    @property
    def label(self) -> str:
        s = f"{self.stack}." if self.stack else ""
        return f"expert {s}layer {self.layer} expert {self.expert}"


@dataclass(frozen=True)
class Index:
    version: int
    alignment: int
    chunk_elements: int
    raw_chunk_bytes: int
    codecs: dict
    model: dict
    created_by: str
    files: tuple[FileEntry, ...]
    tensors: dict[str, TensorEntry]
    experts: tuple[Extent, ...]
    stats: dict
    by_key: dict = field(repr=False, default_factory=dict)

    def extent(self, layer: int, expert: int, stack: str | None = None) -> Extent:
        try:
            return self.by_key[(stack, layer, expert)]
        except KeyError:
            s = f"{stack}." if stack else ""
            raise FormatError(f"archive has no expert {s}layer {layer} expert {expert}") from None

