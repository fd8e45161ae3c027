"""Expert cache policies, the tier planner, prefetch and routing-trace replay (torch-free, I/O-free).

See specs/runtime.md, "Policies, planner and trace replay".
"""
from .policy import DEFAULT_POLICY, POLICIES, Decision, Move, Policy, Split, make_policy
from .tiers import Calibration, Tier, TierSizes, johnson_makespan, layer_time, load_calibration

__all__ = [
    "Calibration", "DEFAULT_POLICY", "Decision", "Move", "POLICIES", "Policy", "Split", "Tier", "TierSizes",
    "johnson_makespan", "layer_time", "load_calibration", "make_policy",
]
