"""Compatibility shim: the policies live in :mod:`zipmoe_run.policies` (pure; the store calls them).
Removed once the store imports them from there."""
from zipmoe_run.policies.density import DensityPolicy
from zipmoe_run.policies.lru import LRUPolicy
from zipmoe_run.policies.protocol import POLICIES, Policy, ResidencyView, make_policy

__all__ = ["ResidencyView", "Policy", "DensityPolicy", "LRUPolicy", "make_policy", "POLICIES"]
