"""Self-calibration: this host's decode and read speeds, measured once and cached, so that the store's
cost model starts from this machine's numbers rather than another's.

What is measured (``calibrate_measure``; a few tens of ms, after the decoder's one-time kernel load):

* decode: BF16 output bytes/s of ``formats.decoder.ParallelDecoder`` on 1, 2, 4, ... threads up to the
  usable cores, over a small synthetic buffer (N(0, 0.02) BF16 chunks coded exactly as the packer
  does; one coded chunk repeated, each chunk an independent stream); best of a few runs after a
  warm-up alone (key ``"t"``), and the best while a memory-bound compute thread runs beside it
  (key ``"t+compute"``: what a decode step's products do to it);
* read: bytes/s of the archive's file system through the store's own read path
  (``store.io.ExpertReader``: ``O_DIRECT`` where the file system allows it, else ``pread`` +
  ``POSIX_FADV_DONTNEED`` with the pages dropped first), a few MiB of expert extents of the archive
  being opened, in the store's read pieces, with 1, 2 and 4 reads in flight (``read_bps``,
  ``read_bps@2``, ``read_bps@4``). Never the page cache where ``O_DIRECT`` works.

``zipmoe_run.cores`` turns these into the core budget: decoder threads and read queue depth.

The cache (JSON, atomic writes, read with ``formats.jsonstrict``) lives in ``$ZIPMOE_CACHE_DIR``, else
``$XDG_CACHE_HOME/zipmoe``, else ``~/.cache/zipmoe``, under ``hosts/``: one file per host key for decode
(CPU model, ISA flags, usable cores, machine, package version) and one per host key + file system
(device number and type of the archive's file system) for reads. A new version re-measures; a corrupt
or foreign file is ignored with a logged note and re-measured.

Online: the store keeps refining the estimates (EWMA, ``CostModel.observe``); a drift watcher (``drift``)
keeps a slow average of the same measurements, logs when it moves more than ``DRIFT_RATIO`` from the
calibration the run started from and notes it (``notes``, in the runtime's stats); at the end of the run
the mean of a rate that drifted is written to the cache, where the next store on this host starts from
it (the first measurement stays under ``measured``).

Environment: ``ZIPMOE_CALIBRATE=off`` skips self-calibration (the cost model is then
``tiers.load_calibration()``: ``zipmoe bench io``'s file if present, else the documented assumptions);
``ZIPMOE_CALIBRATE=force`` re-measures; ``ZIPMOE_CALIBRATION=FILE`` uses that calibration file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

from formats.errors import ZmoeError
from formats.workpool import spread_default
from zipmoe_run.calibrate_measure import READ_MIN, READ_TARGET, contended_key, fs_key, measure_decode, measure_read
from zipmoe_run.cores import plan_cores
from zipmoe_run.drift import DRIFT_RATIO, Drift, positive as _positive
from zipmoe_run.hostinfo import codegen_env, host_info
from zipmoe_run.tiers import CostModel, load_calibration

__all__ = ["READ_MIN", "READ_TARGET", "CalibrationError", "ENV_MODE", "ENV_DIR", "ENV_FILE", "DRIFT_RATIO",
           "cache_dir", "package_version", "host_key", "fs_key", "measure_decode", "measure_read", "Calibrator",
           "Drift", "store_cost", "current", "report"]

log = logging.getLogger(__name__)

ENV_MODE, ENV_DIR, ENV_FILE = "ZIPMOE_CALIBRATE", "ZIPMOE_CACHE_DIR", "ZIPMOE_CALIBRATION"
FORMAT = 2  # 2: contended decode rates and read rates per queue depth


def cache_dir() -> Path:
    d = os.environ.get(ENV_DIR)
    if d:
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zipmoe"


@functools.lru_cache(maxsize=None)  # about 5 ms a lookup, and a run asks three times
def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("zipmoe")
    except Exception:  # noqa: BLE001 - not installed (a source tree): the code's own marker
        return "source"


def host_key(info: dict | None = None, version: str | None = None) -> dict:
    h = info if info is not None else host_info()
    return {"cpu": h.get("cpu"), "isa": list(h.get("isa") or []), "cores": h.get("cores"),
            "machine": h.get("machine"), "version": version if version is not None else package_version()}


# -- the cache --------------------------------------------------------------------------------------------------


class Calibrator:
    """Cached measurements of this host. ``decode_fn(threads, codec=) -> {"t": bps}`` and
    ``read_fn(path, spans, io_mode) -> {"read_bps", "read_method", ...} | None`` default to
    :func:`measure_decode` / :func:`measure_read`; ``clock`` times the calibration itself."""

    def __init__(self, directory: str | os.PathLike | None = None, *, decode_fn=None, read_fn=None,
                 info: dict | None = None, version: str | None = None, clock=time.perf_counter,
                 force: bool | None = None):
        self.dir = Path(directory) if directory is not None else cache_dir()
        self.decode_fn = decode_fn or measure_decode
        self.read_fn = read_fn or measure_read
        self.info = info if info is not None else host_info()
        self.key = host_key(self.info, version)
        self.clock = clock
        self.force = os.environ.get(ENV_MODE, "").lower() == "force" if force is None else force
        self.measured: list[str] = []  # what this instance measured (rather than found cached)

    def _file(self, kind: str, key: dict) -> Path:
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.dir / "hosts" / f"{kind}-{h}.json"

    def _load(self, p: Path, key: dict, fmt: int = FORMAT) -> dict | None:
        """The cache entry at ``p`` for ``key`` in format ``fmt``; None (measure again) when absent, forced,
        of an older format (logged at INFO: an upgrade) or unusable (logged as a warning)."""
        from formats.jsonstrict import loads

        if self.force or not p.exists():
            return None
        try:
            d = loads(p.read_bytes())
            if isinstance(d, dict) and isinstance(d.get("format"), int) and d["format"] < fmt:
                log.info("calibration cache %s is of format %d (now %d); measuring again", p, d["format"], fmt)
                return None
            if not isinstance(d, dict) or d.get("format") != fmt or d.get("key") != key:
                raise ValueError("not a calibration entry for this host")
            if not isinstance(d.get("rates"), dict) or not d["rates"] or not all(map(_positive, d["rates"].values())):
                raise ValueError("rates are not positive numbers")
            return d
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring calibration cache %s (%s); measuring again", p, exc)
            return None

    def _save(self, p: Path, d: dict) -> None:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, p)
        except OSError as exc:  # a read-only home: the calibration still serves this process
            log.warning("cannot write calibration cache %s (%s)", p, exc)

    def decode_key(self, codec: str) -> dict:
        """The cache key of decode rates: the host's, plus the codec unless it is ``zstd-lit`` (so the
        entries written before codecs were told apart, all of zstd-lit, stay valid), plus the decoder's
        thread placement (``formats.workpool.spread_default``), plus the code-generation
        settings of an emulated instruction set (``hostinfo.codegen_env``: the decoder is compiled code)."""
        key = self.key if codec == "zstd-lit" else {**self.key, "codec": codec}
        if spread_default():  # workers bound one per CPU: rates measured before that do not apply
            key = {**key, "decode_placement": "spread"}
        env = codegen_env()
        return {**key, "codegen": env} if env else key

    def decode(self, threads: int, codec: str | None = None) -> dict:
        """``{"rates": {"1": bps, ..., str(threads): bps, "1+compute": bps, ...}, "file", "cached",
        "seconds"}``: 1, 2, 4, ... threads up to ``threads``, and ``threads`` itself."""
        if codec is None:
            from formats.codec import DEFAULT_CODEC

            codec = DEFAULT_CODEC
        key = self.decode_key(codec)
        p = self._file("decode", key)
        d = self._load(p, key)
        want = sorted({1 << i for i in range(int(threads).bit_length()) if 1 << i <= int(threads)} | {int(threads)})
        miss = [t for t in want if d is None or str(t) not in d["rates"]]
        if not miss:
            return {**d, "file": str(p), "cached": True, "seconds": 0.0}
        t0 = self.clock()
        got = {str(k): float(v) for k, v in self.decode_fn(miss, codec=codec).items()}
        dt = self.clock() - t0
        self.measured.append("decode")
        d = {"format": FORMAT, "key": key, "rates": {**(d["rates"] if d else {}), **got},
             "measured": {**(d.get("measured", {}) if d else {}), **got}, "seconds": dt,
             "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._save(p, d)
        log.info("calibrated decode in %.0f ms: %s", dt * 1e3,
                 ", ".join(f"{k}T {v / 1e9:.2f} GB/s" for k, v in sorted(d["rates"].items())))
        return {**d, "file": str(p), "cached": False}

    def read_key(self, path, io_mode: str) -> dict:
        return {**self.key, "fs": fs_key(path), "io_mode": io_mode}

    def read(self, path, spans, io_mode: str = "auto") -> dict | None:
        """``{"rates": {"read_bps": bps}, "read_method", "file", "cached", "seconds"}``, None when the
        archive is too small to measure (nothing cached)."""
        key = self.read_key(path, io_mode)
        p = self._file("read", key)
        d = self._load(p, key)
        if d is not None and "read_bps" in d["rates"]:
            return {**d, "file": str(p), "cached": True, "seconds": 0.0}
        t0 = self.clock()
        m = self.read_fn(path, spans, io_mode)
        dt = self.clock() - t0
        if m is None:
            return None
        self.measured.append("read")
        rates = {"read_bps": float(m["read_bps"]),
                 **{f"read_bps@{int(k)}": float(v) for k, v in (m.get("depth_bps") or {}).items() if int(k) > 1}}
        d = {"format": FORMAT, "key": key, "rates": rates,
             "measured": dict(rates), "read_method": str(m.get("read_method", "?")),
             "seconds": dt, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._save(p, d)
        log.info("calibrated reads of %s in %.0f ms: %s (%s)", path, dt * 1e3,
                 ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in sorted(rates.items())), d["read_method"])
        return {**d, "file": str(p), "cached": False}

    def record(self, decode: dict | None = None, read_path=None, io_mode: str = "auto", read_bps: float | None = None,
               read_method: str = "?", how: str = "zipmoe bench io", codec: str | None = None) -> list[str]:
        """Store measurements made elsewhere (``zipmoe bench io``): ``decode`` {threads: bps} and the read
        speed of ``read_path``'s file system; returns the files written."""
        written, at = [], time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if decode:
            from formats.codec import DEFAULT_CODEC

            key = self.decode_key(codec or DEFAULT_CODEC)  # the codec the decode speeds were measured on
            p = self._file("decode", key)
            d = self._load(p, key) or {"format": FORMAT, "key": key, "rates": {}, "measured": {}}
            got = {str(k): float(v) for k, v in decode.items()}
            d.update(rates={**d["rates"], **got}, measured={**d.get("measured", {}), **got}, by=how, at=at)
            self._save(p, d)
            written.append(str(p))
        if read_path is not None and read_bps is not None:
            key = self.read_key(read_path, io_mode)
            p = self._file("read", key)
            self._save(p, {"format": FORMAT, "key": key, "rates": {"read_bps": float(read_bps)},
                           "measured": {"read_bps": float(read_bps)}, "read_method": read_method, "by": how,
                           "at": at, "seconds": 0.0})
            written.append(str(p))
        return written

    def update(self, file: str, rate: str, value: float) -> None:
        """Write an online estimate into the cache entry ``file`` (a drift)."""
        from formats.jsonstrict import loads

        p = Path(file)
        try:
            d = loads(p.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("cannot update calibration cache %s (%s)", p, exc)
            return
        if isinstance(d, dict) and isinstance(d.get("rates"), dict):
            d["rates"][rate] = float(value)
            d.setdefault("drift", []).append({"rate": rate, "bps": float(value),
                                              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            d["drift"] = d["drift"][-8:]
            self._save(p, d)


class CalibrationError(ZmoeError):
    """A calibration file named by ``ZIPMOE_CALIBRATION`` cannot be used (one line, naming it)."""


def _bench_io_file() -> CostModel:
    """``zipmoe bench io``'s calibration file, or the assumptions (a bad file is logged and ignored)."""
    try:
        return load_calibration()
    except ValueError as exc:
        log.warning("ignoring %s", exc)
        return CostModel()


def _off() -> bool:
    return os.environ.get(ENV_MODE, "").strip().lower() in ("off", "0", "no", "false")


def current(path=None, spans=None, threads: int | None = None, io_mode: str = "auto",
            throttle_bps: float | None = None, calibrator: Calibrator | None = None,
            codec: str | None = None) -> CostModel:
    """The calibration in use on this host: ``ZIPMOE_CALIBRATION``'s file, or the assumptions when
    ``ZIPMOE_CALIBRATE=off``, else the cached (or now measured) decode speeds for up to ``threads``
    decoder threads (default: usable cores) and, with ``path``, the read speed of its file system; the
    core budget (``zipmoe_run.cores``) chosen from them is ``extra["cores"]`` and its decode and read
    rates are the model's. ``compute_bps`` comes from a ``zipmoe bench io`` file of this host if there
    is one (not measured here). ``codec``: the experts' codec, whose decode entry the run's drift may
    update; None (a ``--raw`` archive, a checkpoint folder: no decoding) starts from the default codec's
    rates and never writes them (a raw archive's copies ran at 4.5 GB/s and rewrote huf4x's entry)."""
    from zipmoe_run.hostinfo import usable_cores

    threads = int(threads or usable_cores())
    if os.environ.get(ENV_FILE):
        try:
            return load_calibration(os.environ[ENV_FILE])
        except ValueError as exc:
            raise CalibrationError(f"{ENV_FILE}: {exc}") from None
    base = _bench_io_file()
    if _off():
        base.source = f"{base.source}; self-calibration off ({ENV_MODE})"
        return base
    cal = calibrator or Calibrator()
    dec = cal.decode(threads, codec)
    rd = None
    if path is not None and spans is not None:
        try:
            rd = cal.read(path, spans, io_mode)
        except (ZmoeError, OSError) as exc:  # the store reports a bad file on first use, in its own words
            log.warning("%s: read speed not calibrated (%s)", path, exc)
    ours = base.extra.get("host_key") == cal.key  # `zipmoe bench io` measured this very host
    compute = base.compute_bps if ours else CostModel().compute_bps
    how = lambda d: f"cached {d['file']}" if d["cached"] else f"measured in {d['seconds'] * 1e3:.0f} ms"  # noqa: E731
    src = [f"self-calibration: decode {how(dec)}"]
    read_bps, method = (base.read_bps, f"{base.read_method} (bench io)") if ours else \
        (CostModel().read_bps, "assumed, not measured")
    files = {"read_bps": (None, "read_bps")}
    if rd is not None:
        read_bps, method = rd["rates"]["read_bps"], rd["read_method"]
        src.append(f"read {how(rd)}")
        files["read_bps"] = (rd["file"], "read_bps")
    elif path is not None:
        src.append("read not measured (too few expert bytes)")
    plan = plan_cores(threads, dec["rates"], rd["rates"] if rd is not None else None)
    decode_key = next((k for k, v in dec["rates"].items() if v == plan.decode_bps
                       and k in (str(plan.decode_threads), contended_key(plan.decode_threads))), str(threads))
    files["decode_bps"] = (dec["file"] if codec is not None else None, decode_key)  # only a codec's own store writes it
    if rd is not None and plan.read_bps is not None:
        read_bps = plan.read_bps
        files["read_bps"] = (rd["file"], "read_bps" if plan.read_depth == 1 else f"read_bps@{plan.read_depth}")
    if throttle_bps is not None and throttle_bps < read_bps:
        read_bps, method = float(throttle_bps), f"{method}, throttled"
        files["read_bps"] = (None, "read_bps")
    cost = CostModel(read_bps=read_bps, decode_bps=dec["rates"][decode_key], decode_bps_per_core=dec["rates"]["1"],
                     cores=plan.decode_threads, compute_bps=compute, read_method=method, source="; ".join(src),
                     extra={"host_key": cal.key, "calibration_s": dec["seconds"] + (rd["seconds"] if rd else 0.0),
                            "cores": plan.to_json()})
    cost.drift = Drift(cost, files, cal)
    return cost


def store_cost(archive, threads: int, io_mode: str = "auto", throttle_bps: float | None = None) -> CostModel:
    """:func:`current` for the experts of an open ``formats.reader.Archive`` read with ``io_mode``."""
    spans = [(e.offset, e.length) for e in archive.index.experts if e.length > 0]
    codecs = Counter(p.codec for e in archive.index.experts for p in e.parts if p.codec)
    codec = codecs.most_common(1)[0][0] if codecs else None  # the decode speed of the archive's own codec
    return current(archive.path, spans, threads, io_mode, throttle_bps, codec=codec)


def stats_fields(calibration: dict, live: CostModel) -> dict:
    """What a source adds to its ``stats()``: the calibration its store started from (``calibration``,
    a ``CostModel.to_json()``) with the drift the store's live cost model noticed, and the host."""
    from zipmoe_run.hostinfo import host_info

    drift = live.drift
    return {"calibration": {**calibration, "drift": list(getattr(drift, "notes", [])),
                            "drift_events": getattr(drift, "events", 0)},
            "host": host_info()}


def report(archive_path=None, threads: int | None = None, io_mode: str = "auto") -> dict:
    """What a benchmark reports about its host: ``{"host": host_info(), "calibration": CostModel.to_json(),
    "host_line": one line}``; the read speed is that of ``archive_path``'s file system when given (a
    ``.zmoe`` archive), else not part of it. Never raises for a bad archive (the benchmark says)."""
    from zipmoe_run.hostinfo import host_line

    cost = None
    if archive_path is not None:
        try:
            from formats.reader import Archive

            with Archive(archive_path) as ar:
                cost = store_cost(ar, threads or 0, io_mode)
        except (ZmoeError, OSError) as exc:
            log.warning("%s: no read calibration (%s)", archive_path, exc)
    if cost is None:
        cost = current(threads=threads)
    info = host_info()
    cal = cost.to_json()
    return {"host": info, "calibration": cal, "host_line": host_line(info, cal)}
