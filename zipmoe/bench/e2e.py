"""End-to-end benchmark: an MoE whose experts do not fit, at several memory budgets, against what a
user could pick instead.

Checkpoint: a generated ``qwen2_moe`` with Qwen1.5-MoE-A2.7B's layer dimensions (hidden 2048,
16 heads, expert width 1408, 60 routed experts, top-4, shared expert 5632) but 2 layers and a
4096-token vocabulary: ~2.1 GB of routed experts. Workload: greedy decoding of a fixed prompt.

Switch row (``family="switch_transformers"``, ``zipmoe bench e2e --family switch_transformers``): a
generated ``switch_transformers`` encoder-decoder with switch-large-128's expert dimensions (d_model
1024, d_ff 4096, 128 experts, top-1, 16 heads x 64) but 4 blocks per stack, 2 of them sparse (blocks 1
and 3 of the encoder and of the decoder) and a 4096-token vocabulary: ~8.6 GB of routed experts. The
prompt is the encoder input; the decoder generates from ``decoder_start_token_id``. Expert capacity
stays the real 64, which the 16-token prompt cannot overflow with 128 experts. ``hf-offload`` is
skipped for this family (the result says so, ``hf_offload``): its device map and streamer are written
for decoder-only ``AutoModelForCausalLM`` checkpoints, and accelerate's disk offload of the
seq2seq model's per-expert ModuleDicts was not set up. The LM head is untied and given its own
random values (``_untie_lm_head``): with the generator's tied head the decoder echoed its start
token at every step, so decoding revisited the same few experts and no budget mattered.

Systems (each run in its own subprocess, experts cold: ``posix_fadvise(DONTNEED)`` on every file
first):

* ``zipmoe``: this runtime on the compressed archive with ``--memory-budget``;
* ``zipmoe-lookahead``: the same with router lookahead prefetch (``prefetch="lookahead"``: the next
  layer's experts guessed from the current hidden state and prefetched); its accuracy (predicted
  experts the next layer asked for) and the time it saves against ``zipmoe`` are in the result;
* ``raw``: the same runtime on an archive packed with ``--raw`` (experts stored as BF16);
* ``hf-offload``: transformers + accelerate, the experts modules that do not fit the budget
  offloaded to disk (``device_map`` + ``offload_folder``; transformers' granularity is one layer's
  fused expert tensors);
* ``llamacpp``: llama.cpp (llama-cpp-python, the ``llamacpp`` extra) on a BF16 GGUF of the same
  checkpoint, run as users run it (mmap, greedy, EOS ignored; ``zipmoe.bench.llamacpp``), in a cap of
  dense + budget + its own fixed overhead (its anonymous memory after loading and generating, with the
  weights file-backed: measured once per run of the benchmark, uncapped; ``llamacpp.overhead`` in the
  result), not the Python-sized slack the others get. Skipped, with the reason in the result, when
  ``llama_cpp`` does not import;
* ``resident``: this runtime with every expert decoded in memory before timing (the ceiling).

At a budget of at least the experts' decoded size (100 %), ``zipmoe`` and ``raw`` preload (the
store's default ``preload="auto"``: experts decoded into memory while the archive opens, until the
budget is full), like transformers and ``resident``, which also load everything before the first
token; that time is in ``load_s`` (the table's ``load s``), not in tokens/s.

Emulated storage (``storage``: ``"emmc"`` 300 MB/s, ``"ufs"`` 2 GB/s or bytes/s): the runtime's
expert reader caps its sustained read rate (``io_throttle_bps``, specs/runtime.md section 3), so
``zipmoe`` and ``raw`` read as if from that device; ``resident`` is not throttled (it reads every
expert before timing) and ``hf-offload`` is skipped (it reads through the page cache, which this
throttle cannot slow). The result says so (``storage``) and the table's title labels it emulated.

Memory caps: each capped run joins a child memory cgroup the benchmark creates (v1
``memory.limit_in_bytes`` under the process's own memory cgroup, or v2 ``memory.max``) and removes.
Charges made before joining stay outside (v1 cannot move them), so a run trims its heap
(``malloc_trim``) and joins right before it allocates what the budget covers, with the limit
``dense + KV + budget + CAP_SLACK - (anonymous RSS gained since the post-import baseline)``. The
runtime joins before opening the archive; transformers cannot load inside such a cap, so it loads
first, drops the offload files' pages, then joins with what is left (the weights it keeps in memory
count against the same total). Where no cgroup can be made, runs are uncapped and labelled so.
Before the timed runs, ``prime`` runs the runtime once, short and uncapped, so that its first-sight
measurements of the host (kernel choice, huge pages) are cached rather than made inside a cap.
Compute threads default to 1 for every system (on the shared 2-core machine two OpenMP threads were
up to 15x slower); the runtime's decoder pool uses all cores.

Modules: this one (configuration, checkpoint preparation, the parent loop, targets), ``e2e_proc``
(memory cgroups, memory and I/O readings, warm-up, dropping files from the page cache),
``e2e_child`` (the per-system child process) and ``e2e_report`` (table, target lines, plot).

Library code: logs, never prints (``zipmoe bench e2e`` prints). Timings on a shared machine are
noisy; the table says so.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .e2e_proc import MemCap, _drop, kv_cache_bytes, machine_info, warm_up_runtime
from .e2e_report import plot, render_table, render_targets
from .e2e_targets import targets
from .errors import BenchInputError
from .llamacpp import e2e_prepare, e2e_targets

__all__ = ["E2EConfig", "run", "render_table", "render_targets", "plot", "MemCap", "DIMS", "QUICK_DIMS",
           "SWITCH_DIMS", "SWITCH_QUICK_DIMS", "FAMILIES", "kv_cache_bytes", "SYSTEMS", "warm_up_runtime"]

log = logging.getLogger(__name__)

DIMS = {"hidden": 2048, "moe_intermediate": 1408, "experts": 60, "top_k": 4, "layers": 2, "vocab": 4096,
        "heads": 16, "kv_heads": 16, "shared_intermediate": 5632, "intermediate": 5632}
QUICK_DIMS = {"hidden": 128, "moe_intermediate": 256, "experts": 8, "top_k": 2, "layers": 2, "vocab": 512,
              "heads": 4, "kv_heads": 4, "shared_intermediate": 128, "intermediate": 128}
# switch-large-128's expert dimensions; 4 blocks per stack, blocks 1 and 3 sparse (encoder and decoder)
SWITCH_DIMS = {"hidden": 1024, "intermediate": 4096, "experts": 128, "top_k": 1, "layers": 4, "sparse_layers": 2,
               "vocab": 4096, "heads": 16, "head_dim": 64, "expert_capacity": 64}
SWITCH_QUICK_DIMS = {"hidden": 64, "intermediate": 128, "experts": 8, "top_k": 1, "layers": 4, "sparse_layers": 2,
                     "vocab": 512, "heads": 4, "head_dim": 16, "expert_capacity": 64}
FAMILIES = ("qwen2_moe", "switch_transformers")
SYSTEMS = ("zipmoe", "zipmoe-lookahead", "raw", "dir", "hf-offload", "llamacpp", "resident")
# the systems that read experts through the runtime's store (``dir``: the checkpoint folder, budgeted)
RUNTIME = ("zipmoe", "zipmoe-lookahead", "raw", "dir")
HF_SKIP_SWITCH = ("hf-offload skipped for switch_transformers: the benchmark's accelerate device map and streamer "
                  "are written for decoder-only AutoModelForCausalLM; disk offload of the seq2seq model was not set up")


@dataclasses.dataclass
class E2EConfig:
    workdir: Path
    budgets: tuple[float, ...] = (15.0, 30.0, 60.0, 100.0)  # % of routed-expert bytes (decoded BF16)
    systems: tuple[str, ...] = SYSTEMS
    prompt_tokens: int = 16
    new_tokens: int = 24
    threads: int = 1  # compute threads (torch, decode kernel) for every system; the decoder pool uses all cores
    quick: bool = False
    cap: bool = True
    hf_uncapped_fallback: bool = True
    warm_pass: bool = True  # generate the prompt a second time in the same process (steady state)
    timeout_s: float = 900.0
    seed: int = 0
    storage: str | None = None  # emulated storage: "emmc", "ufs" or bytes/s; None: the real disk
    family: str = "qwen2_moe"  # or "switch_transformers" (the Switch row)
    repeat: int = 1  # runs per system and budget; the row is the run with the median cold tokens/s
    depth: str = "2"  # "full": Qwen1.5-MoE-A2.7B at its real depth and size (zipmoe.bench.e2e_full)
    routing: str | None = None  # "replay:FILE.npy": routers replaced by a real trace (zipmoe.bench.routing)
    full: dict | None = None  # --depth full options: {"source": dir, "scale": float} (tests)
    codec: str = "huf4x"  # exponent codec of the compressed archive (formats.codec.DEFAULT_CODEC)

    @property
    def dims(self) -> dict:
        if self.family == "switch_transformers":
            return SWITCH_QUICK_DIMS if self.quick else SWITCH_DIMS
        return QUICK_DIMS if self.quick else DIMS

    @property
    def tag(self) -> str:
        if self.family == "switch_transformers":
            return "switch-quick" if self.quick else "switch-large"
        return "quick" if self.quick else "qwen15moe"

    @property
    def io_throttle_bps(self) -> int | None:
        from zipmoe_run.store.io import parse_storage

        return parse_storage(self.storage)


THROTTLED = RUNTIME


def storage_info(cfg: E2EConfig) -> dict:
    """What the result says about the storage: the real disk, or the emulated device and its reach."""
    bps = cfg.io_throttle_bps
    if bps is None:
        return {"emulated": False, "name": "disk", "bps": None, "note": "the real disk"}
    name = {"emmc": "eMMC", "ufs": "UFS"}.get(str(cfg.storage).strip().lower(), "custom")
    return {"emulated": True, "name": name, "bps": bps, "throttled": list(THROTTLED),
            "not_throttled": ["resident"], "skipped": ["hf-offload"],
            "note": (f"emulated {name} storage: the store's reader caps reads at {bps / 1e6:g} MB/s for "
                     "zipmoe and raw; resident is not throttled (experts read before timing); hf-offload "
                     "skipped (it reads through the page cache, which this throttle cannot slow)")}


# -- preparing the checkpoint and archives ----------------------------------------------------------


def _untie_lm_head(ckpt: Path, seed: int) -> None:
    """Overwrite ``lm_head.weight`` in place with its own random values (the generator writes the
    shared embedding there). With a tied head the synthetic decoder echoes its input token (its
    residual stream is dominated by the input embedding), so greedy decoding repeats the start token
    and every step routes to the same experts; an independent head gives a varied token stream."""
    import numpy as np

    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with open(f, "r+b") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            meta = header.get("lm_head.weight")
            if meta is None:
                continue
            assert meta["dtype"] == "BF16", meta["dtype"]
            begin, end = meta["data_offsets"]
            rng = np.random.default_rng(seed + 7919)
            vals = rng.standard_normal((end - begin) // 2, dtype=np.float32)
            bf16 = (vals.view(np.uint32) >> 16).astype("<u2")  # truncate to bfloat16
            fh.seek(8 + n + begin)
            fh.write(bf16.tobytes())
            return
    raise BenchInputError(f"no lm_head.weight in {ckpt}")


def prepare(cfg: E2EConfig) -> dict:
    """Generate (once) the checkpoint, the archive and the --raw archive under ``cfg.workdir``."""
    from zipmoe_pack.pack import PackOptions, pack
    from zipmoe_pack.synth import make_checkpoint

    wd = Path(cfg.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    tag = cfg.tag
    marker = wd / f"{tag}.json"
    want = {"dims": cfg.dims, "seed": cfg.seed, "family": cfg.family,
            "version": 2 if cfg.family == "switch_transformers" else 1}
    ckpt, arc, raw = wd / f"{tag}-ckpt", wd / f"{tag}.zmoe", wd / f"{tag}-raw.zmoe"
    if cfg.codec != "zstd-lit":  # another codec: its own archive beside the default one
        want["codec"] = cfg.codec
        marker, arc = wd / f"{tag}-{cfg.codec}.json", wd / f"{tag}-{cfg.codec}.zmoe"
    timings = {}
    if not (marker.is_file() and json.loads(marker.read_text()) == want and ckpt.is_dir() and arc.is_file()
            and raw.is_file()):
        for p in (ckpt, arc, raw, marker):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        t0 = time.perf_counter()
        if cfg.family == "switch_transformers":
            make_checkpoint(ckpt, cfg.family, seed=cfg.seed, shards=2, dims=cfg.dims,
                            config_overrides={"tie_word_embeddings": False})
            _untie_lm_head(ckpt, cfg.seed)
        else:
            make_checkpoint(ckpt, cfg.family, seed=cfg.seed, shards=2, dims=cfg.dims)
        timings["make_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pack(ckpt, arc, PackOptions(threads=os.cpu_count() or 1, codec=cfg.codec))
        timings["pack_s"] = time.perf_counter() - t0
        pack(ckpt, raw, PackOptions(threads=os.cpu_count() or 1, raw=True))
        marker.write_text(json.dumps(want))
    from formats.reader import Archive

    with Archive(arc) as a:
        expert_bytes = sum(e.decoded_nbytes for e in a.index.experts)
        extent_bytes = sum(e.length for e in a.index.experts)
        dense_bytes = sum(t.nbytes for t in a.index.tensors.values() if t.role == "dense")
        config = json.loads(a.file_bytes("config.json"))
    return {"ckpt": str(ckpt), "archive": str(arc), "raw_archive": str(raw), "expert_bytes": expert_bytes,
            "extent_bytes": extent_bytes, "dense_bytes": dense_bytes, "config": config, **timings}


# -- the parent ------------------------------------------------------------------------------------


def _spawn(args: dict, timeout: float) -> tuple[dict, int, str]:
    cmd = [sys.executable, "-m", "zipmoe.bench.e2e_child", json.dumps(args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}, -1, ""
    res = None
    for line in p.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            res = json.loads(line[len("@@RESULT@@"):])
    if res is None:
        killed = p.returncode in (-9, 137)
        tail = (p.stderr or "").strip().splitlines()[-1:] or [""]
        res = {"ok": False, "error": ("killed (OOM under the memory cap)" if killed else
                                      f"exit {p.returncode}: {tail[0][:200]}"), "oom": killed}
    return res, p.returncode, p.stderr


def run_one(system: str, pct: float | None, prep: dict, cfg: E2EConfig, capped: bool, idx: int) -> dict:
    budget = None if pct is None else int(prep["expert_bytes"] * pct / 100)
    path = {"zipmoe": prep["archive"], "zipmoe-lookahead": prep["archive"], "raw": prep["raw_archive"],
            "dir": prep["ckpt"], "resident": prep["archive"], "hf-offload": prep["ckpt"],
            "llamacpp": prep.get("gguf")}[system]
    args = {"system": system, "path": path, "budget_bytes": budget, "threads": cfg.threads,
            "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens, "config": prep["config"],
            "dense_bytes": prep["dense_bytes"], "expert_bytes": prep["expert_bytes"],
            "offload_dir": str(Path(cfg.workdir) / "hf-offload"), "warm_pass": cfg.warm_pass,
            "llama_overhead_bytes": prep.get("llama_overhead_bytes"), "llama_warmup_gguf": prep.get("llama_warmup_gguf"),
            "io_throttle_bps": cfg.io_throttle_bps if system in THROTTLED else None,
            "routing_plan": prep.get("routing_plan")}  # zipmoe.bench.routing: replayed routing
    cap, why = (None, "uncapped by request") if not capped else MemCap.create(f"zipmoe-bench-{os.getpid()}-{idx}")
    if cap is not None:
        args.update(cap_path=str(cap.path), cap_version=cap.version)
    _drop([p for p in (prep["archive"], prep.get("raw_archive"), prep["ckpt"], prep.get("gguf")) if p])
    t0 = time.perf_counter()
    try:
        res, rc, _err = _spawn(args, cfg.timeout_s)
        if cap is not None:
            res.update(cap.stats())
    finally:
        if cap is not None:
            cap.remove()
    res.update(system=system, budget_pct=pct, budget_bytes=budget, capped=cap is not None,
               cap_note=None if cap is not None else why, wall_s=time.perf_counter() - t0)
    log.info("%s at %s: %s", system, f"{pct:g}%" if pct is not None else "unlimited",
             f"{res.get('tok_s', 0):.2f} tok/s" if res.get("ok") else res.get("error"))
    return res


def prime(prep: dict, cfg: E2EConfig) -> dict:
    """One short uncapped run of the runtime before the timed ones, its result discarded: what the
    runtime measures the first time it meets a host (its kernels on the model's shapes at ``cfg.threads``,
    whether to use huge pages) is then cached, so no capped run pays it under its cap (the kernel timing
    holds up to ``kernel_select.SPAN_MAX`` for a moment) and every timed run starts from the same state."""
    if not any(s in RUNTIME or s == "resident" for s in cfg.systems):
        return {"skipped": "no runtime system"}
    pct = min(cfg.budgets) if cfg.budgets else None
    short = dataclasses.replace(cfg, prompt_tokens=min(cfg.prompt_tokens, 4), new_tokens=2, warm_pass=False)
    res = run_one("zipmoe", pct, prep, short, False, -1)
    out = {"wall_s": res["wall_s"], "ok": bool(res.get("ok"))}
    if not res.get("ok"):
        out["error"] = res.get("error")
        log.warning("priming run failed (%s); the timed runs measure the host themselves", res.get("error"))
    return out


def run_median(system: str, pct: float | None, prep: dict, cfg: E2EConfig, capped: bool, idx: int) -> dict:
    """``cfg.repeat`` runs (each its own cold subprocess); the row of the median cold tokens/s, with
    every run's cold and warm tokens/s attached (``tok_s_runs``, ``tok_s_warm_runs``)."""
    return median_row([run_one(system, pct, prep, cfg, capped, idx + j) for j in range(max(1, cfg.repeat))])


