"""Chunk decoding into preallocated buffers: bit-exact, thread-count independent, fails cleanly."""
import dataclasses
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.codec import DEFAULT_CODEC, ChunkDecoder, checksum
from formats.decoder import (
    ChunkRef,
    ParallelDecoder,
    check_layout,
    decode_chunk,
    encode_bf16_refs,
    ref_out_size,
)
from formats.errors import CodecError, CorruptDataError


def bf16(n, std=0.02, seed=0):
    f = np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * np.float32(std)
    return (f.view(np.uint32) >> 16).astype(np.uint16)


def raw_ref(data: bytes, off: int, where="raw") -> ChunkRef:
    return ChunkRef("raw", None, data, None, len(data), checksum(data), None, off, where)


def expert_refs():
    """Two 'experts' worth of parts: BF16 tensors at odd and even offsets plus a raw (FP8-like) part."""
    a, b = bf16(70_001, seed=1), bf16(40_000, std=0.05, seed=2)
    raw = np.random.default_rng(3).integers(0, 256, 9_999, dtype=np.uint8).tobytes()
    refs = encode_bf16_refs(a, 8192, out_offset=0, name="a")
    off_b = 2 * a.size + 3  # odd byte offset on purpose
    refs += encode_bf16_refs(b, 4096, out_offset=off_b, name="b")
    off_raw = off_b + 2 * b.size + 64
    refs.append(raw_ref(raw, off_raw))
    expected = np.zeros(off_raw + len(raw) + 5, np.uint8)
    expected[:2 * a.size] = np.frombuffer(a.astype("<u2").tobytes(), np.uint8)
    expected[off_b:off_b + 2 * b.size] = np.frombuffer(b.astype("<u2").tobytes(), np.uint8)
    expected[off_raw:off_raw + len(raw)] = np.frombuffer(raw, np.uint8)
    return refs, expected


@pytest.fixture(scope="module")
def pool2():
    with ParallelDecoder(2) as dec:
        yield dec


def test_same_bytes_for_1_and_2_threads(pool2):
    refs, expected = expert_refs()
    for dec in (ParallelDecoder(1), pool2):
        out = np.zeros_like(expected)
        dec.decode(refs, out)
        assert out.tobytes() == expected.tobytes()
        out2 = np.zeros_like(expected)
        dec.decode(list(reversed(refs)), out2)
        assert out2.tobytes() == expected.tobytes()


def test_decode_chunk_direct_and_scratch_reuse():
    refs, expected = expert_refs()
    dec = ChunkDecoder()
    out = np.zeros_like(expected)
    for ref in refs:
        decode_chunk(dec, ref, out)
    assert out.tobytes() == expected.tobytes()


def test_submit_future(pool2):
    refs, expected = expert_refs()
    for dec in (ParallelDecoder(1), pool2):
        out = np.zeros_like(expected)
        fut = dec.submit(refs, out)
        assert isinstance(fut.result(timeout=60), float)  # when its first chunk began decoding
        assert out.tobytes() == expected.tobytes()
    assert pool2.submit([], np.zeros(4, np.uint8)).result() is None


def test_layout_rejected_before_decoding(pool2):
    refs, expected = expert_refs()
    for dec in (ParallelDecoder(1), pool2):
        end = max(r.out_offset + ref_out_size(r) for r in refs)
        out = np.zeros(end - 1, np.uint8)  # the last raw ref no longer fits
        with pytest.raises(CodecError, match="exceed"):
            dec.decode(refs, out)
        assert not out.any()
        out = np.zeros_like(expected)
        overlap = dataclasses.replace(refs[1], out_offset=refs[1].out_offset + 1, where="shifted chunk")
        with pytest.raises(CodecError, match="overlap"):
            dec.decode(refs + [overlap], out)
        assert not out.any()
        with pytest.raises(CodecError, match="overlap"):
            dec.submit(refs + [refs[0]], out).result(timeout=60)
        assert not out.any()
    # empty chunks never overlap anything, but must still lie inside the buffer
    check_layout([raw_ref(b"", 5), raw_ref(b"abcdefgh", 0)], np.zeros(8, np.uint8))
    with pytest.raises(CodecError):
        check_layout([raw_ref(b"", 9)], np.zeros(8, np.uint8))
    with pytest.raises(CodecError):
        check_layout([raw_ref(b"ab", 0)], np.zeros(8, np.uint16))


def test_overlap_hidden_behind_empty_chunk():
    refs = [raw_ref(b"x" * 10, 0, "A"), raw_ref(b"", 5, "Z"), raw_ref(b"y" * 6, 6, "B")]
    with pytest.raises(CodecError, match="overlap"):
        check_layout(refs, np.zeros(20, np.uint8))


