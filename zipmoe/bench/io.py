"""``zipmoe bench io``: this machine's read bandwidth, decode throughput and expert compute speed,
written as the calibration JSON the cache policies, the tier planner and ``bench cache`` use.

* Read: expert-sized reads (``read_size``, default 8 MiB, in a seeded random order) of a file on the
  disk under test, with ``O_DIRECT`` into page-aligned buffers (``zipmoe_run.store.io.ExpertReader``);
  where the file system refuses ``O_DIRECT``, ``pread`` + ``POSIX_FADV_DONTNEED`` after the file's
  pages were dropped (the result says which). The file is an archive's expert extents
  (``archive=``) or a scratch file of random bytes written under ``directory`` (deleted after).
* Decode: BF16 output bytes per second of ``formats.decoder.ParallelDecoder`` on 1 thread and on
  ``cores`` threads, over an archive's experts or generated N(0, 0.02) BF16 chunks encoded exactly
  as the packer does (default codec and chunk size); median of ``runs`` after a warm-up.
* Compute: BF16 weight bytes per second of one-token expert forwards (three [1408, 2048]
  matrix-vector products each, through the runtime's ``linear``, over 8 different experts so the
  weights stream from memory), which sets the prefetch window.

Library code: logs, never prints. Timings are medians; the machine's load moves them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from zipmoe.bench.errors import BenchInputError
from zipmoe_run.calibrate import host_key
from zipmoe_run.hostinfo import host_info, host_line
from zipmoe_run.tiers import CostModel, TierSizes

__all__ = ["measure_read", "measure_decode", "measure_compute", "run", "record"]

log = logging.getLogger(__name__)


def _median_s(fn, runs: int) -> float:
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _scratch_file(directory: Path, size: int, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="zipmoe-io-", suffix=".bin", dir=directory)
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    try:
        with os.fdopen(fd, "wb") as f:
            left = size
            while left > 0:
                f.write(block[:min(left, len(block))])
                left -= len(block)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def measure_read(path: Path, spans: list[tuple[int, int]], seed: int = 0, mode: str = "auto") -> dict:
    """Read ``spans`` ((offset, length), 4 KiB-aligned offsets) once each in a seeded random order,
    cold (page cache dropped first). Returns bytes/s and the method."""
    from zipmoe_run.store.io import Buffer, ExpertReader, drop_page_cache

    drop_page_cache(path)
    reader = ExpertReader(path, mode)
    try:
        order = np.random.default_rng(seed).permutation(len(spans))
        buf = Buffer(max(length for _, length in spans))
        total = 0
        t0 = time.perf_counter()
        for i in order:
            off, length = spans[int(i)]
            total += reader.read(buf, off, length, f"span {i}")
        dt = time.perf_counter() - t0
        buf.close()
        method = "o_direct" if reader.mode == "O_DIRECT" else "fadvise_dontneed"
        return {"bps": total / dt, "bytes": total, "seconds": dt, "reads": len(spans), "method": method,
                "why_not_direct": reader.why_not_direct if method != "o_direct" else None}
    finally:
        reader.close()


def _generated_refs(elements: int, seed: int):
    from formats.decoder import encode_bf16_refs

    from zipmoe.bench.codec import make_dataset

    src = make_dataset("gaussian", elements, seed)
    return encode_bf16_refs(src), 2 * elements


def measure_decode(threads: list[int], runs: int = 3, elements: int = 1 << 24, seed: int = 0,
                   archive=None) -> dict:
    """BF16 output bytes/s of ``ParallelDecoder`` per thread count (median of ``runs``)."""
    from formats.decoder import ParallelDecoder

    if archive is not None:
        refs, size = [], 0
        for ext in archive.index.experts:
            if size >= 2 * elements:
                break
            refs += [dataclasses.replace(r, out_offset=size + r.out_offset) for r in archive.extent_refs(ext)]
            size += ext.decoded_nbytes
        source = f"archive {archive.path}"
    else:
        refs, size = _generated_refs(elements, seed)
        source = f"generated N(0, 0.02) BF16, {elements} elements"
    out = np.empty(size, np.uint8)
    codecs = sorted({r.codec for r in refs if getattr(r, "codec", None)})
    res = {"source": source, "bytes": size, "codec": codecs[0] if len(codecs) == 1 else None}
    for t in threads:
        with ParallelDecoder(t) as dec:
            s = _median_s(lambda: dec.decode(refs, out), runs)
        res[f"{t}"] = size / s
    return res


def measure_compute(runs: int = 5, hidden: int = 2048, inter: int = 1408, sets: int = 8) -> dict:
    """Weight bytes/s of one token through SwiGLU experts in bf16 (the runtime's ``linear``); ``sets``
    different experts per pass so the weights come from memory, not from the last-level cache."""
    import torch
    import torch.nn.functional as F

    try:
        from zipmoe_run.kernels import linear, single_row_scope
    except ImportError:  # an older runtime: torch's kernel
        linear = F.linear
        single_row_scope = None
    g = torch.Generator().manual_seed(0)
    experts = [(torch.randn(inter, hidden, generator=g).to(torch.bfloat16),
                torch.randn(inter, hidden, generator=g).to(torch.bfloat16),
                torch.randn(hidden, inter, generator=g).to(torch.bfloat16)) for _ in range(sets)]
    x = torch.randn(1, hidden, generator=g).to(torch.bfloat16)

    def one():
        for wg, wu, wd in experts:
            linear(F.silu(linear(x, wg)) * linear(x, wu), wd)

    if single_row_scope is not None:
        with single_row_scope(True):
            s = _median_s(one, runs)
    else:
        s = _median_s(one, runs)
    nbytes = sets * 3 * hidden * inter * 2
    return {"bps": nbytes / s, "bytes": nbytes, "seconds": s, "experts": sets}


def run(*, directory: Path | None = None, archive_path: Path | None = None, size: int = 256 << 20,
        read_size: int = 8 << 20, cores: int | None = None, runs: int = 3, decode_elements: int = 1 << 24,
        io_mode: str = "auto", seed: int = 0) -> dict:
    """Measure everything; returns ``{"calibration": CostModel.to_json(), ...details}``."""
    cores = int(cores or os.cpu_count() or 1)
    archive = None
    if archive_path is not None:
        from formats.reader import Archive

        archive = Archive(archive_path)
        spans = [(e.offset, e.length) for e in archive.index.experts if e.length > 0]
        if not spans:
            raise BenchInputError(f"{archive_path}: archive has no expert extents to read")
        read = measure_read(Path(archive_path), spans, seed, io_mode)
        read["file"], read["fs_path"] = str(archive_path), str(archive_path)
        sizes = TierSizes.from_extents(archive.index.experts, f"archive {archive_path}")
    else:
        d = Path(directory) if directory is not None else Path.home() / ".cache" / "zipmoe"
        path = _scratch_file(d, size, seed)
        try:
            step = max(4096, (read_size // 4096) * 4096)
            spans = [(off, min(step, size - off)) for off in range(0, size, step)]
            read = measure_read(path, spans, seed, io_mode)
            read["file"], read["fs_path"] = f"scratch file in {d} ({size} bytes, deleted)", str(d)
        finally:
            path.unlink(missing_ok=True)
        sizes = None
    log.info("read: %.2f GB/s (%s)", read["bps"] / 1e9, read["method"])
    threads = sorted({1, cores})
    try:
        dec = measure_decode(threads, runs, decode_elements, seed, archive)
    finally:
        if archive is not None:
            archive.close()
    log.info("decode: %s", {t: f"{dec[str(t)] / 1e9:.2f} GB/s" for t in threads})
    comp = measure_compute(max(runs, 3))
    cal = CostModel(read_bps=float(read["bps"]), decode_bps_per_core=float(dec["1"]), cores=cores,
                      decode_bps=float(dec[str(cores)]), compute_bps=float(comp["bps"]),
                      read_method=read["method"], source="zipmoe bench io",
                      extra={"host": platform.node(), "machine": platform.machine(), "host_key": host_key(),
                             "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "read_file": read["file"], "decode_source": dec["source"],
                             **({"tier_sizes": sizes.as_dict()} if sizes else {})})
    info = host_info()
    return {"calibration": cal.to_json(), "read": read, "decode": dec, "compute": comp, "host": info,
            "host_line": host_line(info, cal.to_json())}


def record(result: dict, io_mode: str = "auto") -> list[str]:
    """Write ``run``'s decode and read speeds into the self-calibration cache (``zipmoe_run.calibrate``),
    so that stores opened on this host (and on the file system measured) start from them."""
    from zipmoe_run.calibrate import Calibrator

    dec = {k: v for k, v in result["decode"].items() if k.isdigit()}
    rd = result["read"]
    return Calibrator().record(dec, rd.get("fs_path"), io_mode, rd["bps"],
                               "O_DIRECT" if rd["method"] == "o_direct" else "buffered+DONTNEED",
                               codec=result["decode"].get("codec"))
