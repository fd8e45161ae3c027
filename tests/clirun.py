"""Run the `zipmoe` command line in a child process and check the one-line error contract."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def zipmoe(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    code = "import sys; from zipmoe.cli import main; sys.argv = ['zipmoe'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, **kw)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """A non-zero exit, no traceback, exactly one stderr line holding every needle; returns the line."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
