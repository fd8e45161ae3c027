"""Where the archive goes: checks on the output path, the temporary file, and signals while writing.

The archive is written to `.OUT.tmp-PID` beside OUT and renamed over OUT when complete, so OUT is
either the old file or the whole new archive. This module makes sure that

- OUT never replaces or hides an input: it may not lie in a folder being packed, nor be (by path,
  symlink or hard link) one of the input files;
- SIGTERM and SIGHUP end a pack like Ctrl-C does (``Terminated``, a ``KeyboardInterrupt``), so the
  temporary file is removed; a run killed outright (``kill -9``, power loss) leaves its temporary file,
  which the next pack to the same OUT removes once its process is gone and its lock is free.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from formats.errors import InputError
from zipmoe_pack.scan import Checkpoint

try:
    import fcntl
except ImportError:  # not POSIX: no locks, no stale-file cleanup
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while packing; raised in the main thread, like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def tmp_path(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def check_output(out: Path, ck: Checkpoint) -> None:
    """Refuse an OUT that lies in a packed folder or is one of the input files."""
    targets = {out.parent.resolve() / out.name}
    if out.is_symlink():
        targets.add(out.resolve())
    try:
        ost = os.stat(out)
    except OSError:
        ost = None
    for f in ck.files:
        same = Path(os.path.realpath(f.abspath)) in targets
        if not same and ost is not None:
            try:
                fst = os.stat(f.abspath)
            except OSError:
                continue
            same = (fst.st_dev, fst.st_ino) == (ost.st_dev, ost.st_ino)
        if same:
            raise InputError(f"{out}: output path is the input file {f.abspath}; write the archive elsewhere")
    for t in targets:
        if any(t.parent == d or d in t.parent.parents for d in ck.folders):
            raise InputError(f"{out}: output path is inside the checkpoint folder {ck.root} (it would overwrite "
                             f"or join the input); write the archive elsewhere")


def lock(fh) -> None:
    """Mark a temporary file as in use (released by the kernel when its process dies)."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove `.OUT.tmp-PID` files (this tool's own naming, beside OUT) of processes that are gone."""
    if fcntl is None or os.name != "posix":
        return
    prefix = f".{out.name}.tmp-"
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):]
        if not name.startswith(prefix) or not (pid.isascii() and pid.isdigit() and len(pid) <= 10):
            continue
        if int(pid) == os.getpid() or _alive(int(pid)):
            continue
        p = out.parent / name
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # locked: a packer in another PID namespace is still writing it
            os.unlink(p)
            log.warning("removed %s (%d bytes), left by an earlier pack (process %s) that did not finish",
                        p, st.st_size, pid)
        except OSError:
            continue
        finally:
            os.close(fd)


class TermGuard:
    """While active (main thread only, and only where SIGTERM/SIGHUP have their default action), those
    signals raise `Terminated`; inside `holding()` they wait until the block is done, so cleanup is
    never cut short."""

    def __init__(self) -> None:
        self._prev: dict[int, object] = {}
        self._fired: int | None = None
        self._raised = self._hold = False

    def _handler(self, signum, frame) -> None:
        if self._fired is None:
            self._fired = signum
        if not self._hold and not self._raised:
            self._raised = True
            raise Terminated(signum)

    def __enter__(self) -> "TermGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                with contextlib.suppress(ValueError, OSError):
                    if signal.getsignal(sig) is signal.SIG_DFL:  # a handler of the caller is left alone
                        self._prev[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        self._hold = True
        try:
            yield
        finally:
            self._hold = False
        if self._fired is not None and not self._raised:
            self._raised = True
            raise Terminated(self._fired)
