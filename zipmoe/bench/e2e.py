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
Compute threads default to 1 for every system (on the shared 2-core machine two OpenMP threads were
up to 15x slower); the runtime's decoder pool uses all cores.

Library code: logs, never prints (``zipmoe bench e2e`` prints). Timings on a shared machine are
noisy; the table says so.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["E2EConfig", "run", "render_table", "plot", "MemCap", "DIMS", "QUICK_DIMS", "SWITCH_DIMS",
           "SWITCH_QUICK_DIMS", "FAMILIES", "kv_cache_bytes", "SYSTEMS", "warm_up_runtime"]

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
SYSTEMS = ("zipmoe", "zipmoe-lookahead", "raw", "hf-offload", "resident")
RUNTIME = ("zipmoe", "zipmoe-lookahead", "raw")  # the systems that read experts through the runtime's store
HF_SKIP_SWITCH = ("hf-offload skipped for switch_transformers: the benchmark's accelerate device map and streamer "
                  "are written for decoder-only AutoModelForCausalLM; disk offload of the seq2seq model was not set up")
CAP_SLACK = 128 << 20  # activations, allocator and library working memory allowed above the budget
MIB = 1 << 20


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


# -- memory cgroups ------------------------------------------------------------------------------


class MemCap:
    """A child memory cgroup under this process's own (v1 or v2); ``None`` from ``create`` if impossible."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @staticmethod
    def parent() -> tuple[Path | None, int, str]:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError as e:
            return None, 0, f"cannot read /proc/self/cgroup ({e})"
        for line in lines:
            _, ctrls, rel = line.split(":", 2)
            if "memory" in ctrls.split(","):
                p = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
                if (p / "memory.limit_in_bytes").exists():
                    return p, 1, ""
        for line in lines:
            _, ctrls, rel = line.split(":", 2)
            if ctrls == "":
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    p = root / rel.lstrip("/")
                    try:
                        if "memory" in (p / "cgroup.subtree_control").read_text().split():
                            return p, 2, ""
                    except OSError:
                        continue
        return None, 0, "no writable memory cgroup (v1 memory controller or v2 with memory delegated)"

    @classmethod
    def create(cls, name: str) -> tuple["MemCap | None", str]:
        parent, version, why = cls.parent()
        if parent is None:
            return None, why
        path = parent / name
        try:
            path.mkdir()
        except OSError as e:
            return None, f"cannot create {path} ({e.strerror})"
        return cls(path, version), ""

    def limit_file(self) -> Path:
        return self.path / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")

    def stats(self) -> dict:
        def rd(name):
            try:
                return int((self.path / name).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None

        if self.version == 1:
            return {"cap_peak_bytes": rd("memory.max_usage_in_bytes"), "cap_failcnt": rd("memory.failcnt")}
        return {"cap_peak_bytes": rd("memory.peak"), "cap_failcnt": None}

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        log.warning("could not remove cgroup %s", self.path)


def join_cap(path: str, version: int, limit: int) -> None:
    """Set the cap's limit and move this process into it (called by the child)."""
    p = Path(path)
    (p / ("memory.limit_in_bytes" if version == 1 else "memory.max")).write_text(str(int(limit)))
    (p / "cgroup.procs").write_text(str(os.getpid()))


# -- helpers shared by parent and child ------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_anon() -> int:
    """Anonymous resident bytes (heap, tensors, buffers): what a process brings into a cap it joins
    late. File-backed pages (libraries, mapped weights) are left out."""
    return _status("RssAnon") or _rss()


