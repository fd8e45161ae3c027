"""Whether the store's buffers ask for transparent huge pages on this host: decided by measurement.

A decoded expert streams faster from 2 MiB pages than from 4 KiB ones (the matrix-vector products of a
realdims decode step took 10.9-17.2 ms against 14.9-20.1, host C), but obtaining a huge page costs
what the host makes it cost. Memory the guest holds faults in at about 0.1 ms per MiB on huge pages
against 0.5 on small ones (one fault per 2 MiB instead of 512). In a virtual machine whose host takes
back free guest memory (free page reporting reports free blocks of 2 MiB and more, which the host then
unmaps), every fresh huge page comes from such a block and its first touch faults on the host too:
2.3-10 ms per MiB against 0.5-0.6 for small pages on host C, which made the demo's start-up 0.3 s and
the realdims preload 2-3 s slower.

So the first time a host is seen (and when the package version changes) ``decide`` maps fresh 32 MiB
regions, on small pages and asking for huge ones, twice alternately, and times the first touch of
every page (about 0.35 s where huge pages are costly, 0.1 s where they are not). Huge pages are used
when a MiB of them costs at most ``RATIO`` times a MiB of small pages: the one-off cost of faulting them
in is then repaid by the first passes over the memory. The result is cached per host
(``calibrate.Calibrator``: ``hosts/pages-*.json``) and reported (``report``: the store's stats and the
benchmarks' host line).
``ZIPMOE_HUGEPAGES=1`` forces them on, ``0`` off (no measurement either way).

A probe can meet memory the guest still holds (a process that freed gigabytes a moment ago) and find
huge pages cheap when the store's gigabytes will not be. So a process that uses them on a measured or
cached verdict keeps watching: the buffers fault their huge pages in as they are mapped
(``Buffer``, one write per huge page, timed) until ``WATCH_PIECES`` pieces are seen; if their median
costs more than ``RATIO`` times the small pages' figure, the process stops asking (buffers mapped
later use small pages) and the cache is rewritten with what was seen, so the next run starts without.
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import time

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["RATIO", "decide", "fault_in", "measure", "observe", "report", "reset", "watching"]

RATIO = 2.0  # huge pages when a MiB of them faults in at most this many times a MiB of small pages
WATCH_PIECES = 16  # huge pages a process times before it trusts the verdict (32 MiB at 2 MiB)
SPAN = 32 << 20  # bytes of each probe region (a multiple of the huge page: mapped on a boundary)
FORMAT = 1

_lock = threading.RLock()  # re-entrant: a Calibrator built under it reads report() (via host_info)
_state: dict = {}
_watch: dict = {}  # while a measured or cached "on" is being checked: pieces seen, where to write


def measure(huge: int, span: int = SPAN, rounds: int = 2, clock=time.perf_counter) -> dict:
    """Milliseconds per MiB to fault in fresh anonymous memory on small pages and on huge pages of
    ``huge`` bytes, ``rounds`` times alternately, one write per base page in order. Each round's
    figure is the median over the region's huge-page-sized pieces: on host C the first 4-6 huge pages
    of a region came from memory the guest still held (0.1 ms/MiB) and the rest cost 2.3-10 ms/MiB
    each, which is what a store of gigabytes pays. Across rounds the estimate is the conservative one
    (the cheapest small-page round, the dearest huge-page round): one round in three found the small
    pages cold and the huge ones warm. ``huge_share``: how much of a huge-page region the kernel
    actually gave as huge pages (from ``/proc/self/smaps``; None where it cannot be read)."""
    span = max(huge, span // huge * huge)
    got: dict[str, list[float]] = {"small": [], "huge": []}
    share = None
    for _ in range(rounds):
        for kind, advice in (("small", mmap.MADV_NOHUGEPAGE), ("huge", mmap.MADV_HUGEPAGE)):
            mm = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                mm.madvise(advice)
                a = np.frombuffer(mm, dtype=np.uint8)
                got[kind].append(float(np.median(fault_in(a, span, huge, clock))))
                if kind == "huge":
                    s = _huge_share(a.ctypes.data, span)
                    share = s if share is None or s is None else min(share, s)
                del a
            finally:
                mm.close()
    return {"small_ms_per_mib": min(got["small"]), "huge_ms_per_mib": max(got["huge"]), "huge_share": share,
            "rounds": got}


def fault_in(a: np.ndarray, span: int, piece: int, clock=time.perf_counter) -> list[float]:
    """Write a zero into every base page of ``a[:span]``, one ``piece`` at a time: the milliseconds per
    MiB each piece took to fault in, in order."""
    per, mib = [], piece / 2**20
    for lo in range(0, span, piece):
        t = clock()
        a[lo:lo + piece:mmap.PAGESIZE] = 0
        per.append((clock() - t) * 1e3 / mib)
    return per


def _huge_share(addr: int, span: int) -> float | None:
    """AnonHugePages of the mapping at ``addr`` over its size (None where smaps cannot be read)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:
                    lo = int(head.split("-")[0], 16)
                    inside = lo <= addr < lo + span
                elif inside and line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024 / span
    except (OSError, ValueError):
        pass
    return None


