"""Shared CLI plumbing: one-line errors, --debug tracebacks, progress bars, byte formatting.

Only CLI modules import this (library code logs and never prints). It depends on typer, rich and
``formats`` alone, so the runtime's and the packer's command lines use it without importing the
umbrella ``zipmoe`` package or the benchmarks.

Error policy of every entry point:

* a usage error (unknown option, missing argument, a value out of range) is ``error: ...`` on one
  line of stderr and exit status 2 (``OneLineGroup`` / ``OneLineCommand``; ``--help`` is unchanged);
* bad input (a ``ZmoeError``, an ``OSError`` naming a file, a resource the machine lacks) is one
  line and exit status 1 (``guarded``), with the traceback only under ``--debug``;
* anything else is a bug: the traceback, then one line asking to report it, exit status 1.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from formats.errors import ZmoeError


def _base(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if c.__name__ == name)


# click's exception classes, from typer's public BadParameter: typer >= 0.20 carries its own copy of
# click, older typer uses click itself
_UsageError = _base(typer.BadParameter, "UsageError")
_ClickException = _base(typer.BadParameter, "ClickException")
_NoArgsIsHelpError = getattr(sys.modules[_UsageError.__module__], "NoArgsIsHelpError", ())

class _LazyConsole:
    """A rich ``Console`` made at its first use: a run that prints nothing through rich (``zipmoe-run``'s
    usual path writes its text and stats line itself) does not import rich (some 50 ms of start-up)."""

    def __init__(self, **settings: Any) -> None:
        self._settings, self._console = settings, None

    @property
    def console(self):
        """The ``rich.console.Console`` itself (for rich APIs that take one)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._settings)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


err = _LazyConsole(stderr=True, highlight=False)
out = _LazyConsole(highlight=False)

REPORT = "this is a bug in zipmoe: please report it with the traceback above"
# OSErrors that say something about the machine, not about the program: one line even without a file name
_ENVIRONMENT_ERRNOS = frozenset(getattr(errno, n) for n in (
    "ENOSPC", "EDQUOT", "ENOMEM", "EMFILE", "ENFILE", "EIO", "EROFS", "EACCES", "EPERM", "EAGAIN", "ENODEV",
    "ENXIO", "EFBIG", "ETIMEDOUT") if hasattr(errno, n))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def error_line(msg: object) -> None:
    """Print ``error: MSG`` as one literal line on stderr (no markup is interpreted)."""
    from rich.text import Text

    line = " ".join(str(msg).splitlines()) or "unknown error"
    err.print(Text.assemble(("error: ", "bold red"), line), soft_wrap=True)


def fail(msg: str, code: int = 1) -> None:
    """Print ``error: MSG`` as one literal line on stderr (no markup is interpreted) and exit."""
    error_line(msg)
    raise typer.Exit(code)


# The most worker threads an option accepts, as formats.decoder.MAX_THREADS and the packer: far above
# any useful count (more threads than cores only contend), low enough to refuse a typo such as 100000,
# which crashed the runtime, before any thread is started. Independent of the host's core count.
MAX_THREADS = 1024


def check_threads(value: int | None, *, zero_means_all: bool = False) -> int | None:
    """Typer callback body: ``value`` within 1 .. MAX_THREADS (0 allowed when it means all cores)."""
    if value is None or (zero_means_all and value == 0):
        return value
    if not 1 <= value <= MAX_THREADS:
        lo = "0 (all cores)" if zero_means_all else "1"
        raise typer.BadParameter(f"must be between {lo} and {MAX_THREADS}; got {value}")
    return value


def threads_option(value: int | None) -> int | None:
    """Typer callback for a ``--threads`` / ``--cores`` option: 1 .. MAX_THREADS."""
    return check_threads(value)


def threads_or_all_option(value: int | None) -> int | None:
    """Typer callback for a ``--threads`` option where 0 means all cores."""
    return check_threads(value, zero_means_all=True)


def _os_error_line(e: OSError) -> str | None:
    """The one line for an OSError that is the user's or the machine's problem; None for a likely bug."""
    name = e.filename
    if name is not None:
        two = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{os.fsdecode(name) if isinstance(name, bytes) else name}{two}: {e.strerror or e}"
    if e.errno in _ENVIRONMENT_ERRNOS:
        return e.strerror or str(e)
    return None


def _bug(e: BaseException) -> None:
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    error_line(f"unexpected {type(e).__name__}: {e}; {REPORT}")
    raise typer.Exit(1)


@contextlib.contextmanager
def guarded(debug: bool, code: int = 1, expected: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Expected failures become one line on stderr and exit ``code`` (the traceback only with
    --debug); an unexpected exception prints its traceback and a line asking to report the bug.

    Expected: a ``ZmoeError``, an ``OSError`` naming a file or a resource the machine lacks, memory,
    Ctrl-C, and the exception types in ``expected``.
    """
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        yield
    except (typer.Exit, typer.Abort, _ClickException):
        raise  # exits and usage errors: the command class prints them
    except (ZmoeError, *expected) as e:
        if debug:
            raise
        fail(str(e), code)
    except BrokenPipeError:  # stdout closed by the reader (`| head`): stop quietly
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        raise typer.Exit(1) from None
    except OSError as e:
        if debug:
            raise
        line = _os_error_line(e)
        if line is None:
            _bug(e)
        fail(line, code)
    except KeyboardInterrupt:
        if debug:
            raise
        fail("interrupted", 130)
    except MemoryError:
        if debug:
            raise
        fail("out of memory", code)
    except Exception as e:  # noqa: BLE001 - a bug: show where
        if debug:
            raise
        _bug(e)


def _usage_line(e: Any, prog_name: str | None) -> str:
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else (prog_name or os.path.basename(sys.argv[0]) or "zipmoe")
    msg = e.format_message() if hasattr(e, "format_message") else str(e)
    if isinstance(e, _UsageError):
        return f"{path}: {msg} (see {path} --help)"
    return f"{path}: {msg}"


class _OneLineMain:
    """Run the command with ``standalone_mode=False`` and print click's usage errors as one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,  # type: ignore[misc]
                                standalone_mode=False, **extra)
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,  # type: ignore[misc]
                              standalone_mode=False, **extra)
        except _NoArgsIsHelpError as e:  # bare `zipmoe`: the help text, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except _ClickException as e:
            error_line(_usage_line(e, prog_name))
            sys.exit(e.exit_code)
        except typer.Abort:
            error_line("aborted")
            sys.exit(1)
        # standalone_mode=False returns the exit code of typer.Exit, or the command's return value
        sys.exit(rv if isinstance(rv, int) else 0)


class OneLineCommand(_OneLineMain, TyperCommand):
    """A typer command whose usage errors are one ``error: ...`` line and exit status 2."""


class OneLineGroup(_OneLineMain, TyperGroup):
    """A typer group whose usage errors (its own and its subcommands') are one line and exit status 2."""


def single_command_app(command: Callable[..., Any], help: str | None = None, **settings: Any) -> typer.Typer:
    """A one-command typer app (``zipmoe-run``, ``zipmoe-pack``) with one-line usage errors."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=help)
    app.command(cls=OneLineCommand, **settings)(command)
    return app


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yields a callback (done, total) drawing a byte progress bar on stderr."""
    if not enabled or not err.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err.console, transient=True) as p:
        task = p.add_task(label, total=None)

        def cb(done: int, total: int) -> None:
            p.update(task, completed=done, total=total)

        yield cb


def is_debug() -> bool:
    return "--debug" in sys.argv
