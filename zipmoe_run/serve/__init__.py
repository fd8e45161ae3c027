"""``zipmoe serve``: an OpenAI-compatible (and Ollama-compatible) HTTP server on the batched engine.

Modules: ``protocol`` (request parsing and validation, response objects), ``errors`` (OpenAI error
objects), ``app`` (the starlette app, SSE streaming, per-request log line), ``ollama`` (``/api/*``),
``server`` (uvicorn, graceful shutdown, a background-thread server for tests and benchmarks), ``cli``
(the typer command). Needs the ``serve`` extra (starlette, uvicorn). See specs/runtime.md, "HTTP server".
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["model_id_for"]


def model_id_for(path: str | Path) -> str:
    """The served model's id: the archive's name without ``.zmoe``, or the checkpoint folder's name."""
    p = Path(path)
    name = p.resolve().name if p.name in ("", ".", "..") else p.name
    return name[: -len(".zmoe")] if name.endswith(".zmoe") and p.is_file() else name
