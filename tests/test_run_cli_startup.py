"""`zipmoe-run`'s start-up and exit (issue 12): a .zmoe archive is opened (and its experts start
decoding) before torch is imported, torch's native core is mapped beside that (``zipmoe_run.startup``),
and a successful run ends without tearing the interpreter down."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# the console script, with an atexit handler standing for the interpreter's teardown, and a record of
# whether torch had been imported when the archive was opened
_CHILD = """
import atexit, sys
atexit.register(lambda: print("TEARDOWN", file=sys.stderr, flush=True))
import zipmoe_run.archive_source as A
init = A.ArchiveSource.__init__
def spy(self, *a, **k):
    print("OPEN torch=" + str("torch" in sys.modules), file=sys.stderr, flush=True)
    init(self, *a, **k)
A.ArchiveSource.__init__ = spy
import zipmoe_run.startup as W
warm = W.warm_torch_libs
def warm_spy():
    t = warm()
    print("WARM " + ("started" if t is not None else "none"), file=sys.stderr, flush=True)
    return t
W.warm_torch_libs = warm_spy
import zipmoe_run.tokenizer as T
tok_init = T.TokenizerLoad.__init__
def tok_spy(self, source):
    print("TOKENIZER started", file=sys.stderr, flush=True)
    tok_init(self, source)
T.TokenizerLoad.__init__ = tok_spy
import zipmoe_run.cli as C
note = C._note
def note_spy(line):
    note(line)
    print("RICH " + str(any(m.split(".")[0] == "rich" for m in sys.modules)), file=sys.stderr, flush=True)
C._note = note_spy
from zipmoe_run.cli import main
sys.argv = ["zipmoe-run"] + sys.argv[1:]
main()
"""


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def archive(store_archive):
    return store_archive(3)[0]


def test_archive_opens_before_torch_and_success_skips_teardown(archive):
    r = _run(archive, "--prompt-ids", "5,6,7", "-n", "4", "--json", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "OPEN torch=False" in r.stderr and "TOKENIZER started" in r.stderr  # parsed beside torch's import
    assert ("WARM started" if sys.platform.startswith("linux") else "WARM none") in r.stderr
    obj = json.loads(r.stdout)  # the whole output arrived before the process ended
    assert len(obj["token_ids"]) == 4
    assert obj["stats"]["preloaded"] == obj["stats"]["experts_decoded"] > 0  # no budget: all decoded at load
    assert "TEARDOWN" not in r.stderr


def test_a_successful_run_prints_without_importing_rich(archive):
    """rich costs some 50 ms of start-up; a run's text and stats line are written directly."""
    r = _run(archive, "--prompt-ids", "5,6,7", "-n", "2", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "gen 2 tok" in r.stderr and "RICH False" in r.stderr


def test_failure_exits_the_ordinary_way(archive):
    r = _run(archive, "--prompt-ids", "5,6,7", "-n", "4", "--dtype", "int3")
    assert r.returncode != 0
    assert "unknown dtype" in r.stderr and "Traceback" not in r.stderr
    assert "TEARDOWN" in r.stderr


def test_bad_archive_after_warm_up_is_one_line(tmp_path):
    bad = tmp_path / "bad.zmoe"
    bad.write_bytes(b"not an archive" * 100)
    r = _run(bad, "--prompt-ids", "5,6,7", "-n", "4")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(("OPEN", "WARM", "TEARDOWN"))]
    assert len(lines) == 1 and str(bad) in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "TEARDOWN" in r.stderr  # an ordinary exit after the warm-up


_WARM_CHILD = """
import os, sys
from zipmoe_run.startup import warm_torch_libs
def mapped():
    with open("/proc/self/maps") as f:
        return "libtorch_cpu.so" in f.read()
before = mapped()
os.environ["ZIPMOE_NO_WARM"] = "1"
print("off", warm_torch_libs(), mapped())
del os.environ["ZIPMOE_NO_WARM"]
t = warm_torch_libs()
t.join()
print("before", before, "after", mapped(), "torch", "torch" in sys.modules)
import torch
x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
print("sum", int(x.sum()), "mm", (x @ x.T).tolist())
print("again", warm_torch_libs())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm-up maps libtorch_cpu.so on Linux only")
def test_warm_up_maps_torch_core_before_import():
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_NO_WARM"}
    r = subprocess.run([sys.executable, "-c", _WARM_CHILD], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "off None False"  # ZIPMOE_NO_WARM=1: nothing done
    assert lines[1] == "before False after True torch False"  # mapped by the warm-up, torch not imported
    assert lines[2] == "sum 15 mm [[5.0, 14.0], [14.0, 50.0]]"  # torch's import uses the mapped library
    assert lines[3] == "again None"  # nothing to do once torch is imported
