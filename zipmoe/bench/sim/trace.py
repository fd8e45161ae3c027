"""Routing traces: per-prompt expert counts -> a token-level access sequence.

A trace (``*.npy``; the project's recorded ones are in ``../shared/traces`` next to the repository) is
an integer array ``[prompts, layers, experts]``: how many tokens of a prompt each layer routed to each
expert. Every token goes to ``k`` distinct experts per layer, so each (prompt, layer) row sums to
``tokens * k``. A layer that is zero for every prompt is a *dense* layer (a model whose first layers
have no experts, e.g. DeepSeek's ``first_k_dense_replace``): its step of a token reads nothing, waits
for nothing and changes no policy state, so the replay leaves it out (``Trace.dense`` names it); a
layer that is zero for some prompts only is refused. The order of tokens inside a prompt and
which experts one token combined were not recorded; :func:`derive_tokens` makes them up, exactly
consistently with the counts, by a deterministic seeded procedure (specs/runtime.md, "Policies,
planner and trace replay"):

1. ``T = row.sum() // k`` tokens (the same for every routed layer of the prompt; checked).
2. For each layer: the experts in a seeded random order, each repeated ``count`` times, give a list
   of ``T * k`` slots; token ``t`` takes slots ``t, t + T, ..., t + (k-1) T``. A block of one expert
   is at most ``T`` long (checked: ``count <= T``), so a token never gets an expert twice.
3. The tokens of each layer are then put in a seeded random order (per prompt and layer; no
   correlation between layers is invented), and each token's experts sorted ascending.

The replay visits prompts in order, tokens in order, layers in order: one *step* is one layer of
one token and needs that token's ``k`` experts (every token is treated as a decode step).

Torch-free. The trace file is read in place (``numpy.load(mmap_mode="r")``); nothing is copied.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zipmoe.bench.errors import BenchInputError

__all__ = ["Trace", "load_trace", "derive_tokens", "ReplaySequence", "build_sequence", "infer_top_k"]

KNOWN_TOP_K = {"qwen1.5-moe": 4, "qwen2-moe": 4, "qwen3": 8, "switch": 1, "mixtral": 2, "olmoe": 8,
               "deepseek-v2": 6, "deepseek-v3": 8, "phimoe": 2}


@dataclass(frozen=True)
class Trace:
    counts: np.ndarray  # [prompts, layers, experts], integers >= 0
    k: int
    name: str
    dense: tuple[int, ...] = ()  # layers zero for every prompt (no experts)

    @property
    def prompts(self) -> int:
        return int(self.counts.shape[0])

    @property
    def layers(self) -> int:
        """All layers, dense ones included."""
        return int(self.counts.shape[1])

    @property
    def experts(self) -> int:
        return int(self.counts.shape[2])

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(x for x in range(self.layers) if x not in self.dense)

    def routed(self) -> np.ndarray:
        """Counts of the MoE layers only, ``[prompts, len(moe_layers), experts]`` (a view without dense layers)."""
        return self.counts if not self.dense else np.asarray(self.counts)[:, list(self.moe_layers)]

    def tokens_per_prompt(self) -> np.ndarray:
        first = self.moe_layers[0] if self.moe_layers else 0
        return (self.counts[:, first, :].sum(axis=1, dtype=np.int64) // self.k).astype(np.int64)

    def head(self, prompts: int) -> "Trace":
        """The first ``prompts`` prompts (a view)."""
        return Trace(self.counts[:max(0, int(prompts))], self.k, self.name, self.dense)


def infer_top_k(counts: np.ndarray, name: str = "") -> int:
    """k from a known model name in ``name``, else the largest k every row is consistent with."""
    low = name.lower()
    for key, k in KNOWN_TOP_K.items():
        if key in low:
            return k
    c = np.asarray(counts, dtype=np.int64)
    sums = c.sum(axis=2)
    mx = np.maximum(c.max(axis=2), 1)
    nz = (c > 0).sum(axis=2)
    live = sums > 0
    if not live.any():
        raise BenchInputError("trace has no activations; give --top-k")
    bound = int(min((sums[live] // mx[live]).min(), nz[live].min()))
    for k in range(bound, 0, -1):
        if not (sums % k).any():
            return k
    return 1


def dense_layers(counts: np.ndarray) -> tuple[int, ...]:
    """Layers that route no token of any prompt (a trace with no prompts has none)."""
    c = np.asarray(counts)
    if c.ndim != 3 or c.shape[0] == 0:
        return ()
    return tuple(int(x) for x in np.flatnonzero(~c.any(axis=(0, 2))))


def _check(counts: np.ndarray, k: int, where: str) -> tuple[int, ...]:
    """Validate ``counts``; returns its dense layers."""
    if counts.ndim != 3:
        raise BenchInputError(f"{where}: expected [prompts, layers, experts], got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise BenchInputError(f"{where}: expected integer counts, got {counts.dtype}")
    if k < 1:
        raise BenchInputError(f"{where}: top-k must be >= 1, got {k}")
    if counts.shape[2] < k:
        raise BenchInputError(f"{where}: {counts.shape[2]} experts cannot serve top-{k}")
    c = np.asarray(counts, dtype=np.int64)
    if (c < 0).any():
        raise BenchInputError(f"{where}: negative counts")
    sums = c.sum(axis=2)
    bad = np.argwhere(sums % k)
    if bad.size:
        p, l = bad[0]
        raise BenchInputError(f"{where}: prompt {p} layer {l} sums to {sums[p, l]}, not a multiple of k={k}")
    dense = dense_layers(c)
    moe = [x for x in range(c.shape[1]) if x not in dense]
    if not moe:
        raise BenchInputError(f"{where}: every layer is zero for every prompt: no expert traffic to replay")
    ref = moe[0]
    bad = np.argwhere(sums[:, moe] != sums[:, ref:ref + 1])
    if bad.size:
        p, j = bad[0]
        l = moe[j]
        if sums[p, l] == 0 or sums[p, ref] == 0:  # zero for some prompts only: not a dense layer
            zero, other = (l, ref) if sums[p, l] == 0 else (ref, l)
            raise BenchInputError(f"{where}: prompt {p} layer {zero} has 0 tokens, layer {other} has "
                             f"{sums[p, other] // k} (a dense layer is zero for every prompt; this one is not)")
        raise BenchInputError(f"{where}: prompt {p} layer {l} has {sums[p, l] // k} tokens, layer {ref} has "
                         f"{sums[p, ref] // k}")
    over = np.argwhere(c > (sums // k)[:, :, None])
    if over.size:
        p, l, e = over[0]
        raise BenchInputError(f"{where}: prompt {p} layer {l} expert {e} has {c[p, l, e]} tokens, more than "
                         f"the prompt's {sums[p, l] // k}")
    return dense


def load_trace(path: str | os.PathLike, k: int | None = None) -> Trace:
    """Open a trace ``.npy`` in place and check it (``BenchInputError``, a ``ValueError``, naming the file otherwise)."""
    p = Path(path)
    try:
        counts = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BenchInputError(f"{p}: cannot read a trace ({exc})") from None
    if k is None:
        k = infer_top_k(counts, p.name)
    dense = _check(counts, int(k), str(p))
    return Trace(counts, int(k), p.stem, dense)


def derive_tokens(row: np.ndarray, k: int, seed: int = 0, prompt: int = 0) -> np.ndarray:
    """Experts of each token of one prompt: ``[T, layers, k]`` int16 (see the module docstring).

    ``row`` is the prompt's ``[layers, experts]`` counts. Deterministic in (row, k, seed, prompt).
    """
    row = np.asarray(row, dtype=np.int64)
    L, E = row.shape
    T = int(row[0].sum()) // k
    out = np.empty((T, L, k), dtype=np.int16)
    if T == 0:
        return out
    rng = np.random.default_rng([int(seed), int(prompt)])
    for layer in range(L):
        c = row[layer]
        order = rng.permutation(E)
        slots = np.repeat(order, c[order])  # T * k slots
        tok = slots.reshape(k, T).T  # token t: slots t, t + T, ...
        tok = tok[rng.permutation(T)]
        out[:, layer, :] = np.sort(tok, axis=1)
    return out


@dataclass(frozen=True)
class ReplaySequence:
    """The whole replay: ``steps[s]`` are the experts step ``s`` needs (layer ``s % layers``);
    prompt ``p`` covers steps ``prompt_start[p] : prompt_start[p + 1]``."""

    steps: np.ndarray  # [S, k] int16
    layers: int
    experts: int
    k: int
    prompt_start: np.ndarray  # [prompts + 1] int64, in steps
    name: str = ""
    dense: tuple[int, ...] = ()  # the trace's dense layers (left out: no expert traffic)

    @property
    def tokens(self) -> int:
        return int(self.steps.shape[0] // self.layers)

    def counts(self) -> np.ndarray:
        """Per-prompt counts ``[prompts, layers, experts]`` recomputed from the steps."""
        P = len(self.prompt_start) - 1
        out = np.zeros((P, self.layers, self.experts), dtype=np.int64)
        for p in range(P):
            s = self.steps[self.prompt_start[p]:self.prompt_start[p + 1]]
            lay = np.repeat(np.arange(s.shape[0]) % self.layers, self.k)
            np.add.at(out[p], (lay, s.reshape(-1).astype(np.int64)), 1)
        return out


def build_sequence(trace: Trace, seed: int = 0) -> ReplaySequence:
    """The replay of ``trace``'s MoE layers (dense layers are steps with no expert traffic: left out)."""
    routed = trace.routed()
    parts = []
    starts = [0]
    for p in range(trace.prompts):
        tok = derive_tokens(routed[p], trace.k, seed, p)
        parts.append(tok.reshape(-1, trace.k))
        starts.append(starts[-1] + parts[-1].shape[0])
    steps = np.concatenate(parts) if parts else np.zeros((0, trace.k), np.int16)
    return ReplaySequence(np.ascontiguousarray(steps), int(routed.shape[1]), trace.experts, trace.k,
                          np.asarray(starts, dtype=np.int64), trace.name, tuple(trace.dense))
