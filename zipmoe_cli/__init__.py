"""Shared CLI plumbing: one-line errors, --debug tracebacks, progress bars, byte formatting.

Only CLI modules import this (library code logs and never prints). It depends on typer, rich and
``formats`` alone, so the runtime's and the packer's command lines use it without importing the
umbrella ``zipmoe`` package or the benchmarks.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from formats.errors import ZmoeError

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def fail(msg: str, code: int = 1) -> None:
    """Print ``error: MSG`` as one literal line on stderr (no markup is interpreted) and exit."""
    line = " ".join(str(msg).split("\n"))
    err.print(Text.assemble(("error: ", "bold red"), line), soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def guarded(debug: bool) -> Iterator[None]:
    """Turn every expected failure into one line on stderr and a non-zero exit (traceback with --debug)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        yield
    except typer.Exit:
        raise
    except (ZmoeError, OSError) as e:
        if debug:
            raise
        fail(str(e) if isinstance(e, ZmoeError) else f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}")
    except KeyboardInterrupt:
        if debug:
            raise
        fail("interrupted", 130)
    except MemoryError:
        if debug:
            raise
        fail("out of memory")


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yields a callback (done, total) drawing a byte progress bar on stderr."""
    if not enabled or not err.is_terminal:
        yield lambda done, total: None
        return
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True) as p:
        task = p.add_task(label, total=None)

        def cb(done: int, total: int) -> None:
            p.update(task, completed=done, total=total)

        yield cb


def is_debug() -> bool:
    return "--debug" in sys.argv
