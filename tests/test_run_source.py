"""DirectorySource: the plain-checkpoint WeightSource (shards, index, fused slicing, errors)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from formats.errors import InputError
from zipmoe_pack.synth import make_checkpoint
from zipmoe_run.errors import MissingWeightError
from zipmoe_run.source import DirectorySource, WeightSource, first_present


@pytest.fixture(scope="module")
def pair(checkpoint_factory):
    """Same seed in both layouts: identical numbers, different tensor names."""
    per = checkpoint_factory("qwen2_moe", layout="per-expert", shards=3, seed=9)
    fused = checkpoint_factory("qwen2_moe", layout="fused", shards=1, seed=9)
    return per, fused


def test_protocol_and_dense(pair):
    per, _ = pair
    with DirectorySource(per) as src:
        assert isinstance(src, WeightSource)
        assert src.config["model_type"] == "qwen2_moe"
        emb = src.dense("model.embed_tokens.weight")
        assert emb.dtype == torch.bfloat16 and emb.shape == (src.config["vocab_size"], src.config["hidden_size"])
        assert src.has_dense("model.layers.0.mlp.gate.weight")
        assert not src.has_dense("model.layers.0.mlp.experts.0.gate_proj.weight")  # experts are not dense
        assert first_present(src, "nope.weight", "model.norm.weight") == "model.norm.weight"
        with pytest.raises(MissingWeightError, match="nope"):
            src.dense("nope")
        assert json.loads(src.file_bytes("generation_config.json"))
        assert src.file_bytes("missing.json") is None
        assert src.file_bytes("../config.json") is None


def test_fused_slices_equal_per_expert(pair):
    per, fused = pair
    with DirectorySource(per) as a, DirectorySource(fused) as b:
        experts = [5, 0, 3]
        got_a = dict(a.fetch(1, experts))
        got_b = dict(b.fetch(1, experts))
        assert set(got_a) == set(got_b) == set(experts)
        for e in experts:
            wa, wb = got_a[e], got_b[e]
            assert set(wa) == {"gate_proj", "up_proj", "down_proj"}
            assert set(wb) == {"gate_up_proj", "down_proj"}
            assert torch.equal(torch.cat([wa["gate_proj"], wa["up_proj"]]), wb["gate_up_proj"])
            assert torch.equal(wa["down_proj"], wb["down_proj"])
        st = a.stats()
        assert st["experts_fetched"] == 3 and st["bytes_read"] == sum(
            t.numel() * t.element_size() for w in got_a.values() for t in w.values())


def test_missing_expert_and_bad_dirs(pair, tmp_path):
    per, _ = pair
    with DirectorySource(per) as src:
        with pytest.raises(MissingWeightError, match="expert 99"):
            list(src.fetch(0, [99]))
    with pytest.raises(InputError, match="not a directory"):
        DirectorySource(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="config.json"):
        DirectorySource(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no safetensors"):
        DirectorySource(empty)


def test_index_listing_a_missing_shard(pair, tmp_path):
    per, _ = pair
    broken = tmp_path / "broken"
    shutil.copytree(per, broken)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(InputError, match="missing"):
        DirectorySource(broken)


def test_truncated_shard_is_an_input_error(tmp_path):
    src = make_checkpoint(tmp_path / "m", "mixtral", shards=1, seed=1)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(InputError, match="past the end"):
        DirectorySource(src)
