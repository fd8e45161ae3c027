"""Ollama's ``/api/tags``, ``/api/generate`` and ``/api/chat`` on the same engine and validation as the
OpenAI endpoints: the body is translated into an OpenAI request (``options.num_predict`` ->
``max_tokens``, ``options.temperature`` / ``top_p`` / ``seed`` / ``stop``) and parsed by
``protocol.py``. Answers are Ollama's: newline-delimited JSON objects while streaming (the default),
the last with ``done: true``, ``done_reason`` and token counts; errors are ``{"error": "..."}``.
``/api/generate`` wraps the prompt in the chat template unless ``raw`` is true or there is none.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timezone

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .app import EventBridge, RequestLog, ServeContext, _ended, collect, read_body
from .errors import APIError, bad_request, from_exception
from .protocol import parse_chat, parse_completion

__all__ = ["routes"]

log = logging.getLogger("zipmoe_run.serve")
OLLAMA_TEMPERATURE = 0.8  # Ollama's default


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _err(api: APIError) -> Response:
    return Response(json.dumps({"error": api.message}), status_code=api.status, headers=api.headers,
                    media_type="application/json")


def _guard(handler):
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001
            api = from_exception(exc)
            if api is None:
                log.exception("%s %s failed", request.method, request.url.path)
                api = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
            return _err(api)
    return wrapped


def _openai_body(obj: dict, chat: bool, lm) -> dict:
    opts = obj.get("options") or {}
    if not isinstance(opts, dict):
        raise bad_request("'options' must be an object", "options")
    out: dict = {"model": obj.get("model"), "temperature": opts.get("temperature", OLLAMA_TEMPERATURE),
                 "top_p": opts.get("top_p"), "seed": opts.get("seed"), "stop": opts.get("stop")}
    n = opts.get("num_predict")
    if n is not None and n != -1:
        out["max_tokens"] = n
    stream = obj.get("stream", True)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    out["stream"] = stream
    if chat:
        out["messages"] = obj.get("messages")
        return out
    prompt, system = obj.get("prompt"), obj.get("system")
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' must be a non-empty string", "prompt")
    if system is not None and not isinstance(system, str):
        raise bad_request("'system' must be a string", "system")
    if obj.get("raw") is True or lm.tokenizer is None or not lm.tokenizer.chat_template:
        out["prompt"] = prompt
    else:
        out["messages"] = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
    return out


def routes(ctx: ServeContext) -> list[Route]:
    async def tags(request: Request) -> Response:
        ctx.check_auth(request)
        card = {"name": ctx.model_id, "model": ctx.model_id, "modified_at": _now(), "size": 0,
                "details": {"format": "zmoe", "family": ctx.lm.source.config.get("model_type", "")}}
        return Response(json.dumps({"models": [card]}), media_type="application/json")

    async def generate(request: Request) -> Response:
        return await _run(ctx, request, chat=False)

    async def chat(request: Request) -> Response:
        return await _run(ctx, request, chat=True)

    return [Route("/api/tags", _guard(tags), methods=["GET"]),
            Route("/api/generate", _guard(generate), methods=["POST"]),
            Route("/api/chat", _guard(chat), methods=["POST"])]


async def _run(ctx: ServeContext, request: Request, chat: bool) -> Response:
    ctx.check_auth(request)
    ctx.check_open()
    body = _openai_body(await read_body(request), chat, ctx.lm)
    req = (parse_chat if "messages" in body else parse_completion)(body, ctx.lm, ctx.model_id)
    bridge = EventBridge(asyncio.get_running_loop())
    h = ctx.submit(req, bridge)
    rlog = RequestLog(ctx, f"ollama-{h.request_id}", "chat" if chat else "generate", len(req.prompt_ids))
    t0 = time.perf_counter_ns()

    def obj(text: str, ev=None) -> dict:
        o: dict = {"model": ctx.model_id, "created_at": _now()}
        if chat:
            o["message"] = {"role": "assistant", "content": text}
        else:
            o["response"] = text
        o["done"] = ev is not None
        if ev is not None:
            o.update(done_reason=ev.finish_reason, prompt_eval_count=ev.prompt_tokens, eval_count=ev.completion_tokens,
                     total_duration=time.perf_counter_ns() - t0)
        return o

    async def lines():
        ev = None
        try:
            while True:
                ev = await bridge.next()
                if ev.token_id is not None:
                    rlog.token()
                if ev.finish_reason in ("cancelled", "error"):
                    yield json.dumps({"error": _ended(ev).message}) + "\n"
                    break
                if ev.text:
                    yield json.dumps(obj(ev.text)) + "\n"
                if ev.finish_reason is not None:
                    yield json.dumps(obj("", ev)) + "\n"
                    break
        finally:
            bridge.close()
            if not bridge.finished:
                h.cancel()
            rlog.done(ev.completion_tokens if ev is not None else 0, ev.finish_reason if bridge.finished else None)

    if req.stream:
        return StreamingResponse(lines(), media_type="application/x-ndjson")
    got = await collect(request, h, bridge, rlog)
    if got is None:
        return Response(status_code=499)  # the client left
    text, ev = got
    if ev.finish_reason in ("cancelled", "error"):
        raise _ended(ev)
    return Response(json.dumps(obj(text, ev)), media_type="application/json")
