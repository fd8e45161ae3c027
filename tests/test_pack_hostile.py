"""Hostile or unlucky packer input: the packer never destroys its input, never hangs, never leaves a
temporary file behind, releases every map, and refuses what it cannot store with one line naming it."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from formats.errors import InputError
from tests.stfile import write_st
from tests.test_format import make_tiny, sha_tree
from tests.clirun import ROOT, assert_one_line_error, zipmoe
from zipmoe_pack import pack as P
from zipmoe_pack.pack import PackOptions, pack


@pytest.fixture
def src(tmp_path) -> Path:
    return make_tiny(tmp_path / "src")


def _refused(src: Path, out: Path, *needles: str, opts: PackOptions | None = None) -> str:
    """pack(src, out) raises InputError naming the needles, and neither the source nor OUT changed."""
    before = sha_tree(src)
    out_before = out.read_bytes() if out.is_file() else None
    with pytest.raises(InputError) as ei:
        pack(src, out, opts)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    assert sha_tree(src) == before
    assert (out.read_bytes() if out.is_file() else None) == out_before
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    return msg


# -- 1. the output never overwrites an input ------------------------------------------------------------

def test_cli_refuses_to_overwrite_config_json(src):
    """`zipmoe-pack ckpt ckpt/config.json` used to replace config.json with the archive, exit 0."""
    before = sha_tree(src)
    r = zipmoe("pack", src, src / "config.json")
    assert_one_line_error(r, "config.json", "output path is the input file")
    assert sha_tree(src) == before


def test_output_inside_the_source_folder(src):
    _refused(src, src / "new.zmoe", "new.zmoe", "inside the checkpoint folder")
    (src / "sub").mkdir()
    _refused(src, src / "sub" / "new.zmoe", "inside the checkpoint folder")
    _refused(src, src / "model.safetensors.index.json", "output path is the input file")


def test_output_through_a_symlinked_folder(src, tmp_path):
    (tmp_path / "alias").symlink_to(src)
    _refused(src, tmp_path / "alias" / "new.zmoe", "inside the checkpoint folder")
    _refused(src, tmp_path / "alias" / "config.json", "output path is the input file")
    _refused(src / ".." / "src", src / ".." / "src" / "x.zmoe", "inside the checkpoint folder")


def test_output_is_a_link_to_an_input(src, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[0]
    (tmp_path / "sym.zmoe").symlink_to(shard)
    _refused(src, tmp_path / "sym.zmoe", "sym.zmoe", shard.name)
    os.link(shard, tmp_path / "hard.zmoe")
    _refused(src, tmp_path / "hard.zmoe", "hard.zmoe", shard.name)


def test_output_is_the_target_of_an_input_symlink(src, tmp_path):
    """An input that is a symlink to a file outside the folder: OUT naming that file is refused too."""
    outside = tmp_path / "notes.txt"
    outside.write_text("keep me")
    (src / "notes.txt").symlink_to(outside)
    _refused(src, outside, "notes.txt", "output path is the input file")
    assert outside.read_text() == "keep me"


# -- 2. strict JSON everywhere ------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000


def _with_header(shard: Path, text: str) -> None:
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    new = text.encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


@pytest.mark.parametrize("where", ["config", "index", "header"])
@pytest.mark.parametrize("what", ["deep", "huge int", "duplicate key"])
def test_hostile_json(src, tmp_path, where, what):
    if where == "header":
        target = sorted(src.glob("*.safetensors"))[0]
        doc = json.loads(target.read_bytes()[8:8 + int.from_bytes(target.read_bytes()[:8], "little")])
        text = json.dumps(doc, separators=(",", ":"))
    else:
        target = src / ("config.json" if where == "config" else "model.safetensors.index.json")
        text = target.read_text().strip()
    bad = {"deep": '"zz": ' + DEEP, "huge int": '"zz": ' + HUGE,
           "duplicate key": '"zz": 1, "zz": 2'}[what]
    text = "{" + bad + ", " + text[1:]
    if where == "header":
        _with_header(target, text)
    else:
        target.write_text(text)
    reason = {"deep": "nested too deeply", "huge int": "5000 digits", "duplicate key": "duplicate key"}[what]
    _refused(src, tmp_path / "a.zmoe", target.name, reason)


def test_hostile_json_cli_one_line(src, tmp_path):
    (src / "config.json").write_text('{"model_type": "qwen2_moe", "x": ' + DEEP + "}")
    assert_one_line_error(zipmoe("pack", src, tmp_path / "a.zmoe"), "config.json", "nested too deeply")


# -- 3. regular files only ------------------------------------------------------------------------------

def _pack_cli(src: Path, out: Path) -> subprocess.CompletedProcess:
    return zipmoe("pack", src, out)  # subprocess with a timeout: a hang fails instead of blocking the suite


def test_fifo_in_the_folder_is_refused(src, tmp_path):
    os.mkfifo(src / "pipe")
    r = subprocess.run([sys.executable, "-c", "import sys; from zipmoe.cli import main; "
                        "sys.argv = ['zipmoe'] + sys.argv[1:]; main()", "pack", str(src), str(tmp_path / "a.zmoe")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_one_line_error(r, "pipe", "FIFO", "not a regular file")
    assert not (tmp_path / "a.zmoe").exists()


@pytest.mark.parametrize("special", ["/dev/null", "/dev/zero"])
def test_symlink_to_a_device_is_refused(src, tmp_path, special):
    if not os.path.exists(special):
        pytest.skip(f"no {special}")
    (src / "dev").symlink_to(special)
    _refused(src, tmp_path / "a.zmoe", "dev", "character device", "not a regular file")


def test_socket_in_the_folder_is_refused(src, tmp_path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(src / "sock"))
    except OSError as e:
        pytest.skip(f"cannot bind a unix socket here ({e})")
    try:
        _refused(src, tmp_path / "a.zmoe", "sock: is a socket", "not a regular file")
    finally:
        s.close()


def test_symlink_to_a_regular_file_is_packed(src, tmp_path):
    outside = tmp_path / "README.md"
    outside.write_text("hello")
    (src / "README.md").symlink_to(outside)
    pack(src, tmp_path / "a.zmoe")
    from formats.reader import Archive
    with Archive(tmp_path / "a.zmoe") as a:
        assert "README.md" in {f.path for f in a.index.files}


def test_broken_symlink_is_refused(src, tmp_path):
    (src / "gone").symlink_to(tmp_path / "nowhere")
    _refused(src, tmp_path / "a.zmoe", "gone: broken symlink")


def test_symlink_loop_is_refused(src, tmp_path):
    (src / "sub").mkdir()
    (src / "sub" / "x.txt").write_text("x")
    (src / "sub" / "loop").symlink_to("..")
    _refused(src, tmp_path / "a.zmoe", "loop", "reached twice")


def test_unlistable_folder_is_refused(src, tmp_path, monkeypatch):
    """A folder that cannot be listed used to be skipped silently (os.walk's default), losing its files."""
    (src / "sub").mkdir()
    (src / "sub" / "x.txt").write_text("x")
    real = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)).name == "sub":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    _refused(src, tmp_path / "a.zmoe", "sub", "cannot list")


