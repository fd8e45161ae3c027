"""The runtime's expert cache policies and tier planner: pure (no torch, no I/O, no import of the
store); the store calls them. The tiers and the cost model they reason with are
:mod:`zipmoe_run.tiers`; the offline simulator that replays routing traces through them is
``zipmoe.bench.sim`` (benchmark side: the runtime never imports it).

* :mod:`.protocol` -- ``Policy`` / ``ResidencyView`` and the one factory, :func:`make_policy`;
* :mod:`.zipmoe`   -- the default policy (score + tier shares from the planner);
* :mod:`.density`, :mod:`.lru` -- the alternatives;
* :mod:`.planner`  -- how to split a budget across FULL / COMP / SM (:class:`Split`).

See specs/runtime.md, "Policies, planner and trace replay".
"""
from .density import DensityPolicy
from .lru import LRUPolicy
from .planner import DEFAULT_ALPHA, ActivationStats, PlanResult, Split, plan
from .protocol import DEFAULT_POLICY, POLICIES, Policy, ResidencyView, make_policy
from .zipmoe import ZipMoEPolicy

__all__ = ["ActivationStats", "DEFAULT_ALPHA", "DEFAULT_POLICY", "DensityPolicy", "LRUPolicy", "POLICIES",
           "PlanResult", "Policy", "ResidencyView", "Split", "ZipMoEPolicy", "make_policy", "plan"]