def _trim_heap() -> None:
    """Give freed heap memory back to the kernel, so memory reused after joining a cap is charged to it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _io_read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def warm_up_runtime(threads: int) -> None:
    """Everything the runtime loads lazily on first use, so ``base`` RSS includes it: the numba
    kernels, torch's bf16 linear and the first meta-device module (which imports ~800 modules,
    ~70 MiB)."""
    import torch

    from formats.planes import warm_up

    torch.set_num_threads(threads)
    warm_up()
    one = torch.ones(1, 64, dtype=torch.bfloat16)
    torch.nn.functional.linear(one, torch.ones(64, 64, dtype=torch.bfloat16))
    try:
        from zipmoe_run.layers import linear  # the one-row decode kernel, where this build has it

        linear(one, torch.ones(64, 64, dtype=torch.bfloat16))
    except ImportError:
        pass
    with torch.device("meta"):
        torch.nn.Embedding(4, 4)
    # the default store policy plans with numba kernels: load (or, on a cold cache, compile) them now
    from zipmoe_run.policies.planner import plan
    from zipmoe_run.policies.tiers import Calibration, TierSizes

    plan(None, 8 << 20, TierSizes(1 << 20), Calibration(), layers=1, experts=8, k=2)
    torch.set_num_threads(threads)  # numba's OpenMP layer, started by the first kernel call, resets it


def _cap_stat(a: dict) -> dict | None:
    """rss / cache / mapped_file of the cap at the end of the run (cgroup v1 memory.stat)."""
    if not a.get("cap_path") or a.get("cap_version") != 1:
        return None
    try:
        kv = dict(line.split() for line in (Path(a["cap_path"]) / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return {k: int(kv[k]) for k in ("rss", "cache", "mapped_file", "max_usage_in_bytes") if k in kv} or None


def kv_cache_bytes(cfg: dict, batch: int, max_len: int, itemsize: int = 2) -> int:
    """Bytes of a standard attention KV cache (keys and values, every layer) for ``cfg``. Encoder-decoders
    (``d_kv``): the decoder's self-attention and cross-attention caches, both counted at ``max_len``
    (an upper bound: the cross cache holds the prompt only)."""
    if cfg.get("is_encoder_decoder") or "d_kv" in cfg:
        layers = cfg.get("num_decoder_layers") or cfg.get("num_layers") or 0
        return 2 * 2 * layers * batch * cfg.get("num_heads", 1) * cfg.get("d_kv", 64) * max_len * itemsize
    layers = cfg.get("num_hidden_layers") or cfg.get("num_layers") or 0
    heads = cfg.get("num_attention_heads") or 1
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads)
    return 2 * layers * batch * kv * hd * max_len * itemsize


def prompt_ids(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % max(2, vocab - 3) + 3 for i in range(n)]


def _drop(paths) -> None:
    from zipmoe_run.store.io import drop_page_cache

    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()] if p.is_dir() else []
        for f in files:
            try:
                drop_page_cache(f)
            except OSError as e:
                log.debug("drop cache %s: %s", f, e)


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
    raise ValueError(f"no lm_head.weight in {ckpt}")


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
        pack(ckpt, arc, PackOptions(threads=os.cpu_count() or 1))
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


# -- the child process ---------------------------------------------------------------------------


def _child_runtime(a: dict) -> dict:
    from zipmoe_run.api import load
    from zipmoe_run.generate import Sampling

    warm_up_runtime(a["threads"])
    _trim_heap()
    out: dict = {"base_rss_bytes": _rss()}
    anon0 = _rss_anon()
    budget = a["budget_bytes"]
    kv = kv_cache_bytes(a["config"], 1, a["prompt_tokens"] + a["new_tokens"])
    out["kv_bytes"] = kv
    if a.get("cap_path"):
        limit = a["dense_bytes"] + kv + (budget or a["expert_bytes"]) + CAP_SLACK - (_rss_anon() - anon0)
        join_cap(a["cap_path"], a["cap_version"], limit)
        out["cap_limit_bytes"] = limit
    _reset_peak()
    t0 = time.perf_counter()
    # threads=None: torch keeps the compute threads set above; the decoder pool gets every core
    opts = {"io_throttle_bps": a["io_throttle_bps"]} if a.get("io_throttle_bps") else {}
    prefetch = "lookahead" if a["system"] == "zipmoe-lookahead" else "off"
    lm = load(a["path"], dtype="bfloat16", threads=None, memory_budget=budget, prefetch=prefetch, **opts)
    src = lm.source
    if a["system"] == "resident":  # every expert decoded before timing
        layers = sorted({(e.stack, e.layer) for e in src.archive.index.experts})
        for stack, layer in layers:
            ids = [e.expert for e in src.archive.index.experts if e.layer == layer and e.stack == stack]
            for _ in src.fetch(layer, ids, stack):
                pass
    out["load_s"] = time.perf_counter() - t0
    ids = prompt_ids(a["prompt_tokens"], a["config"]["vocab_size"])
    for tag in ("", "_warm") if a.get("warm_pass") else ("",):
        before = src.stats()
        io0 = _io_read_bytes()
        stats: dict = {}
        toks = [ev.token_id for ev in lm.stream(ids, max_new_tokens=a["new_tokens"], sampling=Sampling(greedy=True),
                                                stats=stats)]
        st = src.stats()
        io1 = _io_read_bytes()
        out.update({
            "tokens" + tag: toks, "ttft_s" + tag: stats["ttft_s"], "tok_s" + tag: stats["gen_tok_s"],
            "tpot_s" + tag: stats["decode_s"] / max(1, stats["decode_steps"]), "prefill_s" + tag: stats["prefill_s"],
            "decode_s" + tag: stats["decode_s"], "bytes_read" + tag: st["bytes_read"] - before.get("bytes_read", 0),
            "proc_read_bytes" + tag: (io1 - io0) if io0 is not None and io1 is not None else None,
            "hits" + tag: {t: st[f"hits_{t}"] - before.get(f"hits_{t}", 0)
                           for t in ("full", "comp", "sm", "cold", "prefetch")},
            "prefetch_predicted" + tag: st["prefetch_predicted"] - before.get("prefetch_predicted", 0),
            "prefetch_correct" + tag: st["prefetch_correct"] - before.get("prefetch_correct", 0),
        })
    io_mode = st["io_mode"]
    if st.get("io_throttle_bps"):
        io_mode += f", {st['io_throttle_bps'] / 1e6:g} MB/s cap (emulated)"
    out.update(store_peak_bytes=st["store_peak_bytes"], io_mode=io_mode, budget=st["budget"],
               io_throttle_bps=st.get("io_throttle_bps"), throttle_s=st.get("throttle_s"),
               dense_bytes=st["dense_bytes"], peak_rss_bytes=_status("VmHWM"),
               resident_experts=st.get("resident_experts"), cap_stat=_cap_stat(a))
    out["store_stats"] = {k: v for k, v in st.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lm.close()
    return out


def _hf_device_map(ckpt: str, budget: int | None):
    """Dense modules on the CPU; as many layers' fused expert tensors as the budget holds, the rest on disk."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ckpt)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(cfg)
    dm, left, on_disk = {}, budget, []
    for name, mod in meta.named_modules():
        own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if not own:
            continue
        if name.endswith("mlp.experts"):
            size = sum(p.numel() * 2 for p in mod.parameters(recurse=False))  # bf16
            if left is None or size <= left:
                dm[name] = "cpu"
                left = None if left is None else left - size
            else:
                dm[name] = "disk"
                on_disk.append(name)
        else:
            dm[name] = "cpu"
    return dm, on_disk