def median_row(runs: list[dict]) -> dict:
    """The row of the median cold tokens/s of ``runs`` (one system at one budget), with every run's
    cold and warm tokens/s attached."""
    ok = sorted((r for r in runs if r.get("ok")), key=lambda r: r["tok_s"])
    row = ok[(len(ok) - 1) // 2] if ok else runs[-1]
    if len(runs) > 1:
        row["tok_s_runs"] = [r.get("tok_s") for r in runs]
        row["tok_s_warm_runs"] = [r.get("tok_s_warm") for r in runs]
        row["runs_failed"] = len(runs) - len(ok)
    return row


def run(cfg: E2EConfig) -> dict:
    if cfg.depth == "full":  # Qwen1.5-MoE-A2.7B at full size, bigger than memory
        from .e2e_full import run_full

        return run_full(cfg)
    from .routing import prepare_routing, skipped_systems

    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    prep = prepare(cfg)
    from zipmoe_run.calibrate import report as host_report

    # host, calibration (reads: the archive's file system), host_line; measured here, before any timed run,
    # so that the runs find it cached
    host = host_report(prep["archive"])
    log.info("%s", host["host_line"])
    primed = prime(prep, cfg)
    _, _, why_nocap = MemCap.parent()
    storage = storage_info(cfg)
    if storage["emulated"] and "hf-offload" in cfg.systems:
        log.warning("emulated storage: hf-offload skipped (it reads through the page cache, not throttled)")
    switch = cfg.family == "switch_transformers"
    hf_note = HF_SKIP_SWITCH if switch else None
    if switch and "hf-offload" in cfg.systems:
        log.warning(HF_SKIP_SWITCH)
    llamacpp = e2e_prepare(cfg, prep)  # the GGUF and llama.cpp's own overhead, or why it is skipped
    routing = prepare_routing(cfg, prep)  # None, or the replayed plan (the same for every system)
    replay_skip = skipped_systems(cfg, routing)
    rows: list[dict] = []
    i = 0
    for pct in cfg.budgets:
        systems = [s for s in ("zipmoe", "zipmoe-lookahead", "raw", "dir", "hf-offload", "llamacpp")
                   if s not in replay_skip and s in cfg.systems
                   and not (s == "hf-offload" and (storage["emulated"] or switch))
                   and not (s == "llamacpp" and llamacpp.get("skipped"))]
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for j in range(max(1, cfg.repeat)):  # the peers alternate run by run (A B B A ...): a busy
            for system in (systems if j % 2 == 0 else systems[::-1]):  # spell of the host hits both
                runs[system].append(run_one(system, pct, prep, cfg, cfg.cap, i))
                i += 1
        for system in systems:
            r = median_row(runs[system])
            rows.append(r)
            if system == "hf-offload" and not r.get("ok") and r.get("capped") and cfg.hf_uncapped_fallback:
                u = run_one(system, pct, prep, cfg, False, i)
                u["cap_note"] = "uncapped rerun: the capped run failed (" + str(r.get("error")) + ")"
                i += 1
                rows.append(u)
    if "resident" in cfg.systems:
        rows.append(run_median("resident", None, prep, cfg, False, i))
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        "machine": machine_info(cfg.threads, load0),
        "model": {"family": cfg.family, "dims": cfg.dims, "expert_bytes": prep["expert_bytes"],
                  "extent_bytes": prep["extent_bytes"], "dense_bytes": prep["dense_bytes"]},
        "hf_offload": {"skipped": switch, "note": hf_note or ""},
        "cgroup": why_nocap or "capped runs join a child memory cgroup",
        "storage": storage,
        "llamacpp": llamacpp,
        "routing": routing, "routing_skipped": replay_skip,
        "rows": rows,
        "primed": primed,
    }
    result.update(host)
    result["targets"] = targets(rows, cfg, RUNTIME) + e2e_targets(rows, llamacpp)
    result["total_s"] = time.perf_counter() - t0
    return result
