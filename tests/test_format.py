"""Format-level tests: round trips (including a Hypothesis property), hostile archives, fuzzing."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.decoder import ParallelDecoder
from formats.errors import CorruptDataError, FormatError, UnsupportedVersionError, ZmoeError
from formats.reader import Archive
from formats.restore import unpack, verify
from tests.stfile import read_index, rewrite_index, write_config, write_st
from zipmoe_pack.pack import PackOptions, pack

E_NAME = "model.layers.{L}.mlp.experts.{E}.{P}.weight"


def bf16_bytes(rng: np.random.Generator, n: int, std: float = 0.02) -> bytes:
    f = (rng.standard_normal(n) * std).astype(np.float32)
    return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def make_tiny(d: Path, seed: int = 0, layers: int = 2, experts: int = 3, shards: int = 2) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_config(d, num_experts=experts)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    tensors = [("model.embed_tokens.weight", "BF16", [32, 16], bf16_bytes(rng, 512))]
    for L in range(layers):
        tensors.append((f"model.layers.{L}.mlp.gate.weight", "F32", [experts, 16],
                        rng.standard_normal(experts * 16).astype(np.float32).tobytes()))
        for E in range(experts):
            for P, shape in (("gate_proj", [24, 16]), ("up_proj", [24, 16]), ("down_proj", [16, 24])):
                tensors.append((E_NAME.format(L=L, E=E, P=P), "BF16", shape, bf16_bytes(rng, 384)))
    per = -(-len(tensors) // shards)
    wm = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = tensors[s * per:(s + 1) * per]
        write_st(d / name, part, metadata={"format": "pt"})
        wm.update({t[0]: name for t in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=2))
    return d


def sha_tree(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    src = make_tiny(root / "src")
    out = root / "tiny.zmoe"
    pack(src, out, PackOptions(threads=2, chunk_elements=4096))
    return src, out


def test_roundtrip_bytes(tiny, tmp_path):
    src, arc = tiny
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        verify(ar, dec, source=src)
        unpack(ar, dec, tmp_path / "out")
    assert sha_tree(tmp_path / "out") == sha_tree(src)


def test_deterministic_over_threads(tiny, tmp_path):
    src, arc = tiny
    other = tmp_path / "again.zmoe"
    pack(src, other, PackOptions(threads=1, chunk_elements=4096))
    assert other.read_bytes() == arc.read_bytes()


def test_index_matches_schema(tiny):
    jsonschema = pytest.importorskip("jsonschema")
    doc, _ = read_index(tiny[1])
    schema = json.loads((Path(__file__).parents[1] / "formats" / "zmoe-index.schema.json").read_text())
    jsonschema.validate(doc, schema)


def _flip(path: Path, offset: int, out: Path) -> Path:
    buf = bytearray(path.read_bytes())
    buf[offset] ^= 0x40
    out.write_bytes(bytes(buf))
    return out


def _check(path: Path) -> None:
    with Archive(path) as ar, ParallelDecoder(1) as dec:
        verify(ar, dec)


def test_every_region_kind_detects_a_flipped_byte(tiny, tmp_path):
    _, arc = tiny
    doc, buf = read_index(arc)
    ext = doc["experts"][1]
    part = ext["parts"][0]
    targets = {
        "magic": 0, "version": 8, "index length": 24, "preamble checksum": 60, "index": 64 + 10,
        "index padding": 64 + len(json.dumps(doc, separators=(",", ":"))) + 3,
        "blob": doc["files"][0].get("data", doc["files"][0].get("header"))["offset"],
        "dense": doc["tensors"][0]["data"]["offset"] + 5,
        "exponent chunk": part["exp_chunks"][0][0] + 1,
        "sign+mantissa": part["sm"]["offset"] + 7,
        "padding between extents": ext["offset"] + ext["length"] + 1,
        "end": len(buf) - 1,
    }
    for what, off in targets.items():
        bad = _flip(arc, off, tmp_path / f"bad-{off}.zmoe")
        with pytest.raises(ZmoeError) as ei:
            _check(bad)
        assert "\n" not in str(ei.value), what


def test_fuzz_single_byte_flips_always_caught(tiny, tmp_path):
    _, arc = tiny
    size = arc.stat().st_size
    rng = random.Random(1234)
    for off in rng.sample(range(size), 60):
        bad = _flip(arc, off, tmp_path / "fuzz.zmoe")
        with pytest.raises(ZmoeError):
            _check(bad)


def test_truncated_and_extended(tiny, tmp_path):
    _, arc = tiny
    data = arc.read_bytes()
    for n in (0, 10, 63, 64, 200, len(data) // 2, len(data) - 1):
        p = tmp_path / f"trunc{n}.zmoe"
        p.write_bytes(data[:n])
        with pytest.raises(FormatError):
            Archive(p)
    p = tmp_path / "longer.zmoe"
    p.write_bytes(data + b"\0")
    with pytest.raises(FormatError, match="truncated or extended"):
        Archive(p)


def test_oversized_index_length(tiny, tmp_path):
    from formats.preamble import Preamble
    _, arc = tiny
    buf = bytearray(arc.read_bytes())
    for n in (len(buf), 1 << 40):
        buf[:64] = Preamble(1, n, 4096, len(buf), 0).pack()
        p = tmp_path / "big.zmoe"
        p.write_bytes(bytes(buf))
        with pytest.raises(FormatError, match="index length"):
            Archive(p)


def test_newer_version_rejected(tiny, tmp_path):
    doc, _ = read_index(tiny[1])
    p = rewrite_index(tiny[1], doc, tmp_path / "v2.zmoe", version=2)
    with pytest.raises(UnsupportedVersionError, match="version 2 is newer"):
        Archive(p)


def _mutated(tiny, tmp_path, fn) -> Path:
    doc, _ = read_index(tiny[1])
    fn(doc)
    return rewrite_index(tiny[1], doc, tmp_path / "mut.zmoe")


@pytest.mark.parametrize("case, mutate, message", [
    ("overlapping chunk", lambda d: d["experts"][0]["parts"][1]["exp_chunks"][0].__setitem__(
        0, d["experts"][0]["parts"][0]["exp_chunks"][0][0]), "overlaps"),
    ("chunk out of range", lambda d: d["experts"][0]["parts"][0]["exp_chunks"][0].__setitem__(0, 1 << 40),
     "outside"),
    ("duplicate tensor", lambda d: d["tensors"].append(d["tensors"][0]), "duplicate tensor"),
    ("duplicate expert", lambda d: d["experts"].append(d["experts"][0]), "duplicate expert"),
    ("raw length vs shape", lambda d: d["tensors"][0].__setitem__("shape", [7, 16]), "disagrees"),
    ("unknown codec", lambda d: d["experts"][0]["parts"][0].__setitem__("codec", "brotli-9"), "unknown codec"),
    ("unknown encoding", lambda d: d["experts"][0]["parts"][0].__setitem__("encoding", "fp4"), "unknown encoding"),
    ("sm length", lambda d: d["experts"][0]["parts"][0]["sm"].__setitem__("length", 3), r"sign\+mantissa"),
    ("missing field", lambda d: d["experts"][0].pop("exp_length"), "missing field"),
    ("path escape", lambda d: d["files"][0].__setitem__("path", "../etc/passwd"), "path must be relative"),
    ("bad hash", lambda d: d["tensors"][0].__setitem__("sha256", "xyz"), "bad hash"),
])
def test_hostile_index(tiny, tmp_path, case, mutate, message):
    p = _mutated(tiny, tmp_path, mutate)
    with pytest.raises(FormatError, match=message) as ei:
        Archive(p)
    assert "\n" not in str(ei.value)


def test_corrupt_chunk_named_by_tensor(tiny, tmp_path):
    doc, _ = read_index(tiny[1])
    part = doc["experts"][2]["parts"][1]
    bad = _flip(tiny[1], part["exp_chunks"][0][0] + 2, tmp_path / "c.zmoe")
    with pytest.raises(CorruptDataError, match=part["tensor"].replace(".", r"\.")):
        _check(bad)


# -- property: any tensors, any chunking, round trip is byte-identical ---------------------------

SPECIALS = np.array([0x0000, 0x8000, 0x0001, 0x807F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x3F80], np.uint16)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(0, 70), st.integers(1, 90)), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1), special_frac=st.floats(0, 1), fused=st.booleans())
def test_property_roundtrip(tmp_path_factory, shapes, seed, special_frac, fused):
    """Random bit patterns (specials mixed in), random shapes (odd chunk tails, empty tensors)."""
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp("prop")
    d = root / "src"  # the archive and the unpacked copy live beside the source, not inside it
    d.mkdir()
    write_config(d)
    tensors = [("lm_head.weight", "F16", [3], b"\x01\x02" * 3)]
    for i, (r, c) in enumerate(shapes):
        vals = rng.integers(0, 1 << 16, r * c, dtype=np.uint16)
        mask = rng.random(r * c) < special_frac
        vals[mask] = rng.choice(SPECIALS, int(mask.sum()))
        raw = vals.tobytes()
        if fused:
            tensors.append((f"model.layers.{i}.mlp.experts.down_proj", "BF16", [1, r, c], raw))
        else:
            tensors.append((E_NAME.format(L=0, E=i, P="up_proj"), "BF16", [r, c], raw))
    write_st(d / "model.safetensors", tensors)
    arc = root / "a.zmoe"
    pack(d, arc, PackOptions(threads=2, chunk_elements=4096))
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        verify(ar, dec)
        unpack(ar, dec, root / "out")
    assert (root / "out" / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