def corrupt(ref: ChunkRef, what: str) -> ChunkRef:
    if what == "data":
        bad = bytearray(ref.data)
        bad[len(bad) // 2] ^= 0x10
        return dataclasses.replace(ref, data=bytes(bad))
    if what == "sm":
        bad = bytearray(ref.sm)
        bad[0] ^= 0x01
        return dataclasses.replace(ref, sm=bytes(bad))
    if what == "truncated":
        return dataclasses.replace(ref, data=bytes(ref.data)[:-5], data_xxh3=checksum(bytes(ref.data)[:-5]))
    if what == "wrong-n":
        return dataclasses.replace(ref, n=ref.n - 1, sm=bytes(ref.sm)[:-1], sm_xxh3=checksum(bytes(ref.sm)[:-1]))
    raise AssertionError(what)


@pytest.mark.parametrize("what,exc", [("data", CorruptDataError), ("sm", CorruptDataError),
                                      ("truncated", CodecError), ("wrong-n", CodecError)])
def test_failing_chunk_raises_cleanly_and_pool_survives(pool2, what, exc):
    refs, expected = expert_refs()
    bad_idx = 3
    refs[bad_idx] = corrupt(refs[bad_idx], what)
    for dec in (ParallelDecoder(1), pool2):
        out = np.zeros_like(expected)
        with pytest.raises(exc) as info:
            dec.decode(refs, out)
        assert refs[bad_idx].where in str(info.value)
        good, _ = expert_refs()
        out = np.zeros_like(expected)
        dec.decode(good, out)  # still usable afterwards
        assert out.tobytes() == expected.tobytes()


def test_bit_flips_never_give_garbage():
    a = bf16(5000)
    (ref,) = encode_bf16_refs(a, 8192)
    dec = ChunkDecoder()
    for bit in range(0, len(ref.data) * 8, 5):
        bad = bytearray(ref.data)
        bad[bit // 8] ^= 1 << (bit % 8)
        out = np.zeros(2 * a.size, np.uint8)
        with pytest.raises((CorruptDataError, CodecError)):
            decode_chunk(dec, dataclasses.replace(ref, data=bytes(bad)), out)


def test_first_failure_by_ref_order_and_no_deadlock(pool2):
    refs, expected = expert_refs()
    refs[2] = corrupt(refs[2], "sm")
    refs[7] = corrupt(refs[7], "data")
    for _ in range(5):
        with pytest.raises(CorruptDataError) as info:
            pool2.decode(refs, np.zeros_like(expected))
        assert refs[2].where in str(info.value)


def test_unexpected_exception_in_worker(pool2):
    refs, expected = expert_refs()

    class Boom:
        def __buffer__(self, flags):
            raise RuntimeError("boom")

    refs[4] = dataclasses.replace(refs[4], data=Boom())
    with pytest.raises(Exception):
        pool2.decode(refs, np.zeros_like(expected))
    good, _ = expert_refs()
    out = np.zeros_like(expected)
    pool2.decode(good, out)
    assert out.tobytes() == expected.tobytes()


def test_verify_false_skips_checksums():
    a = bf16(1000)
    (ref,) = encode_bf16_refs(a, 4096)
    ref = dataclasses.replace(ref, data_xxh3=0, sm_xxh3=0)
    out = np.zeros(2000, np.uint8)
    with pytest.raises(CorruptDataError):
        ParallelDecoder(1).decode([ref], out)
    ParallelDecoder(1).decode([ref], out, verify=False)
    assert out.tobytes() == a.astype("<u2").tobytes()


def test_bad_refs_rejected():
    a = bf16(100)
    (ref,) = encode_bf16_refs(a, 4096)
    out = np.zeros(200, np.uint8)
    dec = ParallelDecoder(1)
    for bad in (dataclasses.replace(ref, kind="bf16"), dataclasses.replace(ref, codec="nope"),
                dataclasses.replace(ref, sm=None), dataclasses.replace(ref, out_offset=-2),
                raw_ref(b"abc", 0).__class__("raw", DEFAULT_CODEC, b"abc", None, 3, checksum(b"abc"), None, 0, "r")):
        with pytest.raises(CodecError):
            dec.decode([bad], out)
    assert ref_out_size(ref) == 200


def test_concurrent_callers_share_one_pool(pool2):
    refs, expected = expert_refs()
    outs = [np.zeros_like(expected) for _ in range(4)]
    errors = []

    def work(out):
        try:
            pool2.decode(refs, out)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert all(o.tobytes() == expected.tobytes() for o in outs)


def test_close_and_context_manager():
    refs, expected = expert_refs()
    with ParallelDecoder(2) as dec:
        fut = dec.submit(refs, np.zeros_like(expected))
    assert fut.done() and fut.exception() is None  # close waited for submitted work
    with pytest.raises(CodecError, match="closed"):
        dec.decode(refs, np.zeros_like(expected))
    dec.close()
    with pytest.raises(ValueError):
        ParallelDecoder(0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=6000), chunk=st.integers(1, 3000),
       threads=st.sampled_from([1, 2]), offset=st.integers(0, 9))
def test_round_trip_property(data, chunk, threads, offset, pool2):
    src = np.frombuffer(data[:len(data) // 2 * 2], dtype="<u2").astype(np.uint16)
    refs = encode_bf16_refs(src, chunk, out_offset=offset)
    out = np.full(offset + 2 * src.size + 3, 0xEE, np.uint8)
    dec = pool2 if threads == 2 else ParallelDecoder(1)
    dec.decode(refs, out)
    assert out[offset:offset + 2 * src.size].tobytes() == src.astype("<u2").tobytes()
    assert (out[:offset] == 0xEE).all() and (out[offset + 2 * src.size:] == 0xEE).all()


def test_submit_result_is_when_its_first_chunk_started():
    """The future's result times the decode itself: a batch queued behind other work reports when its
    first chunk began, not when it was submitted (the store's decode rate, and the calibration's drift
    watcher fed by it, read the queue wait as slow decoding)."""
    import time

    data = bf16(4096).tobytes()
    refs = [raw_ref(data[:4096], 0), raw_ref(data[4096:], 4096)]
    out = np.zeros(len(data), np.uint8)
    with ParallelDecoder(threads=1) as dec:
        gate = threading.Event()
        dec._get_pool().submit(gate.wait, 30)  # occupies the only decode thread
        t_submit = time.perf_counter()
        fut = dec.submit(refs, out)
        time.sleep(0.05)
        t_open = time.perf_counter()
        gate.set()
        started = fut.result(timeout=30)
    assert started is not None and started >= t_open > t_submit
    assert out.tobytes() == data
