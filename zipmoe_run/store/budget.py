"""The memory budget: parsing the one knob, and the ledger every byte the store holds is charged to.

``--memory-budget`` accepts bytes (``3GiB``, ``500MB``, ``2G``, ``1048576``), a percentage of the
model's routed-expert bytes (``30%``: of the decoded BF16 size, the same number for every archive of
one model, see specs/runtime.md section 2) or ``auto`` (a share of the memory available now).

The ledger is plain bookkeeping (no locking: the store's lock guards it). Categories:
``full``/``comp``/``sm`` (resident experts per tier), ``staging`` (read and decode buffers of
experts being fetched or lent to the model), ``pool`` (free buffers kept for reuse), ``draining``
(buffers released by the store that the model still references), ``fixed`` (decoder and split
scratch). ``used`` is their sum and never exceeds ``capacity``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from formats.errors import ZmoeError

__all__ = ["Budget", "BudgetError", "Ledger", "parse_budget", "parse_bytes", "available_memory", "fmt_bytes",
           "CATEGORIES"]

log = logging.getLogger(__name__)

CATEGORIES = ("full", "comp", "sm", "staging", "pool", "draining", "fixed")

_UNITS = {"": 1, "b": 1,
          "k": 1 << 10, "kib": 1 << 10, "kb": 10 ** 3,
          "m": 1 << 20, "mib": 1 << 20, "mb": 10 ** 6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10 ** 9,
          "t": 1 << 40, "tib": 1 << 40, "tb": 10 ** 12}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_PCT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


class BudgetError(ZmoeError):
    """A memory budget that cannot be parsed or cannot hold the store's minimum working set."""


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def parse_bytes(text: str) -> int:
    """``3GiB`` / ``500MB`` / ``2G`` (single letters are binary) / ``1048576`` -> bytes."""
    m = _BYTES_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise BudgetError(f"cannot parse memory size {text!r} (examples: 3GiB, 500MB, 30%, auto)")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Budget:
    nbytes: int | None  # None: unlimited
    spec: str  # what was asked for
    how: str  # one line: what was picked and why

    @property
    def unlimited(self) -> bool:
        return self.nbytes is None


def _read_int(p: Path) -> int | None:
    try:
        s = p.read_text().strip()
    except OSError:
        return None
    if s == "max":
        return None
    try:
        return int(s)
    except ValueError:
        return None


def _cgroup_headroom() -> int | None:
    """limit - usage of this process's memory cgroup (v2 or v1), None when unlimited or unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, rel = parts
        rel = rel.lstrip("/")
        if ctrls == "":  # v2
            base = Path("/sys/fs/cgroup") / rel
            lim, use = _read_int(base / "memory.max"), _read_int(base / "memory.current")
        elif "memory" in ctrls.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel
            lim, use = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
        else:
            continue
        if lim is None or use is None or lim >= 1 << 60:
            continue
        room = max(0, lim - use)
        best = room if best is None else min(best, room)
    return best


def available_memory() -> int:
    """Bytes this process can still use: MemAvailable, capped by its memory cgroup's headroom."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    room = _cgroup_headroom()
    return avail if room is None else min(avail, room)


AUTO_SHARE = 0.8  # of the memory available after the dense weights and AUTO_HEADROOM
AUTO_HEADROOM = 512 << 20


def parse_budget(spec: str | int | None, *, expert_bytes: int, need_all: int | None = None,
                 dense_bytes: int = 0, available: int | None = None) -> Budget:
    """Turn the knob into bytes.

    ``expert_bytes``: decoded BF16 bytes of all routed experts (what ``N%`` is a share of);
    ``need_all``: what the store needs to hold every expert decoded (``auto`` never picks more);
    ``dense_bytes``: the mapped dense weights (``auto`` leaves room for them);
    ``available``: for tests; default ``available_memory()``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "unlimited", "inf")):
        return Budget(None, "unlimited", "unlimited: every expert stays decoded once fetched")
    if isinstance(spec, bool):
        raise BudgetError(f"memory budget must be bytes, a percentage or 'auto', not {spec!r}")
    if isinstance(spec, int):
        if spec <= 0:
            raise BudgetError(f"memory budget must be positive (got {spec})")
        return Budget(spec, str(spec), f"{fmt_bytes(spec)}")
    text = str(spec).strip()
    if text.lower() == "auto":
        avail = available_memory() if available is None else int(available)
        room = max(0, avail - dense_bytes - AUTO_HEADROOM)
        pick = int(room * AUTO_SHARE)
        cap = need_all if need_all is not None else None
        if cap is not None and pick >= cap:
            how = (f"auto: {fmt_bytes(cap)}, enough for every expert decoded "
                   f"({fmt_bytes(avail)} available)")
            return Budget(cap, "auto", how)
        how = (f"auto: {fmt_bytes(pick)} = {AUTO_SHARE:.0%} of the {fmt_bytes(room)} available after "
               f"{fmt_bytes(dense_bytes)} dense weights and {fmt_bytes(AUTO_HEADROOM)} headroom")
        return Budget(max(pick, 1), "auto", how)
    m = _PCT_RE.match(text)
    if m:
        pct = float(m.group(1))
        if not pct > 0:
            raise BudgetError(f"memory budget {text} must be above 0%")
        n = int(expert_bytes * pct / 100)
        return Budget(max(n, 1), text, f"{fmt_bytes(n)} = {pct:g}% of {fmt_bytes(expert_bytes)} routed-expert bytes "
                                       f"(decoded BF16)")
    n = parse_bytes(text)
    if n <= 0:
        raise BudgetError(f"memory budget must be positive (got {text!r})")
    return Budget(n, text, fmt_bytes(n))


class Ledger:
    """Byte accounting per category; ``capacity`` None means unlimited. Not thread-safe by itself."""

    def __init__(self, capacity: int | None):
        self.capacity = capacity
        self.bytes = {c: 0 for c in CATEGORIES}
        self.peak = 0

    @property
    def used(self) -> int:
        return sum(self.bytes.values())

    @property
    def resident(self) -> int:
        return self.bytes["full"] + self.bytes["comp"] + self.bytes["sm"]

    @property
    def free(self) -> float:
        return float("inf") if self.capacity is None else self.capacity - self.used

    def fits(self, n: int) -> bool:
        return self.capacity is None or self.used + n <= self.capacity

    def charge(self, cat: str, n: int) -> None:
        """Add ``n`` bytes (may be negative) to ``cat``; the caller checked ``fits`` for growth."""
        self.bytes[cat] += n
        if self.bytes[cat] < 0:
            raise AssertionError(f"ledger category {cat} went negative ({self.bytes[cat]})")
        u = self.used
        if self.capacity is not None and n > 0 and u > self.capacity:
            raise AssertionError(f"ledger over budget: {u} > {self.capacity} after charging {n} to {cat}")
        self.peak = max(self.peak, u)

    def move(self, src: str, dst: str, n: int) -> None:
        self.bytes[src] -= n
        self.bytes[dst] += n
        if self.bytes[src] < 0:
            raise AssertionError(f"ledger category {src} went negative ({self.bytes[src]})")

    def snapshot(self) -> dict:
        return dict(self.bytes, used=self.used, peak=self.peak, capacity=self.capacity)
