"""The benchmark-only GGUF exporter (zipmoe.bench.gguf_export) and the llama.cpp peer (zipmoe.bench.llamacpp).

Always (needs only ``gguf``): every tensor of the GGUF holds exactly the source's bytes (BF16 copied;
norms, biases and routers as the exact F32 of the source; experts stacked; Mixtral's Q/K rows permuted as
llama.cpp's convert_hf_to_gguf.py does, written out here independently), under the names and with the
metadata llama.cpp expects, for qwen2_moe, mixtral and olmoe in both expert layouts; bad input is one
error naming the file or tensor, with no output left behind.

With ``llama_cpp`` importable: llama.cpp's greedy tokens on tiny qwen2_moe / mixtral / olmoe models equal
this runtime's float32 greedy tokens, its prompt logits are close to the runtime's float32 logits within
a stated tolerance (llama.cpp is another engine: see ``LOGIT_TOL``), and ``zipmoe bench run`` shows its row.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

FAMILIES = ("qwen2_moe", "mixtral", "olmoe")
DIMS = {"layers": 2, "experts": 4, "top_k": 2}
ARCH = {"qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe"}

# HF name (after "model.layers.N.") -> GGUF name (after "blk.N."), as llama.cpp's tensor_mapping.py has them
_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_F32 = ("attn_norm.weight", "ffn_norm.weight", "output_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight",
        "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias")
_WHICH = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def _permute(w: "torch.Tensor", n_head: int, n_head_kv: int | None) -> "torch.Tensor":
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim (llama-cpp-python 0.3.36's vendored llama.cpp)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _expected(ckpt) -> dict[str, tuple[str, bytes, tuple]]:
    """GGUF name -> (type, bytes, PyTorch-order shape), computed from the safetensors with torch."""
    from safetensors.torch import load_file

    cfg = json.loads((ckpt / "config.json").read_text())
    src: dict = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        src.update(load_file(f))
    llama = cfg["model_type"] == "mixtral"
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    out, stacks = {}, {}
    for name, t in src.items():
        parts = name.split(".")
        if name in _TOP:
            new = _TOP[name]
        elif parts[:2] == ["model", "layers"] and ".experts." in name:
            L = int(parts[2])
            if parts[-1] == "gate_up_proj":  # fused [E, 2I, H]
                i = t.shape[1] // 2
                out[f"blk.{L}.ffn_gate_exps.weight"] = t[:, :i].contiguous()
                out[f"blk.{L}.ffn_up_exps.weight"] = t[:, i:].contiguous()
                continue
            if parts[-1] == "down_proj":
                out[f"blk.{L}.ffn_down_exps.weight"] = t
                continue
            stacks.setdefault((L, _WHICH[parts[-2]]), {})[int(parts[-3])] = t
            continue
        else:
            new = f"blk.{parts[2]}." + _LAYER[".".join(parts[3:])]
        if llama and new.endswith(("attn_q.weight", "attn_q.bias")):
            t = _permute(t, nh, nh)
        if llama and new.endswith(("attn_k.weight", "attn_k.bias")):
            t = _permute(t, nh, nkv)
        out[new] = t
    for (L, which), by_e in stacks.items():
        out[f"blk.{L}.ffn_{which}_exps.weight"] = torch.stack([by_e[e] for e in sorted(by_e)])
    res = {}
    for new, t in out.items():
        f32 = new.split(".", 2)[-1] in _F32 or t.dim() <= 1
        t = t.float() if f32 else t
        raw = t.contiguous().view(torch.int32 if f32 else torch.int16).numpy().tobytes()
        res[new] = ("F32" if f32 else "BF16", raw, tuple(t.shape))
    return res


@pytest.fixture(scope="module")
def exported(checkpoint_factory, tmp_path_factory):
    from zipmoe.bench.gguf_export import export

    made = {}

    def make(family, layout="per-expert"):
        if (family, layout) not in made:
            ckpt = checkpoint_factory(family, layout=layout, dims=DIMS, seed=3, shards=2)
            out = tmp_path_factory.mktemp("gguf") / f"{family}-{layout}.gguf"
            export(ckpt, out)
            made[family, layout] = ckpt, out
        return made[family, layout]

    return make


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_byte_exact(exported, family, layout):
    ckpt, out = exported(family, layout)
    want = _expected(ckpt)
    r = gguf.GGUFReader(out)
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(want)
    for name, (typ, raw, shape) in want.items():
        t = got[name]
        assert t.tensor_type.name == typ, name
        assert tuple(int(x) for x in reversed(t.shape)) == shape, name  # GGUF lists dimensions innermost first
        assert t.data.tobytes() == raw, name
    # the Q/K permutation is not the identity here, so the test above would catch a missing one
    if family == "mixtral":
        from safetensors.torch import load_file

        q = {k: v for f in ckpt.glob("*.safetensors") for k, v in load_file(f).items()}["model.layers.0.self_attn.q_proj.weight"]
        assert got["blk.0.attn_q.weight"].data.tobytes() != q.view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata(exported, family):
    ckpt, out = exported(family)
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    r = gguf.GGUFReader(out)

    def val(key):
        return r.fields[key].contents()

    arch = ARCH[family]
    assert val("general.architecture") == arch
    assert val("general.file_type") == 32  # MOSTLY_BF16
    assert val(f"{arch}.block_count") == cfg["num_hidden_layers"]
    assert val(f"{arch}.embedding_length") == cfg["hidden_size"]
    assert val(f"{arch}.attention.head_count") == cfg["num_attention_heads"]
    assert val(f"{arch}.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert val(f"{arch}.expert_count") == DIMS["experts"]
    assert val(f"{arch}.expert_used_count") == DIMS["top_k"]
    assert val(f"{arch}.rope.freq_base") == pytest.approx(cfg["rope_theta"])
    assert val(f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)
    if family == "qwen2_moe":
        assert val(f"{arch}.expert_feed_forward_length") == cfg["moe_intermediate_size"]
        assert val(f"{arch}.expert_shared_feed_forward_length") == cfg["shared_expert_intermediate_size"]
    else:
        assert val(f"{arch}.feed_forward_length") == cfg["intermediate_size"]
    if family == "mixtral":
        assert val("llama.rope.dimension_count") == cfg["hidden_size"] // cfg["num_attention_heads"]
        assert val("llama.vocab_size") == cfg["vocab_size"]
    assert val("tokenizer.ggml.model") == "gpt2"
    tokens = val("tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"]
    for t, i in list(tok["model"]["vocab"].items())[:50]:
        assert tokens[i] == t
    assert len(val("tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    eos = json.loads((ckpt / "tokenizer_config.json").read_text())["eos_token"]
    assert tokens[val("tokenizer.ggml.eos_token_id")] == eos


def test_bad_input(checkpoint_factory, tmp_path):
    import shutil

    from zipmoe.bench.gguf_export import GGUFExportError, export

    src = checkpoint_factory("qwen2_moe", dims=DIMS, seed=3, shards=2)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    out = tmp_path / "m.gguf"
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 2  # the header lies about the size
    text = json.dumps(header).encode().ljust(n)
    if len(text) == n:
        shard.write_bytes(raw[:8] + text + raw[8 + n:])
        with pytest.raises(GGUFExportError, match=f"{shard.name}: tensor {name}: data_offsets"):
            export(ckpt, out)
        assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
    with pytest.raises(GGUFExportError, match="config.json: model_type 'deepseek_v3' not supported") as e:
        export(ckpt, out)
    assert "\n" not in str(e.value)
    (ckpt / "config.json").write_text('{"model_type": "qwen2_moe", "a": 1, "a": 2}')
    with pytest.raises(GGUFExportError, match="config.json: not valid JSON"):
        export(ckpt, out)
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))


def test_not_enough_disk_is_refused_before_writing(checkpoint_factory, tmp_path, monkeypatch):
    import collections

    import zipmoe.bench.gguf_export as ge

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ge.shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 40, 1 << 20))
    with pytest.raises(ge.GGUFExportError, match=r"needs \d+\.\d+ GB, 0\.00 GB free"):
        ge.export(checkpoint_factory("qwen2_moe", dims=DIMS, seed=3, shards=2), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_ensure_gguf_reuses_until_the_source_changes(checkpoint_factory, tmp_path):
    import shutil

    from zipmoe.bench.llamacpp import ensure_gguf

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_factory("olmoe", dims=DIMS, seed=3, shards=2), ckpt)
    out = tmp_path / "m.gguf"
    assert ensure_gguf(ckpt, out)["reused"] is False
    assert ensure_gguf(ckpt, out)["reused"] is True
    cfg = ckpt / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ensure_gguf(ckpt, out)["reused"] is False


# -- llama.cpp itself ---------------------------------------------------------------------------------------

# llama.cpp's CPU BF16 matrix product rounds the activations to BF16 before the dot product (ggml's
# vec_dot_type for BF16 weights), a relative error up to 2^-9 per input, where this runtime's float32 run
# keeps them in float32. Measured on these models: max |logit difference| 1.1e-3 to 1.8e-3 with logits of
# magnitude up to 0.56. The tolerance is 2 % of the largest |logit| (about 10x what was measured); a
# greedy token may differ only where this runtime's top two logits are closer than that (a near tie).
LOGIT_TOL = 0.02
PROMPT = [5, 17, 33, 70, 100, 7, 9, 200]
NEW = 8


def _llama_cpp():
    from zipmoe.bench.llamacpp import available

    why = available()
    if why:
        pytest.skip(why)
    import llama_cpp

    return llama_cpp


@pytest.mark.parametrize("family", FAMILIES)
def test_llamacpp_matches_runtime_float32(exported, family):
    llama_cpp = _llama_cpp()
    from zipmoe_run.api import load
    from zipmoe_run.generate import Sampling

    ckpt, out = exported(family)
    llm = llama_cpp.Llama(str(out), n_threads=1, n_ctx=256, use_mmap=True, verbose=False, logits_all=True)
    toks = []
    for t in llm.generate(PROMPT, top_k=1, temp=0.0):
        toks.append(int(t))
        if len(toks) == NEW:
            break
    ll_logits = np.array(llm.scores[:len(PROMPT) + NEW - 1])  # [positions, vocab]
    del llm
    lm = load(ckpt, dtype="float32", threads=1)
    try:
        ours = [e.token_id for e in lm.stream(PROMPT, max_new_tokens=NEW, sampling=Sampling(greedy=True))]
        seq = PROMPT + ours[:-1]
        with torch.no_grad():
            logits = lm.model(torch.tensor([seq]), lm.model.new_cache(1, len(seq) + 1), 0)[0].float().numpy()
    finally:
        lm.close()
    tol = LOGIT_TOL * float(np.abs(logits).max())
    n = len(PROMPT)  # prompt positions: both engines saw the same tokens
    assert np.abs(ll_logits[:n] - logits[:n]).max() <= tol
    first = next((i for i, (a, b) in enumerate(zip(toks, ours)) if a != b), None)
    if first is not None:  # allowed only at a near tie of this runtime's own logits
        top2 = np.sort(logits[n - 1 + first])[-2:]
        assert top2[1] - top2[0] <= tol, (first, toks, ours)
    else:
        assert toks == ours
        assert np.abs(ll_logits - logits).max() <= tol


def test_bench_run_llamacpp_row(checkpoint_factory, tmp_path):
    _llama_cpp()
    from zipmoe.bench.run import _weight_bytes_per_token, run

    ckpt = checkpoint_factory("qwen2_moe", dims=DIMS, seed=3, shards=2)
    r = run(ckpt, runs=1, new_tokens=4, prompt_tokens=5, threads=1, dtype="bfloat16", systems=("zipmoe", "llamacpp"),
            workdir=tmp_path, breakdown=False)
    ll = r["systems"]["llamacpp"]
    assert len(ll["tokens"]) == 4
    assert ll["implementation"]["llama_cpp"] == "0.3.36"
    wb = sum(_weight_bytes_per_token(json.loads((ckpt / "config.json").read_text()), 2).values())
    assert ll["effective_gb_s"] == pytest.approx(wb * ll["decode_tok_s"] / 1e9)
    agree = r["llamacpp_vs_zipmoe"]
    ours = r["systems"]["zipmoe"]["tokens"]
    want = next((i for i, (a, b) in enumerate(zip(ll["tokens"], ours)) if a != b), None)
    assert agree == {"same_tokens": want is None, "first_divergence": want}
    assert (tmp_path / "ckpt.bf16.gguf").is_file()  # kept in the workdir for the next run
    assert ll["peak_rss_bytes"] >= ll["anon_after_load_bytes"]


def test_bench_run_skips_llamacpp_with_a_reason(checkpoint_factory, monkeypatch):
    import zipmoe.bench.llamacpp as lc
    from zipmoe.bench.run import run

    monkeypatch.setattr(lc, "available", lambda: "llama_cpp not importable (test)")
    ckpt = checkpoint_factory("qwen2_moe", dims=DIMS, seed=3, shards=2)
    r = run(ckpt, runs=1, new_tokens=2, prompt_tokens=3, threads=1, dtype="bfloat16", systems=("zipmoe", "llamacpp"),
            breakdown=False)
    assert r["systems"]["llamacpp"] == {"skipped": "llama_cpp not importable (test)"}
    r = run(ckpt, runs=1, new_tokens=2, prompt_tokens=3, threads=1, dtype="float32", systems=("zipmoe", "llamacpp"),
            breakdown=False)
    assert r["systems"]["llamacpp"] == {"skipped": "runs a BF16 GGUF: --dtype bfloat16 only"}


def test_e2e_llamacpp_rows(tmp_path):
    """``zipmoe bench e2e --quick`` with llama.cpp: its rows run, in a cap of exactly dense + budget + its
    measured overhead when a cgroup can be made, and its tokens are compared with the resident run's."""
    _llama_cpp()
    from zipmoe.bench.e2e import E2EConfig, run

    cfg = E2EConfig(workdir=tmp_path, quick=True, budgets=(100.0,), systems=("llamacpp", "resident"),
                    prompt_tokens=6, new_tokens=4, warm_pass=False)
    r = run(cfg)
    over = r["llamacpp"]["overhead"]["overhead_bytes"]
    assert over == max(r["llamacpp"]["overhead"]["after_load_bytes"], r["llamacpp"]["overhead"]["after_generate_bytes"])
    row = next(x for x in r["rows"] if x["system"] == "llamacpp")
    assert row["ok"], row.get("error")
    assert len(row["tokens"]) == 4 and row["io_mode"] == "mmap (page cache)"
    if row["capped"]:
        assert row["cap_limit_bytes"] == r["model"]["dense_bytes"] + row["budget_bytes"] + over
    res = next(x for x in r["rows"] if x["system"] == "resident")
    line = next(t for t in r["targets"] if t["target"] == "llamacpp greedy tokens equal resident's")
    assert line["met"] == (row["tokens"] == res["tokens"])


