"""Test helpers that build hostile archives: raw index bytes with valid checksums, and a copy of an
archive with room after the index (every absolute offset shifted) so that large mutations fit."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from formats.preamble import PREAMBLE_SIZE, Preamble, align, xxh3

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "formats" / "golden" / "tiny.zmoe"


def split(buf: bytes) -> tuple[dict, int]:
    """(index document, data_offset) of an archive's bytes."""
    n, data_offset = struct.unpack_from("<QQ", buf, 24)
    return json.loads(bytes(buf[PREAMBLE_SIZE:PREAMBLE_SIZE + n])), data_offset


def with_index(buf: bytes, raw: bytes, data_offset: int | None = None) -> bytes:
    """`buf` with its index replaced by `raw` (any bytes) and the preamble fixed up, so the result
    passes every check before the index is parsed. Grows the index area (shifting the data, not the
    offsets the index names) when `raw` does not fit."""
    _, old = split(buf)
    new = max(data_offset or old, align(PREAMBLE_SIZE + len(raw)))
    out = bytearray(new) + bytes(buf[old:])
    out[PREAMBLE_SIZE:PREAMBLE_SIZE + len(raw)] = raw
    out[:PREAMBLE_SIZE] = Preamble(1, len(raw), new, len(out), xxh3(raw)).pack()
    return bytes(out)


def dumps(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def shift_offsets(doc: dict, by: int) -> None:
    """Add `by` to every absolute offset of the index (in place)."""
    for f in doc["files"]:
        for k in ("data", "header"):
            if k in f:
                f[k]["offset"] += by
    for t in doc["tensors"]:
        if "data" in t:
            t["data"]["offset"] += by
    for e in doc["experts"]:
        e["offset"] += by
        for p in e["parts"]:
            for c in p.get("exp_chunks", []):
                c[0] += by
            for k in ("sm", "data"):
                if k in p:
                    p[k]["offset"] += by


def roomy(buf: bytes, room: int) -> bytes:
    """The same archive with `room` more bytes (a multiple of 4096) between index and data."""
    doc, old = split(buf)
    shift_offsets(doc, room)
    raw = dumps(doc)
    return with_index(buf, raw, old + room)


def fused_source(d: Path) -> Path:
    """A tiny checkpoint whose experts are one fused BF16 tensor of 3 experts and a per-expert F8 one."""
    from tests.stfile import write_config, write_st

    d.mkdir(parents=True, exist_ok=True)
    write_config(d)
    words = bytes((i * 37 + 11) % 256 for i in range(3 * 8 * 16 * 2))
    write_st(d / "model.safetensors", [
        ("lm_head.weight", "F16", [3], b"\x01\x02" * 3),
        ("model.layers.0.mlp.experts.down_proj", "BF16", [3, 8, 16], words),
        ("model.layers.1.mlp.experts.0.up_proj.weight", "F8_E4M3", [2, 3], bytes(range(6))),
    ])
    return d
