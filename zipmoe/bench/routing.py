"""``zipmoe bench e2e --routing replay:FILE.npy``: replay a real routing trace instead of the model's routers.

Random routers spread the load evenly; real routers do not (on Qwen1.5-MoE close to uniform over a whole
trace, strongly skewed within a prompt). With ``--routing replay:FILE.npy`` every run of the benchmark
routes by the same plan, made here once per run of the benchmark:

* the trace (``../shared/traces/qwen1.5-moe-a2.7b.npy``: ``[prompts, layers, experts]`` counts) is turned
  into tokens exactly as ``zipmoe bench cache`` does (``zipmoe.bench.sim.trace.derive_tokens``, seeded by
  the benchmark's ``--seed`` and the prompt index); the tokens of prompts 0, 1, ... are concatenated and
  the first ``prompt_tokens + new_tokens`` become the plan ``[positions, layers, k]``: sequence position
  ``p`` in model layer ``l`` uses the experts of derived token ``p`` in trace layer ``l``;
* a model with more layers than the trace, or with another top-k, or fewer experts than the trace names,
  is refused with one line;
* the plan is saved as ``WORKDIR/replay-<sha>.npy`` and each child process installs it on its model with
  ``zipmoe_run.routing_replay.install_replay`` (an instance attribute on each MoE block shadowing its
  ``route``; no library is patched). Top-k weights: the router's own softmax probabilities at the
  replayed experts (renormalised when the config sets ``norm_topk_prob``).

Only the systems that run this runtime can replay (``REPLAY_SYSTEMS``); transformers (``hf-offload``) and
llama.cpp route by their own routers and are left out of a replayed run, and so is ``zipmoe-lookahead``
(its guesses would read the plan: an oracle). ``skipped_systems`` says why, and the result, the table
title and the log say "replayed routing".
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from .errors import BenchInputError

__all__ = ["parse_routing", "build_plan", "plan_for", "save_plan", "prepare_routing", "skipped_systems",
           "install_for_child", "REPLAY_SYSTEMS", "LABEL"]

log = logging.getLogger(__name__)

LABEL = "replayed routing"
REPLAY_SYSTEMS = ("zipmoe", "raw", "dir", "resident")
_SKIP_WHY = {"zipmoe-lookahead": "its router lookahead would read the replayed plan (an oracle, not a guess)",
             "hf-offload": "transformers routes by its own routers (no replay without patching the library)",
             "llamacpp": "llama.cpp routes by its own routers"}


def parse_routing(spec: str | None) -> Path | None:
    """``None`` or ``"router"``: the model's routers; ``replay:FILE.npy``: that trace."""
    if spec is None or spec == "router":
        return None
    if not spec.startswith("replay:") or not spec[len("replay:"):]:
        raise BenchInputError(f"--routing: expected router or replay:FILE.npy, got {spec!r}")
    p = Path(spec[len("replay:"):])
    if not p.is_file():
        raise BenchInputError(f"--routing: {p}: no such trace file")
    return p


