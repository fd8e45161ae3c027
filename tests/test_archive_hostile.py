"""Hostile archives found by review and fuzzing (issue 11, defects 6 and 9): each case is one line of
error from the reader or the CLI, never a traceback, a hang or an attacker-sized allocation."""
from __future__ import annotations

import copy
import gc
import os
import tracemalloc
from pathlib import Path

import pytest

from formats.decoder import ParallelDecoder
from formats.errors import CorruptDataError, FormatError, ZmoeError
from formats.reader import Archive
from formats.restore import unpack, verify
from tests.clirun import assert_one_line_error as one_line_error, zipmoe
from tests.archive_mut import GOLDEN, ROOT, dumps, fused_source, split, with_index
from zipmoe_pack.pack import PackOptions, pack

BASE = GOLDEN.read_bytes()
DOC, _ = split(BASE)


def mutant(tmp_path: Path, fn, name: str = "m.zmoe") -> Path:
    doc = copy.deepcopy(DOC)
    fn(doc)
    p = tmp_path / name
    p.write_bytes(with_index(BASE, dumps(doc)))
    return p


def raw_mutant(tmp_path: Path, raw: bytes) -> Path:
    p = tmp_path / "raw.zmoe"
    p.write_bytes(with_index(BASE, raw))
    return p


def open_fails(p: Path, match: str) -> str:
    with pytest.raises(FormatError, match=match) as ei:
        Archive(p)
    assert "\n" not in str(ei.value)
    return str(ei.value)


# -- strict JSON ---------------------------------------------------------------------------------

def test_deeply_nested_index_is_one_format_error(tmp_path):
    open_fails(raw_mutant(tmp_path, b"[" * 100_000 + b"]" * 100_000), "nested too deeply")


def test_index_nesting_limit_is_exact(tmp_path):
    from formats.index_parse import MAX_DEPTH
    from formats.jsonstrict import JSONRejected, depth, loads

    assert depth('[[1,{"a":"[[[\\"["}]]') == 3 and depth("7") == 0 and depth('["\\\\",[]]') == 2
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads(ok, max_depth=MAX_DEPTH) is not None
    with pytest.raises(JSONRejected, match="nested too deeply"):
        loads("[" + ok + "]", max_depth=MAX_DEPTH)
    doc = copy.deepcopy(DOC)
    doc["codecs"]["zstd-lit"]["x"] = "@"
    for extra, fails in ((MAX_DEPTH - 3, False), (MAX_DEPTH - 2, True)):  # root, codecs, params, extra
        p = raw_mutant(tmp_path, dumps(doc).replace(b'"@"', b"[" * extra + b"]" * extra))
        if fails:
            open_fails(p, f"at most {MAX_DEPTH}")
        else:
            Archive(p).close()


def test_huge_integer_in_index_is_one_format_error(tmp_path):
    raw = dumps(DOC).replace(b'"chunk_elements":4096', b'"chunk_elements":' + b"9" * 5000)
    open_fails(raw_mutant(tmp_path, raw), "digits")


def test_duplicate_key_in_index_is_rejected(tmp_path):
    raw = dumps(DOC).replace(b'"alignment":4096', b'"alignment":4096,"alignment":4096')
    open_fails(raw_mutant(tmp_path, raw), "duplicate key")


def test_integer_above_u64_is_rejected(tmp_path):
    p = mutant(tmp_path, lambda d: d["tensors"][0].__setitem__("nbytes", 2**64 + 5))
    open_fails(p, r"above 2\^64")


# -- file paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, message", [
    ("config\x00.json", "control character"),
    ("con\nfig.json", "control character"),
    ("/etc/passwd", "relative"),
    ("a/../../x", "relative"),
    ("a\\b", "relative"),
    ("./config.json", "relative"),
    ("C:config.json", "drive"),
])
def test_bad_file_paths_fail_validation(tmp_path, path, message):
    open_fails(mutant(tmp_path, lambda d: d["files"][0].__setitem__("path", path)), message)


# -- stats, codecs, model --------------------------------------------------------------------------

