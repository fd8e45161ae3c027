"""`zipmoe bench e2e --depth full` (preparation, disk check, manifest) and `--routing replay:FILE.npy`
(zipmoe.bench.routing, zipmoe_run.routing_replay). Offline and small: the "full" checkpoint here is a tiny
qwen2_moe source (or the real config at a small scale when ../shared is there); the real 28.6 GB run is
not part of the suite. No timing is asserted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from zipmoe.bench.cli import app
from zipmoe.bench.e2e import E2EConfig, QUICK_DIMS, run
from zipmoe.bench.e2e_full import prepare_full
from zipmoe.bench.e2e_full_gen import CHUNK, POOL_ELEMENTS, _Offsets, _pool, full_spec
from zipmoe.bench.errors import BenchInputError
from zipmoe.bench.routing import LABEL, build_plan
from zipmoe_run.api import load
from zipmoe_run.errors import GenerationError
from zipmoe_run.generate import Sampling
from zipmoe_run.routing_replay import ReplayPlan, install_replay, uninstall_replay

TINY = {"experts": 8, "top_k": 2, "hidden": 64, "moe_intermediate": 32, "layers": 2, "vocab": 512, "heads": 4,
        "kv_heads": 4, "intermediate": 64, "shared_intermediate": 64}


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A qwen2_moe 'source' folder (config.json, model.safetensors.index.json, tokenizer): what --depth full
    reads from ../shared, at a few MB."""
    from zipmoe_pack.synth import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("src") / "src", "qwen2_moe", dims=TINY, shards=2, seed=3)