def _child_hf(a: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(a["threads"])
    torch.nn.functional.linear(torch.ones(1, 64, dtype=torch.bfloat16), torch.ones(64, 64, dtype=torch.bfloat16))
    with torch.device("meta"):
        torch.nn.Embedding(4, 4)
    _trim_heap()
    out: dict = {"base_rss_bytes": _rss()}
    anon0 = _rss_anon()
    budget = a["budget_bytes"]
    kv = kv_cache_bytes(a["config"], 1, a["prompt_tokens"] + a["new_tokens"])
    out["kv_bytes"] = kv
    off = Path(a["offload_dir"])
    if off.exists():
        shutil.rmtree(off)
    t0 = time.perf_counter()
    dm, on_disk = _hf_device_map(a["path"], budget)
    model = AutoModelForCausalLM.from_pretrained(a["path"], dtype=torch.bfloat16, device_map=dm,
                                                 offload_folder=str(off))
    model.eval()
    out["load_s"] = time.perf_counter() - t0
    out["offloaded_modules"] = on_disk
    out["load_peak_rss_bytes"] = _status("VmHWM")
    _drop([off, a["path"]])  # the offload files were just written: make them cold too
    _trim_heap()
    out["anon_after_load_bytes"] = _rss_anon() - anon0
    if a.get("cap_path"):
        # what the weights it keeps in memory already use counts against the same total
        limit = a["dense_bytes"] + kv + (budget or a["expert_bytes"]) + CAP_SLACK - (_rss_anon() - anon0)
        limit = max(limit, 64 * MIB)
        join_cap(a["cap_path"], a["cap_version"], limit)
        out["cap_limit_bytes"] = limit
    _reset_peak()
    stamps: list[float] = []

    class Clock(BaseStreamer):
        def __init__(self):
            self.first = True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            stamps.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor([prompt_ids(a["prompt_tokens"], a["config"]["vocab_size"])])
    for tag in ("", "_warm") if a.get("warm_pass") else ("",):
        stamps.clear()
        io0 = _io_read_bytes()
        t1 = time.perf_counter()
        with torch.no_grad():
            res = model.generate(ids, max_new_tokens=a["new_tokens"], min_new_tokens=a["new_tokens"],
                                 do_sample=False, streamer=Clock(), pad_token_id=0)
        io1 = _io_read_bytes()
        decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
        out.update({
            "tokens" + tag: res[0, ids.shape[1]:].tolist(), "ttft_s" + tag: stamps[0] - t1 if stamps else None,
            "tok_s" + tag: (len(stamps) - 1) / decode_s if decode_s > 0 else 0.0,
            "tpot_s" + tag: decode_s / max(1, len(stamps) - 1), "decode_s" + tag: decode_s,
            "prefill_s" + tag: stamps[0] - t1 if stamps else None, "bytes_read" + tag: None,
            "proc_read_bytes" + tag: (io1 - io0) if io0 is not None and io1 is not None else None,
            "hits" + tag: None,
        })
    out.update(store_peak_bytes=None, io_mode="page cache (safetensors offload)", budget=None,
               dense_bytes=a["dense_bytes"], peak_rss_bytes=_status("VmHWM"), cap_stat=_cap_stat(a))
    return out


def child_main(argv: list[str]) -> int:
    a = json.loads(argv[0])
    logging.basicConfig(level=logging.WARNING)
    try:
        out = _child_hf(a) if a["system"] == "hf-offload" else _child_runtime(a)
        out["ok"] = True
    except MemoryError:
        out = {"ok": False, "error": "MemoryError"}
    except Exception as e:  # noqa: BLE001 - reported in the table
        out = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    sys.stdout.write("\n@@RESULT@@" + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


# -- the parent ------------------------------------------------------------------------------------


def _spawn(args: dict, timeout: float) -> tuple[dict, int, str]:
    cmd = [sys.executable, "-m", "zipmoe.bench.e2e", json.dumps(args)]
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
            "resident": prep["archive"], "hf-offload": prep["ckpt"]}[system]
    args = {"system": system, "path": path, "budget_bytes": budget, "threads": cfg.threads,
            "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens, "config": prep["config"],
            "dense_bytes": prep["dense_bytes"], "expert_bytes": prep["expert_bytes"],
            "offload_dir": str(Path(cfg.workdir) / "hf-offload"), "warm_pass": cfg.warm_pass,
            "io_throttle_bps": cfg.io_throttle_bps if system in THROTTLED else None}
    cap, why = (None, "uncapped by request") if not capped else MemCap.create(f"zipmoe-bench-{os.getpid()}-{idx}")
    if cap is not None:
        args.update(cap_path=str(cap.path), cap_version=cap.version)
    _drop([prep["archive"], prep["raw_archive"], prep["ckpt"]])
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


def run_median(system: str, pct: float | None, prep: dict, cfg: E2EConfig, capped: bool, idx: int) -> dict:
    """``cfg.repeat`` runs (each its own cold subprocess); the row of the median cold tokens/s, with
    every run's cold and warm tokens/s attached (``tok_s_runs``, ``tok_s_warm_runs``)."""
    runs = [run_one(system, pct, prep, cfg, capped, idx + j) for j in range(max(1, cfg.repeat))]
    ok = sorted((r for r in runs if r.get("ok")), key=lambda r: r["tok_s"])
    row = ok[(len(ok) - 1) // 2] if ok else runs[-1]
    if len(runs) > 1:
        row["tok_s_runs"] = [r.get("tok_s") for r in runs]
        row["tok_s_warm_runs"] = [r.get("tok_s_warm") for r in runs]
        row["runs_failed"] = len(runs) - len(ok)
    return row


def run(cfg: E2EConfig) -> dict:
    t0 = time.perf_counter()
    prep = prepare(cfg)
    _, _, why_nocap = MemCap.parent()
    storage = storage_info(cfg)
    if storage["emulated"] and "hf-offload" in cfg.systems:
        log.warning("emulated storage: hf-offload skipped (it reads through the page cache, not throttled)")
    switch = cfg.family == "switch_transformers"
    hf_note = HF_SKIP_SWITCH if switch else None
    if switch and "hf-offload" in cfg.systems:
        log.warning(HF_SKIP_SWITCH)
    rows: list[dict] = []
    i = 0
    for pct in cfg.budgets:
        for system in ("zipmoe", "zipmoe-lookahead", "raw", "hf-offload"):
            if system not in cfg.systems or (system == "hf-offload" and (storage["emulated"] or switch)):
                continue
            r = run_median(system, pct, prep, cfg, cfg.cap, i)
            i += cfg.repeat
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
        "machine": {"cpus": os.cpu_count(), "compute_threads": cfg.threads, "decode_threads": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "note": "shared machine: timings are noisy (several agents share the cores)"},
        "model": {"family": cfg.family, "dims": cfg.dims, "expert_bytes": prep["expert_bytes"],
                  "extent_bytes": prep["extent_bytes"], "dense_bytes": prep["dense_bytes"]},
        "hf_offload": {"skipped": switch, "note": hf_note or ""},
        "cgroup": why_nocap or "capped runs join a child memory cgroup",
        "storage": storage,
        "rows": rows,
    }
    result["targets"] = _targets(rows, cfg)
    result["total_s"] = time.perf_counter() - t0
    return result


def _row(rows, system, pct, capped=None):
    for r in rows:
        if r["system"] == system and r["budget_pct"] == pct and r.get("ok") and (capped is None or r["capped"] == capped):
            return r
    return None


def _targets(rows: list[dict], cfg: E2EConfig) -> list[dict]:
    out = []
    same = [r for r in rows if r.get("ok") and r["system"] in (*RUNTIME, "resident")]
    ref = next((r["tokens"] for r in same if r["system"] == "resident"), None)
    if ref is not None:
        out.append({"target": "identical tokens: zipmoe and raw at every budget (both passes) vs resident",
                    "met": all(r["tokens"] == ref and r.get("tokens_warm", ref) == ref for r in same),
                    "value": None, "note": ""})
    z30 = _row(rows, "zipmoe", 30.0)
    for peer, need in (("raw", 1.5), ("hf-offload", 5.0)):
        if peer not in cfg.systems or (peer == "hf-offload" and (cfg.io_throttle_bps
                                                                 or cfg.family == "switch_transformers")):
            continue
        p = _row(rows, peer, 30.0, capped=True) if cfg.cap else _row(rows, peer, 30.0)
        note = "cold pass, both capped" if cfg.cap and p is not None else "cold pass"
        if p is None:
            p = _row(rows, peer, 30.0)
            note = "peer failed under the cap; ratio against its uncapped rerun" if p is not None else "peer did not run"
        ratio = (z30["tok_s"] / p["tok_s"]) if z30 and p and p["tok_s"] else None
        out.append({"target": f"30% budget: zipmoe tokens/s >= {need}x {peer}", "value": ratio,
                    "met": ratio is not None and ratio >= need, "note": note})
    z100, res = _row(rows, "zipmoe", 100.0), _row(rows, "resident", None)
    for tag, label in (("", "cold pass"), ("_warm", "warm pass")):
        if z100 is None or res is None or ("tok_s" + tag) not in z100:
            continue
        ratio = z100["tok_s" + tag] / res["tok_s"] if res["tok_s"] else None
        out.append({"target": f"100% budget: zipmoe tokens/s within 10% of resident ({label})", "value": ratio,
                    "met": ratio is not None and ratio >= 0.9,
                    "note": ("resident decoded every expert before timing" if not tag else "")
                    + ("; resident not throttled (emulated storage)" if cfg.io_throttle_bps else "")})
    for pct in cfg.budgets:
        z, la = _row(rows, "zipmoe", pct), _row(rows, "zipmoe-lookahead", pct)
        if z is None or la is None:
            continue
        pred = la.get("prefetch_predicted", 0)
        acc = la.get("prefetch_correct", 0) / pred if pred else None
        out.append({"target": f"{pct:g}% budget: router lookahead prefetch tokens/s vs without",
                    "value": la["tok_s"] / z["tok_s"] if z["tok_s"] else None,
                    "met": bool(z["tok_s"]) and la["tok_s"] > z["tok_s"], "info": True,
                    "note": f"cold pass; lookahead accuracy {acc:.0%} of {pred} guesses" if acc is not None else "cold pass"})
    return out


# -- output ---------------------------------------------------------------------------------------


def _gb(n):
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}" if n >= 1e7 or n == 0 else f"{n / 1e9:.4f}"


