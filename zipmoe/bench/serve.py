"""Serving benchmark: ``zipmoe serve``'s aggregate throughput at 1, 2, 4, 8 concurrent streams, per budget.

For every memory budget the model is loaded afresh (cold store), a batched engine (``max_batch`` = the
largest stream count) is served by uvicorn on a free local port, and the same ``requests`` greedy
completions (token-id prompts of mixed lengths, ``max_tokens`` each, streamed with usage) are sent by
``streams`` concurrent HTTP clients. ``streams = 1`` is the baseline: the same requests one after
another. Per row: aggregate generated tokens/s over the wall time, time to first token (median, p90:
from sending a request to its first text chunk, queueing included), expert bytes read per generated
token (the engine's source counters), the store's peak against its budget and the process's peak RSS.
A short untimed warm-up runs first at each budget; with ``repeat`` the stream counts are measured
in turn that many times and the rows hold medians.

Peers: ``--llamacpp`` asks for llama.cpp's server on the same model (``PEERS``); the row says why it is
skipped when ``llama_cpp`` or its server module does not import. Any OpenAI-compatible server can be
measured with :func:`drive`.

Library code: logs, never prints.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from zipmoe.bench.errors import BenchInputError
from zipmoe.bench.serve_llamacpp import llamacpp_server

__all__ = ["run", "drive", "make_prompts", "render_table", "PEERS"]

log = logging.getLogger(__name__)


def make_prompts(n: int, vocab: int, context: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """``n`` token-id prompts of mixed lengths (4 .. 64, bounded by the context), deterministic."""
    import random

    rng = random.Random(seed)
    longest = max(1, min(64, context - max_tokens - 1))
    lo = min(4, longest)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, longest))] for _ in range(n)]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _one(client, url: str, model: str, prompt: list[int] | str, max_tokens: int, headers: dict) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = None
    text = []
    chunks = 0  # one token per chunk, for a server that sends no usage
    with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"error": obj["error"].get("message", "error")}
            if obj.get("choices") and obj["choices"][0].get("text"):
                if first is None:
                    first = time.perf_counter() - t0
                text.append(obj["choices"][0]["text"])
                chunks += 1
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return {"ttft_s": first, "tokens": tokens if tokens is not None else chunks, "s": time.perf_counter() - t0,
            "text": "".join(text)}


def drive(url: str, model: str, prompts: list[list[int]] | list[str], max_tokens: int, streams: int, *,
          api_key: str | None = None, timeout: float = 600.0) -> dict:
    """Send every prompt (greedy, streamed) to the OpenAI-compatible server at ``url`` from ``streams``
    concurrent clients; aggregate tokens/s, TTFT median and p90, per-request results."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    local = threading.local()

    def work(i: int) -> dict:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=timeout)
        return _one(local.client, url, model, prompts[i], max_tokens, headers)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        res = list(pool.map(work, range(len(prompts))))
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in res if "error" in r]
    ok = [r for r in res if "error" not in r]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"streams": streams, "requests": len(prompts), "completed": len(ok), "errors": errors[:3],
            "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_median_s": statistics.median(ttfts) if ttfts else None, "ttft_p90_s": _pct(ttfts, 0.9),
            "texts": [r.get("text") for r in res]}


# --------------------------------------------------------------------------------------------- peers
PEERS: dict[str, Callable[..., dict]] = {"llamacpp": llamacpp_server}


def _texts(model: Path, prompts: list[list[int]]) -> list[str]:
    """The prompts' token ids as text, for a peer that takes text (decoded with the checkpoint's tokenizer)."""
    from zipmoe_run.api import open_source
    from zipmoe_run.tokenizer import load_tokenizer

    src = open_source(model)
    try:
        tok = load_tokenizer(src)
    finally:
        src.close()
    if tok is None:
        raise BenchInputError(f"{model}: no tokenizer, so no text prompts for llama.cpp's server")
    return [tok.decode(p) for p in prompts]


# ----------------------------------------------------------------------------------------------- run
def _median_row(runs: list[dict]) -> dict:
    """One row from ``runs`` of the same (budget, streams): medians of the timings, the first run's rest."""
    row = dict(runs[0])
    for k in ("tok_s", "wall_s", "ttft_median_s", "ttft_p90_s", "bytes_per_token"):
        xs = [r[k] for r in runs if r.get(k) is not None]
        row[k] = statistics.median(xs) if xs else None
    row["runs"] = len(runs)
    row["tok_s_runs"] = [r["tok_s"] for r in runs]
    row["completed"] = min(r["completed"] for r in runs)
    row["errors"] = [e for r in runs for e in r["errors"]][:3]
    row["texts_stable"] = all(r["texts"] == runs[0]["texts"] for r in runs)
    return row


def _health(url: str) -> dict:
    import httpx

    return httpx.get(url + "/health", timeout=60).json()