@pytest.mark.parametrize("case, mutate, message", [
    ("stats list", lambda d: d.__setitem__("stats", []), "stats"),
    ("stats null", lambda d: d.__setitem__("stats", None), "stats"),
    ("stats entry list", lambda d: d["stats"].__setitem__("up_proj", [1, 2]), "stats 'up_proj'"),
    ("negative histogram", lambda d: d["stats"]["up_proj"]["exp_histogram"].__setitem__(3, -1),
     r"exp_histogram\[3\]"),
    ("short histogram", lambda d: d["stats"]["up_proj"].__setitem__("exp_histogram", [1]), "256"),
    ("float elements", lambda d: d["stats"]["up_proj"].__setitem__("elements", 1.5), "elements"),
    ("codecs list", lambda d: d.__setitem__("codecs", ["zstd-lit"]), "codecs"),
    ("codecs null", lambda d: d.__setitem__("codecs", None), "codecs"),
    ("codec params string", lambda d: d["codecs"].__setitem__("zstd-lit", "fast"), "codecs 'zstd-lit'"),
    ("model_type number", lambda d: d["model"].__setitem__("model_type", 7), "model_type"),
    ("created_by list", lambda d: d.__setitem__("created_by", []), "created_by"),
])
def test_informative_fields_are_typed(tmp_path, case, mutate, message):
    open_fails(mutant(tmp_path, mutate), message)


def test_inspect_on_bad_stats_is_one_line(tmp_path):
    p = mutant(tmp_path, lambda d: d["stats"]["up_proj"]["exp_histogram"].__setitem__(0, -7))
    one_line_error(zipmoe("inspect", p), str(p), "exp_histogram")


# -- counts bounded by the file before anything is allocated ---------------------------------------