def _kv_mb(result: dict) -> str:
    kv = next((r.get("kv_bytes") for r in result["rows"] if r.get("kv_bytes")), None)
    return "-" if kv is None else f"{kv / 1e6:.1f}"


def render_table(result: dict):
    from rich.table import Table

    m = result["model"]
    d = m["dims"]
    if m.get("family") == "switch_transformers":
        shape = (f"switch_transformers {d['experts']} experts top-1, d_model {d['hidden']}, d_ff {d['intermediate']}, "
                 f"{d['layers']}+{d['layers']} blocks ({d['sparse_layers']}+{d['sparse_layers']} sparse)")
    else:
        shape = f"qwen2_moe {d['experts']} experts x {d['layers']} layers"
    title = (f"end to end: {shape}, "
             f"{m['expert_bytes'] / 1e9:.2f} GB routed experts ({m['extent_bytes'] / 1e9:.2f} GB compressed), "
             f"dense {m['dense_bytes'] / 1e9:.2f} GB, KV {_kv_mb(result)} MB; greedy, {result['config']['prompt_tokens']} prompt + "
             f"{result['config']['new_tokens']} new tokens; cold start"
             + (f"; median of {result['config']['repeat']} runs" if result["config"].get("repeat", 1) > 1 else "")
             + f". {result['machine']['note']}")
    sto = result.get("storage") or {}
    if sto.get("emulated"):
        title += f". STORAGE EMULATED: {sto['note']}"
    if (result.get("hf_offload") or {}).get("skipped"):
        title += f". {result['hf_offload']['note']}"
    t = Table(title=title)
    cols = ["budget", "system", "cap", "load s", "tok/s", "TTFT s", "TPOT ms", "GB read", "hits full/comp/sm/cold/prefetched",
            "tok/s warm", "GB read warm", "peak RSS GB", "cap peak GB", "io", "note"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("budget", "system", "io", "note", "cap") else "right")
    for r in result["rows"]:
        b = "unlimited" if r["budget_pct"] is None else f"{r['budget_pct']:g}% ({_gb(r['budget_bytes'])} GB)"
        cap = "cgroup" if r["capped"] else "none"
        if not r.get("ok"):
            t.add_row(b, r["system"], cap, "-", "-", "-", "-", "-", "-", "-", "-", "-", _gb(r.get("cap_peak_bytes")), "-",
                      str(r.get("error")))
            continue
        h = r.get("hits")
        hits = "/".join(str(h.get(k, 0)) for k in ("full", "comp", "sm", "cold", "prefetch")) if h else "-"
        read = r.get("bytes_read") if r.get("bytes_read") is not None else r.get("proc_read_bytes")
        rw = r.get("bytes_read_warm") if r.get("bytes_read_warm") is not None else r.get("proc_read_bytes_warm")
        warm = f"{r['tok_s_warm']:.2f}" if r.get("tok_s_warm") is not None else "-"
        load_s = f"{r['load_s']:.2f}" if r.get("load_s") is not None else "-"
        t.add_row(b, r["system"], cap, load_s, f"{r['tok_s']:.2f}", f"{r['ttft_s']:.2f}" if r.get("ttft_s") is not None else "-",
                  f"{r['tpot_s'] * 1e3:.0f}", _gb(read), hits, warm, _gb(rw), _gb(r.get("peak_rss_bytes")),
                  _gb(r.get("cap_peak_bytes")), str(r.get("io_mode") or "-"), r.get("cap_note") or "")
    return t