def _zipmoe_rows(model: Path, budget: str, streams: list[int], prompts: list[list[int]], max_tokens: int,
                 threads: int | None, repeat: int = 1, capped: bool = True) -> tuple[list[dict], dict]:
    from .serve_proc import ServerProc

    t = time.perf_counter()
    sp = ServerProc(model, None if budget in ("none", "uncapped") else budget, threads=threads,
                    max_batch=max(streams), max_queue=max(64, len(prompts)), warm_prompts=prompts[:max(streams)],
                    warm_tokens=min(max_tokens, 8), max_len=max(len(p) for p in prompts) + max_tokens,
                    capped=capped, log_path=Path(tempfile.gettempdir()) / "zipmoe-bench-serve" /
                    f"server-{os.getpid()}-{budget.replace('%', 'pct')}.log")
    runs: dict[int, list[dict]] = {n: [] for n in streams}
    with sp:
        load_s = time.perf_counter() - t  # load, warm-up and the overhead measurement
        url, model_id = sp.info["url"], sp.info["model_id"]
        st1: dict = {}
        for _ in range(repeat):  # stream counts interleaved, so drifting load hits them alike
            for n in streams:
                sp.watch()
                row, st0, st1 = _measure(sp, url, model_id, prompts, max_tokens, n)
                gen = st1.get("tokens_generated", 0) - st0.get("tokens_generated", 0)
                read = st1.get("expert_bytes_read", 0) - st0.get("expert_bytes_read", 0)
                src = st1.get("source") or {}
                row.update(system="zipmoe", budget=budget, budget_bytes=st1.get("memory_budget_bytes"),
                           bytes_read=read, bytes_per_token=read / gen if gen else None,
                           store_peak_bytes=src.get("store_peak_bytes"), peak_rss_bytes=st1.get("peak_rss_bytes"),
                           load_s=load_s, shared_sweeps=st1.get("shared_sweeps", 0) - st0.get("shared_sweeps", 0),
                           **sp.cap_stats())
                log.info("zipmoe %s, %d streams: %.2f tok/s", budget, n, row["tok_s"])
                runs[n].append(row)
        info = {"io_mode": (st1.get("source") or {}).get("io_mode"), "server": sp.info, "cap_note": sp.cap_note}
    return [_median_row(runs[n]) for n in streams], info


def _measure(sp, url: str, model_id: str, prompts: list[list[int]], max_tokens: int, n: int
             ) -> tuple[dict, dict, dict]:
    """One ``drive`` at ``n`` streams against the server process, with its /health before and after; a row
    of errors (nothing completed) when the server has ended (killed by its cap, say)."""
    import httpx

    empty = {"streams": n, "requests": len(prompts), "completed": 0, "tokens": 0, "wall_s": 0.0, "tok_s": 0.0,
             "ttft_median_s": None, "ttft_p90_s": None, "texts": [None] * len(prompts)}
    try:
        st0 = _health(url) if sp.exit_reason() is None else None
        row = drive(url, model_id, prompts, max_tokens, n) if st0 is not None else None
        st1 = _health(url) if row is not None else None
    except (httpx.HTTPError, ValueError) as exc:
        time.sleep(1.0)  # let a killed server's exit status arrive
        why = sp.exit_reason() or f"{type(exc).__name__}: {exc}"
        return {**empty, "errors": [f"the server failed: {why}"]}, {}, {}
    if st1 is None:
        return {**empty, "errors": [f"the server ended: {sp.exit_reason()}"]}, {}, {}
    return row, st0, st1


