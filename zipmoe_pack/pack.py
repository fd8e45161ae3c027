"""`pack(src_dir, out_path)`: checkpoint directory -> `.zmoe`, streaming, parallel, atomic."""
from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from formats.codec import ChunkEncoder, checksum
from formats.errors import InputError
from formats.planes import split_bf16
import xxhash

from formats.preamble import PREAMBLE_SIZE, VERSION, Preamble, align, hex64, xxh3
from zipmoe_pack.scan import Checkpoint, scan_checkpoint
from zipmoe_pack.writer import (RAW_CHUNK_BYTES, ExtentPlan, PackOptions, PackReport, _bound_index, _dumps,
                                _encoding, build_index, plan_extents)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
_COPY = 8 << 20


class _Maps:
    """Read-only maps of the source shards, shared by the workers (views only, no copies)."""

    def __init__(self, ck: Checkpoint):
        self._maps: dict[str, mmap.mmap] = {}
        for f in ck.files:
            if f.kind == "safetensors" and f.size:
                with open(f.abspath, "rb") as fh:
                    self._maps[f.path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def view(self, file: str, offset: int, n: int) -> memoryview:
        return memoryview(self._maps[file])[offset:offset + n] if n else memoryview(b"")

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass


def _piece_hashes(buf) -> list[str]:
    mv = memoryview(buf)
    return [hex64(xxh3(mv[i:i + RAW_CHUNK_BYTES])) for i in range(0, len(mv), RAW_CHUNK_BYTES)]


_local = threading.local()


def _encode_extent(ep: ExtentPlan, maps: _Maps, opts: PackOptions) -> list[dict]:
    """Worker: split, code and hash every part of one expert. Returns one dict per part."""
    enc = getattr(_local, "enc", None)
    if enc is None or _local.codec != opts.codec:
        enc = _local.enc = ChunkEncoder(opts.codec)
        _local.codec = opts.codec
    C = opts.chunk_elements
    out = []
    for pp in ep.parts:
        t = pp.tensor
        src = maps.view(t.file, pp.src_offset, pp.nbytes)
        r = {"sha": hashlib.sha256(src).hexdigest() if pp.slice is None else None}
        if _encoding(t, opts) == "raw":
            r.update(raw=src, xxh=_piece_hashes(src))
        else:
            u16 = np.frombuffer(src, dtype=np.uint16)
            n = u16.size
            exp = np.empty(n, np.uint8)
            sm = np.empty(n, np.uint8)
            split_bf16(u16, exp, sm)
            coded, cx, sx = [], [], []
            for lo in range(0, n, C):
                c = enc.encode(exp[lo:lo + C])
                coded.append(c)
                cx.append(hex64(checksum(c)))
                sx.append(hex64(checksum(sm[lo:lo + C])))
            r.update(coded=coded, cx=cx, sm=sm, sx=sx, hist=np.bincount(exp, minlength=256))
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


def pack(src: str | os.PathLike, out: str | os.PathLike, opts: PackOptions | None = None,
         progress: Progress | None = None) -> PackReport:
    opts = opts or PackOptions()
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
    plans = plan_extents(ck)
    threads = opts.threads or os.cpu_count() or 1
    bound = _bound_index(ck, plans, opts)
    data_offset = align(PREAMBLE_SIZE + bound)
    total = sum(f.size for f in ck.files)
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    maps = _Maps(ck)
    try:
        with open(tmp, "wb") as fh:
            report = _write(fh, ck, plans, opts, maps, data_offset, bound, threads, total, progress)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        _fsync_dir(parent)
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else e.strerror
        raise InputError(f"{out}: cannot write archive ({what})") from None
    finally:
        maps.close()
        if tmp.exists():
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(_COPY):
            h.update(buf)
    return h.hexdigest()


def _write(fh, ck, plans, opts, maps, data_offset, bound, threads, total, progress) -> PackReport:
    L: dict = {}
    # whole-file hashes of the shards, on a thread of their own (hashlib releases the GIL)
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zipmoe-sha")
    shard_sha = {f.path: hasher.submit(_sha256_file, f.abspath) for f in ck.files if f.kind == "safetensors"}
    try:
        return _write_data(fh, ck, plans, opts, maps, data_offset, bound, threads, total, progress, L, shard_sha)
    finally:
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
        with open(f.abspath, "rb") as src:
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
                v = maps.view(f.path, t.offset, t.nbytes)
                L[("off", t.name)] = w.pad()
                w.write(v)
                L[("xxh", t.name)] = _piece_hashes(v)
                L[("sha", t.name)] = hashlib.sha256(v).hexdigest()
                tick(t.nbytes)
    stats: dict = {}
    fused_sha = {t.name: hashlib.sha256() for t in ck.experts if t.role.fused}
    exp_bytes = exp_stored = exp_el = exp_coded = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zipmoe-pack") as pool:
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
                    parts[i] = {"off": w.write(r["raw"]), "xxh": r["xxh"]}
                if r["sha"] is not None:
                    L[("sha", t.name)] = r["sha"]
                else:
                    fused_sha[t.name].update(maps.view(t.file, pp.src_offset, pp.nbytes))
                exp_bytes += pp.nbytes
                tick(pp.nbytes)
            L[("ext", ep.key)] = {"off": start, "exp_length": exp_len, "length": w.pos - start, **parts}
            exp_stored += w.pos - start
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
