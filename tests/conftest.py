"""Shared fixtures: synthetic checkpoints (generated once per session) and the ../shared data directory."""
from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Self-calibration and `zipmoe bench io` write into the user's cache directory: the suite (and the child
# processes it starts) gets a private one instead, measured once per session, never ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="zipmoe-test-cache-")
os.environ["ZIPMOE_CACHE_DIR"] = _CACHE
os.environ.pop("ZIPMOE_CALIBRATION", None)
atexit.register(shutil.rmtree, _CACHE, True)


def _freeze(x):
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``make(family, **make_checkpoint_kwargs) -> Path``, generated once per argument set. Treat the
    returned directory as read-only: other tests get the same one."""
    from zipmoe_pack.synth import make_checkpoint

    made: dict = {}

    def make(family, **kwargs):
        key = (family, _freeze(kwargs))
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp(family) / "ckpt", family, **kwargs)
        return made[key]

    return make


#: the small qwen2_moe the store tests share (8 experts, 2 layers)
STORE_DIMS = {"experts": 8, "top_k": 2, "hidden": 256, "moe_intermediate": 512, "layers": 2}


@pytest.fixture(scope="session")
def store_archive(checkpoint_factory, tmp_path_factory):
    """``make(seed, codec=None) -> (archive path, {expert key: decoded bytes})``: the STORE_DIMS qwen2_moe
    packed once per seed and codec (chunks of 8192 elements; the packer's default codec unless named)
    and every expert decoded by the archive itself."""
    from formats.decoder import ParallelDecoder
    from formats.reader import Archive
    from zipmoe_pack.pack import PackOptions, pack

    made: dict = {}

    def make(seed: int, codec: str | None = None):
        if (seed, codec) not in made:
            src = checkpoint_factory("qwen2_moe", seed=seed, dims=STORE_DIMS, peaky_router=False)
            out = tmp_path_factory.mktemp(f"store{seed}") / "m.zmoe"
            opts = PackOptions(threads=2, chunk_elements=8192, **({"codec": codec} if codec else {}))
            pack(src, out, opts)
            with Archive(out) as ar, ParallelDecoder(2) as dec:
                ref = {e.key: ar.decode_extent(e, dec).copy() for e in ar.index.experts}
            made[(seed, codec)] = (out, ref)
        return made[(seed, codec)]

    return make


FAULTS_DIMS = {"experts": 8, "top_k": 2, "hidden": 128, "moe_intermediate": 256, "layers": 2}


@pytest.fixture(scope="session")
def faults_archive(checkpoint_factory, tmp_path_factory):
    """A small qwen2_moe archive with many chunks per expert (4096 elements each): the store's fault and
    read-piece tests."""
    from zipmoe_pack.pack import PackOptions, pack

    src = checkpoint_factory("qwen2_moe", seed=3, dims=FAULTS_DIMS, peaky_router=False)
    out = tmp_path_factory.mktemp("faults") / "m.zmoe"
    pack(src, out, PackOptions(threads=2, chunk_elements=4096))
    return out


@pytest.fixture(scope="session")
def shared_dir():
    """``../shared`` next to the repository (real model metadata, traces); skips the test when absent."""
    d = REPO.parent / "shared"
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    return d