def _verdict(m: dict) -> bool:
    small, huge = m.get("small_ms_per_mib"), m.get("huge_ms_per_mib")
    if not isinstance(small, (int, float)) or not isinstance(huge, (int, float)) or small <= 0 or huge < 0:
        return False
    if m.get("huge_share") is not None and m["huge_share"] < 0.5:  # the kernel did not give them
        return False
    return huge <= RATIO * small


def decide(offered: int, *, measure_fn=None, calibrator=None) -> int:
    """The huge page size the store's buffers ask for (0: none), given the kernel's ``offered`` size:
    forced by ``ZIPMOE_HUGEPAGES``, cached for this host, or measured now (once per process)."""
    with _lock:
        if "use" in _state and _state.get("offered") == offered:
            return _state["use"]
        env = os.environ.get("ZIPMOE_HUGEPAGES", "").strip()
        if not offered or env in ("0", "1"):
            how = "not offered by the kernel" if not offered else f"ZIPMOE_HUGEPAGES={env}"
            _set(offered, offered if offered and env == "1" else 0, how, None)
            return _state["use"]
        if calibrator is None:
            from zipmoe_run.calibrate import Calibrator

            calibrator = Calibrator()
        key = {**calibrator.key, "huge": offered}
        path = calibrator._file("pages", key)
        d = calibrator._load(path, key, fmt=FORMAT)
        how = "cached"
        if d is None or not isinstance(d.get("measured"), dict):
            m = (measure_fn or measure)(offered)
            rates = {k: m[k] for k in ("small_ms_per_mib", "huge_ms_per_mib")}  # what the cache checks
            d = {"format": FORMAT, "key": key, "rates": rates, "measured": m,
                 "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            calibrator._save(path, d)
            how = "measured"
        share = d["measured"].get("huge_share")
        m = {**d["rates"], "huge_share": share if isinstance(share, (int, float)) else None}  # checked numbers
        use = offered if _verdict(m) else 0
        _set(offered, use, how, m)
        if use:
            _watch.update(pieces=[], calibrator=calibrator, path=path, entry=d)
        log.info("huge pages for the store's buffers: %s (%s: faulting a MiB in took %.2f ms on huge pages, "
                 "%.2f ms on small ones)", "on" if use else "off", how, m["huge_ms_per_mib"], m["small_ms_per_mib"])
        return use


def _set(offered: int, use: int, how: str, m: dict | None) -> None:
    _state.clear()
    _state.update(offered=offered, use=use, how=how, measured=m)
    _watch.clear()


def watching() -> bool:
    """Whether new huge-page buffers should time their faults for :func:`observe`."""
    return bool(_watch)


def observe(ms_per_mib: list[float]) -> None:
    """Fault costs (ms per MiB) of huge pages a buffer just faulted in. Once ``WATCH_PIECES`` are seen,
    their median against the small pages' figure confirms the verdict, or turns huge pages off for
    the rest of the process and rewrites the cache with the cost seen."""
    with _lock:
        if not _watch:
            return
        pieces = _watch["pieces"]
        pieces.extend(float(x) for x in ms_per_mib)
        if len(pieces) < WATCH_PIECES:
            return
        seen = float(np.median(pieces))
        m = dict(_state["measured"] or {})
        cal, path, entry = _watch["calibrator"], _watch["path"], _watch["entry"]
        _watch.clear()
        if _verdict({**m, "huge_ms_per_mib": seen}):
            return
        m["huge_ms_per_mib"] = seen
        _state.update(use=0, how="observed", measured=m)
        rates = {"small_ms_per_mib": m["small_ms_per_mib"], "huge_ms_per_mib": seen}
        measured = {**entry["measured"], **rates, "observed_pieces": len(pieces)}
        cal._save(path, {**entry, "rates": rates, "measured": measured, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        log.info("huge pages for the store's buffers: off from now on (its first %d huge pages took %.2f ms/MiB to "
                 "fault in, against %.2f on small pages)", len(pieces), seen, m["small_ms_per_mib"])


def report() -> dict | None:
    """``{"offered", "use", "how", "measured"}`` once decided in this process, else None."""
    with _lock:
        return dict(_state) if "use" in _state else None


def reset() -> None:
    """Forget this process's decision and any watch of it (tests)."""
    with _lock:
        _state.clear()
        _watch.clear()
