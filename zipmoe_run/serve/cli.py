"""``zipmoe serve MODEL``: load a .zmoe archive or checkpoint folder and serve it over HTTP.

Usage errors are one line and exit 2; bad input (a missing model, a port in use) one line and exit 1.
"""
from __future__ import annotations

import logging
from pathlib import Path

import typer

from zipmoe_cli import err, fail, guarded, human, threads_option

__all__ = ["serve_cmd"]


def _budget(value: str | None) -> str | None:
    from zipmoe_run.cli import _memory_budget

    return _memory_budget(value)


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise typer.BadParameter(f"must be in 0..65535; got {value}")
    return value


def serve_cmd(
    path: Path = typer.Argument(..., help="A .zmoe archive or a checkpoint folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", callback=_port, help="TCP port (0: any free one)."),
    memory_budget: str = typer.Option(None, "--memory-budget", "-m", callback=_budget,
                                      help="Memory for routed experts: bytes (3GiB), a percentage (30%) or auto."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, max=256, help="Sequences decoded together at most."),
    max_queue: int = typer.Option(32, "--max-queue", min=1, max=100000,
                                  help="Requests waiting for a slot at most; more are answered 429."),
    api_key: str = typer.Option(None, "--api-key", envvar="ZIPMOE_API_KEY",
                                help="Require 'Authorization: Bearer KEY' (also $ZIPMOE_API_KEY)."),
    threads: int = typer.Option(None, "--threads", callback=threads_option, help="CPU threads: 1 .. 1024."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Compute dtype: bfloat16 or float32."),
    grace: float = typer.Option(30.0, "--grace", min=0, max=3600,
                                help="Seconds in-flight requests may take to finish after SIGINT/SIGTERM."),
    debug: bool = typer.Option(False, "--debug", help="Debug logging and full tracebacks."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, ...)."""
    if api_key is not None and not api_key.strip():
        fail("--api-key: empty key", 2)
    with guarded(debug):
        try:
            import uvicorn  # noqa: F401
            import starlette  # noqa: F401
        except ImportError as exc:
            fail(f"zipmoe serve needs the serve extra: pip install 'zipmoe[serve]' ({exc})")
        logging.getLogger().setLevel(logging.DEBUG if debug else logging.WARNING)
        for name in ("zipmoe_run.serve", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
        for h in logging.getLogger().handlers:
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

        from zipmoe_run.api import load
        from zipmoe_run.engine import Engine
        from zipmoe_run.serve import model_id_for
        from zipmoe_run.serve.app import ServeContext
        from zipmoe_run.serve.server import bind, serve

        sock = bind(host, port)  # a taken port is one line now, not after loading the model
        port = sock.getsockname()[1]
        try:
            lm = load(path, dtype=dtype, threads=threads, memory_budget=memory_budget)
        except BaseException:
            sock.close()
            raise
        engine = None
        try:
            engine = Engine(lm, max_batch=max_batch, max_queue=max_queue)
            engine.start()
            ctx = ServeContext(engine, lm, model_id_for(path), api_key=api_key)
            st = engine.stats()
            budget = getattr(lm.source, "budget", None)
            err.print(f"serving {ctx.model_id!r} at http://{host}:{port}/v1 (max batch {max_batch}, queue "
                      f"{max_queue}; memory budget {budget.how if budget is not None else 'none'}, "
                      f"peak RSS {human(st.get('peak_rss_bytes') or 0)}"
                      f"{', API key required' if api_key else ''})", soft_wrap=True, markup=False)
            serve(ctx, sock, grace_s=grace)
        finally:
            if engine is not None:
                engine.shutdown(cancel=True, timeout=10.0)
                st = engine.stats()
                err.print(f"served {st.get('requests_done', 0)} requests, {st.get('tokens_generated', 0)} tokens; "
                          f"peak RSS {human(st.get('peak_rss_bytes') or 0)}", soft_wrap=True, markup=False)
            lm.close()
