"""Compatibility shim: the tiers and the cost model live in :mod:`zipmoe_run.tiers` (shared by the store,
the policies and the simulator). Removed once the store imports them from there."""
from zipmoe_run.tiers import ALIGN, DEMOTIONS, CostModel, ExpertInfo, Tier, info_from_extent

__all__ = ["Tier", "ExpertInfo", "CostModel", "info_from_extent", "DEMOTIONS", "ALIGN"]
