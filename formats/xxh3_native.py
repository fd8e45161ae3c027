"""The address of a native ``XXH3_64bits`` for compiled kernels that verify checksums without the GIL.

python-xxhash's ``xxh3_64_intdigest`` holds the interpreter lock while it hashes, so a decoder thread
that verifies a chunk's two checksums takes the lock away from the compute (or importing) thread
twice per chunk. The extension module that implements it also exports the C functions
(``XXH3_64bits_dispatch``: the build's runtime choice of SSE2, AVX2 or AVX-512; ``XXH3_64bits``: the
baseline build, about half as fast here), so a numba kernel can call one through its address
(``formats.fused``) with no lock held.

``address()`` returns that address, or 0 where no such symbol exists (another build of the module,
a platform whose loader hides it) or where the function disagrees with ``xxh3_64_intdigest`` on a
set of inputs of every length class XXH3 distinguishes (0, 1-3, 4-8, 9-16, 17-128, 129-240 bytes and
long inputs, unaligned too). Callers then keep the Python path. Looked up once per process;
``ZIPMOE_NATIVE_XXH3=0`` disables it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading

import numpy as np
import xxhash

__all__ = ["address", "reset"]

log = logging.getLogger(__name__)

SYMBOLS = ("XXH3_64bits_dispatch", "XXH3_64bits")  # fastest first
_PROBE_LENGTHS = (0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 4099, 65536 + 7)

_lock = threading.Lock()
_state: dict = {}


def _probe(fn) -> bool:
    """Whether ``fn`` (a ctypes function) hashes exactly as python-xxhash does."""
    data = np.random.default_rng(0x5eed).integers(0, 256, max(_PROBE_LENGTHS) + 1, dtype=np.uint8)
    for n in _PROBE_LENGTHS:
        view = data[1:1 + n]  # odd address: the native code must not assume alignment
        if fn(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(n)) != xxhash.xxh3_64_intdigest(view):
            return False
    return True


def _lookup() -> tuple[int, str]:
    if os.environ.get("ZIPMOE_NATIVE_XXH3", "1") == "0":
        return 0, "off (ZIPMOE_NATIVE_XXH3=0)"
    path = getattr(getattr(xxhash, "_xxhash", None), "__file__", None)
    if not path:
        return 0, "python-xxhash has no extension module file"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return 0, f"cannot load {path}: {exc}"
    for name in SYMBOLS:
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        fn.restype = ctypes.c_uint64
        if _probe(fn):
            return ctypes.cast(fn, ctypes.c_void_p).value or 0, name
        log.warning("%s in %s disagrees with xxh3_64_intdigest; not used", name, path)
    return 0, f"no usable XXH3_64bits symbol in {path}"


def address() -> int:
    """The native XXH3-64 function's address (``uint64_t f(const void *, size_t)``), or 0."""
    with _lock:
        if "addr" not in _state:
            _state["addr"], _state["what"] = _lookup()
            log.debug("native xxh3: %s", _state["what"] if _state["addr"] else f"none ({_state['what']})")
        return _state["addr"]


def reset() -> None:
    """Forget the lookup (tests that change ``ZIPMOE_NATIVE_XXH3``)."""
    with _lock:
        _state.clear()
