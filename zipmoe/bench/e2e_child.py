"""The child process of ``zipmoe bench e2e``: one system at one budget, in a fresh interpreter.

``python -m zipmoe.bench.e2e_child ARGS_JSON`` prints one ``@@RESULT@@{json}`` line (see
``zipmoe.bench.e2e`` for what the systems are and how the cap is joined).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from .e2e_proc import (CAP_SLACK, MIB, _cap_stat, _drop, _io_read_bytes, _reset_peak, _rss, _rss_anon, _status,
                       _trim_heap, join_cap, kv_cache_bytes, prompt_ids, warm_up_runtime)

# -- the child process ---------------------------------------------------------------------------


def _baseline(a: dict) -> tuple[dict, int, int | None, int]:
    """After imports and warm-up: trim the heap, then (result dict with base RSS and KV bytes,
    anonymous RSS now, budget, KV bytes)."""
    _trim_heap()
    kv = kv_cache_bytes(a["config"], 1, a["prompt_tokens"] + a["new_tokens"])
    return {"base_rss_bytes": _rss(), "kv_bytes": kv}, _rss_anon(), a["budget_bytes"], kv


def _disk_util(before: dict, st: dict) -> float | None:
    """Bytes read over the time reads were in flight, against the calibrated disk speed (specs/runtime.md
    section 13); None where nothing was read or the source has no calibration."""
    busy = st.get("read_busy_s", 0) - before.get("read_busy_s", 0)
    disk = (st.get("calibration") or {}).get("disk_bps")
    if not busy or not disk:
        return None
    return (st["bytes_read"] - before.get("bytes_read", 0)) / busy / disk


def _child_runtime(a: dict) -> dict:
    from zipmoe_run.api import load
    from zipmoe_run.generate import Sampling

    warm_up_runtime(a["threads"])
    out, anon0, budget, kv = _baseline(a)
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
    if a.get("routing_plan"):  # zipmoe.bench.routing: every system routes by the same replayed plan
        from .routing import install_for_child

        out.update(install_for_child(lm.model, a["routing_plan"]))
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
        toks, after_first = [], None
        for ev in lm.stream(ids, max_new_tokens=a["new_tokens"], sampling=Sampling(greedy=True), stats=stats):
            if after_first is None:  # bytes read by the prefill: the decode steps' reads are the rest
                after_first = src.stats().get("bytes_read", 0)
            toks.append(ev.token_id)
        st = src.stats()
        io1 = _io_read_bytes()
        out.update({
            "tokens" + tag: toks, "ttft_s" + tag: stats["ttft_s"], "tok_s" + tag: stats["gen_tok_s"],
            "tpot_s" + tag: stats["decode_s"] / max(1, stats["decode_steps"]), "prefill_s" + tag: stats["prefill_s"],
            "decode_s" + tag: stats["decode_s"], "bytes_read" + tag: st["bytes_read"] - before.get("bytes_read", 0),
            "bytes_read_decode" + tag: st["bytes_read"] - (after_first if after_first is not None else st["bytes_read"]),
            "proc_read_bytes" + tag: (io1 - io0) if io0 is not None and io1 is not None else None,
            "hits" + tag: {t: st[f"hits_{t}"] - before.get(f"hits_{t}", 0)
                           for t in ("full", "comp", "sm", "cold", "prefetch")},
            "prefetch_predicted" + tag: st["prefetch_predicted"] - before.get("prefetch_predicted", 0),
            "prefetch_correct" + tag: st["prefetch_correct"] - before.get("prefetch_correct", 0),
            "disk_util" + tag: _disk_util(before, st),
        })
    io_mode = st["io_mode"]
    if st.get("io_throttle_bps"):
        io_mode += f", {st['io_throttle_bps'] / 1e6:g} MB/s cap (emulated)"
    out.update(store_peak_bytes=st["store_peak_bytes"], io_mode=io_mode, budget=st["budget"],
               io_throttle_bps=st.get("io_throttle_bps"), throttle_s=st.get("throttle_s"),
               dense_bytes=st["dense_bytes"], peak_rss_bytes=_status("VmHWM"),
               resident_experts=st.get("resident_experts"), cap_stat=_cap_stat(a))
    out["store_stats"] = {k: v for k, v in st.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["calibration"] = st.get("calibration")  # the cost model the store started from, and its drift notes
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
    out, anon0, budget, kv = _baseline(a)
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
        if a["system"] == "llamacpp":
            from .llamacpp import child_e2e

            out = child_e2e(a)
        else:
            out = _child_hf(a) if a["system"] == "hf-offload" else _child_runtime(a)
        out["ok"] = True
    except MemoryError:
        out = {"ok": False, "error": "MemoryError"}
    except Exception as e:  # noqa: BLE001 - reported in the table
        out = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    sys.stdout.write("\n@@RESULT@@" + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
