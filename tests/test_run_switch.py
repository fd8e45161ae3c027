"""Switch Transformers (encoder-decoder, top-1 experts with capacity) against transformers' eager float32.

Teacher-forced logits and 16 greedy steps on the decoder's KV cache agree with
``SwitchTransformersForConditionalGeneration`` (max |dlogit| <= 1e-4, identical tokens), with prompts long
enough that experts overflow their capacity (checked by counting the router's dropped assignments on
both sides). The archive and the checkpoint folder give bit-identical logits; experts of both stacks are
read only through ``WeightSource.fetch``; the CLI runs a packed checkpoint with its T5 tokenizer.
"""
from __future__ import annotations

import json

import pytest
import torch

from zipmoe_pack.pack import PackOptions, pack
from zipmoe_pack.synth import make_checkpoint, make_from_index
from zipmoe_run.api import load
from zipmoe_run.errors import UnsupportedModelError
from zipmoe_run.generate import stream_generate
from zipmoe_run.models.switch_transformers import ModelArgs, relative_position_bucket

transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig, SwitchTransformersForConditionalGeneration  # noqa: E402
from transformers.models.switch_transformers.modeling_switch_transformers import (  # noqa: E402
    SwitchTransformersAttention,
    SwitchTransformersTop1Router,
)

TOL = 1e-4
STEPS = 16
REAL_PROMPT = "translate English to German: The house is wonderful."
REAL_IDS = [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]  # T5 sentencepiece, EOS appended

# template: 4+4 blocks, 8 experts, expert_capacity 4 -> a 40-token prompt overflows
CASES = {
    "tied": None,
    "untied": {"tie_word_embeddings": False},  # lm_head replaced by its own values below; no rescale
    # every encoder block sparse; no sparse decoder layers requested, which transformers still turns into
    # a sparse block 1 (step = layers); gelu_new experts
    "steps-gelu": {"num_sparse_encoder_layers": 4, "encoder_sparse_step": 1, "num_sparse_decoder_layers": 0,
                   "decoder_sparse_step": 4, "dense_act_fn": "gelu_new"},
}


def _untie(path):
    """Give lm_head.weight values of its own (synth writes it equal to shared.weight)."""
    from safetensors.torch import load_file, save_file

    shard = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    tensors = load_file(shard)
    w = tensors["lm_head.weight"]
    tensors["lm_head.weight"] = (torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * 0.2).to(w.dtype)
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def ckpt(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param) / "m", "switch_transformers", shards=3, seed=3,
                           config_overrides=CASES[request.param])
    if request.param == "untied":
        _untie(path)
    return path


@pytest.fixture(scope="module")
def real(shared_dir, tmp_path_factory):
    """switch-large-128's real layout, names, config and tokenizer at 1/32 of its sizes, 4+4 blocks."""
    src = shared_dir / "models" / "switch-large-128"
    if not (src / "model.safetensors.index.json").is_file():
        pytest.skip(f"{src} is absent")
    return make_from_index(src, tmp_path_factory.mktemp("switch-real") / "m", scale=1 / 32, max_layers=4, seed=1)


def _reference(path):
    return SwitchTransformersForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()


def _ref_dropped(ref):
    """Hooks counting, per transformers router call, the tokens whose assignment capacity masked out."""
    counts: list[int] = []

    def hook(_mod, _inp, out):
        counts.append(int((out[0].sum(-1) == 0).sum()))  # expert_index [B, T, E] one-hot, zero row = dropped

    for m in ref.modules():
        if isinstance(m, SwitchTransformersTop1Router):
            m.register_forward_hook(hook)
    return counts


def _ours_dropped(model) -> list[int]:
    out = [b.dropped for b in model.sparse_blocks()]
    for b in model.sparse_blocks():
        b.dropped = 0
    return out