def test_e2e_llamacpp_skipped_with_a_reason(tmp_path, monkeypatch):
    import zipmoe.bench.llamacpp as lc
    from zipmoe.bench.e2e import E2EConfig

    monkeypatch.setattr(lc, "available", lambda: "llama_cpp not importable (test)")
    cfg = E2EConfig(workdir=tmp_path, quick=True, systems=("zipmoe", "llamacpp"))
    prepared = lc.e2e_prepare(cfg, {})
    assert prepared == {"skipped": "llama_cpp not importable (test)"}
    assert lc.e2e_targets([], prepared) == [{"target": "llamacpp rows", "value": None, "met": False,
                                             "mark": "skipped", "note": "llama_cpp not importable (test)"}]
    cfg = E2EConfig(workdir=tmp_path, quick=True, systems=("zipmoe",))
    assert lc.e2e_prepare(cfg, {}) == {"skipped": "not requested"}
    assert lc.e2e_targets([], {"skipped": "not requested"}) == []


def test_llamacpp_peer_ignores_eos(checkpoint_factory, tmp_path):
    """The peer's greedy run does not stop at EOS: with the GGUF's EOS set to the second greedy token, it
    still returns all ``n`` tokens, the same ones."""
    _llama_cpp()
    import shutil

    from zipmoe.bench.llamacpp import LlamaCppPeer, ensure_gguf

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_factory("mixtral", dims=DIMS, seed=3, shards=2), ckpt)

    def tokens():
        out = ensure_gguf(ckpt, tmp_path / "m.gguf")["path"]
        peer = LlamaCppPeer(out, 1, 256, drop=False)
        try:
            return peer.generate(PROMPT, NEW)["tokens"]
        finally:
            peer.close()

    first = tokens()
    vocab = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    eos = next(t for t, i in vocab.items() if i == first[1])
    tc = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**tc, "eos_token": eos}))
    r = gguf.GGUFReader(ensure_gguf(ckpt, tmp_path / "m.gguf")["path"])
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == first[1]
    assert tokens() == first and len(first) == NEW


