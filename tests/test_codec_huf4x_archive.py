"""Archives packed with the ``huf4x`` codec (specs/zmoe.md 3.3.1): pack/verify/unpack, the store's
run equals the ``zstd-lit`` archive's, golden vectors, a corrupt chunk inside an archive, and the
``huf4x`` row of ``zipmoe bench codec``. Chunk-level tests: tests/test_codec_huf4x.py."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from formats.codec import ChunkEncoder
from formats.decoder import ParallelDecoder
from formats.errors import CodecError
from formats.reader import Archive
from formats.restore import file_stream, unpack, verify
from tests.clirun import assert_one_line_error, zipmoe
from tests.test_codec_huf4x import _decode
from zipmoe_pack.pack import PackOptions, pack


# --- archives -----------------------------------------------------------------------------------------------

DIMS = {"experts": 8, "top_k": 2, "hidden": 128, "moe_intermediate": 256, "layers": 2}


@pytest.fixture(scope="module")
def archives(checkpoint_factory, tmp_path_factory):
    src = checkpoint_factory("qwen2_moe", layout="per-expert", seed=11, dims=DIMS, peaky_router=False)
    d = tmp_path_factory.mktemp("huf4x")
    out = {}
    for codec in ("zstd-lit", "huf4x"):
        out[codec] = d / f"{codec}.zmoe"
        pack(src, out[codec], PackOptions(threads=2, chunk_elements=4096, codec=codec))
    return src, out


def test_pack_verify_unpack_roundtrip(archives, tmp_path):
    src, arcs = archives
    with Archive(arcs["huf4x"]) as ar, ParallelDecoder(2) as dec:
        codecs = {p.codec for e in ar.index.experts for p in e.parts if p.encoding == "bf16-split"}
        assert codecs == {"huf4x"}
        verify(ar, dec, source=src)
        unpack(ar, dec, tmp_path / "out")
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        got = tmp_path / "out" / f.relative_to(src)
        assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest(), f


def test_store_run_equals_zstd_lit_archive(archives):
    import torch

    from zipmoe_run.api import load

    prompt = [[5, 17, 42, 7, 99, 3]]

    def logits(arc):
        with load(arc, dtype="bfloat16", threads=2) as probe:
            minimum = probe.source.store.min_budget
        lm = load(arc, dtype="bfloat16", threads=2, memory_budget=minimum)  # every expert decoded on demand
        try:
            m = lm.model
            with torch.no_grad():
                cache = m.new_cache(1, len(prompt[0]) + 4)
                outs = [m(torch.tensor(prompt), cache, 0)]
                tok = outs[-1][:, -1:].argmax(-1)
                for i in range(3):
                    outs.append(m(tok, cache, len(prompt[0]) + i))
                    tok = outs[-1][:, -1:].argmax(-1)
            lm.source.store.drain_prefetch()
            assert lm.source.stats()["hits_cold"] > 0
            return outs
        finally:
            lm.close()

    _src, arcs = archives
    a, b = logits(arcs["zstd-lit"]), logits(arcs["huf4x"])
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_pack_cli_rejects_unknown_codec(archives, tmp_path):
    src, _ = archives
    r = zipmoe("pack", src, tmp_path / "x.zmoe", "--codec", "bogus", timeout=120)
    assert_one_line_error(r, "bogus", "huf4x")
    assert not (tmp_path / "x.zmoe").exists()


# --- golden vectors (formats/golden/, scripts/make_golden.py) ---------------------------------------------

GOLDEN = Path(__file__).resolve().parents[1] / "formats" / "golden"


@pytest.mark.parametrize("case", json.loads((GOLDEN / "huf4x-chunks.json").read_text())["chunks"],
                         ids=lambda c: c["name"])
def test_golden_chunks(case):
    exp = np.frombuffer(bytes.fromhex(case["exponents"]), np.uint8)
    coded = bytes.fromhex(case["coded"])
    assert ChunkEncoder("huf4x").encode(exp) == coded
    assert _decode(coded, case["n"]).tobytes() == exp.tobytes()


def test_golden_archive_decodes_and_reproduces(tmp_path):
    meta = json.loads((GOLDEN / "tiny-huf4x.json").read_text())
    decoded = (GOLDEN / meta["decoded"]).read_bytes()
    with Archive(GOLDEN / meta["archive"]) as ar, ParallelDecoder(2) as dec:
        assert {p.codec for e in ar.index.experts for p in e.parts if p.encoding == "bf16-split"} == {"huf4x"}
        verify(ar, dec)
        for f, want in zip(ar.index.files, meta["files"]):
            got = b"".join(bytes(memoryview(b).cast("B")) for b in file_stream(ar, f, dec))
            assert got == decoded[want["offset"]:want["offset"] + want["length"]]
    sys.path.insert(0, str(GOLDEN.parents[1] / "scripts"))
    import make_golden

    make_golden.make(tmp_path, "huf4x")  # huf4x depends on no library version: always byte-identical
    assert (tmp_path / "tiny-huf4x.zmoe").read_bytes() == (GOLDEN / "tiny-huf4x.zmoe").read_bytes()
    assert (tmp_path / "tiny-decoded.bin").read_bytes() == decoded


# --- zipmoe bench codec ---------------------------------------------------------------------------------------

def test_bench_alternates_peers_run_by_run():
    from zipmoe.bench import codec as bc

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def check(self, t):
            calls.append(("check", self.name, t))

        def decode(self, t):
            calls.append(("run", self.name, t))

    times, cpu = bc._alternate({p: Fake(p) for p in "abc"}, runs=3)
    runs = [c[1:] for c in calls if c[0] == "run"]
    assert [c[1:] for c in calls if c[0] == "check"] == [(p, t) for p in "abc" for t in bc.THREADS]
    per_run = len(runs) // 3
    firsts = [runs[r * per_run][0] for r in range(3)]
    assert firsts == ["a", "b", "c"]  # the order rotates run by run
    assert sorted(runs) == sorted((p, t) for p in "abc" for t in bc.THREADS for _ in range(3))
    assert all(len(times[p][t]) == len(cpu[p][t]) == 3 for p in "abc" for t in bc.THREADS)


def test_bench_has_a_huf4x_row_with_ratio_spread():
    from zipmoe.bench.codec import render_table, run

    result = run(5000, runs=2, datasets=["gaussian"], chunk=2048)
    peers = result["datasets"]["gaussian"]["peers"]
    row = peers["ours huf4x"]
    assert row["ratio"] < 0.75 and {"decode_1t_gb_s", "decode_2t_gb_s"} <= set(row)
    if "ratio" in peers.get("zipnn", {}):
        for t in (1, 2):
            lo, hi = row[f"speedup_vs_zipnn_{t}t_range"]
            assert lo <= row[f"speedup_vs_zipnn_{t}t"] <= hi
        lo, hi = row["cpu_speedup_vs_zipnn_1t_range"]
        assert lo <= row["cpu_speedup_vs_zipnn_1t"] <= hi
    assert render_table(result).row_count == len(peers)


# --- hostile archives: a corrupt huf4x chunk with a matching checksum reaches the decoder ------------------------

@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_corrupt_chunk_in_archive_is_one_error_naming_it(tmp_path_factory, data):
    from formats.errors import ZmoeError
    from formats.preamble import xxh3
    from tests.archive_mut import dumps, split, with_index

    buf = bytearray((GOLDEN / "tiny-huf4x.zmoe").read_bytes())
    doc, _ = split(bytes(buf))
    chunks = [(p, c) for e in doc["experts"] for p in e["parts"] for c in p.get("exp_chunks", [])]
    part, chunk = data.draw(st.sampled_from(chunks))
    off, length = chunk[0], chunk[1]
    before = bytes(buf[off:off + length])
    for _ in range(data.draw(st.integers(1, 4))):
        i = off + data.draw(st.integers(0, length - 1))
        buf[i] ^= 1 << data.draw(st.integers(0, 7))
    assume(bytes(buf[off:off + length]) != before)  # flips that cancel out leave a valid archive
    chunk[2] = format(xxh3(bytes(buf[off:off + length])), "016x")
    path = tmp_path_factory.mktemp("hostile") / "m.zmoe"
    path.write_bytes(with_index(bytes(buf), dumps(doc)))
    with pytest.raises(ZmoeError) as ei:
        with Archive(path) as ar, ParallelDecoder(2) as dec:
            verify(ar, dec)
    msg = str(ei.value)
    assert "\n" not in msg
    if isinstance(ei.value, CodecError):
        assert part["tensor"] in msg and "huf4x" in msg
