"""Bad input gets one clear line on stderr, a non-zero exit, no traceback and no partial output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clirun import ROOT, assert_one_line_error, zipmoe

from tests.stfile import write_config, write_st
from tests.test_format import make_tiny

def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


@pytest.fixture
def good(tmp_path) -> Path:
    return make_tiny(tmp_path / "good")


def _case(tmp_path: Path, good: Path, case: str) -> tuple[Path, list[str]]:
    """Build a broken input; returns (model dir, words the error line must contain)."""
    d = tmp_path / "bad"
    if case == "missing dir":
        return tmp_path / "nope", ["nope", "no such directory"]
    if case == "not a dir":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file", ["not a directory"]
    import shutil
    shutil.copytree(good, d)
    shards = sorted(d.glob("*.safetensors"))
    if case == "no safetensors":
        for s in shards:
            s.unlink()
        (d / "model.safetensors.index.json").unlink()
        return d, ["no *.safetensors"]
    if case == "index names missing shard":
        shards[1].unlink()
        return d, [shards[1].name, "missing"]
    if case == "tensor missing from shard":
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"]["model.layers.9.mlp.gate.weight"] = shards[0].name
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        return d, ["model.layers.9.mlp.gate.weight", "missing from its shard"]
    if case == "unknown model type":
        for s in shards:
            s.unlink()
        (d / "model.safetensors.index.json").unlink()
        write_config(d, "mystery_net")
        write_st(d / "model.safetensors", [("encoder.weight", "F32", [2], b"\0" * 8)])
        return d, ["mystery_net", "supported families", "qwen2_moe"]
    if case == "malformed json":
        (d / "config.json").write_text('{"model_type": "qwen2_moe",,}')
        return d, ["config.json", "malformed JSON", "line 1"]
    if case == "header lies":
        raw = bytearray(shards[0].read_bytes())
        n = int.from_bytes(raw[:8], "little")
        hdr = json.loads(raw[8:8 + n])
        name = next(k for k in hdr if k != "__metadata__")
        hdr[name]["data_offsets"][1] += 2
        new = json.dumps(hdr, separators=(",", ":")).encode()
        new += b" " * (-len(new) % 8)
        shards[0].write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
        return d, [shards[0].name, name, "header lies"]
    if case == "truncated shard":
        raw = shards[0].read_bytes()
        shards[0].write_bytes(raw[:-10])
        return d, [shards[0].name, "truncated"]
    raise AssertionError(case)


CASES = ["missing dir", "not a dir", "no safetensors", "index names missing shard", "tensor missing from shard",
         "unknown model type", "malformed json", "header lies", "truncated shard"]


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint(tmp_path, good, case):
    src, needles = _case(tmp_path, good, case)
    out = tmp_path / "out.zmoe"
    r = zipmoe("pack", src, out)
    assert_one_line_error(r, *needles)
    _no_output(out)


def test_debug_shows_traceback(tmp_path):
    r = zipmoe("pack", tmp_path / "nope", tmp_path / "o.zmoe", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_output_is_a_directory(tmp_path, good):
    (tmp_path / "o.zmoe").mkdir()
    assert_one_line_error(zipmoe("pack", good, tmp_path / "o.zmoe"), "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_not_writable(tmp_path, good):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert_one_line_error(zipmoe("pack", good, ro / "o.zmoe"), "not writable")


def test_output_folder_missing(tmp_path, good):
    assert_one_line_error(zipmoe("pack", good, tmp_path / "nodir" / "o.zmoe"), "does not exist")


def test_disk_full_leaves_nothing(tmp_path, good):
    """A write failure mid-pack (file-size limit standing in for a full disk) leaves no file at OUT."""
    out = tmp_path / "o.zmoe"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            "from zipmoe.cli import main; sys.argv = ['zipmoe', 'pack', sys.argv[1], sys.argv[2]]; main()")
    r = subprocess.run([sys.executable, "-c", code, str(good), str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert_one_line_error(r, "o.zmoe", "cannot write archive")
    _no_output(out)


def test_disk_full_tmpfs(tmp_path, good):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        r = zipmoe("pack", good, mnt / "o.zmoe")
        assert_one_line_error(r, "disk full")
        assert not list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)])


def test_archive_errors_are_one_line(tmp_path, good):
    (tmp_path / "junk.zmoe").write_bytes(b"hello world" * 10)
    assert_one_line_error(zipmoe("verify", tmp_path / "junk.zmoe"), "junk.zmoe", "bad magic")
    assert_one_line_error(zipmoe("inspect", tmp_path / "none.zmoe"), "none.zmoe")
    arc = tmp_path / "a.zmoe"
    assert zipmoe("pack", good, arc).returncode == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_one_line_error(zipmoe("unpack", arc, tmp_path / "full"), "not an empty folder")
