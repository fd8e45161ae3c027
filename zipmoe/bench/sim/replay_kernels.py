"""numba kernels of the replay loop (:mod:`.simulate`): the whole trace through one replay policy,
the delay model's makespan, the prefetch predictor, and the trace statistics (rank histogram for
the planner, next uses for Belady). The policy state and its per-layer step are :mod:`.kernels`."""
from __future__ import annotations

import numpy as np
from numba import njit

from zipmoe_run import tiers as _tiers

from .kernels import COLD, COMP, S_E, SCAL, SM, TIER, begin_request, step

__all__ = ["makespan", "replay", "rank_histogram", "next_uses"]


# the planner's own function, compiled: one definition of the delay model, run by both
makespan = njit(cache=True)(_tiers.makespan)


@njit(cache=True)
def _predict(layer, E, m, pf_req, pf_glob, tokens, alpha, outk):
    """Top-``m`` experts of ``layer`` by request count + alpha * all-time rate, into ``outk``."""
    base = layer * E
    taken = np.zeros(E, np.bool_)
    for j in range(m):
        best = -1
        bs = -1.0
        for e in range(E):
            if taken[e]:
                continue
            g = pf_glob[base + e] / tokens if tokens > 0 else 0.0
            s = pf_req[base + e] + alpha * g
            if s > bs:
                bs = s
                best = e
        taken[best] = True
        outk[j] = best


@njit(cache=True)
def _oracle(truth, E, m, q, outk):
    """``m`` guesses: each true expert with probability q, otherwise a wrong one, no repeats."""
    k = truth.shape[0]
    used = np.zeros(E, np.bool_)
    for i in range(k):
        used[int(truth[i])] = True
    taken = np.zeros(E, np.bool_)
    j = 0
    for i in range(min(k, m)):
        if np.random.random() < q:
            e = int(truth[i])
        else:
            e = np.random.randint(E)
            tries = 0
            while (used[e] or taken[e]) and tries < 4 * E:
                e = np.random.randint(E)
                tries += 1
        if not taken[e]:
            taken[e] = True
            outk[j] = e
            j += 1
    while j < m:  # fill with wrong guesses
        e = np.random.randint(E)
        if not taken[e]:
            taken[e] = True
            outk[j] = e
            j += 1


@njit(cache=True)
def replay(kind, st, steps, nexts, prompt_start, L, a_sm, a_cold, b, pf_on, pf_m, pf_window, pf_alpha,
           stats, pf_oracle=-1.0, seed=0):
    """Replay every step; ``stats`` (float64[16]) accumulates:

    0 accesses, 1..4 found COLD/SM/COMP/FULL, 5 modelled seconds, 6 prefetch reads issued,
    7 prefetched experts used, 8 prefetch read seconds, 9 predictor top-k hits, 10 predictor
    slots, 11 prefetch reads of COLD experts (the rest read exponents of SM ones), 12 steps,
    13 moves logged, 14/15 prefetched experts used that were found COLD/SM.
    """
    S, k = steps.shape
    tier = st[TIER]
    E = int(st[SCAL][S_E])
    np.random.seed(seed)
    K = tier.shape[0]
    found = np.empty(k, np.int8)
    chg = np.empty((8 * k + 8, 3), np.int64)
    pf_req = np.zeros(K)
    pf_glob = np.zeros(K)
    staged = np.full(K, -1, np.int64)
    pred = np.empty(max(pf_m, k), np.int64)
    P = prompt_start.shape[0] - 1
    tokens = 0.0
    overrun = 0.0
    for p in range(P):
        begin_request(kind, st)
        pf_req[:] = 0.0
        for s in range(prompt_start[p], prompt_start[p + 1]):
            layer = (s - prompt_start[p]) % L
            if layer == 0:
                tokens += 1.0
            nx = nexts[s]
            n = step(kind, st, layer, steps[s], nx, found, chg)
            stats[13] += n
            n_comp = 0
            n_pf = 0
            n_sm = 0
            n_cold = 0
            for i in range(k):
                x = layer * E + int(steps[s, i])
                t = found[i]
                stats[1 + t] += 1.0
                pre = staged[x] == s and (t == COLD or t == SM)
                if pre:
                    stats[7] += 1.0
                    stats[14 + t] += 1.0
                if t == COMP:
                    n_comp += 1
                elif pre:
                    n_pf += 1
                elif t == SM:
                    n_sm += 1
                elif t == COLD:
                    n_cold += 1
                pf_req[x] += 1.0
                pf_glob[x] += 1.0
            stats[0] += k
            stats[12] += 1.0
            stats[5] += makespan(n_comp, n_sm, n_cold, a_sm, a_cold, b, n_pf, overrun)
            overrun = 0.0
            if layer + 1 < L:
                # predictor accuracy (top-k of the next layer), whatever is resident
                _predict(layer + 1, E, k, pf_req, pf_glob, tokens, pf_alpha, pred)
                for j in range(k):
                    for i in range(k):
                        if int(steps[s + 1, i]) == pred[j]:
                            stats[9] += 1.0
                stats[10] += k
                if pf_on:
                    if pf_oracle >= 0.0:  # what-if: each true expert predicted with probability pf_oracle
                        _oracle(steps[s + 1], E, pf_m, pf_oracle, pred)
                    else:
                        _predict(layer + 1, E, pf_m, pf_req, pf_glob, tokens, pf_alpha, pred)
                    busy = 0.0  # reads start while the disk is free within the window
                    for j in range(pf_m):
                        y = (layer + 1) * E + pred[j]
                        t = tier[y]
                        if t >= COMP:
                            continue
                        if busy >= pf_window:
                            break
                        a = a_sm if t == SM else a_cold
                        busy += a
                        staged[y] = s + 1
                        stats[6] += 1.0
                        if t == COLD:
                            stats[11] += 1.0
                        stats[8] += a
                    overrun = max(0.0, busy - pf_window)
    return stats


@njit(cache=True)
def rank_histogram(steps, prompt_start, L, E, alpha, hist):
    """``hist[l, r]`` += 1 for every access whose expert was the r-th (0 = first) of its layer by the
    online score (request count + alpha * all-time rate) just before the access."""
    S, k = steps.shape
    K = L * E
    req = np.zeros(K)
    glob = np.zeros(K)
    P = prompt_start.shape[0] - 1
    tokens = 0.0
    for p in range(P):
        req[:] = 0.0
        for s in range(prompt_start[p], prompt_start[p + 1]):
            layer = (s - prompt_start[p]) % L
            if layer == 0:
                tokens += 1.0
            base = layer * E
            for i in range(k):
                x = base + int(steps[s, i])
                sx = req[x] + (alpha * glob[x] / tokens if tokens > 1 else 0.0)
                r = 0
                for e in range(E):
                    y = base + e
                    if y == x:
                        continue
                    sy = req[y] + (alpha * glob[y] / tokens if tokens > 1 else 0.0)
                    if sy > sx or (sy == sx and y < x):
                        r += 1
                hist[layer, r] += 1.0
            for i in range(k):
                x = base + int(steps[s, i])
                req[x] += 1.0
                glob[x] += 1.0


@njit(cache=True)
def next_uses(steps, L, E):
    """Flattened index of the next access of the same key, inf if none (Belady)."""
    S, k = steps.shape
    out = np.empty((S, k))
    last = np.full(L * E, np.inf)
    for s in range(S - 1, -1, -1):
        layer = s % L
        for i in range(k - 1, -1, -1):
            x = layer * E + int(steps[s, i])
            out[s, i] = last[x]
            last[x] = s * k + i
    return out
