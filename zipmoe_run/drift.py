"""The drift watcher: a store's online rates against the calibration the run started from
(specs/runtime.md section 12, "Online"). ``calibrate.current`` gives every cost model one."""
from __future__ import annotations

import logging
import math
import threading
import time

__all__ = ["DRIFT_RATIO", "DRIFT_MIN_OBS", "DRIFT_WEIGHT", "NOTES_KEPT", "Drift", "positive"]

log = logging.getLogger(__name__)

DRIFT_RATIO = 2.0  # an online estimate this far (either way) from the calibration is a drift
DRIFT_MIN_OBS = 8  # observations of a rate before its drift is judged
DRIFT_WEIGHT = 0.125  # of one observation in the drift watcher's (slow, geometric) average
NOTES_KEPT = 8


def positive(v) -> bool:
    """A finite positive number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


class Drift:
    """Watches a store's measured rates against the calibration they started from: its own slow average
    of each rate (geometric, weight :data:`DRIFT_WEIGHT`; the store's fast EWMA swings with every
    contended fetch) against a band of ``ratio`` either way of the run's *starting* calibration, never
    re-centred. Leaving the band is a drift (logged, noted in ``notes``, the last :data:`NOTES_KEPT`;
    ``events`` counts them; listeners re-plan) and, once per rate and run, the average is written into
    the cache entry; coming back is noted and re-planned, nothing written (specs/runtime.md 12)."""

    def __init__(self, cost, files: dict, calibrator, clock=time.monotonic,
                 ratio: float = DRIFT_RATIO):
        self.files = files  # rate name -> (cache file or None, key in its rates)
        self.base = {name: getattr(cost, name) for name in files}
        self.avg = {name: math.log(v) for name, v in self.base.items()}
        self.count = dict.fromkeys(files, 0)
        self.out = dict.fromkeys(files, False)  # the average outside the band now
        self.written: set[str] = set()  # rates written to the cache in this run
        self.calibrator, self.clock, self.ratio = calibrator, clock, ratio
        self.t0 = clock()
        self.notes: list[dict] = []
        self.events = 0
        self.lock = threading.Lock()
        self.listeners: list = []  # called with the rate's name after each drift (the store re-plans)

    def check(self, cost, name: str, rate: float) -> None:
        if name not in self.base or not positive(rate):
            return
        with self.lock:
            self.count[name] += 1
            self.avg[name] += DRIFT_WEIGHT * (math.log(rate) - self.avg[name])
            now, base = math.exp(self.avg[name]), self.base[name]
            out = not (1 / self.ratio) * base <= now <= self.ratio * base
            if self.count[name] < DRIFT_MIN_OBS or out == self.out[name]:
                return
            self.out[name] = out
            self.events += 1
            self.notes = self.notes[-(NOTES_KEPT - 1):] + [
                {"rate": name, "calibrated_bps": base, "online_bps": now, "ratio": now / base,
                 "after_s": self.clock() - self.t0, **({} if out else {"back": True})}]
            file, key = self.files[name]
            write = out and bool(file) and self.calibrator is not None and name not in self.written
            if write:
                self.written.add(name)
        if out:
            what = f"updating {file}" if write else "nothing written (not a cached calibration)" if not file \
                else "the cache was updated once in this run already"
            log.info("%s: online estimate %.2f GB/s is %.1fx the calibration (%.2f GB/s); %s", name, now / 1e9,
                     now / base, base / 1e9, what)
        else:
            log.info("%s: online estimate %.2f GB/s is back within %gx of the calibration (%.2f GB/s)", name,
                     now / 1e9, self.ratio, base / 1e9)
        if write:
            self.calibrator.update(file, key, now)
        for fn in list(self.listeners):
            fn(name)
