"""`pack(src_dir, out_path)`: checkpoint directory -> `.zmoe`, streaming, parallel, atomic.

The shards are read through read-only maps; every view of a map is released where it is made (no
view outlives its use, even when a write fails), so the maps close cleanly.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from formats.codec import CODECS, ChunkEncoder, checksum
from formats.errors import InputError
from formats.planes import split_bf16
import xxhash

from formats.preamble import PREAMBLE_SIZE, VERSION, Preamble, align, hex64, xxh3
from zipmoe_pack.output import TermGuard, Terminated, check_output, clean_stale, lock, tmp_path
from zipmoe_pack.scan import Checkpoint, open_regular, scan_checkpoint
from zipmoe_pack.writer import (RAW_CHUNK_BYTES, ExtentPlan, PackOptions, PackReport, _bound_index, _dumps,
                                _encoding, build_index, plan_extents)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
_COPY = 8 << 20
MAX_THREADS = 1024
MIN_CHUNK, MAX_CHUNK = 1 << 12, 1 << 26

__all__ = ["PackOptions", "PackReport", "Terminated", "pack"]


class _Maps:
    """Read-only maps of the source shards, shared by the workers (views only, no copies)."""

    def __init__(self, ck: Checkpoint):
        self._maps: dict[str, mmap.mmap] = {}
        try:
            for f in ck.files:
                if f.kind == "safetensors" and f.size:
                    with open_regular(f.abspath, f.size) as fh:  # the size the scan checked, or refused
                        self._maps[f.path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self.close()
            raise

    def view(self, file: str, offset: int, n: int) -> memoryview:
        """A view of n bytes; the caller releases it (`with maps.view(...) as v:`) before `close`."""
        if not n:
            return memoryview(b"")
        v = memoryview(self._maps[file])[offset:offset + n]
        if len(v) != n:  # cannot happen: the scan checked every offset against this size
            v.release()
            raise InputError(f"{file}: {n} bytes at offset {offset} lie past the end of the file")
        return v

    def close(self) -> None:
        """Unmap everything. A view still alive is a defect here: the BufferError is not swallowed."""
        maps, self._maps = self._maps, {}
        for m in maps.values():
            m.close()


def _piece_hashes(buf: memoryview) -> list[str]:
    return [hex64(xxh3(buf[i:i + RAW_CHUNK_BYTES])) for i in range(0, len(buf), RAW_CHUNK_BYTES)]


_local = threading.local()


def _encode_extent(ep: ExtentPlan, maps: _Maps, opts: PackOptions) -> list[dict]:
    """Worker: split, code and hash every part of one expert. Returns one dict per part, holding no view
    of the maps (a raw part's bytes are written from a fresh view by the main thread)."""
    enc = getattr(_local, "enc", None)
    if enc is None or _local.codec != opts.codec:
        enc = _local.enc = ChunkEncoder(opts.codec)
        _local.codec = opts.codec
    C = opts.chunk_elements
    out = []
    for pp in ep.parts:
        t = pp.tensor
        src = maps.view(t.file, pp.src_offset, pp.nbytes)
        u16 = None  # [n] uint16, a view of src: dropped before src is released
        try:
            r = {"sha": hashlib.sha256(src).hexdigest() if pp.slice is None else None}
            if _encoding(t, opts) == "raw":
                r.update(xxh=_piece_hashes(src))
            else:
                u16 = np.frombuffer(src, dtype=np.uint16)
                n = u16.size
                exp = np.empty(n, np.uint8)  # [n] exponent plane
                sm = np.empty(n, np.uint8)  # [n] sign-mantissa plane
                split_bf16(u16, exp, sm)
                u16 = None
                coded, cx, sx = [], [], []
                for lo in range(0, n, C):
                    c = enc.encode(exp[lo:lo + C])
                    coded.append(c)
                    cx.append(hex64(checksum(c)))
                    sx.append(hex64(checksum(sm[lo:lo + C])))
                r.update(coded=coded, cx=cx, sm=sm, sx=sx, hist=np.bincount(exp, minlength=256))
        except BaseException as e:  # the traceback must not keep a callee's view of the map alive
            traceback.clear_frames(e.__traceback__)
            raise
        finally:
            u16 = None
            src.release()
        out.append(r)
    return out


class _Out:
    """Sequential writer over the temporary file, with zero padding to alignment."""

    def __init__(self, fh, start: int):
        self.fh, self.pos = fh, start
        fh.seek(start)

    def pad(self) -> int:
        n = align(self.pos) - self.pos
        if n:
            self.fh.write(b"\0" * n)
            self.pos += n
        return self.pos

    def write(self, data) -> int:
        at = self.pos
        self.fh.write(data)
        self.pos += len(memoryview(data).cast("B")) if not isinstance(data, (bytes, bytearray)) else len(data)
        return at


def check_options(opts: PackOptions) -> None:
    """One line naming the option, before anything is read or written."""
    th, ce = opts.threads, opts.chunk_elements
    if not isinstance(th, int) or isinstance(th, bool) or not 0 <= th <= MAX_THREADS:
        raise InputError(f"threads (--threads) must be 0 (all cores) to {MAX_THREADS}, not {th!r}")
    if not isinstance(ce, int) or isinstance(ce, bool) or ce & (ce - 1) or not MIN_CHUNK <= ce <= MAX_CHUNK:
        raise InputError(f"chunk elements (--chunk-elements) must be a power of two in [{MIN_CHUNK}, {MAX_CHUNK}], "
                         f"not {ce!r}")
    if opts.codec not in CODECS:
        raise InputError(f"unknown exponent codec {opts.codec!r} (known: {', '.join(sorted(CODECS))})")


def pack(src: str | os.PathLike, out: str | os.PathLike, opts: PackOptions | None = None,
         progress: Progress | None = None) -> PackReport:
    """Pack `src` into `out`. Raises InputError (one line) on bad input and `Terminated` on SIGTERM/SIGHUP;
    either way nothing is left at `out` or beside it."""
    opts = opts or PackOptions()
    check_options(opts)
    t0 = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out}: output path is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{out}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out}: output folder {parent} is not writable")
    ck = scan_checkpoint(src)
    check_output(out, ck)
    plans = plan_extents(ck)
    threads = opts.threads or os.cpu_count() or 1
    bound = _bound_index(ck, plans, opts)
    data_offset = align(PREAMBLE_SIZE + bound)
    total = sum(f.size for f in ck.files)
    clean_stale(out)
    tmp = tmp_path(out)
    with TermGuard() as guard:
        maps = None
        try:
            maps = _Maps(ck)
            with open(tmp, "wb") as fh:
                lock(fh)
                report = _write(fh, ck, plans, opts, maps, data_offset, bound, threads, total, progress)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
            _fsync_dir(parent)
        except OSError as e:
            what = "disk full" if e.errno == errno.ENOSPC else e.strerror
            raise InputError(f"{out}: cannot write archive ({what})") from None
        finally:
            with guard.holding():
                if maps is not None:
                    maps.close()
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    report.path, report.seconds, report.threads = out, time.perf_counter() - t0, threads
    return report


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path: Path, size: int, stop: threading.Event) -> str | None:
    h = hashlib.sha256()
    with open_regular(path, size) as f:
        while not stop.is_set() and (buf := f.read(_COPY)):
            h.update(buf)
    return None if stop.is_set() else h.hexdigest()


