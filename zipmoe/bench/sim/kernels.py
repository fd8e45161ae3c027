"""numba kernels of the simulator's replay policies: one call per layer (:func:`step`, driven by
:class:`.policy.ReplayPolicy` and by the replay loop in :mod:`.replay_kernels`).

The state of one policy is one tuple ``st`` of arrays (built by :func:`new_state`, owned by
:class:`.policy.ReplayPolicy`):

* ``tier[K]`` int8: the tier of every key (``key = layer * E + expert``), see ``zipmoe_run.tiers.Tier``;
* ``pool[K]`` int32: the capacity pool of the key (its layer for per-layer pools, else 0);
* ``cap[P, 4]`` / ``used[P, 4]`` int64: slots per pool and tier (column 0 unused);
* ``mem[P, 4, Kp]`` / ``pos[K]`` int64: the keys resident in each pool and tier (the first
  ``used[p, t]`` entries) and each key's index there;
* ``F[5, K]`` float64: ``LAST`` (last access step), ``CNT`` (LFU count / the paper's slot count),
  ``GLOB`` (all-time activations), ``REQ`` (activations in the current request), ``NXT`` (next use,
  Belady);
* ``scal[8]`` float64: ``S_CLOCK`` steps so far, ``S_LAYERS``, ``S_ALPHA`` (prior strength),
  ``S_DEMOTE`` (1: a FULL or COMPRESSED victim may drop to SM), ``S_E`` experts per layer,
  ``S_PERLAYER`` (1: per-layer pools), ``S_TREQ`` tokens seen when the current request began,
  ``S_COST + t`` seconds one access costs when the expert is in tier ``t`` (``zipmoe`` placement);
* ``mark[K]`` int64: the step that last accessed the key (protects the step's experts);
* ``scr_i`` int64 / ``scr_f`` float64 ``[SCR_BASE + E]``: scratch (see :data:`SCR_BASE`);
* ``ver[K]`` int64 and per-(pool, tier) lazy min-heaps ``hp`` (priority), ``hk`` (key), ``hv``
  (the key's version when pushed), ``hn`` (entries): every change of a key's priority or tier
  bumps its version and pushes a fresh entry; entries with an old version are skipped, and a full
  heap is rebuilt from the residents.

A key's priority changes only when it is accessed or moved (or, for ``zipmoe``, when a request
begins: its prior term uses the all-time rate as of the request's start), which is what makes the
lazy heaps exact.

Moves are logged as rows ``(key, old tier, new tier)`` in ``chg``; the log may hold several rows
for one key, in the order they happened.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from zipmoe_run.tiers import Tier

LRU, LFU, ZIPMOE, PAPER, BELADY = 0, 1, 2, 3, 4
KIND_IDS = {"lru": LRU, "lfu": LFU, "zipmoe": ZIPMOE, "paper": PAPER, "belady": BELADY}

LAST, CNT, GLOB, REQ, NXT = 0, 1, 2, 3, 4
S_CLOCK, S_LAYERS, S_ALPHA, S_DEMOTE, S_E, S_PERLAYER, S_TREQ, S_COST = 0, 1, 2, 3, 4, 5, 6, 8

COLD, SM, COMP, FULL = (int(t) for t in Tier)  # numba sees plain ints
INF = np.inf

#: scratch layout: [0, 16) stashed heap keys / priorities, [16, 32) their versions, [SCR_BASE,
#: SCR_BASE + m) one step's experts in placement order (m <= experts: ids are distinct per layer)
SCR_BASE = 32

# indices into the state tuple
TIER, POOL, CAP, USED, MEM, POS, FF, SCAL, MARK, VER, HP, HK, HV, HN, SCR_I, SCR_F = range(16)


def new_state(layers, experts, pools, cap, alpha, demote, per_layer, costs=(2.6, 1.3, 1.0, 0.0)):
    """A fresh state tuple (see the module docstring)."""
    n = layers * experts
    kp = n // pools
    h = 2 * kp + 64
    scal = np.zeros(16)
    scal[S_COST:S_COST + 4] = costs
    scal[S_LAYERS] = layers
    scal[S_ALPHA] = alpha
    scal[S_DEMOTE] = 1.0 if demote else 0.0
    scal[S_E] = experts
    scal[S_PERLAYER] = 1.0 if per_layer else 0.0
    pool = (np.arange(n, dtype=np.int32) // experts) if per_layer else np.zeros(n, np.int32)
    return (np.zeros(n, np.int8), pool, np.asarray(cap, np.int64).copy(), np.zeros((pools, 4), np.int64),
            np.zeros((pools, 4, kp), np.int64), np.zeros(n, np.int64), np.zeros((5, n)), scal,
            np.full(n, -1, np.int64), np.zeros(n, np.int64), np.zeros((pools, 4, h)),
            np.zeros((pools, 4, h), np.int64), np.zeros((pools, 4, h), np.int64), np.zeros((pools, 4), np.int64),
            np.zeros(SCR_BASE + experts, np.int64), np.zeros(SCR_BASE + experts))


@njit(cache=True)
def prio(kind, key, F, scal):
    """How much the policy wants ``key`` resident (higher = keep)."""
    if kind == LRU:
        return F[LAST, key]
    if kind == LFU:
        return F[CNT, key] + 1e-12 * F[LAST, key]
    if kind == ZIPMOE:
        tokens = scal[S_TREQ]
        g = F[GLOB, key] / tokens if tokens > 0 else 0.0
        return F[REQ, key] + scal[S_ALPHA] * g + 1e-12 * F[LAST, key]
    if kind == PAPER:
        return F[CNT, key] + 1e-12 * F[LAST, key]
    return -F[NXT, key]  # BELADY: the nearest next use is the most valuable


# -- lazy heaps ---------------------------------------------------------------------------------


@njit(cache=True)
def _sift_up(hp, hk, hv, p, t, i):
    while i > 0:
        j = (i - 1) >> 1
        if hp[p, t, j] <= hp[p, t, i]:
            break
        hp[p, t, i], hp[p, t, j] = hp[p, t, j], hp[p, t, i]
        hk[p, t, i], hk[p, t, j] = hk[p, t, j], hk[p, t, i]
        hv[p, t, i], hv[p, t, j] = hv[p, t, j], hv[p, t, i]
        i = j


@njit(cache=True)
def _sift_down(hp, hk, hv, p, t, i, n):
    while True:
        a = 2 * i + 1
        if a >= n:
            break
        b = a + 1
        c = b if b < n and hp[p, t, b] < hp[p, t, a] else a
        if hp[p, t, i] <= hp[p, t, c]:
            break
        hp[p, t, i], hp[p, t, c] = hp[p, t, c], hp[p, t, i]
        hk[p, t, i], hk[p, t, c] = hk[p, t, c], hk[p, t, i]
        hv[p, t, i], hv[p, t, c] = hv[p, t, c], hv[p, t, i]
        i = c


@njit(cache=True)
def _rebuild(kind, st, p, t):
    mem, used, F, scal, ver = st[MEM], st[USED], st[FF], st[SCAL], st[VER]
    hp, hk, hv, hn = st[HP], st[HK], st[HV], st[HN]
    n = used[p, t]
    for j in range(n):
        x = mem[p, t, j]
        hp[p, t, j] = prio(kind, x, F, scal)
        hk[p, t, j] = x
        hv[p, t, j] = ver[x]
    hn[p, t] = n
    for i in range(n // 2 - 1, -1, -1):
        _sift_down(hp, hk, hv, p, t, i, n)


@njit(cache=True)
def rebuild_all(kind, st):
    P = st[USED].shape[0]
    for p in range(P):
        for t in range(1, 4):
            _rebuild(kind, st, p, t)


@njit(cache=True)
def _push(kind, st, x):
    """Record ``x``'s current priority in the heap of its tier (call after any change)."""
    t = st[TIER][x]
    if t <= 0:
        return
    p = st[POOL][x]
    hp, hk, hv, hn = st[HP], st[HK], st[HV], st[HN]
    if hn[p, t] >= hp.shape[2]:
        _rebuild(kind, st, p, t)  # drops every stale entry (x's new one included)
        return
    i = hn[p, t]
    hp[p, t, i] = prio(kind, x, st[FF], st[SCAL])
    hk[p, t, i] = x
    hv[p, t, i] = st[VER][x]
    hn[p, t] = i + 1
    _sift_up(hp, hk, hv, p, t, i)


