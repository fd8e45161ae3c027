"""OpenAI-style error objects: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every failure a client can cause is an :class:`APIError` (or an expected runtime error mapped by
:func:`from_exception`); the app turns it into one JSON response. Messages are one line.
"""
from __future__ import annotations

import logging
import math

from starlette.responses import JSONResponse

from ..engine import EngineClosedError, QueueFullError
from ..errors import GenerationError, PromptTooLongError, RuntimeErrorBase, TokenizerError

__all__ = ["APIError", "ServeError", "from_exception", "error_body"]

log = logging.getLogger(__name__)


class ServeError(RuntimeErrorBase):
    """The server cannot start (the address is taken or not allowed): one line for the CLI."""


class APIError(Exception):
    """An error answer: HTTP ``status`` and the OpenAI error fields; ``headers`` (Retry-After) go along."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).splitlines())
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_exception(exc: BaseException, prompt_param: str = "prompt") -> APIError | None:
    """The answer for an expected failure of ``Engine.submit`` or of tokenizing; None for anything else (a bug).
    ``prompt_param`` names the field a too-long prompt came from (``messages`` or ``prompt``)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        secs = max(1, math.ceil(exc.retry_after_s))  # whole seconds, rounded up, at least 1
        return APIError(429, f"the server is busy: {exc}", type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(secs)})
    if isinstance(exc, EngineClosedError):
        return APIError(503, f"the server is shutting down: {exc}", type="server_error", code="shutting_down")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, (GenerationError, TokenizerError)):
        return APIError(400, str(exc), code="invalid_value")
    return None
