"""The ASGI app (starlette): OpenAI's ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/health``, and Ollama's ``/api/*`` (``ollama.py``), on one batched :class:`zipmoe_run.engine.Engine`.

Each request is parsed and validated (``protocol.py``), submitted to the engine with a callback that
hands every :class:`EngineEvent` from the engine thread to this request's asyncio queue, and answered
as one JSON object or as server-sent events (``data: {...}`` chunks, ``data: [DONE]``). A client that
goes away (streaming or not) cancels its handle, which frees its batch slot and KV cache at the next
token boundary. Errors are OpenAI error objects (``errors.py``); an unexpected exception is logged
with its traceback and answered 500.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..generate import peak_rss_bytes
from .errors import APIError, error_body, from_exception
from .protocol import MAX_BODY, GenRequest, chunk, parse_body, parse_chat, parse_completion, response, usage_chunk

__all__ = ["ServeContext", "create_app", "EventBridge", "RequestLog", "read_body", "collect"]

log = logging.getLogger("zipmoe_run.serve")
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class EventBridge:
    """Engine events of one request, from the engine thread into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._get: asyncio.Future | None = None

    def put(self, ev) -> None:  # runs on the engine thread: hand over and return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed (server stopped): nobody is waiting
            pass

    async def next(self, timeout: float | None = None):
        """The next event, or None after ``timeout`` seconds without one (the pending get survives)."""
        if self._get is None:
            self._get = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({self._get}, timeout=timeout)
        if not done:
            return None
        ev, self._get = self._get.result(), None
        if ev.finish_reason is not None:
            self.finished = True
        return ev

    def close(self) -> None:
        if self._get is not None and not self._get.done():
            self._get.cancel()


class ServeContext:
    """What the handlers share: the engine, the loaded model, the served id and the API key."""

    def __init__(self, engine, lm, model_id: str, api_key: str | None = None):
        self.engine = engine
        self.lm = lm
        self.model_id = model_id
        self.api_key = api_key
        self.created = int(time.time())
        self.closing = False

    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            what = "missing" if not got else "wrong"
            raise APIError(401, f"{what} API key: send 'Authorization: Bearer KEY' with the server's --api-key",
                           type="invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_open(self) -> None:
        if self.closing:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")

    def source_stats(self) -> dict:
        try:
            return self.lm.source.stats()
        except Exception:  # noqa: BLE001 - log figures only
            return {}

    def source_bytes_read(self) -> int:
        try:
            return int(self.source_stats().get("bytes_read", 0) or 0)
        except (TypeError, ValueError):
            return 0

    def submit(self, req: GenRequest, bridge: EventBridge):
        return self.engine.submit(req.prompt_ids, req.max_tokens, req.sampling, req.stop, on_event=bridge.put)


class RequestLog:
    """Timing of one request, logged as one line when it ends."""

    def __init__(self, ctx: ServeContext, rid: str, kind: str, prompt_tokens: int):
        self.ctx, self.rid, self.kind, self.prompt_tokens = ctx, rid, kind, prompt_tokens
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.read0 = ctx.source_bytes_read() if log.isEnabledFor(logging.INFO) else 0

    def token(self) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0

    def done(self, completion_tokens: int, finish: str | None) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        dt = time.perf_counter() - self.t0
        rate = completion_tokens / dt if dt > 0 else 0.0
        st = self.ctx.source_stats()
        mib = (int(st.get("bytes_read", 0) or 0) - self.read0) / (1 << 20)
        ttft = f"{self.ttft:.3f} s" if self.ttft is not None else "-"
        mem = f"peak RSS {peak_rss_bytes() / (1 << 20):.0f} MiB"
        if st.get("budget_bytes"):
            mem = (f"store {int(st.get('store_bytes', 0) or 0) / (1 << 20):.1f} of {st['budget_bytes'] / (1 << 20):.1f} "
                   f"MiB budget, {mem}")
        log.info("%s %s: prompt %d tok, %d tok in %.2f s (%.2f tok/s), TTFT %s, finish %s, experts read %.1f MiB "
                 "(whole batch, while it ran), %s", self.rid, self.kind, self.prompt_tokens, completion_tokens, dt, rate,
                 ttft, finish or "disconnected", mib, mem)


def _json(obj: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, default=str), status_code=status, headers=headers, media_type="application/json")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _guard(handler: Callable) -> Callable:
    """Answer APIError and the engine's expected errors as OpenAI error objects; 500 for a bug."""
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
            api = from_exception(exc, prompt_param=getattr(exc, "prompt_param", "prompt"))
            if api is None:
                log.exception("%s %s failed", request.method, request.url.path)
                api = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
            elif api.status >= 500 or api.status == 429:
                log.warning("%s %s: %d %s", request.method, request.url.path, api.status, api.message)
            return api.response()
    return wrapped


