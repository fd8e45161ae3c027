"""zipmoe_pack.synth: hub-faithful synthetic checkpoints, checked against transformers 5 as the oracle."""
from __future__ import annotations

import hashlib
import json
import re
import struct

import pytest

from formats.names import parse_expert_name
from zipmoe_pack.synth import DEMO_SIZES, FAMILIES, build_config, main, make_checkpoint, make_from_index
from zipmoe_pack.synth_families import FUSED_FAMILIES, tensor_specs

LAYOUTS = [(f, "per-expert") for f in FAMILIES] + [(f, "fused") for f in FUSED_FAMILIES]
VARIANTS = {  # family-specific code paths: dense layers between sparse ones, MLA without q LoRA
    "qwen2_sparse_step": ("qwen2_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}),
    "deepseek_v2_no_q_lora": ("deepseek_v2", {"q_lora_rank": None}),
    "deepseek_v3_no_q_lora": ("deepseek_v3", {"q_lora_rank": None}),
}
PROMPT = ("The committee met on Thursday to discuss the budget. Which planet is closest to the sun? Mercury is "
          "the closest planet, and the sea is wide and deep.")


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def weight_files(d):
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return json.loads(idx.read_text())
    return None


def tensor_names_by_file(d):
    return {p.name: [k for k in header(p)[1] if k != "__metadata__"] for p in sorted(d.glob("*.safetensors"))}


def sha_all(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


# ------------------------------------------------------------------------------------ transformers oracle
_loaded: dict = {}


def load(path, family):
    """(model, loading_info), loaded once per checkpoint the way the project's parity tests load them."""
    if path not in _loaded:
        torch = pytest.importorskip("torch")
        tf = pytest.importorskip("transformers")
        cls = tf.AutoModelForSeq2SeqLM if family == "switch_transformers" else tf.AutoModelForCausalLM
        _loaded[path] = cls.from_pretrained(path, dtype=torch.float32, experts_implementation="eager",
                                            attn_implementation="eager", output_loading_info=True)
    return _loaded[path]


def forward(model, family, ids):
    import torch

    with torch.no_grad():
        if family == "switch_transformers":
            return model(input_ids=ids, decoder_input_ids=ids[:, :8]).logits
        return model(ids).logits


def prompt_ids(path, n=None):
    tf = pytest.importorskip("transformers")
    ids = tf.AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids
    return ids[:, :n] if n else ids


@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_transformers_loads_with_no_key_problems(checkpoint_factory, family, layout):
    import torch

    d = checkpoint_factory(family, layout=layout)
    model, info = load(d, family)
    assert {k: v for k, v in info.items() if v} == {}, info
    ids = prompt_ids(d)
    logits = forward(model, family, ids)
    assert logits.shape[-1] == json.loads((d / "config.json").read_text())["vocab_size"]
    assert torch.isfinite(logits).all()
    # what was loaded is what the files hold (fused tensors load as they are, no conversion)
    sd = model.state_dict()
    from safetensors.torch import load_file

    for p in d.glob("*.safetensors"):
        for name, t in load_file(p).items():
            if name in sd:
                assert torch.equal(sd[name], t.float()), name


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_load(checkpoint_factory, name):
    import torch

    family, overrides = VARIANTS[name]
    for layout in ("per-expert", "fused"):
        d = checkpoint_factory(family, layout=layout, config_overrides=overrides)
        model, info = load(d, family)
        assert {k: v for k, v in info.items() if v} == {}, info
        assert torch.isfinite(forward(model, family, prompt_ids(d))).all()
    if family == "qwen2_moe":
        names = {n for ns in tensor_names_by_file(d).values() for n in ns}
        assert {int(m) for n in names for m in re.findall(r"layers\.(\d+)\.mlp\.experts", n)} == {1}
        assert "model.layers.3.mlp.gate_proj.weight" in names
    else:
        assert "model.layers.1.self_attn.q_proj.weight" in {n for ns in tensor_names_by_file(d).values() for n in ns}


@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_names_and_shapes_are_what_transformers_saves(checkpoint_factory, family, layout, tmp_path):
    """transformers' own save_pretrained (original format for per-expert, state_dict names for fused)."""
    d = checkpoint_factory(family, layout=layout)
    model, _ = load(d, family)
    model.save_pretrained(tmp_path, save_original_format=layout == "per-expert")

    def shapes(dd):
        return {k: v["shape"] for p in dd.glob("*.safetensors") for k, v in header(p)[1].items() if k != "__metadata__"}

    ours, theirs = shapes(d), shapes(tmp_path)
    extra = set(ours) - set(theirs)
    # transformers 5 drops tied copies when saving; the real switch checkpoints keep them
    assert extra == ({"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
                     if family == "switch_transformers" else set())
    assert {k: ours[k] for k in theirs} == theirs


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_both_layouts_hold_the_same_model(checkpoint_factory, family):
    import torch

    a = load(checkpoint_factory(family, layout="per-expert"), family)[0].state_dict()
    b = load(checkpoint_factory(family, layout="fused"), family)[0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- file layout
@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_index_matches_shard_headers(checkpoint_factory, family, layout):
    d = checkpoint_factory(family, layout=layout)
    idx = weight_files(d)
    by_file = tensor_names_by_file(d)
    assert sorted(by_file) == [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)]
    assert idx["weight_map"] == {n: f for f, ns in by_file.items() for n in ns}
    assert list(idx["weight_map"]) == sorted(idx["weight_map"])
    total = 0
    for f in by_file:
        n, h = header(d / f)
        assert n % 8 == 0 and h["__metadata__"] == {"format": "pt"}
        offs = [v["data_offsets"] for k, v in h.items() if k != "__metadata__"]
        assert offs[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offs, offs[1:]))  # contiguous, in order
        assert (d / f).stat().st_size == 8 + n + offs[-1][1]
        total += offs[-1][1]
    assert idx["metadata"]["total_size"] == total
    assert any(ns != sorted(ns) for ns in by_file.values())  # hub order, not sorted
    # formats.names recognises exactly the routed experts
    cfg = json.loads((d / "config.json").read_text())
    assert any(parse_expert_name(n) for ns in by_file.values() for n in ns)
    assert not any(parse_expert_name(n) for ns in by_file.values() for n in ns
                   if re.search(r"shared_expert|\.gate\.|router|embed|lm_head|norm", n)), cfg["model_type"]


def _expert_groups(d):
    groups: dict = {}
    for f, ns in tensor_names_by_file(d).items():
        for n in ns:
            e = parse_expert_name(n)
            if e is not None:
                groups.setdefault((e.stack, e.layer), set()).add(f)
    return groups


@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_straddle_splits_a_layers_experts(checkpoint_factory, family, layout):
    assert any(len(fs) > 1 for fs in _expert_groups(checkpoint_factory(family, layout=layout)).values())


@pytest.mark.parametrize("family,layout", [("qwen2_moe", "per-expert"), ("mixtral", "fused"),
                                           ("switch_transformers", "per-expert")])
def test_no_straddle_keeps_layers_whole(checkpoint_factory, family, layout):
    d = checkpoint_factory(family, layout=layout, straddle=False, tokenizer=False)
    assert all(len(fs) == 1 for fs in _expert_groups(d).values())
    assert len(list(d.glob("*.safetensors"))) == 3


def test_single_shard_has_no_index(checkpoint_factory):
    d = checkpoint_factory("olmoe", shards=1, tokenizer=False)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    model, info = load(d, "olmoe")
    assert {k: v for k, v in info.items() if v} == {}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    for family in ("qwen2_moe", "switch_transformers"):
        a = sha_all(make_checkpoint(tmp_path / f"{family}-a", family))
        b = sha_all(make_checkpoint(tmp_path / f"{family}-b", family))
        c = sha_all(make_checkpoint(tmp_path / f"{family}-c", family, seed=1))
        assert a == b
        assert {k for k in a if a[k] != c[k]} == {k for k in a if k.endswith(".safetensors")}


def test_dims_and_dtype(checkpoint_factory):
    d = checkpoint_factory("qwen2_moe", dims={"hidden": 96, "experts": 6, "moe_intermediate": 40, "layers": 2,
                                              "heads": 6, "kv_heads": 2}, dtype="float16", shards=2)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"], cfg["torch_dtype"]) == \
        (96, 6, 40, "float16")
    _, h = header(next(d.glob("*.safetensors")))
    assert {v["dtype"] for k, v in h.items() if k != "__metadata__"} == {"F16"}
    shapes = {k: v["shape"] for p in d.glob("*.safetensors") for k, v in header(p)[1].items() if k != "__metadata__"}
    assert shapes["model.layers.1.mlp.experts.5.down_proj.weight"] == [96, 40]
    model, info = load(d, "qwen2_moe")
    assert {k: v for k, v in info.items() if v} == {}


def test_bad_arguments_leave_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="unknown dims key"):
        make_checkpoint(tmp_path / "a", "qwen2_moe", dims={"hiddn": 3})
    with pytest.raises(ValueError, match="too small"):  # fails after the weights were written
        make_checkpoint(tmp_path / "b", "qwen2_moe", dims={"vocab": 200})
    with pytest.raises(ValueError, match="fused"):
        make_checkpoint(tmp_path / "c", "switch_transformers", layout="fused")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    with pytest.raises(FileExistsError):
        make_checkpoint(tmp_path / "d", "olmoe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# ------------------------------------------------------------------------------------------------ routing
def _router_logits(model, family, ids):
    """Router logits of every MoE layer for ``ids`` (captured with forward hooks)."""
    import torch

    got = []
    mods = [m for n, m in model.named_modules() if n.endswith(("mlp.gate", "mlp.router"))]
    hooks = [m.register_forward_hook(lambda m, i, o: got.append(o[-1] if family == "switch_transformers" else o[0]))
             for m in mods]
    try:
        forward(model, family, ids)
    finally:
        for h in hooks:
            h.remove()
    return [g.reshape(-1, g.shape[-1]).float() for g in got], torch


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "switch_transformers"])
def test_peaky_router_has_clear_top_k_margins(checkpoint_factory, family):
    def margins(peaky):
        d = checkpoint_factory(family, peaky_router=peaky)
        model, _ = load(d, family)
        k = json.loads((d / "config.json").read_text()).get("num_experts_per_tok", 1)
        logits, torch = _router_logits(model, family, prompt_ids(d))
        top = torch.cat([lg.topk(k + 1, dim=-1).values for lg in logits])
        return top[:, k - 1] - top[:, k]

    peaky, flat = margins(True), margins(False)
    assert peaky.min() > 5e-4  # >> float32 noise (~1e-5) in logits of magnitude ~20
    assert peaky.median() > 10 * flat.median()


