"""The ``huf4x`` exponent codec (formats/huf4x.py, specs/zmoe.md 3.3.1), chunk by chunk: bit-exact round
trips, strict rejection of corrupt chunks (one CodecError, no crash, no out-of-bounds access), the
spec's example. Archives: tests/test_codec_huf4x_archive.py."""
from __future__ import annotations

import ctypes
import heapq
import mmap
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats import huf4x
from formats.codec import CODECS, ChunkDecoder, ChunkEncoder, codec_params
from formats.decoder import ParallelDecoder, encode_bf16_refs
from formats.errors import CodecError
from zipmoe.bench.codec import make_dataset

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _exp(name: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name in ("gaussian", "student-t", "mixed"):
        return ((make_dataset(name, max(n, 1), seed)[:n] >> 7) & 0xFF).astype(np.uint8)
    if name == "constant":
        return np.full(n, 119, np.uint8)
    if name == "all256":
        return rng.permutation(np.arange(max(n, 256)) % 256)[:n].astype(np.uint8)
    if name == "two":
        return (rng.integers(0, 2, n) * 255).astype(np.uint8)
    if name == "geometric":  # counts ~ 2^-k over 40 symbols: unlimited Huffman would need 39-bit codes
        return np.minimum(rng.geometric(0.5, n) - 1, 39).astype(np.uint8) + 80
    raise AssertionError(name)


def _roundtrip(exp: np.ndarray) -> bytes:
    n = exp.shape[0]
    coded = ChunkEncoder("huf4x").encode(exp)
    out = np.full(n + 24, 0xA5, np.uint8)
    ChunkDecoder().decode_exp("huf4x", coded, n, out)
    assert out[:n].tobytes() == exp.tobytes()
    assert out[n:].tobytes() == b"\xa5" * 24  # nothing written past n
    return coded


DISTS = ["gaussian", "student-t", "mixed", "constant", "all256", "two", "geometric"]


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 4096, 70001])
def test_roundtrip_is_bit_exact(dist, n):
    _roundtrip(_exp(dist, n))


def test_roundtrip_full_chunk_and_registry():
    exp = _exp("gaussian", 1 << 20, seed=3)
    coded = _roundtrip(exp)
    assert coded[0] == 1 and 8 * len(coded) / exp.size < 2.60  # per-chunk optimal table (zstd-lit: 2.605)
    assert CODECS["huf4x"].default_preset == "l11"
    assert codec_params("huf4x")["huffman"]["max_code_length"] == 11


def test_constant_and_empty_chunks_use_six_bytes():
    assert ChunkEncoder("huf4x").encode(np.full(1000, 7, np.uint8)) == b"\x00" + (1000).to_bytes(4, "little") + b"\x07"
    assert ChunkEncoder("huf4x").encode(np.empty(0, np.uint8)) == b"\x00" + bytes(4) + b"\x00"