def test_vocab_from_slow_tokenizer_files(tmp_path):
    """Qwen1.5's hub folders ship vocab.json + merges.txt (no tokenizer.json): the real ones from
    ../shared become a 151,936-entry gpt2 vocabulary with the qwen2 pre-tokenizer and <|im_end|> as EOS."""
    import shutil

    from zipmoe.bench.gguf_vocab import write_vocab

    src = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "qwen1.5-moe-a2.7b-chat")
    if not os.path.isfile(os.path.join(src, "vocab.json")):
        pytest.skip("../shared/models/qwen1.5-moe-a2.7b-chat is not here")
    for f in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    cfg = json.loads((tmp_path / "config.json").read_text())
    w = gguf.GGUFWriter(tmp_path / "v.gguf", "qwen2moe")
    write_vocab(w, tmp_path, cfg)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    r = gguf.GGUFReader(tmp_path / "v.gguf")
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == cfg["vocab_size"] == 151936
    assert r.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert tokens[151645] == "<|im_end|>" and r.fields["tokenizer.ggml.eos_token_id"].contents() == 151645
    assert types[151643:151646] == [gguf.TokenType.CONTROL] * 3
    assert tokens[151700] == "[PAD151700]" and types[151700] == gguf.TokenType.UNUSED
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert all(tokens[i] == t for t, i in list(vocab.items())[::997])
    lines = [ln for ln in (tmp_path / "merges.txt").read_text().splitlines() if ln and not ln.startswith("#version")]
    assert r.fields["tokenizer.ggml.merges"].contents() == lines  # merges such as "# #" kept


def test_pre_tokenizer_names():
    from zipmoe.bench.gguf_vocab import pre_name

    qwen = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_name({"pre_tokenizer": qwen}, "qwen2_moe") == "qwen2"
    assert pre_name({"pre_tokenizer": byte_level}, "qwen2_moe") == "gpt-2"
    assert pre_name({"pre_tokenizer": byte_level}, "olmoe") == "olmo"
    assert pre_name({}, "qwen2_moe", "Qwen2Tokenizer") == "qwen2"
    assert pre_name({"pre_tokenizer": {"type": "Metaspace"}}, "mixtral") == "default"
