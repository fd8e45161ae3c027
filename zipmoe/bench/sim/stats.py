"""Activation statistics for the planner (``zipmoe_run.policies.planner.ActivationStats``) from a
replayed trace or from a replay policy's rank histogram."""
from __future__ import annotations

import numpy as np

from zipmoe_run.policies.planner import DEFAULT_ALPHA, ActivationStats

from . import kernels as K
from .replay_kernels import rank_histogram
from .policy import ReplayPolicy
from .trace import ReplaySequence

__all__ = ["stats_from_sequence", "stats_from_policy"]


def stats_from_sequence(seq: ReplaySequence, alpha: float = DEFAULT_ALPHA) -> ActivationStats:
    """The rank histogram of the ``zipmoe`` score over the whole replay, per token."""
    hist = np.zeros((seq.layers, seq.experts))
    rank_histogram(seq.steps, seq.prompt_start, seq.layers, seq.experts, float(alpha), hist)
    return ActivationStats.from_histogram(hist, seq.k, seq.tokens, f"trace {seq.name}")


def stats_from_policy(policy: ReplayPolicy, k: int) -> ActivationStats:
    """What a running replay policy learned (its rank histogram, see ``ReplayPolicy.learn``)."""
    tokens = policy.scal[K.S_CLOCK] / policy.layers
    return ActivationStats.from_histogram(policy.rank_hist, k, tokens, "learned online")