@njit(cache=True)
def _pop(st, p, t):
    hp, hk, hv, hn = st[HP], st[HK], st[HV], st[HN]
    n = hn[p, t] - 1
    hp[p, t, 0] = hp[p, t, n]
    hk[p, t, 0] = hk[p, t, n]
    hv[p, t, 0] = hv[p, t, n]
    hn[p, t] = n
    _sift_down(hp, hk, hv, p, t, 0, n)


@njit(cache=True)
def victim(kind, st, p, t, stamp, protect):
    """The resident key of (pool p, tier t) with the lowest priority (not one of this step's
    experts if ``protect``), -1 if none. The heap keeps it; the caller moves it or not."""
    hk, hv, hn, hp = st[HK], st[HV], st[HN], st[HP]
    ver, mark = st[VER], st[MARK]
    scr_i, scr_f = st[SCR_I], st[SCR_F]
    ns = 0
    best = -1
    while hn[p, t] > 0:
        x = hk[p, t, 0]
        if hv[p, t, 0] != ver[x]:
            _pop(st, p, t)
            continue
        if protect and mark[x] == stamp and ns < 16:
            scr_i[ns] = x
            scr_i[16 + ns] = hv[p, t, 0]
            scr_f[ns] = hp[p, t, 0]
            ns += 1
            _pop(st, p, t)
            continue
        if protect and mark[x] == stamp:  # more than 16 protected: scan the residents
            best = -1
            bp = INF
            for j in range(st[USED][p, t]):
                v = st[MEM][p, t, j]
                if mark[v] == stamp:
                    continue
                pv = prio(kind, v, st[FF], st[SCAL])
                if best < 0 or pv < bp:
                    best = v
                    bp = pv
            break
        best = x
        break
    for i in range(ns):  # the stashed entries are still current: put them back
        j = hn[p, t]
        hp[p, t, j] = scr_f[i]
        hk[p, t, j] = scr_i[i]
        hv[p, t, j] = scr_i[16 + i]
        hn[p, t] = j + 1
        _sift_up(hp, hk, hv, p, t, j)
    return best


