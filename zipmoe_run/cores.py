"""One core budget: how compute, decode and I/O share this host's cores (specs/runtime.md section 13).

A budgeted decode step runs three kinds of work at once: the compute threads (torch's and the bf16
kernel's: the user's ``--threads``, default every usable core), the decoder pool that turns coded
experts back into BF16, and reads that must keep the disk busy. Each gets what measurement says it
can use, not one thread per core each:

* **decoder threads**: the fewest threads whose calibrated decode rate is within :data:`MARGIN` of the
  best rate measured over 1, 2, 4, ... threads up to the usable cores. The rates measured *while a
  compute thread runs* (``"t+compute"``) decide when the calibration has them: that is the decoder's
  situation inside a decode step. On a 2-core host where a second decoder thread adds 20 % alone and
  nothing under contention, one thread is chosen and the other core stays with compute and I/O.
* **read depth**: the fewest reads in flight, but at least :data:`MIN_DEPTH`, whose calibrated rate is
  within :data:`MARGIN` of the best depth measured (1, 2, 4). Reads sleep in the kernel, so depth
  costs no core; it keeps the device's queue full while the I/O thread admits the next expert and
  submits decodes. The calibration reads alone, where one read at a time loses nothing (host C:
  1.00 / 1.05 / 0.92 GB/s at 1 / 2 / 4); inside a budgeted run the I/O thread's own work between
  reads (and the interpreter lock it shares with the compute and the decoders) left the device idle:
  the store read at 0.65-0.90 GB/s with one read in flight and 0.85-0.94 with two (``zipmoe bench
  e2e``, 30 %, the same calibration), so depth 1 is chosen only where depth 2 measured slower.

* **priority**: decoder threads run :func:`decode_nice` below the compute and I/O threads (Linux, per
  thread; ``formats.workpool``). When every core is busy the I/O thread, which needs a core only for
  an instant after each read, and the compute on the critical path are then served first; decoding
  is bulk work that takes whatever is left (and the compute thread decodes too while it waits).

``compression_verdict`` says, from the same rates, whether reading the compressed form beats reading
raw bytes on this host (the honest fallback: where it does not, the store says so in its log and
stats; the tier planner already keeps experts decoded where decoding costs more than it saves).

Pure functions of the calibration's rates (injected in tests); nothing here measures.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass

__all__ = ["MARGIN", "MIN_DEPTH", "DECODE_NICE", "CorePlan", "plan_cores", "decode_rates", "read_depth_rates",
           "compression_verdict", "decode_nice"]

log = logging.getLogger(__name__)

MARGIN = 0.10  # a larger pool must beat a smaller one by more than this to be chosen
MIN_DEPTH = 2  # reads in flight unless fewer measured faster (see the module docstring)
DECODE_NICE = 5  # decoder threads' nice value above the process's (ZIPMOE_DECODE_NICE overrides; 0: off)


def decode_nice() -> int:
    """How much lower the decoder threads' priority is (``ZIPMOE_DECODE_NICE``, else :data:`DECODE_NICE`)."""
    v = os.environ.get("ZIPMOE_DECODE_NICE", "").strip()
    try:
        return max(0, min(19, int(v))) if v else DECODE_NICE
    except ValueError:
        log.warning("ZIPMOE_DECODE_NICE=%r is not an integer; using %d", v, DECODE_NICE)
        return DECODE_NICE

_DECODE_KEY = re.compile(r"^(\d+)(\+compute)?$")
_READ_KEY = re.compile(r"^read_bps(?:@(\d+))?$")


@dataclass(frozen=True)
class CorePlan:
    """What the store runs with; ``why`` says how each number was chosen (reported in stats)."""

    cores: int
    decode_threads: int
    decode_bps: float | None  # the calibrated rate at decode_threads (contended where measured)
    read_depth: int
    read_bps: float | None  # the calibrated rate at read_depth
    why: str

    def to_json(self) -> dict:
        return asdict(self)


def decode_rates(rates: dict, contended: bool) -> dict[int, float]:
    """{threads: bps} out of a calibration's decode ``rates`` (``"2"`` or ``"2+compute"`` keys)."""
    out = {}
    for k, v in rates.items():
        m = _DECODE_KEY.match(str(k))
        if m and bool(m.group(2)) == contended:
            out[int(m.group(1))] = float(v)
    return out


