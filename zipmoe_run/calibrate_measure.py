"""The measurements behind ``zipmoe_run.calibrate`` (see its docstring): decode throughput of
``ParallelDecoder`` on a small synthetic coded buffer (alone, and while a memory-bound compute thread
runs beside it, as a decode step's matrix-vector products do), and read throughput of an archive's
file system through the store's own reader at several queue depths. Timed by an injectable
``clock``; library code, no printing.
"""
from __future__ import annotations

import functools
import os
import random
import time

__all__ = ["READ_TARGET", "READ_MIN", "READ_DEPTHS", "fs_key", "measure_decode", "measure_read", "contended_key",
           "Contender"]

READ_TARGET = 8 << 20  # bytes read by the read measurement
READ_MIN = 1 << 20  # below this (a tiny archive) the read speed is not measured
READ_DEPTHS = (1, 2, 4)  # reads in flight at once that the read measurement tries


def contended_key(threads: int) -> str:
    """The rates key of the decode speed on ``threads`` threads while compute runs beside it."""
    return f"{int(threads)}+compute"


class Contender:
    """A stand-in for a decode step's compute while it runs: one thread streaming two 32 MiB float32
    arrays through ``numpy.add`` (memory-bound and GIL-free, as the matrix-vector products are)."""

    def __init__(self, elements: int = 8 << 20):
        import threading

        import numpy as np

        self._a, self._b = np.ones(elements, np.float32), np.ones(elements, np.float32)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="zmoe-calibrate-compute", daemon=True)

    def _run(self) -> None:
        import numpy as np

        while not self._stop.is_set():
            np.add(self._a, self._b, out=self._b)

    def __enter__(self) -> "Contender":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def fs_key(path: str | os.PathLike) -> dict:
    """The file system holding ``path``: device number and, where /proc says, its type and source."""
    dev = os.stat(path).st_dev
    key = {"dev": f"{os.major(dev)}:{os.minor(dev)}", "fstype": "unknown"}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                a, sep, b = line.partition(" - ")
                fa, fb = a.split(), b.split()
                if sep and len(fa) > 2 and fa[2] == key["dev"] and len(fb) >= 2:
                    key.update(fstype=fb[0], source=fb[1])
    except OSError:
        pass
    return key


@functools.lru_cache(maxsize=4)
def _synthetic_chunk(elements: int, codec: str | None = None):
    import numpy as np

    from formats.codec import DEFAULT_CODEC, ChunkEncoder, checksum
    from formats.decoder import KIND_BF16_SPLIT, ChunkRef
    from formats.planes import split_bf16_numpy

    x = np.random.default_rng(0).standard_normal(elements, dtype=np.float32) * np.float32(0.02)
    src = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncated to BF16: the exponents are what matter
    exp, sm = np.empty(elements, np.uint8), np.empty(elements, np.uint8)
    split_bf16_numpy(src, exp, sm)  # (the packer's split is a JIT kernel: compiling it costs more than this)
    codec = codec or DEFAULT_CODEC
    coded = ChunkEncoder(codec).encode(exp)
    return ChunkRef(KIND_BF16_SPLIT, codec, coded, sm, elements, checksum(coded), checksum(sm), 0,
                    "calibration chunk")


def measure_decode(threads, *, chunk_elements: int = 1 << 19, chunks: int = 8, runs: int = 4,
                   clock=time.perf_counter, contended: bool = True, codec: str | None = None) -> dict:
    """BF16 output bytes/s of ``ParallelDecoder(t)`` for each ``t`` in ``threads`` (best of ``runs``):
    under ``str(t)`` alone and, with ``contended``, under :func:`contended_key` while a
    :class:`Contender` runs (also the best run: other jobs on the host only ever slow a run down, and the
    contender's own load is the same in every run); chunks coded with
    ``codec`` (default: the packer's default codec)."""
    import dataclasses

    import numpy as np

    from formats.decoder import ParallelDecoder

    ref = _synthetic_chunk(int(chunk_elements), codec)
    n = max(int(chunks), 2 * max(threads))
    refs = [dataclasses.replace(ref, out_offset=i * 2 * ref.n) for i in range(n)]
    out = np.empty(2 * ref.n * n, np.uint8)
    def best_rate(dec) -> float:  # a warm-up, then the fastest of ``runs``
        times = []
        for i in range(runs + 1):
            t0 = clock()
            dec.decode(refs, out)
            if i:
                times.append(clock() - t0)
        return out.nbytes / max(min(times), 1e-9)

    res = {}
    for t in sorted(set(threads)):
        with ParallelDecoder(t) as dec:
            res[str(t)] = best_rate(dec)
            if contended:
                with Contender():
                    res[contended_key(t)] = best_rate(dec)
    return res


