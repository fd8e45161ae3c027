"""Bit-exactness of the BF16 plane split/merge kernels (numba and the numpy reference)."""
import numpy as np
import pytest

from formats.planes import (
    merge_bf16,
    merge_bf16_le_bytes,
    merge_bf16_numpy,
    split_bf16,
    split_bf16_numpy,
)

ALL = np.arange(65536, dtype=np.uint32).astype(np.uint16)


def _split(fn, src):
    exp = np.empty(src.shape[0], np.uint8)
    sm = np.empty(src.shape[0], np.uint8)
    fn(src, exp, sm)
    return exp, sm


def test_all_patterns_split_matches_definition():
    u = ALL.astype(np.uint32)
    exp_ref = ((u >> 7) & 0xFF).astype(np.uint8)
    sm_ref = (((u >> 15) << 7) | (u & 0x7F)).astype(np.uint8)
    for fn in (split_bf16, split_bf16_numpy):
        exp, sm = _split(fn, ALL)
        assert exp.tobytes() == exp_ref.tobytes()
        assert sm.tobytes() == sm_ref.tobytes()


def test_all_patterns_round_trip_numba_and_numpy():
    exp, sm = _split(split_bf16, ALL)
    for fn in (merge_bf16, merge_bf16_numpy):
        out = np.empty(65536, np.uint16)
        fn(exp, sm, out)
        assert out.tobytes() == ALL.tobytes()
    # the (exp, sm) pairs cover all 65,536 combinations: the mapping is a bijection
    assert np.unique(exp.astype(np.uint32) << 8 | sm).size == 65536


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_le_bytes_merge_at_any_offset(offset):
    exp, sm = _split(split_bf16, ALL)
    buf = np.full(2 * 65536 + 8, 0xAB, np.uint8)
    merge_bf16_le_bytes(exp, sm, buf[offset:offset + 2 * 65536])
    assert buf[offset:offset + 2 * 65536].tobytes() == ALL.astype("<u2").tobytes()
    assert (buf[:offset] == 0xAB).all() and (buf[offset + 2 * 65536:] == 0xAB).all()


def test_special_values():
    vals = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.0e38], np.float32)
    bf = (vals.view(np.uint32) >> 16).astype(np.uint16)
    bf = np.concatenate([bf, np.array([0x7FC1, 0xFF81, 0x0001, 0x8001, 0x7F80, 0xFFFF], np.uint16)])
    exp, sm = _split(split_bf16, bf)
    out = np.empty_like(bf)
    merge_bf16(exp, sm, out)
    assert out.tobytes() == bf.tobytes()


def test_readonly_inputs_and_empty():
    exp, sm = _split(split_bf16, ALL[:1000])
    exp.flags.writeable = False
    sm.flags.writeable = False
    out = np.empty(2000, np.uint8)
    merge_bf16_le_bytes(exp, sm, out)
    assert out.tobytes() == ALL[:1000].astype("<u2").tobytes()
    e0, s0 = _split(split_bf16, ALL[:0])
    merge_bf16(e0, s0, np.empty(0, np.uint16))


def test_argument_checks():
    exp = np.zeros(4, np.uint8)
    sm = np.zeros(4, np.uint8)
    with pytest.raises(ValueError):
        merge_bf16(exp, sm, np.empty(5, np.uint16))
    with pytest.raises(TypeError):
        merge_bf16(exp, sm, np.empty(4, np.int16))
    with pytest.raises(ValueError):
        merge_bf16_le_bytes(exp, sm, np.empty(7, np.uint8))
    with pytest.raises(ValueError):
        split_bf16(np.zeros(4, np.uint16), exp, np.zeros(3, np.uint8))
    with pytest.raises(ValueError):
        merge_bf16(exp, sm, np.empty(8, np.uint16)[::2])
