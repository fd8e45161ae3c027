"""Strict JSON for untrusted input: archive indexes, safetensors headers, config.json, calibration.

``loads`` differs from :func:`json.loads` in what it refuses, always with a ``ValueError`` subclass
(:class:`JSONRejected`) whose message is one line, so every caller can wrap it in its own error
family with the file name:

- nesting deeper than ``max_depth`` arrays/objects when given (checked before parsing, in linear
  time), and in any case deeper than the interpreter's recursion limit (about 1,000 levels;
  CPython's parser raises ``RecursionError`` cleanly, which is turned into a rejection here);
- integers of more than ``max_int_digits`` digits (Python refuses 4,300 digits with a bare ``ValueError``;
  the default of 64 leaves room for what real files hold, such as tokenizer_config.json's
  ``model_max_length: 1000000000000000019884624838656``; callers bound every value they use anyway);
- ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON), and numbers that overflow a double (``1e999``);
- duplicate keys in one object (``json`` keeps the last one silently);
- bytes that are not UTF-8.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np

__all__ = ["JSONRejected", "loads", "MAX_INT_DIGITS"]

MAX_INT_DIGITS = 64
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JSONRejected(ValueError):
    """The text is not JSON this project accepts; the message says why and where."""


def _pairs(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise JSONRejected(f"duplicate key {k!r}")
        out[k] = v
    return out


def _constant(name: str):
    raise JSONRejected(f"{name} is not JSON")


def depth(text: str) -> int:
    """Deepest nesting of arrays and objects in JSON text (the root container is depth 1), brackets
    inside strings ignored. Linear time, no recursion; meaningful for well-formed text only."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    b = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((b == 0x5B) | (b == 0x7B), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def loads(data: bytes | str, *, max_int_digits: int = MAX_INT_DIGITS, max_depth: int | None = None):
    """Parse ``data`` (UTF-8 bytes or text) or raise :class:`JSONRejected` with a one-line reason."""
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONRejected(f"not UTF-8 (byte {e.start})") from None
    if max_depth is not None and (d := depth(text)) > max_depth:
        raise JSONRejected(f"nested too deeply ({d} levels, at most {max_depth})")

    def parse_int(s: str) -> int:
        if len(s.lstrip("-")) > max_int_digits:
            raise JSONRejected(f"integer of {len(s.lstrip('-'))} digits (at most {max_int_digits})")
        return int(s)

    def parse_float(s: str) -> float:
        x = float(s)
        if not math.isfinite(x):
            raise JSONRejected(f"number {s[:24]} overflows a double")
        return x

    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_int=parse_int, parse_float=parse_float,
                          parse_constant=_constant)
    except JSONRejected:
        raise
    except json.JSONDecodeError as e:
        raise JSONRejected(f"malformed at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise JSONRejected("nested too deeply") from None
    except ValueError as e:
        raise JSONRejected(str(e).splitlines()[0] if str(e) else "not JSON") from None
