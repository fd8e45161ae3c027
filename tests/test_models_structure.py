"""Model code structure: every decoder family on the shared skeleton and the runtime's kernels;
no family reaches into another module's private helpers."""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

import zipmoe_run.models._decoder as decoder
import zipmoe_run.models.switch_transformers as switch
from zipmoe_run.layers import Linear
from zipmoe_run.models import SUPPORTED, build_model
from zipmoe_run.source import DirectorySource

DECODERS = [f for f in SUPPORTED if f != "switch_transformers"]
MODELS = Path(decoder.__file__).parent


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_families_share_the_skeleton_and_kernels(family, checkpoint_factory, monkeypatch):
    src = checkpoint_factory(family, seed=2, dims={"experts": 8, "top_k": 2, "layers": 2})
    model = build_model(DirectorySource(src), torch.bfloat16)
    assert isinstance(model, decoder.DecoderLM)
    assert all(isinstance(layer, decoder.MoEDecoderLayer) for layer in model.model.layers)
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, Linear)]
    assert not plain, f"projections outside the runtime's kernels: {plain[:3]}"

    scopes = []
    real = decoder.single_row_scope

    @contextlib.contextmanager
    def spy(active):
        scopes.append(active)
        with real(active):
            yield

    monkeypatch.setattr(decoder, "single_row_scope", spy)
    cache = model.new_cache(1, 4)
    model(torch.tensor([[1, 2]]), cache, 0)
    model(torch.tensor([[3]]), cache, 2)
    assert scopes == [False, True]  # the one-token bf16 step runs numba's threads, torch on one


def _private_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            for a in node.names:
                # a package's own private modules (._decoder, ._config) are fine; private names are not
                if a.name.startswith("_") and a.name != "annotations":
                    out.append(f"{mod}.{a.name}")
    return out


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.py")), ids=lambda p: p.name)
def test_no_private_helpers_imported(path):
    assert _private_imports(path) == []


def test_switch_uses_the_kernels(checkpoint_factory, monkeypatch):
    src = checkpoint_factory("switch_transformers", seed=2, dims={"experts": 4})
    model = build_model(DirectorySource(src), torch.bfloat16)
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, Linear)]
    assert not plain, f"projections outside the runtime's kernels: {plain[:3]}"
    scopes = []
    real = switch.single_row_scope

    @contextlib.contextmanager
    def spy(active):
        scopes.append(active)
        with real(active):
            yield

    monkeypatch.setattr(switch, "single_row_scope", spy)
    cache = model.new_cache(model.encode(torch.tensor([[5, 6, 7]])), 4)
    model.decode(torch.tensor([[0]]), cache, 0)
    assert scopes == [True]
