"""`zipmoe serve`: the OpenAI API through the real `openai` client against a real uvicorn server on a
free port, on a small archive packed here from a synthetic qwen3_moe checkpoint (tokenizer + ChatML
template). Texts must equal the runtime's own greedy output for the same prompt; a load test checks
batching (none lost or duplicated, each greedy result equal to its single-request result, the budget
never exceeded); a client killed mid-stream must free its slot.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from zipmoe_run.api import load  # noqa: E402
from zipmoe_run.engine import Engine  # noqa: E402
from zipmoe_run.generate import Sampling  # noqa: E402
from zipmoe_run.serve.app import ServeContext  # noqa: E402
from zipmoe_run.serve.server import ServerThread  # noqa: E402

DIMS = {"experts": 8, "top_k": 2, "hidden": 128, "moe_intermediate": 128, "intermediate": 256, "layers": 2,
        "heads": 4, "kv_heads": 2, "vocab": 512}
CONTEXT = 96
MODEL = "tiny"


class Spy:
    """The engine, with every request's last event recorded (``finals``) and optional slowness per token."""

    def __init__(self, engine):
        self.engine = engine
        self.finals: dict[str, object] = {}
        self.delay_s = 0.0
        self.gate: threading.Event | None = None  # while set to an unset Event, the engine thread waits in a callback
        self.blocked = threading.Event()  # set once the engine thread waits at the gate

    def submit(self, prompt_ids, max_tokens, sampling, stop=(), on_event=None):
        def spy(ev):
            if ev.finish_reason is not None:
                self.finals[ev.request_id] = ev
            gate = self.gate
            if gate is not None:
                self.blocked.set()
                gate.wait(30)
            if self.delay_s:
                time.sleep(self.delay_s)
            if on_event is not None:
                on_event(ev)
        return self.engine.submit(prompt_ids, max_tokens, sampling, stop, on_event=spy)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from zipmoe_pack.pack import PackOptions, pack
    from zipmoe_pack.synth import make_checkpoint

    d = tmp_path_factory.mktemp("serve")
    ck = make_checkpoint(d / "ckpt", "qwen3_moe", seed=11, dims=DIMS,
                         config_overrides={"max_position_embeddings": CONTEXT})
    out = d / f"{MODEL}.zmoe"
    pack(ck, out, PackOptions(threads=2, chunk_elements=8192))
    return out


@pytest.fixture(scope="module")
def ref(archive):
    """The runtime on its own (no server, no budget): the expected greedy output."""
    with load(archive) as lm:
        yield lm


def greedy(ref, ids, n):
    """(token ids, text) of the runtime's greedy run, as `zipmoe-run --greedy` produces them."""
    out = ref.generate([list(ids)], max_new_tokens=n, sampling=Sampling(greedy=True))
    return out.token_ids[0], out.texts[0]


def start_server(archive, budget="50%", api_key=None, **engine_kw):
    lm = load(archive, memory_budget=budget)
    eng = Spy(Engine(lm, **engine_kw))
    eng.start()
    srv = ServerThread(ServeContext(eng, lm, MODEL, api_key=api_key)).start()
    return srv, eng, lm


def stop_server(srv, eng, lm):
    srv.stop()
    eng.shutdown(cancel=True, timeout=10)
    lm.close()