def _trace(path, prompts=6, layers=2, experts=8, k=2, tokens=9, seed=0):
    """A routing trace [prompts, layers, experts] (int16 counts) from random top-k choices."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((prompts, layers, experts), np.int16)
    for p in range(prompts):
        for layer in range(layers):
            for _ in range(tokens):
                # skewed, like a real router within a prompt
                pick = rng.choice(experts, size=k, replace=False, p=np.linspace(1, 3, experts) / np.linspace(1, 3, experts).sum())
                counts[p, layer, pick] += 1
    np.save(path, counts)
    return path


# -- disk space and manifest ------------------------------------------------------------------------------


def test_disk_refusal_writes_nothing(tiny_source, tmp_path):
    wd = tmp_path / "wd"
    cfg = E2EConfig(workdir=wd, depth="full", full={"source": str(tiny_source)}, systems=("zipmoe", "dir"))
    with pytest.raises(BenchInputError) as ei:
        prepare_full(cfg, free_bytes=lambda p: 123 << 20)
    msg = str(ei.value)
    assert "\n" not in msg and "--depth full needs" in msg and "0.1 GB free" in msg
    spec = full_spec(tiny_source)
    need_gb = f"{(spec['source_bytes'] + 2 * (1 << 20) + int(spec['expert_bytes'] * 0.68) + spec['dense_bytes'] + (64 << 20) + (2 << 30)) / 1e9:.1f} GB"
    assert msg.startswith(f"--depth full needs {need_gb}")
    assert not wd.exists()  # nothing written, not even the folder


def test_trace_refused_before_anything_is_written(tiny_source, tmp_path):
    from zipmoe.bench.e2e_full import run_full

    trace = _trace(tmp_path / "t.npy", layers=1)  # the model has 2 layers
    cfg = E2EConfig(workdir=tmp_path / "wd", depth="full", full={"source": str(tiny_source)}, systems=("zipmoe",),
                    routing=f"replay:{trace}")
    with pytest.raises(BenchInputError, match="the model has 2 MoE layers, the trace only 1"):
        run_full(cfg)
    assert not (tmp_path / "wd").exists()


def test_manifest_reuse(tiny_source, tmp_path):
    cfg = E2EConfig(workdir=tmp_path, depth="full", full={"source": str(tiny_source)}, seed=5)
    p1 = prepare_full(cfg)
    st = p1["steps"]
    assert not st["disk"]["reused_source"] and not st["generate"]["reused"] and not st["pack"]["reused"]
    assert st["generate"]["bytes"] > 0 and st["pack"]["seconds"] > 0 and st["open"]["seconds"] >= 0
    shard = sorted((tmp_path / "qwen15moe-full-ckpt").glob("*.safetensors"))[0]
    arc = tmp_path / "qwen15moe-full.zmoe"
    stamps = (shard.stat().st_mtime_ns, shard.stat().st_ino, arc.stat().st_mtime_ns, arc.stat().st_ino)
    # a second run reuses both, and needs only working space: a probe reporting 3 GB free is enough
    p2 = prepare_full(cfg, free_bytes=lambda p: 3 << 30)
    assert p2["steps"]["generate"]["reused"] and p2["steps"]["pack"]["reused"]
    assert p2["steps"]["disk"]["need_bytes"]["source"] == 0 and p2["steps"]["disk"]["need_bytes"]["archive"] == 0
    assert (shard.stat().st_mtime_ns, shard.stat().st_ino, arc.stat().st_mtime_ns, arc.stat().st_ino) == stamps
    assert p2["steps"]["generate"]["seconds"] == st["generate"]["seconds"]  # recorded by the run that made it
    # another seed is another checkpoint: regenerated
    cfg.seed = 6
    p3 = prepare_full(cfg)
    assert not p3["steps"]["generate"]["reused"] and not p3["steps"]["pack"]["reused"]
    assert shard.read_bytes() != b""  # rewritten in place of the old one
    # a truncated archive is packed again
    with open(arc, "r+b") as f:
        f.truncate(arc.stat().st_size - 4096)
    p4 = prepare_full(cfg)
    assert p4["steps"]["generate"]["reused"] and not p4["steps"]["pack"]["reused"]
    # another codec: the same checkpoint, packed again with it
    cfg.codec = "zstd-lit" if cfg.codec != "zstd-lit" else "huf4x"
    p45 = prepare_full(cfg)
    assert p45["steps"]["generate"]["reused"] and not p45["steps"]["pack"]["reused"]
    from formats.reader import Archive

    with Archive(arc) as a:
        assert {p.codec for e in a.index.experts for p in e.parts if p.codec} == {cfg.codec}
    assert prepare_full(cfg)["steps"]["pack"]["reused"]
    # a damaged manifest (ours, but read as untrusted JSON) means: make everything again
    (tmp_path / "qwen15moe-full.json").write_text('{"key": 1, "key": 2}')
    p5 = prepare_full(cfg)
    assert not p5["steps"]["generate"]["reused"] and not p5["steps"]["pack"]["reused"]


def test_generated_checkpoint_matches_source_layout(tiny_source, tmp_path):
    cfg = E2EConfig(workdir=tmp_path, depth="full", full={"source": str(tiny_source)})
    prep = prepare_full(cfg)
    out = tmp_path / "qwen15moe-full-ckpt"
    src_idx = json.loads((tiny_source / "model.safetensors.index.json").read_text())
    out_idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_idx["weight_map"] == src_idx["weight_map"]
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_source / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (tiny_source / "tokenizer.json").read_bytes()
    # each shard holds the source shard's tensors (dtypes, shapes), in the index's order (a hub shard's: by name)
    def header(p):
        raw = p.read_bytes()
        h = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        h.pop("__metadata__")
        return {k: (v["dtype"], v["shape"]) for k, v in h.items()}, list(h)

    for f in sorted(tiny_source.glob("*.safetensors")):
        (a, _), (b, order) = header(f), header(out / f.name)
        assert a == b and order == [n for n in src_idx["weight_map"] if src_idx["weight_map"][n] == f.name]
    assert prep["config"] == json.loads((tiny_source / "config.json").read_text())


def test_pool_chunks_gaussian_and_distinct():
    pool = _pool(0)
    assert pool.dtype == np.dtype("<u2") and pool.size == POOL_ELEMENTS
    offs = _Offsets(0)
    n = 20_000  # more than the real checkpoint's ~14,000 pooled chunks
    starts = [offs.next() for _ in range(n)]
    assert len(set(starts)) == n and max(starts) + CHUNK <= POOL_ELEMENTS

    def entropy(u16):
        h = np.bincount((u16 >> 7) & 0xFF, minlength=256) / u16.size
        h = h[h > 0]
        return float(-(h * np.log2(h)).sum())

    rng = np.random.default_rng(1)
    fresh = (rng.standard_normal(CHUNK, dtype=np.float32) * np.float32(0.02)).view(np.uint32)
    ref = entropy(((fresh + 0x7FFF + ((fresh >> 16) & 1)) >> 16).astype("<u2"))
    seen = set()
    for o in starts[:64]:
        c = pool[o:o + CHUNK]
        assert abs(entropy(c) - ref) < 0.02  # Gaussian exponent statistics in every chunk
        seen.add(c.tobytes())
    assert len(seen) == 64  # no chunk repeats another byte for byte


def test_full_spec_is_the_real_checkpoint(shared_dir):
    src = shared_dir / "models" / "qwen1.5-moe-a2.7b-chat"
    spec = full_spec(src)
    real_cfg = json.loads((src / "config.json").read_text())
    real = json.loads((src / "model.safetensors.index.json").read_text())
    assert spec["config"] == real_cfg
    assert {s.name: f for f, specs in spec["shards"] for s in specs} == real["weight_map"]
    assert spec["source_bytes"] == real["metadata"]["total_size"]
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"} <= set(spec["files"])


def test_full_depth_cli_refusals(tmp_path):
    r = CliRunner().invoke(app, ["e2e", "--depth", "3", "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and "--depth" in r.output
    r = CliRunner().invoke(app, ["e2e", "--depth", "full", "--systems", "raw", "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and "not offered at --depth full" in r.output
    r = CliRunner().invoke(app, ["e2e", "--routing", "trace.npy", "--workdir", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--routing: expected router or replay:FILE.npy" in r.output
    assert not (tmp_path / "x").exists()


# -- routing replay ----------------------------------------------------------------------------------------


class _Recorder:
    """A weight source that logs what each layer fetched (it forwards everything else)."""

    def __init__(self, src, log):
        self._src, self.log = src, log

    def fetch(self, layer, experts, stack=None):
        self.log.append((layer, sorted(int(e) for e in experts)))
        return self._src.fetch(layer, experts, stack)

    def __getattr__(self, name):
        return getattr(self._src, name)


def _record(model, log):
    for layer in model.model.layers:
        layer.moe.source = _Recorder(layer.moe.source, log)


def _expected_fetches(plan, prompt_len, new_tokens, layers):
    # the prefill: every prompt position's experts, except in the last layer (only the last position's
    # block runs there: generation wants only the last logits)
    out = []
    for layer in range(layers):
        first = 0 if layer < layers - 1 else prompt_len - 1
        out.append((layer, sorted({int(e) for p in range(first, prompt_len) for e in plan[p, layer]})))
    for pos in range(prompt_len, prompt_len + new_tokens - 1):
        out += [(layer, sorted(int(e) for e in plan[pos, layer])) for layer in range(layers)]
    return out


@pytest.mark.parametrize("budget", [None, "30%"])
def test_replay_routes_exactly_the_trace(tiny_source, tmp_path, budget):
    trace = _trace(tmp_path / "t.npy")
    P, N = 5, 7
    plan, info = build_plan(trace, P + N, layers=2, experts=8, top_k=2, seed=4)
    assert plan.shape == (P + N, 2, 2) and info["label"] == LABEL
    with load(tiny_source, memory_budget=budget) as lm:
        log: list = []
        _record(lm.model, log)
        install_replay(lm.model, ReplayPlan(plan))
        toks = [ev.token_id for ev in lm.stream(list(range(3, 3 + P)), max_new_tokens=N, sampling=Sampling(greedy=True))]
        assert len(toks) == N
        assert log == _expected_fetches(plan, P, N, 2)  # every layer, every token: the trace's choices
        # a second generation from position 0 replays the same choices
        log.clear()
        list(lm.stream(list(range(3, 3 + P)), max_new_tokens=N, sampling=Sampling(greedy=True)))
        assert log == _expected_fetches(plan, P, N, 2)
        # past the plan: one line
        with pytest.raises(GenerationError, match="beyond the plan"):
            list(lm.stream(list(range(3, 3 + P)), max_new_tokens=N + 2, sampling=Sampling(greedy=True)))


def test_replay_of_the_routers_own_choices_is_bit_identical(tiny_source):
    """With router weights, replaying exactly what the router picked changes no logit: the weights are the
    router's, not made up."""
    N = 9

    def steps(model, toks):  # one token per forward (positions 0 .. N-1), logits of each
        cache = model.new_cache(1, N + 1)
        return [model(torch.tensor([[t]]), cache, pos, last_only=True) for pos, t in enumerate(toks)]

    with load(tiny_source) as lm:
        log: list = []
        _record(lm.model, log)
        ref = lm.generate([17], max_new_tokens=N, sampling=Sampling(greedy=True)).token_ids[0]
        toks = [17] + ref[:-1]
        log.clear()
        want = steps(lm.model, toks)
        assert len(log) == 2 * N  # one position per forward: every fetch is that position's top-k
        plan = np.array([[log[2 * p][1], log[2 * p + 1][1]] for p in range(N)], dtype=np.int16)  # [N, 2, 2]
        install_replay(lm.model, ReplayPlan(plan))
        got = steps(lm.model, toks)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        uninstall_replay(lm.model)
        assert "route" not in lm.model.model.layers[0].moe.__dict__ and "forward" not in lm.model.__dict__


