"""Pack then unpack gives byte-identical files for every family and layout, the real hub layouts of
../shared, and non-BF16 experts (FP8 + scale_inv, MXFP4 blocks/scales), which are stored as they are."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from formats.decoder import ParallelDecoder
from formats.names import parse_expert_name
from formats.reader import Archive
from formats.restore import unpack, verify
from tests.stfile import write_config, write_st
from zipmoe_pack.pack import PackOptions, pack
from zipmoe_pack.synth import make_from_index
from zipmoe_pack.synth_families import FAMILIES, FUSED_FAMILIES

CASES = [(f, "per-expert") for f in FAMILIES] + [(f, "fused") for f in FUSED_FAMILIES]


def sha_tree(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def roundtrip(src: Path, tmp: Path, **opts) -> Archive:
    arc = tmp / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=4096, **opts))
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        verify(ar, dec, source=src)
        unpack(ar, dec, tmp / "out")
    assert sha_tree(tmp / "out") == sha_tree(src)
    return Archive(arc)


@pytest.mark.parametrize("family, layout", CASES, ids=[f"{f}-{l}" for f, l in CASES])
def test_family_roundtrip(checkpoint_factory, tmp_path, family, layout):
    src = checkpoint_factory(family, layout=layout, shards=3)
    ar = roundtrip(src, tmp_path)
    names = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    experts = {n for n in names if parse_expert_name(n)}
    assert experts and {t.name for t in ar.index.tensors.values() if t.role == "expert"} == experts
    assert all(p.encoding == "bf16-split" for e in ar.index.experts for p in e.parts)
    ar.close()


def test_single_file_checkpoint_and_raw_option(checkpoint_factory, tmp_path):
    src = checkpoint_factory("qwen2_moe", shards=1)
    assert (src / "model.safetensors").exists() and not (src / "model.safetensors.index.json").exists()
    ar = roundtrip(src, tmp_path, raw=True)
    assert all(p.encoding == "raw" for e in ar.index.experts for p in e.parts)
    ar.close()


@pytest.mark.parametrize("model", ["qwen1.5-moe-a2.7b-chat", "switch-large-128"])
def test_real_hub_layout(shared_dir, tmp_path, model):
    real = shared_dir / "models" / model
    src = make_from_index(real, tmp_path / "src", max_layers=2)
    ar = roundtrip(src, tmp_path)
    real_names = json.loads((real / "model.safetensors.index.json").read_text())["weight_map"]
    kept = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(kept) <= set(real_names)
    want = {n for n in kept if parse_expert_name(n)}
    assert {t.name for t in ar.index.tensors.values() if t.role == "expert"} == want
    ar.close()


def test_every_real_expert_name_recognised(shared_dir):
    counts = {}
    for model in ("qwen1.5-moe-a2.7b-chat", "switch-large-128"):
        names = json.loads((shared_dir / "models" / model / "model.safetensors.index.json").read_text())["weight_map"]
        counts[model] = sum(1 for n in names if parse_expert_name(n))
        assert not [n for n in names if "experts." in n and not parse_expert_name(n)]
    assert counts == {"qwen1.5-moe-a2.7b-chat": 24 * 60 * 3, "switch-large-128": (12 + 12) * 128 * 2}


def test_non_bf16_experts_stored_as_they_are(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "src"
    d.mkdir()
    write_config(d, "deepseek_v3")
    t = [("model.embed_tokens.weight", "BF16", [4, 8], rng.integers(0, 1 << 16, 32, np.uint16).tobytes())]
    for e in range(2):
        for p in ("gate_proj", "up_proj", "down_proj"):
            base = f"model.layers.1.mlp.experts.{e}.{p}"
            t.append((f"{base}.weight", "F8_E4M3", [256, 128], rng.integers(0, 256, 256 * 128, np.uint8).tobytes()))
            t.append((f"{base}.weight_scale_inv", "F32", [2, 1], rng.random(2, dtype=np.float32).tobytes()))
    t.append(("model.layers.2.mlp.experts.gate_up_proj_blocks", "U8", [2, 16, 4, 16],
              rng.integers(0, 256, 2 * 16 * 64, np.uint8).tobytes()))
    t.append(("model.layers.2.mlp.experts.gate_up_proj_scales", "U8", [2, 16, 4], bytes(range(128))))
    t.append(("model.layers.2.mlp.experts.down_proj", "F16", [2, 8, 8], rng.integers(0, 1 << 16, 128, np.uint16).tobytes()))
    write_st(d / "model.safetensors", t)
    ar = roundtrip(d, tmp_path)
    parts = [p for e in ar.index.experts for p in e.parts]
    assert len(parts) == 2 * 6 + 2 * 3 and all(p.encoding == "raw" for p in parts)
    assert {p.dtype for p in parts} == {"F8_E4M3", "F32", "U8", "F16"}
    ar.close()
