"""Start-up: the model skeleton is built without parameter initialisers (every weight comes from the
checkpoint), so building a model neither runs torch.nn.init nor imports torch._dynamo (which torch's
``normal_`` pulls in on the meta device: about a second of start-up)."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from zipmoe_run.models import SUPPORTED, build_model
from zipmoe_run.source import DirectorySource

def _dims(family: str) -> dict:  # the dims test_models_structure uses (switch_transformers routes top-1)
    return {"experts": 4} if family == "switch_transformers" else {"experts": 8, "top_k": 2, "layers": 2}

_CHILD = """
import sys
import torch
from zipmoe_run.models import build_model
from zipmoe_run.source import DirectorySource
assert "torch._dynamo" not in sys.modules, "imported before the build"
src = DirectorySource(sys.argv[1])
model = build_model(src, torch.bfloat16)
assert not any(p.is_meta for p in model.parameters()), "a parameter was left unbound"
print("dynamo" if "torch._dynamo" in sys.modules else "no-dynamo")
"""


@pytest.mark.parametrize("family", ["qwen2_moe", "switch_transformers"])
def test_build_does_not_import_dynamo(family, checkpoint_factory):
    src = checkpoint_factory(family, seed=2, dims=_dims(family))
    res = subprocess.run([sys.executable, "-c", _CHILD, str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "no-dynamo"


@pytest.mark.parametrize("family", SUPPORTED)
def test_build_runs_no_initialiser(family, checkpoint_factory, monkeypatch):
    src = DirectorySource(checkpoint_factory(family, seed=2, dims=_dims(family)))
    called: list[str] = []

    def forbid(name):
        def init(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"torch.nn.init.{name} ran while building the model")
        return init

    names = [n for n, f in vars(nn.init).items() if inspect.isfunction(f) and n.endswith("_") and not n.startswith("_")]
    assert {"normal_", "kaiming_uniform_", "uniform_"} <= set(names)
    for n in names:
        monkeypatch.setattr(nn.init, n, forbid(n))
    for n in ("normal_", "uniform_"):  # the tensor methods the initialisers end in
        monkeypatch.setattr(torch.Tensor, n, forbid(f"Tensor.{n}"))
    model = build_model(src, torch.bfloat16)
    assert called == []
    # every parameter is the checkpoint's tensor (bound, not initialised)
    for name, p in model.named_parameters():
        assert not p.is_meta, name


_KERNEL_CHILD = """
import zipmoe_run.kernels as k
assert k.enabled(), "kernel unavailable"
"""


def test_gemv_kernel_loads_from_numba_disk_cache():
    """A second process loads the compiled GEMV from numba's on-disk cache instead of compiling it."""
    env = {**os.environ, "NUMBA_DEBUG_CACHE": "1"}
    env.pop("ZIPMOE_RUN_KERNELS", None)
    logs = []
    for _ in range(2):  # the first run may compile (a new kernels.py); the second must not
        res = subprocess.run([sys.executable, "-c", _KERNEL_CHILD], capture_output=True, text=True, timeout=300,
                             env=env)
        assert res.returncode == 0, res.stderr
        logs.append(res.stdout + res.stderr)
    loaded = [ln for ln in logs[1].splitlines() if "data loaded" in ln and "_gemv_kernel" in ln]
    assert loaded, logs[1][-2000:]
    assert not [ln for ln in logs[1].splitlines() if "data saved" in ln and "_gemv_kernel" in ln]


def test_package_version_is_looked_up_once(monkeypatch):
    """A run asks for the package version three times (the store's calibration key and the kernel
    choice's); importlib.metadata scans the path each time (about 5 ms), so it is looked up once."""
    import importlib.metadata

    from zipmoe_run import calibrate

    calls: list[str] = []

    def version(name):
        calls.append(name)
        return "9.9.9"

    monkeypatch.setattr(importlib.metadata, "version", version)
    calibrate.package_version.cache_clear()
    try:
        got = [calibrate.package_version() for _ in range(3)]
        key = calibrate.host_key({"cpu": "x", "isa": [], "cores": 2, "machine": "m"})
    finally:
        calibrate.package_version.cache_clear()
    assert got == ["9.9.9"] * 3 and key["version"] == "9.9.9"
    assert calls == ["zipmoe"]
