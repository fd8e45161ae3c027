"""``lru``: plain least-recently-used over decoded experts (the reference point, and what a runtime
without tiers does). The simulator's ``lru`` kernel (``zipmoe.bench.sim``) is a fast model of it,
checked against it on traces."""
from __future__ import annotations

from collections.abc import Collection

from zipmoe_run.tiers import Tier

from .protocol import ResidencyView

__all__ = ["LRUPolicy"]


class LRUPolicy:
    """Plain least-recently-used over decoded experts: keep everything FULL, evict the oldest to COLD.

    The reference point (and what a runtime without tiers does)."""

    name = "lru"

    def __init__(self) -> None:
        self._seen: dict[object, tuple[int, int]] = {}
        self._seq = 0

    def on_access(self, key, tier: Tier, now: int) -> None:
        self._seq += 1
        self._seen[key] = (now, self._seq)

    def placement(self, key, res: ResidencyView) -> Tier:
        return Tier.FULL

    def victim(self, res: ResidencyView, pinned: Collection) -> tuple[object, Tier] | None:
        best = None
        for key, t in res.resident():
            if key in pinned:
                continue
            seen = self._seen.get(key, (-1, -1))
            if best is None or seen < best[0]:
                best = (seen, key)
        return None if best is None else (best[1], Tier.COLD)