def _huffman_bits(counts) -> int:
    heap = [(int(c), i) for i, c in enumerate(counts) if c]
    heapq.heapify(heap)
    total, k = 0, len(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a[0] + b[0]
        heapq.heappush(heap, (a[0] + b[0], k))
        k += 1
    return total


@pytest.mark.parametrize("dist", ["gaussian", "student-t", "geometric", "all256"])
def test_code_lengths_are_limited_complete_and_optimal_when_unconstrained(dist):
    counts = np.bincount(_exp(dist, 200_000, seed=5), minlength=256)
    lens = huf4x.code_lengths(counts)
    present = counts > 0
    assert lens[~present].max(initial=0) == 0 and lens[present].min() >= 1 and lens.max() <= 11
    assert int((1 << (11 - lens[present])).sum()) == 1 << 11  # complete code
    bits = int(counts @ lens)
    unlimited = _huffman_bits(counts)
    loose = huf4x.code_lengths(counts, limit=40)  # a limit no code reaches: package-merge is Huffman
    assert int(counts @ loose) == unlimited
    assert bits >= unlimited
    if loose.max() <= 11:
        assert bits == unlimited
    if dist == "geometric":
        assert loose.max() > 11 and lens.max() == 11  # the limit was needed and used


def test_encoding_is_deterministic():
    exp = _exp("student-t", 50_000, seed=9)
    assert ChunkEncoder("huf4x").encode(exp) == ChunkEncoder("huf4x").encode(exp.copy())


# --- corruption -------------------------------------------------------------------------------------------

def _good(n: int = 5000) -> tuple[bytes, int]:
    return ChunkEncoder("huf4x").encode(_exp("gaussian", n, seed=1)), n


def _decode(coded, n: int) -> np.ndarray:
    out = np.full(n + 16, 0x5A, np.uint8)
    ChunkDecoder().decode_exp("huf4x", coded, n, out)
    assert out[n:].tobytes() == b"\x5a" * 16
    return out[:n]


def _set_len(coded: bytes, sym: int, length: int) -> bytes:
    b = bytearray(coded)
    k = 5 + sym // 2
    b[k] = (b[k] & 0xF0) | length if sym % 2 == 0 else (b[k] & 0x0F) | (length << 4)
    return bytes(b)


def _lens(coded: bytes) -> np.ndarray:
    return huf4x.parse_header(np.frombuffer(coded, np.uint8), int.from_bytes(coded[1:5], "little"))[1]


def test_every_truncation_is_one_codec_error():
    coded, n = _good(600)
    for cut in range(len(coded)):
        with pytest.raises(CodecError):
            _decode(coded[:cut], n)


def _mutants():
    coded, n = _good()
    lens = _lens(coded)
    sym = int(np.argmin(np.where(lens > 0, lens, 99)))  # the shortest code: lengthening it leaves a gap
    absent = int(np.flatnonzero(_lens(coded) == 0)[0])
    sizes_at = 5 + 128
    nb = n.to_bytes(4, "little")
    b = bytearray(coded)
    b[sizes_at] ^= 1  # stream 0 one byte longer or shorter
    yield "stream size", bytes(b), n, "stream sizes"
    yield "trailing byte", coded + b"\x00", n, "stream sizes"
    yield "mode", b"\x02" + coded[1:], n, "unknown chunk mode 2"
    yield "length 12", _set_len(coded, sym, 12), n, "exceeds 11"
    yield "length 15", _set_len(coded, sym, 15), n, "exceeds 11"
    yield "over-subscribed", _set_len(coded, absent, 1), n, "over-subscribed"
    yield "incomplete", _set_len(coded, sym, int(_lens(coded)[sym]) + 1), n, "incomplete"
    yield "one symbol", b"\x01" + nb + bytes([1]) + bytes(127) + bytes(16), n, "at least 2"
    yield "constant too long", b"\x00" + nb + b"\x07\x00", n, "expected 6"
    yield "constant, other n", b"\x00" + nb + b"\x07", n + 1, f"records {n} elements, expected {n + 1}"
    yield "n too large", coded, n + 1, "records"
    yield "n too small", coded, n - 1, "records"
    b = bytearray(coded)
    b[1] ^= 4
    yield "recorded n", bytes(b), n, "records"
    yield "empty", b"", n, "empty"
    zeroed = bytearray(coded)
    zeroed[huf4x.HEADER_BYTES:] = bytes(len(coded) - huf4x.HEADER_BYTES)  # all-zero bits: stream length wrong
    yield "zeroed streams", bytes(zeroed), n, "stream"


@pytest.mark.parametrize("case", list(_mutants()), ids=lambda c: c[0])
def test_corrupt_chunk_is_one_codec_error(case):
    _name, coded, n, needle = case
    with pytest.raises(CodecError, match=needle) as ei:
        _decode(coded, n)
    assert "huf4x" in str(ei.value) and "\n" not in str(ei.value)


def test_nonzero_padding_bits_are_rejected():
    for seed in range(20):  # find a chunk whose stream 3 ends inside a byte
        coded, n = ChunkEncoder("huf4x").encode(_exp("gaussian", 999, seed)), 999
        last = coded[-1]
        if last < 0x80:
            break
    bad = coded[:-1] + bytes([last | 0x80])
    with pytest.raises(CodecError, match="padding|last byte"):
        _decode(bad, n)


def test_decoder_names_the_chunk():
    src = make_dataset("gaussian", 3 * 4096)
    refs = encode_bf16_refs(src, 4096, "huf4x", name="t")
    bad = refs[1].data[:-1]
    from dataclasses import replace
    from formats.codec import checksum
    refs[1] = replace(refs[1], data=bad, data_xxh3=checksum(bad))
    with ParallelDecoder(2) as dec, pytest.raises(CodecError, match="t chunk 1 at offset 8192: huf4x"):
        dec.decode(refs, np.zeros(2 * src.size, np.uint8))


@FUZZ
@given(st.data())
def test_fuzzed_chunks_decode_or_raise(data):
    dist = data.draw(st.sampled_from(["gaussian", "student-t", "all256", "two", "geometric"]))
    n = data.draw(st.integers(0, 3000))
    coded = bytearray(ChunkEncoder("huf4x").encode(_exp(dist, n, seed=n)))
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if not coded:
            break
        i = data.draw(st.integers(0, len(coded) - 1))
        if op == "flip":
            coded[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            coded[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del coded[i:]
        else:
            coded[i:i] = bytes([data.draw(st.integers(0, 255))])
    m = data.draw(st.sampled_from([n, max(n - 1, 0), n + 1]))
    try:
        _decode(bytes(coded), m)
    except CodecError as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mprotect")
def test_no_read_past_the_coded_bytes():
    """A chunk placed flush against a PROT_NONE page: any read past its end would crash the process."""
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    m = mmap.mmap(-1, 2 * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        assert libc.mprotect(ctypes.c_void_p(addr + page), ctypes.c_size_t(page), 0) == 0
        for dist, n in [("gaussian", 2000), ("all256", 1000), ("two", 33), ("geometric", 5)]:
            coded = ChunkEncoder("huf4x").encode(_exp(dist, n))
            for variant in (coded, coded[:-1], coded[:-7]):
                view = np.frombuffer(m, np.uint8, count=len(variant), offset=page - len(variant))
                view[:] = np.frombuffer(variant, np.uint8)
                try:
                    got = _decode(view, n)
                    assert variant is coded and got.tobytes() == _exp(dist, n).tobytes()
                except CodecError:
                    assert variant is not coded
                del view
    finally:
        libc.mprotect(ctypes.c_void_p(addr + page), ctypes.c_size_t(page), 3)
        m.close()


def test_spec_example():
    """The worked example of specs/zmoe.md 3.3.1, byte for byte."""
    exp = np.array([0x78, 0x78, 0x79, 0x7A, 0x78, 0x79, 0x78, 0x78, 0x7B], np.uint8)
    lens = bytearray(128)
    lens[60], lens[61] = 0x21, 0x33
    want = b"\x01\x09\x00\x00\x00" + bytes(lens) + bytes.fromhex("01000000" "01000000" "01000000" "00000000") + b"\x04\x13\x1c"
    assert ChunkEncoder("huf4x").encode(exp) == want
    assert _decode(want, 9).tobytes() == exp.tobytes()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mixed_codecs_in_one_parallel_decode(threads):
    src = make_dataset("student-t", 5 * 4096 + 77, seed=4)
    half = 2 * 4096
    refs = encode_bf16_refs(src[:half], 4096, "zstd-lit", name="a") + \
        encode_bf16_refs(src[half:], 4096, "huf4x", out_offset=2 * half, name="b")
    out = np.zeros(2 * src.size, np.uint8)
    with ParallelDecoder(threads) as dec:
        dec.decode(refs, out)
    assert out.tobytes() == src.astype("<u2").tobytes()


def test_one_decoder_many_codes_and_a_bad_table_between():
    """A decoder's table cache: shared codes, more codes than it holds, and a bad table among them."""
    dec = ChunkDecoder()
    chunks = [_exp(d, 3000 + 7 * i, seed=i) for i in range(20) for d in ("gaussian", "two", "geometric")]
    coded = [ChunkEncoder("huf4x").encode(e) for e in chunks]
    bad = bytearray(coded[0])
    bad[5] = 0xFF  # lengths 15 for symbols 0 and 1
    for rnd in range(2):
        for e, c in zip(chunks, coded):
            out = np.empty(e.size, np.uint8)
            dec.decode_exp("huf4x", c, e.size, out)
            assert out.tobytes() == e.tobytes()
        with pytest.raises(CodecError, match="exceeds 11"):
            dec.decode_exp("huf4x", bytes(bad), chunks[0].size, np.empty(chunks[0].size, np.uint8))
