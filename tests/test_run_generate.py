"""Generation loop, sampling, tokenizer and the load() API."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from formats.errors import CorruptDataError, ZmoeError
from zipmoe_pack.synth import make_checkpoint
from zipmoe_run.api import load
from zipmoe_run.errors import GenerationError, PromptTooLongError, TokenizerError, UnsupportedModelError
from zipmoe_run.generate import Sampling, generate, stream_generate
from zipmoe_run.models import SUPPORTED
from zipmoe_run.source import DirectorySource
from zipmoe_run.tokenizer import load_tokenizer

SHARED_QWEN = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "qwen1.5-moe-a2.7b-chat"


@pytest.fixture(scope="module")
def qwen(checkpoint_factory):
    return checkpoint_factory("qwen2_moe", seed=2)


@pytest.fixture(scope="module")
def lm(qwen):
    with load(qwen, dtype="float32") as loaded:
        yield loaded


def test_batch_of_prompts_equals_single_runs(lm):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15]]  # two lengths: grouped, never padded
    batch = generate(lm.model, prompts, max_new_tokens=6).token_ids
    singles = [generate(lm.model, p, max_new_tokens=6).token_ids[0] for p in prompts]
    assert batch == singles and all(len(t) == 6 for t in batch)


def test_eos_stops_and_is_reported(lm):
    first = generate(lm.model, [5, 6, 7], max_new_tokens=8).token_ids[0]
    stop = first[3]
    events = list(stream_generate(lm.model, [5, 6, 7], max_new_tokens=8, eos_token_ids=[stop]))
    ids = [e.token_id for e in events]
    assert ids == first[: first.index(stop) + 1]
    assert events[-1].finish_reason == "eos" and all(e.finish_reason is None for e in events[:-1])
    full = list(stream_generate(lm.model, [5, 6, 7], max_new_tokens=4))
    assert full[-1].finish_reason == "length" and [e.index for e in full] == [0, 1, 2, 3]


def test_sampling_options(lm):
    greedy = generate(lm.model, [3, 1, 4], max_new_tokens=8).token_ids
    top1 = generate(lm.model, [3, 1, 4], max_new_tokens=8, sampling=Sampling(greedy=False, top_k=1, seed=0)).token_ids
    assert top1 == greedy
    tiny_p = Sampling(greedy=False, top_p=1e-6, seed=1)  # nucleus of one token: greedy again
    assert generate(lm.model, [3, 1, 4], max_new_tokens=8, sampling=tiny_p).token_ids == greedy
    a = generate(lm.model, [3, 1, 4], max_new_tokens=8, sampling=Sampling(greedy=False, temperature=5.0, seed=1))
    b = generate(lm.model, [3, 1, 4], max_new_tokens=8, sampling=Sampling(greedy=False, temperature=5.0, seed=2))
    assert a.token_ids != b.token_ids  # hot sampling with different seeds diverges
    with pytest.raises(GenerationError, match="temperature"):
        Sampling(greedy=False, temperature=0)
    with pytest.raises(GenerationError, match="top_p"):
        Sampling(greedy=False, top_p=1.5)


@pytest.mark.parametrize("kwargs,needle", [
    ({"seed": -1}, "seed"), ({"seed": 1 << 64}, "seed"), ({"seed": 1.5}, "seed"), ({"greedy": True, "seed": -5}, "seed"),
    ({"greedy": False, "temperature": float("nan")}, "temperature"),
    ({"greedy": False, "temperature": float("inf")}, "temperature"),
    ({"greedy": False, "top_p": float("nan")}, "top_p"), ({"greedy": False, "top_p": 0}, "top_p"),
    ({"greedy": False, "top_k": -1}, "top_k"), ({"greedy": False, "top_k": 2.5}, "top_k"),
])
def test_sampling_rejects_bad_settings(kwargs, needle):
    """One-line GenerationError (a ZmoeError) instead of a torch error later (a seed of 2^64 overflowed)."""
    with pytest.raises(GenerationError, match=needle) as exc:
        Sampling(**kwargs)
    assert "\n" not in str(exc.value)


def test_max_new_tokens_checked(lm):
    for bad in (-1, 2.5, True):
        with pytest.raises(GenerationError, match="max_new_tokens"):
            generate(lm.model, [1, 2], max_new_tokens=bad)
    assert Sampling(seed=(1 << 64) - 1).seed == (1 << 64) - 1


def test_prompt_checks(lm):
    ctx = lm.model.max_context
    with pytest.raises(PromptTooLongError, match="context"):
        generate(lm.model, list(range(5)) * (ctx // 5 + 1), max_new_tokens=1)
    with pytest.raises(GenerationError, match="empty"):
        generate(lm.model, [[]], max_new_tokens=1)
    with pytest.raises(GenerationError, match="vocabulary"):
        generate(lm.model, [10**9], max_new_tokens=1)
    assert generate(lm.model, [1, 2], max_new_tokens=0).token_ids == [[]]


def test_stream_text_and_stats(lm):
    stats: dict = {}
    events = list(lm.stream("hello world", max_new_tokens=10, stats=stats))
    ids = [e.token_id for e in events]
    assert "".join(e.text for e in events) == lm.tokenizer.decode(ids)
    assert stats["prompt_tokens"] == len(lm.encode("hello world")) and stats["generated_tokens"] == len(ids)
    assert stats["ttft_s"] > 0 and stats["peak_rss_bytes"] > 0
    assert stats["anon_huge_bytes"] is None or 0 <= stats["anon_huge_bytes"] <= stats["peak_rss_bytes"]
    res = lm.generate(["hello world"], max_new_tokens=3)
    assert res.stats["experts_fetched"] > 0 and res.stats["bytes_read"] > 0


def test_tokenizer_matches_transformers(qwen):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(qwen)
    tok = load_tokenizer(DirectorySource(qwen))
    text = "The quick brown fox, 42 times!"
    assert tok.encode(text) == ref(text).input_ids
    msgs = [{"role": "user", "content": "hi there"}]
    assert tok.encode_chat("hi there") == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False)
    assert tok.decode(tok.encode(text)) == ref.decode(ref(text).input_ids, skip_special_tokens=True)
    assert 2 in tok.eos_token_ids  # generation_config.json eos


@pytest.mark.skipif(not SHARED_QWEN.is_dir(), reason="shared Qwen1.5-MoE metadata not present")
def test_qwen2_vocab_merges_fallback_matches_transformers():
    transformers = pytest.importorskip("transformers")

    class Files:
        config = json.loads((SHARED_QWEN / "config.json").read_text())

        def file_bytes(self, name):
            p = SHARED_QWEN / name
            return p.read_bytes() if p.is_file() else None

    tok = load_tokenizer(Files())
    ref = transformers.AutoTokenizer.from_pretrained(SHARED_QWEN)
    for text in ["Hello world, 你好!", "  spaced\n\nlines\t and 12345 numbers"]:
        assert tok.encode(text) == ref(text).input_ids
    assert tok.encode_chat("Hi") == ref.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                            add_generation_prompt=True, tokenize=True,
                                                            return_dict=False)
    assert set(tok.eos_token_ids) == {151645, 151643}


def test_chat_template_missing(tmp_path):
    p = make_checkpoint(tmp_path / "m", "mixtral", seed=1)
    cfg_path = p / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(DirectorySource(p))
    with pytest.raises(TokenizerError, match="chat template"):
        tok.encode_chat("hi")


def test_unsupported_family_lists_supported(tmp_path):
    p = make_checkpoint(tmp_path / "m", "mixtral", seed=1)
    cfg = json.loads((p / "config.json").read_text())
    cfg["model_type"] = "llama4"
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as exc:
        load(p)
    assert "llama4" in str(exc.value) and all(s in str(exc.value) for s in SUPPORTED)


class FailingSource:
    """Raises a CorruptDataError on the n-th fetch, like an archive meeting a damaged expert chunk."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.config = inner.config

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fetch(self, layer, experts, stack=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise CorruptDataError(f"model.layers.{layer}.mlp.experts.{experts[0]}.up_proj.weight: checksum mismatch")
        yield from self.inner.fetch(layer, experts, stack)


def test_corrupt_expert_mid_generation_stops_generation(qwen):
    from zipmoe_run.models import build_model

    src = FailingSource(DirectorySource(qwen), fail_at=10)  # 3 MoE layers: prefill + 2 steps, then the 4th step
    model = build_model(src, torch.float32)
    got = []
    with pytest.raises(ZmoeError, match="experts.*up_proj.weight"):
        for ev in stream_generate(model, [4, 5, 6], max_new_tokens=20):
            got.append(ev.token_id)
    assert len(got) == 3
