"""Run a store call in a thread with a deadline, so a regression that deadlocks fails instead of hanging."""
from __future__ import annotations

import threading


def in_thread(fn, timeout: float = 120):
    """``fn()`` in a daemon thread; its value, or its exception re-raised; fails if it outlives ``timeout``."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "store deadlocked"
    if "error" in box:
        raise box["error"]
    return box.get("value")
