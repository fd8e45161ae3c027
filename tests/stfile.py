"""Test helpers: write safetensors files byte by byte (so tests control order, padding and lies),
and rewrite an archive's index with fresh checksums (so hostile-index tests reach semantic checks)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from formats.preamble import PREAMBLE_SIZE, Preamble, align, xxh3


def write_st(path: Path, tensors: list[tuple[str, str, list[int], bytes]], metadata: dict | None = None) -> None:
    """tensors: (name, dtype, shape, raw bytes), written in this order."""
    header, off = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for *_, data in tensors:
            f.write(data)


def write_config(d: Path, model_type: str = "qwen2_moe", **extra) -> None:
    (d / "config.json").write_text(json.dumps({"model_type": model_type, **extra}))


def read_index(path: Path) -> tuple[dict, bytearray]:
    buf = bytearray(Path(path).read_bytes())
    (n,) = struct.unpack_from("<Q", buf, 24)
    return json.loads(bytes(buf[PREAMBLE_SIZE:PREAMBLE_SIZE + n])), buf


def rewrite_index(path: Path, doc: dict, out: Path | None = None, version: int | None = None) -> Path:
    """Write `doc` as the index of the archive at `path` (data unchanged), with valid checksums."""
    _, buf = read_index(path)
    (data_offset,) = struct.unpack_from("<Q", buf, 32)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    assert align(PREAMBLE_SIZE + len(raw)) <= data_offset, "mutated index does not fit"
    pre = Preamble(version or doc.get("version", 1), len(raw), data_offset, len(buf), xxh3(raw)).pack()
    buf[:PREAMBLE_SIZE] = pre
    buf[PREAMBLE_SIZE:data_offset] = raw + b"\0" * (data_offset - PREAMBLE_SIZE - len(raw))
    out = out or path
    Path(out).write_bytes(bytes(buf))
    return Path(out)