# -- moves --------------------------------------------------------------------------------------


@njit(cache=True)
def _unlist(st, x, t, p):
    mem, pos, used = st[MEM], st[POS], st[USED]
    j = pos[x]
    last = mem[p, t, used[p, t] - 1]
    mem[p, t, j] = last
    pos[last] = j
    used[p, t] -= 1


@njit(cache=True)
def _relist(kind, st, x, t):
    """Put ``x`` (currently listed nowhere) into tier ``t`` (no log)."""
    p = st[POOL][x]
    st[VER][x] += 1
    st[TIER][x] = t
    if t > 0:
        used, mem, pos = st[USED], st[MEM], st[POS]
        mem[p, t, used[p, t]] = x
        pos[x] = used[p, t]
        used[p, t] += 1
        _push(kind, st, x)


@njit(cache=True)
def _move(kind, st, x, t, chg, n):
    old = st[TIER][x]
    if old > 0:
        _unlist(st, x, old, st[POOL][x])
    _relist(kind, st, x, t)
    chg[n, 0] = x
    chg[n, 1] = old
    chg[n, 2] = t
    return n + 1


@njit(cache=True)
def move_key(kind, st, x, t):
    """An unlogged move (``Policy.rebalance``)."""
    chg = np.empty((1, 3), np.int64)
    _move(kind, st, x, t, chg, 0)



@njit(cache=True)
def touched(kind, st, x):
    """``x``'s priority changed: re-file it in its tier's heap."""
    st[VER][x] += 1
    _push(kind, st, x)


