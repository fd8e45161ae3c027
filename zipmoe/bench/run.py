"""Generation-speed benchmark: the ZipMoE runtime against Hugging Face transformers, side by side.

Both systems run greedy generation of the same prompt on the same checkpoint directory, in one
process, with the same torch thread count and dtype; every expert is resident (the runtime reads
the directory through ``DirectorySource``, transformers holds its own copy). By default the
checkpoint is synthetic with Qwen1.5-MoE-A2.7B's real expert dimensions (hidden 2048,
moe_intermediate 1408, 60 experts, top-4, a 5632-wide shared expert; 2 layers, small vocabulary).

Every system loads cold: its files' pages are dropped from the page cache first (``posix_fadvise``
``DONTNEED``), so each maps or reads what the kernel's readahead builds. Before this the llama.cpp peer
alone loaded cold, and on a kernel whose readahead builds 2 MiB folios its GGUF was mapped on 2 MiB
entries while the runtime streamed a checkpoint its writer had left in 4 KiB pages.

Per system and run: time to first token (prefill + first sample), prompt tokens/s, decode tokens/s
(tokens after the first, over the time after the first). Runs alternate between systems so load
from other processes hits both alike; the table shows medians (and the best run). EOS is ignored
so every run decodes the same number of tokens. transformers runs with its defaults (sdpa
attention, its default experts implementation) and ``generate``.

A decode-step breakdown of the runtime (attention, routed experts, shared expert, router, lm_head,
rest; measured with module hooks on extra runs) plus the bytes of weights each token reads says
what dominates a step.

Library code: logs, never prints. Not thread-safe (one benchmark at a time).
"""
from __future__ import annotations

import copy
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from zipmoe.bench.errors import BenchInputError
from zipmoe_run.calibrate import report as host_report

__all__ = ["run", "render_table", "SYSTEMS"]

log = logging.getLogger(__name__)

SYSTEMS = ("zipmoe", "transformers", "llamacpp")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _cold(path: Path) -> None:
    """Drop the checkpoint's pages from the page cache before a system loads it, as the llama.cpp peer
    does for its GGUF: every system maps or reads what the kernel's readahead builds (on this kernel,
    2 MiB folios that it maps with 2 MiB entries), not whatever small pages an earlier writer left."""
    from .e2e_proc import _drop

    _drop([path])


class _Ours:
    name = "zipmoe"

    def __init__(self, path: Path, dtype: str, threads: int):
        from zipmoe_run.api import load

        _cold(path)
        t = time.perf_counter()
        self.lm = load(path, dtype=dtype, threads=threads)
        self.load_s = time.perf_counter() - t

    def generate(self, prompt: list[int], n: int) -> dict:
        from zipmoe_run.generate import stream_generate

        t0 = time.perf_counter()
        ev = list(stream_generate(self.lm.model, prompt, max_new_tokens=n))
        first, last = ev[0].elapsed_s, ev[-1].elapsed_s
        return {"tokens": [e.token_id for e in ev], "ttft_s": first, "total_s": time.perf_counter() - t0,
                "decode_s": last - first}

    def close(self):
        self.lm.close()


