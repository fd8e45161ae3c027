"""Every entry point: a usage error is one ``error: ...`` line and exit 2; --help still works; bad
input is one line; an unexpected exception (a bug) shows its traceback and asks to be reported."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from formats.errors import InputError
from zipmoe_cli import MAX_THREADS, REPORT, guarded, single_command_app

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"zipmoe": "zipmoe.cli", "zipmoe-pack": "zipmoe_pack.cli", "zipmoe-run": "zipmoe_run.cli"}


def entry(prog: str, *args: object) -> subprocess.CompletedProcess:
    """Run an installed entry point's main() as its console script would."""
    code = f"import sys; from {MAINS[prog]} import main; sys.argv = [{prog!r}] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def one_line(r, code: int | None, *needles: str) -> str:
    """One ``error:`` line on stderr, no traceback or box; exit ``code`` (None: any non-zero)."""
    assert r.returncode == code if code is not None else r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "╭" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


USAGE = [
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--max-new-tokens", "-1"], ["--max-new-tokens"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--threads", "0"], ["--threads", f"1 and {MAX_THREADS}"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--threads", "100000"], ["--threads", "100000"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--temperature", "-1"], ["--temperature"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--greedy", "--temperature", "nan"], ["--temperature"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--top-p", "1.5"], ["--top-p"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--top-k", "-1"], ["--top-k"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--seed", "-1"], ["--seed"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--memory-budget", "lots"], ["--memory-budget", "lots"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "-m", "0%"], ["--memory-budget"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--prefetch", "maybe"], ["--prefetch", "maybe"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--preload", "maybe"], ["--preload", "maybe"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1", "--no-such-option"], ["--no-such-option"]),
    ("zipmoe-run", [], ["Missing argument"]),
    ("zipmoe-run", ["m"], ["--prompt"]),
    ("zipmoe-run", ["m", "--prompt-ids", "1,x"], ["--prompt-ids"]),
    # the packer checks --chunk-elements in PackOptions (exit 1 or 2 both fine: one line is the point)
    ("zipmoe-pack", ["a", "b", "--chunk-elements", "3"], ["--chunk-elements", "power of two"]),
    ("zipmoe-pack", ["a"], ["Missing argument"]),
    ("zipmoe-pack", ["a", "b", "--bogus"], ["--bogus"]),
    ("zipmoe", ["pack", "a", "b", "--chunk-elements", "3"], ["--chunk-elements"]),
    ("zipmoe", ["run", "m", "--prompt-ids", "1", "-n", "-1"], ["--max-new-tokens"]),
    ("zipmoe", ["verify"], ["Missing argument"]),
    ("zipmoe", ["no-such-command"], ["no-such-command"]),
    ("zipmoe", ["bench", "e2e", "--bogus"], ["--bogus"]),
    ("zipmoe", ["bench", "run", "--threads", "0"], ["--threads"]),
    ("zipmoe", ["bench", "io", "--cores", "100000"], ["--cores"]),
    ("zipmoe", ["bench", "e2e", "--systems", "nope"], ["--systems", "nope"]),
]


@pytest.mark.parametrize("prog,args,needles", USAGE, ids=[" ".join([p, *a]) for p, a, _ in USAGE])
def test_usage_error_is_one_line(tmp_path, prog, args, needles):
    r = entry(prog, *[str(tmp_path / a) if a == "m" else a for a in args])
    one_line(r, None if "--chunk-elements" in args else 2, *needles)
    assert r.stdout == ""


@pytest.mark.parametrize("prog,args", [("zipmoe", []), ("zipmoe", ["bench", "e2e"]), ("zipmoe", ["run"]),
                                       ("zipmoe-run", []), ("zipmoe-pack", [])])
