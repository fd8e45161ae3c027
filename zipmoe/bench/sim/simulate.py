"""Replay a routing trace through a policy, without weights: hit rates per tier, bytes read, and the
modelled time per token of the delay model of :mod:`zipmoe_run.tiers`.

Torch-free; the hot loop is :func:`.kernels.replay` (numba), which calls the same per-layer
kernel as :meth:`.policy.ReplayPolicy.access`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from zipmoe_run.tiers import CostModel, Tier, TierSizes

from . import replay_kernels as K
from .policy import ReplayPolicy
from .trace import ReplaySequence

__all__ = ["PrefetchConfig", "ReplayResult", "replay", "next_uses"]


@dataclass(frozen=True)
class PrefetchConfig:
    """Speculative reads for the next layer while the current one computes.

    The predictor ranks the next layer's experts by current-request count + ``alpha`` x all-time
    rate; the ``width`` best that are neither FULL nor COMPRESSED are read (coded exponents for SM,
    the extent for COLD), in that order, into a staging buffer outside the budget (it evicts
    nothing), each read starting only while the disk is still within the window: the compute time
    of one layer, ``k * N / compute_bps`` (decoding is not speculated: on a CPU the cores compute).
    A staged expert the next layer uses costs its decode only, once its read is done; a read that
    overruns the window delays the next layer's own reads by the overrun, used or not.
    """

    enabled: bool = False
    width: int = 0  # 0: k
    alpha: float = 4.0
    #: what-if instead of the history predictor: each true next-layer expert is guessed with this
    #: probability (the rest are wrong guesses); a stand-in for a router-on-hidden-state predictor
    oracle_accuracy: float | None = None
    seed: int = 0


@dataclass
class ReplayResult:
    policy: str
    budget: int
    split: dict
    slots: dict
    tokens: int
    accesses: int
    found: dict  # tier name -> accesses served from it
    bytes_read: int
    seconds: float
    exact: bool = True
    note: str = ""
    prefetch: dict = field(default_factory=dict)

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / self.tokens if self.tokens else 0.0

    def hit_rate(self, tier: str) -> float:
        return self.found.get(tier, 0) / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict:
        return {
            "policy": self.policy, "budget_bytes": self.budget, "split": self.split, "slots": self.slots,
            "tokens": self.tokens, "accesses": self.accesses,
            "hit_rate": {t: round(self.hit_rate(t), 6) for t in ("full", "compressed", "sm")},
            "hit_rate_total": round(1.0 - self.hit_rate("cold"), 6),
            "found": self.found, "bytes_read": self.bytes_read,
            "bytes_read_per_token": round(self.bytes_read / self.tokens) if self.tokens else 0,
            "ms_per_token": round(1e3 * self.seconds_per_token, 4),
            "exact": self.exact, "note": self.note, "prefetch": self.prefetch,
        }


def next_uses(seq: ReplaySequence) -> np.ndarray:
    return K.next_uses(seq.steps, seq.layers, seq.experts)


def replay(seq: ReplaySequence, policy: ReplayPolicy, sizes: TierSizes, cal: CostModel,
           prefetch: PrefetchConfig | None = None, nexts: np.ndarray | None = None) -> ReplayResult:
    """Run ``policy`` (fresh) over the whole sequence."""
    if policy.layers != seq.layers or policy.experts != seq.experts:
        raise ValueError(f"policy is for {policy.layers}x{policy.experts} experts, trace has "
                         f"{seq.layers}x{seq.experts}")
    if policy.kind == "belady" and nexts is None:
        nexts = next_uses(seq)
    if nexts is None:
        nexts = np.zeros(seq.steps.shape)
    t = cal.times(sizes)
    pf = prefetch or PrefetchConfig()
    width = pf.width or seq.k
    window = seq.k * sizes.full / cal.compute_bps
    stats = np.zeros(16)
    K.replay(policy._kid, policy.st, seq.steps, nexts, seq.prompt_start, seq.layers, t["read_sm"],
             t["read_cold"], t["decode"], bool(pf.enabled), int(width), float(window), float(pf.alpha), stats,
             -1.0 if pf.oracle_accuracy is None else float(pf.oracle_accuracy), int(pf.seed))
    found = {"cold": int(stats[1]), "sm": int(stats[2]), "compressed": int(stats[3]), "full": int(stats[4])}
    pf_cold, pf_sm = int(stats[14]), int(stats[15])
    demand = (found["cold"] - pf_cold) * sizes.read(Tier.COLD) + (found["sm"] - pf_sm) * sizes.read(Tier.SM)
    issued, issued_cold = int(stats[6]), int(stats[11])
    pf_bytes = issued_cold * sizes.read(Tier.COLD) + (issued - issued_cold) * sizes.read(Tier.SM)
    pf_info = {
        "predictor_topk_accuracy": round(stats[9] / stats[10], 6) if stats[10] else 0.0,
        "enabled": bool(pf.enabled),
    }
    if pf.enabled:
        pf_info.update({"predictor": "history" if pf.oracle_accuracy is None else f"oracle {pf.oracle_accuracy:g}",
                        "width": width, "window_ms": round(1e3 * window, 4), "issued": issued,
                        "used": int(stats[7]), "precision": round(stats[7] / issued, 6) if issued else 0.0,
                        "bytes_read": pf_bytes})
    exact = True
    note = ""
    if policy.kind == "belady":
        single = policy.split.full >= 1.0
        exact = single
        note = ("exact optimum of misses for one FULL tier (offline); time follows from its misses" if single
                else "offline heuristic with tiers: an estimate of the ceiling, not a proven bound")
    tokens = seq.tokens
    return ReplayResult(policy.name, policy.budget, policy.split.as_dict(), policy.slots(), tokens,
                        int(stats[0]), found, int(demand + pf_bytes), float(stats[5]), exact, note, pf_info)
