"""Tiers, their sizes, the machine's calibration and the per-layer delay model.

An expert is resident in one of four tiers (the numbers order them by how much of it is in memory):

=========  =====  ==========================================  ==============================
tier       value  resident bytes (fraction of BF16 bytes N)   to use it
=========  =====  ==========================================  ==============================
COLD       0      0                                           read the extent, decode
SM         1      sign+mantissa plane, ``sm`` (0.5)           read the coded exponents, decode
COMPRESSED 2      the whole extent, ``compressed`` (~0.665)   decode
FULL       3      the decoded BF16 weights (1.0)              nothing
=========  =====  ==========================================  ==============================

The delay model of one MoE layer (the ZipMoE paper's, with three tiers): every non-FULL expert the
layer needs is a job of a two-stage flow shop, *read* (``read_bytes / disk_bps``, one disk) then
*decode* (``N / decode_bps``, the decoder's threads working on one expert's chunks at a time), and
the layer waits for the makespan of Johnson's optimal order. Read latency, page-cache effects,
decode/compute contention for the cores and the compute itself are not modelled (compute is the
same for every policy; it only sets the prefetch window, see :mod:`.prefetch`).

Calibration: ``zipmoe bench io`` measures ``disk_bps`` (O_DIRECT, or fadvise-DONTNEED reads where
O_DIRECT is refused) and ``decode_bps`` (BF16 output bytes per second through ``ParallelDecoder``)
and writes a JSON file (default ``~/.cache/zipmoe/calibration.json``); without one, the defaults
below are the project's reference facts (disk 1.4 GB/s, decode 1.7 GB/s per core, 2 cores).

Torch-free and I/O-free apart from :func:`load_calibration` / :func:`save_calibration`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Sequence

__all__ = [
    "Tier",
    "TierSizes",
    "Calibration",
    "DEFAULT_CALIBRATION_PATH",
    "load_calibration",
    "save_calibration",
    "johnson_makespan",
    "layer_time",
]


class Tier(IntEnum):
    COLD = 0
    SM = 1
    COMPRESSED = 2
    FULL = 3


TIER_NAMES = {Tier.COLD: "cold", Tier.SM: "sm", Tier.COMPRESSED: "compressed", Tier.FULL: "full"}


@dataclass(frozen=True)
class TierSizes:
    """Bytes of one expert in each form. ``full`` is N (BF16); the fractions are of N.

    ``compressed`` is the whole extent (coded exponents + sign/mantissa planes), ``exponents`` the
    coded exponent prefix of the extent and ``sm`` the rest (``compressed = exponents + sm``).
    Defaults: the ratios measured on BF16 experts (exponents ~2.6 bits of 8, about 0.165 N).
    """

    full: int
    compressed_frac: float = 0.665
    exponents_frac: float = 0.165
    source: str = "default ratios"

    def __post_init__(self) -> None:
        if self.full <= 0:
            raise ValueError(f"expert bytes must be > 0, got {self.full}")
        if not 0 < self.exponents_frac < self.compressed_frac <= 1.5:
            raise ValueError(f"bad tier fractions: exponents {self.exponents_frac}, "
                             f"compressed {self.compressed_frac}")

    @property
    def sm_frac(self) -> float:
        return self.compressed_frac - self.exponents_frac

    def resident(self, tier: int) -> int:
        """Resident bytes of one expert in ``tier`` (rounded up)."""
        f = (0.0, self.sm_frac, self.compressed_frac, 1.0)[int(tier)]
        return int(math.ceil(f * self.full))

    def read(self, tier: int) -> int:
        """Bytes read from disk to use an expert found in ``tier``."""
        f = (self.compressed_frac, self.exponents_frac, 0.0, 0.0)[int(tier)]
        return int(math.ceil(f * self.full))

    @classmethod
    def from_extents(cls, extents: Sequence, source: str = "archive") -> "TierSizes":
        """Ratios from an archive's expert extents (``formats.index.Extent``): the largest expert
        sets ``full`` (budgets never overshoot), the fractions are byte-weighted means."""
        extents = list(extents)
        if not extents:
            raise ValueError("archive has no expert extents")
        dec = sum(e.decoded_nbytes for e in extents)
        full = max(e.decoded_nbytes for e in extents)
        comp = sum(e.length for e in extents) / dec
        exp = sum(e.exp_length for e in extents) / dec
        return cls(full, comp, exp, source)

    def as_dict(self) -> dict:
        return {"full": self.full, "compressed_frac": self.compressed_frac,
                "exponents_frac": self.exponents_frac, "sm_frac": self.sm_frac, "source": self.source}


DEFAULT_CALIBRATION_PATH = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zipmoe" / \
    "calibration.json"


@dataclass(frozen=True)
class Calibration:
    """Speeds of this machine. ``decode_bps`` is BF16 *output* bytes per second of all decoder
    threads together; ``compute_bps`` is BF16 expert weight bytes per second of a batch-1 expert
    forward (memory-bound; sets the prefetch window)."""

    disk_bps: float = 1.4e9
    decode_bps_per_core: float = 1.7e9
    cores: int = 2
    decode_bps: float = 3.4e9
    compute_bps: float = 4.0e9
    read_method: str = "assumed"
    source: str = "defaults (disk 1.4 GB/s, decode 1.7 GB/s/core x 2 cores, compute 4 GB/s assumed)"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("disk_bps", "decode_bps_per_core", "decode_bps", "compute_bps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"calibration {name} must be a positive number, got {v!r}")
        if int(self.cores) < 1:
            raise ValueError(f"calibration cores must be >= 1, got {self.cores!r}")

    def to_json(self) -> dict:
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict, source: str | None = None) -> "Calibration":
        if not isinstance(d, dict) or d.get("version") != 1:
            raise ValueError("not a version-1 zipmoe calibration object")
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        if source is not None:
            kw["source"] = source
        return cls(**kw)

    def times(self, sizes: TierSizes) -> dict:
        """Seconds per expert: ``read_cold``, ``read_sm`` (exponents), ``decode``."""
        return {"read_cold": sizes.read(Tier.COLD) / self.disk_bps,
                "read_sm": sizes.read(Tier.SM) / self.disk_bps,
                "decode": sizes.full / self.decode_bps}


def load_calibration(path: str | os.PathLike | None = None) -> Calibration:
    """The calibration at ``path`` (default :data:`DEFAULT_CALIBRATION_PATH`); the defaults when the
    default file does not exist. A missing explicit path or a malformed file is a ``ValueError``."""
    p = Path(path) if path is not None else DEFAULT_CALIBRATION_PATH
    if not p.exists():
        if path is not None:
            raise ValueError(f"{p}: no such calibration file (run `zipmoe bench io`)")
        return Calibration()
    try:
        return Calibration.from_json(json.loads(p.read_text()), source=str(p))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{p}: not a usable calibration file ({exc})") from None


def save_calibration(cal: Calibration, path: str | os.PathLike | None = None) -> Path:
    p = Path(path) if path is not None else DEFAULT_CALIBRATION_PATH
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(replace(cal, source=str(p)).to_json(), indent=2) + "\n")
    os.replace(tmp, p)
    return p


def johnson_makespan(jobs: Sequence[tuple[float, float]]) -> float:
    """Makespan of a two-machine flow shop (read, then decode) in Johnson's optimal order."""
    first = sorted((j for j in jobs if j[0] < j[1]), key=lambda j: j[0])
    last = sorted((j for j in jobs if j[0] >= j[1]), key=lambda j: -j[1])
    t1 = t2 = 0.0
    for a, b in first + last:
        t1 += a
        t2 = max(t2, t1) + b
    return t2


def layer_time(found: Sequence[int], sizes: TierSizes, cal: Calibration,
               prefetched: Sequence[bool] | None = None) -> float:
    """Modelled seconds one layer waits for its experts, found in tiers ``found``.

    A prefetched expert (its bytes already read) costs its decode only.
    """
    t = cal.times(sizes)
    jobs = []
    for i, tier in enumerate(found):
        tier = int(tier)
        if tier == Tier.FULL:
            continue
        if tier == Tier.COMPRESSED or (prefetched is not None and prefetched[i]):
            a = 0.0
        else:
            a = t["read_sm"] if tier == Tier.SM else t["read_cold"]
        jobs.append((a, t["decode"]))
    return johnson_makespan(jobs)