@pytest.fixture(scope="module")
def fused_archive(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fused")
    src = fused_source(d / "src")
    out = d / "f.zmoe"
    pack(src, out, PackOptions(threads=1, chunk_elements=4096))
    return out


def test_fused_expert_count_does_not_size_an_allocation(fused_archive, tmp_path):
    """An index claiming a fused tensor of 2^22 experts (file size made consistent) is refused
    without building a list of that many entries."""
    base = fused_archive.read_bytes()
    doc, _ = split(base)
    t = next(t for t in doc["tensors"] if t["name"].endswith("experts.down_proj"))
    f = next(f for f in doc["files"] if f["kind"] == "safetensors")
    n = 1 << 22
    f["size"] += (n - t["shape"][0]) * t["nbytes"] // t["shape"][0]
    t["nbytes"] = n * t["nbytes"] // t["shape"][0]
    t["shape"][0] = n
    p = tmp_path / "n.zmoe"
    p.write_bytes(with_index(base, dumps(doc)))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="exactly once"):
            Archive(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"opening allocated {peak} bytes"


# -- extents -------------------------------------------------------------------------------------

def test_unsorted_experts_rejected(tmp_path):
    open_fails(mutant(tmp_path, lambda d: d["experts"].reverse()), "not sorted")


def test_per_expert_tensor_in_the_wrong_extent_rejected(tmp_path):
    """Swapping two extents' expert numbers (kept sorted) would serve expert 1's weights as expert 0."""
    def swap(d):
        a, b = d["experts"]
        a["expert"], b["expert"] = 1, 0
        d["experts"] = [b, a]
    open_fails(mutant(tmp_path, swap), "the name says layer 0 expert")


def test_extent_without_parts_rejected(tmp_path):
    def empty(d):
        d["experts"][1]["parts"] = []
    open_fails(mutant(tmp_path, empty), "no parts")


# -- verify checks every recorded hash -------------------------------------------------------------

def test_verify_checks_dense_tensor_sha256(tmp_path):
    def lie(d):
        t = next(t for t in d["tensors"] if t["role"] == "dense")
        t["sha256"] = "0" * 64
    p = mutant(tmp_path, lie)
    with Archive(p) as ar, ParallelDecoder(1) as dec:
        with pytest.raises(CorruptDataError, match="SHA-256") as ei:
            verify(ar, dec)
        assert "model.embed_tokens.weight" in str(ei.value) or "model.layers.0.mlp.gate.weight" in str(ei.value)
        with pytest.raises(CorruptDataError):
            unpack(ar, dec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- only regular files; thread counts ------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_inspect_on_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "pipe.zmoe"
    os.mkfifo(fifo)
    # the CLI first, in a child with a timeout: a reader that blocks on open fails the test, not hangs it
    one_line_error(zipmoe("inspect", fifo, timeout=60), "not a regular file")
    with pytest.raises(FormatError, match="not a regular file"):
        Archive(fifo)


def test_device_and_directory_refused(tmp_path):
    if os.path.exists("/dev/zero"):
        open_fails(Path("/dev/zero"), "not a regular file")
    open_fails(tmp_path, "directory")


@pytest.mark.parametrize("threads", ["-1", "100000"])
def test_verify_absurd_thread_counts_one_line(threads):
    one_line_error(zipmoe("verify", "-t", threads, GOLDEN), "threads", threads)


def test_thread_count_error_is_both_families():
    from formats.decoder import ThreadCountError

    for n in (0, -1, 10**6):
        with pytest.raises(ThreadCountError) as ei:
            ParallelDecoder(n)
        assert isinstance(ei.value, ZmoeError) and isinstance(ei.value, ValueError)


# -- resource lifetime -----------------------------------------------------------------------------

def test_archive_close_is_idempotent_and_final():
    ar = Archive(GOLDEN)
    held = ar.view(0, 8)
    with ar:
        assert not ar.closed
    assert ar.closed
    ar.close()
    assert bytes(held) == b"\x89ZMOE\r\n\x1a"  # a view taken before close stays valid
    with pytest.raises(FormatError, match="closed"):
        ar.view(0, 8)
    with pytest.raises(FormatError, match="closed"):
        ar.dense_view("model.embed_tokens.weight")


def test_open_close_leaves_no_descriptor(tmp_path):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc")
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with Archive(GOLDEN):
            pass
        with pytest.raises(FormatError):
            Archive(raw_mutant(tmp_path, b"{}"))
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_inspect_prints_markup_in_names_literally(tmp_path):
    (tmp_path / "odd[").mkdir()
    p = tmp_path / "odd[" / "]name[red].zmoe"  # the path reads odd[/]name[red].zmoe
    p.write_bytes(BASE)
    r = zipmoe("inspect", p)
    assert r.returncode == 0, r.stderr
    assert "odd[/]name[red].zmoe" in r.stdout


# -- linear walks (defect 6) -----------------------------------------------------------------------

class _CountingTuple(tuple):
    passes = 0

    def __iter__(self):
        type(self).passes += 1
        return super().__iter__()


def test_verify_and_unpack_walk_the_extents_a_bounded_number_of_times(tmp_path):
    """iter_part_bytes used to scan every extent for every expert tensor (quadratic)."""
    from tests.test_format import make_tiny

    src = make_tiny(tmp_path / "src", layers=2, experts=4, shards=1)
    arc = tmp_path / "t.zmoe"
    pack(src, arc, PackOptions(threads=1, chunk_elements=4096))
    with Archive(arc) as ar, ParallelDecoder(1) as dec:
        n_expert_tensors = sum(t.role == "expert" for t in ar.index.tensors.values())
        assert n_expert_tensors == 24
        object.__setattr__(ar.index, "experts", _CountingTuple(ar.index.experts))
        verify(ar, dec)
        unpack(ar, dec, tmp_path / "out")
    assert _CountingTuple.passes <= 4, _CountingTuple.passes


# -- the JSON Schema says the same as the reader ---------------------------------------------------

SCHEMA_CASES = [
    lambda d: d["files"][0].__setitem__("path", "config\x00.json"),
    lambda d: d["files"][0].__setitem__("path", "a/../../x"),
    lambda d: d["files"][0].__setitem__("path", "a\\b"),
    lambda d: d["files"][0].__setitem__("path", "C:x"),
    lambda d: d["files"][0].__setitem__("path", "a//b"),
    lambda d: d.__setitem__("stats", []),
    lambda d: d["stats"]["up_proj"]["exp_histogram"].__setitem__(3, -1),
    lambda d: d.__setitem__("codecs", None),
    lambda d: d["codecs"].__setitem__("zstd-lit", "fast"),
    lambda d: d["experts"][1].__setitem__("parts", []),
    lambda d: d["tensors"][0].__setitem__("nbytes", 2**64),
    lambda d: d["tensors"][0].__setitem__("shape", [1] * 9),
    lambda d: d["model"].__setitem__("model_type", 7),
    lambda d: d["experts"][0].pop("stack"),
    lambda d: d["experts"][0]["parts"][0].pop("slice"),
    lambda d: next(t for t in d["tensors"] if t["role"] == "expert")["expert"].pop("stack"),
]


@pytest.mark.parametrize("case", range(len(SCHEMA_CASES)))
def test_schema_and_reader_agree(tmp_path, case):
    jsonschema = pytest.importorskip("jsonschema")
    import json

    schema = json.loads((ROOT / "formats" / "zmoe-index.schema.json").read_text())
    jsonschema.validate(DOC, schema)
    doc = copy.deepcopy(DOC)
    SCHEMA_CASES[case](doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)
    with pytest.raises(FormatError):
        Archive(mutant(tmp_path, SCHEMA_CASES[case]))
