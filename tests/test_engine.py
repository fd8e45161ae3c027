"""Batched decoding: ``DecoderLM.decode_step`` rows equal single-sequence steps bit for bit, and the
continuous-batching ``Engine`` gives every request the same tokens alone or in any batch."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
import torch

from zipmoe_pack.pack import PackOptions, pack
from zipmoe_run import kernel_select, kernels
from zipmoe_run.api import load
from zipmoe_run.engine import Engine, EngineClosedError, QueueFullError
from zipmoe_run.errors import GenerationError, PromptTooLongError, UnsupportedModelError
from zipmoe_run.generate import Sampling

DIMS = {"hidden": 128, "moe_intermediate": 128, "experts": 8, "top_k": 2, "layers": 2}


@pytest.fixture(autouse=True, scope="module")
def _numba_forced():
    """The numba kernel for every shape, so the multi-row kernel is what these tests exercise on any host
    (auto could choose torch for some shapes; one test forces torch)."""
    mp = pytest.MonkeyPatch()
    mp.setenv(kernel_select.ENV, "numba")
    kernel_select.reset()
    yield
    mp.undo()
    kernel_select.reset()


FAMILIES = {
    "qwen2_moe-window": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2}),
    "qwen3_moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", {}),
    "mixtral-window": ("mixtral", {"sliding_window": 4}),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_decode_step_rows_equal_single_sequence_steps(name, checkpoint_factory):
    """Each row of a ragged step (own cache, own position, sliding windows included) equals, bit for bit,
    the plain one-token forward of that sequence alone, for several steps."""
    family, over = FAMILIES[name]
    lm = load(checkpoint_factory(family, seed=4, dims=DIMS, config_overrides=over))
    m = lm.model
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20]]
    steps = 5

    def prefill(p):
        c = m.new_cache(1, len(p) + steps + 1)
        return c, m(torch.tensor([p]), c, 0, last_only=True)[:, -1]

    ref = []  # per prompt: logits of each decode step through the plain forward
    for p in prompts:
        c, lg = prefill(p)
        tok, out = int(lg.argmax()), []
        for s in range(steps):
            lg = m(torch.tensor([[tok]]), c, len(p) + s)[:, -1]  # [1, V]
            out.append(lg[0])
            tok = int(lg.argmax())
        ref.append(out)
    caches, toks = [], []
    for p in prompts:
        c, lg = prefill(p)
        caches.append(c)
        toks.append(int(lg.argmax()))
    for s in range(steps):
        lg = m.decode_step(toks, caches, [len(p) + s for p in prompts])  # [N, V]
        assert lg.shape == (len(prompts), m.args.vocab_size)
        for i in range(len(prompts)):
            assert torch.equal(lg[i].view(torch.int32), ref[i][s].view(torch.int32)), (name, i, s)
        toks = [int(t) for t in lg.argmax(-1)]
    lm.close()


@pytest.mark.parametrize("family", ["deepseek_v2", "switch_transformers"])
def test_engine_refuses_families_with_their_own_attention(family, checkpoint_factory):
    with load(checkpoint_factory(family, seed=1)) as lm:
        with pytest.raises(UnsupportedModelError, match=family):
            Engine(lm)


@pytest.fixture(scope="module")
def lm(checkpoint_factory):
    src = checkpoint_factory("qwen2_moe", seed=5, dims=DIMS, config_overrides={"max_position_embeddings": 64})
    with load(src) as loaded:
        yield loaded


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [11, 12], list(range(3, 20)), [20], [7, 7, 7, 7, 7], list(range(30, 43))]
MAX_TOKENS = [6, 9, 4, 11, 7, 5]


def _run_alone(lm, prompt, n, sampling=Sampling(), **kw):
    eng = Engine(lm, **kw).start()
    try:
        return eng.submit(prompt, n, sampling).result(60)
    finally:
        eng.shutdown()


def _run_staggered(lm, samplings, **kw):
    eng = Engine(lm, **kw).start()
    hs = []
    for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):  # join while others decode
        hs.append(eng.submit(p, n, samplings[i]))
        time.sleep(0.01 * (i % 3))
    res = [h.result(60) for h in hs]
    st = eng.stats()
    eng.shutdown()
    return res, st


def test_greedy_tokens_alone_or_in_any_batch(lm, monkeypatch):
    """6 requests of different lengths, submitted at staggered times into batches of 3 (so some wait and
    join later, chunked prefill interleaved with decode steps, in one sweep; also with up to 3 requests'
    chunks per sweep) give each request's tokens alone."""
    greedy = [Sampling()] * len(PROMPTS)
    batched, st = _run_staggered(lm, greedy, max_batch=3, prefill_chunk=4)
    alone = [_run_alone(lm, p, n, prefill_chunk=4) for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert [r[0] for r in batched] == [r[0] for r in alone]
    assert [r[1] for r in batched] == [r[1] for r in alone]
    assert all(r[2] == "length" and len(r[0]) == n for r, n in zip(batched, MAX_TOKENS))
    assert st["steps"] < sum(MAX_TOKENS) - len(PROMPTS)  # some steps really carried several sequences
    chunks = [-(-len(p) // 4) - (len(p) % 4 == 1 and len(p) > 1) for p in PROMPTS]  # no last chunk of 1 token
    assert st["prefill_chunks"] == sum(chunks) == 12
    assert 1 <= st["shared_sweeps"] <= st["prefill_chunks"]  # chunks that shared a sweep with a decode step
    assert st["prefill_chunks_per_sweep"] == 1  # all experts resident here: one request's chunk per iteration
    sizes, real = [], lm.model.sweep
    monkeypatch.setattr(lm.model, "sweep", lambda chunks, *r: (sizes.append(len(chunks)), real(chunks, *r))[1])
    eng = Engine(lm, max_batch=6, prefill_chunk=4, prefill_chunks=3)
    hs = [eng.submit(p, n, Sampling()) for p, n in zip(PROMPTS, MAX_TOKENS)]  # all there at the first iteration
    eng.start()
    several = [h.result(60) for h in hs]
    eng.shutdown()
    monkeypatch.undo()
    assert [r[0] for r in several] == [r[0] for r in alone] and eng.stats()["prefill_chunks"] == 12
    assert sizes[0] == 3  # nothing decoding yet: three requests' chunks in the first sweep
    # against generate (one whole-prompt prefill): with prefill_chunk=0, and chunked as well (torch's bf16
    # GEMM gives each row the same bits for any number of rows >= 2 on this host; see specs/runtime.md)
    whole, _ = _run_staggered(lm, greedy, max_batch=4, prefill_chunk=0)
    ref = [lm.generate(p, max_new_tokens=n).token_ids[0] for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert [r[0] for r in whole] == ref
    assert [r[0] for r in batched] == ref


def test_engine_follows_the_kernel_chosen_per_shape(lm, monkeypatch):
    """With torch chosen for every shape (as a host may choose), batched steps run one torch product per
    row, so tokens still equal the lone run's and ``generate``'s."""
    monkeypatch.setenv(kernel_select.ENV, "torch")
    kernel_select.reset()
    try:
        greedy = [Sampling()] * len(PROMPTS)
        batched, _ = _run_staggered(lm, greedy, max_batch=6, prefill_chunk=0)
        ref = [lm.generate(p, max_new_tokens=n).token_ids[0] for p, n in zip(PROMPTS, MAX_TOKENS)]
        assert [r[0] for r in batched] == ref
        assert set(kernels.CHOICE.values()) == {"torch"}
    finally:
        monkeypatch.setenv(kernel_select.ENV, "numba")
        kernel_select.reset()


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_chunked_prefill_logits_equal_whole_prompt_prefill(family, checkpoint_factory):
    """Prefill in chunks of >= 2 tokens gives the last position's logits of one whole-prompt forward, bit
    for bit (a last chunk of 1 token would not: it takes the one-row kernels, hence the engine merges it)."""
    m = load(checkpoint_factory(family, seed=6, dims=DIMS)).model
    for t, chunk in [(17, 4), (33, 16), (40, 16), (9, 2)]:
        ids = torch.randint(0, m.args.vocab_size, (1, t), generator=torch.Generator().manual_seed(t))
        whole = m(ids, m.new_cache(1, t), 0, last_only=True)
        cache, a = m.new_cache(1, t), 0
        while a < t:
            b = min(t, a + chunk)
            b = t if t - b == 1 else b
            last = m(ids[:, a:b], cache, a, last_only=True)
            a = b
        assert torch.equal(whole.view(torch.int32), last.view(torch.int32)), (family, t, chunk)


def test_seeded_sampling_alone_or_batched(lm):
    samp = [Sampling(greedy=False, temperature=1.5, top_p=0.9, seed=100 + i) for i in range(len(PROMPTS))]
    batched, _ = _run_staggered(lm, samp, max_batch=4, prefill_chunk=0)
    alone = [_run_alone(lm, p, n, s, prefill_chunk=0) for p, n, s in zip(PROMPTS, MAX_TOKENS, samp)]
    assert [r[0] for r in batched] == [r[0] for r in alone]
    ref = [lm.generate(p, max_new_tokens=n, sampling=s).token_ids[0] for p, n, s in zip(PROMPTS, MAX_TOKENS, samp)]
    assert [r[0] for r in batched] == ref
    assert len({tuple(r[0]) for r in batched}) > 1


def test_stop_strings_are_never_released(lm):
    ids, text, _ = _run_alone(lm, PROMPTS[0], 12)
    assert len(text) > 6
    stop = text[3:6]  # a stop string from the middle of the greedy text
    eng = Engine(lm).start()
    try:
        h = eng.submit(PROMPTS[0], 12, Sampling(), stop=["\x00never", stop])
        events = list(h)
    finally:
        eng.shutdown()
    got = "".join(e.text for e in events)
    assert got == text[:text.index(stop)] and events[-1].finish_reason == "stop"
    assert stop not in got and all(stop not in e.text for e in events)
    assert h.result()[1] == got and events[-1].completion_tokens == len(events)
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)


def test_eos_stops(lm):
    ids, _, _ = _run_alone(lm, PROMPTS[1], 8)
    eos_lm = dataclasses.replace(lm, eos_token_ids=[ids[3]])
    got, _, finish = _run_alone(eos_lm, PROMPTS[1], 8)
    assert got == ids[:ids.index(ids[3]) + 1] and finish == "stop"


def test_validation_queue_and_closing(lm):
    eng = Engine(lm, max_queue=2)  # not started: requests stay queued
    for bad in ([], [5, lm.model.args.vocab_size], ["a"]):
        with pytest.raises(GenerationError):
            eng.submit(bad, 4, Sampling())
    for n in (0, -1, 2.5, True):
        with pytest.raises(GenerationError, match="max_tokens"):
            eng.submit([5], n, Sampling())
    with pytest.raises(PromptTooLongError):
        eng.submit(list(range(64)), 4, Sampling())
    h1, h2 = eng.submit([5], 4, Sampling()), eng.submit([6], 4, Sampling())
    with pytest.raises(QueueFullError) as ei:
        eng.submit([7], 4, Sampling())
    assert isinstance(ei.value, GenerationError) and ei.value.retry_after_s >= 1.0
    h2.cancel()
    eng.start()
    assert h1.result(60)[2] == "length" and len(h1.result()[0]) == 4
    assert h2.result(60) == ([], "", "cancelled")
    clipped = eng.submit(list(range(1, 61)), 10, Sampling())  # 60 of 64 positions: 4 tokens fit
    ids, _, finish = clipped.result(60)
    assert len(ids) == 4 and finish == "length"
    eng.shutdown()
    with pytest.raises(EngineClosedError):
        eng.submit([5], 4, Sampling())


def test_cancel_frees_the_slot_and_shutdown_cancels(lm):
    eng = Engine(lm, max_batch=1).start()
    first = threading.Event()
    h = eng.submit([5, 6], 50, Sampling(), on_event=lambda ev: first.set())
    waiting = eng.submit([8, 9], 50, Sampling())  # waits for the one slot
    assert first.wait(30)
    h.cancel()
    evs = list(h)
    assert evs[-1].finish_reason == "cancelled" and evs[-1].token_id is None and len(evs) < 51
    deadline = time.time() + 30
    while not waiting.token_ids and time.time() < deadline:  # the slot went to the waiting request
        time.sleep(0.01)
    assert waiting.token_ids
    eng.shutdown(cancel=True, timeout=30)
    assert waiting.result(1)[2] == "cancelled" and eng.stats()["running"] == 0


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(lm, monkeypatch, caplog):
    real = lm.model.decode_step
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure\nsecond line")
        return real(*a, **kw)

    monkeypatch.setattr(lm.model, "decode_step", flaky)
    eng = Engine(lm).start()
    try:
        with caplog.at_level(logging.ERROR, logger="zipmoe_run.engine"):
            bad = eng.submit([5, 6, 7], 6, Sampling())
            ids, _, finish = bad.result(60)
        assert finish == "error" and bad.error == "decode step failed: RuntimeError: injected failure"
        assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
        good = eng.submit([5, 6, 7], 6, Sampling()).result(60)
        assert good[2] == "length" and len(good[0]) == 6
    finally:
        eng.shutdown()


def test_a_failing_shared_sweep_fails_the_chunk_and_the_rows_and_the_engine_goes_on(lm, monkeypatch):
    """A prefill chunk that shares its sweep with a decode step fails with it: both the prompt's request and
    the decoding rows end with one error line; later requests run."""
    def broken(*a, **kw):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(lm.model, "sweep", broken)
    eng = Engine(lm, max_batch=2, prefill_chunk=4)
    started = threading.Event()
    a = eng.submit([5, 6], 40, Sampling(), on_event=lambda ev: started.set())
    eng.start()
    try:
        assert started.wait(30)
        b = eng.submit(list(range(3, 20)), 2, Sampling())
        assert [h.result(60)[2] for h in (a, b)] == ["error", "error"]
        assert a.error == b.error == "prefill chunk and decode step failed: RuntimeError: injected failure"
        good = eng.submit([5, 6, 7], 6, Sampling()).result(60)
        assert good[2] == "length" and len(good[0]) == 6
    finally:
        eng.shutdown()


def test_budget_kept_and_batching_reads_fewer_expert_bytes_per_token(store_archive, caplog):
    """Under a budget the store's peak never passes it, and where single sequences cannot keep their own
    experts resident (15 %), a batch of 6 reads fewer expert bytes per generated token than the same 6
    requests one after another (measured from the source's stats: each step fetches the union once).
    At 30 % this tiny checkpoint turns it round (a lone greedy sequence keeps reusing the 2 of 8 experts it
    routes to, while a batch's union, nearly every expert, cycles through the store): checked there only
    for the budget."""
    arc, _ = store_archive(3)
    prompts = [[5 + i, 9, 13 + 2 * i, 4] for i in range(6)]

    def run(budget, max_batch):
        with load(arc, memory_budget=budget, threads=2) as lmb:
            eng = Engine(lmb, max_batch=max_batch).start()
            assert eng.stats()["prefill_chunks_per_sweep"] == max_batch  # the experts do not all fit
            hs = [eng.submit(p, 8, Sampling()) for p in prompts]
            res = [h.result(120) for h in hs]
            eng.shutdown()
            assert [h.error for h in hs] == [None] * len(hs), f"{budget}, batch {max_batch}: a step failed"
            lmb.source.store.drain_prefetch()
            st = lmb.source.stats()
        assert st["budget_bytes"] and st["store_peak_bytes"] <= st["budget_bytes"], st
        return [r[0] for r in res], st, st["bytes_read"] / sum(len(r[0]) for r in res)

    with caplog.at_level(logging.INFO, logger="zipmoe_run.engine"):
        seq_ids, seq_st, seq_bpt = run("15%", 1)
        bat_ids, bat_st, bat_bpt = run("15%", 6)
    assert bat_ids == seq_ids
    assert bat_st["requests"] < seq_st["requests"]  # expert requests: the union of a step, once
    assert bat_bpt < 0.9 * seq_bpt, (bat_bpt, seq_bpt)
    lines = [r.getMessage() for r in caplog.records if "completion tokens" in r.getMessage()]
    assert len(lines) == 12 and all("expert bytes read" in x and "finish " in x for x in lines)
    assert run("30%", 6)[0] == seq_ids


class _PieceTokenizer:
    """decode(ids) joins fixed pieces: enough for IncrementalDecoder."""

    PIECES = ["x", "a", "b", "c", "ab", "yz"]

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


@pytest.mark.parametrize("tokens,stops,released,stopped", [
    ([0, 1, 2, 0], ("ab",), ["x", "", "", ""], True),  # "a" held back until "b" completes the stop string
    ([0, 1, 3, 0], ("ab",), ["x", "", "ac", "x"], False),  # "a" released once "c" rules the stop out
    ([0, 4, 0], ("xa", "b"), ["", ""], True),  # the earliest of two stop strings wins: nothing released
    ([0, 4, 0], ("q", "b"), ["x", "a"], True),  # "b" inside a token: the text before it is released
    ([5, 0, 1], ("zx", "q"), ["y", "", ""], True),  # a stop string across two tokens
    ([1, 1], ("ab",), ["", "aa"], False),  # the last token flushes what was held back
])
def test_text_stream_holds_back_possible_stop_prefixes(tokens, stops, released, stopped):
    from zipmoe_run.engine_text import TextStream

    ts = TextStream(_PieceTokenizer(), stops)
    got = []
    for i, t in enumerate(tokens):
        text, hit = ts.add(t, final=i == len(tokens) - 1)
        got.append(text)
        if hit:
            break
    assert got == released[:len(got)] and hit == stopped
    full = "".join(_PieceTokenizer.PIECES[t] for t in tokens)
    assert not any(s in "".join(got) for s in stops)
    if not stopped:
        assert "".join(got) == full


def test_prefill_chunks_interleave_with_decode_steps(lm):
    """A long prompt is prefilled one chunk per token boundary: a running stream gets a token between
    every two chunks of it, never waiting more than one chunk."""
    eng = Engine(lm, max_batch=2, prefill_chunk=4)
    log: list[str] = []
    real = eng._sweep

    def chunk(pres, rows):
        log.extend(f"chunk {s.h.request_id}" for s in pres)
        real(pres, rows)

    eng._sweep = chunk
    started = threading.Event()
    a = eng.submit([5, 6], 40, Sampling(), on_event=lambda ev: (log.append("token a"), started.set()))
    eng.start()
    assert started.wait(30)
    b = eng.submit(list(range(3, 43)), 2, Sampling())  # 40 tokens: 10 chunks of 4
    b.result(60)
    a.cancel()
    a.result(60)
    eng.shutdown()
    seq = log[log.index(f"chunk {b.request_id}"):]
    b_chunks = [i for i, x in enumerate(seq) if x == f"chunk {b.request_id}"]
    assert len(b_chunks) == 10
    assert all("token a" in seq[i + 1:j] for i, j in zip(b_chunks, b_chunks[1:]))


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _prefill(m, p, extra):
    c = m.new_cache(1, len(p) + extra)
    return c, int(m(torch.tensor([p]), c, 0, last_only=True)[0, -1].argmax())


@pytest.mark.parametrize("name", ["qwen2_moe-window", "mixtral-window"])
def test_prefill_and_decode_step_equals_the_two_separate_calls(name, checkpoint_factory):
    """``prefill_and_decode_step`` (the chunk's and the rows' layer calls interleaved, layer by layer) returns
    the logits of ``forward`` on the chunk and of ``decode_step`` on the rows, byte for byte, and leaves the
    same KV caches; chunks of several tokens, of one token (the one-row kernel scope) and the whole prompt."""
    family, over = FAMILIES[name]
    lm = load(checkpoint_factory(family, seed=7, dims=DIMS, config_overrides=over))
    m = lm.model
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    chunk_prompt = list(range(20, 33))
    outs = []
    for combined in (False, True):
        rows = [_prefill(m, p, 8) for p in prompts]
        caches, toks = [c for c, _ in rows], [t for _, t in rows]
        pos = [len(p) for p in prompts]
        cc, got = m.new_cache(1, len(chunk_prompt)), []
        for a, b, last_only in [(0, 4, True), (4, 5, True), (5, 13, False)]:
            x = torch.tensor([chunk_prompt[a:b]])  # [1, T]
            if combined:
                lc, lr = m.prefill_and_decode_step(x, cc, a, toks, caches, pos, last_only=last_only)
            else:
                lc, lr = m(x, cc, a, last_only=last_only), m.decode_step(toks, caches, pos)
            got += [lc, lr]
            toks, pos = [int(t) for t in lr.argmax(-1)], [q + 1 for q in pos]
        got += [t for c in [cc, *caches] for t in (*c.k, *c.v)]  # every layer's KV, [1, Hkv, S, D] each
        outs.append(got)
    for i, (x, y) in enumerate(zip(*outs)):
        assert x.shape == y.shape and x.dtype == y.dtype, (name, i)
        assert _raw(x) == _raw(y), (name, i)
    lm.close()


def test_chunks_per_sweep_beside_decoding_rows_fit_one_step(lm):
    """With nothing decoding every prefilling request (up to ``prefill_chunks``) gets a chunk; beside decoding
    rows as many as one decode step's measured time covers at the measured compute per chunk, at least one,
    and one until both are measured."""
    eng = Engine(lm, max_batch=8, prefill_chunks=8)
    assert (eng._chunks_now(False), eng._chunks_now(True)) == (8, 1)
    eng._note(0, 1.0, 0.7)  # a decode step alone: 1.0 s
    eng._note(2, 0.9, 0.3)  # two chunks, 0.9 s of which 0.3 s waiting for fetches: 0.3 s of compute each
    assert (eng._chunks_now(False), eng._chunks_now(True)) == (8, 3)
    eng._note(1, 5.0, 0.0)  # a slow chunk: (0.7 * 0.3 + 0.3 * 5.0) = 1.71 s per chunk, more than a step
    assert eng._chunks_now(True) == 1
    assert Engine(lm, max_batch=8)._chunks_now(False) == 1  # every expert fits here: one chunk, as before


def test_sweep_of_several_chunks_equals_the_separate_calls(lm):
    """``DecoderLM.sweep``: chunks of two prompts (one of them one token, the one-row scope), with and without a
    decode step beside them, give each ``forward``'s and ``decode_step``'s logits and KV, byte for byte."""
    m = lm.model
    outs = []
    for together in (False, True):
        rows = [_prefill(m, p, 4) for p in ([5, 6, 7], [8, 9, 10, 11, 12])]
        caches, toks, pos = [c for c, _ in rows], [t for _, t in rows], [3, 5]
        ca, cb, got = m.new_cache(1, 12), m.new_cache(1, 12), []
        for step in [[(torch.tensor([[20, 21, 22, 23]]), ca, 0, True), (torch.tensor([[30]]), cb, 0, False)],
                     [(torch.tensor([[24, 25]]), ca, 4, False), (torch.tensor([[31, 32, 33]]), cb, 1, True)]]:
            for with_rows in (False, True):
                r = (toks, caches, pos) if with_rows else ((), (), ())
                if together:
                    lcs, lr = m.sweep(step, *r)
                else:
                    lcs = [m(ids, c, a, last_only=lo) for ids, c, a, lo in step]
                    lr = m.decode_step(*r) if with_rows else None
                got += lcs + ([lr] if with_rows else [])
                if with_rows:
                    toks, pos = [int(t) for t in lr.argmax(-1)], [q + 1 for q in pos]
                step = [(ids, c, a + ids.shape[1], lo) for ids, c, a, lo in step]  # the next chunks of the same prompts
        got += [t for c in [ca, cb, *caches] for t in (*c.k, *c.v)]
        outs.append([_raw(t) for t in got])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("policy", ["zipmoe", "lru"])
def test_prefill_and_decode_step_reads_fewer_expert_bytes_at_a_tight_budget(policy, checkpoint_factory, tmp_path):
    """At a budget (30 %) that holds about two layers' experts of six, a chunk's sweep of every layer leaves none of
    the first layers' experts for the rows' fetches after it: the two calls one after the other read each
    layer twice. Interleaved, the rows' fetch of a layer comes right after the chunk's and finds what that
    one just read resident: fewer expert bytes read (the store's counters), the same logits."""
    src = checkpoint_factory("mixtral", seed=8, dims={"hidden": 256, "moe_intermediate": 512, "experts": 4,
                                                     "top_k": 2, "layers": 6}, peaky_router=False)
    arc = tmp_path / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=8192))
    prompts = [[5 + i, 9, 13 + 2 * i, 4] for i in range(6)]
    chunk = torch.tensor([list(range(40, 56))])  # [1, 16]

    def run(budget, combined):  # -> logits, expert bytes read, expert requests
        with load(arc, memory_budget=budget, threads=2, policy=policy) as lmb:
            m = lmb.model
            rows = [_prefill(m, p, 4) for p in prompts]
            caches, toks, pos = [c for c, _ in rows], [t for _, t in rows], [len(p) for p in prompts]
            cc, got = m.new_cache(1, 48), []
            st = lmb.source.store
            st.drain_prefetch()
            before = lmb.source.stats()
            for i in range(3):
                x = chunk + i
                if combined:
                    lc, lr = m.prefill_and_decode_step(x, cc, 16 * i, toks, caches, pos, last_only=True)
                else:
                    lc, lr = m(x, cc, 16 * i, last_only=True), m.decode_step(toks, caches, pos)
                got += [lc, lr]
                toks, pos = [int(t) for t in lr.argmax(-1)], [q + 1 for q in pos]
            st.drain_prefetch()
            after = lmb.source.stats()
            assert after["store_peak_bytes"] <= after["budget_bytes"]
        return got, after["bytes_read"] - before["bytes_read"], after["requests"] - before["requests"]

    sep, sep_read, sep_req = run("30%", False)
    com, com_read, com_req = run("30%", True)
    assert [_raw(a) for a in sep] == [_raw(b) for b in com]
    assert com_req == sep_req  # the same expert requests, in another order
    assert com_read < 0.8 * sep_read, (com_read, sep_read)  # measured: 0.59 (zipmoe), 0.55 (lru)