@pytest.fixture(scope="module")
def served(archive):
    srv, eng, lm = start_server(archive, max_batch=8, max_queue=64)
    yield srv, eng
    stop_server(srv, eng, lm)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(eng, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = eng.stats()
        if (not st["running"] and not st["waiting"]) or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------------- tests
def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(served[0].url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL
    for key in ("running", "waiting", "max_batch", "peak_rss_bytes", "memory_budget_bytes"):
        assert key in h, key
    assert h["max_batch"] == 8 and h["peak_rss_bytes"] > 0


@pytest.mark.parametrize("as_ids", [False, True])
def test_completion_text_equals_runtime(client, ref, as_ids):
    prompt = "The quick brown fox"
    ids = ref.tokenizer.encode(prompt)
    want_ids, want = greedy(ref, ids, 12)
    r = client.completions.create(model=MODEL, prompt=ids if as_ids else prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == ("length" if len(want_ids) == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want_ids))
    assert r.usage.total_tokens == len(ids) + len(want_ids)
    chunks = list(client.completions.create(model=MODEL, prompt=ids if as_ids else prompt, max_tokens=12,
                                            temperature=0, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_text_equals_runtime(client, ref):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    ids = ref.tokenizer.encode(ref.tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    want_ids, want = greedy(ref, ids, 10)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want_ids))
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format(served, ref):
    """Exactly OpenAI's framing: `data: {json}` events separated by blank lines, ending with `data: [DONE]`."""
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", served[0].url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    objs = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert objs[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert "".join(o["choices"][0]["text"] for o in objs) == greedy(ref, ref.tokenizer.encode("abc"), 4)[1]


def test_stop_string_cuts_text(client, ref):
    ids = ref.tokenizer.encode("Once upon a time")
    _, full = greedy(ref, ids, 24)
    stop = next((full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip(f"greedy text too short to pick a stop string: {full!r}")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]


def test_sampling_seeded_is_reproducible(client):
    kw = dict(model=MODEL, prompt="seeded", max_tokens=8, temperature=1.5, top_p=0.9, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_load_8_clients_32_requests(served, ref):
    """32 requests of mixed lengths from 8 concurrent clients: all answered once, each greedy answer equal to
    the runtime's single-request answer, the expert store never above its budget."""
    srv, eng = served
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    jobs = [(" ".join(words[: 1 + i % 11]) + f" #{i}", 2 + (i * 7) % 19) for i in range(32)]
    want = {i: greedy(ref, ref.tokenizer.encode(p), n)[1] for i, (p, n) in enumerate(jobs)}
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    done0 = eng.stats()["requests_done"]

    def one(i):
        p, n = jobs[i]
        if i % 2:
            return i, "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=p, max_tokens=n, temperature=0, stream=True))
        return i, client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(32)))
    assert sorted(i for i, _ in got) == list(range(32))
    assert {i: t for i, t in got} == want
    st = wait_idle(eng)
    assert st["requests_done"] - done0 == 32 and st["running"] == 0 and st["waiting"] == 0
    assert st["memory_budget_bytes"] > 0 and st["source"]["store_peak_bytes"] <= st["memory_budget_bytes"]


def test_client_killed_mid_stream_frees_slot(served, ref):
    srv, eng = served
    body = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 80, "temperature": 0, "stream": True}
    eng.delay_s = 0.02  # slow enough that the stream is still running when the client goes
    try:
        before = set(eng.finals)
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # first chunk read: now drop the connection
        st = wait_idle(eng)
    finally:
        eng.delay_s = 0.0
    assert st["running"] == 0 and st["waiting"] == 0
    new = [eng.finals[k] for k in set(eng.finals) - before]
    assert len(new) == 1 and new[0].finish_reason == "cancelled" and new[0].completion_tokens < 80


def test_client_gone_before_a_non_streaming_answer_frees_slot(served):
    """A non-streaming client that closes its connection is noticed while its answer is generated."""
    import socket

    srv, eng = served
    body = json.dumps({"model": MODEL, "prompt": [9, 8, 7], "max_tokens": 80, "temperature": 0}).encode()
    eng.delay_s = 0.02
    try:
        before = set(eng.finals)
        with socket.create_connection((srv.host, srv.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 30
            while not eng.stats()["running"] and time.monotonic() < deadline:
                time.sleep(0.01)
        st = wait_idle(eng)
    finally:
        eng.delay_s = 0.0
    new = [eng.finals[k] for k in set(eng.finals) - before]
    assert st["running"] == 0 and len(new) == 1
    assert new[0].finish_reason == "cancelled" and new[0].completion_tokens < 80


def test_ollama_generate_and_chat(served, ref):
    url = served[0].url
    ids = ref.tokenizer.encode("hello world")
    _, want = greedy(ref, ids, 6)
    r = httpx.post(url + "/api/generate", json={"model": MODEL, "prompt": "hello world", "raw": True, "stream": False,
                                                 "options": {"temperature": 0, "num_predict": 6}}, timeout=60)
    assert r.status_code == 200 and r.json()["response"] == want and r.json()["done"] is True
    cids = ref.encode("hi", chat=True)
    _, cwant = greedy(ref, cids, 6)
    with httpx.stream("POST", url + "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                       "options": {"temperature": 0, "num_predict": 6}}, timeout=60) as r:
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == len(greedy(ref, cids, 6)[0])
    assert "".join(x["message"]["content"] for x in lines) == cwant


def test_bench_serve_rows(archive):
    """`zipmoe bench serve`: a row per stream count (1 always: the sequential baseline), every request
    answered, greedy texts equal across stream counts, bytes per token from the engine's counters."""
    from zipmoe.bench.serve import render_table, run

    res = run(archive, budgets=["50%"], streams=[2], requests=3, max_tokens=3, repeat=2)
    assert [r["streams"] for r in res["rows"]] == [1, 2] and res["host_line"].startswith("host:")
    for r in res["rows"]:
        assert r["completed"] == 3 and not r["errors"] and r["same_text_as_sequential"] is True, (r["errors"], res)
        assert r["tokens"] >= 3 and r["bytes_per_token"] is not None and r["ttft_p90_s"] >= r["ttft_median_s"]
        assert r["store_peak_bytes"] <= r["budget_bytes"]
    assert res["rows"][0]["x_sequential"] == 1.0 and all(len(r["tok_s_runs"]) == 2 for r in res["rows"])
    assert "llamacpp" not in res
    assert render_table(res).row_count == 2
    # the server ran in its own process, in a memory cgroup capped at dense + budget + its measured overhead
    # (or, where no cgroup can be made here, uncapped and labelled so)
    from zipmoe.bench.e2e_proc import MemCap

    (srv,) = res["servers"]
    if MemCap.parent()[0] is None:
        assert res["cap"].startswith("uncapped: ") and all(r["cap_bytes"] is None for r in res["rows"])
        assert "uncapped" in str(render_table(res).columns[-2]._cells)
        return
    assert res["cap"].startswith("capped") and srv["overhead_bytes"] > 0
    assert srv["cap_bytes"] == srv["dense_bytes"] + srv["budget_bytes"] + srv["overhead_bytes"]
    for r in res["rows"]:
        assert r["cap_bytes"] == srv["cap_bytes"] and 0 < r["cap_peak_bytes"] <= r["cap_bytes"]
    assert "overhead" in str(render_table(res).caption)


def test_bench_serve_no_cap_is_labelled(archive):
    """`--no-cap`: the server process runs outside any cgroup and every row says it is uncapped."""
    from zipmoe.bench.serve import render_table, run

    res = run(archive, budgets=["50%"], streams=[1], requests=1, max_tokens=2, capped=False)
    assert res["cap"] == "uncapped by request (--no-cap)" and "cap_bytes" not in res["servers"][0]
    assert [(r["cap_bytes"], r["cap_note"], r["completed"]) for r in res["rows"]] == [(None, res["cap"], 1)]
    assert "uncapped" in str(render_table(res).columns[-2]._cells)


def test_bench_serve_llamacpp_peer_runs_or_says_why(archive):
    """`--llamacpp`: llama.cpp's server on a GGUF of the same checkpoint answers every request at every
    stream count, or the result says in one line why it was skipped (not installed, no GGUF for this
    architecture, the server did not start)."""
    from zipmoe.bench.serve import render_table, run

    res = run(archive, budgets=["100%"], streams=[2], requests=2, max_tokens=3, llamacpp=True)
    peer = res["llamacpp"]
    rows = [r for r in res["rows"] if r["system"] == "llamacpp"]
    if "skipped" in peer:
        assert isinstance(peer["skipped"], str) and peer["skipped"] and not rows
    else:
        assert [r["streams"] for r in rows] == [1, 2] and all(r["completed"] == 2 and not r["errors"] for r in rows)
        assert rows[0]["x_sequential"] == 1.0
        gguf = os.path.getsize(peer["gguf"])
        for r in rows:  # capped like our server: its own cgroup, or one line saying why not
            assert r["cap_note"].startswith(("capped: GGUF", "uncapped: ")), r["cap_note"]
            assert r["cap_bytes"] is None if r["cap_note"].startswith("uncapped") else r["cap_bytes"] > gguf
    assert "llama.cpp server" in str(render_table(res).caption)


def test_bench_serve_row_of_a_killed_server():
    """A server process that has ended (its cap killed it) gives a row of errors saying so, not a traceback,
    and no request counted as completed."""
    from zipmoe.bench.serve import _measure

    class Dead:
        def exit_reason(self):
            return "killed (OOM under the memory cap)"

    row, st0, st1 = _measure(Dead(), "http://127.0.0.1:9", "m", [[5, 6], [7, 8, 9]], 4, 2)
    assert (row["completed"], row["tokens"], st0, st1) == (0, 0, {}, {})
    assert row["errors"] == ["the server ended: killed (OOM under the memory cap)"] and row["texts"] == [None, None]


def test_bench_serve_server_that_cannot_start_is_one_error(archive):
    """A server process that exits before it is ready (here: a budget below the store's minimum) is one error
    naming its exit status and its last log line, and its cgroup is removed."""
    from zipmoe.bench.serve import run

    import os

    from zipmoe.bench.e2e_proc import MemCap

    with pytest.raises(RuntimeError, match=r"did not start \(exit 1\): .*below the minimum"):
        run(archive, budgets=["1KiB"], streams=[1], requests=1, max_tokens=2)
    parent = MemCap.parent()[0]
    assert parent is None or not list(parent.glob(f"zipmoe-bench-serve-{os.getpid()}-*"))