@njit(cache=True)
def _drop(kind, st, v, frm, stamp, protect, chg, n):
    """``v`` (already taken out of tier ``frm`` and listed nowhere, tier recorded as COLD) goes to
    SM if allowed and it beats SM's weakest, else stays COLD; logs one row for v, last."""
    p = st[POOL][v]
    cap, used, F, scal = st[CAP], st[USED], st[FF], st[SCAL]
    t = COLD
    if scal[S_DEMOTE] > 0 and frm > SM and cap[p, SM] > 0:
        if used[p, SM] < cap[p, SM]:
            t = SM
        else:
            w = victim(kind, st, p, SM, stamp, protect)
            if w >= 0 and prio(kind, w, F, scal) < prio(kind, v, F, scal):
                n = _move(kind, st, w, COLD, chg, n)
                t = SM
    _relist(kind, st, v, t)
    chg[n, 0] = v
    chg[n, 1] = frm
    chg[n, 2] = t
    return n + 1


@njit(cache=True)
def place(kind, st, x, stamp, protect, chg, n):
    """Move ``x`` to the highest tier above its own that has room or a weaker resident (LRU and
    LFU always take the room of the weakest)."""
    tier, cap, used, F, scal = st[TIER], st[CAP], st[USED], st[FF], st[SCAL]
    px = prio(kind, x, F, scal)
    p = st[POOL][x]
    for t in range(FULL, tier[x], -1):
        if cap[p, t] == 0:
            continue
        if used[p, t] < cap[p, t]:
            return _move(kind, st, x, t, chg, n)
        v = victim(kind, st, p, t, stamp, protect)
        if v >= 0 and (kind == LRU or kind == LFU or prio(kind, v, F, scal) < px):
            # take v out of t (it will be logged by _drop), move x in (freeing x's old slot),
            # then re-place v below
            _unlist(st, v, t, p)
            st[VER][v] += 1
            tier[v] = COLD
            n = _move(kind, st, x, t, chg, n)
            return _drop(kind, st, v, t, stamp, protect, chg, n)
    return n


@njit(cache=True)
def _place_value(kind, st, x, stamp, protect, chg, n):
    """``zipmoe`` placement: the tier above x's own with the largest positive saving, where moving
    x up from t0 to t saves ``p_x (c[t0] - c[t])`` and costs the displaced v (to SM, displacing
    SM's weakest w, or to COLD, whichever loses less) ``p_v (c[v's new tier] - c[t]) (+ p_w (c[COLD]
    - c[SM]))``; p is the score (expected accesses), c the per-access cost of a tier."""
    tier, cap, used, F, scal = st[TIER], st[CAP], st[USED], st[FF], st[SCAL]
    px = prio(kind, x, F, scal)
    p = st[POOL][x]
    t0 = tier[x]
    c0 = scal[S_COST + COLD]
    cs = scal[S_COST + SM]
    best_t = -1
    best_v = -1
    best_g = 0.0
    for t in range(FULL, t0, -1):
        if cap[p, t] == 0:
            continue
        ct = scal[S_COST + t]
        g = px * (scal[S_COST + t0] - ct)
        v = -1
        if used[p, t] >= cap[p, t]:
            v = victim(kind, st, p, t, stamp, protect)
            if v < 0:
                continue
            pv = prio(kind, v, F, scal)
            loss = pv * (c0 - ct)
            if scal[S_DEMOTE] > 0 and t > SM and cap[p, SM] > 0:
                if used[p, SM] < cap[p, SM] or t0 == SM:
                    loss = pv * (cs - ct)
                else:
                    w = victim(kind, st, p, SM, stamp, protect)
                    if w >= 0:
                        pw = prio(kind, w, F, scal)
                        if pw < pv:
                            loss = pv * (cs - ct) + pw * (c0 - cs)
            g -= loss
        if g > best_g:
            best_g = g
            best_t = t
            best_v = v
    if best_t < 0:
        return n
    if best_v < 0:
        return _move(kind, st, x, best_t, chg, n)
    _unlist(st, best_v, best_t, p)
    st[VER][best_v] += 1
    tier[best_v] = COLD
    n = _move(kind, st, x, best_t, chg, n)
    return _drop(kind, st, best_v, best_t, stamp, protect, chg, n)


