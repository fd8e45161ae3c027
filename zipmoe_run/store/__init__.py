"""The memory-budgeted tiered expert store behind ``ArchiveSource`` (normative model: specs/runtime.md).

``ExpertStore`` (``store``) composes a few objects, each owning one thing:

* ``budget``     -- the one knob (``--memory-budget``) and the ``Ledger`` every byte is charged to;
* ``buffers``    -- page-aligned ``Buffer``s (host page size, lent views counted) and the ``BufferPool``;
* ``hugepages``  -- whether buffers ask for transparent huge pages here (measured once per host, cached);
* ``memory``     -- ``Memory``: the ledger, the pool and the buffers still lent to the caller;
* ``table``      -- ``TierTable``: which tier each expert is in, placement and demotion via the policy;
* ``bytesource`` -- ``ExpertBytes``: where expert bytes come from (``ArchiveBytes``: a ``.zmoe`` archive);
* ``io``         -- honest I/O: O_DIRECT (or read + POSIX_FADV_DONTNEED) into page-aligned buffers;
* ``worker``     -- ``IOWorker``: the task queue and its I/O thread (admit, read, decode);
* ``prefetch``   -- ``Prefetcher``: prefetch, preload, adoption by the next fetch;
* ``scheduler``  -- the two-stage flow-shop order (read, then decode) and its guaranteed bound;
* ``report``     -- what ``stats()`` returns: counters, ledger, estimates, core budget, compression verdict;
* ``state``      -- the records they share (entry, task, job, counters) and ``StoreError``.

The tiers, their byte costs and the cost model are :mod:`zipmoe_run.tiers`; the policies it calls are
:mod:`zipmoe_run.policies` (pure: neither imports the store).

No module imports torch: the caller turns decoded buffers into tensors (``wrap``).
"""
from __future__ import annotations

__all__ = ["ExpertStore", "Budget", "BudgetError", "parse_budget", "Tier", "DensityPolicy", "LRUPolicy"]

_LAZY = {"ExpertStore": "store", "Budget": "budget", "BudgetError": "budget", "parse_budget": "budget",
         "Tier": "..tiers", "DensityPolicy": "..policies", "LRUPolicy": "..policies"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod = _LAZY[name]
        return getattr(importlib.import_module(mod if mod.startswith(".") else f".{mod}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
