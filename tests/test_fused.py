"""The fused decoder (formats/fused.py): byte-identical to the per-chunk path, the same errors, no overrun."""
from __future__ import annotations

import ctypes
import dataclasses

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats import fused, xxh3_native
from formats.codec import ChunkDecoder, checksum
from formats.decoder import ChunkRef, ParallelDecoder, decode_chunk, decode_chunks, encode_bf16_refs
from formats.errors import CodecError, CorruptDataError
from tests.test_codec_huf4x import _mutants

pytestmark = pytest.mark.skipif(not fused.available(), reason="no native xxh3 on this platform")


def bf16(n, std=0.02, seed=0):
    f = np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * np.float32(std)
    return (f.view(np.uint32) >> 16).astype(np.uint16)


def _raw(data: bytes, off: int) -> ChunkRef:
    return ChunkRef("raw", None, data, None, len(data), checksum(data), None, off, f"raw at {off}")


def _refs(codec="huf4x"):
    """Parts at even and odd offsets, a constant chunk, an empty one and a raw one."""
    a, b = bf16(50_001, seed=1), bf16(30_000, std=0.05, seed=2)
    refs = encode_bf16_refs(a, 8192, codec, out_offset=0, name="a")
    off = 2 * a.size + 3  # odd: the byte-wise merge
    refs += encode_bf16_refs(b, 4096, codec, out_offset=off, name="b")
    off += 2 * b.size
    refs += encode_bf16_refs(np.full(1000, 0x3F80, np.uint16), 4096, codec, out_offset=off, name="const")
    off += 2000
    refs += encode_bf16_refs(np.zeros(0, np.uint16), 4096, codec, out_offset=off, name="empty")
    raw = np.random.default_rng(3).integers(0, 256, 777, dtype=np.uint8).tobytes()
    refs.append(_raw(raw, off + 5))
    return refs, off + 5 + len(raw) + 3


def _reference(refs, size, out=None):
    out = np.zeros(size, np.uint8) if out is None else out
    dec = ChunkDecoder()
    for r in refs:
        decode_chunk(dec, r, out)
    return out


def test_fused_equals_the_per_chunk_path_byte_for_byte():
    refs, size = _refs()
    assert fused.describe(refs, np.zeros(size, np.uint8), True) is not None  # the fused kernel takes them
    background = np.random.default_rng(9).integers(0, 256, size, dtype=np.uint8)  # bytes no chunk writes stay
    want = _reference(refs, size, background.copy())
    got = background.copy()
    decode_chunks(ChunkDecoder(), refs, got)
    assert got.tobytes() == want.tobytes()
    want = _reference(refs, size)
    for threads in (1, 2):
        with ParallelDecoder(threads) as pd:
            out = np.zeros(size, np.uint8)
            pd.decode(refs, out)
            assert out.tobytes() == want.tobytes()
            out[:] = 0
            pd.decode_here(refs, out)
            assert out.tobytes() == want.tobytes()


def test_other_codecs_take_the_per_chunk_path():
    refs, size = _refs("zstd-lit")
    assert fused.describe(refs, np.zeros(size, np.uint8), True) is None
    out = np.zeros(size, np.uint8)
    decode_chunks(ChunkDecoder(), refs, out)
    assert out.tobytes() == _reference(refs, size).tobytes()


