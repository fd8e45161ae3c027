"""Bounded fuzzing of the archive reader (issue 11): mutants of valid archives go through open, verify,
unpack and inspect's summary. Bit flips and truncation test the checksums; index mutations are
re-written with a valid preamble and index checksum, so they reach the index validation and beyond.

Asserted for every mutant: only ZmoeError subclasses escape, their message is one non-empty line,
nothing hangs (a hard per-example alarm), and nothing is written outside unpack's destination.
A fixed, derandomized number of examples keeps CI bounded.
"""
from __future__ import annotations

import contextlib
import copy
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.decoder import ParallelDecoder
from formats.errors import ZmoeError
from formats.reader import Archive
from formats.restore import unpack, verify
from formats.summary import summarize
from tests.archive_mut import GOLDEN, ROOT, dumps, fused_source, roomy, split, with_index
from zipmoe_pack.pack import PackOptions, pack

ROOM = 64 << 10  # spare index space so most index mutations keep every offset in place
HANG_S = 30  # a mutant that takes this long is a hang, not a slow case (each normally takes ms)
FUZZ = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the code swallows it."""


@contextlib.contextmanager
def no_hang(seconds: int = HANG_S):
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(*_):
        raise Hang(f"a mutant ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[bytes]:
    """The golden archive and a fused-tensor archive, each with room after the index."""
    d = tmp_path_factory.mktemp("fuzzbase")
    fused = d / "fused.zmoe"
    pack(fused_source(d / "src"), fused, PackOptions(threads=1, chunk_elements=4096))
    out = [roomy(GOLDEN.read_bytes(), ROOM), roomy(fused.read_bytes(), ROOM)]
    for i, b in enumerate(out):  # the unmutated bases are valid
        p = d / f"base{i}.zmoe"
        p.write_bytes(b)
        with Archive(p) as ar, ParallelDecoder(1) as dec:
            verify(ar, dec)
    return out


def _one_line(e: ZmoeError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)


def exercise(data: bytes) -> str:
    """Open, verify, unpack and summarize one mutant; returns how far it got."""
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        work = root / "w"
        work.mkdir()
        arc = work / "m.zmoe"
        arc.write_bytes(data)
        stage = "open"
        with no_hang():
            try:
                with Archive(arc) as ar, ParallelDecoder(1) as dec:
                    stage = "inspect"
                    json.dumps(summarize(ar))
                    stage = "verify"
                    try:
                        verify(ar, dec)
                        stage = "verified"
                    except ZmoeError as e:
                        _one_line(e)
                    try:
                        unpack(ar, dec, work / "out")
                        stage += "+unpacked"
                    except ZmoeError as e:
                        _one_line(e)
            except ZmoeError as e:
                _one_line(e)
        for p in root.rglob("*"):  # nothing outside the destination, no links, no temp leftovers
            rel = p.relative_to(root).parts
            assert not p.is_symlink(), rel
            assert rel in (("w",), ("w", "m.zmoe")) or rel[:2] == ("w", "out"), rel
        return stage


# -- bytes: flips, truncation, extension -----------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_fuzz_bytes(bases, data):
    buf = bytearray(data.draw(st.sampled_from(bases)))
    how = data.draw(st.sampled_from(["flip", "flip", "truncate", "extend", "splice"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            off = data.draw(st.integers(0, len(buf) - 1))
            buf[off] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        buf = buf[:data.draw(st.integers(0, len(buf) - 1))]
    elif how == "extend":
        buf += data.draw(st.binary(min_size=1, max_size=5000))
    else:
        off = data.draw(st.integers(0, len(buf) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=64))
        buf[off:off + len(junk)] = junk
    exercise(bytes(buf))


# -- index documents with valid checksums ----------------------------------------------------------

HOSTILE = [
    -1, 0, 1, 7, 63, 4095, 4096, 2**31, 2**32, 2**53 + 1, 2**63, 2**64 - 1, 2**64, 10**20 - 1, -(2**63),
    1.5, 1e308, -0.0, True, False, None, "", "x", "../../evil", "/tmp/evil", "a\x00b", "a\\b", "C:evil",
    "[/]bold[red]", "a/./b", "a//b", "\u202e", "BF16", "F4", "F6_E2M3", "C64", "raw", "bf16-split", "zstd-lit",
    "0" * 16, "f" * 64, [], {}, [0, 0, "0" * 16], [2**32] * 8, [1] * 9, {"offset": 0, "length": 2**64 - 1},
    {"offset": 4096, "length": 4096, "xxh3": []}, ["x"] * 300,
]


def _locations(doc) -> list[tuple[object, object]]:
    """Every (container, key) pair of the document, in a fixed order."""
    out, stack = [], [doc]
    while stack:
        x = stack.pop()
        items = list(x.items()) if isinstance(x, dict) else list(enumerate(x))
        for k, v in items:
            out.append((x, k))
            if isinstance(v, (dict, list)):
                stack.append(v)
    return out


def _regions(doc) -> list[dict]:
    regs = [f.get("data") or f.get("header") for f in doc["files"]]
    regs += [t["data"] for t in doc["tensors"] if "data" in t]
    regs += doc["experts"]
    regs += [p.get("sm") or p.get("data") for e in doc["experts"] for p in e["parts"]]
    return [r for r in regs if isinstance(r, dict)]


def _structured(doc: dict, data, kind: str) -> bytes | None:
    """Targeted lies; returns raw index bytes when the mutation is textual."""
    draw = data.draw
    ints = st.sampled_from([-4096, -1, 0, 2**32, 2**62, 2**64 - 4096, 2**64 - 1, 2**64, 10**19 + 7])
    if kind == "offsets":
        r = draw(st.sampled_from(_regions(doc)))
        r[draw(st.sampled_from(["offset", "length"]))] = draw(ints)
    elif kind == "overlap":
        a, b = draw(st.sampled_from(_regions(doc))), draw(st.sampled_from(_regions(doc)))
        b["offset"] = a["offset"] + draw(st.integers(0, 64))
    elif kind == "chunk":
        chunks = [c for e in doc["experts"] for p in e["parts"] for c in p.get("exp_chunks", [])]
        if chunks:
            c = draw(st.sampled_from(chunks))
            c[draw(st.integers(0, 2))] = draw(st.sampled_from([-1, 0, 2**64, "0" * 16, None, c[0] + 1]))
    elif kind == "shape":
        t = draw(st.sampled_from(doc["tensors"] + [p for e in doc["experts"] for p in e["parts"]]))
        t["shape"] = draw(st.sampled_from([[2**32] * 4, [2**63, 2**63], [0], [], [2**64 - 1, 2],
                                           [1] * 9, [-1, 4]]))
        prod = 1
        for d in t["shape"]:
            prod *= d
        t["nbytes"] = draw(st.sampled_from([prod * 2, (prod * 2) % 2**64, 0]))
    elif kind == "dtype":
        t = draw(st.sampled_from(doc["tensors"] + [p for e in doc["experts"] for p in e["parts"]]))
        t["dtype"] = draw(st.sampled_from(["BF16", "F32", "U8", "F4", "F6_E3M2", "C64", "BOOL", "Q4_K", ""]))
    elif kind == "path":
        f = draw(st.sampled_from(doc["files"]))
        f["path"] = draw(st.sampled_from(["../x", "../../../../tmp/zmoe-evil", "/tmp/zmoe-evil", "a/../../b",
                                          "a\x00b", "a\\..\\b", "C:\\x", ".", "", "a/", "x" * 5000,
                                          doc["files"][0]["path"], "sub/dir/ok.json"]))
    elif kind == "fused_count":
        fused = [t for t in doc["tensors"] if t.get("expert", {}).get("fused")]
        if fused:
            t = fused[0]
            n = draw(st.sampled_from([2**20, 2**25, 2**40, 2**63]))
            per = t["nbytes"] // t["shape"][0]
            f = next(f for f in doc["files"] if f["path"] == t["file"])
            f["size"] += (n - t["shape"][0]) * per
            t["shape"][0], t["nbytes"] = n, n * per
    elif kind == "experts":
        op = draw(st.sampled_from(["reverse", "duplicate", "empty_parts", "swap_numbers", "drop", "many"]))
        ex = doc["experts"]
        if op == "reverse":
            ex.reverse()
        elif op == "duplicate":
            ex.append(copy.deepcopy(ex[0]))
        elif op == "empty_parts":
            ex[0]["parts"] = []
        elif op == "swap_numbers" and len(ex) > 1:
            ex[0]["expert"], ex[1]["expert"] = ex[1]["expert"], ex[0]["expert"]
        elif op == "drop":
            ex.pop()
        else:
            ex[0]["parts"] = ex[0]["parts"] * 2000  # a huge count of parts, all the same
    elif kind == "deep":
        n = draw(st.sampled_from([31, 32, 33, 1000, 100_000]))
        loc = draw(st.sampled_from(["codecs", "stats", "model", "created_by"]))
        doc[loc] = "@@DEEP@@"
        return dumps(doc).replace(b'"@@DEEP@@"', b"[" * n + b"]" * n)
    elif kind == "text":
        raw = dumps(doc)
        op = draw(st.sampled_from(["dup_key", "bigint", "nan", "bom", "utf16", "trailing"]))
        if op == "dup_key":
            return raw.replace(b'"layer":0', b'"layer":0,"layer":1', 1)
        if op == "bigint":
            return raw.replace(b'"layer":0', b'"layer":' + b"1" * draw(st.sampled_from([20, 21, 5000])), 1)
        if op == "nan":
            return raw.replace(b'"layer":0', b'"layer":NaN', 1)
        if op == "bom":
            return b"\xef\xbb\xbf" + raw
        if op == "utf16":
            return raw.decode().encode("utf-16")
        return raw + b" {}"
    return None


@FUZZ
@given(data=st.data())
def test_fuzz_index(bases, data):
    base = data.draw(st.sampled_from(bases))
    doc, _ = split(base)
    kind = data.draw(st.sampled_from(["generic", "generic", "delete", "offsets", "overlap", "chunk", "shape",
                                      "dtype", "path", "fused_count", "experts", "deep", "text"]))
    raw = None
    if kind in ("generic", "delete"):
        locs = _locations(doc)
        parent, key = locs[data.draw(st.integers(0, len(locs) - 1))]
        if kind == "delete":
            parent.pop(key)
        else:
            parent[key] = copy.deepcopy(data.draw(st.sampled_from(HOSTILE)))
    else:
        raw = _structured(doc, data, kind)
    exercise(with_index(base, raw if raw is not None else dumps(doc)))


def test_fuzz_reaches_every_stage(bases):
    """The mutation machinery itself works: a harmless edit verifies and unpacks, a lie is caught."""
    doc, _ = split(bases[0])
    doc["created_by"] = "fuzz"
    assert exercise(with_index(bases[0], dumps(doc))) == "verified+unpacked"
    doc["tensors"][0]["sha256"] = "0" * 64
    assert exercise(with_index(bases[0], dumps(doc))) == "verify"


# -- the command line on a few mutants -------------------------------------------------------------

def _cli(*args) -> subprocess.CompletedProcess:
    code = "import sys; from zipmoe.cli import main; sys.argv = ['zipmoe'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_on_mutants(bases, tmp_path):
    base = bases[0]
    doc, _ = split(base)
    flipped = bytearray(base)
    last = doc["experts"][-1]["parts"][-1]
    flipped[(last.get("sm") or last["data"])["offset"]] ^= 0x10  # expert bytes: only verify/unpack notice
    nul = copy.deepcopy(doc)
    nul["files"][0]["path"] = "config\x00.json"
    stats = copy.deepcopy(doc)
    stats["stats"] = []
    mutants = {
        "deep": with_index(base, b"[" * 100_000 + b"]" * 100_000),
        "nul": with_index(base, dumps(nul)),
        "stats": with_index(base, dumps(stats)),
        "flip": bytes(flipped),
        "short": base[:len(base) // 2],
    }
    for name, data in mutants.items():
        p = tmp_path / f"{name}.zmoe"
        p.write_bytes(data)
        cmds = [("verify", p), ("unpack", p, tmp_path / f"out-{name}")] if name == "flip" else \
            [("inspect", p)] if name != "nul" else [("unpack", p, tmp_path / "out-nul"), ("inspect", p)]
        for cmd in cmds:
            r = _cli(*cmd)
            assert r.returncode != 0, (name, cmd, r.stdout)
            assert "Traceback" not in r.stderr, (name, cmd, r.stderr)
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, cmd, r.stderr)
        assert not list(tmp_path.glob(f"out-{name}*")) and not list(tmp_path.glob(f".out-{name}*"))
