"""llama.cpp's OpenAI-compatible server as the peer of ``zipmoe bench serve`` (``--llamacpp``): started on
a BF16 GGUF of the same checkpoint, capped in a memory cgroup of its own once it answers.

Library code: logs, never prints.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

__all__ = ["llamacpp_server"]

log = logging.getLogger(__name__)


def llamacpp_server(model: Path, *, threads: int | None = None, workdir: Path, capped: bool = True, **_) -> dict:
    """llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``) on a BF16 GGUF of the same
    checkpoint (``zipmoe.bench.llamacpp.ensure_gguf``; an archive is unpacked first), started as a
    subprocess on a free local port with ``threads`` threads; ``{"url", "model", "stop", "cap"}`` or
    ``{"skipped": reason}``. It serves requests one at a time (llama-cpp-python's server has no
    continuous batching), and takes text prompts, not token ids. Once it answers it is moved into a
    memory cgroup capped at the GGUF's size (dense + every expert: the 100 % budget, as it maps the
    whole file) + its own anonymous memory then + 16 MiB (``_cap_llamacpp``)."""
    import socket
    import subprocess
    import sys

    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
        return {"skipped": f"llama_cpp does not import ({type(exc).__name__}: {exc})"}
    try:
        import llama_cpp.server.app  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"llama.cpp's server does not import (pip install 'llama-cpp-python[server]'): {exc}"}
    from .llamacpp import ensure_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    src = model
    if model.suffix == ".zmoe":  # the original files, byte for byte, for the exporter
        src = workdir / f"{model.stem}-unpacked"
        if not (src / "config.json").is_file():
            from formats.decoder import ParallelDecoder
            from formats.reader import Archive
            from formats.restore import unpack

            with Archive(model) as ar, ParallelDecoder(os.cpu_count() or 1) as dec:
                unpack(ar, dec, src)
    try:
        gguf = ensure_gguf(src, workdir / f"{model.stem}.bf16.gguf")["path"]
    except Exception as exc:  # noqa: BLE001 - an architecture the exporter lacks: a skipped row
        return {"skipped": f"no GGUF of {src}: {exc}"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
           str(port), "--n_threads", str(threads or os.cpu_count() or 1), "--n_ctx", "2048"]
    log_path = workdir / "llamacpp-server.log"
    logf = open(log_path, "wb")  # noqa: SIM115 - closed by stop()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)

    cap: dict = {"cap": None}

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
        if cap["cap"] is not None:
            cap["cap"].remove()

    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop()
            return {"skipped": f"llama.cpp's server exited with {proc.returncode} (log: {log_path})"}
        try:
            ids = httpx.get(url + "/v1/models", timeout=2).json()["data"]
            cap.update(_cap_llamacpp(proc.pid, Path(gguf), capped))
            return {"url": url, "model": ids[0]["id"], "stop": stop, "text_prompts": True, "gguf": str(gguf),
                    "cap": cap}
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            time.sleep(0.5)
    stop()
    return {"skipped": f"llama.cpp's server did not answer within 180 s (log: {log_path})"}


def _cap_llamacpp(pid: int, gguf: Path, capped: bool) -> dict:
    """Move the llama.cpp server ``pid`` into a new memory cgroup capped at the GGUF's bytes + its
    anonymous memory now + 16 MiB; ``{"cap": MemCap | None, "cap_bytes", "cap_note"}``."""
    from .e2e_proc import MemCap

    if not capped:
        return {"cap": None, "cap_bytes": None, "cap_note": "uncapped by request (--no-cap)"}
    cap, why = MemCap.create(f"zipmoe-bench-serve-llama-{os.getpid()}-{time.monotonic_ns()}")
    if cap is None:
        return {"cap": None, "cap_bytes": None, "cap_note": f"uncapped: {why}"}
    try:
        anon = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
        limit = gguf.stat().st_size + anon + (16 << 20)
        cap.limit_file().write_text(str(limit))
        (cap.path / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        cap.remove()
        return {"cap": None, "cap_bytes": None, "cap_note": f"uncapped: cannot cap the server ({exc})"}
    note = f"capped: GGUF {gguf.stat().st_size} + its anonymous memory {anon} + 16 MiB (bytes)"
    log.info("llama.cpp server %d: %s", pid, note)
    return {"cap": cap, "cap_bytes": limit, "cap_note": note}
