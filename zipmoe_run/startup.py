"""Start-up helpers of ``zipmoe-run`` (issue 12): work that can run beside the CLI's own start.

``warm_torch_libs()`` maps torch's native core (``libtorch_cpu.so``, about 0.2 s of relocations and
static initialisers) on a background thread while the archive is opened and its preload starts, so
that ``import torch`` later finds it loaded. It calls the C library's ``dlopen`` through ctypes, which
releases the GIL for the call (an ``import`` or ``ctypes.CDLL`` holds it), with the flags torch's own
import uses for that library (``RTLD_NOW | RTLD_LOCAL``: it is a dependency of ``torch._C``; torch
puts nothing of it in the global scope), so the process ends up with the same libraries, bound the
same way; only the moment they are loaded changes. Only the Python-free C++ core is loaded this way
(``libtorch_python.so``'s initialisers may use the Python API, which needs the GIL).

When: ``dlopen`` holds the dynamic loader's lock throughout, so any other library loaded meanwhile
(a C extension module imported by the main thread) waits for it. Started at the beginning of the
command, it stalled the imports of typer and numba (some 50 extension modules) by its whole 0.2 s; the
CLI starts it once numba and the store's modules are imported, beside the archive's opening (Python
only) and the first part of torch's import.

Anything unusual (not Linux, torch missing or laid out differently, torch imported already,
``ZIPMOE_NO_WARM=1``) makes it a no-op; a failed ``dlopen`` is logged at debug level and torch's
import then loads the library itself, as before.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["warm_torch_libs", "wait_warm", "TORCH_CORE_LIBS"]

log = logging.getLogger(__name__)

TORCH_CORE_LIBS = ("libtorch_cpu.so",)  # Python-free: safe to initialise without the GIL

_thread: threading.Thread | None = None


def _torch_lib_dir() -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    d = os.path.join(os.path.dirname(spec.origin), "lib")
    return d if os.path.isdir(d) else None


def _dlopen(paths: list[str]) -> None:
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        fn = libc.dlopen
    except (OSError, AttributeError):  # glibc < 2.34 keeps dlopen in libdl
        fn = ctypes.CDLL("libdl.so.2").dlopen
    fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    for p in paths:
        if not fn(os.fsencode(p), os.RTLD_NOW | os.RTLD_LOCAL):  # a plain CDLL call: the GIL is released
            log.debug("warm-up: dlopen(%s) failed; torch's import loads it", p)
            return


def warm_torch_libs() -> threading.Thread | None:
    """Start loading torch's native core on a daemon thread (see the module doc); the thread, or None
    when nothing is done. Nobody needs to wait for it: ``import torch`` waits on the dynamic loader's
    own lock if the load is still running."""
    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return None
    if os.environ.get("ZIPMOE_NO_WARM", "").strip() not in ("", "0"):
        return None
    d = _torch_lib_dir()
    paths = [os.path.join(d, n) for n in TORCH_CORE_LIBS] if d else []
    if not paths or not all(os.path.isfile(p) for p in paths):
        return None

    def run() -> None:
        try:
            _dlopen(paths)
        except Exception as exc:  # a warm-up only: torch's import does the real work
            log.debug("warm-up of torch's libraries skipped: %s", exc)

    global _thread
    if _thread is not None:
        return None
    _thread = threading.Thread(target=run, name="zipmoe-warm", daemon=True)
    _thread.start()
    return _thread


def wait_warm(timeout: float = 30.0) -> None:
    """Wait for the warm-up to end (a failing command calls it before the interpreter's finalisation,
    which a daemon thread inside ``dlopen`` must not meet). ``import torch`` also waits for it."""
    if _thread is not None:
        _thread.join(timeout)
