"""``zipmoe bench e2e --depth full``: Qwen1.5-MoE-A2.7B at its real size, bigger than this machine's memory.

Checkpoint: the exact ``config.json`` of ``../shared/models/qwen1.5-moe-a2.7b-chat`` (24 layers, 60 routed
experts of 1408 plus a shared expert of 5632, top-4, hidden 2048, vocabulary 151,936; 14.3 B parameters,
28.6 GB of BF16), written as hub-style shards with the real index's shard names, tensor order and
assignment, and the real tokenizer files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``generation_config.json``) copied next to them. Values are N(0, 0.02) in BF16, generated fast from a pool
of Gaussian values (``zipmoe.bench.e2e_full_gen``, which also describes the checkpoint and the disk space
each step needs).

Steps (each one's disk space, time and MB/s in ``result["full"]["steps"]``):

1. free space: before anything is written, the bytes every step still to run needs (source + archive
   estimate + ``WORK_BYTES`` working space) are compared with what the work folder's file system has
   free; short of it, one line naming both (``BenchInputError``; the CLI exits 2) and nothing is written;
2. generate the checkpoint (skipped when the manifest says the one on disk has this config and seed);
3. pack it (skipped likewise); no ``--raw`` archive: the directory run (``dir``: ``zipmoe-run MODEL_DIR
   --memory-budget``, experts read from the shards) is the uncompressed baseline;
4. open the archive cold (page cache dropped) and time it;
5. the runs: ``zipmoe`` (the archive) and ``dir`` (the directory) at each budget (default 15 / 30 / 60 %), in
   the memory cgroups of ``zipmoe.bench.e2e``, every run a fresh process with its files dropped from the
   page cache, cold pass only. Next to each run: bytes read per decoded token (reads after the first token
   over the decode steps) and the I/O-bound limit, the calibrated disk speed over those bytes (tokens/s
   that system could not exceed if reading were all it did).

The manifest ``WORKDIR/qwen15moe-full.json`` records the config, seed, scale and generator version of the
checkpoint and the archive's size; a second invocation with the same ones reuses the files. Library code:
logs, never prints.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .e2e_full_gen import FULL_SOURCE, disk_need, free_space, full_spec, write_checkpoint
from .errors import BenchInputError

__all__ = ["FULL_SYSTEMS", "prepare_full", "run_full", "io_limits", "render_full", "full_targets"]

log = logging.getLogger(__name__)

FULL_SYSTEMS = ("zipmoe", "zipmoe-lookahead", "dir", "llamacpp")
FULL_FAMILIES = ("qwen2_moe", "olmoe")  # olmoe: OLMoE-1B-7B's dims (zipmoe.bench.e2e_full_olmoe)
TAG = "qwen15moe-full"
TAGS = {"qwen2_moe": TAG, "olmoe": "olmoe-full"}


def _family(cfg) -> str:
    fam = getattr(cfg, "family", None) or "qwen2_moe"
    if fam not in FULL_FAMILIES:
        raise BenchInputError(f"--family {fam}: --depth full builds {' or '.join(FULL_FAMILIES)}")
    return fam


# -- preparation ----------------------------------------------------------------------------------


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def prepare_full(cfg, *, free_bytes=free_space, source: Path | None = None, scale: float | None = None) -> dict:
    """Generate (once) the full-depth checkpoint and its archive under ``cfg.workdir``; the ``prep`` dict
    ``zipmoe.bench.e2e.run_one`` takes, plus ``steps`` (disk space, times, throughputs). ``free_bytes(path)``
    is the free-space probe (tests inject one); ``source`` and ``scale`` default to ``cfg.full``'s."""
    from formats.reader import Archive
    from zipmoe_pack.pack import PackOptions, pack

    opts = getattr(cfg, "full", None) or {}
    source = Path(source or opts.get("source") or FULL_SOURCE)
    scale = float(scale if scale is not None else opts.get("scale", 1.0))
    wd = Path(cfg.workdir)
    fam, layers = _family(cfg), opts.get("layers")
    spec = full_spec(source, scale, cfg.seed, fam, layers)
    tag = TAGS[fam] if scale == 1 else f"{TAGS[fam]}-scale{scale:g}"
    tag += f"-L{layers}" if layers is not None else ""
    ckpt, arc, manifest = wd / f"{tag}-ckpt", wd / f"{tag}.zmoe", wd / f"{tag}.json"
    gguf = wd / f"{tag}.bf16.gguf"  # llama.cpp's copy (zipmoe.bench.llamacpp.ensure_gguf; its marker next to it)
    gguf_marker = gguf.with_name(gguf.name + ".source.json")
    old: dict = {}
    if manifest.is_file():  # ours, but parsed as untrusted: a damaged one means "make everything again"
        from formats.jsonstrict import JSONRejected, loads

        try:
            old = loads(manifest.read_bytes())
        except (OSError, JSONRejected):
            old = {}
        old = old if isinstance(old, dict) else {}
    have_src = old.get("key") == json.loads(json.dumps(spec["key"])) and ckpt.is_dir() \
        and _dir_bytes(ckpt) == old.get("source_bytes")
    codec = getattr(cfg, "codec", None) or "zstd-lit"
    have_arc = have_src and arc.is_file() and arc.stat().st_size == old.get("archive_bytes") \
        and old.get("codec", "zstd-lit") == codec  # (manifests before --codec: zstd-lit archives)
    want_gguf = "llamacpp" in (getattr(cfg, "systems", None) or ())
    have_gguf = have_src and gguf.is_file() and gguf_marker.is_file()
    from .e2e_full_olmoe import gguf_bytes

    need = disk_need(spec, have_src, have_arc, gguf_bytes(spec) if want_gguf and not have_gguf else 0)
    probe = wd if wd.is_dir() else next((p for p in wd.parents if p.is_dir()), Path("/"))
    free0 = free_bytes(probe)
    # what a stale checkpoint, archive or GGUF of ours would give back when replaced
    reclaim = (0 if have_src else _dir_bytes(ckpt)) + (0 if have_arc else (arc.stat().st_size if arc.is_file() else 0))
    reclaim += gguf.stat().st_size if gguf.is_file() and not have_src else 0
    if free0 + reclaim < need["total"]:
        g = f" + GGUF {need['gguf'] / 1e9:.1f} GB" if need["gguf"] else ""
        raise BenchInputError(
            f"--depth full needs {need['total'] / 1e9:.1f} GB free in {probe} (source {need['source'] / 1e9:.1f} GB "
            f"+ archive {need['archive'] / 1e9:.1f} GB{g} + working space {need['work'] / 1e9:.1f} GB), "
            f"{free0 / 1e9:.1f} GB free")
    steps: dict = {"disk": {"free_before_bytes": free0, "need_bytes": need, "reused_source": have_src,
                            "reused_archive": have_arc}}
    wd.mkdir(parents=True, exist_ok=True)
    if not have_src:
        for p in (manifest, arc, gguf, gguf_marker):
            p.unlink(missing_ok=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        gen = write_checkpoint(spec, ckpt, cfg.seed)
        old = {"key": spec["key"], "source_bytes": _dir_bytes(ckpt), "generate": gen}
        manifest.write_text(json.dumps(old, indent=1))
    steps["generate"] = {**old.get("generate", {}), "reused": have_src, "bytes_on_disk": _dir_bytes(ckpt),
                         "free_after_bytes": free_bytes(probe)}
    if not have_arc:
        arc.unlink(missing_ok=True)
        t0 = time.perf_counter()
        pack(ckpt, arc, PackOptions(threads=os.cpu_count() or 1, codec=codec))
        dt = time.perf_counter() - t0
        old.update(archive_bytes=arc.stat().st_size, codec=codec,
                   pack={"seconds": dt, "mb_s": spec["source_bytes"] / dt / 1e6, "bytes_in": spec["source_bytes"]})
        manifest.write_text(json.dumps(old, indent=1))
    steps["pack"] = {**old.get("pack", {}), "reused": have_arc, "bytes_on_disk": arc.stat().st_size,
                     "free_after_bytes": free_bytes(probe)}
    from .e2e_proc import _drop

    _drop([arc])
    t0 = time.perf_counter()
    with Archive(arc) as a:
        open_s = time.perf_counter() - t0
        expert_bytes = sum(e.decoded_nbytes for e in a.index.experts)
        extent_bytes = sum(e.length for e in a.index.experts)
        dense_bytes = sum(t.nbytes for t in a.index.tensors.values() if t.role == "dense")
        config = json.loads(a.file_bytes("config.json"))
    steps["open"] = {"seconds": open_s, "note": "formats.reader.Archive on a cold archive (preamble, index, checks)"}
    return {"ckpt": str(ckpt), "archive": str(arc), "raw_archive": None, "expert_bytes": expert_bytes,
            "extent_bytes": extent_bytes, "dense_bytes": dense_bytes, "config": config, "steps": steps,
            "manifest": str(manifest), "manifest_data": old, "source": str(source), "scale": scale, "family": fam,
            "gguf_path": str(gguf), "probe": str(probe), "vocab_note": spec.get("vocab_note")}


# -- the runs -----------------------------------------------------------------------------------------


def io_limits(rows: list[dict], disk_bps: float | None) -> None:
    """Add to every successful row: ``bytes_per_token`` (reads after the first token over the decode
    steps) and ``io_limit_tok_s`` (``disk_bps`` over it) and ``io_limit_frac`` (tokens/s over that)."""
    for r in rows:
        if not r.get("ok"):
            continue
        steps = max(1, len(r.get("tokens") or []) - 1)
        b = r.get("bytes_read_decode")
        if b is None:
            continue
        r["bytes_per_token"] = b / steps
        if disk_bps and b:
            r["io_limit_tok_s"] = disk_bps / r["bytes_per_token"]
            r["io_limit_frac"] = r["tok_s"] / r["io_limit_tok_s"]


def full_targets(rows: list[dict]) -> list[dict]:
    from .e2e_report import _row

    out = []
    z, d = _row(rows, "zipmoe", 30.0), _row(rows, "dir", 30.0)
    if z and d:
        ratio = z["tok_s"] / d["tok_s"] if d["tok_s"] else None
        out.append({"target": "full depth, 30% budget: zipmoe tokens/s >= 1.3x the directory run", "value": ratio,
                    "met": ratio is not None and ratio >= 1.3, "note": "cold pass, both capped" if z["capped"] else "cold pass"})
    if z and z.get("io_limit_tok_s"):
        ratio = z["io_limit_tok_s"] / z["tok_s"] if z["tok_s"] else None
        out.append({"target": "full depth, 30% budget: zipmoe within 1.5x of its I/O-bound limit", "value": ratio,
                    "met": ratio is not None and ratio <= 1.5,
                    "note": f"limit {z['io_limit_tok_s']:.2f} tok/s = disk speed / {z['bytes_per_token'] / 1e6:.0f} MB per token"})
    ll = _row(rows, "llamacpp", 100.0)
    z100 = _row(rows, "zipmoe", 100.0)
    if z100 and ll and ll.get("tok_s"):
        out.append({"target": "full depth, 100% budget: zipmoe tokens/s >= llamacpp's (BF16 GGUF, mmap)",
                    "value": z100["tok_s"] / ll["tok_s"], "met": z100["tok_s"] >= ll["tok_s"],
                    "note": "cold pass; llama.cpp capped at dense + budget + its own overhead"})
    lls = [(r, _row(rows, "zipmoe", r["budget_pct"])) for r in rows if r["system"] == "llamacpp" and r.get("ok")]
    lls = [(r, z) for r, z in lls if z is not None]
    if lls:  # the same checkpoint in another engine: information, not a target (BF16 numerics differ)
        firsts = [next((i for i, (a, b) in enumerate(zip(r["tokens"], z["tokens"])) if a != b), None) for r, z in lls]
        out.append({"target": "llamacpp greedy tokens equal zipmoe's", "value": None, "met": all(f is None for f in firsts),
                    "mark": "same" if all(f is None for f in firsts) else "differ",
                    "note": f"first differing position per budget: {firsts} (llama.cpp's BF16 numerics)"})
    ok = [r for r in rows if r.get("ok") and r["system"] != "llamacpp"]  # another engine's numerics
    if len({r["system"] for r in ok}) > 1:
        by = {}
        for r in ok:
            by.setdefault(r["budget_pct"], []).append(r["tokens"])
        same = all(all(t == ts[0] for t in ts) for ts in by.values())
        out.append({"target": "identical tokens: archive and directory at every budget", "met": same, "value": None,
                    "note": ""})
    return out


def run_full(cfg, *, free_bytes=free_space) -> dict:
    """The full-depth benchmark (module doc); the result has the shape of ``zipmoe.bench.e2e.run``'s plus
    ``full`` (the steps) and per-row I/O limits."""
    from zipmoe_run.calibrate import report as host_report

    from .e2e import prime, run_median, storage_info
    from .e2e_proc import MemCap, machine_info

    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    from .llamacpp import e2e_targets
    from .routing import plan_for, save_plan, skipped_systems

    bad = [s for s in cfg.systems if s not in FULL_SYSTEMS]
    if bad:
        raise BenchInputError(f"--systems: {', '.join(bad)} not offered at --depth full (offered: "
                              f"{', '.join(FULL_SYSTEMS)}; resident and hf-offload need the whole model in memory, "
                              "raw a second copy of the experts)")
    t0 = time.perf_counter()
    opts = cfg.full or {}
    fam = _family(cfg)
    # a trace that does not fit the model is refused before anything is generated or written
    made = plan_for(cfg, full_spec(Path(opts.get("source") or FULL_SOURCE), float(opts.get("scale", 1.0)), cfg.seed,
                                   fam, opts.get("layers"))["config"])
    prep = prepare_full(cfg, free_bytes=free_bytes)
    llama = {"skipped": "not requested"}
    if "llamacpp" in cfg.systems:  # the GGUF (written once) and llama.cpp's own overhead for its cap
        from .e2e_full_olmoe import prepare_llamacpp

        llama = prepare_llamacpp(cfg, prep, Path(prep["gguf_path"]), free_bytes, Path(prep["probe"]))
    host = host_report(prep["archive"])
    log.info("%s", host["host_line"])
    primed = prime(prep, cfg)
    _, _, why_nocap = MemCap.parent()
    routing = save_plan(cfg, made, prep)
    skip = skipped_systems(cfg, routing)
    rows: list[dict] = []
    i = 0
    for pct in cfg.budgets:
        for system in FULL_SYSTEMS:
            if system not in cfg.systems or system in skip or (system == "llamacpp" and llama.get("skipped")):
                continue
            rows.append(run_median(system, pct, prep, cfg, cfg.cap, i))
            i += cfg.repeat
    disk_bps = (host.get("calibration") or {}).get("disk_bps")
    io_limits(rows, disk_bps)
    d = prep["config"]
    per_expert = "intermediate_size" if fam == "olmoe" else "moe_intermediate_size"
    dims = {"hidden": d["hidden_size"], "moe_intermediate": d[per_expert], "experts": d["num_experts"],
            "top_k": d["num_experts_per_tok"], "layers": d["num_hidden_layers"], "vocab": d["vocab_size"],
            "shared_intermediate": d.get("shared_expert_intermediate_size")}
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        "machine": machine_info(cfg.threads, load0),
        "model": {"family": fam, "vocab_note": prep.get("vocab_note"), "dims": dims, "expert_bytes": prep["expert_bytes"],
                  "extent_bytes": prep["extent_bytes"], "dense_bytes": prep["dense_bytes"], "depth": "full",
                  "source": prep["source"], "scale": prep["scale"]},
        "full": {"steps": prep["steps"], "manifest": prep["manifest"], "disk_bps": disk_bps},
        "hf_offload": {"skipped": True, "note": "not run at --depth full"},
        "llamacpp": llama,
        "cgroup": why_nocap or "capped runs join a child memory cgroup",
        "storage": storage_info(cfg),
        "routing": routing, "routing_skipped": skip,
        "rows": rows,
        "primed": primed,
    }
    result.update(host)
    result["targets"] = full_targets(rows) + e2e_targets(rows, llama)
    result["total_s"] = time.perf_counter() - t0
    return result


