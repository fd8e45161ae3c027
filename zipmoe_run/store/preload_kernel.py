"""The bulk preload's compiled loop: read and decode a batch of experts in one call, without the GIL.

For each expert of the batch, ``run_batch`` reads its extent with ``pread`` (libc's, called by address,
retried on ``EINTR`` and on short reads until the file ends) into the lane's read buffer, then decodes its
chunks with ``formats.fused`` (checksums, huf4x, merge) into the expert's own decode buffer. It stops at the
first expert that fails and says how (``FAIL_*``), so the caller leaves that expert and the rest of the
batch to the ordinary fetch path, which reports the failure with its usual one-line error.

``libc()`` finds ``pread`` and ``__errno_location`` (glibc and musl); where either is missing, or on a
platform without them, it returns None and the store keeps its per-task preload.
"""
from __future__ import annotations

import ctypes
import errno
import sys
import threading

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from formats.fused import _decode_chunks, _u8ptr

__all__ = ["FAIL_NONE", "FAIL_READ", "FAIL_SHORT", "FAIL_DECODE", "libc", "run_batch"]

FAIL_NONE, FAIL_READ, FAIL_SHORT, FAIL_DECODE = 0, 1, 2, 3
_EINTR = errno.EINTR


@intrinsic
def _call_pread(typingctx, fn, fd, addr, n, offset):  # pragma: no cover - compiled
    """``((ssize_t (*)(int, void *, size_t, off_t)) fn)(fd, addr, n, offset)``."""
    sig = types.int64(fn, fd, addr, n, offset)

    def codegen(context, builder, sig, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        fnty = ir.FunctionType(i64, [i32, ir.IntType(8).as_pointer(), i64, i64])
        f = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(f, [builder.trunc(args[1], i32), builder.inttoptr(args[2], ir.IntType(8).as_pointer()),
                                args[3], args[4]])
    return sig, codegen


@intrinsic
def _call_errno(typingctx, fn):  # pragma: no cover - compiled
    """``*((int *(*)(void)) fn)()``: the calling thread's errno."""
    sig = types.int64(fn)

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(i32.as_pointer(), [])
        p = builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])
        return builder.sext(builder.load(p), ir.IntType(64))
    return sig, codegen


@njit(nogil=True, cache=True)
def _run_batch(fd, pread_fn, errno_fn, xxh3_fn, offs, lens, want, rbuf, outs, out_lens, first, desc, sums,
               scratch):  # pragma: no cover - compiled
    """Expert j: read ``lens[j]`` bytes at file offset ``offs[j]`` into ``rbuf`` (at least ``want[j]`` must
    arrive), decode ``desc[first[j]:first[j + 1]]`` into the ``out_lens[j]`` bytes at address ``outs[j]``.
    Returns (experts done, FAIL_*, detail: errno, bytes read or chunk index, bytes read in all)."""
    base = rbuf.ctypes.data
    total = 0
    for j in range(offs.shape[0]):
        got = 0
        while got < lens[j]:
            r = _call_pread(pread_fn, fd, base + got, lens[j] - got, offs[j] + got)
            if r < 0:
                e = _call_errno(errno_fn)
                if e == _EINTR:
                    continue
                return j, FAIL_READ, e, total
            if r == 0:
                break
            got += r
            total += r
            if got % 4096:  # a short, unaligned piece: the file ended (O_DIRECT cannot go on from there)
                break
        if got < want[j]:
            return j, FAIL_SHORT, got, total
        out = carray(_u8ptr(outs[j]), (out_lens[j],))
        bad = _decode_chunks(desc[first[j]:first[j + 1]], sums[first[j]:first[j + 1]], out, scratch, xxh3_fn, True)
        if bad >= 0:
            return j, FAIL_DECODE, bad, total
    return offs.shape[0], FAIL_NONE, 0, total


_lock = threading.Lock()
_libc: list = []


def libc() -> tuple[int, int] | None:
    """(address of ``pread``, of ``__errno_location``), or None where they cannot be found."""
    with _lock:
        if not _libc:
            found = None
            if sys.platform.startswith("linux"):
                try:
                    lib = ctypes.CDLL(None)
                    found = tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                                  for name in ("pread", "__errno_location"))
                except (OSError, AttributeError):
                    found = None
            _libc.append(found if found and found[0] and found[1] else None)
        return _libc[0]


def run_batch(fd: int, xxh3_fn: int, offs: np.ndarray, lens: np.ndarray, want: np.ndarray, rbuf: np.ndarray,
              outs: np.ndarray, out_lens: np.ndarray, first: np.ndarray, desc: np.ndarray, sums: np.ndarray,
              scratch: np.ndarray) -> tuple[int, int, int, int]:
    """See ``_run_batch``. The caller checked every offset, length and address against live buffers."""
    pread_fn, errno_fn = libc()
    done, fail, detail, total = _run_batch(fd, pread_fn, errno_fn, xxh3_fn, offs, lens, want, rbuf, outs, out_lens,
                                           first, desc, sums, scratch)
    return int(done), int(fail), int(detail), int(total)