def test_replay_uniform_weights_and_refusals(tiny_source, tmp_path):
    trace = _trace(tmp_path / "t.npy")
    plan, _ = build_plan(trace, 6, layers=2, experts=8, top_k=2)
    with load(tiny_source) as lm:
        rp = ReplayPlan(plan, weights="uniform")
        install_replay(lm.model, rp)
        rp.set_rows(torch.arange(3))
        w, ids = lm.model.model.layers[1].moe.route(torch.zeros(3, 64, dtype=torch.bfloat16))
        assert torch.equal(ids, torch.from_numpy(plan[:3, 1].astype(np.int64)))
        assert torch.equal(w, torch.full((3, 2), 0.5, dtype=torch.bfloat16))
        with pytest.raises(GenerationError, match="outside a replayed forward"):
            lm.model.model.layers[1].moe.route(torch.zeros(2, 64, dtype=torch.bfloat16))
        uninstall_replay(lm.model)
        with pytest.raises(GenerationError, match="the model has 2 layers, the trace only 1"):
            install_replay(lm.model, ReplayPlan(plan[:, :1]))
        with pytest.raises(GenerationError, match="routes top-2, the trace top-3"):
            install_replay(lm.model, ReplayPlan(np.zeros((4, 2, 3), np.int16)))
        with pytest.raises(GenerationError, match="names expert 8 in layer 0, which has 8 experts"):
            install_replay(lm.model, ReplayPlan(np.full((4, 2, 2), 8, np.int16)))
    with pytest.raises(BenchInputError, match="the model has 3 MoE layers, the trace only 2"):
        build_plan(trace, 6, layers=3, experts=8, top_k=2)
    with pytest.raises(BenchInputError, match="not a multiple of k=4"):  # an unnamed trace is read with the model's k
        build_plan(trace, 6, layers=2, experts=8, top_k=4)
    named = tmp_path / "mixtral-8x7b.npy"  # a known model's name fixes k (as bench cache reads it)
    named.write_bytes(trace.read_bytes())
    with pytest.raises(BenchInputError, match="the trace routes top-2, the model top-4"):
        build_plan(named, 6, layers=2, experts=8, top_k=4)
    with pytest.raises(BenchInputError, match="the trace has 54 tokens, the run needs 100"):
        build_plan(trace, 100, layers=2, experts=8, top_k=2)