def render_targets(result: dict) -> list[str]:
    lines = []
    for tg in result["targets"]:
        v = tg.get("value")
        val = f"{v:.2f}x" if isinstance(v, float) else ""
        mark = ("faster" if tg["met"] else "slower") if tg.get("info") else ("met" if tg["met"] else "MISSED")
        lines.append(f"[{mark}] {tg['target']} {val} {tg.get('note') or ''}".rstrip())
    return lines


def plot(result: dict, path: Path) -> bool:
    """tokens/s vs budget per system as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in ("zipmoe", "zipmoe-lookahead", "raw", "hf-offload"):
        pts = sorted((r["budget_pct"], r["tok_s"]) for r in result["rows"]
                     if r["system"] == system and r.get("ok") and r["budget_pct"] is not None and r["capped"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
    res = _row(result["rows"], "resident", None)
    if res:
        ax.axhline(res["tok_s"], linestyle="--", color="gray", label="resident (ceiling)")
    ax.set_xlabel("memory budget (% of routed-expert bytes)")
    ax.set_ylabel("tokens/s (decode)")
    sto = result.get("storage") or {}
    emu = f", emulated {sto['name']} {sto['bps'] / 1e6:g} MB/s" if sto.get("emulated") else ""
    ax.set_title(f"zipmoe bench e2e (capped, cold start{emu})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