@pytest.mark.parametrize("what", ["data", "sm"])
def test_a_checksum_mismatch_raises_what_the_per_chunk_path_raises(what):
    refs, size = _refs()
    bad = bytearray(getattr(refs[2], what))
    bad[len(bad) // 2] ^= 0x10
    refs[2] = dataclasses.replace(refs[2], **{what: bytes(bad)})
    with pytest.raises(CorruptDataError) as per_chunk:
        _reference(refs, size)
    with pytest.raises(CorruptDataError) as fused_err:
        decode_chunks(ChunkDecoder(), refs, np.zeros(size, np.uint8))
    assert str(fused_err.value) == str(per_chunk.value) and "a chunk 2" in str(fused_err.value)


@pytest.mark.parametrize("case", list(_mutants()), ids=lambda c: c[0])
def test_the_kernel_itself_rejects_every_malformed_chunk(case):
    """Each malformed huf4x chunk (checksums recomputed, so only the header and stream checks stand
    between it and the output) is rejected by the compiled kernel, and the error is the per-chunk one."""
    _name, coded, n, needle = case
    sm = bytes(n)
    ref = ChunkRef("bf16-split", "huf4x", coded, sm, n, checksum(coded), checksum(sm), 0, "m chunk 0")
    out = np.zeros(2 * n, np.uint8)
    desc, sums, keep, nmax = fused.describe([ref], out, True)
    assert fused.decode_chunks(desc, sums, out, np.empty(max(nmax, 1), np.uint8), True) == 0
    with pytest.raises(CodecError, match=needle) as ei:
        decode_chunks(ChunkDecoder(), [ref], out)
    assert "m chunk 0: huf4x" in str(ei.value)


@settings(max_examples=200, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_chunks_agree_with_the_per_chunk_path(data):
    """Random edits of a good chunk: both paths accept with the same bytes, or both reject."""
    src = bf16(3000, seed=7)
    ref = encode_bf16_refs(src, 4096, "huf4x", name="f")[0]
    coded = bytearray(ref.data)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(coded) - 1))
        coded[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(coded)))
    coded = bytes(coded[:cut])
    ref = dataclasses.replace(ref, data=coded, data_xxh3=checksum(coded))
    want = np.zeros(2 * src.size + 8, np.uint8)
    try:
        decode_chunk(ChunkDecoder(), ref, want)
        ok = True
    except CodecError:
        ok = False
    got = np.zeros_like(want)
    desc, sums, keep, nmax = fused.describe([ref], got, True)
    bad = fused.decode_chunks(desc, sums, got, np.empty(nmax, np.uint8), True)
    assert (bad < 0) == ok
    if ok:
        assert got.tobytes() == want.tobytes()
    assert not got[2 * src.size:].any()  # nothing written past the chunk's output


def test_refs_the_per_chunk_path_rejects_up_front_are_left_to_it():
    refs, size = _refs()
    short = dataclasses.replace(refs[0], sm=refs[0].sm[:-1])
    assert fused.describe([short], np.zeros(size, np.uint8), True) is None
    with pytest.raises(CodecError, match="sm plane holds"):
        decode_chunks(ChunkDecoder(), [short], np.zeros(size, np.uint8))
    assert fused.describe(refs, np.zeros(size - 4, np.uint8), True) is None  # the last ref does not fit
    no_sum = dataclasses.replace(refs[0], data_xxh3=None)
    assert fused.describe([no_sum], np.zeros(size, np.uint8), True) is None
    assert fused.describe([no_sum], np.zeros(size, np.uint8), False) is not None  # not verifying: fine


def test_hash_many_is_xxh3_of_each_span():
    buf = np.random.default_rng(5).integers(0, 256, 100_000, dtype=np.uint8)
    spans = [(0, 0), (1, 3), (7, 240), (100, 65_536), (99_000, 1000)]
    got = fused.hash_many(buf, spans)
    assert [int(g) for g in got] == [xxhash.xxh3_64_intdigest(buf[a:a + n]) for a, n in spans]
    with pytest.raises(ValueError, match="outside"):
        fused.hash_many(buf, [(99_999, 2)])


def test_the_native_xxh3_is_probed_and_can_be_switched_off(monkeypatch):
    assert xxh3_native.address() != 0
    wrong = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t)(lambda p, n: 0)
    assert not xxh3_native._probe(wrong)
    monkeypatch.setenv("ZIPMOE_NATIVE_XXH3", "0")
    xxh3_native.reset()
    try:
        assert xxh3_native.address() == 0 and not fused.available(True) and fused.available(False)
        assert fused.hash_many(np.zeros(8, np.uint8), [(0, 8)]) is None
        refs, size = _refs()
        out = np.zeros(size, np.uint8)
        decode_chunks(ChunkDecoder(), refs, out)  # the per-chunk path
        assert out.tobytes() == _reference(refs, size).tobytes()
    finally:
        monkeypatch.delenv("ZIPMOE_NATIVE_XXH3")
        xxh3_native.reset()
    assert xxh3_native.address() != 0