def read_depth_rates(rates: dict) -> dict[int, float]:
    """{depth: bps} out of a calibration's read ``rates`` (``read_bps`` is depth 1, ``read_bps@4`` 4)."""
    out = {}
    for k, v in rates.items():
        m = _READ_KEY.match(str(k))
        if m:
            out[int(m.group(1) or 1)] = float(v)
    return out


def _fewest_within(rates: dict[int, float], cap: int, margin: float, floor: int = 1) -> tuple[int, float] | None:
    """The fewest (at least ``floor`` where such a count is within the margin) of ``rates``' counts
    whose rate is within ``margin`` of the best, with its rate; None when none is usable."""
    usable = {n: r for n, r in rates.items() if 1 <= n <= cap and r > 0}
    if not usable:
        return None
    best = max(usable.values())
    good = [k for k, r in usable.items() if r >= (1.0 - margin) * best]
    n = min([k for k in good if k >= floor] or good)
    return n, usable[n]


def plan_cores(cores: int, decode: dict | None, read: dict | None, *, margin: float = MARGIN,
               max_depth: int = 8) -> CorePlan:
    """The core budget from a calibration's decode ``rates`` and read ``rates`` (either may be None:
    then every core decodes, as without calibration, and reads go one at a time)."""
    cores = max(1, int(cores))
    why = []
    contended = decode_rates(decode or {}, True)
    alone = decode_rates(decode or {}, False)
    pick = _fewest_within(contended, cores, margin) if contended else None
    if pick is not None:
        why.append(f"decode {pick[0]} of {cores} threads: the fewest within {margin:.0%} of the best rate "
                   f"measured beside compute ({_fmt(contended)})")
    else:
        pick = _fewest_within(alone, cores, margin)
        if pick is not None:
            why.append(f"decode {pick[0]} of {cores} threads: the fewest within {margin:.0%} of the best rate "
                       f"measured alone ({_fmt(alone)})")
    if pick is None:
        pick = (cores, None)
        why.append(f"decode {cores} threads: no calibration")
    depths = read_depth_rates(read or {})
    rpick = _fewest_within(depths, max_depth, margin, MIN_DEPTH)
    if rpick is not None:
        why.append(f"{rpick[0]} read(s) in flight: the fewest, at least {MIN_DEPTH} where that is not slower, "
                   f"within {margin:.0%} of the best ({_fmt(depths)})")
    else:
        rpick = (1, None)
        why.append("1 read in flight: read speed not calibrated")
    return CorePlan(cores, pick[0], pick[1], rpick[0], rpick[1], "; ".join(why))


def _fmt(rates: dict[int, float]) -> str:
    return ", ".join(f"{n}: {r / 1e9:.2f} GB/s" for n, r in sorted(rates.items()))


def compression_verdict(read_bps: float, decode_bps: float, read_cold: int, decoded: int) -> dict | None:
    """Does reading the compressed form pay on this host? For an average cold miss (``read_cold`` bytes
    read, ``decoded`` BF16 bytes written) read and decode overlap, so it costs about the longer of the
    two; reading the same expert uncompressed costs ``decoded / read_bps``. None for a source that is not
    compressed (a checkpoint folder, a ``--raw`` archive)."""
    if decoded <= 0 or read_cold >= decoded * 0.999:
        return None
    read_s, decode_s, raw_s = read_cold / read_bps, decoded / decode_bps, decoded / read_bps
    miss_s = max(read_s, decode_s)
    pays = miss_s < raw_s
    if pays:
        why = (f"compression pays on this host: a cold expert costs {miss_s * 1e3:.2f} ms (read {read_s * 1e3:.2f}, "
               f"decode {decode_s * 1e3:.2f}, overlapped) against {raw_s * 1e3:.2f} ms to read it uncompressed")
    else:
        why = (f"compression does not pay on this host: decoding a cold expert takes {decode_s * 1e3:.2f} ms, longer "
               f"than the {raw_s * 1e3:.2f} ms its uncompressed bytes take to read (disk {read_bps / 1e9:.2f} GB/s, "
               f"decode {decode_bps / 1e9:.2f} GB/s); the archive still saves {1 - read_cold / decoded:.0%} of the "
               f"disk space, but a run of the checkpoint folder reads faster here")
    return {"pays": pays, "cold_miss_ms": round(miss_s * 1e3, 3), "raw_read_ms": round(raw_s * 1e3, 3),
            "speed_vs_raw": round(raw_s / miss_s, 3), "why": why}
