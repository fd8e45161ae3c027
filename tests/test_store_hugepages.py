"""The store's buffers on transparent huge pages: asked for only on bytes that are charged, given up
before any page is dropped, never outside the buffer's bytes (read back from /proc/self/smaps)."""
from __future__ import annotations

import mmap
import sys
import threading

import pytest

from zipmoe_run.store import buffers as B
from zipmoe_run.store.memory import Memory

H = 2 << 20  # the huge page the tests ask for, whatever the host's

linux = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                           reason="madvise(MADV_HUGEPAGE) and /proc/self/smaps are Linux's")


def _vmas(buf: B.Buffer) -> list[tuple[int, int, set[str]]]:
    """(start, end, VmFlags) of each mapping of /proc/self/smaps that overlaps ``buf``'s mapping."""
    lo = buf.arr.ctypes.data
    hi = lo + len(buf.mm)
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                a, b = (int(x, 16) for x in head.split("-"))
                cur = (a, b) if a < hi and b > lo else None
            elif cur is not None and line.startswith("VmFlags:"):
                out.append((max(cur[0], lo) - lo, min(cur[1], hi) - lo, set(line.split()[1:])))
    return sorted(out)


def _flags_at(vmas, off: int) -> set[str]:
    return next(f for a, b, f in vmas if a <= off < b)


@linux
def test_whole_huge_pages_of_the_bytes_ask_for_them_and_nothing_beyond():
    n = 2 * H + 5 * 4096  # two whole huge pages and a part-used third
    buf = B.Buffer(n, huge=H)
    assert buf.huge == H
    assert buf.nbytes == n and buf.charged == n  # the bytes charged do not change
    assert len(buf.arr) == n and len(buf.mm) == 3 * H  # mapped at a multiple: on a huge-page boundary
    vmas = _vmas(buf)
    assert "hg" in _flags_at(vmas, 0) and "hg" in _flags_at(vmas, 2 * H - 1)
    assert "nh" in _flags_at(vmas, 2 * H) and "nh" in _flags_at(vmas, 3 * H - 1)  # the last, part-used one
    buf.arr[:] = 7
    assert int(buf.arr[n - 1]) == 7
    buf.close()


@linux
def test_dropping_pages_gives_huge_pages_up_first():
    buf = B.Buffer(2 * H, huge=H)
    buf.arr[:] = 1
    assert buf.set_bounds(4096, 2 * H) == -4096
    assert buf.huge == 0
    assert all("nh" in f and "hg" not in f for _, _, f in _vmas(buf))  # khugepaged cannot refill the hole
    buf.close()


@linux
def test_a_buffer_charged_in_part_never_asks_for_huge_pages():
    mem = Memory(None, threading.Condition())
    whole = mem.bounded(4 * H, 0, 4 * H, "full")
    part = mem.bounded(4 * H, H + 4096, 4 * H, "sm")
    assert whole is not None and part is not None
    assert part.huge == 0
    assert all("hg" not in f for _, _, f in _vmas(part))
    if B.use_huge():  # this host uses them: the whole buffer asked
        assert whole.huge == B.HUGE and "hg" in _flags_at(_vmas(whole), 0)
    assert part.charged == 4 * H - (H + 4096)
    mem.close()
    whole.close()
    part.close()


def test_a_buffer_smaller_than_a_huge_page_or_without_them_is_mapped_as_before():
    small = B.Buffer(H - 4096, huge=H)
    none = B.Buffer(3 * H, huge=0)
    assert small.huge == 0 and len(small.mm) == H - 4096
    assert none.huge == 0 and len(none.mm) == 3 * H
    small.close()
    none.close()


@pytest.mark.parametrize("mode, size, env, want", [
    ("always [madvise] never", H, "", H),
    ("[always] madvise never", H, "", H),
    ("always madvise [never]", H, "", 0),
    ("always [madvise] never", 512 << 20, "", 0),  # 64 KiB base pages: a 512 MiB PMD page
    ("always [madvise] never", 1000, "", 0),  # not a page multiple
])
def test_huge_page_size_from_the_kernel(tmp_path, mode, size, env, want):
    (tmp_path / "enabled").write_text(mode + "\n")
    (tmp_path / "hpage_pmd_size").write_text(f"{size}\n")
    got = B.huge_page_size(str(tmp_path))
    assert got == (want if hasattr(mmap, "MADV_HUGEPAGE") else 0)


def test_huge_page_size_without_the_kernel_files(tmp_path, monkeypatch):
    monkeypatch.delenv("ZIPMOE_HUGEPAGES", raising=False)
    assert B.huge_page_size(str(tmp_path / "absent")) == 0


def test_anon_huge_bytes_reads_the_kernels_count(tmp_path):
    f = tmp_path / "smaps_rollup"
    f.write_text("Rss:   100 kB\nAnonHugePages:   4096 kB\nShmemPmdMapped: 0 kB\n")
    assert B.anon_huge_bytes(str(f)) == 4096 * 1024
    assert B.anon_huge_bytes(str(tmp_path / "absent")) is None


