"""llama.cpp (llama-cpp-python, the ``llamacpp`` extra) as a peer in the benchmarks, in a child process.

The model is a BF16 GGUF of the same checkpoint (:mod:`zipmoe.bench.gguf_export`, written once next to
the benchmark's other files and reused while the source files are unchanged). The child loads it the way
users run llama.cpp: ``Llama(path, n_threads=N, n_threads_batch=N, n_ctx, use_mmap=True, verbose=False)``
(mmap, and on Linux llama.cpp populates the whole mapping at load), and generates greedily with
``Llama.generate(ids, top_k=1, temp=0.0)``: the prompt is the same token ids the other systems get, and
EOS is ignored because ``generate`` never stops on its own (only ``create_completion`` checks EOS); the
child stops after ``n`` tokens. Before each generation ``reset()`` empties the KV cache, so no prompt
prefix is reused between runs.

Per generation: time to first token (prompt evaluation + first sample), decode seconds (first token to
last), the tokens, and the child's ``/proc/self/io`` ``read_bytes`` (what it read from storage, page
faults on the mapping included). Per child: load seconds, peak RSS (``VmHWM``) and anonymous RSS after
loading (llama.cpp's own buffers: KV cache, compute graph; the weights are file-backed pages).

Two ways to drive it:

* :class:`LlamaCppPeer` (``zipmoe bench run``): one long-lived child; the parent sends one JSON line per
  generation on its stdin and reads one ``@@RESULT@@`` line back, so its runs interleave with the other
  systems' runs (the child sleeps on its stdin meanwhile).
* :func:`child_e2e` (``zipmoe bench e2e``, called by ``e2e_child``): one capped cold run per process,
  in e2e's result format.

Library code: logs, never prints (the child's protocol lines go to its stdout).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["available", "ensure_gguf", "LlamaCppPeer", "child_e2e", "measure_overhead", "peer_for_run", "e2e_prepare", "e2e_targets", "SKIP_NOTE"]

_AVAILABLE: dict[str, str | None] = {}
SKIP_NOTE = "llama_cpp not importable (pip install 'zipmoe[llamacpp]' or bash scripts/llamacpp.sh)"


def available() -> str | None:
    """None when ``llama_cpp`` and ``gguf`` import in a fresh interpreter, else a one-line reason."""
    if "r" not in _AVAILABLE:
        try:
            p = subprocess.run([sys.executable, "-c", "import llama_cpp, gguf"], capture_output=True, text=True,
                               timeout=120)
            tail = (p.stderr.strip().splitlines() or [""])[-1]
            _AVAILABLE["r"] = None if p.returncode == 0 else f"{SKIP_NOTE}: {tail[:160]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            _AVAILABLE["r"] = f"{SKIP_NOTE}: {e}"
    return _AVAILABLE["r"]


def _fingerprint(model_dir: Path) -> list:
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in Path(model_dir).iterdir()
                  if p.is_file() and p.suffix in (".json", ".safetensors"))


def ensure_gguf(model_dir, gguf_path) -> dict:
    """Export ``model_dir`` to ``gguf_path`` unless an export of the same source files is there already."""
    from .gguf_export import export

    src, out = Path(model_dir), Path(gguf_path)
    marker = out.with_name(out.name + ".source.json")
    want = {"source": str(src.resolve()), "files": _fingerprint(src), "exporter": 1}
    if out.is_file() and marker.is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return {"path": str(out), "reused": True, "export_s": 0.0}
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    res = export(src, out)
    marker.write_text(json.dumps(want))
    return {**res, "reused": False, "export_s": time.perf_counter() - t0}


# -- the child ---------------------------------------------------------------------------------------------


def _load(a: dict):
    import llama_cpp

    return llama_cpp.Llama(a["path"], n_threads=a["threads"], n_threads_batch=a["threads"], n_ctx=a["n_ctx"],
                           use_mmap=True, verbose=False)


def _warm_up(path: str | None, threads: int) -> None:
    """Load a tiny GGUF of the same architecture and generate two tokens, then free it: llama.cpp's code
    and allocator arenas are paged in before the baseline and the cap (as e2e's ``warm_up_runtime`` does
    for this runtime), so the cap holds weights and llama.cpp's own buffers, not library code."""
    if not path:
        return
    import gc

    llm = _load({"path": path, "threads": threads, "n_ctx": 256})
    _generate(llm, [3, 4, 5], 2)
    llm.close()
    del llm
    gc.collect()


