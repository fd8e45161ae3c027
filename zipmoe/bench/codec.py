"""Exponent-codec benchmark: ZipMoE's codec presets against ZipNN, zstd -1 and LZ4-HC, side by side.

Everything runs in one process on data built here (BF16 from float32 by round-to-nearest-even):

* ``gaussian``: N(0, 0.02), the target distribution of issue 3;
* ``mixed``: rows of 4096 elements, each with its own std drawn log-uniformly from [0.004, 0.1]
  (experts of different layers/projections in one stream);
* ``student-t``: Student-t with 4 degrees of freedom scaled to std 0.02 (heavy tails, outliers).

Per dataset and peer: bits per exponent (``8 * total_bytes / n - 8``: the sm plane is stored raw, so
this is the exponent cost for every peer), ratio vs BF16, pack MB/s of BF16 input on one thread
(split + encode + xxh3 for ours), decode GB/s of BF16 output on 1 and 2 threads (entropy decode +
recombination + checksum verification into a preallocated buffer; ZipNN through its own ``threads``
and its own output allocation), speedup vs ZipNN, gap to the order-0 entropy bound, and the fraction
of single-thread memcpy speed. Decode runs alternate the peers run by run (issue 13: hosts drift, so
a ratio must not depend on when each peer ran): run r decodes with every peer once per thread count,
in an order rotated by r; speeds are medians over runs, the ratio to ZipNN is the median of per-run
ratios with its min-max spread. Every peer's output is compared byte for byte with the source
(``RuntimeError`` otherwise) at every thread count before the timed runs.

Library code: logs, never prints. Not thread-safe (run one benchmark at a time).
"""
from __future__ import annotations

import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import zstandard

from formats import huf4x
from formats.codec import DEFAULT_CHUNK_ELEMS, DEFAULT_CODEC, ENCODER_PRESETS, CODECS, ChunkEncoder, checksum
from formats.decoder import KIND_BF16_SPLIT, ChunkRef, ParallelDecoder, encode_bf16_refs
from formats.planes import merge_bf16_le_bytes, split_bf16, warm_up
from zipmoe.bench.errors import BenchInputError
from zipmoe_run.calibrate import report as host_report

__all__ = ["DATASETS", "make_dataset", "run", "render_table"]

HUF4X = huf4x.CODEC_ID
ZSTD_LIT = "zstd-lit"  # the zstd-frame peers, whatever the default codec is

log = logging.getLogger(__name__)

DATASETS = ("gaussian", "mixed", "student-t")
THREADS = (1, 2)


def _to_bf16(f: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)  # round to nearest even


