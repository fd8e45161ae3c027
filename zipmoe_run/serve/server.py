"""Running the app under uvicorn: in the foreground with a graceful SIGINT/SIGTERM shutdown
(``serve``), or in a background thread on a free port (``ServerThread``: tests and benchmarks).

Graceful shutdown: the first SIGINT/SIGTERM stops accepting connections, marks ``/health``
``shutting_down`` and lets the running and queued requests finish for up to ``grace_s`` seconds;
then the engine cancels what is left, so every open stream ends with an error chunk and
``data: [DONE]`` instead of a cut connection. A second SIGINT exits at once. The process then exits 0
(the signal is not re-raised, so the engine and the model close normally).
"""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from .app import ServeContext, create_app
from .errors import ServeError

__all__ = ["GracefulServer", "ServerThread", "build_app", "drain"]

log = logging.getLogger("zipmoe_run.serve")


def build_app(ctx: ServeContext):
    from .ollama import routes as ollama_routes

    return create_app(ctx, extra_routes=ollama_routes(ctx))


def drain(ctx: ServeContext, grace_s: float) -> None:
    """Wait up to ``grace_s`` for the engine to empty, then shut it down cancelling what is left."""
    ctx.closing = True
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        st = ctx.engine.stats()
        if not st.get("running") and not st.get("waiting"):
            break
        time.sleep(0.05)
    st = ctx.engine.stats()
    left = int(st.get("running", 0)) + int(st.get("waiting", 0))
    if left:
        log.info("shutting down: cancelling %d request(s) still running after %.1f s", left, grace_s)
    ctx.engine.shutdown(cancel=True, timeout=10.0)


class GracefulServer(uvicorn.Server):
    """uvicorn's server; its first exit signal also drains the engine (``drain``) in a thread."""

    def __init__(self, config: uvicorn.Config, ctx: ServeContext, grace_s: float):
        super().__init__(config)
        self.ctx = ctx
        self.grace_s = grace_s
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 - signal handler signature
        if self._drainer is None:
            log.info("received signal %s: finishing in-flight requests (up to %.0f s), then exiting", sig, self.grace_s)
            self._drainer = threading.Thread(target=drain, args=(self.ctx, self.grace_s), name="zipmoe-drain",
                                             daemon=True)
            self._drainer.start()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # uvicorn would re-raise it at exit, killing us before the engine's cleanup


def _config(app, host: str, port: int, grace_s: float) -> uvicorn.Config:
    # our own log line per request replaces uvicorn's access log; log_config=None keeps the caller's logging
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                          timeout_graceful_shutdown=int(grace_s) + 15, timeout_keep_alive=5)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; ServeError names the address when it is taken or not allowed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """The app served by uvicorn in a daemon thread on ``host`` and a free port (``url``)."""

    def __init__(self, ctx: ServeContext, host: str = "127.0.0.1", port: int = 0, grace_s: float = 5.0):
        self.ctx = ctx
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{self.port}"
        self.server = GracefulServer(_config(build_app(ctx), host, self.port, grace_s), ctx, grace_s)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="zipmoe-serve",
                                       daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(ctx: ServeContext, sock: socket.socket, grace_s: float = 30.0) -> None:
    """Serve on the listening socket ``sock`` (``bind``) in the foreground until SIGINT/SIGTERM
    (graceful, see the module docstring); closes the socket."""
    host, port = sock.getsockname()[:2]
    server = GracefulServer(_config(build_app(ctx), host, port, grace_s), ctx, grace_s)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
