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
BACK = 0.75  # a drifted average is back once within ratio ** BACK (1.68x for 2x): no toggling at the edge


def positive(v) -> bool:
    """A finite positive number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


class Drift:
    """Watches a store's measured rates against the calibration they started from.

    In the run: its own slow average of each rate (geometric, weight :data:`DRIFT_WEIGHT`; the store's
    fast EWMA swings with every contended fetch) against a band of ``ratio`` either way of the run's
    *starting* calibration, never re-centred. Leaving the band is a drift (logged, noted in ``notes``,
    the last :data:`NOTES_KEPT`; ``events`` counts them; listeners re-plan); coming back within
    ``ratio ** BACK`` is noted and re-planned too (a band edge of its own, so an average sitting at the
    edge does not toggle: a read rate at half its calibration noted eight drifts in one run). Nothing is
    written then: a run's phases (prefill, decode, contended or not) move the average more than 2x
    either way, and writing an excursion made the next run start from one phase's rate and take the
    other's for a drift. At the end of the run (:meth:`finish`, the store's close) the geometric mean of
    the run's samples of a rate, where it lies outside the band, is written into the cache entry: the
    next store on this host starts from it (specs/runtime.md section 12)."""

    def __init__(self, cost, files: dict, calibrator, clock=time.monotonic, ratio: float = DRIFT_RATIO):
        self.files = files  # rate name -> (cache file or None, key in its rates)
        self.base = {name: getattr(cost, name) for name in files}
        self.avg = {name: math.log(v) for name, v in self.base.items()}
        self.count = dict.fromkeys(files, 0)
        self.log_sum = dict.fromkeys(files, 0.0)  # the run's samples, for their geometric mean at the end
        self.out = dict.fromkeys(files, False)  # the slow average outside the band now
        self.calibrator, self.clock, self.ratio = calibrator, clock, ratio
        self.t0 = clock()
        self.notes: list[dict] = []
        self.events = 0
        self.written: dict[str, float] = {}  # what finish() wrote
        self.finished = False
        self.lock = threading.Lock()
        self.listeners: list = []  # called with the rate's name after each drift (the store re-plans)

    def _outside(self, name: str, v: float, ratio: float | None = None) -> bool:
        base, r = self.base[name], ratio or self.ratio
        return not (1 / r) * base <= v <= r * base

    def _note(self, name: str, v: float, **extra) -> None:
        base = self.base[name]
        self.notes = self.notes[-(NOTES_KEPT - 1):] + [
            {"rate": name, "calibrated_bps": base, "online_bps": v, "ratio": v / base,
             "after_s": self.clock() - self.t0, **extra}]

    def check(self, cost, name: str, rate: float) -> None:
        if name not in self.base or not positive(rate):
            return
        with self.lock:
            self.count[name] += 1
            self.log_sum[name] += math.log(rate)
            self.avg[name] += DRIFT_WEIGHT * (math.log(rate) - self.avg[name])
            now, base = math.exp(self.avg[name]), self.base[name]
            out = self._outside(name, now, self.ratio ** BACK if self.out[name] else None)
            if self.count[name] < DRIFT_MIN_OBS or out == self.out[name] or self.finished:
                return
            self.out[name] = out
            self.events += 1
            self._note(name, now, **({} if out else {"back": True}))
        if out:
            log.info("%s: online estimate %.2f GB/s is %.1fx the calibration (%.2f GB/s)", name, now / 1e9,
                     now / base, base / 1e9)
        else:
            log.info("%s: online estimate %.2f GB/s is back within %gx of the calibration (%.2f GB/s)", name,
                     now / 1e9, self.ratio, base / 1e9)
        for fn in list(self.listeners):
            fn(name)

    def finish(self) -> dict[str, float]:
        """At the end of the run (once; later calls do nothing): write the geometric mean of the run's
        samples of each rate (at least :data:`DRIFT_MIN_OBS` of them) that lies outside the band into its
        cache entry; returns what was written ({rate name: bytes/s})."""
        todo = []
        with self.lock:
            if self.finished:
                return {}
            self.finished = True
            for name, n in self.count.items():
                if n < DRIFT_MIN_OBS:
                    continue
                mean = math.exp(self.log_sum[name] / n)
                file, key = self.files[name]
                if self._outside(name, mean):
                    self._note(name, mean, run_mean=True, samples=n)
                    if file and self.calibrator is not None:
                        todo.append((name, file, key, mean))
        for name, file, key, mean in todo:
            log.info("%s: the run's mean %.2f GB/s is %.1fx the calibration (%.2f GB/s); updating %s", name,
                     mean / 1e9, mean / self.base[name], self.base[name] / 1e9, file)
            self.calibrator.update(file, key, mean)
            self.written[name] = mean
        return dict(self.written)