def build_plan(trace_path: Path, positions: int, *, layers: int, experts: int, top_k: int, seed: int = 0
               ) -> tuple[np.ndarray, dict]:
    """The plan ``[positions, trace layers, k]`` int16 and what the result says about it."""
    from .sim.trace import KNOWN_TOP_K, derive_tokens, load_trace

    # k from a known model's name in the file name (as bench cache does), else the model's (the counts are
    # checked against it: every layer of a prompt sums to tokens x k, no expert above the token count)
    known = any(key in Path(trace_path).name.lower() for key in KNOWN_TOP_K)
    tr = load_trace(trace_path, None if known else top_k)
    where = str(trace_path)
    routed = tr.routed()  # [prompts, moe layers, experts]
    n_layers = int(routed.shape[1])
    if layers > n_layers:
        raise BenchInputError(f"{where}: the model has {layers} MoE layers, the trace only {n_layers}")
    if tr.k != top_k:
        raise BenchInputError(f"{where}: the trace routes top-{tr.k}, the model top-{top_k}")
    if tr.experts > experts:
        raise BenchInputError(f"{where}: the trace has {tr.experts} experts, the model only {experts}")
    parts, used = [], 0
    for p in range(tr.prompts):
        if sum(x.shape[0] for x in parts) >= positions:
            break
        parts.append(derive_tokens(routed[p], tr.k, seed, p))  # [T, L, k]
        used += 1
    plan = np.concatenate(parts)[:positions] if parts else np.zeros((0, n_layers, tr.k), np.int16)
    if plan.shape[0] < positions:
        raise BenchInputError(f"{where}: the trace has {plan.shape[0]} tokens, the run needs {positions}")
    info = {"label": LABEL, "trace": str(trace_path), "name": tr.name, "k": tr.k, "trace_layers": n_layers,
            "model_layers": layers, "experts": tr.experts, "seed": seed, "positions": positions,
            "prompts_used": used, "tokens_from": "zipmoe.bench.sim.trace.derive_tokens (as zipmoe bench cache)",
            "layer_map": "trace layer l drives model layer l",
            "weights": "router probabilities at the replayed experts (renormalised when norm_topk_prob)",
            "distinct_experts_per_layer": [int(len(np.unique(plan[:, l]))) for l in range(min(layers, n_layers))]}
    return np.ascontiguousarray(plan.astype(np.int16)), info


def plan_for(cfg, config: dict) -> tuple[np.ndarray, dict] | None:
    """The plan for ``cfg.routing`` on a model of ``config`` (None: the routers); refusals come from here,
    before anything is written."""
    trace = parse_routing(getattr(cfg, "routing", None))
    if trace is None:
        return None
    if config.get("is_encoder_decoder"):
        raise BenchInputError("--routing replay: only decoder-only models (qwen2_moe) are replayed")
    return build_plan(trace, cfg.prompt_tokens + cfg.new_tokens, layers=int(config["num_hidden_layers"]),
                      experts=int(config.get("num_experts") or 0), top_k=int(config["num_experts_per_tok"]),
                      seed=cfg.seed)


def save_plan(cfg, made: tuple[np.ndarray, dict] | None, prep: dict) -> dict | None:
    """Write ``plan_for``'s plan as ``WORKDIR/replay-<sha>.npy``, set ``prep["routing_plan"]``; the info."""
    if made is None:
        return None
    plan, info = made
    sha = hashlib.sha256(plan.tobytes() + str(plan.shape).encode()).hexdigest()[:16]
    path = Path(cfg.workdir) / f"replay-{sha}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, plan, allow_pickle=False)
    info = {**info, "plan_path": str(path), "plan_sha256_16": sha}
    prep["routing_plan"] = str(path)
    log.info("%s: %s, %d positions from %d prompts of the trace, the same for every system", LABEL, info["trace"],
             info["positions"], info["prompts_used"])
    return info


def prepare_routing(cfg, prep: dict) -> dict | None:
    """Build and save the plan for ``cfg.routing`` on the model of ``prep["config"]`` (None: routers)."""
    return save_plan(cfg, plan_for(cfg, prep["config"]), prep)


def skipped_systems(cfg, routing: dict | None) -> dict[str, str]:
    """Systems of ``cfg.systems`` a replayed run leaves out, with why."""
    if routing is None:
        return {}
    out = {s: _SKIP_WHY.get(s, "cannot replay routing") for s in cfg.systems if s not in REPLAY_SYSTEMS}
    for s, why in out.items():
        log.warning("%s: %s skipped: %s", LABEL, s, why)
    return out


def install_for_child(model, plan_path: str) -> dict:
    """In a benchmark child: load the saved plan and install it; returns what the row records."""
    from zipmoe_run.routing_replay import ReplayPlan, install_replay

    plan = ReplayPlan(np.load(plan_path, allow_pickle=False))
    n = install_replay(model, plan)
    return {"routing": LABEL, "replayed_layers": n, "replay_weights": sorted(set(plan.weights_used.values()))}
