"""Exponent codec: round trips on edge-case chunks, strict length/structure checks, registry errors."""
import json

import numpy as np
import pytest
import zstandard

from formats.codec import (
    CODECS,
    DEFAULT_CHUNK_ELEMS,
    DEFAULT_CODEC,
    ENCODER_PRESETS,
    ChunkDecoder,
    ChunkEncoder,
    checksum,
    codec_params,
)
from formats.errors import CodecError, ZmoeError

PRESETS = [(c, p) for c in ENCODER_PRESETS for p in ENCODER_PRESETS[c]]

ZSTD = "zstd-lit"  # the tests below exercise the zstd codec, whatever the packer's default


def gaussian_exponents(n, std=0.02, seed=0):
    f = np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * np.float32(std)
    return ((f.view(np.uint32) >> 23) & 0xFF).astype(np.uint8)


def round_trip(codec, preset, exp):
    coded = ChunkEncoder(codec, preset).encode(exp)
    out = np.full(exp.size + 16, 0x5A, np.uint8)
    ChunkDecoder().decode_exp(codec, coded, exp.size, out)
    assert out[:exp.size].tobytes() == exp.tobytes()
    assert (out[exp.size:] == 0x5A).all()  # nothing written past n
    return coded


def test_registry_defaults():
    assert DEFAULT_CODEC in CODECS
    assert DEFAULT_CHUNK_ELEMS == 1 << 20
    for codec, preset in PRESETS:
        json.dumps(codec_params(codec, preset))
    assert codec_params(DEFAULT_CODEC)["preset"] == CODECS[DEFAULT_CODEC].default_preset


@pytest.mark.parametrize("codec,preset", PRESETS)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 255, 256, 257, 65791, 65792, 131071, 131072, 131073, 300001])
def test_round_trip_sizes(codec, preset, n):
    round_trip(codec, preset, gaussian_exponents(n, seed=n))


@pytest.mark.parametrize("codec,preset", PRESETS)
@pytest.mark.parametrize("value", [0, 1, 120, 127, 254, 255])
def test_single_symbol_chunk(codec, preset, value):
    coded = round_trip(codec, preset, np.full(200_000, value, np.uint8))
    assert len(coded) < 1000


@pytest.mark.parametrize("codec,preset", PRESETS)
def test_all_256_values(codec, preset):
    rng = np.random.default_rng(1)
    exp = np.concatenate([np.arange(256, dtype=np.uint8), rng.integers(0, 256, 50_000).astype(np.uint8),
                          np.repeat(np.arange(256, dtype=np.uint8), 3)])
    round_trip(codec, preset, exp)


def test_compresses_gaussian_exponents():
    exp = gaussian_exponents(1 << 18)
    coded = ChunkEncoder(ZSTD).encode(exp)
    assert len(coded) * 8 / exp.size < 2.75


def test_deterministic_and_reusable():
    enc = ChunkEncoder(ZSTD)
    a = gaussian_exponents(100_000, seed=3)
    b = gaussian_exponents(70_001, seed=4)
    ca, cb = enc.encode(a), enc.encode(b)
    assert enc.encode(a) == ca and ChunkEncoder(ZSTD).encode(b) == cb
    dec = ChunkDecoder()
    out = np.empty(100_000, np.uint8)
    for exp, coded in ((a, ca), (b, cb), (a, ca)):
        dec.decode_exp(ZSTD, coded, exp.size, out)
        assert out[:exp.size].tobytes() == exp.tobytes()


def test_accepts_buffers_and_memoryviews():
    exp = gaussian_exponents(10_000)
    coded = ChunkEncoder(ZSTD).encode(exp.tobytes())
    out = np.empty(10_000, np.uint8)
    ChunkDecoder().decode_exp(ZSTD, memoryview(bytearray(b"xx" + coded))[2:], 10_000, out)
    assert out.tobytes() == exp.tobytes()
    ChunkDecoder().decode_exp(ZSTD, np.frombuffer(coded, np.uint8), 10_000, out)
    assert out.tobytes() == exp.tobytes()


@pytest.mark.parametrize("n", [0, 1, 5000, 200_000])
def test_wrong_n_rejected(n):
    exp = gaussian_exponents(n)
    coded = ChunkEncoder(ZSTD).encode(exp)
    dec = ChunkDecoder()
    out = np.empty(n + 2, np.uint8)
    for wrong in {max(n - 1, 0), n + 1} - {n}:
        with pytest.raises(CodecError):
            dec.decode_exp(ZSTD, coded, wrong, out)


@pytest.mark.parametrize("n", [0, 50_000, 1_500_000])
def test_frame_without_content_size_decodes_and_checks_length(n):
    exp = gaussian_exponents(n)
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    coded = cobj.compress(exp.tobytes()) + cobj.flush()
    dec = ChunkDecoder()
    out = np.empty(n + 1, np.uint8)
    dec.decode_exp(ZSTD, coded, n, out)
    assert out[:n].tobytes() == exp.tobytes()
    for wrong in {max(n - 1, 0), n + 1} - {n}:
        with pytest.raises(CodecError):
            dec.decode_exp(ZSTD, coded, wrong, out)


