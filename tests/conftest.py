"""Shared fixtures: synthetic checkpoints (generated once per session) and the ../shared data directory."""
from __future__ import annotations

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def shared_dir():
    """``../shared`` next to the repository (real model metadata, traces); skips the test when absent."""
    d = REPO.parent / "shared"
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    return d
