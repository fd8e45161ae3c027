#!/usr/bin/env python3
"""Regenerate the golden vectors in formats/golden/ (specs/zmoe.md).

    python scripts/make_golden.py            # rewrite formats/golden/
    python scripts/make_golden.py --check    # exit 1 if regeneration would change a byte

The source checkpoint is built from a fixed integer recurrence (no RNG library whose stream could
change), so the same bytes come out everywhere; only a different libzstd could code differently,
which is why tiny.json records the zstd version the archive was made with. The same source packed
with the ``huf4x`` codec gives tiny-huf4x.zmoe / tiny-huf4x.json (decoding to the same
tiny-decoded.bin); that codec depends on no library, so its archive must reproduce everywhere.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOLDEN = ROOT / "formats" / "golden"
CHUNK = 4096
CODECS = ("zstd-lit", "huf4x")  # zstd-lit (the default) keeps the original names


def prefix(codec: str) -> str:
    return "tiny" if codec == "zstd-lit" else f"tiny-{codec}"


def _lcg_u16(seed: int, n: int, lo: int, hi: int) -> bytes:
    """n BF16 words with exponent in [lo, hi] and pseudo-random sign/mantissa (LCG, fixed)."""
    out, x = bytearray(), seed
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        r = x >> 33
        exp = lo + (r % (hi - lo + 1))
        out += struct.pack("<H", ((r >> 8) & 1) << 15 | exp << 7 | (r >> 9) & 0x7F)
    return bytes(out)


def _st(path: Path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(t[3] for t in tensors))


def build_source(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 2}, indent=2) + "\n")
    every = b"".join(struct.pack("<H", u) for u in range(0, 1 << 16, 13))  # signed zeros, inf, NaN, subnormals
    tensors = [
        ("model.embed_tokens.weight", "BF16", [4, 8], _lcg_u16(1, 32, 110, 125)),
        ("model.layers.0.mlp.gate.weight", "F32", [2, 8], struct.pack("<16f", *[i / 8 for i in range(16)])),
        ("model.layers.0.mlp.experts.0.up_proj.weight", "BF16", [100, 50], _lcg_u16(2, 5000, 112, 124)),
        ("model.layers.0.mlp.experts.0.down_proj.weight", "BF16", [len(every) // 2], every),
        ("model.layers.0.mlp.experts.1.up_proj.weight", "F8_E4M3", [3, 5], bytes(range(15))),
        ("model.layers.0.mlp.experts.1.down_proj.weight", "BF16", [1, 1], b"\x80\x3f"),
    ]
    _st(d / "model.safetensors", tensors)
    return d


def make(out_dir: Path, codec: str = "zstd-lit") -> dict:
    import zstandard

    from formats.decoder import ParallelDecoder
    from formats.reader import Archive
    from formats.restore import file_stream
    from zipmoe_pack.pack import PackOptions, pack

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = build_source(Path(tmp) / "src")
        arc = out_dir / f"{prefix(codec)}.zmoe"
        pack(src, arc, PackOptions(threads=1, chunk_elements=CHUNK, codec=codec))
        decoded, table = bytearray(), []
        with Archive(arc) as ar, ParallelDecoder(1) as dec:
            for f in ar.index.files:
                data = b"".join(bytes(memoryview(b).cast("B")) for b in file_stream(ar, f, dec))
                table.append({"path": f.path, "offset": len(decoded), "length": len(data),
                              "sha256": hashlib.sha256(data).hexdigest()})
                decoded += data
        (out_dir / "tiny-decoded.bin").write_bytes(bytes(decoded))
        meta = {"archive": arc.name, "decoded": "tiny-decoded.bin", "chunk_elements": CHUNK}
        if codec != "zstd-lit":
            meta["codec"] = codec
        else:
            meta["zstd_version"] = zstandard.ZSTD_VERSION
        meta.update({"files": table, "archive_sha256": hashlib.sha256(arc.read_bytes()).hexdigest()})
        (out_dir / f"{prefix(codec)}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _lcg_bytes(seed: int, n: int, mod: int) -> bytes:
    out, x = bytearray(), seed
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((x >> 33) % mod)
    return bytes(out)


def chunk_vectors() -> dict:
    """huf4x-chunks.json: exponent chunks and their exact huf4x coding (specs/zmoe.md 3.3.1)."""
    from formats.codec import ChunkEncoder

    words = [int.from_bytes(_lcg_bytes(7 + i, 6, 256), "little") | 1 << 47 for i in range(3000)]
    skewed = bytes(100 + ((w & -w).bit_length() - 1) for w in words)  # geometric: P(k) ~ 2^-(k+1)
    cases = {
        "empty": b"",
        "one element": b"\x77",
        "constant": b"\x7a" * 1000,
        "two symbols, 33 elements": bytes(120 + (b & 1) for b in _lcg_bytes(3, 33, 256)),
        "12 values 113..124, 5000 elements": bytes(113 + min(b, 11) for b in _lcg_bytes(5, 5000, 13)),
        "all 256 values": _lcg_bytes(11, 2048, 256),
        "skewed, codes limited to 11 bits": skewed,
    }
    enc = ChunkEncoder("huf4x")
    return {"codec": "huf4x", "chunks": [{"name": k, "n": len(v), "exponents": v.hex(), "coded": enc.encode(
        np.frombuffer(v, np.uint8)).hex()} for k, v in cases.items()]}


def write_chunk_vectors(out_dir: Path) -> None:
    (out_dir / "huf4x-chunks.json").write_text(json.dumps(chunk_vectors(), indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed vectors instead of writing")
    args = ap.parse_args()
    if not args.check:
        for codec in CODECS:
            make(GOLDEN, codec)
        write_chunk_vectors(GOLDEN)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        diff = []
        for codec in CODECS:
            make(Path(tmp), codec)
            diff += [n for n in (f"{prefix(codec)}.zmoe", "tiny-decoded.bin", f"{prefix(codec)}.json")
                     if (Path(tmp) / n).read_bytes() != (GOLDEN / n).read_bytes()]
        write_chunk_vectors(Path(tmp))
        if (Path(tmp) / "huf4x-chunks.json").read_bytes() != (GOLDEN / "huf4x-chunks.json").read_bytes():
            diff.append("huf4x-chunks.json")
    if diff:
        print(f"golden vectors differ: {', '.join(diff)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