# -- output --------------------------------------------------------------------------------------------


def _gb(n):
    return "-" if n is None else f"{n / 1e9:.2f}"


def render_full(result: dict):
    """Two rich tables: the preparation steps, and the runs with their I/O-bound limits."""
    from rich.table import Table

    st = result["full"]["steps"]
    m = result["model"]
    label = f"; {result['routing']['label']}" if result.get("routing") else "; the generator's random routers"
    t1 = Table(title=f"full depth: {m['family']} {m['dims']['layers']} layers x {m['dims']['experts']} experts, "
                     f"{m['expert_bytes'] / 1e9:.2f} GB routed experts, dense {m['dense_bytes'] / 1e9:.2f} GB: "
                     "preparation")
    for c in ("step", "time s", "MB/s", "on disk GB", "free after GB", "note"):
        t1.add_column(c, justify="left" if c in ("step", "note") else "right")
    disk = st["disk"]
    need = disk["need_bytes"]
    t1.add_row("disk check", "-", "-", "-", _gb(disk["free_before_bytes"]),
               f"needed {need['total'] / 1e9:.1f} GB (source {need['source'] / 1e9:.1f} + archive "
               f"{need['archive'] / 1e9:.1f} + GGUF {need.get('gguf', 0) / 1e9:.1f} + work {need['work'] / 1e9:.1f})")
    for name in ("generate", "pack", "gguf"):
        s = st.get(name)
        if s is None:
            continue
        if s.get("skipped"):
            t1.add_row(name, "-", "-", "-", "-", f"skipped: {s['skipped']}")
            continue
        t1.add_row(name, f"{s['seconds']:.1f}" if s.get("seconds") is not None else "-",
                   f"{s['mb_s']:.0f}" if s.get("mb_s") is not None else "-",
                   _gb(s.get("bytes_on_disk")), _gb(s.get("free_after_bytes")),
                   "reused (manifest matches); time of the run that made it" if s.get("reused") else "")
    t1.add_row("open archive", f"{st['open']['seconds']:.3f}", "-", "-", "-", "cold")
    t2 = Table(title=f"full depth runs: greedy, {result['config']['prompt_tokens']} prompt + "
                     f"{result['config']['new_tokens']} new tokens, cold, one process per run{label}; "
                     f"disk {_gb(result['full'].get('disk_bps'))} GB/s calibrated. {result['machine']['note']}")
    for c in ("budget", "system", "cap GB", "load s", "TTFT s", "tok/s", "I/O limit tok/s", "of limit", "MB read/token",
              "GB read", "peak RSS GB", "cap peak GB", "note"):
        t2.add_column(c, justify="left" if c in ("budget", "system", "cap", "note") else "right")
    for r in result["rows"]:
        b = f"{r['budget_pct']:g}% ({_gb(r['budget_bytes'])} GB)"
        cap = _gb(r.get("cap_limit_bytes")) if r["capped"] else "none"
        if not r.get("ok"):
            t2.add_row(b, r["system"], cap, *["-"] * 9, str(r.get("error")))
            continue
        read = r.get("bytes_read") if r.get("bytes_read") is not None else r.get("proc_read_bytes")
        t2.add_row(b, r["system"], cap, f"{r['load_s']:.2f}", f"{r['ttft_s']:.2f}" if r.get("ttft_s") else "-",
                   f"{r['tok_s']:.2f}",
                   f"{r['io_limit_tok_s']:.2f}" if r.get("io_limit_tok_s") else "-",
                   f"{r['io_limit_frac']:.0%}" if r.get("io_limit_frac") else "-",
                   f"{r['bytes_per_token'] / 1e6:.0f}" if r.get("bytes_per_token") is not None else "-",
                   _gb(read), _gb(r.get("peak_rss_bytes")), _gb(r.get("cap_peak_bytes")),
                   r.get("cap_note") or "")
    return t1, t2