def test_replay_archive_equals_directory(tiny_source, tmp_path):
    from zipmoe_pack.pack import PackOptions, pack

    arc = tmp_path / "m.zmoe"
    pack(tiny_source, arc, PackOptions(threads=2))
    plan, _ = build_plan(_trace(tmp_path / "t.npy"), 12, layers=2, experts=8, top_k=2, seed=1)
    outs = {}
    for name, path in (("archive", arc), ("dir", tiny_source)):
        with load(path, memory_budget="30%") as lm:
            log: list = []
            _record(lm.model, log)
            install_replay(lm.model, ReplayPlan(plan))
            toks = [ev.token_id for ev in lm.stream([5, 6, 7, 8], max_new_tokens=8, sampling=Sampling(greedy=True))]
            outs[name] = (toks, log)
    assert outs["archive"] == outs["dir"]
    assert outs["archive"][1] == _expected_fetches(plan, 4, 8, 2)


def test_replay_real_trace_on_a_model_with_its_dims(checkpoint_factory, shared_dir):
    trace = shared_dir / "traces" / "qwen1.5-moe-a2.7b.npy"
    dims = {**TINY, "experts": 60, "top_k": 4, "layers": 3}
    ckpt = checkpoint_factory("qwen2_moe", dims=dims, shards=2)
    plan, info = build_plan(trace, 20, layers=3, experts=60, top_k=4)
    assert info["trace_layers"] == 24 and plan.shape == (20, 24, 4)
    with load(ckpt, memory_budget="30%") as lm:
        log: list = []
        _record(lm.model, log)
        install_replay(lm.model, ReplayPlan(plan))
        list(lm.stream(list(range(3, 11)), max_new_tokens=12, sampling=Sampling(greedy=True)))
    assert log == _expected_fetches(plan, 8, 12, 3)


