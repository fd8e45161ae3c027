"""The one vocabulary of tiers and the one cost model, shared by the expert store, the runtime's
policies and planner, and the benchmark-side simulator. Plain Python: no torch, no numpy, no I/O
(except :func:`load_calibration` / :func:`save_calibration`).

An expert is resident in one of four tiers (the values order them by how much of it is in memory):

======  =====  =================================================  ============================
tier    value  held in memory (exact bytes: :class:`ExpertInfo`)  to serve a fetch
======  =====  =================================================  ============================
COLD    0      nothing                                            read the extent, decode
SM      1      the extent less its coded exponents (~0.5 N)       read the exponents, decode
COMP    2      the extent as stored (~0.665 N)                    decode
FULL    3      the decoded BF16 weights (N)                       nothing
======  =====  =================================================  ============================

Two size models: :class:`ExpertInfo`, the exact page-rounded bytes of one expert (from its extent:
what the store charges), and :class:`TierSizes`, an average expert as fractions of N (what the
planner and the simulator reason with; ``TierSizes.info`` turns it into an ``ExpertInfo``).

:class:`CostModel` is the machine: read bandwidth, decode bandwidth (all decoder threads), compute
bandwidth (sets the prefetch window) and, for the store's pipelined fetches, how much the read stage
is the bottleneck (``read_share``). Its defaults are assumptions for code without a host (simulators,
tests): disk 1.4 GB/s, decode 1.7 GB/s per core x 2 cores, compute 4 GB/s; a store opened by the
runtime starts from this host's self-calibration instead (``zipmoe_run.calibrate``). Measured
rates are injected by constructing it with them (``CostModel(read_bps=..., decode_bps=...)`` or
``dataclasses.replace``); a store keeps them current unless ``frozen`` (:meth:`CostModel.observe`);
:func:`save_calibration` / :func:`load_calibration` cache them as JSON (``zipmoe bench io`` writes
one; default ``~/.cache/zipmoe/calibration.json``).

The delay model of one MoE layer (the ZipMoE paper's, with three tiers): every non-FULL expert is a
job of a two-stage flow shop, *read* (``read bytes / read_bps``, one disk) then *decode*
(``N / decode_bps``), and the layer waits for the makespan of Johnson's optimal order
(:func:`makespan`, :func:`layer_time`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from pathlib import Path
from typing import Sequence

__all__ = ["Tier", "TIER_NAMES", "DEMOTIONS", "ALIGN", "ExpertInfo", "info_from_extent", "TierSizes", "CostModel",
           "DEFAULT_CALIBRATION_PATH", "default_calibration_path", "load_calibration", "save_calibration",
           "johnson_makespan", "makespan", "layer_time"]

ALIGN = 4096  # the archive's extent alignment and the read granule; memory pages are a multiple of it


class Tier(IntEnum):
    COLD = 0
    SM = 1
    COMP = 2
    FULL = 3

    @property
    def label(self) -> str:
        """Short name (the store's counters: ``hits_comp``)."""
        return self.name.lower()

    @property
    def long_name(self) -> str:
        """Report name (``bench cache`` keys: ``compressed``)."""
        return TIER_NAMES[self]


TIER_NAMES = {Tier.COLD: "cold", Tier.SM: "sm", Tier.COMP: "compressed", Tier.FULL: "full"}

#: tier -> the lower tiers an expert can be moved to without I/O (FULL -> COMP would need re-encoding)
DEMOTIONS: dict[Tier, tuple[Tier, ...]] = {
    Tier.FULL: (Tier.SM, Tier.COLD),
    Tier.COMP: (Tier.SM, Tier.COLD),
    Tier.SM: (Tier.COLD,),
    Tier.COLD: (),
}


@dataclass(frozen=True)
class ExpertInfo:
    """Static byte facts of one expert (from its extent); ``key`` is (stack, layer, expert)."""

    key: tuple
    full_bytes: int  # decoded buffer, page-rounded
    comp_bytes: int  # the extent, page-rounded
    sm_bytes: int  # the extent less the whole pages of its coded exponents
    read_cold: int  # bytes read by a cold fetch
    read_sm: int  # bytes read by a fetch from the SM tier
    decoded: int  # bytes a decode writes
    tiers: tuple[Tier, ...]  # tiers worth offering, ascending

    def bytes(self, t: Tier) -> int:
        return (0, self.sm_bytes, self.comp_bytes, self.full_bytes)[t]

    def read_bytes(self, t: Tier) -> int:
        """Bytes read to serve a fetch from tier ``t``."""
        return (self.read_cold, self.read_sm, 0, 0)[t]

    def staging(self, t: Tier) -> int:
        """Extra bytes a fetch from tier ``t`` needs while in flight (read buffer pages + decode buffer)."""
        if t == Tier.FULL:
            return 0
        extra = {Tier.COLD: self.comp_bytes, Tier.SM: self.comp_bytes - self.sm_bytes, Tier.COMP: 0}[t]
        return extra + self.full_bytes

    @property
    def min_working_set(self) -> int:
        """Bytes one cold fetch needs: its read buffer and its decode buffer."""
        return self.comp_bytes + self.full_bytes


def info_from_extent(ext, page: int = ALIGN) -> ExpertInfo:
    """``ExpertInfo`` of a ``formats.index.Extent``: memory charged in whole pages of ``page`` bytes
    (the host's page size, a multiple of :data:`ALIGN`), the exponent read in :data:`ALIGN` units.

    A tier is offered only when it is worth something: SM needs coded exponents and must be smaller
    than COMP; COMP must be smaller than FULL (an archive packed with ``--raw`` has FULL and COLD)."""
    page = int(page)
    if page <= 0 or page % ALIGN:
        raise ValueError(f"page size {page} is not a positive multiple of {ALIGN}")

    def ceil(n: int) -> int:
        return -(-int(n) // page) * page

    full = max(page, ceil(ext.decoded_nbytes))
    comp = max(page, ceil(ext.length))
    sm = comp - int(ext.exp_length) // page * page
    tiers = [Tier.COLD]
    if ext.exp_length > 0 and sm < comp:
        tiers.append(Tier.SM)
    if comp < full:
        tiers.append(Tier.COMP)
    tiers.append(Tier.FULL)
    return ExpertInfo(key=ext.key, full_bytes=full, comp_bytes=comp, sm_bytes=sm, read_cold=comp,
                      read_sm=-(-int(ext.exp_length) // ALIGN) * ALIGN, decoded=ext.decoded_nbytes,
                      tiers=tuple(tiers))


@dataclass(frozen=True)
class TierSizes:
    """Bytes of an average expert in each form. ``full`` is N (BF16); the fractions are of N.

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

    def info(self, key) -> ExpertInfo:
        """This average expert as an ``ExpertInfo`` (every tier offered, no page rounding)."""
        return ExpertInfo(key=key, full_bytes=self.full, comp_bytes=self.resident(Tier.COMP),
                          sm_bytes=self.resident(Tier.SM), read_cold=self.read(Tier.COLD),
                          read_sm=self.read(Tier.SM), decoded=self.full, tiers=tuple(Tier))

    @classmethod
    def from_info(cls, info: ExpertInfo, source: str = "store") -> "TierSizes":
        """The fractions of one expert's exact bytes (``ValueError`` when they make no tiers)."""
        return cls(int(info.full_bytes), info.comp_bytes / info.full_bytes,
                   max(1e-6, (info.comp_bytes - info.sm_bytes) / info.full_bytes), source)

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


_RATES = ("read_bps", "decode_bps", "compute_bps", "decode_bps_per_core")
_JSON_NAMES = {"read_bps": "disk_bps"}  # the calibration file's key (version 1)


@dataclass
class CostModel:
    """The machine's speeds and what a fetch from each tier costs (see the module docstring).

    ``decode_bps`` is BF16 *output* bytes per second of all decoder threads together;
    ``compute_bps`` BF16 expert weight bytes per second of a batch-1 expert forward. ``read_share``
    in [0, 1] is how much the read stage is the bottleneck of the store's recent fetches
    (Σread / (Σread + Σdecode)): in a pipelined fetch only the busier stage costs time, so
    :meth:`fetch_cost` weights each stage by it. ``frozen``: the store does not update the
    estimates (tests, simulators, an injected calibration to keep).
    """

    read_bps: float = 1.4e9
    decode_bps: float = 3.4e9
    compute_bps: float = 4.0e9
    read_share: float = 0.5
    frozen: bool = False
    decode_bps_per_core: float = 1.7e9
    cores: int = 2
    read_method: str = "assumed"
    source: str = "defaults (disk 1.4 GB/s, decode 1.7 GB/s/core x 2 cores, compute 4 GB/s assumed)"
    extra: dict = field(default_factory=dict)
    #: an object with ``check(cost, rate_name, measured_rate)`` told of every update (``drift.Drift``)
    drift: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _RATES:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"cost model {_JSON_NAMES.get(name, name)} must be a positive number, got {v!r}")
        if not (isinstance(self.read_share, (int, float)) and 0.0 <= self.read_share <= 1.0):
            raise ValueError(f"cost model read_share must be within [0, 1], got {self.read_share!r}")
        if int(self.cores) < 1:
            raise ValueError(f"cost model cores must be >= 1, got {self.cores!r}")

    # -- seconds --------------------------------------------------------------------------------------
    def read_s(self, nbytes: int) -> float:
        return nbytes / self.read_bps

    def decode_s(self, nbytes: int) -> float:
        return nbytes / self.decode_bps

    def fetch_cost(self, info: ExpertInfo, t: Tier) -> float:
        """Pipelined seconds of a fetch from ``t``: each stage weighted by ``read_share``."""
        if t == Tier.FULL:
            return 0.0
        r = self.read_s(info.read_bytes(t))
        d = self.decode_s(info.decoded)
        return self.read_share * r + (1.0 - self.read_share) * d

    def saving(self, info: ExpertInfo, t: Tier) -> float:
        """Seconds saved per access by holding ``info`` at ``t`` rather than nowhere."""
        return self.fetch_cost(info, Tier.COLD) - self.fetch_cost(info, t)

    def access_costs(self, info: ExpertInfo) -> tuple[float, float, float, float]:
        """Seconds one access costs from COLD, SM, COMP, FULL (read + decode, unpipelined)."""
        d = info.decoded / self.decode_bps
        return (info.read_cold / self.read_bps + d, info.read_sm / self.read_bps + d, d, 0.0)

    def times(self, sizes: TierSizes) -> dict:
        """Seconds per average expert: ``read_cold``, ``read_sm`` (exponents), ``decode``."""
        return {"read_cold": sizes.read(Tier.COLD) / self.read_bps,
                "read_sm": sizes.read(Tier.SM) / self.read_bps,
                "decode": sizes.full / self.decode_bps}

    def tier_costs(self, sizes: TierSizes) -> tuple[float, float, float, float]:
        """:meth:`access_costs` of an average expert."""
        t = self.times(sizes)
        return (t["read_cold"] + t["decode"], t["read_sm"] + t["decode"], t["decode"], 0.0)

    def observe(self, name: str, rate: float, weight: float) -> None:
        """Move the estimate ``name`` (``read_bps``, ``decode_bps``) toward a measured ``rate`` (EWMA of
        ``weight``) unless ``frozen``; the ``drift`` watcher, if any, is told."""
        if self.frozen:
            return
        setattr(self, name, getattr(self, name) + weight * (rate - getattr(self, name)))
        if self.drift is not None:
            self.drift.check(self, name, rate)

    # -- the calibration file -----------------------------------------------------------------------
    def to_json(self) -> dict:
        skip = ("read_share", "frozen", "drift")  # the store's running state, not a measurement
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["extra"] = json.loads(json.dumps(d["extra"]))  # a copy, JSON-clean
        return {"version": 1, **{_JSON_NAMES.get(k, k): v for k, v in d.items()}}

    @classmethod
    def from_json(cls, d: dict, source: str | None = None) -> "CostModel":
        if not isinstance(d, dict) or d.get("version") != 1:
            raise ValueError("not a version-1 zipmoe calibration object")
        back = {v: k for k, v in _JSON_NAMES.items()}
        known = set(cls.__dataclass_fields__) - {"read_share", "frozen", "drift"}
        kw = {back.get(k, k): v for k, v in d.items() if back.get(k, k) in known}
        if "extra" in kw and not isinstance(kw["extra"], dict):
            raise ValueError("calibration 'extra' must be an object")
        if source is not None:
            kw["source"] = source
        return cls(**kw)


def default_calibration_path() -> Path:
    """``$ZIPMOE_CACHE_DIR/calibration.json``, else ``$XDG_CACHE_HOME/zipmoe/...``, else ``~/.cache/zipmoe/...``
    (read when called: tests point it at a temporary directory)."""
    d = os.environ.get("ZIPMOE_CACHE_DIR")
    return (Path(d) if d else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zipmoe") / \
        "calibration.json"


DEFAULT_CALIBRATION_PATH = default_calibration_path()  # as at import time; the functions use the call-time one


def load_calibration(path: str | os.PathLike | None = None) -> CostModel:
    """The cost model saved at ``path`` (default :data:`DEFAULT_CALIBRATION_PATH`); the defaults when
    the default file does not exist. A missing explicit path or a malformed file is a ``ValueError``."""
    from formats.jsonstrict import loads

    p = Path(path) if path is not None else default_calibration_path()
    if not p.exists():
        if path is not None:
            raise ValueError(f"{p}: no such calibration file (run `zipmoe bench io`)")
        return CostModel()
    try:
        return CostModel.from_json(loads(p.read_bytes()), source=str(p))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{p}: not a usable calibration file ({exc})") from None


def save_calibration(cost: CostModel, path: str | os.PathLike | None = None) -> Path:
    p = Path(path) if path is not None else default_calibration_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(replace(cost, source=str(p)).to_json(), indent=2) + "\n")
    os.replace(tmp, p)
    return p


# -- the delay model --------------------------------------------------------------------------------


def johnson_makespan(jobs: Sequence[tuple[float, float]]) -> float:
    """Makespan of a two-machine flow shop (read, then decode) in Johnson's optimal order."""
    first = sorted((j for j in jobs if j[0] < j[1]), key=lambda j: j[0])
    last = sorted((j for j in jobs if j[0] >= j[1]), key=lambda j: -j[1])
    t1 = t2 = 0.0
    for a, b in first + last:
        t1 += a
        t2 = max(t2, t1) + b
    return t2


def makespan(n_comp: int, n_sm: int, n_cold: int, a_sm: float, a_cold: float, b: float, n_pf: int = 0,
             r0: float = 0.0) -> float:
    """Johnson's order for identical decode times ``b``: reads ascending (0, ``a_sm``, ``a_cold``).

    ``n_pf`` experts were prefetched: their bytes are in by ``r0``, when the disk becomes free for
    this layer's own reads. The same arithmetic, in the same order, as the simulator's kernel."""
    t1 = r0
    t2 = 0.0
    for _ in range(n_comp):
        t2 = t2 + b
    for _ in range(n_pf):
        t2 = max(t2, r0) + b
    for _ in range(n_sm):
        t1 += a_sm
        t2 = max(t2, t1) + b
    for _ in range(n_cold):
        t1 += a_cold
        t2 = max(t2, t1) + b
    return t2


def layer_time(found: Sequence[int], sizes: TierSizes, cost: CostModel,
               prefetched: Sequence[bool] | None = None) -> float:
    """Modelled seconds one layer waits for its experts, found in tiers ``found``.

    A prefetched expert (its bytes already read) costs its decode only.
    """
    t = cost.times(sizes)
    jobs = []
    for i, tier in enumerate(found):
        tier = int(tier)
        if tier == Tier.FULL:
            continue
        if tier == Tier.COMP or (prefetched is not None and prefetched[i]):
            a = 0.0
        else:
            a = t["read_sm"] if tier == Tier.SM else t["read_cold"]
        jobs.append((a, t["decode"]))
    return johnson_makespan(jobs)