@njit(cache=True)
def _paper_place(st, x, lo, hi, stamp, chg, n):
    """The ZipMoE paper's ProactiveDecision for an expert found COLD (per-layer pools)."""
    cap, used, F = st[CAP], st[USED], st[FF]
    p = st[POOL][x]
    rank = 0
    for v in range(lo, hi):
        if F[REQ, v] > F[REQ, x]:
            rank += 1
    nf = cap[p, FULL]
    ns = cap[p, SM]
    free_f = used[p, FULL] < nf
    free_s = used[p, SM] < ns
    if rank < nf:
        t = FULL if free_f else (SM if free_s else FULL)
    elif rank < nf + ns:
        t = SM if free_s else (FULL if free_f else SM)
    else:
        if free_s:
            t = SM
        elif free_f:
            t = FULL
        else:
            return n
    if cap[p, t] == 0:
        return n
    if used[p, t] >= cap[p, t]:
        v = victim(PAPER, st, p, t, stamp, True)
        if v < 0:
            return n
        F[CNT, v] = 0.0
        n = _move(PAPER, st, v, COLD, chg, n)
    F[CNT, x] = 1.0
    return _move(PAPER, st, x, t, chg, n)


@njit(cache=True)
def step(kind, st, layer, experts, nexts, found, chg):
    """One layer of one token needs ``experts`` (distinct). Fills ``found`` with the tier each was
    in when used; returns the number of rows written to ``chg``."""
    tier, F, scal, mark = st[TIER], st[FF], st[SCAL], st[MARK]
    E = int(scal[S_E])
    m = experts.shape[0]
    scal[S_CLOCK] += 1.0
    stamp = int(scal[S_CLOCK])
    now = scal[S_CLOCK]
    n = 0
    if kind == BELADY:  # sequential: the flattened access order, no protection (exact MIN)
        for i in range(m):
            x = layer * E + int(experts[i])
            found[i] = tier[x]
            F[NXT, x] = nexts[i]
            F[LAST, x] = now
            mark[x] = stamp
            touched(kind, st, x)
            n = place(kind, st, x, stamp, False, chg, n)
        return n
    for i in range(m):
        x = layer * E + int(experts[i])
        found[i] = tier[x]
        mark[x] = stamp
        F[LAST, x] = now
        F[GLOB, x] += 1.0
        F[REQ, x] += 1.0
        if kind == LFU:
            F[CNT, x] += 1.0
        elif kind == PAPER and tier[x] > 0:
            F[CNT, x] += 1.0
        touched(kind, st, x)
    if kind == PAPER:
        for i in range(m):
            x = layer * E + int(experts[i])
            if found[i] == COLD:
                lo = layer * E
                n = _paper_place(st, x, lo, lo + E, stamp, chg, n)
        return n
    # the most wanted first
    order = st[SCR_I][SCR_BASE:SCR_BASE + m]
    pr = st[SCR_F][SCR_BASE:SCR_BASE + m]
    for i in range(m):
        order[i] = i
        pr[i] = prio(kind, layer * E + int(experts[i]), F, scal)
    for i in range(1, m):
        j = i
        while j > 0 and pr[order[j]] > pr[order[j - 1]]:
            order[j], order[j - 1] = order[j - 1], order[j]
            j -= 1
    for i in range(m):
        x = layer * E + int(experts[order[i]])
        if kind == ZIPMOE:
            n = _place_value(kind, st, x, stamp, True, chg, n)
        else:
            n = place(kind, st, x, stamp, True, chg, n)
    return n


@njit(cache=True)
def begin_request(kind, st):
    F, scal = st[FF], st[SCAL]
    F[REQ, :] = 0.0
    scal[S_TREQ] = scal[S_CLOCK] / scal[S_LAYERS]
    if kind == ZIPMOE:
        rebuild_all(kind, st)
