"""The I/O throttle (emulated slower storage): the reader's sustained rate never exceeds the cap
(measured on a fake clock, no real timing), and the model's logits do not change with it on."""
from __future__ import annotations

import threading

import pytest
import torch

from zipmoe_pack.pack import PackOptions, pack
from zipmoe_run.api import load
from zipmoe_run.store.io import ALIGN, Buffer, ExpertReader, parse_storage

DIMS = {"experts": 8, "top_k": 2, "hidden": 64, "moe_intermediate": 128, "layers": 2}
PROMPT = [[5, 17, 42, 7, 99, 3]]


class FakeClock:
    """Time moves only when someone sleeps, or by ``per_read`` when the test says a read happened."""

    def __init__(self):
        self.t = 1000.0
        self.slept = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        assert s > 0
        with self.lock:
            self.t += s
            self.slept += s


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "blob.bin"
    p.write_bytes(bytes(range(256)) * (64 * ALIGN // 256))  # 256 KiB
    return p


@pytest.mark.parametrize("mode", ["auto", "buffered"])
def test_sustained_rate_stays_under_cap(data_file, mode):
    clock = FakeClock()
    cap = 1_000_000  # bytes/s
    r = ExpertReader(data_file, mode, throttle_bps=cap, clock=clock, sleep=clock.sleep)
    buf = Buffer(16 * ALIGN)
    try:
        t_start = clock()
        total = 0
        sizes = [ALIGN, 16 * ALIGN, 3 * ALIGN, 8 * ALIGN, ALIGN, 16 * ALIGN]
        for i, n in enumerate(sizes):
            total += r.read(buf, (i * 4 * ALIGN) % (48 * ALIGN), n, "t")
            # after every read: the bytes returned so far fit the cap since the start
            assert total <= cap * (clock() - t_start) * (1 + 1e-12)
            # and the rate is the cap, not far below it (the reader waits only as long as needed)
            assert total >= cap * (clock() - t_start) * (1 - 1e-9)
        assert r.throttle_s == pytest.approx(clock.slept)
        # an idle device: time passes without reads; the next read is not allowed a burst beyond its
        # own bytes at the cap (the device restarts from the read's start)
        clock.t += 10.0
        t1 = clock()
        got = r.read(buf, 0, 16 * ALIGN, "t")
        assert got <= cap * (clock() - t1) * (1 + 1e-12)
        assert buf.arr[:16 * ALIGN].tobytes() == data_file.read_bytes()[:16 * ALIGN]  # same bytes
    finally:
        r.close()
        buf.close()


def test_concurrent_readers_share_the_cap(data_file):
    clock = FakeClock()
    cap = 2_000_000
    r = ExpertReader(data_file, "auto", throttle_bps=cap, clock=clock, sleep=clock.sleep)
    bufs = [Buffer(8 * ALIGN) for _ in range(4)]
    t0 = clock()
    try:
        threads = [threading.Thread(target=lambda b=b: [r.read(b, 0, 8 * ALIGN, "t") for _ in range(5)])
                   for b in bufs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # the fake clock advances by every sleep (they add up even when they overlap), so this is an
        # upper bound on elapsed time; the booked device time is the exact lower bound
        assert r.bytes_read == 4 * 5 * 8 * ALIGN
        assert r._free_at - t0 == pytest.approx(r.bytes_read / cap)
    finally:
        r.close()
        for b in bufs:
            b.close()


def test_parse_storage():
    assert parse_storage(None) is None and parse_storage("none") is None
    assert parse_storage("emmc") == 300_000_000 and parse_storage("UFS") == 2_000_000_000
    assert parse_storage("500M") == 500_000_000 and parse_storage("1.5GB/s") == 1_500_000_000
    assert parse_storage("123456") == 123456
    for bad in ("fast", "0", "-5M"):
        with pytest.raises(ValueError):
            parse_storage(bad)


@pytest.fixture(scope="module")
def archive(checkpoint_factory, tmp_path_factory):
    src = checkpoint_factory("qwen2_moe", layout="per-expert", seed=11, dims=DIMS, peaky_router=False)
    arc = tmp_path_factory.mktemp("throttle") / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=4096))
    return arc


def _logits(arc, **opts):
    with load(arc, dtype="bfloat16", threads=2, **opts) as lm:
        m = lm.model
        out = []
        with torch.no_grad():
            cache = m.new_cache(1, len(PROMPT[0]) + 4)
            x = m(torch.tensor(PROMPT), cache, 0)
            out.append(x.clone())
            tok = x[:, -1:].argmax(-1)
            for i in range(3):
                y = m(tok, cache, len(PROMPT[0]) + i)
                out.append(y.clone())
                tok = y[:, -1:].argmax(-1)
        return out, lm.source.stats()


def test_throttled_logits_bit_identical(archive):
    ref, st0 = _logits(archive)
    assert st0["io_throttle_bps"] is None
    with load(archive, threads=2) as lm:
        minimum = lm.source.store.min_budget
    # fast enough for a test (the archive is ~1 MB), slow enough that the throttle sleeps
    got, st = _logits(archive, memory_budget=minimum, io_throttle_bps=20e6)
    assert st["io_throttle_bps"] == 20e6 and st["bytes_read"] > 0 and st["throttle_s"] > 0
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