def _generate(llm, prompt: list[int], n: int) -> dict:
    """Greedy ``n`` tokens after ``prompt``; EOS ignored (``generate`` does not stop on it)."""
    from .e2e_proc import _io_read_bytes

    llm.reset()  # n_tokens = 0: generate() reuses no cached prefix and eval() clears the KV cache
    io0 = _io_read_bytes()
    stamps, toks = [], []
    io_first = None
    t0 = time.perf_counter()
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        toks.append(int(tok))
        if len(toks) == 1:
            io_first = _io_read_bytes()  # after the first token: what the decode steps read
        if len(toks) >= n:
            break
    io1 = _io_read_bytes()
    return {"tokens": toks, "ttft_s": stamps[0] - t0, "total_s": stamps[-1] - t0, "decode_s": stamps[-1] - stamps[0],
            "proc_read_bytes": (io1 - io0) if io0 is not None and io1 is not None else None,
            "proc_read_bytes_decode": (io1 - io_first) if io_first is not None and io1 is not None else None}


def _child_serve(a: dict) -> int:
    """``zipmoe bench run``'s long-lived child: READY after loading, then one RESULT per stdin line."""
    from .e2e_proc import _io_read_bytes, _rss_anon, _status, _trim_heap

    import llama_cpp  # noqa: F401 - imported before the baseline, like the other systems' imports

    _warm_up(a.get("warmup"), a["threads"])
    _trim_heap()
    anon0, io0 = _rss_anon(), _io_read_bytes()
    t0 = time.perf_counter()
    llm = _load(a)
    info = {"load_s": time.perf_counter() - t0, "anon_after_load_bytes": _rss_anon() - anon0,
            "load_read_bytes": (_io_read_bytes() - io0) if io0 is not None else None,
            "llama_cpp": __import__("llama_cpp").__version__}
    _say("READY", info)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        _say("RESULT", _generate(llm, cmd["prompt"], cmd["n"]))
    _say("DONE", {"peak_rss_bytes": _status("VmHWM"), "anon_bytes": _rss_anon() - anon0})
    return 0


