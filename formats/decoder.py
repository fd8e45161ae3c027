"""Decode the chunks of one or more tensors straight into a preallocated byte buffer, in parallel.

A :class:`ChunkRef` describes one independently decodable piece of a tensor: either a
``bf16-split`` chunk (entropy-coded exponent plane + raw sign+mantissa plane, ``n`` elements,
``2 * n`` output bytes; the exponent codec, ``zstd-lit`` or ``huf4x``, is the ref's ``codec``, on
which :meth:`~formats.codec.ChunkDecoder.decode_exp` dispatches) or a ``raw`` chunk (``n`` plain
bytes: dense, FP8 or stored-raw tensors).

:func:`decode_chunk` verifies the stored xxh3 checksums first, then decodes the exponents into the
decoder's per-thread scratch buffer and merges them with the sm plane straight into the output
slice: no full-size intermediate copies. :func:`decode_chunks` does the same for a list of chunks,
raw and huf4x ones in one GIL-free call (``formats.fused``: the native xxh3, the header checks, the
Huffman loop and the merge), the rest through :func:`decode_chunk`.

:class:`ParallelDecoder` fans the chunks out over a thread pool (each chunk through
:func:`decode_chunks`; zstd and the numba kernels release the GIL, python-xxhash does not); a caller
waiting for its chunks may decode queued ones on its own thread (:meth:`ParallelDecoder.help`). Each output byte is written by exactly one chunk, so the
result does not depend on the thread count, on who helped or on timing.

Thread safety: :func:`decode_chunk` is safe to call from several threads as long as each uses its
own :class:`~formats.codec.ChunkDecoder` and the output ranges are disjoint. :class:`ParallelDecoder`
is thread-safe: several threads may call ``decode``/``submit`` on one instance at once (their
chunks share the pool); ``close`` waits for submitted work.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as _wait_futures
from typing import Sequence

import numpy as np

from formats import fused
from formats.chunkref import KIND_BF16_SPLIT, KIND_RAW, ChunkRef, as_u8, check_layout, check_out, check_ref, \
    ref_out_size
from formats.codec import DEFAULT_CHUNK_ELEMS, DEFAULT_CODEC, ChunkDecoder, ChunkEncoder, checksum
from formats.errors import CodecError, CorruptDataError, ZmoeError
from formats.planes import merge_bf16, merge_bf16_le_bytes, split_bf16
from formats.workpool import WorkPool, spread_cpus, spread_default

__all__ = [
    "KIND_BF16_SPLIT",
    "KIND_RAW",
    "MAX_THREADS",
    "ThreadCountError",
    "ChunkRef",
    "ParallelDecoder",
    "check_layout",
    "decode_chunk",
    "decode_chunks",
    "encode_bf16_refs",
    "ref_out_size",
]

log = logging.getLogger(__name__)

_LITTLE = sys.byteorder == "little"

MAX_THREADS = 1024  # far above any useful count; refuses typos like 100000 before spawning threads


class ThreadCountError(CodecError, ValueError):
    """A thread count outside 1..MAX_THREADS (a ValueError too, for callers that catch that)."""


def _verify(ref: ChunkRef, what: str, arr: np.ndarray, stored: int | None) -> None:
    if stored is None:
        raise CodecError(f"{ref.where}: no stored checksum for the {what}")
    got = checksum(arr)
    if got != int(stored):
        raise CorruptDataError(
            f"{ref.where}: {what} checksum mismatch (stored {int(stored):016x}, computed {got:016x})")


def decode_chunk(dec: ChunkDecoder, ref: ChunkRef, out: np.ndarray, verify: bool = True) -> None:
    """Verify (if ``verify``) and decode one chunk into ``out[ref.out_offset : + ref_out_size(ref)]``.

    Raises :class:`CorruptDataError` on a checksum mismatch and :class:`CodecError` on a malformed
    ref or stream; both name ``ref.where``. ``dec`` must not be used by another thread meanwhile.
    """
    check_ref(ref)
    check_out(out)
    n = int(ref.n)
    off = int(ref.out_offset)
    size = ref_out_size(ref)
    if off + size > out.shape[0]:
        raise CodecError(f"{ref.where}: output bytes [{off}, {off + size}) exceed the "
                         f"{out.shape[0]}-byte buffer")
    data = as_u8(ref.data)
    if verify:
        _verify(ref, "coded data" if ref.kind == KIND_BF16_SPLIT else "raw data", data, ref.data_xxh3)
    dst = out[off:off + size]
    if ref.kind == KIND_RAW:
        if data.shape[0] != n:
            raise CodecError(f"{ref.where}: raw chunk holds {data.shape[0]} bytes, expected {n}")
        np.copyto(dst, data)
        return
    sm = as_u8(ref.sm)
    if sm.shape[0] != n:
        raise CodecError(f"{ref.where}: sm plane holds {sm.shape[0]} bytes, expected {n}")
    if verify:
        _verify(ref, "sm plane", sm, ref.sm_xxh3)
    exp = dec.scratch(n)
    try:
        dec.decode_exp(ref.codec, data, n, exp)
    except CodecError as exc:
        raise CodecError(f"{ref.where}: {exc}") from exc
    _merge(exp, sm, dst)


def decode_chunks(dec: ChunkDecoder, refs: Sequence[ChunkRef], out: np.ndarray, verify: bool = True) -> None:
    """:func:`decode_chunk` for each of ``refs`` in order, on this thread; where every one is a raw or a
    huf4x chunk (and, to verify, a native xxh3 exists), in one GIL-free call of ``formats.fused``. A chunk
    the fused kernel rejects is run through :func:`decode_chunk`, which raises its precise error."""
    refs = list(refs)
    plan = fused.describe(refs, out, verify)
    if plan is None:
        for ref in refs:
            decode_chunk(dec, ref, out, verify)
        return
    desc, sums, keep, nmax = plan
    bad = fused.decode_chunks(desc, sums, out, dec.scratch(nmax), verify)
    del keep  # the buffers the descriptors point into lived until here
    if bad < 0:
        return
    decode_chunk(dec, refs[bad], out, verify)
    raise CodecError(f"{refs[bad].where}: rejected by the fused decoder, accepted by the per-chunk one")


def _merge(exp: np.ndarray, sm: np.ndarray, dst: np.ndarray) -> None:
    """Merge into ``dst`` (2n bytes): as native uint16 words where that is the little-endian layout and
    ``dst`` is 2-byte aligned (27-38 % faster on AMD Zen 4), else byte by byte (any offset)."""
    if _LITTLE and dst.ctypes.data % 2 == 0:
        merge_bf16(exp, sm, dst.view(np.uint16))
    else:
        merge_bf16_le_bytes(exp, sm, dst)


def encode_bf16_refs(src: np.ndarray, chunk: int = DEFAULT_CHUNK_ELEMS, codec_id: str = DEFAULT_CODEC,
                     *, out_offset: int = 0, name: str = "tensor",
                     encoder: ChunkEncoder | None = None) -> list[ChunkRef]:
    """Split + encode + checksum a native ``uint16`` BF16 array into ``bf16-split`` refs.

    The reference pack path (used by the tests and the benchmark): chunk ``j`` covers elements
    ``[j * chunk, (j + 1) * chunk)`` and writes output bytes from ``out_offset + 2 * j * chunk``.
    Not thread-safe when ``encoder`` is shared.
    """
    if not isinstance(src, np.ndarray) or src.dtype != np.uint16:
        raise TypeError("src must be a uint16 array")
    src = np.ascontiguousarray(src).reshape(-1)
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    enc = encoder if encoder is not None else ChunkEncoder(codec_id)
    if enc.codec_id != codec_id:
        raise ValueError(f"encoder codes {enc.codec_id!r}, not {codec_id!r}")
    total = src.shape[0]
    exp = np.empty(min(chunk, total), dtype=np.uint8)
    refs = []
    for j, start in enumerate(range(0, total, chunk)):
        k = min(chunk, total - start)
        sm = np.empty(k, dtype=np.uint8)
        split_bf16(src[start:start + k], exp[:k], sm)
        coded = enc.encode(exp[:k])
        off = out_offset + 2 * start
        refs.append(ChunkRef(KIND_BF16_SPLIT, codec_id, coded, sm, k, checksum(coded), checksum(sm), off,
                             f"{name} chunk {j} at offset {off}"))
    return refs


class _Batch:
    """Collects the chunk futures of one ``submit`` into one aggregate future."""

    def __init__(self, count: int, result: Future) -> None:
        self.futures: list[Future] = []
        self.result = result
        self.started: float | None = None  # time.perf_counter() when its first chunk began decoding
        self._left = count
        self._lock = threading.Lock()

    def run(self, dec: "ParallelDecoder", ref: "ChunkRef", out: np.ndarray, verify: bool) -> None:
        if self.started is None:  # a race between threads only moves it by a chunk's start latency
            self.started = time.perf_counter()
        dec._run(ref, out, verify)

    def done_one(self, _fut: Future) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        for fut in self.futures:  # ref order: the first failing chunk wins, whatever the timing
            exc = fut.exception()
            if exc is not None:
                self.result.set_exception(exc)
                return
        self.result.set_result(self.started)


class ParallelDecoder:
    """Decodes lists of :class:`ChunkRef` into preallocated buffers on ``threads`` worker threads.

    Thread-safe. Each worker thread owns one :class:`ChunkDecoder` (and its scratch buffer). With
    ``spread`` (default: on unless ``ZIPMOE_DECODE_SPREAD=0``) a pool with a thread for every usable CPU
    binds each worker to its own CPU (:func:`~formats.workpool.spread_cpus`): left to the scheduler,
    workers woken together were often queued on one CPU, and two threads decoded no faster than one. With
    ``threads=1``, :meth:`decode` runs inline on the caller's thread; :meth:`submit` then uses one
    background thread so decoding can overlap the caller's I/O. :meth:`help` runs one queued chunk on
    the calling thread (which then owns a :class:`ChunkDecoder` and scratch buffer too).
    """

    def __init__(self, threads: int = 1, nice: int = 0, spread: bool | None = None) -> None:
        threads = int(threads)
        self.nice = int(nice)  # the worker threads' priority below the caller's (``WorkPool``)
        if not 1 <= threads <= MAX_THREADS:
            raise ThreadCountError(f"decode threads must be between 1 and {MAX_THREADS}, got {threads}")
        self.threads = threads
        if spread is None:
            spread = spread_default()
        self.cpus = spread_cpus(threads) if spread else None  # one worker per CPU (``WorkPool``)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pool: WorkPool | None = None
        self._closed = False
        if threads > 1:
            self._pool = WorkPool(threads, "zmoe-decode", self.nice, self.cpus)
        log.debug("ParallelDecoder started with %d thread(s)%s", threads,
                  f" bound to CPUs {self.cpus}" if self.cpus else "")

    def _decoder(self) -> ChunkDecoder:
        dec = getattr(self._local, "dec", None)
        if dec is None:
            dec = self._local.dec = ChunkDecoder()
        return dec

    def _run(self, ref: ChunkRef, out: np.ndarray, verify: bool) -> None:
        decode_chunks(self._decoder(), (ref,), out, verify)

    def _get_pool(self) -> WorkPool:
        with self._lock:
            if self._closed:
                raise CodecError("ParallelDecoder is closed")
            if self._pool is None:  # threads == 1: background thread for submit() only
                self._pool = WorkPool(1, "zmoe-decode", self.nice)
            return self._pool

    def help(self) -> bool:
        """Decode one queued chunk (of any caller's ``submit``) on this thread; False when none is
        queued. For a consumer that would otherwise sleep until its chunks are decoded."""
        pool = self._pool
        return pool.help() if pool is not None else False

    def call(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on a worker thread, queued with the chunks (``help`` may run it too): for a
        caller's whole unit of work, such as reading an expert and decoding it with :meth:`decode_here`."""
        return self._get_pool().submit(fn, *args)

    def decode_here(self, refs: Sequence[ChunkRef], out: np.ndarray, verify: bool = True) -> None:
        """Decode ``refs`` into ``out`` on the calling thread (with its own ``ChunkDecoder``), in one
        GIL-free call where :func:`decode_chunks` can; layout errors first, as :meth:`decode`."""
        refs = list(refs)
        check_layout(refs, out)
        decode_chunks(self._decoder(), refs, out, verify)

    def decode(self, refs: Sequence[ChunkRef], out: np.ndarray, verify: bool = True) -> None:
        """Decode all ``refs`` into ``out``; returns when every chunk is written.

        Layout errors (a ref outside ``out`` or overlapping another) raise :class:`CodecError`
        before anything is decoded. If chunks fail, the first failing one in ``refs`` order is
        raised once all submitted chunks have finished.
        """
        refs = list(refs)
        check_layout(refs, out)
        if self.threads == 1 or len(refs) <= 1:
            if self._closed:
                raise CodecError("ParallelDecoder is closed")
            decode_chunks(self._decoder(), refs, out, verify)
            return
        self.submit(refs, out, verify, _checked=True).result()

    def submit(self, refs: Sequence[ChunkRef], out: np.ndarray, verify: bool = True,
               *, _checked: bool = False) -> Future:
        """Start decoding ``refs`` into ``out`` and return a future that resolves when all chunks are
        written, or carries the first failing chunk's error (layout errors included). Its result is
        the ``time.perf_counter()`` at which the first chunk began decoding (``None`` for no chunks),
        so a caller can time the decode itself, without the time its chunks waited in the queue.

        ``out`` must stay alive and untouched until the future is done.
        """
        result: Future = Future()
        result.set_running_or_notify_cancel()
        refs = list(refs)
        try:
            if not _checked:
                check_layout(refs, out)
            pool = self._get_pool()
        except ZmoeError as exc:
            result.set_exception(exc)
            return result
        if not refs:
            result.set_result(None)
            return result
        batch = _Batch(len(refs), result)
        try:
            for ref in refs:
                batch.futures.append(pool.submit(batch.run, self, ref, out, verify))
        except RuntimeError as exc:  # pool shut down concurrently: wait for what was queued
            _wait_futures(batch.futures)
            result.set_exception(CodecError(f"ParallelDecoder is closed: {exc}"))
            return result
        for fut in batch.futures:
            fut.add_done_callback(batch.done_one)
        return result

    def close(self) -> None:
        """Wait for submitted work, then stop the worker threads. Idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> "ParallelDecoder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
