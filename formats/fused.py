"""Decode a list of chunks in one compiled call: checksums, ``huf4x`` exponents and merge, no GIL.

The per-chunk path (``formats.decoder.decode_chunk``) runs Python between its steps: python-xxhash
verifies the coded data and the sm plane with the interpreter lock held, the ``huf4x`` header is parsed
in Python, and the Huffman loop and the merge are two kernel calls, each giving the lock up and taking it
back. A decoder thread therefore takes the lock from the thread that computes (or imports ``torch`` at
start-up) several times per chunk; with two cores shared by three busy threads each hand-over can wait for
a scheduler slot. ``decode_chunks`` does all of it for a whole list of chunks in one ``nogil`` call: the
checksums through the native ``XXH3_64bits`` (``formats.xxh3_native``, called by address, so the kernel
stays cacheable), the header checks of ``formats.huf4x`` (the same rules, specs/zmoe.md 3.3.1), the
four-stream decode and the merge.

It handles ``raw`` chunks and ``bf16-split`` chunks coded with ``huf4x``; anything else (``zstd-lit``,
whose decoder is zstd's) is not ``eligible`` and goes the per-chunk way. The kernel stops at the first
chunk it rejects and returns its index: the caller re-runs that chunk through the per-chunk path, which
raises the precise one-line error, so both paths report failures identically. Chunks before it are
written, as with the per-chunk path run in order.

Thread-safe for distinct outputs; the scratch buffer belongs to the calling thread.
"""
from __future__ import annotations

import sys

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from formats.chunkref import KIND_BF16_SPLIT, KIND_RAW, as_u8, check_out, check_ref, ref_out_size
from formats.huf4x import _LEN_AT, _N_AT, _SIZES_AT, CONSTANT_BYTES, HEADER_BYTES, MODE_CONSTANT, MODE_HUFFMAN
from formats.huf4x_kernels import STREAMS, decode_streams, tables_from_lengths
from formats.planes import _merge_bytes_kernel, _merge_kernel
from formats.xxh3_native import address as xxh3_address

__all__ = ["CODEC", "KIND_RAW_ID", "KIND_HUF4X_ID", "available", "decode_chunks", "describe", "eligible", "hash_many"]

CODEC = "huf4x"
KIND_RAW_ID, KIND_HUF4X_ID = 0, 1
# descriptor columns
D_DATA, D_DLEN, D_SM, D_N, D_OUT, D_KIND = range(6)
DESC_COLS = 6


@intrinsic
def _u8ptr(typingctx, addr):  # pragma: no cover - compiled
    """An int64 address as a ``uint8*`` (the caller keeps the memory alive and checks the length)."""
    sig = types.CPointer(types.uint8)(addr)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return sig, codegen


@intrinsic
def _call_xxh3(typingctx, fn, addr, n):  # pragma: no cover - compiled
    """``((uint64_t (*)(const void *, size_t)) fn)(addr, n)``."""
    sig = types.uint64(fn, addr, n)

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.IntType(64), [i8p, ir.IntType(64)])
        f = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(f, [builder.inttoptr(args[1], i8p), args[2]])
    return sig, codegen


@njit(nogil=True, cache=True)
def _u32(buf, at):  # pragma: no cover - compiled
    return (np.int64(buf[at]) | (np.int64(buf[at + 1]) << 8) | (np.int64(buf[at + 2]) << 16)
            | (np.int64(buf[at + 3]) << 24))


@njit(nogil=True, cache=True)
def _huf4x(data, n, exp, packed, tabs_ok, multi, single, starts, ends, segs):  # pragma: no cover - compiled
    """Decode one huf4x chunk into ``exp[:n]``; the tables of the previous chunk are reused when its code
    lengths (``packed``) are the same. Returns (ok, multi, single, tables valid)."""
    size = data.shape[0]
    if size < _LEN_AT or data[0] > MODE_HUFFMAN or _u32(data, _N_AT) != n:
        return False, multi, single, tabs_ok
    if data[0] == MODE_CONSTANT:
        if size != CONSTANT_BYTES:
            return False, multi, single, tabs_ok
        exp[:n] = data[_LEN_AT]
        return True, multi, single, tabs_ok
    if size < HEADER_BYTES:
        return False, multi, single, tabs_ok
    pos = HEADER_BYTES
    total = 0
    for s in range(STREAMS):
        sz = _u32(data, _SIZES_AT + 4 * s)
        starts[s] = pos
        pos += sz
        ends[s] = pos
        total += sz
    if pos != size or (n == 0 and total != 0):
        return False, multi, single, tabs_ok
    same = tabs_ok
    for k in range(_SIZES_AT - _LEN_AT):
        if packed[k] != data[_LEN_AT + k]:
            same = False
            packed[k] = data[_LEN_AT + k]
    if not same:
        status, _d, _k, multi, single = tables_from_lengths(packed)
        if status != 0:
            return False, multi, single, False
    q = (n + STREAMS - 1) // STREAMS
    for s in range(STREAMS + 1):
        segs[s] = min(s * q, n)
    return decode_streams(data, starts, ends, multi, single, exp[:n], segs) == 0, multi, single, True