class _Transformers:
    name = "transformers"

    def __init__(self, path: Path, dtype: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        _cold(path)
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.load_s = time.perf_counter() - t
        gc = copy.deepcopy(self.model.generation_config)
        gc.eos_token_id = None
        gc.do_sample = False
        gc.temperature = gc.top_p = gc.top_k = None
        gc.repetition_penalty = None
        self.gc = gc
        self.impl = {"attention": self.model.config._attn_implementation,
                     "experts": getattr(self.model.config, "_experts_implementation", None)}

    def generate(self, prompt: list[int], n: int) -> dict:
        import torch
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Clock(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor([prompt])
        gc = copy.deepcopy(self.gc)
        gc.max_new_tokens, gc.min_new_tokens = n, None
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                                      streamer=Clock())
        total = time.perf_counter() - t0
        # the streamer sees the prompt first, then every new token
        return {"tokens": out[0, len(prompt):].tolist(), "ttft_s": stamps[1] - t0, "total_s": total,
                "decode_s": stamps[-1] - stamps[1]}

    def close(self):
        del self.model


_MAKERS = {"zipmoe": _Ours, "transformers": _Transformers}


def _weight_bytes_per_token(cfg: dict, itemsize: int) -> dict:
    """Bytes of weights one decode token streams, by part (a qwen2_moe/qwen3_moe/olmoe/mixtral layout)."""
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    layers = cfg["num_hidden_layers"]
    moe_i = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    k = cfg.get("num_experts_per_tok", 1)
    e = cfg.get("num_experts") or cfg.get("num_local_experts")
    shared = cfg.get("shared_expert_intermediate_size") or 0
    return {
        "attention": layers * (2 * h * heads * hd + 2 * h * kv * hd) * itemsize,
        "routed_experts": layers * k * 3 * h * moe_i * itemsize,
        "shared_expert": layers * (3 * h * shared + h) * itemsize,
        "router": layers * e * h * itemsize,
        "lm_head": cfg["vocab_size"] * h * itemsize,
    }


def _breakdown(ours: _Ours, prompt: list[int], n: int) -> dict:
    """Seconds per decode step in each part of the runtime's model, from forward hooks on extra runs. The hooks
    send each step through the modules (``models/_step.py`` steps without them), so these steps are the module
    path's: a little slower than the timed runs."""
    import torch

    model = ours.lm.model
    acc: dict[str, float] = {}
    starts: dict[int, float] = {}
    handles = []

    def part_of(name: str, mod) -> str | None:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "self_attn":
            return "attention"
        if leaf == "shared_expert":
            return "shared_expert"
        if leaf == "gate" and isinstance(mod, torch.nn.Linear):
            return "router"
        if leaf in ("mlp", "block_sparse_moe"):
            return "moe_block"
        if name == "lm_head":
            return "lm_head"
        return None

    for name, mod in model.named_modules():
        part = part_of(name, mod)
        if part is None:
            continue

        def pre(m, args, _id=id(mod)):
            starts[_id] = time.perf_counter()

        def post(m, args, out, _id=id(mod), _part=part):
            acc[_part] = acc.get(_part, 0.0) + time.perf_counter() - starts.pop(_id)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        cache = model.new_cache(1, len(prompt) + n + 1)
        logits = model(torch.tensor([prompt]), cache, 0, last_only=True)
        x = logits[:, -1:].argmax(-1)
        acc.clear()
        t0 = time.perf_counter()
        for i in range(n):
            logits = model(x, cache, len(prompt) + i, last_only=True)
            x = logits[:, -1:].argmax(-1)
        step = (time.perf_counter() - t0) / n
    finally:
        for h in handles:
            h.remove()
    per = {k: v / n for k, v in acc.items()}
    moe = per.pop("moe_block", 0.0)
    routed = moe - per.get("shared_expert", 0.0) - per.get("router", 0.0)
    out = {"step_s": step, "attention_s": per.get("attention", 0.0), "routed_experts_s": max(routed, 0.0),
           "shared_expert_s": per.get("shared_expert", 0.0), "router_s": per.get("router", 0.0),
           "lm_head_s": per.get("lm_head", 0.0)}
    out["other_s"] = max(step - sum(v for k, v in out.items() if k != "step_s"), 0.0)
    return out


def run(checkpoint: str | os.PathLike | None = None, *, size: str = "qwen1.5", family: str = "qwen2_moe",
        prompt_tokens: int = 32, new_tokens: int = 32, runs: int = 5, threads: int | None = None,
        dtype: str = "bfloat16", systems=SYSTEMS, workdir: str | os.PathLike | None = None,
        breakdown: bool = True, seed: int = 0) -> dict:
    """Run the benchmark; returns a JSON-serialisable dict (see the module docstring).

    ``checkpoint``: a checkpoint directory; None builds a synthetic ``family`` checkpoint of
    ``zipmoe_pack.synth.DEMO_SIZES[size]`` in ``workdir`` (kept) or a temporary directory (removed).
    """
    import torch

    if runs < 1 or new_tokens < 2 or prompt_tokens < 1:
        raise BenchInputError("runs >= 1, new_tokens >= 2 and prompt_tokens >= 1 are required")
    for s in systems:
        if s not in SYSTEMS:
            raise BenchInputError(f"unknown system {s!r} (known: {', '.join(SYSTEMS)})")
    if dtype not in ("bfloat16", "float32"):
        raise BenchInputError(f"dtype must be bfloat16 or float32, not {dtype!r}")
    threads_before = torch.get_num_threads()
    threads = threads or threads_before
    torch.set_num_threads(threads)
    tmp = tmp_gguf = None
    bench: dict = {}
    if checkpoint is None:
        from zipmoe_pack.synth import DEMO_SIZES, make_checkpoint

        if size not in DEMO_SIZES:
            raise BenchInputError(f"unknown size {size!r} (known: {', '.join(DEMO_SIZES)})")
        base = Path(workdir) if workdir else Path(tmp := tempfile.mkdtemp(prefix="zipmoe-bench-run-"))
        path = base / f"{family}-{size}"
        if not (path / "config.json").is_file():
            log.info("bench run: writing synthetic %s checkpoint (%s) to %s", family, size, path)
            make_checkpoint(path, family, dims=DEMO_SIZES[size], seed=seed, shards=3)
    else:
        path = Path(checkpoint)
    try:
        import json

        cfg = json.loads((path / "config.json").read_text())
        vocab = cfg["vocab_size"]
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist()
        result: dict = {
            "benchmark": "run", "checkpoint": str(path) if checkpoint is not None else f"synthetic {family} {size}",
            "model_type": cfg.get("model_type"), "dtype": dtype, "threads": threads, "runs": runs,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
            "notes": ["greedy, EOS ignored; systems alternate run by run; medians (best in brackets)",
                      "all experts resident: zipmoe via DirectorySource (mmap), transformers from_pretrained"],
            "systems": {},
        }
        result.update(host_report(threads=threads))  # host, calibration, host_line (experts all resident here)
        for s in systems:
            if s == "llamacpp":
                gguf_dir = Path(workdir) if workdir else Path(tmp or (tmp_gguf := tempfile.mkdtemp(prefix="zipmoe-gguf-")))
                peer, why, exp = _llamacpp_peer(path, dtype, threads, gguf_dir, prompt_tokens + new_tokens)
                if peer is None:
                    result["systems"][s] = {"skipped": why}
                else:
                    bench[s], result["gguf"] = peer, exp
                continue
            try:
                bench[s] = _MAKERS[s](path, dtype, threads)
            except ImportError as exc:
                result["systems"][s] = {"skipped": f"not installed: {exc.name or exc}"}
        for b in bench.values():  # warm-up: page in weights, compile kernels
            b.generate(prompt, new_tokens)
        samples: dict[str, list[dict]] = {s: [] for s in bench}
        order = list(bench)
        for r in range(runs):
            for s in (order if r % 2 == 0 else order[::-1]):
                log.info("bench run: %s run %d/%d", s, r + 1, runs)
                samples[s].append(bench[s].generate(prompt, new_tokens))
        for s, xs in samples.items():
            dec = [(new_tokens - 1) / x["decode_s"] for x in xs if x["decode_s"] > 0]
            result["systems"][s] = {
                "load_s": bench[s].load_s,
                "ttft_s": _median(x["ttft_s"] for x in xs), "ttft_best_s": min(x["ttft_s"] for x in xs),
                "prompt_tok_s": prompt_tokens / _median(x["ttft_s"] for x in xs),
                "decode_tok_s": _median(dec), "decode_best_tok_s": max(dec) if dec else None,
                "decode_runs_tok_s": dec,
                "tokens": xs[0]["tokens"],
            }
            if hasattr(bench[s], "impl"):
                result["systems"][s]["implementation"] = bench[s].impl
        if "zipmoe" in bench:  # the one-row kernels this host chose for the model's shapes (zipmoe_run.kernel_select)
            from zipmoe_run import kernel_select

            result["kernels"] = kernel_select.report(dtype == "bfloat16")
        ours, ref = result["systems"].get("zipmoe", {}), result["systems"].get("transformers", {})
        if ours.get("decode_tok_s") and ref.get("decode_tok_s"):
            result["decode_ratio"] = ours["decode_tok_s"] / ref["decode_tok_s"]
            result["ttft_ratio"] = ref["ttft_s"] / ours["ttft_s"]
            a, b = ours["tokens"], ref["tokens"]
            result["first_divergence"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        _llamacpp_results(result, bench, samples, _weight_bytes_per_token(cfg, 2 if dtype == "bfloat16" else 4))
        if breakdown and "zipmoe" in bench:
            itemsize = 2 if dtype == "bfloat16" else 4
            by = _weight_bytes_per_token(cfg, itemsize)
            parts = _breakdown(bench["zipmoe"], prompt, new_tokens)
            result["decode_step"] = {**parts, "weight_bytes": by, "weight_bytes_total": sum(by.values()),
                                     "effective_gb_s": sum(by.values()) / parts["step_s"] / 1e9}
        for b in bench.values():
            b.close()
        if "llamacpp" in bench:
            result["systems"]["llamacpp"].update(bench["llamacpp"].done)
        return result
    finally:
        torch.set_num_threads(threads_before)
        if "llamacpp" in bench and bench["llamacpp"].proc.poll() is None:  # an exception before close()
            bench["llamacpp"].close()
        for d in (tmp, tmp_gguf):
            if d:
                shutil.rmtree(d, ignore_errors=True)


def _llamacpp_peer(path, dtype, threads, gguf_dir, tokens):
    from zipmoe.bench.llamacpp import peer_for_run

    return peer_for_run(path, dtype, threads, gguf_dir, tokens)


def _llamacpp_results(result: dict, bench: dict, samples: dict, weight_bytes: dict) -> None:
    """Effective GB/s for every system (the same weight bytes per token for all, at the run's dtype: llama.cpp
    also reads its routers as F32, a rounding error here), llama.cpp's memory and I/O figures, and greedy token
    agreement of llama.cpp with this runtime."""
    total = sum(weight_bytes.values())
    for s, row in result["systems"].items():
        if row.get("decode_tok_s"):
            row["effective_gb_s"] = total * row["decode_tok_s"] / 1e9
    ll = result["systems"].get("llamacpp")
    if "llamacpp" not in bench or not ll:
        return
    info = bench["llamacpp"].info
    ll.update(anon_after_load_bytes=info.get("anon_after_load_bytes"), load_read_bytes=info.get("load_read_bytes"),
              proc_read_bytes_runs=[x.get("proc_read_bytes") for x in samples["llamacpp"]],
              note="BF16 GGUF, mmap; greedy (top_k 1, temp 0), EOS ignored; child process, pages dropped before load")
    ours = result["systems"].get("zipmoe", {}).get("tokens")
    if ours is not None:
        a = ll["tokens"]
        first = next((i for i, (x, y) in enumerate(zip(a, ours)) if x != y), None)
        if first is None and len(a) != len(ours):
            first = min(len(a), len(ours))
        result["llamacpp_vs_zipmoe"] = {"same_tokens": first is None, "first_divergence": first}


def render_table(result: dict):
    """A rich Table of :func:`run`'s result (rich is imported here only)."""
    from rich.table import Table

    table = Table(title=f"generation: {result['checkpoint']} ({result['model_type']}), {result['dtype']}, "
                        f"{result['threads']} threads, prompt {result['prompt_tokens']} + {result['new_tokens']} "
                        f"new tokens, median of {result['runs']} runs [best]")
    for c in ("system", "load s", "TTFT s", "prompt tok/s", "decode tok/s", "decode vs transformers", "eff. GB/s"):
        table.add_column(c, justify="left" if c == "system" else "right")
    ref = result["systems"].get("transformers", {})
    for name, row in result["systems"].items():
        if "skipped" in row:
            table.add_row(name, "-", "-", "-", "-", row["skipped"], "-")
            continue
        ratio = "-"
        if ref.get("decode_tok_s") and name != "transformers":
            ratio = f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}x"
        table.add_row(name, f"{row['load_s']:.2f}", f"{row['ttft_s']:.3f} [{row['ttft_best_s']:.3f}]",
                      f"{row['prompt_tok_s']:.1f}", f"{row['decode_tok_s']:.2f} [{row['decode_best_tok_s']:.2f}]",
                      ratio, f"{row['effective_gb_s']:.1f}" if row.get("effective_gb_s") else "-")
    captions = []
    agree = result.get("llamacpp_vs_zipmoe")
    if agree:
        ll = result["systems"]["llamacpp"]
        same = ("the same greedy tokens as zipmoe" if agree["same_tokens"]
                else f"greedy tokens differ from zipmoe's from position {agree['first_divergence']}")
        captions.append(f"llama.cpp {ll.get('implementation', {}).get('llama_cpp', '')}: BF16 GGUF, mmap, {same}; "
                        f"peak RSS {(ll.get('peak_rss_bytes') or 0) / 2**30:.2f} GiB, anonymous after load "
                        f"{(ll.get('anon_after_load_bytes') or 0) / 2**20:.0f} MiB")
    if result.get("kernels"):
        from zipmoe_run.kernel_select import line

        captions.append(line(result["kernels"]))
    step = result.get("decode_step")
    if step:
        ms = {k[:-2]: v * 1e3 for k, v in step.items() if k.endswith("_s") and k != "effective_gb_s"}
        parts = ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if k != "step")
        wb = step["weight_bytes"]
        captions.insert(0, f"zipmoe decode step (module path, hooked) {ms['step']:.1f} ms: {parts} ms | weights/token "
                         f"{step['weight_bytes_total'] / 1e6:.0f} MB (routed {wb['routed_experts'] / 1e6:.0f}, "
                         f"shared {wb['shared_expert'] / 1e6:.0f}, attention {wb['attention'] / 1e6:.0f}, "
                         f"lm_head {wb['lm_head'] / 1e6:.0f}) at {step['effective_gb_s']:.1f} GB/s")
    if captions:
        table.caption = "\n".join(captions)
    return table
