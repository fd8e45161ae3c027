"""The four tiers an expert can be held in, their exact byte costs, and the cost model policies use.

| tier   | held in memory                                  | bytes (this module)                      | to serve a fetch |
|--------|-------------------------------------------------|------------------------------------------|------------------|
| FULL   | the decoded expert (BF16, 2 B/weight)           | ceil4k(decoded_nbytes)                   | nothing          |
| COMP   | the extent as stored (~1.33 B/weight)           | ceil4k(length)                           | decode           |
| SM     | the extent less its coded exponents (1 B/weight)| ceil4k(length) - floor4k(exp_length)     | read ceil4k(exp_length) (~0.33 B/weight), decode |
| COLD   | nothing                                         | 0                                        | read ceil4k(length), decode |

A tier is *offered* for an expert only when it is worth something: SM needs coded exponents
(``exp_length > 0``) and must be smaller than COMP; COMP must be smaller than FULL. On an archive
packed with ``--raw`` only FULL and COLD remain.

Everything here is plain Python (no torch, no I/O) so a trace simulator can reuse it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Tier", "ExpertInfo", "CostModel", "info_from_extent", "DEMOTIONS"]

ALIGN = 4096


def _ceil(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


def _floor(n: int) -> int:
    return int(n) // ALIGN * ALIGN


class Tier(IntEnum):
    COLD = 0
    SM = 1
    COMP = 2
    FULL = 3

    @property
    def label(self) -> str:
        return self.name.lower()


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


def info_from_extent(ext) -> ExpertInfo:
    """``ExpertInfo`` of a ``formats.index.Extent``."""
    full = max(ALIGN, _ceil(ext.decoded_nbytes))
    comp = max(ALIGN, _ceil(ext.length))
    sm = comp - _floor(ext.exp_length)
    tiers = [Tier.COLD]
    if ext.exp_length > 0 and sm < comp:
        tiers.append(Tier.SM)
    if comp < full:
        tiers.append(Tier.COMP)
    tiers.append(Tier.FULL)
    return ExpertInfo(key=ext.key, full_bytes=full, comp_bytes=comp, sm_bytes=sm, read_cold=comp,
                      read_sm=_ceil(ext.exp_length), decoded=ext.decoded_nbytes, tiers=tuple(tiers))


@dataclass
class CostModel:
    """Seconds to serve a fetch from each tier, from bandwidth estimates the store keeps current.

    ``read_bps``: bytes/s of the I/O thread; ``decode_bps``: decoded bytes/s of the whole decoder
    pool. ``read_share`` in [0, 1] is how much the read stage is the bottleneck of recent fetches
    (Σread / (Σread + Σdecode) over recent layers): in a pipelined fetch only the busier stage
    costs time, so a tier's saving is weighted by the stage it relieves.
    """

    read_bps: float = 1.5e9
    decode_bps: float = 1.5e9
    read_share: float = 0.5
    frozen: bool = False  # True: the store does not update the estimates (tests, simulators)

    def read_s(self, nbytes: int) -> float:
        return nbytes / self.read_bps

    def decode_s(self, nbytes: int) -> float:
        return nbytes / self.decode_bps

    def fetch_cost(self, info: ExpertInfo, t: Tier) -> float:
        if t == Tier.FULL:
            return 0.0
        r = self.read_s(info.read_bytes(t))
        d = self.decode_s(info.decoded)
        return self.read_share * r + (1.0 - self.read_share) * d

    def saving(self, info: ExpertInfo, t: Tier) -> float:
        """Seconds saved per access by holding ``info`` at ``t`` rather than nowhere."""
        return self.fetch_cost(info, Tier.COLD) - self.fetch_cost(info, t)