@njit(nogil=True, cache=True)
def _decode_chunks(desc, sums, out, scratch, fn, verify):  # pragma: no cover - compiled
    """Decode every chunk of ``desc`` (int64 [k, DESC_COLS]) into ``out``; ``sums`` (uint64 [k, 2]):
    the stored xxh3 of the data and of the sm plane. -1, or the index of the first rejected chunk."""
    packed = np.zeros(_SIZES_AT - _LEN_AT, np.uint8)
    multi = np.zeros(0, np.uint64)
    single = np.zeros(0, np.uint64)
    tabs_ok = False
    starts = np.empty(STREAMS, np.int64)
    ends = np.empty(STREAMS, np.int64)
    segs = np.empty(STREAMS + 1, np.int64)
    base = out.ctypes.data
    for j in range(desc.shape[0]):
        dlen = desc[j, D_DLEN]
        n = desc[j, D_N]
        off = desc[j, D_OUT]
        if verify and _call_xxh3(fn, desc[j, D_DATA], dlen) != sums[j, 0]:
            return j
        data = carray(_u8ptr(desc[j, D_DATA]), (dlen,))
        if desc[j, D_KIND] == KIND_RAW_ID:
            if dlen != n:
                return j
            out[off:off + n] = data
            continue
        if verify and _call_xxh3(fn, desc[j, D_SM], n) != sums[j, 1]:
            return j
        ok, multi, single, tabs_ok = _huf4x(data, n, scratch, packed, tabs_ok, multi, single, starts, ends, segs)
        if not ok:
            return j
        sm = carray(_u8ptr(desc[j, D_SM]), (n,))
        dst = out[off:off + 2 * n]
        if (base + off) % 2 == 0:
            _merge_kernel(scratch[:n], sm, dst.view(np.uint16))
        else:
            _merge_bytes_kernel(scratch[:n], sm, dst)
    return -1


def available(verify: bool = True) -> bool:
    """Whether ``decode_chunks`` can run here: a little-endian host and, to verify, a native xxh3."""
    return sys.byteorder == "little" and (not verify or xxh3_address() != 0)


def decode_chunks(desc: np.ndarray, sums: np.ndarray, out: np.ndarray, scratch: np.ndarray, verify: bool) -> int:
    """Run the kernel (see the module docstring). ``desc``'s addresses must point at live buffers of the
    given lengths (raw chunks: data length == n; bf16-split: an sm plane of n bytes), every output range
    inside ``out``, ``scratch`` at least the largest n. -1, or the first rejected chunk's index."""
    return int(_decode_chunks(desc, sums, out, scratch, xxh3_address() if verify else 0, verify))


def eligible(ref) -> bool:
    """Whether the kernel decodes ``ref`` (a raw chunk, or a bf16-split one coded with huf4x)."""
    return ref.kind == KIND_RAW or (ref.kind == KIND_BF16_SPLIT and ref.codec == CODEC)


_U64 = 1 << 64


def describe(refs, out: np.ndarray, verify: bool):
    """(desc, sums, buffers to keep alive, largest n) for ``refs`` into ``out``, or None where the fused
    kernel must not take them: not ``available``, a chunk not ``eligible``, or anything the per-chunk path
    rejects before decoding (a malformed ref, a size mismatch, an output range outside ``out``, a missing
    checksum): that path then raises its error."""
    if not refs or not available(verify) or not all(eligible(r) for r in refs):
        return None
    try:
        check_out(out)
        for ref in refs:
            check_ref(ref)
    except Exception:  # noqa: BLE001 - the per-chunk path raises it, naming the chunk
        return None
    k = len(refs)
    desc = np.zeros((k, DESC_COLS), np.int64)
    sums = np.zeros((k, 2), np.uint64)
    keep = []
    nmax = 0
    for j, ref in enumerate(refs):
        n, off = int(ref.n), int(ref.out_offset)
        if off + ref_out_size(ref) > out.shape[0]:
            return None
        data = as_u8(ref.data)
        raw = ref.kind == KIND_RAW
        sm = None if raw else as_u8(ref.sm)
        if (raw and data.shape[0] != n) or (sm is not None and sm.shape[0] != n):
            return None
        if verify:
            stored = (ref.data_xxh3,) if raw else (ref.data_xxh3, ref.sm_xxh3)
            if any(v is None or not 0 <= int(v) < _U64 for v in stored):
                return None
            sums[j, :len(stored)] = [int(v) for v in stored]
        desc[j] = (data.ctypes.data, data.shape[0], 0 if raw else sm.ctypes.data, n, off,
                   KIND_RAW_ID if raw else KIND_HUF4X_ID)
        keep.append((data, sm))
        nmax = max(nmax, 0 if raw else n)
    return desc, sums, keep, nmax


@njit(nogil=True, cache=True)
def _hash_many(fn, addrs, lens, out):  # pragma: no cover - compiled
    for j in range(addrs.shape[0]):
        out[j] = _call_xxh3(fn, addrs[j], lens[j])


def hash_many(buf: np.ndarray, spans) -> np.ndarray | None:
    """xxh3-64 of each ``(start, length)`` span of ``buf`` (a contiguous uint8 array), in one GIL-free call
    (the pages of a file mapping fault in inside it); None where no native xxh3 exists."""
    fn = xxh3_address()
    if not fn:
        return None
    spans = np.asarray(spans, np.int64).reshape(-1, 2)
    if spans.size and (spans.min() < 0 or int((spans[:, 0] + spans[:, 1]).max()) > buf.shape[0]):
        raise ValueError("a span lies outside the buffer")
    out = np.zeros(spans.shape[0], np.uint64)
    _hash_many(fn, buf.ctypes.data + spans[:, 0], np.ascontiguousarray(spans[:, 1]), out)
    return out
