"""Fetch every expert of an archive through a bare ``ExpertStore`` and compare it with the reference."""
from __future__ import annotations

import numpy as np


def fetch_all_exact(path, ref: dict, depth: int) -> dict:
    """Every expert of the archive at ``path`` through an ``ExpertStore`` without a budget, with a frozen
    cost model and ``depth`` reads in flight; asserts each expert's bytes equal ``ref`` ({key: array},
    ``conftest.store_archive``'s) and returns the store's stats."""
    from formats.decoder import ParallelDecoder
    from formats.reader import Archive
    from zipmoe_run.store.store import ExpertStore
    from zipmoe_run.tiers import CostModel

    got = {}
    with Archive(path) as ar, ParallelDecoder(2) as dec:
        store = ExpertStore(ar, dec, budget=None, cost=CostModel(frozen=True), read_depth=depth)
        try:
            for stack, layer in sorted({k[:2] for k in ref}, key=str):
                experts = sorted(k[2] for k in ref if k[:2] == (stack, layer))
                for e, arr in store.fetch(layer, experts, stack):
                    got[(stack, layer, e)] = np.asarray(arr).view(np.uint8).reshape(-1).copy()
            st = store.stats()
        finally:
            store.close()
    assert set(got) == set(ref)
    for k, want in ref.items():
        assert got[k][:want.nbytes].tobytes() == want.view(np.uint8).tobytes(), k
    return st