def measure_read(path, spans, io_mode: str = "auto", *, clock=time.perf_counter,
                 depths=READ_DEPTHS) -> dict | None:
    """Bytes/s of ``ExpertReader(path, io_mode)`` over up to :data:`READ_TARGET` bytes of ``spans``
    ((offset, length), 4 KiB-aligned offsets), read in the store's pieces, once per queue depth in
    ``depths`` (that many reads in flight, as the store's reader issues them; other pieces each time,
    so the device holds none of them); None when the spans hold less than :data:`READ_MIN` bytes.
    ``read_bps`` is the rate at depth 1, ``depth_bps`` {depth: rate}."""
    from zipmoe_run.store.io import ExpertReader, drop_pages
    from zipmoe_run.store.worker import READ_PIECE

    spans = sorted(spans)
    if not spans or sum(n for _, n in spans) < READ_MIN:
        return None
    k = random.randrange(len(spans))  # another part of a large archive each time: no device-side cache
    spans = spans[k:] + spans[:k]
    step = max(1, len(spans) // max(1, READ_TARGET // max(1, min(READ_PIECE, max(n for _, n in spans)))))
    depths = sorted({int(d) for d in depths} | {1})
    target = READ_TARGET * len(depths)
    pieces, seen, total = [], set(), 0
    for off, length in spans[::step] + spans:  # spread over the file first, then fill up
        for lo in range(0, length, READ_PIECE):
            n = min(READ_PIECE, length - lo)
            if total < target and (off + lo, n) not in seen:
                seen.add((off + lo, n))
                pieces.append((off + lo, n))
                total += n
        if total >= target:
            break
    per = max(1, len(pieces) // len(depths))
    if len(pieces) < 2 * len(depths):  # too few pieces to split: depth 1 only
        depths, per = [1], len(pieces)
    reader = ExpertReader(path, io_mode)
    try:
        if reader.mode != "O_DIRECT":  # drop what the page cache holds of these bytes (advisory)
            for off, n in pieces:
                drop_pages(reader._fd, off, n)
        rates, got1, reads1 = {}, 0, 0
        for i, d in enumerate(depths):
            part = pieces[i * per:(i + 1) * per]
            got, dt = _timed_reads(reader, part, d, clock)
            rates[d] = got / max(dt, 1e-9)
            if d == 1:
                got1, reads1 = got, len(part)
        return {"read_bps": rates[1], "depth_bps": rates, "bytes": got1, "reads": reads1,
                "read_method": reader.mode}
    finally:
        reader.close()


def _timed_reads(reader, pieces, depth: int, clock) -> tuple[int, float]:
    """Read ``pieces`` with ``depth`` of them in flight; (bytes, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from zipmoe_run.store.io import Buffer

    bufs = [Buffer(max(n for _, n in pieces) + 4096) for _ in range(depth)]
    try:
        if depth == 1:
            t0 = clock()
            got = sum(reader.read(bufs[0], off, n, f"calibration read at {off}") for off, n in pieces)
            return got, clock() - t0
        with ThreadPoolExecutor(depth, thread_name_prefix="zmoe-calibrate-read") as ex:
            t0 = clock()
            futs = [ex.submit(reader.read, bufs[i % depth], off, n, f"calibration read at {off}")
                    for i, (off, n) in enumerate(pieces)]
            got = sum(f.result() for f in futs)
            return got, clock() - t0
    finally:
        for b in bufs:
            b.close()