def test_e2e_replay_rows(tmp_path):
    """Through the benchmark: both systems replay the same plan in their child processes, the result and
    rows say so, and lookahead is left out with its reason."""
    trace = _trace(tmp_path / "t.npy", experts=QUICK_DIMS["experts"], k=QUICK_DIMS["top_k"], tokens=12)
    cfg = E2EConfig(workdir=tmp_path / "wd", budgets=(30.0,), systems=("zipmoe", "zipmoe-lookahead", "dir"),
                    prompt_tokens=6, new_tokens=4, quick=True, cap=False, warm_pass=False,
                    routing=f"replay:{trace}")
    res = run(cfg)
    assert res["routing"]["label"] == LABEL and res["routing"]["positions"] == 10
    assert set(res["routing_skipped"]) == {"zipmoe-lookahead"}
    rows = {r["system"]: r for r in res["rows"]}
    assert set(rows) == {"zipmoe", "dir"}
    for r in rows.values():
        assert r["ok"], r.get("error")
        assert r["routing"] == LABEL and r["replayed_layers"] == 2 and r["replay_weights"] == ["router"]
        assert r["bytes_read_decode"] <= r["bytes_read"]
    assert rows["zipmoe"]["tokens"] == rows["dir"]["tokens"]


# -- --family olmoe: OLMoE-1B-7B's dims, and llama.cpp at full depth ---------------------------------------

OLMOE_SMALL = {"scale": 1 / 32, "layers": 2}  # hidden 64, intermediate 32, 64 experts, top-8, 2 layers


def _olmoe_cfg(src, wd, **kw):
    return E2EConfig(workdir=wd, depth="full", family="olmoe", full={"source": str(src), **OLMOE_SMALL}, **kw)


def test_olmoe_spec_has_olmoe_dims(tiny_source):
    from zipmoe.bench.e2e_full_olmoe import SHARD_BYTES

    spec = full_spec(tiny_source, family="olmoe")
    c = spec["config"]
    assert c["model_type"] == "olmoe" and c["architectures"] == ["OlmoeForCausalLM"]
    assert (c["num_hidden_layers"], c["num_experts"], c["intermediate_size"], c["num_experts_per_tok"],
            c["hidden_size"], c["num_attention_heads"], c["tie_word_embeddings"]) == (16, 64, 1024, 8, 2048, 16, False)
    src_cfg = json.loads((tiny_source / "config.json").read_text())
    assert c["vocab_size"] == src_cfg["vocab_size"] == 512  # the tokenizer source's vocabulary, said in vocab_note
    assert "512" in spec["vocab_note"] and "50,304" in spec["vocab_note"]
    assert spec["expert_bytes"] == 16 * 64 * 3 * 2048 * 1024 * 2  # 12.9 GB of routed experts
    names = [s.name for _, ss in spec["shards"] for s in ss]
    assert len(names) == len(set(names)) and not any("shared_expert" in n for n in names)
    assert "model.layers.15.self_attn.q_norm.weight" in names and "lm_head.weight" in names
    assert [f for f, _ in spec["shards"]] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(sum(s.numel * 2 for s in ss) <= SHARD_BYTES for _, ss in spec["shards"])
    assert all([s.name for s in ss] == sorted(s.name for s in ss) for _, ss in spec["shards"])
    assert "tokenizer.json" in spec["files"]
    # the qwen path is unchanged by the family argument's default
    assert full_spec(tiny_source)["config"] == src_cfg


