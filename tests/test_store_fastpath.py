"""A fetch of experts that are all decoded in a store without a budget yields the resident dicts at once
(no pins, no policy, no job): the same objects and bytes as the full path, counted as FULL hits."""
from __future__ import annotations

import numpy as np

from formats.decoder import ParallelDecoder
from formats.reader import Archive
from zipmoe_run.store.store import ExpertStore
from zipmoe_run.tiers import CostModel


def _bytes(arr) -> bytes:
    return np.asarray(arr).view(np.uint8).tobytes()


def test_all_full_without_a_budget_skips_the_job_and_the_policy(store_archive, monkeypatch):
    arc, ref = store_archive(5)
    keys = sorted(ref)
    layer_keys = [k for k in keys if k[:2] == keys[0][:2]][:3]
    stack, layer = layer_keys[0][:2]
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        store = ExpertStore(ar, dec, budget=None, cost=CostModel(frozen=True))
        try:
            first = dict(store.fetch(layer, [k[2] for k in layer_keys], stack))  # cold: the full path
            opened, accessed = [], []
            real_open = store._open
            monkeypatch.setattr(store, "_open", lambda ks: opened.append(ks) or real_open(ks))
            monkeypatch.setattr(store.policy, "on_access", lambda *a: accessed.append(a))
            before = {n: store.counters.get(n) for n in ("fetch_calls", "requests", "hits_full")}
            again = list(store.fetch(layer, [k[2] for k in reversed(layer_keys)] + [layer_keys[0][2]], stack))
            assert opened == [] and accessed == []
            assert [e for e, _ in again] == [k[2] for k in reversed(layer_keys)]  # repeats served once
            for e, w in again:
                assert w is first[e]  # the resident object itself
                assert _bytes(w)[:ref[(stack, layer, e)].nbytes] == _bytes(ref[(stack, layer, e)])
            after = {n: store.counters.get(n) for n in before}
            assert after == {"fetch_calls": before["fetch_calls"] + 1, "requests": before["requests"] + 3,
                             "hits_full": before["hits_full"] + 3}
            cold = [k for k in keys if k not in layer_keys and k[:2] == (stack, layer)][:1]
            if cold:  # one expert not yet decoded: the full path again
                list(store.fetch(layer, [layer_keys[0][2], cold[0][2]], stack))
                assert len(opened) == 1
        finally:
            store.close()


def test_a_budget_keeps_the_full_path(store_archive, monkeypatch):
    arc, ref = store_archive(5)
    (stack, layer, e) = sorted(ref)[0]
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        total = sum(a.nbytes for a in ref.values())
        store = ExpertStore(ar, dec, budget=total * 2, cost=CostModel(frozen=True))
        try:
            list(store.fetch(layer, [e], stack))
            opened = []
            real_open = store._open
            monkeypatch.setattr(store, "_open", lambda ks: opened.append(ks) or real_open(ks))
            for _, w in store.fetch(layer, [e], stack):
                assert _bytes(w)[:ref[(stack, layer, e)].nbytes] == _bytes(ref[(stack, layer, e)])
            assert len(opened) == 1
        finally:
            store.close()