def test_unsized_frame_with_huge_window_rejected():
    params = zstandard.ZstdCompressionParameters(window_log=26, strategy=zstandard.STRATEGY_FAST,
                                                 write_content_size=0)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    coded = cobj.compress(b"\x7f" * 1000) + cobj.flush()
    assert zstandard.get_frame_parameters(coded).window_size == 1 << 26
    with pytest.raises(CodecError):
        ChunkDecoder().decode_exp(ZSTD, coded, 1000, np.empty(1000, np.uint8))


def test_truncated_and_extended_streams_rejected():
    exp = gaussian_exponents(300_000)
    coded = ChunkEncoder(ZSTD).encode(exp)
    dec = ChunkDecoder()
    out = np.empty(300_000, np.uint8)
    cuts = sorted({0, 1, 4, 5, 8, 12, len(coded) // 3, len(coded) // 2, len(coded) - 2, len(coded) - 1})
    for cut in cuts:
        with pytest.raises(CodecError):
            dec.decode_exp(ZSTD, coded[:cut], 300_000, out)
    for tail in (b"\x00", b"junk", coded):
        with pytest.raises(CodecError):
            dec.decode_exp(ZSTD, coded + tail, 300_000, out)
    dec.decode_exp(ZSTD, coded, 300_000, out)  # still usable
    assert out.tobytes() == exp.tobytes()


def test_bit_flips_raise_or_stay_in_bounds():
    """Structure damage raises; payload damage may decode to wrong bytes (the archive's per-chunk
    xxh3, checked by formats.decoder before decoding, catches it: see test_decoder)."""
    exp = gaussian_exponents(3000)
    coded = ChunkEncoder(ZSTD).encode(exp)
    dec = ChunkDecoder()
    out = np.full(3100, 0x77, np.uint8)
    errors = 0
    for bit in range(0, len(coded) * 8, 3):
        bad = bytearray(coded)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            dec.decode_exp(ZSTD, bytes(bad), 3000, out)
        except CodecError:
            errors += 1
        assert (out[3000:] == 0x77).all()
    assert errors > 0


def test_unknown_codec_and_preset():
    with pytest.raises(CodecError, match="zstd-nope"):
        ChunkEncoder("zstd-nope")
    with pytest.raises(CodecError, match="zstd-nope"):
        ChunkDecoder().decode_exp("zstd-nope", b"", 0, np.empty(0, np.uint8))
    with pytest.raises(CodecError, match="zstd-nope"):
        codec_params("zstd-nope")
    with pytest.raises(CodecError, match="turbo"):
        ChunkEncoder(ZSTD, "turbo")
    assert issubclass(CodecError, ZmoeError)


def test_bad_output_buffers():
    coded = ChunkEncoder(ZSTD).encode(gaussian_exponents(100))
    dec = ChunkDecoder()
    with pytest.raises(CodecError):
        dec.decode_exp(ZSTD, coded, 100, np.empty(99, np.uint8))
    with pytest.raises(CodecError):
        dec.decode_exp(ZSTD, coded, 100, np.empty(100, np.uint16))
    ro = np.empty(100, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(CodecError):
        dec.decode_exp(ZSTD, coded, 100, ro)
    with pytest.raises(CodecError):
        dec.decode_exp(ZSTD, coded, -1, np.empty(100, np.uint8))
    with pytest.raises(CodecError):
        dec.decode_exp(ZSTD, None, 100, np.empty(100, np.uint8))


def test_checksum_is_xxh3_64():
    import xxhash
    data = gaussian_exponents(12345)
    assert checksum(data) == xxhash.xxh3_64_intdigest(data.tobytes())
    assert checksum(b"") == 0x2D06800538D394C2
    assert f"{checksum(b'abc'):016x}" == xxhash.xxh3_64_hexdigest(b"abc")


def test_bench_smoke(tmp_path):
    """The codec benchmark runs end to end on a tiny input (checks its own round trips)."""
    from typer.testing import CliRunner

    from zipmoe.bench.cli import app
    from zipmoe.bench.codec import render_table, run

    result = run(5000, runs=1, datasets=["student-t"], chunk=2048)
    json.dumps(result)
    peers = result["datasets"]["student-t"]["peers"]
    assert peers["ours fast"]["ratio"] < 0.75
    assert render_table(result).row_count == len(peers)
    out = tmp_path / "codec.json"
    res = CliRunner().invoke(app, ["codec", "--elements", "3000", "--runs", "1", "--datasets", "mixed",
                                   "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["elements"] == 3000
    assert CliRunner().invoke(app, ["codec", "--datasets", "nope"]).exit_code == 2
