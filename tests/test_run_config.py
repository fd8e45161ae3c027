"""config.json is untrusted: a bad value is one InputError line naming config.json and the key."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from formats.errors import InputError
from zipmoe_pack.synth import build_config
from zipmoe_run.api import load
from zipmoe_run.models import SUPPORTED, build_model
from zipmoe_run.source import DirectorySource

DECODERS = [f for f in SUPPORTED if f != "switch_transformers"]


class ConfigOnly:
    """A source with a config and no weights: validation must stop before any weight is asked for."""

    config_name = "ckpt/config.json"

    def __init__(self, cfg):
        self.config = cfg

    def has_dense(self, name):
        raise AssertionError(f"asked for {name} before the config was checked")

    dense = fetch = file_bytes = has_dense


def _reject(cfg, key):
    with pytest.raises(InputError) as ei:
        build_model(ConfigOnly(cfg), torch.float32)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("ckpt/config.json: ") and key in msg, msg
    return msg


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("value", [-64, 0, 10**12, "2048", 2048.0, True, None, [2048]])
def test_bad_hidden_size(family, value):
    cfg = {**build_config(family), "hidden_size": value}
    _reject(cfg, "hidden_size")


@pytest.mark.parametrize("family", DECODERS)
def test_missing_key(family):
    cfg = build_config(family)
    del cfg["num_hidden_layers"]
    assert "missing key num_hidden_layers" in _reject(cfg, "num_hidden_layers")


@pytest.mark.parametrize("family,key", [("qwen2_moe", "num_experts"), ("qwen3_moe", "num_experts"),
                                        ("olmoe", "num_experts"), ("mixtral", "num_local_experts"),
                                        ("deepseek_v2", "n_routed_experts"), ("deepseek_v3", "n_routed_experts")])
def test_top_k_above_expert_count(family, key):
    cfg = build_config(family)
    cfg["num_experts_per_tok"] = cfg[key] + 1
    _reject(cfg, "num_experts_per_tok")


@pytest.mark.parametrize("edit,key", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"hidden_act": 5}, "hidden_act"),
    ({"mlp_only_layers": "0,1"}, "mlp_only_layers"),
    ({"mlp_only_layers": [0, "1"]}, "mlp_only_layers"),
    ({"rope_scaling": [1, 2]}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "rope_scaling.factor"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"moe_intermediate_size": -1408}, "moe_intermediate_size"),
    ({"head_dim": 1 << 30}, "head_dim"),
])
def test_bad_values_qwen2(edit, key):
    _reject({**build_config("qwen2_moe"), **edit}, key)


@pytest.mark.parametrize("edit,key", [({"d_model": -64}, "d_model"), ({"num_heads": "12"}, "num_heads"),
                                      ({"num_experts": -1}, "num_experts"),
                                      ({"expert_capacity": 1.5}, "expert_capacity"),
                                      ({"num_layers": 0}, "num_layers")])
def test_bad_values_switch(edit, key):
    _reject({**build_config("switch_transformers"), **edit}, key)


def test_switch_needs_its_keys():
    cfg = build_config("switch_transformers")
    del cfg["d_model"]
    _reject(cfg, "d_model")


def test_deepseek_latent_sizes():
    _reject({**build_config("deepseek_v2"), "kv_lora_rank": -512}, "kv_lora_rank")
    _reject({**build_config("deepseek_v3"), "qk_rope_head_dim": 0}, "qk_rope_head_dim")


@pytest.mark.parametrize("text,why", [
    ("[" * 100_000 + "]" * 100_000, "nest"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "digits"),
    ('{"hidden_size": 64, "hidden_size": 128}', "duplicate"),
    ("[1, 2]", "object"),
    ('{"hidden_size": NaN}', "NaN"),
])
def test_hostile_config_json_in_a_folder(checkpoint_factory, tmp_path, text, why):
    src = checkpoint_factory("qwen2_moe", seed=1, dims={"experts": 4, "top_k": 2, "layers": 1})
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    (d / "config.json").write_text(text)
    with pytest.raises(InputError) as ei:
        load(d, dtype="float32")
    msg = str(ei.value)
    assert "\n" not in msg and "config.json" in msg and why.lower() in msg.lower(), msg


def test_load_rejects_negative_hidden_size(checkpoint_factory, tmp_path):
    src = checkpoint_factory("qwen2_moe", seed=1, dims={"experts": 4, "top_k": 2, "layers": 1})
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": -64}))
    with pytest.raises(InputError, match=r"config\.json: hidden_size must be in 1\.\.\d+ \(got -64\)$"):
        load(d, dtype="float32")


def test_valid_configs_still_build(checkpoint_factory):
    src = checkpoint_factory("qwen2_moe", seed=1, dims={"experts": 4, "top_k": 2, "layers": 1})
    with DirectorySource(src) as s:
        assert build_model(s, torch.float32) is not None


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n:])


@pytest.mark.parametrize("what", ["shape", "negative", "float"])
def test_safetensors_header_that_lies(checkpoint_factory, tmp_path, what):
    src = checkpoint_factory("qwen2_moe", seed=1, dims={"experts": 4, "top_k": 2, "layers": 1})
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    shard = sorted(d.glob("*.safetensors"))[0]

    def edit(h):
        name = next(k for k in h if k != "__metadata__")
        if what == "shape":
            h[name]["shape"] = [h[name]["shape"][0] * 2, *h[name]["shape"][1:]]
        elif what == "negative":
            h[name]["shape"] = [-1, *h[name]["shape"][1:]]
        else:
            h[name]["data_offsets"] = [float(v) for v in h[name]["data_offsets"]]

    _rewrite_header(shard, edit)
    with pytest.raises(InputError, match=shard.name):
        DirectorySource(d)


def test_weight_map_cannot_leave_the_folder(checkpoint_factory, tmp_path):
    src = checkpoint_factory("qwen2_moe", seed=1, dims={"experts": 4, "top_k": 2, "layers": 1}, shards=2)
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["x"] = "../../etc/passwd"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(InputError, match="outside"):
        DirectorySource(d)


@pytest.mark.parametrize("threads", [100_000, 0, -1, 2.5])
def test_absurd_thread_counts_are_refused(checkpoint_factory, threads):
    """In a child process: before the check, torch's pool died with SIGSEGV at 100,000 threads."""
    import subprocess
    import sys
    from pathlib import Path

    src = checkpoint_factory("qwen2_moe", seed=1, dims={"experts": 4, "top_k": 2, "layers": 1})
    code = ("import sys\nfrom formats.errors import ZmoeError\nfrom zipmoe_run.api import load\n"
            f"try:\n    load(sys.argv[1], threads={threads!r})\nexcept ZmoeError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(src)], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"threads must be an integer in 1..1024 (got {threads!r})"


@pytest.mark.parametrize("family,cls", [("qwen2_moe", "Qwen2MoeConfig"), ("qwen3_moe", "Qwen3MoeConfig"),
                                        ("olmoe", "OlmoeConfig"), ("mixtral", "MixtralConfig"),
                                        ("deepseek_v3", "DeepseekV3Config"),
                                        ("switch_transformers", "SwitchTransformersConfig")])
def test_transformers_default_configs_pass(family, cls):
    """No false rejections: every key of transformers' own config.json passes the checks."""
    from zipmoe_run.models import get_model_module
    from zipmoe_run.models._config import check_args, check_config

    transformers = pytest.importorskip("transformers")
    cfg = json.loads(getattr(transformers, cls)().to_json_string())
    mod = get_model_module(family)
    check_config(mod.ModelArgs, cfg, "config.json")
    check_args(mod.ModelArgs.from_dict(cfg), "config.json")


@pytest.mark.parametrize("rope,key", [({"rope_type": "linear"}, "factor"),
                                      ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
                                       "high_freq_factor"),
                                      ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 1.0}, "high_freq_factor")])
def test_rope_settings_that_cannot_work(rope, key):
    _reject({**build_config("qwen3_moe"), "rope_scaling": rope}, f"rope_scaling.{key}")
