"""What a caller of ``zipmoe_run.engine.Engine`` holds: a request's ``Handle`` and its ``EngineEvent`` s, and
the engine's own errors (re-exported by ``zipmoe_run.engine``)."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import GenerationError

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["EngineEvent", "Handle", "QueueFullError", "EngineClosedError"]

log = logging.getLogger("zipmoe_run.engine")


class QueueFullError(GenerationError):
    """The waiting queue is full; ``retry_after_s`` estimates when a place frees."""

    def __init__(self, msg: str, retry_after_s: float):
        super().__init__(msg)
        self.retry_after_s = float(retry_after_s)


class EngineClosedError(GenerationError):
    """The engine is shutting down or shut down: it takes no new requests."""


@dataclass
class EngineEvent:
    request_id: str
    token_id: int | None  # None only on a final event without a token (cancelled / error)
    text: str  # newly released text ("" while held back)
    finish_reason: str | None  # None while running; "stop" | "length" | "cancelled" | "error" on the last event
    prompt_tokens: int
    completion_tokens: int  # so far, including this token
    error: str | None = None  # one line when finish_reason == "error"


class Handle:
    """A submitted request: iterate it for its events, ``result()`` for the whole answer, ``cancel()``."""

    def __init__(self, engine: "Engine", request_id: str, prompt_tokens: int,
                 on_event: Callable[[EngineEvent], None] | None):
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self._engine, self._on_event = engine, on_event
        self._events: queue.SimpleQueue[EngineEvent] = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancelled = False
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None

    def cancel(self) -> None:
        """Thread-safe; the slot and KV cache are freed at the next token boundary, then a final
        "cancelled" event follows (nothing happens if the request has already finished)."""
        self._cancelled = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[EngineEvent]:
        while True:
            ev = self._events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> tuple[list[int], str, str]:
        """Block until the request ends: (token ids, text, finish_reason)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return list(self.token_ids), self.text, self.finish_reason or "error"

    def _emit(self, ev: EngineEvent) -> None:  # engine thread
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
        self.text += ev.text
        if ev.finish_reason is not None:
            self.finish_reason, self.error = ev.finish_reason, ev.error
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:  # a broken callback must not stop the engine
                log.exception("request %s: on_event callback failed", self.request_id)
        self._events.put(ev)
        if ev.finish_reason is not None:
            self._done.set()