def run(model: str | os.PathLike, *, budgets: list[str] = ("30%", "100%"), streams: list[int] = (1, 2, 4, 8),
        requests: int = 16, max_tokens: int = 32, threads: int | None = None, llamacpp: bool = False,
        seed: int = 0, repeat: int = 1, capped: bool = True) -> dict:
    """Measure (see the module docstring); returns the JSON-able result with the host line."""
    from zipmoe_run.api import open_source
    from zipmoe_run.calibrate import report as host_report

    model = Path(model)
    if not model.exists():
        raise BenchInputError(f"{model}: no such archive or checkpoint folder")
    if requests < 1 or max_tokens < 1 or repeat < 1:
        raise BenchInputError("--requests, --max-tokens and --repeat must be at least 1")
    streams = sorted(set([1, *streams]))  # 1 stream = the same requests one after another: the baseline
    if any(s < 1 or s > 256 for s in streams):
        raise BenchInputError(f"--streams must be in 1..256, got {streams}")
    src = open_source(model)
    try:
        cfg = src.config
    finally:
        src.close()
    vocab = int(cfg.get("vocab_size") or 0)
    context = int(cfg.get("max_position_embeddings") or 2048)
    if vocab < 8 or context <= max_tokens + 4:
        raise BenchInputError(f"{model}: vocabulary {vocab} / context {context} too small for --max-tokens {max_tokens}")
    prompts = make_prompts(requests, vocab, context, max_tokens, seed)
    result: dict = {"bench": "serve", "model": str(model), "model_type": cfg.get("model_type"),
                    "requests": requests, "max_tokens": max_tokens, "streams": streams, "budgets": list(budgets),
                    "threads": threads, "repeat": repeat, "prompt_tokens": [len(p) for p in prompts], "rows": []}
    result.update(host_report(model if model.suffix == ".zmoe" else None, threads=threads))
    for b in budgets:
        rows, info = _zipmoe_rows(model, b, streams, prompts, max_tokens, threads, repeat, capped)
        base = next(r for r in rows if r["streams"] == 1)
        base_texts = base["texts"]
        for r in rows:  # greedy answers must not depend on the batch (batch invariance)
            r["x_sequential"] = r["tok_s"] / base["tok_s"] if base["tok_s"] else None
            stable = r.pop("texts_stable")
            r["same_text_as_sequential"] = r.pop("texts") == base_texts and stable
        result["rows"].extend(rows)
        result.setdefault("io_mode", info.get("io_mode"))
        result.setdefault("servers", []).append({"budget": b, **info["server"]})
        result.setdefault("cap", info["cap_note"])
    if llamacpp:
        peer = PEERS["llamacpp"](model, threads=threads, max_tokens=max_tokens, capped=capped,
                                 workdir=Path(tempfile.gettempdir()) / "zipmoe-bench-serve")
        if "skipped" in peer:
            result["llamacpp"] = {"skipped": peer["skipped"]}
        else:
            texts = _texts(model, prompts) if peer.get("text_prompts") else prompts
            result["llamacpp"] = {"gguf": peer.get("gguf"), "note": "llama-cpp-python's server: one request at a "
                                  "time, text prompts (our prompts' ids decoded), stops at EOS"}
            try:
                for n in streams:
                    row = drive(peer["url"], peer["model"], texts, max_tokens, n)
                    if n == 1:
                        peer_base = row["tok_s"]
                    row["x_sequential"] = row["tok_s"] / peer_base if peer_base else None
                    row.pop("texts")
                    row["runs"] = 1
                    cap = peer.get("cap") or {}
                    row.update(cap_bytes=cap.get("cap_bytes"), cap_note=cap.get("cap_note"),
                               **(cap["cap"].stats() if cap.get("cap") is not None else {}))
                    result["rows"].append({**row, "system": "llamacpp", "budget": peer.get("budget", "-")})
            finally:
                peer["stop"]()
    return result


def _cap_cell(r: dict) -> str:
    from zipmoe_cli import human

    if not r.get("cap_bytes"):
        return "uncapped"
    peak = human(r["cap_peak_bytes"]) if r.get("cap_peak_bytes") is not None else "?"
    return f"{peak} / {human(r['cap_bytes'])}"


def render_table(result: dict):
    """A rich Table of :func:`run`'s result."""
    from rich.table import Table

    from zipmoe_cli import human

    table = Table(title=f"serve: {result['model']} ({result['model_type']}), {result['requests']} greedy requests "
                        f"of <= {result['max_tokens']} tokens, prompts {min(result['prompt_tokens'])}-"
                        f"{max(result['prompt_tokens'])} tokens; streams = concurrent clients (1: one after another); "
                        f"median of {result.get('repeat', 1)} run(s)")
    for c in ("system", "budget", "streams", "tok/s", "x 1 stream", "TTFT median s", "TTFT p90 s", "read/token",
              "store peak / budget", "peak RSS", "cgroup peak / cap", "done"):
        table.add_column(c, justify="left" if c in ("system", "budget") else "right")
    for r in result["rows"]:
        bpt = r.get("bytes_per_token")
        store = (f"{human(r['store_peak_bytes'])} / {human(r['budget_bytes'])}"
                 if r.get("budget_bytes") and r.get("store_peak_bytes") is not None else "-")
        table.add_row(r["system"], str(r["budget"]), str(r["streams"]), f"{r['tok_s']:.2f}",
                      f"{r['x_sequential']:.2f}x" if r.get("x_sequential") else "-",
                      f"{r['ttft_median_s']:.3f}" if r.get("ttft_median_s") is not None else "-",
                      f"{r['ttft_p90_s']:.3f}" if r.get("ttft_p90_s") is not None else "-",
                      human(bpt) if bpt is not None else "-", store,
                      human(r["peak_rss_bytes"]) if r.get("peak_rss_bytes") else "-", _cap_cell(r),
                      f"{r['completed']}/{r['requests']}" + ("" if r.get("same_text_as_sequential", True)
                                                             else " (text differs!)"))
    from rich.markup import escape

    notes = [f"zipmoe server: {result['cap']}" + "".join(
        f"; {s['budget']}: cap {human(s['cap_bytes'])} = dense {human(s['dense_bytes'])} + budget "
        f"{human(s['budget_bytes'] or 0)} + overhead {human(s['overhead_bytes'])}"
        for s in result.get("servers", []) if s.get("cap_bytes"))] if result.get("cap") else []
    if "llamacpp" in result:
        peer = result["llamacpp"]
        notes.append(f"llama.cpp server: skipped: {peer['skipped']}" if "skipped" in peer
                     else f"llama.cpp server ({peer.get('gguf')}): {peer.get('note')}")
    if notes:
        table.caption = escape("\n".join(notes))
    return table
