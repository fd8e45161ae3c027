"""The bulk preload (zipmoe_run/store/preloader.py): the same experts, bytes and accounting as the task
pipeline, a corrupt expert left to its first fetch, and the dense checksums verified off the model's thread."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from formats import fused
from formats.errors import CorruptDataError
from formats.reader import Archive
from tests.test_store_prefetch import _Open
from zipmoe_run.store import io as store_io
from zipmoe_run.store import preloader
from zipmoe_run.tiers import Tier

pytestmark = pytest.mark.skipif(not fused.available(), reason="no native xxh3 on this platform")


def _resident(store) -> dict:
    """{key: decoded bytes} of every FULL expert."""
    return {k: np.asarray(e.weights)[:store.extents[k].decoded_nbytes].tobytes()
            for k, e in store.table.entries.items() if e.tier == Tier.FULL}


def _settled(st: dict) -> None:
    assert st["staging_bytes"] == 0 and st["draining_bytes"] == 0, st
    assert st["store_peak_bytes"] <= (st["budget_bytes"] or float("inf")), st


@pytest.mark.parametrize("budget", [None, 0.6])
def test_bulk_and_task_preloads_agree(store_archive, monkeypatch, budget):
    arc, reference = store_archive(3)
    got = {}
    for bulk in ("1", "0"):
        monkeypatch.setenv("ZIPMOE_BULK_PRELOAD", bulk)
        with Archive(arc) as ar:
            total = sum(e.decoded_nbytes for e in ar.index.experts)
        with _Open(arc, budget=None if budget is None else int(total * budget)) as store:
            assert store.bulk_preload == (bulk == "1")
            n = store.preload()
            st = store.stats()
            _settled(st)
            assert st["preloaded"] == n and st["resident_experts"] == {"full": n}
            assert (n == len(store.extents)) == (budget is None) and n > 0
            if bulk == "1":
                assert st["reads"] == n  # one read per expert
            res = _resident(store)
            assert all(res[k] == reference[k].tobytes() for k in res)
            got[bulk] = set(res)
    if budget is None:
        assert got["1"] == got["0"]


def test_an_archive_the_fused_kernel_cannot_decode_is_preloaded_by_the_tasks(store_archive):
    arc, reference = store_archive(3, codec="zstd-lit")
    with _Open(arc) as store:
        assert store.preload() == len(store.extents)
        res = _resident(store)
        assert len(res) == len(store.extents) and all(res[k] == reference[k].tobytes() for k in res)
        _settled(store.stats())


def test_a_corrupt_expert_is_left_to_its_first_fetch(store_archive, tmp_path, caplog):
    arc, reference = store_archive(3)
    bad = tmp_path / "bad.zmoe"
    shutil.copyfile(arc, bad)
    with Archive(bad) as ar:
        ext = ar.index.extent(1, 2)
    with open(bad, "r+b") as f:  # a byte in the middle of layer 1 expert 2's extent
        f.seek(ext.offset + ext.length // 2)
        b = f.read(1)
        f.seek(ext.offset + ext.length // 2)
        f.write(bytes([b[0] ^ 0x40]))
    with _Open(bad) as store:
        with caplog.at_level("WARNING", logger="zipmoe_run.store.preloader"):
            n = store.preload()
        key = (None, 1, 2)
        assert store.tier_of(key) != Tier.FULL and n == len(store.extents) - 1
        assert any("preload stopped at" in r.getMessage() for r in caplog.records)
        with pytest.raises(CorruptDataError, match="checksum mismatch"):
            for _ in store.fetch(1, [2]):
                pass
        res = _resident(store)
        assert key not in res and all(res[k] == reference[k].tobytes() for k in res)
        _settled(store.stats())


def test_dense_checksums_are_verified_on_the_preload_thread(store_archive, tmp_path):
    from zipmoe_run.archive_source import ArchiveSource

    arc, _ = store_archive(3)
    with Archive(arc) as ar:
        dense = {n: t for n, t in ar.index.tensors.items() if t.role == "dense" and t.nbytes}
    src = ArchiveSource(arc, threads=2, preload=True)
    try:
        src.wait_preload()
        assert src._checked == set(dense)
    finally:
        src.close()
    name = max(dense, key=lambda n: dense[n].nbytes)
    bad = tmp_path / "bad.zmoe"
    shutil.copyfile(arc, bad)
    with open(bad, "r+b") as f:
        f.seek(dense[name].data.offset + 5)
        b = f.read(1)
        f.seek(dense[name].data.offset + 5)
        f.write(bytes([b[0] ^ 1]))
    src = ArchiveSource(bad, threads=2, preload=True)
    try:
        src.wait_preload()
        assert name not in src._checked and src._checked == set(dense) - {name}
        with pytest.raises(CorruptDataError, match=f"tensor {name} piece 0 .* fails its checksum"):
            src.dense(name)
    finally:
        src.close()


def test_a_file_that_shrinks_under_the_preload_leaves_the_rest_to_first_use(store_archive, tmp_path, caplog):
    """The bulk kernel's short read: the experts past the new end stay COLD, and their fetch names the
    truncation in one line."""
    from formats.errors import FormatError

    arc, reference = store_archive(3)
    cut = tmp_path / "cut.zmoe"
    shutil.copyfile(arc, cut)
    with _Open(cut) as store:
        last = max(store.extents.values(), key=lambda e: e.offset)
        os.truncate(cut, last.offset + last.length // 2)  # after open: only the expert reads see it
        with caplog.at_level("WARNING", logger="zipmoe_run.store.preloader"):
            n = store.preload()
        assert store.tier_of(last.key) == Tier.COLD and n == len(store.extents) - 1
        assert any("the file ends after" in r.getMessage() for r in caplog.records)
        with pytest.raises(FormatError, match="archive truncated"):
            for _ in store.fetch(last.key[1], [last.key[2]]):
                pass
        res = _resident(store)
        assert all(res[k] == reference[k].tobytes() for k in res)


# -- reading what the page cache holds already -------------------------------------------------------

P = store_io.PAGE


def test_uncached_runs_are_the_byte_ranges_of_the_missing_pages():
    res = np.array([1, 0, 0, 1, 0, 1, 1, 0], np.uint8)
    assert store_io.uncached_runs(res, 3 * P) == [(4 * P, 2 * P), (7 * P, P), (10 * P, P)]
    assert store_io.uncached_runs(np.ones(4, np.uint8), 0) == []
    assert store_io.uncached_runs(np.zeros(3, np.uint8), 0) == [(0, 3 * P)]
    assert store_io.uncached_runs(np.array([0, 1], np.uint8), P + 100) == [(P, P)]  # pages from the range's page


def test_the_pages_of_a_file_just_written_are_cached(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(5 * P + 123))
    fd = os.open(p, os.O_RDONLY)
    try:
        res = store_io.cached_pages(fd, 0, 5 * P + 123)
        if res is None:
            pytest.skip("mincore is not reachable through the C library here")
        assert res.dtype == np.uint8 and res.shape == (6,) and res.all()
        assert store_io.cached_pages(fd, P + 7, 10).shape == (1,)  # a range inside one page
        assert store_io.cached_pages(fd, 0, 0) is None and store_io.cached_pages(fd, -P, P) is None
    finally:
        os.close(fd)


def test_fd_for_reads_through_the_page_cache_where_it_holds_most_of_the_range(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(8 * P))
    r = store_io.ExpertReader(p)
    plain = (r._fd_direct, []) if r._fd_direct is not None else (r._fd, [(0, 8 * P)])
    try:
        monkeypatch.setattr(store_io, "cached_pages", lambda fd, off, n: np.array([1, 1, 0, 1, 1, 1, 0, 0], np.uint8))
        assert r.fd_for(0, 8 * P) == (r._fd, [(2 * P, P), (6 * P, 2 * P)], True)  # 5 of 8 cached
        monkeypatch.setattr(store_io, "cached_pages", lambda fd, off, n: np.array([1, 0, 0, 0, 0, 1, 0, 0], np.uint8))
        assert r.fd_for(0, 8 * P) == (*plain, False)  # 2 of 8: the reader's own way
        monkeypatch.setattr(store_io, "cached_pages", lambda fd, off, n: None)  # cannot tell
        assert r.fd_for(0, 8 * P) == (*plain, False)
    finally:
        r.close()
    throttled = store_io.ExpertReader(p, throttle_bps=1e9)  # emulated storage never reads from memory
    try:
        monkeypatch.setattr(store_io, "cached_pages", lambda fd, off, n: np.ones(8, np.uint8))
        assert throttled.fd_for(0, 8 * P)[2] is False
    finally:
        throttled.close()


def test_a_preload_through_the_page_cache_drops_exactly_the_pages_that_were_not_cached(store_archive, monkeypatch):
    """Half of every batch's pages reported missing: the same bytes as ever, every read counted as from
    the page cache, and the missing pages (only they) dropped after the read."""
    arc, reference = store_archive(3)
    real, asked, dropped = store_io.cached_pages, [], []

    def holes(fd, off, n):
        res = real(fd, off, n)
        if res is None:
            pytest.skip("mincore is not reachable through the C library here")
        res = np.ones_like(res)
        res[1::2] = 0  # 50 %: still read through the cache
        asked.append(store_io.uncached_runs(res, off))
        return res

    monkeypatch.setattr(store_io, "cached_pages", holes)
    monkeypatch.setattr(preloader, "drop_pages", lambda fd, off, n: dropped.append((off, n)))
    with _Open(arc) as store:
        assert store.bulk_preload
        n = store.preload()
        st = store.stats()
        assert n == len(store.extents) and st["bytes_from_page_cache"] == st["bytes_read"] > 0
        res = _resident(store)
        assert len(res) == n and all(res[k] == reference[k].tobytes() for k in res)
    assert asked and sorted(dropped) == sorted(r for runs in asked for r in runs)


def test_a_preload_of_an_archive_just_written_reads_it_from_the_page_cache(store_archive):
    arc, reference = store_archive(3)
    fd = os.open(arc, os.O_RDONLY)
    try:
        res = store_io.cached_pages(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if res is None or not res.all():
        pytest.skip("mincore unavailable, or the archive's pages were evicted since it was written")
    with _Open(arc) as store:
        n = store.preload()
        st = store.stats()
        assert n == len(store.extents) and st["bytes_from_page_cache"] == st["bytes_read"] > 0
        assert all(v == reference[k].tobytes() for k, v in _resident(store).items())
