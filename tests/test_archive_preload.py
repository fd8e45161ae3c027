"""An archive's experts decode in the background from the moment it is opened (issue 12, start-up):
opening it imports no torch, the preload runs while the caller builds the model, the first fetch waits
for it, and the results are the bytes of a run without it."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from zipmoe_run.api import load
from zipmoe_run.archive_source import ArchiveSource
from zipmoe_run.errors import GenerationError

PROMPT = [[5, 17, 42, 7, 99, 3]]

_NO_TORCH = """
import sys
from zipmoe_run.archive_source import ArchiveSource
src = ArchiveSource(sys.argv[1], threads=2)
assert "torch" not in sys.modules, "opening imported torch"
src.wait_preload()
assert "torch" not in sys.modules, "the preload imported torch"
st = src.stats()
src.close()
print(st["preloaded"], len(src.archive.index.experts))
"""


@pytest.fixture(scope="module")
def archive(store_archive):
    return store_archive(3)


def test_open_and_preload_import_no_torch(archive):
    path, ref = archive
    res = subprocess.run([sys.executable, "-c", _NO_TORCH, str(path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    preloaded, experts = map(int, res.stdout.split())
    assert preloaded == experts == len(ref) > 0


def test_unlimited_budget_preloads_in_the_background(archive):
    """No budget (the CLI's default): every expert is decoded while loading, not on first use."""
    path, ref = archive
    with ArchiveSource(path, threads=2) as src:
        assert src._preload_thread is not None  # started by the constructor, not run inside it
        src.wait_preload()
        st = src.stats()
        assert st["preloaded"] == st["experts_decoded"] == len(ref)
        key = next(iter(ref))  # (stack, layer, expert)
        (e, w), = list(src.fetch(key[1], [key[2]], key[0]))
        assert src.stats()["hits_cold"] == 0
        assert e == key[2] and all(t.dtype == torch.bfloat16 for t in w.values())


def test_unlimited_budget_bigger_than_memory_loads_on_first_use(archive, monkeypatch, caplog):
    """No budget and experts that exceed the memory available: no preload (it would exhaust memory before
    the first token); the experts load on first use, with one warning naming the fix."""
    import zipmoe_run.archive_source as asrc

    path, ref = archive
    monkeypatch.setattr(asrc, "available_memory", lambda: 1 << 16)
    with caplog.at_level("WARNING", logger=asrc.__name__), ArchiveSource(path, threads=2) as src:
        assert src._preload_thread is None
        assert src.stats().get("preloaded", 0) == 0
        key = next(iter(ref))
        (e, w), = list(src.fetch(key[1], [key[2]], key[0]))
        assert e == key[2] and src.stats()["hits_cold"] == 1
    assert any("exceed the memory available" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("opts", [{"preload": False}, {"memory_budget": "50%"}])
def test_no_preload_when_off_or_budget_too_small(archive, opts):
    path, _ = archive
    with ArchiveSource(path, threads=2, **opts) as src:
        assert src._preload_thread is None
        assert src.stats().get("preloaded", 0) == 0


@pytest.mark.parametrize("opts", [{}, {"preload": False}, {"memory_budget": "50%"}, {"memory_budget": "50%", "preload": True}])
def test_logits_are_the_same_bits_with_and_without_the_preload(archive, opts):
    path, _ = archive
    out = []
    for o in ({"preload": False}, opts):
        with load(path, dtype="float32", threads=2, **o) as lm:
            cache = lm.model.new_cache(1, 16)
            x = lm.model(torch.tensor(PROMPT), cache, 0)  # [1, T, V]
            step = lm.model(x[:, -1:].argmax(-1), cache, len(PROMPT[0]))  # [1, 1, V]
            out.append(torch.cat([x, step], 1).clone())
    assert torch.equal(out[0].view(torch.int32), out[1].view(torch.int32))


def test_budgeted_fetch_empties_the_yielded_dict(archive):
    """With a budget a yielded weights dict is valid until the next expert is asked for (then emptied)."""
    path, ref = archive
    key = next(iter(ref))
    with ArchiveSource(path, threads=2, memory_budget="50%") as src:
        got = []
        for _, w in src.fetch(key[1], [key[2], key[2] + 1], key[0]):
            assert w and all(isinstance(t, torch.Tensor) for t in w.values())
            got.append(w)
        assert got and all(not w for w in got)


def test_close_during_the_preload_ends_it(archive):
    path, _ = archive
    src = ArchiveSource(path, threads=2)
    t = src._preload_thread
    src.close()
    assert t is not None and not t.is_alive()
    assert not [th for th in threading.enumerate() if th.name == "zipmoe-preload"]


def test_preload_error_is_raised_by_the_first_fetch(archive, monkeypatch):
    path, ref = archive
    from zipmoe_run.store.store import ExpertStore

    def broken(self):
        raise GenerationError("preload broke")

    monkeypatch.setattr(ExpertStore, "preload", broken)
    key = next(iter(ref))
    with ArchiveSource(path, threads=2) as src:
        with pytest.raises(GenerationError, match="preload broke"):
            list(src.fetch(key[1], [key[2]], key[0]))
        assert list(src.fetch(key[1], [key[2]], key[0]))  # raised once; the store still serves


def test_load_of_an_open_source_owns_it(archive):
    path, _ = archive
    src = ArchiveSource(path, threads=2)
    with pytest.raises(GenerationError, match="unknown dtype"):
        load(src, dtype="int3")
    assert src._closed  # load closed it on failure
    src = ArchiveSource(path, threads=2)
    with pytest.raises(GenerationError, match="store options"):
        load(src, memory_budget="50%")
    assert src._closed
    src = ArchiveSource(path, threads=2)
    with load(src, dtype="float32", threads=2) as lm:
        assert lm.source is src
    assert src._closed


@pytest.fixture(scope="module")
def big_archive(checkpoint_factory, tmp_path_factory):
    """Experts of 3 MiB: the store observes rates of decodes and reads of at least 1 MiB only."""
    from zipmoe_pack.pack import PackOptions, pack

    src = checkpoint_factory("qwen2_moe", seed=4, dims={"experts": 4, "top_k": 2, "hidden": 512,
                                                        "moe_intermediate": 1024, "layers": 2})
    out = tmp_path_factory.mktemp("big") / "m.zmoe"
    pack(src, out, PackOptions(threads=2))
    return out


def test_the_preload_teaches_the_cost_model_nothing(big_archive):
    """Every expert is queued at once and the process imports torch beside it: those rates are not the
    host's, and the drift watcher would write them into the calibration cache."""
    from zipmoe_run.tiers import CostModel

    path = big_archive
    cost = CostModel(read_bps=1e12, decode_bps=1e12)  # far from anything measured: any observation moves it
    with ArchiveSource(path, threads=2, cost=cost) as src:
        src.wait_preload()
        assert src.stats()["preloaded"] > 0
        assert (cost.read_bps, cost.decode_bps, cost.frozen) == (1e12, 1e12, False)


def test_load_returns_with_the_preload_done(archive):
    """What is left of the preload is part of loading (the benchmarks' load_s, TTFT and stats keep their
    meaning), though it ran beside the model build."""
    path, ref = archive
    with load(path, dtype="float32", threads=2) as lm:
        assert lm.source._preload_thread is None
        assert lm.source.stats()["preloaded"] == len(ref)