# -- the decision: measured once per host, cached, forced by ZIPMOE_HUGEPAGES -----------------------


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    from zipmoe_run.calibrate import Calibrator
    from zipmoe_run.store import hugepages

    monkeypatch.delenv("ZIPMOE_HUGEPAGES", raising=False)
    hugepages.reset()
    cal = Calibrator(tmp_path / "cache", info={"cpu": "Test CPU", "isa": [], "cores": 2, "machine": "x"},
                     version="1.0")
    yield hugepages, cal
    hugepages.reset()


def _fake(small, huge, share=1.0):
    calls = []

    def m(size):
        calls.append(size)
        return {"small_ms_per_mib": small, "huge_ms_per_mib": huge, "huge_share": share}

    return m, calls


def test_huge_pages_that_fault_in_at_a_price_are_not_used_and_the_verdict_is_cached(fresh):
    hp, cal = fresh
    m, calls = _fake(0.52, 3.3)  # host C: the host backs each fresh 2 MiB block anew
    assert hp.decide(H, measure_fn=m, calibrator=cal) == 0
    assert hp.report()["how"] == "measured" and calls == [H]
    hp.reset()
    assert hp.decide(H, measure_fn=m, calibrator=cal) == 0
    assert hp.report()["how"] == "cached" and calls == [H]  # not measured again


@pytest.mark.parametrize("small, huge, share, want", [
    (0.52, 0.12, 1.0, H),  # cheaper than small pages (bare metal, or memory the guest still holds)
    (0.50, 1.00, 1.0, H),  # at the ratio
    (0.50, 1.01, 1.0, 0),
    (0.52, 0.12, 0.2, 0),  # the kernel gave few of them: not worth asking
    (0.0, 0.12, 1.0, 0),  # a measurement that cannot be right
])
def test_the_verdict_is_the_fault_cost_ratio(fresh, small, huge, share, want):
    hp, cal = fresh
    m, _ = _fake(small, huge, share)
    assert hp.decide(H, measure_fn=m, calibrator=cal) == want


@pytest.mark.parametrize("env, want", [("1", H), ("0", 0)])
def test_the_environment_forces_the_choice_without_measuring(fresh, monkeypatch, env, want):
    hp, cal = fresh
    monkeypatch.setenv("ZIPMOE_HUGEPAGES", env)
    m, calls = _fake(0.5, 0.1)
    assert hp.decide(H, measure_fn=m, calibrator=cal) == want and calls == []
    assert hp.decide(0, measure_fn=m, calibrator=cal) == 0  # none offered: none used


@linux
def test_measure_times_both_kinds_of_page():
    from zipmoe_run.store import hugepages

    m = hugepages.measure(H, span=4 * H)
    assert m["small_ms_per_mib"] > 0 and m["huge_ms_per_mib"] > 0
    assert m["huge_share"] is None or 0.0 <= m["huge_share"] <= 1.0


def test_a_process_that_finds_huge_pages_dear_stops_asking_and_rewrites_the_cache(fresh):
    """A probe that met memory the guest still held said "cheap"; the store's own huge pages say
    otherwise: after WATCH_PIECES of them the process stops asking and the next run starts without."""
    hp, cal = fresh
    m, calls = _fake(0.5, 0.1)
    assert hp.decide(H, measure_fn=m, calibrator=cal) == H and hp.watching()
    hp.observe([0.1] * 4)  # the few warm ones
    assert hp.watching() and hp.decide(H) == H
    hp.observe([4.0] * (hp.WATCH_PIECES - 4))
    assert not hp.watching()
    assert hp.decide(H) == 0 and hp.report()["how"] == "observed"
    assert hp.report()["measured"]["huge_ms_per_mib"] == 4.0
    hp.reset()
    assert hp.decide(H, measure_fn=m, calibrator=cal) == 0 and hp.report()["how"] == "cached" and calls == [H]


def test_huge_pages_that_fault_in_as_measured_stay_on(fresh):
    hp, cal = fresh
    m, _ = _fake(0.5, 0.1)
    assert hp.decide(H, measure_fn=m, calibrator=cal) == H
    hp.observe([0.12] * hp.WATCH_PIECES)
    assert not hp.watching() and hp.decide(H) == H and hp.report()["how"] == "measured"
    hp.reset()
    assert hp.decide(H, measure_fn=m, calibrator=cal) == H  # the cache is as measured


def test_a_forced_choice_is_not_watched(fresh, monkeypatch):
    hp, cal = fresh
    monkeypatch.setenv("ZIPMOE_HUGEPAGES", "1")
    assert hp.decide(H, calibrator=cal) == H and not hp.watching()


@linux
def test_a_watched_buffer_times_each_of_its_huge_pages(fresh, monkeypatch):
    hp, cal = fresh
    m, _ = _fake(0.5, 0.1)
    hp.decide(H, measure_fn=m, calibrator=cal)
    seen: list[list[float]] = []
    monkeypatch.setattr(hp, "observe", lambda per: seen.append(list(per)))
    buf = B.Buffer(3 * H + 4096, huge=H)  # three whole huge pages and a part-used fourth
    assert len(seen) == 1 and len(seen[0]) == 3 and all(x >= 0 for x in seen[0])
    assert int(buf.arr[0]) == 0 and buf.charged == 3 * H + 4096
    buf.close()
