"""``density``: keep the bytes that save the most fetch time per byte (a multiple-choice knapsack,
greedily), following the store's measured bottleneck (``CostModel.read_share``)."""
from __future__ import annotations

from collections.abc import Collection

from zipmoe_run.tiers import DEMOTIONS, CostModel, ExpertInfo, Tier

from .protocol import ResidencyView, fits

__all__ = ["DensityPolicy", "HULL_TIE"]

HULL_TIE = 0.02  # a tier within 2 % of the hull chord counts as on the hull


class DensityPolicy:
    """Keep the bytes that save the most fetch time per byte (a multiple-choice knapsack, greedily).

    Each expert has a decayed access count ``f`` (half-life ``half_life`` fetch calls). Holding it
    in tier ``t`` saves ``f * cost.saving(info, t)`` seconds per future access window. Per expert,
    the tiers on the upper concave hull of (bytes, saving) are the useful ones (a tier below the
    hull is never worth its bytes); the *score* of an expert held in ``t`` is ``f`` times the
    saving per byte of its last hull step (from the tier below ``t`` up to ``t``).

    * victim: the resident, unpinned expert with the lowest score moves one hull step down;
    * placement: the highest hull tier that fits without displacing anyone (keeping ``reserve``
      free), else the highest whose score beats the current lowest resident score, else COLD.

    The cost model's ``read_share`` makes the choice follow the bottleneck: when reads dominate,
    SM/COMP (which remove most of the read) win per byte; when decoding dominates, only FULL helps.
    """

    name = "density"

    def __init__(self, cost: CostModel | None = None, half_life: float = 64.0, tie: float = HULL_TIE):
        self.cost = cost if cost is not None else CostModel()
        self.half_life = float(half_life)
        self.tie = float(tie)
        self._f: dict[object, tuple[float, int]] = {}

    # -- frequency --------------------------------------------------------------------------------
    def freq(self, key, now: int) -> float:
        v = self._f.get(key)
        if v is None:
            return 0.0
        f, t = v
        return f * 0.5 ** ((now - t) / self.half_life)

    def on_access(self, key, tier: Tier, now: int) -> None:
        self._f[key] = (self.freq(key, now) + 1.0, now)

    # -- hull -------------------------------------------------------------------------------------
    def hull(self, info: ExpertInfo) -> list[Tier]:
        """Tiers on the upper concave hull of (bytes, saving), ascending, starting with COLD."""
        pts = sorted(((info.bytes(t), self.cost.saving(info, t), t) for t in info.tiers), key=lambda p: (p[0], -p[1]))
        out: list[tuple[int, float, Tier]] = []
        for p in pts:
            if out and p[1] <= out[-1][1]:  # more bytes, no more saving: dominated
                continue
            while len(out) >= 2:
                (x1, y1, _), (x2, y2, _) = out[-2], out[-1]
                # drop the middle point when it lies below the segment p1 -> p; within `tie` of it
                # (SM and COMP are collinear when reads dominate) it stays: finer steps pack better
                if (y2 - y1) * (p[0] - x1) < (1.0 - self.tie) * (p[1] - y1) * (x2 - x1):
                    out.pop()
                else:
                    break
            out.append(p)
        return [p[2] for p in out]

    def _down(self, info: ExpertInfo, t: Tier, hull: list[Tier]) -> Tier:
        below = [x for x in hull if x < t and x in DEMOTIONS[t]]
        return max(below) if below else Tier.COLD

    def score(self, key, info: ExpertInfo, t: Tier, now: int, hull: list[Tier] | None = None) -> float:
        """``f`` times the saving per byte of the cheapest hull step up to ``t`` (the top step on a
        concave hull; the lowest one when near-collinear tiers were kept)."""
        hull = hull if hull is not None else self.hull(info)
        down = self._down(info, t, hull)
        steps = [x for x in hull if x < t] + [t]
        dens = []
        for lo, hi in zip(steps, steps[1:]):
            db = info.bytes(hi) - info.bytes(lo)
            dens.append((self.cost.saving(info, hi) - self.cost.saving(info, lo)) / max(db, 1))
        if down not in steps[:-1]:  # demoting past several steps at once: their average
            dens.append((self.cost.saving(info, t) - self.cost.saving(info, down))
                        / max(info.bytes(t) - info.bytes(down), 1))
        return self.freq(key, now) * (min(dens) if dens else 0.0)

    def victim(self, res: ResidencyView, pinned: Collection) -> tuple[object, Tier] | None:
        best = None
        for key, t in res.resident():
            if key in pinned:
                continue
            info = res.info(key)
            hull = self.hull(info)
            s = (self.score(key, info, t, res.now, hull), -int(t))  # ties: move the higher tier first
            if best is None or s < best[0]:
                best = (s, key, self._down(info, t, hull))
        return None if best is None else (best[1], best[2])

    def _min_score(self, res: ResidencyView, exclude) -> float | None:
        lo = None
        for key, t in res.resident():
            if key == exclude:
                continue
            s = self.score(key, res.info(key), t, res.now)
            lo = s if lo is None or s < lo else lo
        return lo

    def placement(self, key, res: ResidencyView) -> Tier:
        info = res.info(key)
        hull = self.hull(info)
        lowest = None
        for t in reversed(hull):
            if t == Tier.COLD:
                return Tier.COLD
            if fits(res, info.bytes(t)):
                return t
            if lowest is None:
                lowest = self._min_score(res, key)
            if lowest is not None and self.score(key, info, t, res.now, hull) > lowest:
                return t
        return Tier.COLD