def _ref_greedy(ref, prompt, start, steps=STEPS):
    """transformers' own greedy generate (encoder once, cached decoder), no EOS stop: tokens and raw logits."""
    gc = GenerationConfig(max_new_tokens=steps, do_sample=False, decoder_start_token_id=start, eos_token_id=None,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = ref.generate(prompt, generation_config=gc)
    return out.sequences[:, 1:], torch.stack(out.logits, 1).float()  # [B, steps], [B, steps, V]


def _our_greedy(model, prompt, steps=STEPS):
    enc = model.encode(prompt)
    cache = model.new_cache(enc, steps)
    y = torch.full((prompt.shape[0], 1), model.decoder_start_token_id, dtype=torch.long)
    toks, logits = [], []
    for step in range(steps):
        lg = model.decode(y, cache, step, last_only=True)[:, -1]  # [B, V]
        y = lg.argmax(-1, keepdim=True)
        toks.append(y)
        logits.append(lg)
    return torch.cat(toks, 1), torch.stack(logits, 1)


def _check_parity(path, prompt, dec):
    ref = _reference(path)
    theirs_dropped = _ref_dropped(ref)
    lm = load(path, dtype="float32")
    model = lm.model
    _ours_dropped(model)
    with torch.no_grad():
        want = ref(input_ids=prompt, decoder_input_ids=dec).logits.float()  # [B, T, V]
    got = model(prompt, dec)
    assert got.dtype == torch.float32 and got.shape == want.shape
    delta = (got - want).abs().max().item()
    assert delta <= TOL, f"teacher-forced max |dlogit| {delta:.3g}"
    ours = _ours_dropped(model)
    assert ours == theirs_dropped, (ours, theirs_dropped)
    assert sum(ours) > 0, "the prompt should overflow some expert's capacity"
    theirs_dropped.clear()

    start = model.decoder_start_token_id
    want_tok, want_logits = _ref_greedy(ref, prompt, start)
    got_tok, got_logits = _our_greedy(model, prompt)
    delta = (got_logits - want_logits).abs().max().item()
    assert delta <= TOL, f"greedy max |dlogit| {delta:.3g}"
    assert got_tok.tolist() == want_tok.tolist()
    ours = _ours_dropped(model)  # per block, summed over steps; transformers' hooks count per call
    n_enc = sum(1 for b in model.sparse_blocks() if b.stack == "encoder")
    assert ours[:n_enc] == theirs_dropped[:n_enc] and sum(ours) == sum(theirs_dropped) > 0  # encoder overflowed
    lm.close()
    return got_tok


def test_matches_transformers_with_capacity_overflow(ckpt):
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(2, 512, (2, 40), generator=g)  # [B, S]: 80 tokens, 8 experts x capacity 4 per row
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(2, 512, (2, 19), generator=g)], 1)  # [B, T]
    toks = _check_parity(ckpt, prompt, dec)
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("tie_word_embeddings") is False:
        assert len(set(toks[0].tolist())) > 4  # a model that does not just repeat one token


def test_real_layout_matches_transformers(real):
    lm = load(real, dtype="float32")
    ids = lm.encode(REAL_PROMPT)
    assert ids == REAL_IDS
    long = lm.encode("the " * 100)  # 101 tokens: most go to one expert, capacity 64
    lm.close()
    prompt = torch.tensor([long])
    dec = torch.tensor([[0] + REAL_IDS])
    _check_parity(real, prompt, dec)


def test_generate_api_batches_and_stream(ckpt):
    """stream_generate serves encoder-decoder models: groups by length, per-row EOS, same stats keys."""
    lm = load(ckpt, dtype="float32")
    g = torch.Generator().manual_seed(1)
    p1, p2 = torch.randint(2, 512, (2, 12), generator=g).tolist()
    p3 = torch.randint(2, 512, (7,), generator=g).tolist()
    stats: dict = {}
    events = list(stream_generate(lm.model, [p1, p3, p2], max_new_tokens=6, stats=stats))
    got = {s: [e.token_id for e in events if e.seq == s] for s in range(3)}
    for s, p in enumerate([p1, p3, p2]):  # each row alone gives the same tokens
        assert got[s] == lm.generate(p, max_new_tokens=6).token_ids[0]
        last = [e for e in events if e.seq == s][-1]
        assert last.finish_reason == "length" and last.index == 5
    assert stats["prompt_tokens"] == 31 and stats["generated_tokens"] == 18
    for key in ("prompt_tok_s", "gen_tok_s", "ttft_s", "peak_rss_bytes", "decode_steps"):
        assert key in stats
    eos = got[0][2]  # pretend the third token is EOS: that row stops there
    res = lm.generate([p1], max_new_tokens=6)
    from zipmoe_run.generate import generate

    cut = generate(lm.model, [p1], max_new_tokens=6, eos_token_ids=[eos]).token_ids[0]
    assert cut == res.token_ids[0][: res.token_ids[0].index(eos) + 1]
    lm.close()


