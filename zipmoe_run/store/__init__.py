"""The memory-budgeted tiered expert store behind ``ArchiveSource`` (normative model: specs/runtime.md).

Modules, each small and importable without torch:

* ``budget``    -- the one knob (``--memory-budget``) and the byte ledger everything is charged to;
* ``io``        -- honest I/O: O_DIRECT (or read + POSIX_FADV_DONTNEED) into page-aligned buffers;
* ``tiers``     -- the four tiers of an expert and their byte costs;
* ``policy``    -- pluggable placement/eviction policies (no torch, no I/O: a simulator can reuse them);
* ``scheduler`` -- the two-stage flow-shop order (read, then decode) and its guaranteed bound;
* ``store``     -- ``ExpertStore``: fetch() with cache-affinity scheduling on one I/O thread + the decoder pool.
"""
from __future__ import annotations

__all__ = ["ExpertStore", "Budget", "BudgetError", "parse_budget", "Tier", "DensityPolicy", "LRUPolicy"]

_LAZY = {"ExpertStore": "store", "Budget": "budget", "BudgetError": "budget", "parse_budget": "budget",
         "Tier": "tiers", "DensityPolicy": "policy", "LRUPolicy": "policy"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