def _write(fh, ck, plans, opts, maps, data_offset, bound, threads, total, progress) -> PackReport:
    L: dict = {}
    # whole-file hashes of the shards, on a thread of their own (hashlib releases the GIL)
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zipmoe-sha")
    stop = threading.Event()  # a failed or interrupted pack does not wait for a whole shard's hash
    shard_sha = {f.path: hasher.submit(_sha256_file, f.abspath, f.size, stop)
                 for f in ck.files if f.kind == "safetensors"}
    try:
        return _write_data(fh, ck, plans, opts, maps, data_offset, bound, threads, total, progress, L, shard_sha)
    finally:
        stop.set()
        hasher.shutdown(wait=True, cancel_futures=True)


def _write_data(fh, ck, plans, opts, maps, data_offset, bound, threads, total, progress, L, shard_sha):
    w = _Out(fh, data_offset)
    done = 0

    def tick(n):
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    for f in ck.files:  # blobs and safetensors headers, verbatim
        L[("off", f.path)] = w.pad()
        n = f.size if f.kind == "blob" else f.header_length
        sha, x = hashlib.sha256(), xxhash.xxh3_64()
        with open_regular(f.abspath, f.size) as src:
            left = n
            while left:
                buf = src.read(min(_COPY, left))
                if not buf:
                    raise InputError(f"{f.abspath}: file shrank while packing")
                w.write(buf)
                x.update(buf)
                sha.update(buf)
                left -= len(buf)
        L[("xxh", f.path)] = hex64(x.intdigest())
        if f.kind == "blob":
            L[("sha", f.path)] = sha.hexdigest()
            tick(n)
    for f in ck.files:  # dense tensors, raw and aligned
        for t in f.tensors:
            if t.role is None:
                with maps.view(f.path, t.offset, t.nbytes) as v:
                    L[("off", t.name)] = w.pad()
                    w.write(v)
                    L[("xxh", t.name)] = _piece_hashes(v)
                    L[("sha", t.name)] = hashlib.sha256(v).hexdigest()
                tick(t.nbytes)
    stats: dict = {}
    fused_sha = {t.name: hashlib.sha256() for t in ck.experts if t.role.fused}
    exp_bytes = exp_stored = exp_el = exp_coded = 0
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zipmoe-pack")
    try:
        window: deque = deque()
        it = iter(plans)
        for ep in it:
            window.append((ep, pool.submit(_encode_extent, ep, maps, opts)))
            if len(window) >= 2 * threads:
                break
        while window:
            ep, fut = window.popleft()
            nxt = next(it, None)
            if nxt is not None:
                window.append((nxt, pool.submit(_encode_extent, nxt, maps, opts)))
            res = fut.result()
            start = w.pad()
            parts: dict = {}
            for i, (pp, r) in enumerate(zip(ep.parts, res)):
                if "coded" in r:
                    chunks = []
                    for c, cx in zip(r["coded"], r["cx"]):
                        chunks.append([w.write(c), len(c), cx])
                    parts[i] = {"chunks": chunks}
            exp_len = w.pos - start
            for i, (pp, r) in enumerate(zip(ep.parts, res)):
                t = pp.tensor
                if "coded" in r:
                    parts[i].update(sm_off=w.write(r["sm"]), sm_xxh=r["sx"])
                    s = stats.setdefault(t.role.proj, {"elements": 0, "coded_bytes": 0,
                                                       "exp_histogram": np.zeros(256, np.int64)})
                    s["elements"] += r["sm"].size
                    coded = sum(len(c) for c in r["coded"])
                    s["coded_bytes"] += coded
                    s["exp_histogram"] += r["hist"]
                    exp_el += r["sm"].size
                    exp_coded += coded
                else:
                    with maps.view(t.file, pp.src_offset, pp.nbytes) as v:
                        parts[i] = {"off": w.write(v), "xxh": r["xxh"]}
                if r["sha"] is not None:
                    L[("sha", t.name)] = r["sha"]
                else:
                    with maps.view(t.file, pp.src_offset, pp.nbytes) as v:
                        fused_sha[t.name].update(v)
                exp_bytes += pp.nbytes
                tick(pp.nbytes)
            L[("ext", ep.key)] = {"off": start, "exp_length": exp_len, "length": w.pos - start, **parts}
            exp_stored += w.pos - start
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on failure: only the extents already running finish
    for name, h in fused_sha.items():
        L[("sha", name)] = h.hexdigest()
    for path, fut in shard_sha.items():
        L[("sha", path)] = fut.result()
    L["stats"] = {p: {"elements": s["elements"], "coded_bytes": s["coded_bytes"],
                      "exp_histogram": [int(v) for v in s["exp_histogram"]]} for p, s in sorted(stats.items())}
    index = _dumps(build_index(ck, plans, opts, layout=L))
    if len(index) > bound:  # cannot happen: every number was bounded by the placeholder width
        raise AssertionError(f"index {len(index)} bytes exceeds its planned bound {bound}")
    file_length = w.pos
    fh.seek(0)
    fh.write(Preamble(VERSION, len(index), data_offset, file_length, xxh3(index)).pack())
    fh.write(index)
    fh.write(b"\0" * (data_offset - PREAMBLE_SIZE - len(index)))
    dense = sum(t.nbytes for t in ck.tensors.values() if t.role is None)
    return PackReport(path=Path(), seconds=0.0, threads=threads, file_bytes=file_length, dense_bytes=dense,
                      expert_bytes=exp_bytes, expert_stored=exp_stored, exp_elements=exp_el,
                      exp_coded=exp_coded, extents=len(plans), tensors=len(ck.tensors))
