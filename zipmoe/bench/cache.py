"""``zipmoe bench cache``: replay a routing trace through the cache policies, without weights.

For each budget: the tier planner picks the ``zipmoe`` split (and, restricted to FULL + SM with a
full share >= 0.3 and per-layer pools, the paper's), then every policy replays the same token
sequence (:mod:`zipmoe.bench.sim.trace`) and reports hit rate per tier, bytes read and the
modelled time per token (:mod:`zipmoe_run.tiers`). Belady's MIN is exact for one FULL
tier; ``belady-tiered`` (the best of a few splits, offline) is an estimate of the multi-tier
ceiling, not a bound. ``zipmoe+prefetch`` adds speculative reads of the next layer's likely
experts during the current layer's compute (:class:`~zipmoe.bench.sim.simulate.PrefetchConfig`).

Library code: logs, never prints.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from zipmoe.bench.errors import BenchInputError
from zipmoe.bench.sim.policy import make_replay_policy
from zipmoe.bench.sim.simulate import PrefetchConfig, next_uses, replay
from zipmoe.bench.sim.stats import stats_from_sequence
from zipmoe.bench.sim.trace import build_sequence, load_trace
from zipmoe_run.policies.planner import Split, plan
from zipmoe_run.calibrate import report as host_report
from zipmoe_run.hostinfo import host_line
from zipmoe_run.tiers import CostModel, Tier, TierSizes, load_calibration

__all__ = ["parse_budget", "run", "render_table", "ORDER"]

log = logging.getLogger(__name__)

ORDER = ("lru", "lfu", "paper", "zipmoe", "zipmoe+prefetch", "belady", "belady-tiered")
DEFAULT = "zipmoe"
_PCT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
BELADY_TIERED_SPLITS = (Split(1.0, 0.0, 0.0), Split(0.75, 0.25, 0.0), Split(0.5, 0.5, 0.0), Split(0.25, 0.75, 0.0),
                        Split(0.0, 1.0, 0.0), Split(0.25, 0.5, 0.25))


def parse_budget(spec: str, total: int) -> int:
    """``15%`` (of ``total``, all the trace's experts' BF16 bytes) or bytes (``3GiB``, ``500MB``, ``123``)."""
    m = _PCT.match(str(spec))
    if m:
        pct = float(m.group(1))
        if not 0 <= pct <= 100:
            raise BenchInputError(f"budget {spec} must be within 0-100%")
        return int(total * pct / 100)
    from zipmoe_run.store.budget import parse_bytes

    try:
        return parse_bytes(spec)
    except Exception as exc:  # BudgetError is a ZmoeError; one message for the CLI
        raise BenchInputError(str(exc)) from None


def _sizes(expert_bytes: int | None, archive: Path | None) -> TierSizes:
    if archive is None:
        if not expert_bytes:
            raise BenchInputError("give --expert-bytes (or --archive to take it from an archive)")
        return TierSizes(int(expert_bytes))
    from formats.reader import Archive

    with Archive(archive) as a:
        s = TierSizes.from_extents(a.index.experts, f"archive {archive}")
    if expert_bytes:
        s = TierSizes(int(expert_bytes), s.compressed_frac, s.exponents_frac, s.source + " (ratios), --expert-bytes")
    return s


def run(trace_path: Path, *, budgets: list[str], expert_bytes: int | None = None, archive: Path | None = None,
        calibration: Path | None = None, prompts: int | None = None, seed: int = 0, top_k: int | None = None,
        policies: tuple[str, ...] = ORDER, step: float = 0.05) -> dict:
    """Replay ``trace_path`` for every budget; returns the JSON-able result."""
    unknown = [p for p in policies if p not in ORDER]
    if unknown:
        raise BenchInputError(f"unknown policies {unknown} (known: {', '.join(ORDER)})")
    tr = load_trace(trace_path, top_k)
    if prompts is not None:
        tr = tr.head(prompts)
    if tr.prompts == 0:
        raise BenchInputError(f"{trace_path}: no prompts to replay")
    sizes = _sizes(expert_bytes, archive)
    rep = host_report(archive)  # this host's self-calibration (reads: the archive's file system, if given)
    cal = load_calibration(calibration) if calibration is not None else CostModel.from_json(rep["calibration"],
                                                                                           rep["calibration"]["source"])
    rep["calibration"] = cal.to_json()
    rep["host_line"] = host_line(rep["host"], rep["calibration"])
    t0 = time.perf_counter()
    seq = build_sequence(tr, seed)
    stats = stats_from_sequence(seq)
    nexts = next_uses(seq) if any(p.startswith("belady") for p in policies) else None
    L, E = seq.layers, seq.experts
    total = L * E * sizes.full
    costs = cal.tier_costs(sizes)  # what the zipmoe placement weighs, from the same cost model
    out = {
        "trace": {"path": str(trace_path), "name": tr.name, "prompts": tr.prompts, "layers": L, "experts": E,
                  "k": seq.k, "tokens": seq.tokens, "seed": seed, "dense_layers": list(tr.dense)},
        "sizes": sizes.as_dict(), "all_expert_bytes": total,
        "calibration": {k: v for k, v in cal.to_json().items() if k != "extra"},
        "host": rep["host"], "host_line": rep["host_line"],
        "model": "per layer: Johnson makespan of read (disk) -> decode (all decoder threads) over its non-FULL "
                 "experts; summed over layers; compute, latency and contention not modelled",
        "budgets": [],
    }
    for spec in budgets:
        B = parse_budget(spec, total)
        entry = {"spec": spec, "bytes": B, "share": round(B / total, 6), "results": []}
        zp = plan(stats, B, sizes, cal, step=step)
        pp = plan(stats, B, sizes, cal, tiers=(Tier.FULL, Tier.SM), min_full=0.3, per_layer=True, step=step)
        entry["plan"] = {"zipmoe": zp.as_dict(), "paper": pp.as_dict()}
        for name in policies:
            if name == "belady-tiered":
                best = None
                for sp in dict.fromkeys(BELADY_TIERED_SPLITS + (zp.split,)):
                    r = replay(seq, make_replay_policy("belady-tiered", L, E, B, sizes, sp, costs=costs), sizes, cal,
                               nexts=nexts)
                    if best is None or r.seconds < best.seconds:
                        best = r
                best.note += f"; best of {len(BELADY_TIERED_SPLITS) + 1} splits"
                res = best
            elif name == "zipmoe+prefetch":
                res = replay(seq, make_replay_policy("zipmoe", L, E, B, sizes, zp.split, costs=costs), sizes, cal,
                             PrefetchConfig(True))
                res.policy = name
            else:
                split = {"zipmoe": zp.split, "paper": pp.split}.get(name)
                res = replay(seq, make_replay_policy(name, L, E, B, sizes, split, costs=costs), sizes, cal,
                             nexts=nexts if name == "belady" else None)
            entry["results"].append(res.as_dict())
            log.info("%s %s: %.1f ms/token", spec, name, 1e3 * res.seconds_per_token)
        by = {r["policy"]: r for r in entry["results"]}
        ref = by.get(DEFAULT)
        ceiling = min((by[p]["ms_per_token"] for p in ("belady", "belady-tiered") if p in by), default=None)
        for r in entry["results"]:
            if ref is not None and ref["ms_per_token"] > 0:
                r["vs_default"] = round(r["ms_per_token"] / ref["ms_per_token"] - 1.0, 6)
            if ceiling:
                r["gap_to_belady"] = round(r["ms_per_token"] / ceiling - 1.0, 6)
        out["budgets"].append(entry)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def render_table(result: dict):
    from rich.table import Table

    tr = result["trace"]
    s = result["sizes"]
    cal = result["calibration"]
    dense = f" (+ {len(tr['dense_layers'])} dense)" if tr.get("dense_layers") else ""
    title = (f"{tr['name']}: {tr['prompts']} prompts, {tr['tokens']} tokens, {tr['layers']} layers{dense} x "
             f"{tr['experts']} experts, top-{tr['k']}; expert {s['full'] / 2**20:.1f} MiB (compressed "
             f"{s['compressed_frac']:.3f}, sm {s['sm_frac']:.3f}, exponents {s['exponents_frac']:.3f}); "
             f"disk {cal['disk_bps'] / 1e9:.2f} GB/s ({cal['read_method']}), decode "
             f"{cal['decode_bps'] / 1e9:.2f} GB/s")
    t = Table(title=title, title_justify="left")
    for col in ("budget", "policy", "split (F/C/S)", "full %", "comp %", "sm %", "hit %", "read MB/tok",
                "ms/token", "vs default", "gap to Belady"):
        t.add_column(col, justify="left" if col in ("budget", "policy", "split (F/C/S)") else "right")
    for b in result["budgets"]:
        first = True
        for r in b["results"]:
            sp = r["split"]
            split = f"{sp['full']:.2f}/{sp['compressed']:.2f}/{sp['sm']:.2f}"
            name = r["policy"] + ("" if r.get("exact", True) else " (estimate)")
            if r["policy"] == "belady":
                name += " (exact, 1 tier)"
            t.add_row(f"{b['spec']} ({b['bytes'] / 2**30:.2f} GiB)" if first else "", name, split,
                      f"{100 * r['hit_rate']['full']:.1f}", f"{100 * r['hit_rate']['compressed']:.1f}",
                      f"{100 * r['hit_rate']['sm']:.1f}", f"{100 * r['hit_rate_total']:.1f}",
                      f"{r['bytes_read_per_token'] / 1e6:.1f}", f"{r['ms_per_token']:.2f}",
                      f"{100 * r['vs_default']:+.1f}%" if "vs_default" in r else "",
                      f"{100 * r['gap_to_belady']:+.1f}%" if "gap_to_belady" in r else "")
            first = False
        t.add_section()
    return t


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def render_notes(result: dict) -> list[str]:
    lines = []
    dense = result["trace"].get("dense_layers") or []
    if dense:
        lines.append(f"dense layer{'s' if len(dense) > 1 else ''} {_ranges(dense)}: no expert traffic (zero for "
                     f"every prompt), replayed as steps that read and wait for nothing; the {result['trace']['layers']} "
                     "MoE layers are the ones counted")
    for b in result["budgets"]:
        zp, pp = b["plan"]["zipmoe"], b["plan"]["paper"]
        lines.append(f"{b['spec']}: planner picks full/comp/sm {zp['split']['full']:.2f}/{zp['split']['compressed']:.2f}/"
                     f"{zp['split']['sm']:.2f} (modelled {zp['ms_per_token']:.1f} ms/token); paper's split "
                     f"{pp['split']['full']:.2f}/-/{pp['split']['sm']:.2f}")
        for r in b["results"]:
            pf = r.get("prefetch", {})
            if pf.get("enabled"):
                lines.append(f"{b['spec']}: prefetch issued {pf['issued']} reads, {pf['used']} used (precision "
                             f"{100 * pf['precision']:.1f}%), window {pf['window_ms']:.2f} ms/layer; next-layer "
                             f"top-{result['trace']['k']} predictor accuracy {100 * pf['predictor_topk_accuracy']:.1f}%")
    lines.append("Belady (exact, 1 tier): the fewest misses any policy keeping decoded experts can have; "
                 "belady-tiered: offline heuristic with tiers (an estimate, not a bound).")
    return lines
