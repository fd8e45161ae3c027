"""The measurements behind ``zipmoe_run.calibrate`` (see its docstring): decode throughput of
``ParallelDecoder`` on a small synthetic coded buffer, and read throughput of an archive's file
system through the store's own reader. Timed by an injectable ``clock``; library code, no printing.
"""
from __future__ import annotations

import functools
import math
import os
import random
import time

__all__ = ["READ_TARGET", "READ_MIN", "fs_key", "measure_decode", "measure_read"]

READ_TARGET = 8 << 20  # bytes read by the read measurement
READ_MIN = 1 << 20  # below this (a tiny archive) the read speed is not measured


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
def _synthetic_chunk(elements: int):
    import numpy as np

    from formats.codec import DEFAULT_CODEC, ChunkEncoder, checksum
    from formats.decoder import KIND_BF16_SPLIT, ChunkRef
    from formats.planes import split_bf16_numpy

    x = np.random.default_rng(0).standard_normal(elements, dtype=np.float32) * np.float32(0.02)
    src = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncated to BF16: the exponents are what matter
    exp, sm = np.empty(elements, np.uint8), np.empty(elements, np.uint8)
    split_bf16_numpy(src, exp, sm)  # (the packer's split is a JIT kernel: compiling it costs more than this)
    coded = ChunkEncoder(DEFAULT_CODEC).encode(exp)
    return ChunkRef(KIND_BF16_SPLIT, DEFAULT_CODEC, coded, sm, elements, checksum(coded), checksum(sm), 0,
                    "calibration chunk")


def measure_decode(threads, *, chunk_elements: int = 1 << 19, chunks: int = 8, runs: int = 4,
                   clock=time.perf_counter) -> dict:
    """BF16 output bytes/s of ``ParallelDecoder(t)`` for each ``t`` in ``threads`` (best of ``runs``)."""
    import dataclasses

    import numpy as np

    from formats.decoder import ParallelDecoder

    ref = _synthetic_chunk(int(chunk_elements))
    n = max(int(chunks), 2 * max(threads))
    refs = [dataclasses.replace(ref, out_offset=i * 2 * ref.n) for i in range(n)]
    out = np.empty(2 * ref.n * n, np.uint8)
    res = {}
    for t in sorted(set(threads)):
        with ParallelDecoder(t) as dec:
            best = math.inf
            for i in range(runs + 1):
                t0 = clock()
                dec.decode(refs, out)
                if i:
                    best = min(best, clock() - t0)
        res[str(t)] = out.nbytes / max(best, 1e-9)
    return res


def measure_read(path, spans, io_mode: str = "auto", *, clock=time.perf_counter) -> dict | None:
    """Bytes/s of ``ExpertReader(path, io_mode)`` over up to :data:`READ_TARGET` bytes of ``spans``
    ((offset, length), 4 KiB-aligned offsets), read in the store's pieces; None when the spans hold
    less than :data:`READ_MIN` bytes."""
    from zipmoe_run.store.io import Buffer, ExpertReader, drop_pages
    from zipmoe_run.store.worker import READ_PIECE

    spans = sorted(spans)
    if not spans or sum(n for _, n in spans) < READ_MIN:
        return None
    k = random.randrange(len(spans))  # another part of a large archive each time: no device-side cache
    spans = spans[k:] + spans[:k]
    step = max(1, len(spans) // max(1, READ_TARGET // max(1, min(READ_PIECE, max(n for _, n in spans)))))
    pieces, seen, total = [], set(), 0
    for off, length in spans[::step] + spans:  # spread over the file first, then fill up
        for lo in range(0, length, READ_PIECE):
            n = min(READ_PIECE, length - lo)
            if total < READ_TARGET and (off + lo, n) not in seen:
                seen.add((off + lo, n))
                pieces.append((off + lo, n))
                total += n
        if total >= READ_TARGET:
            break
    reader = ExpertReader(path, io_mode)
    try:
        if reader.mode != "O_DIRECT":  # drop what the page cache holds of these bytes (advisory)
            for off, n in pieces:
                drop_pages(reader._fd, off, n)
        buf = Buffer(max(n for _, n in pieces) + 4096)
        try:
            got = 0
            t0 = clock()
            for off, n in pieces:
                got += reader.read(buf, off, n, f"calibration read at {off}")
            dt = clock() - t0
        finally:
            buf.close()
        return {"read_bps": got / max(dt, 1e-9), "bytes": got, "reads": len(pieces),
                "read_method": reader.mode}
    finally:
        reader.close()
