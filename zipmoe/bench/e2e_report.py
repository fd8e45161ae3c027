"""Output of ``zipmoe bench e2e``: the rich table, the target lines and the plot."""
from __future__ import annotations

from pathlib import Path

def _row(rows, system, pct, capped=None):
    for r in rows:
        if r["system"] == system and r["budget_pct"] == pct and r.get("ok") and (capped is None or r["capped"] == capped):
            return r
    return None


# -- output ---------------------------------------------------------------------------------------


def _gb(n):
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}" if n >= 1e7 or n == 0 else f"{n / 1e9:.4f}"


def _tok_s(r: dict) -> str:
    """The median run's tokens/s, with the range of every run when there were several."""
    runs = [x for x in r.get("tok_s_runs") or [] if x]
    return f"{r['tok_s']:.2f}" + (f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else "")


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
             + (f"; median of {result['config']['repeat']} runs (their range in brackets)"
                if result["config"].get("repeat", 1) > 1 else "")
             + f". {result['machine']['note']}")
    pr = result.get("primed") or {}
    if "wall_s" in pr:  # e2e.prime: the runtime's first-sight measurements, made before the timed runs
        title += (f". Host primed by one uncapped run ({pr['wall_s']:.1f} s)" if pr.get("ok")
                  else f". Priming run failed ({pr.get('error')})")
    sto = result.get("storage") or {}
    if sto.get("emulated"):
        title += f". STORAGE EMULATED: {sto['note']}"
    if (result.get("hf_offload") or {}).get("skipped"):
        title += f". {result['hf_offload']['note']}"
    t = Table(title=title)
    cols = ["budget", "system", "cap", "load s", "tok/s", "TTFT s", "TPOT ms", "GB read", "disk util",
            "hits full/comp/sm/cold/prefetched",
            "tok/s warm", "GB read warm", "peak RSS GB", "cap peak GB", "io", "note"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("budget", "system", "io", "note", "cap") else "right")
    for r in result["rows"]:
        b = "unlimited" if r["budget_pct"] is None else f"{r['budget_pct']:g}% ({_gb(r['budget_bytes'])} GB)"
        cap = "cgroup" if r["capped"] else "none"
        if not r.get("ok"):
            t.add_row(b, r["system"], cap, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", _gb(r.get("cap_peak_bytes")), "-",
                      str(r.get("error")))
            continue
        h = r.get("hits")
        hits = "/".join(str(h.get(k, 0)) for k in ("full", "comp", "sm", "cold", "prefetch")) if h else "-"
        read = r.get("bytes_read") if r.get("bytes_read") is not None else r.get("proc_read_bytes")
        rw = r.get("bytes_read_warm") if r.get("bytes_read_warm") is not None else r.get("proc_read_bytes_warm")
        warm = f"{r['tok_s_warm']:.2f}" if r.get("tok_s_warm") is not None else "-"
        load_s = f"{r['load_s']:.2f}" if r.get("load_s") is not None else "-"
        t.add_row(b, r["system"], cap, load_s, _tok_s(r), f"{r['ttft_s']:.2f}" if r.get("ttft_s") is not None else "-",
                  f"{r['tpot_s'] * 1e3:.0f}", _gb(read),
                  f"{r['disk_util']:.0%}" if r.get("disk_util") is not None else "-", hits, warm, _gb(rw), _gb(r.get("peak_rss_bytes")),
                  _gb(r.get("cap_peak_bytes")), str(r.get("io_mode") or "-"), r.get("cap_note") or "")
    return t


def render_targets(result: dict) -> list[str]:
    lines = []
    for tg in result["targets"]:
        v = tg.get("value")
        val = f"{v:.2f}x" if isinstance(v, float) else ""
        mark = tg.get("mark") or (("faster" if tg["met"] else "slower") if tg.get("info")
                                  else ("met" if tg["met"] else "MISSED"))
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
    for system in ("zipmoe", "zipmoe-lookahead", "raw", "hf-offload", "llamacpp"):
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
