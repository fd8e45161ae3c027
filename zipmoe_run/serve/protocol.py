"""OpenAI request parsing and validation, and the response and chunk objects.

A request body is parsed with the project's strict JSON parser (``formats.jsonstrict``) and checked
field by field; any problem is an :class:`~.errors.APIError` (400, naming the field). Fields that
change nothing here (``user``, ``logprobs: false``, zero penalties, ...) are accepted and ignored;
fields asking for something this server does not do (``n`` other than 1, ``logprobs``, ``echo``,
tools, penalties, a batch of prompts) are refused rather than silently ignored.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from formats.jsonstrict import JSONRejected, loads

from ..generate import Sampling
from .errors import APIError, bad_request

__all__ = ["GenRequest", "parse_body", "parse_chat", "parse_completion", "usage", "MAX_STOP", "MAX_BODY"]

MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 256
MAX_BODY = 16 << 20  # bytes of one request body
_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class GenRequest:
    kind: str  # "chat" | "completion"
    model: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def parse_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY:
        raise APIError(413, f"request body of {len(raw)} bytes is over the limit of {MAX_BODY}")
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        obj = loads(raw, max_depth=64)
    except JSONRejected as exc:
        raise bad_request(f"malformed JSON in the request body: {exc}") from None
    except RecursionError:
        raise bad_request("malformed JSON in the request body: nested too deep") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, not {_kind(obj)}")
    return obj


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bool(obj: dict, key: str, default: bool = False) -> bool:
    v = obj.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{key}' must be a boolean, got {_kind(v)}", key)
    return v


def _number(obj: dict, key: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = obj.get(key)
    if v is None:
        return default
    if not _is_num(v) or v > hi or v < lo or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        got = repr(v) if _is_num(v) else _kind(v)
        raise bad_request(f"'{key}' must be a number in {rng}, got {got}", key)
    return float(v)


def check_model(obj: dict, model_id: str) -> str:
    m = obj.get("model")
    if m is None:
        raise bad_request("'model' is required", "model")
    if not isinstance(m, str):
        raise bad_request(f"'model' must be a string, got {_kind(m)}", "model")
    if m != model_id:
        raise APIError(404, f"the model {m!r} does not exist; this server serves {model_id!r}", param="model",
                       code="model_not_found")
    return m


def _refuse_unsupported(obj: dict) -> None:
    n = obj.get("n")
    if n is not None and n != 1 or isinstance(n, bool):
        raise bad_request(f"'n' must be 1 (one choice per request), got {n!r}", "n")
    best_of = obj.get("best_of")
    if best_of is not None and (best_of != 1 or isinstance(best_of, bool)):
        raise bad_request(f"'best_of' must be 1, got {best_of!r}", "best_of")
    if obj.get("logprobs") not in (None, False):
        raise bad_request("'logprobs' is not supported by this server", "logprobs")
    top = obj.get("top_logprobs")
    if top is not None and (not _is_int(top) or top != 0):
        raise bad_request("'top_logprobs' is not supported by this server (only 0)", "top_logprobs")
    if obj.get("echo") not in (None, False):
        raise bad_request("'echo' is not supported by this server", "echo")
    if obj.get("suffix") not in (None, ""):
        raise bad_request("'suffix' is not supported by this server", "suffix")
    for key in ("tools", "functions"):
        if obj.get(key) not in (None, []):
            raise bad_request(f"'{key}' is not supported by this server", key)
    for key in ("presence_penalty", "frequency_penalty"):
        v = obj.get(key)
        if v is not None and (not _is_num(v) or v != 0):
            raise bad_request(f"'{key}' is not supported by this server (only 0)", key)
    if obj.get("logit_bias") not in (None, {}):
        raise bad_request("'logit_bias' is not supported by this server", "logit_bias")
    rf = obj.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad_request("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")


def _stop(obj: dict) -> list[str]:
    v = obj.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' has {len(stops)} strings; at most {MAX_STOP}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"each 'stop' string must have 1 to {MAX_STOP_CHARS} characters", "stop")
    return list(dict.fromkeys(stops))


def _sampling(obj: dict) -> Sampling:
    temperature = _number(obj, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(obj, "top_p", 0.0, 1.0, 1.0, lo_open=True)
    seed = obj.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 1 << 64):
        raise bad_request(f"'seed' must be an integer in [0, 2^64), got {seed!r}", "seed")
    if temperature == 0:
        return Sampling(greedy=True, seed=seed)
    return Sampling(greedy=False, temperature=temperature, top_p=top_p, seed=seed)


def _stream(obj: dict) -> tuple[bool, bool]:
    stream = _bool(obj, "stream")
    so = obj.get("stream_options")
    if so is None:
        return stream, False
    if not isinstance(so, dict):
        raise bad_request(f"'stream_options' must be an object, got {_kind(so)}", "stream_options")
    if not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    return stream, _bool(so, "include_usage")


def _max_tokens(obj: dict, keys: tuple[str, ...], default: int | None, prompt_len: int, ctx: int,
                param: str) -> int:
    """The first of ``keys`` given (or ``default``; None: the rest of the context), cut to the context."""
    room = ctx - prompt_len
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context is {ctx} tokens",
                       param=param, code="context_length_exceeded")
    for key in keys:
        v = obj.get(key)
        if v is None:
            continue
        if not _is_int(v) or v < 1:
            raise bad_request(f"'{key}' must be an integer >= 1, got {v!r}", key)
        return min(v, room)
    return room if default is None else min(default, room)


def _tokenizer(lm, what: str):
    if lm.tokenizer is None:
        raise bad_request(f"this model has no tokenizer; {what}")
    return lm.tokenizer


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for part in c:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{i}].content must be a string or an array of text parts, got {_kind(c)}",
                      f"messages[{i}].content")


def parse_chat(obj: dict, lm, model_id: str) -> GenRequest:
    model = check_model(obj, model_id)
    _refuse_unsupported(obj)
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("'messages' must be a non-empty array of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object, got {_kind(m)}", f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}",
                              f"messages[{i}].role")
        clean.append({"role": role, "content": _content(m, i)})
    tok = _tokenizer(lm, "use /v1/completions with a prompt of token ids")
    text = tok.apply_chat_template(clean, add_generation_prompt=True)  # TokenizerError -> 400 by the caller
    ids = tok.encode(text, add_special_tokens=False)
    return _finish(obj, "chat", model, ids, lm, ("max_completion_tokens", "max_tokens"), None)


def parse_completion(obj: dict, lm, model_id: str) -> GenRequest:
    model = check_model(obj, model_id)
    _refuse_unsupported(obj)
    p = obj.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one prompt
    if isinstance(p, str):
        if not p:
            raise bad_request("'prompt' is empty", "prompt")
        ids = _tokenizer(lm, "give 'prompt' as an array of token ids").encode(p)
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        vocab = lm.model.args.vocab_size
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        ids = list(p)
    elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise bad_request(f"'prompt' holds {len(p)} prompts; send one prompt per request", "prompt")
    else:
        raise bad_request("'prompt' must be a non-empty string or a non-empty array of token ids", "prompt")
    return _finish(obj, "completion", model, ids, lm, ("max_tokens",), 16)


def _finish(obj: dict, kind: str, model: str, ids: list[int], lm, keys: tuple[str, ...],
            default_max: int | None) -> GenRequest:
    param = "messages" if kind == "chat" else "prompt"
    if not ids:
        raise bad_request("the prompt encodes to no tokens", param)
    stream, include_usage = _stream(obj)
    return GenRequest(kind=kind, model=model, prompt_ids=ids, stop=_stop(obj), sampling=_sampling(obj),
                      max_tokens=_max_tokens(obj, keys, default_max, len(ids), lm.model.max_context, param),
                      stream=stream, include_usage=include_usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: GenRequest, rid: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The non-streaming answer (``chat.completion`` or ``text_completion``) with ``usage``."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": req.created, "model": req.model, "system_fingerprint": None,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def chunk(req: GenRequest, rid: str, text: str | None, finish: str | None, *, role: bool = False) -> dict:
    """One streaming chunk (``chat.completion.chunk`` or ``text_completion``)."""
    if req.kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": req.created, "model": req.model, "system_fingerprint": None,
           "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: GenRequest, rid: str, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": req.created, "model": req.model, "system_fingerprint": None,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