# -- 4. no temporary file survives ------------------------------------------------------------------------

_SLOW_CHILD = """
import sys, time, pathlib
import zipmoe_pack.pack as P
marker = pathlib.Path(sys.argv[1])
orig = P._Out.write
def write(self, data):  # the main thread stalls on its first write, with the temporary file open
    if not marker.exists():
        marker.touch()
        time.sleep(120)
    return orig(self, data)
P._Out.write = write
from zipmoe.cli import main
sys.argv = ['zipmoe', 'pack'] + sys.argv[2:]
main()
"""


def _start_slow(src: Path, out: Path, marker: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, str(marker), str(src), str(out)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(6000):
        if marker.exists() or p.poll() is not None:
            break
        time.sleep(0.01)
    assert marker.exists(), p.communicate()
    return p


def _temps(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def test_sigterm_removes_the_temporary_file(src, tmp_path):
    out = tmp_path / "a.zmoe"
    p = _start_slow(src, out, tmp_path / "marker")
    assert _temps(out)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in stderr and "terminated" in stderr, stderr
    assert not _temps(out) and not out.exists()


def test_kill_9_leftover_is_cleaned_by_the_next_run(src, tmp_path):
    out = tmp_path / "a.zmoe"
    p = _start_slow(src, out, tmp_path / "marker")
    p.kill()
    p.communicate(timeout=60)
    assert _temps(out), "the killed run should have left its temporary file"
    pack(src, out)
    assert not _temps(out) and out.is_file()


def test_stale_temporaries_only_of_dead_processes(src, tmp_path):
    out = tmp_path / "a.zmoe"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".a.zmoe.tmp-{dead.pid}"
    alive = tmp_path / f".a.zmoe.tmp-{os.getppid()}"  # a live process (pytest's parent)
    other = [tmp_path / f".b.zmoe.tmp-{dead.pid}", tmp_path / ".a.zmoe.tmp-x1", tmp_path / f"a.zmoe.tmp-{dead.pid}"]
    for f in [stale, alive, *other]:
        f.write_bytes(b"junk")
    pack(src, out)
    assert not stale.exists()
    assert alive.exists() and all(f.exists() for f in other)


# -- 5. maps and descriptors are released --------------------------------------------------------------

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mapped(d: Path) -> list[str]:
    return [ln for ln in Path("/proc/self/maps").read_text().splitlines() if str(d) in ln]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("raw", [False, True])
def test_failed_pack_releases_every_map(src, tmp_path, monkeypatch, raw):
    """A write failure mid-pack: the exception (and its traceback) is held, yet no shard stays mapped."""
    calls = [0]
    orig = P._Out.write

    def write(self, data):
        calls[0] += 1
        if calls[0] == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, data)

    monkeypatch.setattr(P._Out, "write", write)
    fds = _open_fds()
    with pytest.raises(InputError, match="disk full") as ei:
        pack(src, tmp_path / "a.zmoe", PackOptions(raw=raw))
    assert ei.value.__traceback__ is not None
    assert _mapped(src) == []
    assert _open_fds() == fds


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_worker_failure_releases_every_map(src, tmp_path, monkeypatch):
    """A failure inside an encoding worker, its traceback (holding the worker's frame) kept alive."""
    def split_bf16(u16, exp, sm):
        raise RuntimeError("injected split failure")

    monkeypatch.setattr(P, "split_bf16", split_bf16)
    fds = _open_fds()
    with pytest.raises(RuntimeError, match="injected") as ei:
        pack(src, tmp_path / "a.zmoe", PackOptions(threads=2))
    assert ei.value.__traceback__ is not None
    assert _mapped(src) == []
    assert _open_fds() == fds
    assert not _temps(tmp_path / "a.zmoe") and not (tmp_path / "a.zmoe").exists()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("raw", [False, True])
def test_pack_releases_every_map(src, tmp_path, raw):
    fds = _open_fds()
    pack(src, tmp_path / "a.zmoe", PackOptions(raw=raw, threads=2))
    assert _mapped(src) == []
    assert _open_fds() == fds


def test_maps_close_raises_on_a_leaked_view(src):
    """Closing with a view still alive is a defect: it raises instead of being swallowed."""
    from zipmoe_pack.scan import scan_checkpoint
    ck = scan_checkpoint(src)
    maps = P._Maps(ck)
    shard = next(f for f in ck.files if f.kind == "safetensors")
    v = maps.view(shard.path, 0, 8)
    with pytest.raises(BufferError):
        maps.close()
    v.release()
    maps.close()


# -- 6. everything else the reader would refuse, or the packer cannot honour ------------------------------

def _one_shard(src: Path, tensors) -> None:
    for p in src.glob("*.safetensors"):
        p.unlink()
    (src / "model.safetensors.index.json").unlink()
    write_st(src / "model.safetensors", tensors)


def test_rank_above_eight_is_refused(src, tmp_path):
    e = b"\0" * (24 * 16 * 2)
    _one_shard(src, [("model.layers.0.mlp.experts.0.up_proj.weight", "BF16", [24, 16], e),
                     ("model.odd", "F32", [1] * 9, b"\0" * 4)])
    _refused(src, tmp_path / "a.zmoe", "model.odd", "rank 9")


def test_dimension_above_u64_is_refused(src, tmp_path):
    e = b"\0" * (24 * 16 * 2)
    _one_shard(src, [("model.layers.0.mlp.experts.0.up_proj.weight", "BF16", [24, 16], e),
                     ("model.odd", "F32", [0, 1 << 64], b"")])
    _refused(src, tmp_path / "a.zmoe", "model.odd", "dimension")


def test_dtype_of_the_wrong_type_is_refused(src, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    doc = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    name = next(k for k in doc if k != "__metadata__")
    doc[name]["dtype"] = ["BF16"]  # used to be a TypeError (unhashable list) traceback
    _with_header(shard, json.dumps(doc))
    _refused(src, tmp_path / "a.zmoe", name, "unknown dtype")


@pytest.mark.parametrize("dtype,shape,nbytes", [("F4", [2, 3], 3), ("F6_E2M3", [4, 1], 3)])
def test_fused_tensor_that_cannot_be_cut_into_whole_bytes(src, tmp_path, dtype, shape, nbytes):
    """An F4 [2, 3] tensor is 3 bytes, one expert 1.5: the archive could not hold the slices."""
    name = "model.layers.0.mlp.experts.gate_up_proj"
    _one_shard(src, [(name, dtype, shape, bytes(nbytes))])
    _refused(src, tmp_path / "a.zmoe", name, "not a whole number of bytes")


def test_fused_tensor_claiming_2_40_experts(src, tmp_path):
    """Zero bytes, 2^40 experts: refused before a plan of 2^40 extents is built."""
    name = "model.layers.0.mlp.experts.gate_up_proj"
    _one_shard(src, [(name, "BF16", [1 << 40, 0, 4], b"")])
    _refused(src, tmp_path / "a.zmoe", name, str(1 << 40))


@pytest.mark.parametrize("layer,why", [("1" + "0" * 22, "2^64"), ("9" * 5000, "too long")])
def test_layer_numbers_the_index_cannot_hold(src, tmp_path, layer, why):
    _one_shard(src, [(f"model.layers.{layer}.mlp.experts.0.up_proj.weight", "BF16", [2, 2], bytes(8))])
    _refused(src, tmp_path / "a.zmoe", "model.safetensors", why)


@pytest.mark.parametrize("name,why", [("a\nb.txt", "control character"), ("back\\slash.txt", "backslash"),
                                      ("c:drive.txt", "drive"), (b"bad\xff.txt", "UTF-8")])
def test_file_names_an_archive_cannot_hold(src, tmp_path, name, why):
    p = os.path.join(os.fsencode(src), name) if isinstance(name, bytes) else src / name
    try:
        with open(p, "wb") as f:
            f.write(b"x")
    except (OSError, ValueError) as e:
        pytest.skip(f"this file system refuses the name ({e})")
    _refused(src, tmp_path / "a.zmoe", why, "cannot be stored")


@pytest.mark.parametrize("shard", ["a\x00b.safetensors", "x" * 5000, "/dev/zero"])
def test_shard_index_names_are_compared_not_opened(src, tmp_path, shard):
    """A NUL byte or a 5,000-byte name in weight_map used to reach the file system (ENAMETOOLONG: OSError)."""
    p = src / "model.safetensors.index.json"
    doc = json.loads(p.read_text())
    name = next(iter(doc["weight_map"]))
    doc["weight_map"][name] = shard
    p.write_text(json.dumps(doc))
    _refused(src, tmp_path / "a.zmoe", p.name, name, "missing from the folder")


def test_model_type_must_be_a_string(src, tmp_path):
    (src / "config.json").write_text(json.dumps({"model_type": ["qwen2_moe"]}))
    _refused(src, tmp_path / "a.zmoe", "config.json", "model_type")


def test_oversized_json_is_refused_without_reading_it(src, tmp_path, monkeypatch):
    from zipmoe_pack import scan
    monkeypatch.setattr(scan, "MAX_JSON", 64)
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "pad": "x" * 100}))
    _refused(src, tmp_path / "a.zmoe", "config.json", "bytes")