def test_olmoe_disk_refusal_counts_the_gguf_and_writes_nothing(tiny_source, tmp_path):
    from zipmoe.bench.e2e_full_gen import disk_need
    from zipmoe.bench.e2e_full_olmoe import gguf_bytes

    wd = tmp_path / "wd"
    spec = full_spec(tiny_source, OLMOE_SMALL["scale"], 0, "olmoe", OLMOE_SMALL["layers"])
    msgs = {}
    for systems in (("zipmoe", "dir"), ("zipmoe", "dir", "llamacpp")):
        with pytest.raises(BenchInputError) as ei:
            prepare_full(_olmoe_cfg(tiny_source, wd, systems=systems), free_bytes=lambda p: 123 << 20)
        msgs[len(systems)] = str(ei.value)
        assert not wd.exists()  # nothing written, not even the folder
    need = disk_need(spec, False, False, gguf_bytes(spec))
    assert msgs[3].startswith(f"--depth full needs {need['total'] / 1e9:.1f} GB")
    assert f"+ GGUF {need['gguf'] / 1e9:.1f} GB" in msgs[3] and "\n" not in msgs[3]
    assert "GGUF" not in msgs[2] and msgs[2].startswith(f"--depth full needs {(need['total'] - need['gguf']) / 1e9:.1f} GB")


def test_olmoe_generation_runs_and_reuse(tiny_source, tmp_path):
    cfg = _olmoe_cfg(tiny_source, tmp_path, systems=("zipmoe", "dir"), seed=2)
    p1 = prepare_full(cfg)
    assert p1["family"] == "olmoe" and not p1["steps"]["generate"]["reused"] and not p1["steps"]["pack"]["reused"]
    ckpt = tmp_path / "olmoe-full-scale0.03125-L2-ckpt"
    assert p1["ckpt"] == str(ckpt) and p1["archive"] == str(tmp_path / "olmoe-full-scale0.03125-L2.zmoe")
    cfg_json = json.loads((ckpt / "config.json").read_text())
    assert cfg_json["model_type"] == "olmoe" and cfg_json["num_experts"] == 64 and cfg_json["num_hidden_layers"] == 2
    assert (ckpt / "tokenizer.json").read_bytes() == (tiny_source / "tokenizer.json").read_bytes()
    assert p1["expert_bytes"] == 2 * 64 * 3 * 64 * 32 * 2
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len([n for n in idx if ".experts." in n]) == 2 * 64 * 3
    # the runtime runs it: the archive and the directory, budgeted, give the same greedy tokens
    outs = []
    for path in (p1["archive"], p1["ckpt"]):
        with load(path, memory_budget="30%") as lm:
            lm.eos_token_ids = ()  # random weights: EOS may come first; generate all six tokens
            outs.append([ev.token_id for ev in lm.stream([5, 6, 7, 8], max_new_tokens=6,
                                                        sampling=Sampling(greedy=True))])
    assert outs[0] == outs[1] and len(outs[0]) == 6
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    stamps = (shard.stat().st_mtime_ns, Path(p1["archive"]).stat().st_mtime_ns)
    p2 = prepare_full(cfg, free_bytes=lambda p: 3 << 30)  # reused: working space only
    assert p2["steps"]["generate"]["reused"] and p2["steps"]["pack"]["reused"]
    assert (shard.stat().st_mtime_ns, Path(p1["archive"]).stat().st_mtime_ns) == stamps
    # the qwen checkpoint of the same work folder is another tag: the OLMoE manifest is untouched by it
    assert not (tmp_path / "qwen15moe-full.json").exists() and (tmp_path / "olmoe-full-scale0.03125-L2.json").is_file()