def test_switch_capacity_overflows_on_a_40_token_prompt(checkpoint_factory):
    d = checkpoint_factory("switch_transformers")
    model, _ = load(d, "switch_transformers")
    ids = prompt_ids(d, 40)
    assert ids.shape[1] == 40
    logits, torch = _router_logits(model, "switch_transformers", ids)
    cap = json.loads((d / "config.json").read_text())["expert_capacity"]
    enc = logits[: len(logits) // 2 or 1]  # encoder stack runs first
    assert any(torch.bincount(lg.argmax(-1)).max() > cap for lg in enc)


# ---------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_files(checkpoint_factory, family):
    from tokenizers import Tokenizer

    d = checkpoint_factory(family)
    cfg = json.loads((d / "config.json").read_text())
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert 400 <= tok.get_vocab_size() <= cfg["vocab_size"]
    assert tok.token_to_id(tcfg["eos_token"]) == cfg["eos_token_id"]
    smap = json.loads((d / "special_tokens_map.json").read_text())
    assert smap["eos_token"] == tcfg["eos_token"]
    enc = tok.encode(PROMPT)
    assert max(enc.ids) < cfg["vocab_size"] and tok.decode(enc.ids).strip() == PROMPT
    if family in ("mixtral", "deepseek_v2", "deepseek_v3"):
        assert enc.ids[0] == cfg["bos_token_id"] == tok.token_to_id(tcfg["bos_token"])
    if family == "switch_transformers":
        assert (cfg["pad_token_id"], cfg["eos_token_id"], enc.ids[-1]) == (0, 1, 1)
    else:
        tf = pytest.importorskip("transformers")
        chat = tf.AutoTokenizer.from_pretrained(d).apply_chat_template(
            [{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True)
        assert "Hello!" in chat


# ------------------------------------------------------------------------------------------- from an index
REAL = {"qwen1.5-moe-a2.7b-chat": "qwen2_moe", "switch-large-128": "switch_transformers"}


@pytest.mark.parametrize("model", sorted(REAL))
def test_make_from_index_reproduces_the_real_layout(shared_dir, tmp_path, model):
    src = shared_dir / "models" / model
    d = make_from_index(src, tmp_path / "ck", scale=1 / 64)
    real = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    ours = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert list(ours.items()) == list(real.items())
    by_file = tensor_names_by_file(d)
    assert sorted(by_file) == sorted(set(real.values()))
    for f, names in by_file.items():  # per-shard order: the index's order for that shard
        assert names == [n for n, g in real.items() if g == f]
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors.index.json"):
            assert (d / f.name).read_bytes() == f.read_bytes()
    rc, sc = json.loads((src / "config.json").read_text()), json.loads((d / "config.json").read_text())
    assert rc.keys() == sc.keys() and rc["vocab_size"] == sc["vocab_size"]
    hid = "d_model" if model.startswith("switch") else "hidden_size"
    assert sc[hid] == rc[hid] // 64


@pytest.mark.parametrize("model", sorted(REAL))
def test_make_from_index_first_layers_load_in_transformers(shared_dir, tmp_path, model):
    src = shared_dir / "models" / model
    d = make_from_index(src, tmp_path / "ck", scale=1 / 32, max_layers=2)
    real = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    ours = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    keep = [n for n in real if not re.match(r"(model\.layers|(en|de)coder\.block)\.([2-9]|\d\d)\.", n)]
    assert list(ours) == keep and all(ours[n] == real[n] for n in keep)
    assert sorted(p.name for p in d.glob("*.safetensors")) == sorted(set(ours.values()))
    model_, info = load(d, REAL[model])
    assert {k: v for k, v in info.items() if v} == {}
    import torch

    assert torch.isfinite(forward(model_, REAL[model], torch.tensor([[5, 100, 2000, 30000, 7, 9, 11, 13]]))).all()


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli(tmp_path, capsys):
    assert main(["mixtral", str(tmp_path / "m"), "--layout", "fused", "--shards", "2",
                 "--dims", "hidden=32,experts=4,layers=2", "--set", "rope_theta=5000.0"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_local_experts"], cfg["rope_theta"]) == (32, 4, 5000.0)
    assert len(list((tmp_path / "m").glob("model-*-of-00002.safetensors"))) == 2
    assert main(["demo", str(tmp_path / "demo"), "--size", "small"]) == 0
    assert json.loads((tmp_path / "demo" / "config.json").read_text())["model_type"] == "qwen2_moe"
    capsys.readouterr()
    for bad in (["qwen3_moe", str(tmp_path / "bad"), "--dims", "experts=2,top_k=3"],
                ["qwen3_moe", str(tmp_path / "bad"), "--dims", "hidden"],
                ["qwen3_moe", str(tmp_path / "bad"), "--set", "hidden_size=wide"],
                ["from-index", str(tmp_path / "bad"), "--src", str(tmp_path / "nowhere")]):
        assert main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and not (tmp_path / "bad").exists(), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "m"]


def test_demo_sizes():
    def expert_bytes(size):
        specs = tensor_specs("qwen2_moe", build_config("qwen2_moe", dims=DEMO_SIZES[size]))
        return sum(s.numel * 2 for s in specs if s.group is not None)

    assert 100e6 <= expert_bytes("demo") <= 200e6
    cfg = build_config("qwen2_moe", dims=DEMO_SIZES["qwen1.5"])
    assert (cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["num_experts_per_tok"]) == \
        (2048, 1408, 60, 4)
    assert 1.9e9 <= expert_bytes("qwen1.5") <= 2.2e9