def test_help_still_works(prog, args):
    r = entry(prog, *args, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "--help" in r.stdout and r.stderr == ""


def test_bare_umbrella_shows_help():
    r = entry("zipmoe")
    assert r.returncode == 2 and "Usage" in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_threads_at_the_bound_is_accepted(tmp_path):
    """--threads MAX_THREADS passes validation (the run then fails on the missing checkpoint)."""
    r = entry("zipmoe-run", tmp_path / "none", "--prompt-ids", "1", "--threads", MAX_THREADS)
    one_line(r, 1, "none")


# ---- guarded: expected failures one line, bugs with their traceback ----

def _app(exc: BaseException, debug: bool = False):
    def cmd() -> None:
        with guarded(debug):
            raise exc
    return single_command_app(cmd)


def _invoke(exc: BaseException, debug: bool = False):
    return CliRunner().invoke(_app(exc, debug), [])


def _lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize("exc,needle", [
    (InputError("m/config.json: hidden_size must be positive, got -64"), "hidden_size"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/[/]y"), "/x/[/]y: No such file"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left"),
    (MemoryError(), "out of memory"),
])
def test_expected_failures_are_one_line(exc, needle):
    r = _invoke(exc)
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    lines = _lines(r)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


@pytest.mark.parametrize("exc", [KeyError("k"), TypeError("bad operand"), AttributeError("x"),
                                 OSError(errno.EINVAL, "Invalid argument")])
def test_bug_shows_traceback_and_asks_for_a_report(exc):
    r = _invoke(exc)
    assert r.exit_code == 1
    assert "Traceback" in r.stderr and type(exc).__name__ in r.stderr
    assert _lines(r)[-1].startswith("error: ") and REPORT in _lines(r)[-1]


def test_debug_reraises_expected_failures():
    r = _invoke(InputError("bad input"), debug=True)
    assert r.exit_code == 1 and isinstance(r.exception, InputError)


def test_interrupt_exits_130():
    r = _invoke(KeyboardInterrupt())
    assert r.exit_code == 130 and _lines(r) == ["error: interrupted"]


def test_usage_error_raised_inside_guarded_is_one_line():
    def cmd() -> None:
        with guarded(False):
            raise typer.BadParameter("--chunk-elements must be a power of two")
    r = CliRunner().invoke(single_command_app(cmd), [])
    assert r.exit_code == 2 and len(_lines(r)) == 1 and "power of two" in r.stderr


# ---- zipmoe-run: errors the library raises ----

@pytest.fixture
def run_app():
    from zipmoe_run.cli import app
    return app


def _run_with_load(monkeypatch, run_app, tmp_path, exc):
    import zipmoe_run.api

    def load(*a, **k):
        raise exc
    monkeypatch.setattr(zipmoe_run.api, "load", load)
    return CliRunner().invoke(run_app, [str(tmp_path), "--prompt-ids", "1"])


def test_run_library_input_error_is_one_line(monkeypatch, run_app, tmp_path):
    from zipmoe_run.store.state import StoreError

    for exc in (InputError(f"{tmp_path}/config.json: hidden_size must be a positive integer, got -64"),
                StoreError("expert 3 of layer 1: decoded bytes differ [red]x[/]")):
        r = _run_with_load(monkeypatch, run_app, tmp_path, exc)
        assert r.exit_code == 1 and "Traceback" not in r.stderr
        assert _lines(r) == [f"error: {exc}"]  # literally, markup-like text included


def test_run_bug_shows_traceback(monkeypatch, run_app, tmp_path):
    r = _run_with_load(monkeypatch, run_app, tmp_path, ZeroDivisionError("division by zero"))
    assert r.exit_code == 1 and "Traceback" in r.stderr and REPORT in _lines(r)[-1]


# ---- zipmoe bench: input errors one line (exit 2), bugs with their traceback ----

def _bench(*args):
    from zipmoe.bench.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def test_bench_programming_error_is_not_hidden(monkeypatch, tmp_path):
    import zipmoe.bench.e2e

    def boom(cfg):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
    monkeypatch.setattr(zipmoe.bench.e2e, "run", boom)
    r = _bench("e2e", "--quick", "--workdir", tmp_path, "--no-cap")
    assert r.exit_code == 1 and "Traceback" in r.stderr and "unsupported operand" in r.stderr
    assert REPORT in _lines(r)[-1]


def test_bench_input_error_is_one_line(monkeypatch, tmp_path):
    import zipmoe.bench.e2e
    from zipmoe.bench.errors import BenchInputError

    def bad(cfg):
        raise BenchInputError(f"no lm_head.weight in {tmp_path}")
    monkeypatch.setattr(zipmoe.bench.e2e, "run", bad)
    r = _bench("e2e", "--quick", "--workdir", tmp_path, "--no-cap")
    assert r.exit_code == 2 and _lines(r) == [f"error: no lm_head.weight in {tmp_path}"]


def test_bench_error_text_is_printed_literally(tmp_path):
    """A file name with rich markup in it: printed as is (it crashed the error printer before)."""
    name = tmp_path / "[/]odd[red].npy"
    r = _bench("cache", "--trace", name, "--expert-bytes", "10", "--budget", "1%")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert len(_lines(r)) == 1 and str(name) in r.stderr


def test_bench_unknown_system_is_one_line(tmp_path):
    r = _bench("run", "--size", "nope", "--runs", "1")
    assert r.exit_code == 2 and _lines(r) == ["error: unknown size 'nope' (known: small, demo, qwen1.5)"]


def test_os_error_without_file_name_is_not_blamed_on_input():
    """Before: any OSError became ': strerror' with an empty file name."""
    r = _invoke(OSError(errno.EBADF, "Bad file descriptor"))
    assert "Traceback" in r.stderr and not r.stderr.startswith("error: :")


def test_one_thread_bound_everywhere():
    """--threads has one upper bound in every command: the decoder's and the packer's."""
    from formats.decoder import MAX_THREADS as DECODER
    from zipmoe_pack.pack import MAX_THREADS as PACKER

    assert MAX_THREADS == DECODER == PACKER