def test_olmoe_full_run_with_llamacpp(tiny_source, tmp_path):
    from zipmoe.bench.e2e_full import run_full
    from zipmoe.bench.llamacpp import available

    why = available()
    if why:
        pytest.skip(why)
    cfg = _olmoe_cfg(tiny_source, tmp_path, systems=("zipmoe", "dir", "llamacpp"), budgets=(30.0,),
                     prompt_tokens=6, new_tokens=4, cap=False, warm_pass=False)
    res = run_full(cfg)
    rows = {r["system"]: r for r in res["rows"]}
    assert set(rows) == {"zipmoe", "dir", "llamacpp"}
    for r in rows.values():
        assert r["ok"], r.get("error")
        assert "bytes_per_token" in r and len(r["tokens"]) == 4
    assert rows["llamacpp"]["bytes_read_decode"] is not None  # storage reads after the first token
    assert rows["zipmoe"]["tokens"] == rows["dir"]["tokens"]
    gguf = tmp_path / "olmoe-full-scale0.03125-L2.bf16.gguf"
    st = res["full"]["steps"]["gguf"]
    assert st["bytes_on_disk"] == gguf.stat().st_size and not st["reused"] and st["overhead_bytes"] > 0
    assert res["model"]["family"] == "olmoe" and res["model"]["dims"]["shared_intermediate"] is None
    assert res["llamacpp"]["gguf"]["path"] == str(gguf)
    # a second preparation reuses the GGUF and reports the export time of the run that made it
    from zipmoe.bench.e2e_full_olmoe import prepare_llamacpp

    stamp = gguf.stat().st_mtime_ns
    prep = prepare_full(cfg)
    again = prepare_llamacpp(cfg, prep, gguf, lambda p: 3 << 30, tmp_path)
    assert again["gguf"]["reused"] and gguf.stat().st_mtime_ns == stamp
    st2 = prep["steps"]["gguf"]
    assert st2["reused"] and st2["seconds"] == st["seconds"] and st2["mb_s"] == st["mb_s"] and st["seconds"] > 0
    targets = {t["target"] for t in res["targets"]}
    assert "30% budget: zipmoe tokens/s >= 3x llamacpp" in targets
    assert "identical tokens: archive and directory at every budget" in targets  # llama.cpp's not compared
    ll = next(t for t in res["targets"] if t["target"] == "llamacpp greedy tokens equal zipmoe's")  # information
    same = rows["llamacpp"]["tokens"] == rows["zipmoe"]["tokens"]
    assert ll["met"] == same and ll["mark"] == ("same" if same else "differ")
    assert next(t for t in res["targets"] if t["target"].startswith("identical"))["met"]
    from zipmoe.bench.e2e_full import render_full

    t1, t2 = render_full(res)
    assert t2.row_count == 3 and t1.row_count == 5  # disk check, generate, pack, gguf, open
    # a GGUF step without a recorded time (made before the manifest kept it) renders as "-", not a TypeError
    res["full"]["steps"]["gguf"].update(seconds=None, mb_s=None, reused=True)
    t1, _ = render_full(res)
    assert list(t1.columns[1].cells)[3] == "-" and list(t1.columns[2].cells)[3] == "-"


def test_full_depth_family_refusals(tmp_path):
    r = CliRunner().invoke(app, ["e2e", "--depth", "full", "--family", "mixtral", "--workdir", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--depth full --family: expected qwen2_moe or olmoe" in r.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(BenchInputError, match="--depth full builds qwen2_moe or olmoe"):
        prepare_full(E2EConfig(workdir=tmp_path / "y", depth="full", family="switch_transformers"))
    assert not (tmp_path / "y").exists()


def test_replay_plan_serves_each_sequences_last_position():
    """A forward of B sequences of T tokens that wants only the last logits routes T rows per sequence in
    every layer but the last, and one row per sequence (its last position) there."""
    choices = np.arange(10 * 2 * 2, dtype=np.int16).reshape(10, 2, 2)  # [P, L, K]
    plan = ReplayPlan(choices)
    plan.set_rows(torch.arange(3, 8).repeat(2), 5)  # B = 2 sequences at positions 3 .. 7
    assert torch.equal(plan.experts(0, 10), torch.from_numpy(choices[[3, 4, 5, 6, 7] * 2, 0].astype(np.int64)))
    assert torch.equal(plan.experts(1, 2), torch.from_numpy(choices[[7, 7], 1].astype(np.int64)))
    with pytest.raises(GenerationError, match="routed 3 rows outside a replayed forward"):
        plan.experts(1, 3)  # neither every row nor one per sequence
