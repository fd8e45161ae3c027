"""Text release for the engine: incremental detokenization, stop strings and what may be released.

A request's text is released as it grows, except what could still turn out to be part of a stop
string: a suffix of the text that is a prefix of a stop string is held back until the next token
decides it. When a stop string appears, the text before it is released and nothing after it ever is.
Incomplete UTF-8 sequences are held back by ``tokenizer.IncrementalDecoder``.
"""
from __future__ import annotations

from collections.abc import Sequence

from .errors import GenerationError
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["TextStream", "check_stops"]

MAX_STOPS = 16
MAX_STOP_CHARS = 1024


def check_stops(stop: Sequence[str] | str | None, tokenizer: Tokenizer | None) -> tuple[str, ...]:
    """Validate stop strings (OpenAI's: up to 4; here up to ``MAX_STOPS``, each non-empty)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    out = tuple(stop)
    if len(out) > MAX_STOPS:
        raise GenerationError(f"at most {MAX_STOPS} stop strings (got {len(out)})")
    for s in out:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise GenerationError(f"a stop string must be a non-empty string of at most {MAX_STOP_CHARS} characters "
                                  f"(got {s!r:.60})")
    if out and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer; this checkpoint has none")
    return out


def _held(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for h in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:h]):
                best = h
                break
    return best


class TextStream:
    """The text of one request: ``add(token)`` returns ``(released_text, stopped)``."""

    def __init__(self, tokenizer: Tokenizer | None, stops: tuple[str, ...]):
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stops = stops
        self.text = ""  # decoded so far (never beyond a stop string)
        self.released = 0  # characters of ``text`` handed out

    def add(self, token_id: int | None, final: bool) -> tuple[str, bool]:
        """Feed a generated token (None: no more tokens, flush only); ``final``: nothing follows it."""
        if self.decoder is None:
            return "", False
        if token_id is not None:
            self.text += self.decoder.add(token_id)
        if final:
            self.text += self.decoder.flush()
        end, stopped = len(self.text), False
        if self.stops:
            hits = [i for i in (self.text.find(s, self.released) for s in self.stops) if i >= 0]
            if hits:
                end, stopped = min(hits), True
                self.text = self.text[:end]
            elif not final:
                end -= _held(self.text[self.released:], self.stops)
        out = self.text[self.released:end]
        self.released = end
        return out, stopped