def make_dataset(name: str, elements: int, seed: int = 0) -> np.ndarray:
    """BF16 bit patterns (uint16) of one of :data:`DATASETS`."""
    rng = np.random.default_rng(seed)
    if name == "gaussian":
        return _to_bf16(rng.standard_normal(elements, dtype=np.float32) * np.float32(0.02))
    if name == "mixed":
        rows = -(-elements // 4096)
        std = np.exp(rng.uniform(np.log(0.004), np.log(0.1), rows)).astype(np.float32)
        f = rng.standard_normal(elements, dtype=np.float32) * np.repeat(std, 4096)[:elements]
        return _to_bf16(f)
    if name == "student-t":
        return _to_bf16(rng.standard_t(4, elements).astype(np.float32) * np.float32(0.02 / np.sqrt(2.0)))
    raise BenchInputError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")


def _entropy_bits(src: np.ndarray) -> float:
    counts = np.bincount(((src >> 7) & 0xFF).astype(np.uint8), minlength=256)
    p = counts[counts > 0] / src.size
    return float(-(p * np.log2(p)).sum())


def _median_s(fn: Callable[..., object], runs: int, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn()`` (or ``fn(setup())``, setup untimed) over ``runs`` after a warm-up."""
    times = []
    for i in range(runs + 1):
        args = () if setup is None else (setup(),)
        t0 = time.perf_counter()
        fn(*args)
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _check_exact(peer: str, got, src: np.ndarray) -> None:
    if memoryview(got).cast("B") != memoryview(src.astype("<u2")).cast("B"):
        raise RuntimeError(f"benchmark peer {peer}: decoded bytes differ from the source")


def _pack_frames(src: np.ndarray, chunk: int, compress: Callable[[np.ndarray], bytes]) -> list[ChunkRef]:
    """Split + code + hash like :func:`encode_bf16_refs`, with any exponent compressor."""
    exp = np.empty(min(chunk, src.size), np.uint8)
    refs = []
    for j, start in enumerate(range(0, src.size, chunk)):
        k = min(chunk, src.size - start)
        sm = np.empty(k, np.uint8)
        split_bf16(src[start:start + k], exp[:k], sm)
        coded = compress(exp[:k])
        refs.append(ChunkRef(KIND_BF16_SPLIT, ZSTD_LIT, coded, sm, k, checksum(coded), checksum(sm),
                             2 * start, f"bench chunk {j}"))
    return refs


class _Prepared:
    """One peer, packed and ready: ``decode(threads)`` runs one timed decode, ``check(threads)`` one checked."""

    def __init__(self, peer: str, src: np.ndarray, total_bytes: int, pack_s: float,
                 decode: Callable[[int], object], output: Callable[[object], object], close=lambda: None):
        self.peer, self.src, self.total_bytes, self.pack_s = peer, src, total_bytes, pack_s
        self.decode, self._output, self.close = decode, output, close

    def check(self, threads: int) -> None:
        got = self.decode(threads)
        _check_exact(self.peer, self._output(got), self.src)


def _prepare_refs(peer: str, src: np.ndarray, pack: Callable[[], list], decode_with, runs: int) -> _Prepared:
    pack_s = _median_s(pack, runs)
    refs = pack()
    total = sum(len(r.data) + r.n for r in refs)
    out = np.zeros(2 * src.size, np.uint8)
    decs = {t: decode_with(t) for t in THREADS}

    def decode(t):
        decs[t].decode(refs, out)
        return out

    def output(got):
        res = got.copy()
        got[:] = 0
        return res

    def close():
        for d in decs.values():
            d.__exit__(None, None, None)
    return _Prepared(peer, src, total, pack_s, decode, output, close)


class _Lz4Decoder:
    """LZ4-HC exponent chunks + our checksum/merge path, on a plain thread pool (bench only)."""

    def __init__(self, threads: int):
        import lz4.block
        self._block = lz4.block
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def _one(self, ref: ChunkRef, out: np.ndarray) -> None:
        if checksum(ref.data) != ref.data_xxh3 or checksum(ref.sm) != ref.sm_xxh3:
            raise RuntimeError(f"{ref.where}: checksum mismatch")
        exp = np.frombuffer(self._block.decompress(ref.data, uncompressed_size=ref.n), np.uint8)
        merge_bf16_le_bytes(exp, ref.sm, out[ref.out_offset:ref.out_offset + 2 * ref.n])

    def decode(self, refs, out):
        if self._pool is None:
            for r in refs:
                self._one(r, out)
        else:
            list(self._pool.map(lambda r: self._one(r, out), refs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown()


def _zipnn(src: np.ndarray, runs: int) -> _Prepared:
    from zipnn import ZipNN  # bench-only peer

    raw = src.astype("<u2").tobytes()
    comp = {t: ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=t) for t in THREADS}
    # ZipNN.compress rewrites its input in place: a fresh copy per run, made outside the timing
    pack_s = _median_s(comp[1].compress, runs, setup=lambda: bytearray(raw))
    coded = comp[1].compress(bytearray(raw))
    return _Prepared("zipnn", src, len(coded), pack_s, lambda t: comp[t].decompress(coded), lambda got: got)


def _peers(chunk: int) -> dict[str, Callable[[np.ndarray, int], _Prepared]]:
    peers: dict[str, Callable[[np.ndarray, int], _Prepared]] = {}  # zstd frames: codec id zstd-lit
    default_preset = CODECS[ZSTD_LIT].default_preset
    presets = sorted(ENCODER_PRESETS[ZSTD_LIT], key=lambda p: p != default_preset)
    for preset in presets:
        def ours(src, runs, preset=preset):
            enc = ChunkEncoder(ZSTD_LIT, preset)
            return _prepare_refs(f"zipmoe/{preset}", src,
                                 lambda: encode_bf16_refs(src, chunk, ZSTD_LIT, encoder=enc), ParallelDecoder, runs)
        peers[f"ours {preset}"] = ours
        if preset == default_preset:
            def huf(src, runs):
                enc = ChunkEncoder(HUF4X)
                return _prepare_refs("zipmoe/huf4x", src,
                                     lambda: encode_bf16_refs(src, chunk, HUF4X, encoder=enc), ParallelDecoder, runs)
            peers[f"ours {HUF4X}"] = huf

    def zstd1(src, runs):
        cctx = zstandard.ZstdCompressor(level=1)
        return _prepare_refs("zstd-1", src, lambda: _pack_frames(src, chunk, cctx.compress), ParallelDecoder, runs)
    peers["zstd-1 exp"] = zstd1

    def lz4hc(src, runs):
        import lz4.block
        comp = lambda e: lz4.block.compress(e, mode="high_compression", compression=9, store_size=False)  # noqa: E731
        return _prepare_refs("lz4-hc", src, lambda: _pack_frames(src, chunk, comp), _Lz4Decoder, runs)
    peers["lz4hc-9 exp"] = lz4hc
    peers["zipnn"] = _zipnn
    return peers


def _alternate(prepared: dict[str, _Prepared], runs: int) -> tuple[dict, dict]:
    """(wall seconds, process CPU seconds) per peer, thread count and run. Run r times every peer once
    per thread count, in an order rotated by r, so that a host's drift lands on all peers alike rather
    than on whichever ran then. CPU time (all threads of this process) is what a decode costs whatever
    else runs on the host: on a busy host the 1-thread CPU-time figures are the ones to compare."""
    names = list(prepared)
    wall: dict[str, dict[int, list[float]]] = {p: {t: [] for t in THREADS} for p in names}
    cpu: dict[str, dict[int, list[float]]] = {p: {t: [] for t in THREADS} for p in names}
    for p in names:  # warm-up, and the byte-for-byte check of every peer at every thread count
        for t in THREADS:
            prepared[p].check(t)
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for t in THREADS:
            for p in order:
                c0, t0 = time.process_time(), time.perf_counter()
                prepared[p].decode(t)
                wall[p][t].append(time.perf_counter() - t0)
                cpu[p][t].append(time.process_time() - c0)
    return wall, cpu


def _memcpy_gb_s(nbytes: int, runs: int) -> float:
    a = np.ones(nbytes, np.uint8)
    b = np.zeros(nbytes, np.uint8)
    return nbytes / _median_s(lambda: np.copyto(b, a), max(runs, 5)) / 1e9


def run(elements: int, runs: int = 5, datasets: Sequence[str] = DATASETS,
        chunk: int = DEFAULT_CHUNK_ELEMS) -> dict:
    """Run the benchmark; returns a JSON-serialisable dict (see the module docstring)."""
    if elements < 1 or runs < 1:
        raise BenchInputError("elements and runs must be >= 1")
    for name in datasets:
        if name not in DATASETS:
            raise BenchInputError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    warm_up()
    huf4x.warm_up()
    memcpy = _memcpy_gb_s(2 * elements, runs)
    result = {
        "benchmark": "codec", "elements": elements, "runs": runs, "chunk_elements": chunk,
        "threads": list(THREADS), "default": {"codec": DEFAULT_CODEC, "preset": CODECS[DEFAULT_CODEC].default_preset},
        "memcpy_gb_s": memcpy,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "zstd": ".".join(map(str, zstandard.ZSTD_VERSION))},
        "notes": ["peers: ours <preset> = zstd-lit presets through ParallelDecoder; ours huf4x = the huf4x codec "
                  "(canonical Huffman, 4 streams) through ParallelDecoder; zstd-1 exp / lz4hc-9 exp = "
                  "that compressor on the same exponent chunks, same split/merge/xxh3 path; zipnn = ZipNN 0.5.4 "
                  "bytearray_dtype=bfloat16", "decode GB/s are of BF16 output; ours include xxh3 verification and write into a "
                  "preallocated buffer, ZipNN allocates its output", "decode runs alternate: run r times every peer once per thread "
                  "count, in an order rotated by r; GB/s are medians over runs after one checked warm-up; /ZipNN is the "
                  "median of per-run ratios (both timed in the same round) with its min-max over runs", "decode_<t>t_cpu_gb_s and "
                  "cpu_speedup_vs_zipnn_1t use process CPU time instead of wall time: robust to other load on the host"],
        "datasets": {},
    }
    result.update(host_report())  # host, calibration, host_line
    peers = _peers(chunk)
    for name in datasets:
        src = make_dataset(name, elements)
        h = _entropy_bits(src)
        rows: dict[str, dict] = {}
        prepared: dict[str, _Prepared] = {}
        try:
            for peer, fn in peers.items():
                log.info("bench codec: dataset %s, packing with %s", name, peer)
                try:
                    prepared[peer] = fn(src, runs)
                except ImportError as exc:
                    rows[peer] = {"skipped": f"not installed: {exc.name or exc}"}
            log.info("bench codec: dataset %s, %d alternating decode runs", name, runs)
            times, cpu = _alternate(prepared, runs)
        finally:
            for p in prepared.values():
                p.close()
        n = src.size
        for peer, prep in prepared.items():
            bits = 8.0 * prep.total_bytes / n - 8.0
            row = {"bits_per_exponent": bits, "gap_to_entropy_bits": bits - h,
                   "ratio": prep.total_bytes / (2 * n), "total_bytes": prep.total_bytes,
                   "pack_mb_s": 2 * n / prep.pack_s / 1e6}
            for t in THREADS:
                row[f"decode_{t}t_gb_s"] = 2 * n / float(np.median(times[peer][t])) / 1e9
                row[f"decode_{t}t_cpu_gb_s"] = 2 * n / max(float(np.median(cpu[peer][t])), 1e-9) / 1e9
            row["frac_memcpy_1t"] = row["decode_1t_gb_s"] / memcpy
            rows[peer] = row
        if "zipnn" in prepared:
            for peer in prepared:
                for t in THREADS:  # per run: both peers timed in the same round
                    per_run = [z / o for z, o in zip(times["zipnn"][t], times[peer][t])]
                    rows[peer][f"speedup_vs_zipnn_{t}t"] = float(np.median(per_run))
                    rows[peer][f"speedup_vs_zipnn_{t}t_range"] = [min(per_run), max(per_run)]
                per_run = [z / max(o, 1e-9) for z, o in zip(cpu["zipnn"][1], cpu[peer][1])]
                rows[peer]["cpu_speedup_vs_zipnn_1t"] = float(np.median(per_run))
                rows[peer]["cpu_speedup_vs_zipnn_1t_range"] = [min(per_run), max(per_run)]
        result["datasets"][name] = {"entropy_bits": h, "entropy_bound_ratio": (8 + h) / 16,
                                    "peers": {p: rows[p] for p in peers if p in rows}}
        del src, prepared
    return result


def _speedup(row: dict, t: int, key: str = "speedup_vs_zipnn") -> str:
    med, rng = row.get(f"{key}_{t}t"), row.get(f"{key}_{t}t_range")
    if med is None:
        return "-"
    return f"{med:.2f}x" if rng is None or rng[0] == rng[1] else f"{med:.2f}x ({rng[0]:.2f}-{rng[1]:.2f})"


def render_table(result: dict):
    """A rich Table of :func:`run`'s result (rich is imported here only)."""
    from rich.table import Table

    table = Table(title=f"exponent codecs: {result['elements']:,} BF16 elements, chunk "
                        f"{result['chunk_elements']:,}, median of {result['runs']} runs, memcpy "
                        f"{result['memcpy_gb_s']:.1f} GB/s", show_lines=False)
    cols = ["dataset", "peer", "bits/exp", "-H", "ratio", "pack MB/s", "dec 1T GB/s", "dec 2T GB/s",
            "/ZipNN 1T (min-max)", "/ZipNN 2T (min-max)", "/ZipNN 1T CPU time", "1T/memcpy"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("dataset", "peer") else "right")
    def fmt(v, spec, suffix=""):
        return "-" if v is None else format(v, spec) + suffix

    for name, ds in result["datasets"].items():
        first = True
        for peer, row in ds["peers"].items():
            label = f"{name} H={ds['entropy_bits']:.3f}" if first else ""
            first = False
            if "skipped" in row:
                table.add_row(label, peer, *(["-"] * (len(cols) - 3)), row["skipped"])
                continue
            g = row.get
            table.add_row(label, peer, fmt(g("bits_per_exponent"), ".3f"), fmt(g("gap_to_entropy_bits"), "+.3f"),
                          fmt(g("ratio"), ".4f"), fmt(g("pack_mb_s"), ".0f"), fmt(g("decode_1t_gb_s"), ".2f"),
                          fmt(g("decode_2t_gb_s"), ".2f"), _speedup(row, 1), _speedup(row, 2),
                          _speedup(row, 1, "cpu_speedup_vs_zipnn"), fmt(g("frac_memcpy_1t"), ".0%"))
        table.add_section()
    return table
