"""The server process of ``zipmoe bench serve``: one budget, in a fresh interpreter, under a memory cap.

``ServerProc`` (the parent's side) starts ``python -m zipmoe.bench.serve_proc ARGS_JSON`` and reads its
``@@READY@@{json}`` line; closing the child's stdin stops it (it also stops when the parent dies).

The child (``main``), with the cgroup helpers of ``zipmoe.bench.e2e_proc``:

1. imports the runtime and the HTTP stack and warms the runtime up (``warm_up_runtime``), trims its
   heap: what it holds now is charged outside the cap (a cgroup v1 process does not take its earlier
   charges along), as in ``zipmoe bench e2e``;
2. joins its child memory cgroup without a limit (accounting only), loads the model (its dense tensors
   charged as they are read), starts the engine and the server and serves the warm-up requests;
3. measures the server's own fixed overhead: the most the cgroup held during the warm-up beyond the
   dense bytes and the expert store's bytes of the same moment (sampled ``memory.stat``: anonymous +
   mapped file pages, the store's ledger; other page cache is left out, it is reclaimable), plus the KV
   caches of ``max_batch`` sequences of the longest request (the warm-up did not allocate them), plus
   ``GROWTH`` (what the heap still grows after the warm-up); then sets the limit ``cap = dense bytes +
   budget + overhead``, resets the peak and reports ``@@READY@@``. Every timed request runs under that
   cap; exceeding it kills the server (the rows say so).

Without a cgroup (none can be made, or ``--no-cap``) the child skips 2's join and 3's limit and the rows are
labelled uncapped with the reason.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from .e2e_proc import MemCap, _drop, _rss_anon, _trim_heap, join_cap, kv_cache_bytes, warm_up_runtime

__all__ = ["ServerProc", "cap_usage", "main"]

log = logging.getLogger(__name__)

READY, DONE = "@@READY@@", "@@DONE@@"
START_TIMEOUT_S = 600.0
SAMPLE_S = 0.05  # how often the parent samples the cap's usage
#: what a server's heap may still grow after its warm-up (new prompt lengths, connections, allocator
#: fragmentation): 2.3 MB over the test model's first timed requests; on the demo model at 100 % the
#: anonymous memory beside the store grew ~78 MiB past a one-prompt warm-up, and with anonymous memory at
#: the cap the only reclaimable pages are the mapped dense weights, re-read on every token (2.5x slower;
#: cgroup v1 memory.stat: rss at the limit, mapped_file ~0). So the warm-up runs every prompt at the
#: largest concurrency and this margin is generous.
GROWTH = 64 << 20
NO_LIMIT = 1 << 62  # a cgroup limit that never binds (v1 and v2 both take a byte count)


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in (path / "memory.stat").read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def cap_usage(path: Path, version: int) -> int | None:
    """Non-reclaimable bytes the cgroup holds now: anonymous + mapped file pages (v1 ``rss`` +
    ``mapped_file``, v2 ``anon`` + ``file_mapped``); None where memory.stat cannot be read."""
    st = _stat(path)
    keys = ("rss", "mapped_file") if version == 1 else ("anon", "file_mapped")
    return sum(st[k] for k in keys) if all(k in st for k in keys) else None


def _reset_cap_peak(path: Path, version: int) -> None:
    try:
        (path / ("memory.max_usage_in_bytes" if version == 1 else "memory.peak")).write_text("0")
    except OSError:  # a v2 kernel before 6.12 cannot reset memory.peak: the peak then covers the load too
        pass


class _Peak:
    """The largest ``cap_usage`` of a cgroup (less ``less()`` at the same moment, where given), sampled every
    ``SAMPLE_S`` from construction to ``stop()`` (0 without a cgroup)."""

    def __init__(self, path: Path | None, version: int | None, less=None):
        self.path, self.version, self.peak, self.less = path, version, 0, less
        self._stop = threading.Event()
        self._thread = None
        if path is not None:
            self._sample()
            self._thread = threading.Thread(target=self._run, name="cap-sampler", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        less = self.less() if self.less is not None else 0  # read first: what it counts only grows back
        self.peak = max(self.peak, (cap_usage(self.path, self.version) or 0) - less)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        return self.peak


# -- the child -------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    a = json.loads(argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("zipmoe_run.engine").setLevel(logging.INFO)
    import torch

    from zipmoe_run.api import load
    from zipmoe_run.engine import Engine
    from zipmoe_run.serve import model_id_for
    from zipmoe_run.serve.app import ServeContext
    from zipmoe_run.serve.server import ServerThread

    from .serve import drive

    threads = a["threads"]
    warm_up_runtime(threads or torch.get_num_threads())
    _trim_heap()
    anon0 = _rss_anon()
    cap = Path(a["cap_path"]) if a.get("cap_path") else None
    if cap is not None:
        join_cap(str(cap), a["cap_version"], NO_LIMIT)  # accounting only, until the overhead is measured
    lm = load(a["model"], memory_budget=a["budget"], threads=threads)
    eng = Engine(lm, max_batch=a["max_batch"], max_queue=a["max_queue"]).start()
    srv = None
    try:
        ctx = ServeContext(eng, lm, model_id_for(Path(a["model"])))
        srv = ServerThread(ctx).start()
        store = getattr(lm.source, "store", None)  # the expert store (an archive), its ledger's bytes now
        peak = _Peak(cap, a["cap_version"], (lambda: store.ledger.used) if store is not None else None)
        # warm-up, untimed: one request alone, then max_batch at once, so the one-row and batched kernels and the
        # shared sweep are compiled and allocated now (numba compiles a kernel on its first call), not
        # first under the cap
        for n in sorted({1, a["max_batch"]}):
            drive(srv.url, ctx.model_id, a["warm_prompts"][:n], a["warm_tokens"], n)
        beside_store = peak.stop()  # the most the cgroup held beyond the store's bytes of that moment
        st = eng.stats()
        src = st.get("source") or {}
        dense = int(src.get("dense_bytes") or 0)
        budget = st.get("memory_budget_bytes")
        kv = kv_cache_bytes(lm.source.config, a["max_batch"], a["max_len"])
        ready = {"url": srv.url, "model_id": ctx.model_id, "dense_bytes": dense, "budget_bytes": budget,
                 "kv_bytes": kv, "anon_gained_bytes": _rss_anon() - anon0}
        if cap is not None:
            if not beside_store:  # no memory.stat: the anonymous bytes gained (store included) instead
                beside_store = _rss_anon() - anon0 + dense
            overhead = max(0, beside_store - dense) + kv + GROWTH
            limit = dense + (budget if budget is not None else int(src.get("expert_bytes") or 0)) + overhead
            (cap / ("memory.limit_in_bytes" if a["cap_version"] == 1 else "memory.max")).write_text(str(limit))
            _reset_cap_peak(cap, a["cap_version"])
            ready.update(overhead_bytes=overhead, cap_bytes=limit)
        print(READY + json.dumps(ready), flush=True)
        while sys.stdin.read(1):  # until the parent closes our stdin (or dies)
            pass
    finally:
        if srv is not None:
            srv.stop()
        eng.shutdown(cancel=True, timeout=30)
        lm.close()
    print(DONE, flush=True)
    return 0


# -- the parent ------------------------------------------------------------------------------------


class ServerProc:
    """``zipmoe serve``'s engine and app at one budget in a child process, capped unless ``capped`` is
    False or no cgroup can be made (``cap_note`` then says why). ``info`` holds the child's ready line."""

    def __init__(self, model: Path, budget: str | None, *, threads: int | None, max_batch: int, max_queue: int,
                 warm_prompts: list[list[int]], warm_tokens: int, max_len: int, capped: bool, log_path: Path):
        self.cap, self.cap_note = (None, "uncapped by request (--no-cap)") if not capped else \
            MemCap.create(f"zipmoe-bench-serve-{os.getpid()}-{time.monotonic_ns()}")
        if self.cap is not None:
            self.cap_note = "capped: dense + budget + measured server overhead"
        else:
            self.cap_note = self.cap_note if not capped else f"uncapped: {self.cap_note}"
        self.args = {"model": str(model), "budget": budget, "threads": threads, "max_batch": max_batch,
                     "max_queue": max_queue, "warm_prompts": warm_prompts, "warm_tokens": warm_tokens,
                     "max_len": max_len, "cap_path": str(self.cap.path) if self.cap else None,
                     "cap_version": self.cap.version if self.cap else None}
        self.model, self.log_path = model, log_path
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self) -> "ServerProc":
        _drop([self.model])  # cold page cache: the dense pages the server reads are charged to its cap
        root = str(Path(__file__).resolve().parents[2])  # the child imports the code this parent runs
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "zipmoe.bench.serve_proc", json.dumps(self.args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith(READY):
                        self.info = json.loads(line[len(READY):])
                        return self
            elif self.proc.poll() is not None:
                break
        try:
            self.proc.wait(5)  # its stdout closed: its exit status follows
        except subprocess.TimeoutExpired:
            pass
        why = self.exit_reason() or f"no ready line within {START_TIMEOUT_S:.0f} s"
        self.stop()
        tail = [x for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()][-1:] or [""]
        raise RuntimeError(f"the benchmark's server did not start ({why}): {tail[0][:300]} (log: {self.log_path})")

    def exit_reason(self) -> str | None:
        """Why the child has ended (None while it runs)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        rc = self.proc.returncode
        if rc in (-9, 137):
            return "killed (OOM under the memory cap)" if self.cap is not None else "killed"
        return f"exit {rc}"

    def watch(self) -> None:
        """Start sampling the cgroup's anonymous + mapped bytes (``cap_usage``) until ``cap_stats``: the
        kernel's own peak counts page cache too, which fills any cap it is under."""
        self._peak = _Peak(self.cap.path if self.cap else None, self.cap.version if self.cap else None)

    def cap_stats(self) -> dict:
        """The cap's limit and its peaks since ``watch`` (each row gets its own): ``cap_peak_bytes``
        (anonymous + mapped pages, sampled), ``cap_usage_peak_bytes`` (the kernel's, page cache included)."""
        peak = self._peak.stop() if getattr(self, "_peak", None) is not None else 0
        if self.cap is None:
            return {"cap_bytes": None, "cap_peak_bytes": None, "cap_note": self.cap_note}
        st = self.cap.stats()
        _reset_cap_peak(self.cap.path, self.cap.version)
        return {"cap_bytes": self.info.get("cap_bytes"), "cap_peak_bytes": peak or None,
                "cap_usage_peak_bytes": st.get("cap_peak_bytes"), "cap_failcnt": st.get("cap_failcnt"),
                "cap_note": self.cap_note}

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self._log.close()
        if self.cap is not None:
            self.cap.remove()

    def __enter__(self) -> "ServerProc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