def create_app(ctx: ServeContext, *, extra_routes: list | None = None) -> Starlette:
    async def models(request: Request) -> Response:
        ctx.check_auth(request)
        return JSONResponse({"object": "list", "data": [_model_card(ctx)]})

    async def model(request: Request) -> Response:
        ctx.check_auth(request)
        mid = request.path_params["model"]
        if mid != ctx.model_id:
            raise APIError(404, f"the model {mid!r} does not exist; this server serves {ctx.model_id!r}",
                           param="model", code="model_not_found")
        return JSONResponse(_model_card(ctx))

    async def health(request: Request) -> Response:
        st = ctx.engine.stats()
        return _json({"status": "shutting_down" if ctx.closing else "ok", "model": ctx.model_id, **st})

    async def chat(request: Request) -> Response:
        return await _generate(ctx, request, parse_chat, "messages")

    async def completions(request: Request) -> Response:
        return await _generate(ctx, request, parse_completion, "prompt")

    routes = [
        Route("/v1/models", _guard(models), methods=["GET"]),
        Route("/v1/models/{model:path}", _guard(model), methods=["GET"]),
        Route("/v1/chat/completions", _guard(chat), methods=["POST"]),
        Route("/v1/completions", _guard(completions), methods=["POST"]),
        Route("/health", _guard(health), methods=["GET"]),
        *(extra_routes or []),
    ]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = "method not allowed" if status == 405 else f"no such endpoint: {request.method} {request.url.path}"
        return _json(error_body(msg, "invalid_request_error", None, None), status)

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _model_card(ctx: ServeContext) -> dict:
    return {"id": ctx.model_id, "object": "model", "created": ctx.created, "owned_by": "zipmoe",
            "max_context": int(ctx.lm.model.max_context)}


async def read_body(request: Request) -> dict:
    """The request's JSON object; 413 from Content-Length before reading a body over the limit."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY:
        raise APIError(413, f"request body of {size} bytes is over the limit of {MAX_BODY}")
    return parse_body(await request.body())


async def _generate(ctx: ServeContext, request: Request, parse, prompt_param: str) -> Response:
    ctx.check_auth(request)
    ctx.check_open()
    obj = await read_body(request)
    try:
        req = parse(obj, ctx.lm, ctx.model_id)
    except Exception as exc:
        exc.prompt_param = prompt_param  # type: ignore[attr-defined]
        raise
    bridge = EventBridge(asyncio.get_running_loop())
    try:
        h = ctx.submit(req, bridge)
    except Exception as exc:
        exc.prompt_param = prompt_param  # type: ignore[attr-defined]
        raise
    rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + str(h.request_id)
    rlog = RequestLog(ctx, rid, req.kind, len(req.prompt_ids))
    if req.stream:
        return StreamingResponse(_stream(req, rid, h, bridge, rlog), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(request, req, rid, h, bridge, rlog)


async def collect(request: Request, h, bridge: EventBridge, rlog: RequestLog) -> tuple[str, object] | None:
    """The whole answer's text and last event; None when the client left first (its handle is cancelled:
    checked every ``DISCONNECT_POLL_S`` while tokens come)."""
    parts: list[str] = []
    ev = None
    checked = time.monotonic()
    try:
        while True:
            ev = await bridge.next(timeout=DISCONNECT_POLL_S)
            if ev is not None:
                if ev.token_id is not None:
                    rlog.token()
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    return "".join(parts), ev
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return None
    finally:
        bridge.close()
        if not bridge.finished:
            h.cancel()
        rlog.done(ev.completion_tokens if ev is not None else 0, ev.finish_reason if bridge.finished else None)


async def _complete(request: Request, req: GenRequest, rid: str, h, bridge: EventBridge, rlog: RequestLog) -> Response:
    got = await collect(request, h, bridge, rlog)
    if got is None:
        return Response(status_code=499)  # nobody reads it
    text, ev = got
    if ev.finish_reason in ("cancelled", "error"):
        raise _ended(ev)
    return JSONResponse(response(req, rid, text, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens))


def _ended(ev) -> APIError:
    if ev.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled (the server is shutting down)", type="server_error",
                        code="cancelled")
    return APIError(500, f"generation failed: {ev.error or 'unknown error'}", type="server_error")


async def _stream(req: GenRequest, rid: str, h, bridge: EventBridge, rlog: RequestLog) -> AsyncIterator[str]:
    """SSE chunks as OpenAI sends them; cancelled by starlette when the client disconnects."""
    ev = None
    try:
        if req.kind == "chat":
            yield _sse(chunk(req, rid, "", None, role=True))
        while True:
            ev = await bridge.next()
            if ev.token_id is not None:
                rlog.token()
            if ev.finish_reason in ("cancelled", "error"):
                yield _sse(_ended(ev).body())
                break
            if ev.text:
                yield _sse(chunk(req, rid, ev.text, None))
            if ev.finish_reason is not None:
                yield _sse(chunk(req, rid, None if req.kind == "chat" else "", ev.finish_reason))
                if req.include_usage:
                    yield _sse(usage_chunk(req, rid, ev.prompt_tokens, ev.completion_tokens))
                break
        yield "data: [DONE]\n\n"
    finally:
        bridge.close()
        if not bridge.finished:
            h.cancel()
        rlog.done(ev.completion_tokens if ev is not None else 0, ev.finish_reason if bridge.finished else None)
