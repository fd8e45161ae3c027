"""Every tier serves the exact bytes: random access sequences through the store, each yielded expert
compared with the archive's own decode, with cost models that make every tier and move happen."""
from __future__ import annotations

import random

import numpy as np
import pytest

from formats.decoder import ParallelDecoder
from formats.reader import Archive
from zipmoe_run.store import buffers as B
from zipmoe_run.store.budget import Ledger
from zipmoe_run.policies import DensityPolicy, LRUPolicy
from zipmoe_run.store.store import ExpertStore
from zipmoe_run.tiers import CostModel, Tier, info_from_extent

EXPERTS = 8  # the store_archive fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def arc(store_archive):
    return store_archive(11)[0]


@pytest.fixture(scope="module")
def reference(store_archive):
    return store_archive(11)[1]


def _drive(arc, reference, budget_frac, cost, policy, seed, threads=2, steps=120, check=None, **kw):
    rng = random.Random(seed)
    with Archive(arc) as ar, ParallelDecoder(threads) as dec:
        total = sum(e.decoded_nbytes for e in ar.index.experts)
        store = ExpertStore(ar, dec, budget=int(total * budget_frac), cost=cost, policy=policy, **kw)
        try:
            layers = sorted({e.layer for e in ar.index.experts})
            n = EXPERTS
            hot = [0, 1, 2]  # skewed popularity: some experts come back often
            for _ in range(steps):
                layer = rng.choice(layers)
                k = rng.randint(1, 4)
                ids = set(rng.sample(hot, min(k, 2))) | set(rng.sample(range(n), k))
                for e, arr in store.fetch(layer, sorted(ids)):
                    want = reference[(None, layer, e)]
                    assert np.array_equal(np.asarray(arr)[:want.shape[0]], want), (layer, e)
                arr = None  # a caller holding a buffer keeps it charged (draining) until it lets go
                st = store.stats()
                assert st["store_bytes"] <= st["budget_bytes"]
                if check is not None:
                    check(store, st)
            st = store.stats()
            assert st["staging_bytes"] == 0 and st["draining_bytes"] == 0
            return st
        finally:
            store.close()


def test_every_tier_and_move_is_exact(arc, reference):
    seen: dict[str, int] = {}
    configs = [
        (0.45, CostModel(read_bps=1e6, decode_bps=2e9, read_share=1.0, frozen=True), 0.1),   # slow disk
        (0.55, CostModel(read_bps=3e8, decode_bps=2e9, read_share=0.7, frozen=True), 0.1),   # mixed
        (0.35, CostModel(read_bps=2e9, decode_bps=5e8, read_share=0.3, frozen=True), 0.02),  # slow decode
    ]
    for i, (frac, cost, tie) in enumerate(configs):
        st = _drive(arc, reference, frac, cost, DensityPolicy(cost, half_life=8, tie=tie), seed=i)
        for k, v in st.items():
            if k.startswith(("hits_", "demote_", "placed_")) and isinstance(v, int):
                seen[k] = seen.get(k, 0) + v
    for k in ("hits_full", "hits_comp", "hits_sm", "hits_cold", "placed_full", "placed_comp",
              "demote_comp_sm", "demote_sm_cold"):
        assert seen.get(k, 0) > 0, (k, seen)
    assert seen.get("demote_full_sm", 0) > 0 and seen.get("demote_full_cold", 0) > 0, seen


def test_lru_policy_and_one_thread(arc, reference):
    st = _drive(arc, reference, 0.3, CostModel(), LRUPolicy(), seed=5, threads=1, steps=60)
    assert st["hits_full"] > 0 and st["hits_cold"] > 0 and st["hits_sm"] == st["hits_comp"] == 0


def test_full_to_sm_split_round_trip(arc, reference):
    """FULL -> SM derives the sign/mantissa planes from the decoded bytes; an SM fetch reads only the
    coded exponents and must decode to the same bytes."""
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        store = ExpertStore(ar, dec, budget=None)
        try:
            key = (None, 0, 3)
            list(store.fetch(0, [3]))
            assert store.tier_of(key) == Tier.FULL
            with store.cond:
                store.table.demote(key, Tier.SM)
            assert store.tier_of(key) == Tier.SM
            before = store.stats()["bytes_read"]
            (e, arr), = list(store.fetch(0, [3]))
            want = reference[key]
            assert np.array_equal(np.asarray(arr)[:want.shape[0]], want)
            del arr
            info = info_from_extent(store.extents[key])
            assert store.stats()["bytes_read"] - before == info.read_sm
            assert store.stats()["hits_sm"] == 1
        finally:
            store.close()


def test_tier_sizes_are_page_exact(arc):
    with Archive(arc) as ar:
        for e in ar.index.experts:
            i = info_from_extent(e)
            assert i.full_bytes % 4096 == i.comp_bytes % 4096 == i.sm_bytes % 4096 == 0
            assert i.sm_bytes < i.comp_bytes < i.full_bytes
            assert i.read_sm + i.sm_bytes >= i.comp_bytes  # the SM fetch restores the whole extent
            assert i.tiers == (Tier.COLD, Tier.SM, Tier.COMP, Tier.FULL)


