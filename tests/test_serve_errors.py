"""`zipmoe serve`: every error answer is an OpenAI error object with the right status (400 malformed JSON
or fields, 400 prompt longer than the context, 404 unknown model or endpoint, 401 with --api-key, 429 with
Retry-After when the queue is full, 503 for streams cut by a shutdown); the command line's one-line errors
and a graceful SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tests.clirun import ROOT, assert_one_line_error, zipmoe  # noqa: E402
from tests.test_serve import CONTEXT, MODEL, archive, start_server, stop_server, wait_idle  # noqa: E402,F401

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def served(archive):  # noqa: F811
    srv, eng, lm = start_server(archive, api_key=KEY, max_batch=1, max_queue=1)
    yield srv, eng
    stop_server(srv, eng, lm)


def _post(srv, path, body, key=KEY, raw=False):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw:
        headers["Content-Type"] = "application/json"
        return httpx.post(srv.url + path, content=body, headers=headers, timeout=60)
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=60)


def _error(r, status, *needles, param=None, code=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and "\n" not in err["message"] and err["type"]
    for n in needles:
        assert n in err["message"], (n, err["message"])
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "malformed JSON"), (b"", "empty"), (b"[1, 2]", "JSON object"),
    (b'{"model": "tiny", "model": "x"}', "duplicate key"), (b'{"max_tokens": 1e999}', "malformed JSON"),
    (b"[" * 5000 + b"]" * 5000, "malformed JSON"), (b"\xff\xfe", "malformed JSON"),
])
def test_malformed_json_is_400(served, body, needle):
    for path in ("/v1/completions", "/v1/chat/completions", "/api/generate"):
        r = _post(served[0], path, body, raw=True)
        assert r.status_code == 400, r.text
        msg = r.json()["error"]
        assert needle in (msg["message"] if isinstance(msg, dict) else msg)


_P = {"model": MODEL, "prompt": "hi"}
_C = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/completions", {**_P, "model": 7}, "model"),
    ("/v1/completions", {**_P, "n": 2}, "n"),
    ("/v1/chat/completions", {**_C, "n": 3}, "n"),
    ("/v1/completions", {**_P, "temperature": 2.5}, "temperature"),
    ("/v1/completions", {**_P, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**_P, "top_p": 0}, "top_p"),
    ("/v1/completions", {**_P, "seed": -1}, "seed"),
    ("/v1/completions", {**_P, "seed": 1.5}, "seed"),
    ("/v1/completions", {**_P, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**_P, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {**_C, "max_completion_tokens": -3}, "max_completion_tokens"),
    ("/v1/completions", {**_P, "stop": [1]}, "stop"),
    ("/v1/completions", {**_P, "stop": [""]}, "stop"),
    ("/v1/completions", {**_P, "stop": ["a"] * 17}, "stop"),
    ("/v1/completions", {**_P, "stream": "yes"}, "stream"),
    ("/v1/completions", {**_P, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {**_P, "logprobs": 2}, "logprobs"),
    ("/v1/completions", {**_P, "echo": True}, "echo"),
    ("/v1/chat/completions", {**_C, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {**_C, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {**_P, "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {**_P, "prompt": ""}, "prompt"),
    ("/v1/completions", {**_P, "prompt": []}, "prompt"),
    ("/v1/completions", {**_P, "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {**_P, "prompt": [1, 100000]}, "prompt"),
    ("/v1/completions", {**_P, "prompt": [1, -2]}, "prompt"),
    ("/v1/completions", {**_P, "prompt": {"x": 1}}, "prompt"),
    ("/v1/chat/completions", {**_C, "messages": []}, "messages"),
    ("/v1/chat/completions", {**_C, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {**_C, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**_C, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {**_C, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {**_C, "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_fields_are_400_naming_the_field(served, path, body, param):
    _error(_post(served[0], path, body), 400, param=param)


def test_body_over_the_limit_is_413_before_reading(served):
    from zipmoe_run.serve.protocol import MAX_BODY

    import socket

    srv = served[0]
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:  # the body is never sent
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                  b"Content-Length: %d\r\n\r\n" % (KEY.encode(), MAX_BODY + 1))
        answer = b""
        while b"}}" not in answer:
            part = s.recv(65536)
            if not part:
                break
            answer += part
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit" in answer


def test_prompt_longer_than_context_is_400(served):
    r = _post(served[0], "/v1/completions", {**_P, "prompt": [5] * CONTEXT})
    _error(r, 400, str(CONTEXT), param="prompt", code="context_length_exceeded")
    r = _post(served[0], "/v1/chat/completions", {**_C, "messages": [{"role": "user", "content": "word " * 400}]})
    _error(r, 400, "context", param="messages", code="context_length_exceeded")
    # the longest prompt that fits leaves room for one token: accepted, cut to the context
    r = _post(served[0], "/v1/completions", {**_P, "prompt": [5] * (CONTEXT - 1), "max_tokens": 50, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_unknown_model_and_endpoint_are_404(served):
    srv = served[0]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found" and "gpt-4" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny.zmoe", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert client.models.retrieve(MODEL).id == MODEL
    _error(httpx.get(srv.url + "/v1/nothing"), 404, "/v1/nothing")
    _error(httpx.get(srv.url + "/v1/completions"), 405)
    r = _post(srv, "/api/generate", {"model": "llama3", "prompt": "x"})
    assert r.status_code == 404 and "llama3" in r.json()["error"]


def test_api_key_required(served):
    srv = served[0]
    for key in (None, "sk-wrong"):
        _error(_post(srv, "/v1/completions", {**_P, "max_tokens": 1}, key=key), 401, "API key", code="invalid_api_key")
    r = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Basic {KEY}"})
    _error(r, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert _post(srv, "/api/chat", {**_C, "stream": False}, key=None).status_code == 401
    ok = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.prompt_tokens > 0
    assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key


def test_queue_full_is_429_with_retry_after(served):
    """max_batch 1, max_queue 1: one request runs (held at a gate), one waits, the third is refused."""
    srv, eng = served
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    gate = threading.Event()
    eng.blocked.clear()
    eng.gate = gate
    results: list = []

    def call():
        results.append(client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0))

    first = threading.Thread(target=call)
    try:
        first.start()
        assert eng.blocked.wait(30)
        second = threading.Thread(target=call)
        second.start()
        deadline = time.monotonic() + 30
        while eng.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="abc", max_tokens=3)
        assert e.value.status_code == 429 and int(e.value.response.headers["Retry-After"]) >= 1
        assert e.value.body["type"] == "rate_limit_error"
    finally:
        eng.gate = None
        gate.set()
    first.join(60)
    second.join(60)
    assert len(results) == 2 and results[0].choices[0].text == results[1].choices[0].text
    assert wait_idle(eng)["running"] == 0


def test_drain_cancels_open_streams_cleanly(archive):  # noqa: F811
    """Shutdown with a stream still running past the grace period: the client gets an error chunk and
    `data: [DONE]`, not a cut connection; /health says shutting_down; new requests get 503."""
    from zipmoe_run.serve.server import drain

    srv, eng, lm = start_server(archive, max_batch=2, max_queue=2)
    try:
        eng.delay_s = 0.05
        body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 80, "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(x for x in lines if x.startswith("data: {"))
            threading.Thread(target=drain, args=(srv.ctx, 0.2)).start()
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: "):])
        assert last["error"]["code"] == "cancelled"
        assert httpx.get(srv.url + "/health").json()["status"] == "shutting_down"
        r = httpx.post(srv.url + "/v1/completions", json={**_P, "max_tokens": 2}, timeout=30)
        _error(r, 503, code="shutting_down")
    finally:
        eng.delay_s = 0
        stop_server(srv, eng, lm)


def test_cli_errors_are_one_line(archive, tmp_path):  # noqa: F811
    assert_one_line_error(zipmoe("serve", tmp_path / "none.zmoe", "--port", "0"), "none.zmoe")
    assert_one_line_error(zipmoe("serve", archive, "--port", "70000"), "--port")
    assert_one_line_error(zipmoe("serve", archive, "--max-batch", "0"), "--max-batch")
    assert_one_line_error(zipmoe("serve", archive, "--max-queue", "0"), "--max-queue")
    assert_one_line_error(zipmoe("serve", archive, "--memory-budget", "lots"), "--memory-budget")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert_one_line_error(zipmoe("serve", archive, "--port", str(port)), f"127.0.0.1:{port}")


def test_cli_serves_and_stops_on_sigterm(archive):  # noqa: F811
    code = "import sys; from zipmoe.cli import main; sys.argv = ['zipmoe'] + sys.argv[1:]; main()"
    p = subprocess.Popen([sys.executable, "-c", code, "serve", str(archive), "--port", "0", "--memory-budget", "50%",
                          "--grace", "5"], cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        line = p.stderr.readline()
        while line and "serving" not in line:
            line = p.stderr.readline()
        assert "serving 'tiny'" in line and "memory budget" in line, line
        url = line.split(" at ")[1].split(" ")[0].removesuffix("/v1")
        assert url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 30
        while True:
            try:
                h = httpx.get(url + "/health", timeout=5).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert h["status"] == "ok" and h["memory_budget_bytes"] > 0
        r = httpx.post(url + "/v1/completions", json={**_P, "max_tokens": 3, "temperature": 0}, timeout=60)
        assert r.status_code == 200
        # a stream in flight when SIGTERM arrives finishes within the grace period, then the process exits 0
        body = {**_P, "prompt": [5, 6, 7], "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            assert next(x for x in lines if x.startswith("data: {"))
            p.send_signal(signal.SIGTERM)
            rest_of_stream = [x for x in lines if x]
        assert rest_of_stream[-1] == "data: [DONE]"
        assert json.loads(rest_of_stream[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
        rest = p.stderr.read()
        assert p.wait(30) == 0, rest
        assert "cmpl-" in rest and "tok/s" in rest and "served 2 requests" in rest, rest
        assert "MiB budget, peak RSS" in rest  # the request log line reports the budget and peak RSS
        assert "Traceback" not in rest
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_bench_serve_usage_errors(archive, tmp_path):  # noqa: F811
    assert_one_line_error(zipmoe("bench", "serve", archive, "--streams", "1,x"), "--streams")
    assert_one_line_error(zipmoe("bench", "serve", archive, "--streams", "0"), "--streams")
    assert_one_line_error(zipmoe("bench", "serve", tmp_path / "none.zmoe"), "none.zmoe")