def test_shard_changed_after_the_scan(src, tmp_path, monkeypatch):
    """A shard that shrinks between the scan and the mapping is refused, not mapped short (or SIGBUS)."""
    from zipmoe_pack import scan
    real = scan.scan_checkpoint

    def scan_then_truncate(root):
        ck = real(root)
        shard = sorted(Path(root).glob("*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-64])
        return ck

    monkeypatch.setattr(P, "scan_checkpoint", scan_then_truncate)
    with pytest.raises(InputError, match="changed"):
        pack(src, tmp_path / "a.zmoe")
    assert not (tmp_path / "a.zmoe").exists() and not _temps(tmp_path / "a.zmoe")


@pytest.mark.parametrize("opts,needle", [(PackOptions(chunk_elements=3), "chunk"),
                                         (PackOptions(chunk_elements=3 << 12), "power of two"),
                                         (PackOptions(threads=-1), "threads"),
                                         (PackOptions(threads=10 ** 6), "threads"),
                                         (PackOptions(codec="nope"), "codec")])
def test_bad_options(src, tmp_path, opts, needle):
    _refused(src, tmp_path / "a.zmoe", needle, opts=opts)


@pytest.mark.parametrize("args,needle", [(["--chunk-elements", "3"], "chunk"), (["--threads", "-1"], "threads")])
def test_bad_options_cli_one_line(src, tmp_path, args, needle):
    assert_one_line_error(zipmoe("pack", src, tmp_path / "a.zmoe", *args), needle)


def test_valid_pack_unchanged_by_the_checks(src, tmp_path):
    """The refusals above change nothing for a valid checkpoint: same archive bytes as a second run."""
    a, b = tmp_path / "a.zmoe", tmp_path / "b.zmoe"
    pack(src, a, PackOptions(threads=1))
    pack(src, b, PackOptions(threads=3))
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