def _say(tag: str, obj: dict) -> None:
    sys.stdout.write(f"\n@@{tag}@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def child_e2e(a: dict) -> dict:
    """One ``zipmoe bench e2e`` run of llama.cpp (in ``e2e_child``'s process): join the cap with the limit
    ``dense + budget + overhead`` (overhead: llama.cpp's anonymous memory with no experts held, measured
    by :func:`measure_overhead`), load, then the cold pass (and the warm pass) in e2e's result format."""
    from .e2e_proc import _cap_stat, _io_read_bytes, _reset_peak, _rss, _rss_anon, _status, _trim_heap, join_cap
    from .e2e_proc import kv_cache_bytes, prompt_ids

    import llama_cpp  # noqa: F401

    _warm_up(a.get("llama_warmup_gguf"), a["threads"])
    _trim_heap()
    kv = kv_cache_bytes(a["config"], 1, a["prompt_tokens"] + a["new_tokens"])
    out: dict = {"base_rss_bytes": _rss(), "kv_bytes": kv}
    anon0 = _rss_anon()
    budget = a["budget_bytes"]
    if a.get("cap_path"):
        limit = a["dense_bytes"] + (budget or a["expert_bytes"]) + a["llama_overhead_bytes"]
        join_cap(a["cap_path"], a["cap_version"], limit)
        out["cap_limit_bytes"] = limit
    _reset_peak()
    io0 = _io_read_bytes()
    t0 = time.perf_counter()
    llm = _load({"path": a["path"], "threads": a["threads"], "n_ctx": _n_ctx(a["prompt_tokens"] + a["new_tokens"])})
    out["load_s"] = time.perf_counter() - t0
    io1 = _io_read_bytes()
    out["load_read_bytes"] = (io1 - io0) if io0 is not None else None
    out["anon_after_load_bytes"] = _rss_anon() - anon0
    ids = prompt_ids(a["prompt_tokens"], a["config"]["vocab_size"])
    for tag in ("", "_warm") if a.get("warm_pass") else ("",):
        g = _generate(llm, ids, a["new_tokens"])
        steps = max(1, len(g["tokens"]) - 1)
        out.update({
            "tokens" + tag: g["tokens"], "ttft_s" + tag: g["ttft_s"], "prefill_s" + tag: g["ttft_s"],
            "tok_s" + tag: steps / g["decode_s"] if g["decode_s"] > 0 else 0.0,
            "tpot_s" + tag: g["decode_s"] / steps, "decode_s" + tag: g["decode_s"],
            "bytes_read" + tag: None, "proc_read_bytes" + tag: g["proc_read_bytes"], "hits" + tag: None,
            # storage reads after the first token (page faults on the mapping): e2e_full's bytes per token
            "bytes_read_decode" + tag: g["proc_read_bytes_decode"],
        })
    out.update(store_peak_bytes=None, io_mode="mmap (page cache)", budget=None, dense_bytes=a["dense_bytes"],
               peak_rss_bytes=_status("VmHWM"), cap_stat=_cap_stat(a), llama_overhead_bytes=a["llama_overhead_bytes"])
    del llm
    return out


def _n_ctx(tokens: int) -> int:
    return max(256, -(-(tokens + 8) // 256) * 256)


def measure_overhead(gguf_path, threads: int, prompt: list[int], new_tokens: int, warmup: str | None = None) -> dict:
    """llama.cpp's fixed anonymous memory for this model and context: a child loads the GGUF (uncapped),
    generates a few tokens, and reports its anonymous RSS gained since before loading (KV cache, compute
    buffers, logits; the weights are file-backed and not counted). {"overhead_bytes": ..., ...}."""
    peer = LlamaCppPeer(gguf_path, threads, _n_ctx(len(prompt) + new_tokens), drop=False, warmup=warmup)
    try:
        peer.generate(prompt, min(new_tokens, 4))
    finally:
        done = peer.close()
    return {"overhead_bytes": max(done.get("anon_bytes") or 0, peer.info.get("anon_after_load_bytes") or 0),
            "after_load_bytes": peer.info.get("anon_after_load_bytes"), "after_generate_bytes": done.get("anon_bytes")}


# -- ``zipmoe bench e2e``: preparation and target lines ---------------------------------------------------


def e2e_prepare(cfg, prep: dict, gguf_path=None) -> dict:
    """When ``llamacpp`` is asked for: the BF16 GGUF of the checkpoint (written once into the workdir, or at
    ``gguf_path``: ``--depth full``) and llama.cpp's fixed overhead for the cap; ``{"skipped": reason}`` when
    it cannot run."""
    if "llamacpp" not in cfg.systems:
        return {"skipped": "not requested"}
    if cfg.family == "switch_transformers":
        return {"skipped": "llama.cpp has no switch_transformers support in the GGUF exporter"}
    if cfg.io_throttle_bps:
        return {"skipped": "emulated storage: llama.cpp reads through the page cache, which the throttle cannot slow"}
    from .e2e_proc import prompt_ids

    why = available()
    if why:
        log.warning("%s: llamacpp rows skipped", why)
        return {"skipped": why}
    wd = Path(cfg.workdir)
    exp = ensure_gguf(prep["ckpt"], gguf_path or wd / f"{cfg.tag}.bf16.gguf")
    prep["gguf"] = exp["path"]
    prep["llama_warmup_gguf"] = _warmup_gguf(wd, cfg.family)
    over = measure_overhead(exp["path"], cfg.threads, prompt_ids(cfg.prompt_tokens, prep["config"]["vocab_size"]),
                            cfg.new_tokens, warmup=prep["llama_warmup_gguf"])
    prep["llama_overhead_bytes"] = over["overhead_bytes"]
    log.info("llama.cpp: %s, fixed overhead %.1f MiB", exp["path"], over["overhead_bytes"] / 2**20)
    return {"gguf": exp, "overhead": over,
            "cap": "dense + budget + llama.cpp's anonymous memory after load and generation (weights file-backed)"}


def _warmup_gguf(wd: Path, family: str) -> str:
    """A tiny GGUF of ``family`` (synthetic, ~1 MB) for :func:`_warm_up`, written once into ``wd``."""
    from zipmoe_pack.synth import make_checkpoint

    ckpt = wd / f"llamacpp-warmup-{family}"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, family, dims={"layers": 1, "experts": 4, "top_k": 2}, shards=1, seed=0)
    return ensure_gguf(ckpt, wd / f"llamacpp-warmup-{family}.gguf")["path"]


def e2e_targets(rows: list[dict], prepared: dict | None = None) -> list[dict]:
    """zipmoe against llama.cpp at 30 % (issue 14: >= 3x under the same cap), llama.cpp's greedy tokens
    against the resident run's (the same checkpoint; another engine's numerics, so information only), and
    why its rows are missing when it was asked for but skipped (``prepared``: :func:`e2e_prepare`'s result)."""
    from .e2e_report import _row

    out = []
    why = (prepared or {}).get("skipped")
    if why and why != "not requested":
        out.append({"target": "llamacpp rows", "value": None, "met": False, "mark": "skipped", "note": why})
    z, ll = _row(rows, "zipmoe", 30.0), _row(rows, "llamacpp", 30.0)
    if z is not None and ll is not None and ll.get("tok_s"):
        out.append({"target": "30% budget: zipmoe tokens/s >= 3x llamacpp", "value": z["tok_s"] / ll["tok_s"],
                    "met": z["tok_s"] >= 3 * ll["tok_s"],
                    "note": "cold pass; llama.cpp capped at dense + budget + its own overhead"})
    res = _row(rows, "resident", None)
    lls = [r for r in rows if r["system"] == "llamacpp" and r.get("ok")]
    if res is not None and lls:
        firsts = [next((i for i, (a, b) in enumerate(zip(r["tokens"], res["tokens"])) if a != b), None) for r in lls]
        same = all(f is None for f in firsts)
        out.append({"target": "llamacpp greedy tokens equal resident's", "value": None, "met": same,
                    "mark": "same" if same else "differ",
                    "note": "same at every budget" if same else
                    f"first differing position per budget: {firsts} (llama.cpp's BF16 numerics)"})
    return out


# -- the parent side of ``zipmoe bench run`` ---------------------------------------------------------------


def peer_for_run(model_dir, dtype: str, threads: int, gguf_dir, tokens: int):
    """(peer or None, skip reason or None, export info) for ``zipmoe bench run``'s llama.cpp row."""
    if dtype != "bfloat16":
        return None, "runs a BF16 GGUF: --dtype bfloat16 only", {}
    why = available()
    if why:
        return None, why, {}
    exp = ensure_gguf(model_dir, Path(gguf_dir) / f"{Path(model_dir).name}.bf16.gguf")
    try:
        return LlamaCppPeer(exp["path"], threads, _n_ctx(tokens)), None, exp
    except RuntimeError as e:  # llama.cpp refused the file: the row says why, the other systems still run
        log.warning("%s", e)
        return None, f"failed: {e}", exp


class LlamaCppPeer:
    """A long-lived llama.cpp child: ``generate(prompt, n)`` -> dict as the other benchmark systems return."""

    name = "llamacpp"

    def __init__(self, gguf_path, threads: int, n_ctx: int, *, drop: bool = True, warmup: str | None = None):
        from .e2e_proc import _drop

        self.path = str(gguf_path)
        if drop:  # a cold load, like a user's first run
            _drop([self.path])
        args = {"path": self.path, "threads": threads, "n_ctx": n_ctx, "warmup": warmup}
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._err = tempfile.TemporaryFile(mode="w+")  # not a pipe: a chatty child cannot block on it
        self.proc = subprocess.Popen([sys.executable, "-m", "zipmoe.bench.llamacpp", json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, env=env)
        self.info = self._read("READY")
        self.load_s = self.info["load_s"]
        self.impl = {"llama_cpp": self.info.get("llama_cpp"), "gguf": self.path, "mmap": True}

    def _read(self, tag: str) -> dict:
        mark = f"@@{tag}@@"
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                self._err.seek(0)
                err = self._err.read().strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"llama.cpp child exited ({self.proc.returncode}) before {tag}: {err[0][:200]}")
            if line.startswith(mark):
                return json.loads(line[len(mark):])

    def generate(self, prompt: list[int], n: int) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "gen", "prompt": list(prompt), "n": n}) + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT")

    def close(self) -> dict:
        if self.proc.poll() is not None:
            return {}
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            done = self._read("DONE")
            self.proc.wait(timeout=30)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            log.warning("llama.cpp child did not stop cleanly (%s); killing it", e)
            self.proc.kill()
            self.proc.wait()
            done = {}
        self._err.close()
        self.done = done
        return done


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    return _child_serve(json.loads(argv[0]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