def test_archive_bit_identical_and_both_stacks_fetched(ckpt, tmp_path):
    arc = tmp_path / "switch.zmoe"
    pack(ckpt, arc, PackOptions(threads=2, chunk_elements=4096))
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(2, 512, (1, 40), generator=g)
    dec = torch.randint(2, 512, (1, 9), generator=g)
    for dtype in ("float32", "bfloat16"):
        with load(ckpt, dtype=dtype) as a, load(arc, dtype=dtype) as b:
            seen = []
            fetch = b.source.fetch

            def spy(layer, experts, stack=None):
                seen.append((stack, layer))
                return fetch(layer, experts, stack)

            b.source.fetch = spy
            la, lb = a.model(prompt, dec), b.model(prompt, dec)
            assert torch.equal(la, lb), f"{dtype}: archive and folder logits differ"
            assert a.generate(prompt[0].tolist(), max_new_tokens=8).token_ids == \
                b.generate(prompt[0].tolist(), max_new_tokens=8).token_ids
            sparse = {(m.stack, m.layer) for m in b.model.sparse_blocks()}
            assert set(seen) == sparse and {s for s, _ in sparse} == {"encoder", "decoder"}
            assert b.source.stats()["experts_fetched"] > 0


def test_cli_runs_real_archive(real, tmp_path):
    from typer.testing import CliRunner

    from zipmoe_run.cli import app

    arc = tmp_path / "switch.zmoe"
    pack(real, arc, PackOptions(threads=2, chunk_elements=4096))
    r = CliRunner().invoke(app, [str(arc), "--prompt", REAL_PROMPT, "-n", "6", "--json", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["prompt_ids"] == REAL_IDS and isinstance(obj["text"], str)
    ref = _reference(real)
    want, _ = _ref_greedy(ref, torch.tensor([REAL_IDS]), 0, steps=6)  # real configs name no start token: pad 0
    want = want[0].tolist()
    if 1 in want:  # the CLI stops at EOS (</s> = 1)
        want = want[: want.index(1) + 1]
    assert obj["token_ids"] == want
    r = CliRunner().invoke(app, [str(arc), "--prompt", REAL_PROMPT, "-n", "4"])  # streamed text
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.stderr


def test_cli_synth_tokenizer_appends_eos(ckpt):
    from typer.testing import CliRunner

    from zipmoe_run.cli import app

    r = CliRunner().invoke(app, [str(ckpt), "--prompt", "translate English to German: hi", "-n", "3", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    eos = json.loads((ckpt / "config.json").read_text())["eos_token_id"]
    assert obj["prompt_ids"][-1] == eos and len(obj["token_ids"]) <= 3


# -- config rules and pieces ------------------------------------------------------------------------


def test_sparse_steps_follow_transformers():
    a = ModelArgs.from_dict({"num_layers": 24, "num_sparse_encoder_layers": 12, "num_sparse_decoder_layers": 12})
    assert a.num_decoder_layers == 12  # transformers' default when config.json has none, not num_layers
    assert (a.encoder_sparse_step, a.decoder_sparse_step) == (2, 1)
    assert [i for i in range(6) if a.is_sparse("encoder", i)] == [1, 3, 5]
    assert all(a.is_sparse("decoder", i) for i in range(12))
    b = ModelArgs.from_dict({"num_layers": 4, "num_sparse_encoder_layers": 2, "encoder_sparse_step": 3,
                             "num_decoder_layers": None, "num_sparse_decoder_layers": 0})
    assert b.encoder_sparse_step == 3 and b.num_decoder_layers == 4 and b.decoder_sparse_step == 4
    assert [i for i in range(4) if b.is_sparse("decoder", i)] == [1]  # "0 sparse layers" still makes block 1 sparse
    for key in ("encoder_sparse_step", "decoder_sparse_step", "num_decoder_layers"):
        cfg = transformers.SwitchTransformersConfig(num_layers=4, num_sparse_encoder_layers=2, encoder_sparse_step=3,
                                                    num_decoder_layers=None, num_sparse_decoder_layers=0)
        assert getattr(cfg, key) == getattr(b, key)
    g = ModelArgs.from_dict({"dense_act_fn": "gated-gelu"})
    assert g.is_gated_act and g.dense_act_fn == "gelu_new"
    with pytest.raises(UnsupportedModelError, match="dense_act_fn"):
        ModelArgs.from_dict({"dense_act_fn": "swishy"})


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets(bidirectional):
    rel = torch.arange(-300, 300)[None, :]
    want = SwitchTransformersAttention._relative_position_bucket(rel, bidirectional, 32, 128)
    assert torch.equal(relative_position_bucket(rel, bidirectional, 32, 128), want)


def test_gated_ffn_matches_t5():
    """is_gated_act / "gated-*" (T5 v1.1 style, wi_0/wi_1/wo): transformers' Switch has no gated FFN, so
    T5's T5DenseGatedActDense is the oracle for the formula."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    from zipmoe_run.models.switch_transformers import DenseFF

    ref = T5DenseGatedActDense(T5Config(d_model=16, d_ff=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    ours = DenseFF(ModelArgs.from_dict({"d_model": 16, "d_ff": 32, "dense_act_fn": "gated-gelu"}))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))  # [B, T, D]
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-6
