"""`zipmoe-run`'s start-up and exit (issue 12): a .zmoe archive is opened (and its experts start
decoding) before torch is imported, and a successful run ends without tearing the interpreter down."""
from __future__ import annotations

import json
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
    assert "OPEN torch=False" in r.stderr
    obj = json.loads(r.stdout)  # the whole output arrived before the process ended
    assert len(obj["token_ids"]) == 4
    assert obj["stats"]["preloaded"] == obj["stats"]["experts_decoded"] > 0  # no budget: all decoded at load
    assert "TEARDOWN" not in r.stderr


def test_failure_exits_the_ordinary_way(archive):
    r = _run(archive, "--prompt-ids", "5,6,7", "-n", "4", "--dtype", "int3")
    assert r.returncode != 0
    assert "unknown dtype" in r.stderr and "Traceback" not in r.stderr
    assert "TEARDOWN" in r.stderr