def test_ledger_never_negative_or_over():
    led = Ledger(100)
    led.charge("staging", 60)
    led.move("staging", "full", 60)
    with pytest.raises(AssertionError):
        led.charge("pool", 41)
    with pytest.raises(AssertionError):
        led.move("sm", "full", 1)


def test_piecewise_reads_decode_early_and_exactly(arc, reference, monkeypatch):
    """Reads in 12 KiB pieces: chunks are submitted as soon as their bytes are in; same bytes out."""
    import zipmoe_run.store.worker as worker_mod

    monkeypatch.setattr(worker_mod, "READ_PIECE", 3 * 4096)
    cost = CostModel(read_bps=3e8, decode_bps=2e9, read_share=0.7, frozen=True)
    st = _drive(arc, reference, 0.55, cost, DensityPolicy(cost, half_life=8, tie=0.1), seed=1, threads=3, steps=40)
    assert st["reads"] > 10 * (st["hits_cold"] + st["hits_sm"]) // 2
    assert st["hits_sm"] + st["hits_cold"] > 0


@pytest.mark.parametrize("page", [16384])
def test_injected_page_size_charges_and_drops_whole_pages(store_archive, monkeypatch, page):
    """A kernel with 16 KiB or 64 KiB pages: buffers, charged bytes and madvise ranges are whole pages
    of that size (reads stay 4 KiB-aligned), the tiers are used, and the bytes do not change."""
    from zipmoe_run.store.buffers import Buffer

    drops = []
    real = Buffer._drop

    def spy(self, lo, hi):
        drops.append((lo, hi, self.nbytes))
        real(self, lo, hi)

    monkeypatch.setattr(Buffer, "_drop", spy)
    cats = ("store_bytes", "store_peak_bytes", "resident_full_bytes", "resident_comp_bytes", "resident_sm_bytes",
            "staging_bytes", "pool_bytes", "draining_bytes", "fixed_bytes", "min_budget_bytes")

    def whole_pages(store, st):
        assert all(st[c] % page == 0 for c in cats), {c: st[c] for c in cats}
        for i in store.infos.values():
            assert i.full_bytes % page == i.comp_bytes % page == i.sm_bytes % page == 0
            assert i.read_sm % 4096 == 0  # what an SM fetch reads: I/O alignment, not pages

    cost = CostModel(read_bps=1e6, decode_bps=2e9, read_share=1.0, frozen=True)  # slow disk: COMP and SM
    # the zstd-lit archive: with huf4x's slightly larger coded exponents at these 8 Ki-element chunks the
    # extents round to one more 16 KiB page and this 40-step drive happens not to reach the SM tier
    arc, reference = store_archive(11, "zstd-lit")
    st = _drive(arc, reference, 0.6, cost, DensityPolicy(cost, half_life=8, tie=0.1), seed=3, steps=40,
                check=whole_pages, page_size=page)
    assert st["page_bytes"] == page
    assert st["huge_page_bytes"] in (None, 0, B.HUGE)  # None: no buffer of a huge page yet, nothing decided
    assert st["placed_comp"] > 0 and st["demote_comp_sm"] > 0 and st["hits_sm"] > 0 and st["hits_cold"] > 0, st
    assert drops and all(lo % page == 0 and hi % page == 0 for lo, hi, _ in drops), drops
    assert all(n % page == 0 for _, _, n in drops)


def test_the_store_reads_only_through_its_byte_source(arc, reference):
    """``ExpertStore(source=...)`` takes any ``ExpertBytes`` (a checkpoint folder's shards will be one):
    every expert byte comes through its four calls, and the results are exact."""
    from zipmoe_run.store.bytesource import ArchiveBytes
    from zipmoe_run.store.io import ExpertReader

    class Counting:
        def __init__(self, inner):
            self.inner, self.reads, self.closed = inner, 0, False
            self.extents, self.scratch_elements, self.reader = inner.extents, inner.scratch_elements, inner.reader

        def missing(self, key):
            self.inner.missing(key)

        def read(self, ext, buf, lo, n, what):
            self.reads += 1
            return self.inner.read(ext, buf, lo, n, what)

        def chunks(self, ext, view, start):
            return self.inner.chunks(ext, view, start)

        def read_length(self, ext, start):
            return self.inner.read_length(ext, start)

        def close(self):
            self.closed = True
            self.inner.close()

    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        src = Counting(ArchiveBytes(ar, ExpertReader(ar.path)))
        store = ExpertStore(None, dec, budget=None, source=src)
        try:
            for layer in (0, 1):
                for e, arr in store.fetch(layer, list(range(EXPERTS))):
                    want = reference[(None, layer, e)]
                    assert np.array_equal(np.asarray(arr)[:want.shape[0]], want)
            assert src.reads == store.stats()["reads"] >= 2 * EXPERTS
        finally:
            store.close()
        assert src.closed
