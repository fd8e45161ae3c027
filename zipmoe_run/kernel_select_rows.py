"""Which kernel a prefill product of M bf16 rows uses, per host, shape, thread count and M, by measurement.

A product of M > 1 bf16 rows outside a batched decode step (a prompt's routed expert gets the tokens
routed to it: typically a few to a few dozen; attention, the shared expert and lm_head get them all)
runs one of three kernels (``kernels_rows.prefill_linear``):

- ``numba``: the multi-row kernel of ``kernels_rows`` (each row bit for bit the one-row GEMV's, so such a
  prefill row equals the decode path's); float32 multiply-adds, compute-bound from about 2 rows;
- ``dp``: the AVX-512 BF16 dot-product kernel of ``kernels_dp`` (its own fixed order), only where
  ``kernels_dp.available()``;
- ``torch``: ``torch.nn.functional.linear``.

``measure_rows`` times the available ones at every M of ``ROW_COUNTS`` (the multi-row kernel only until
it first loses: its cost per row only grows with M), alternating pass by pass, the passes of each count
spread over the whole measurement (round after round); each keeps its fastest pass. At each count the preferred kernel (``PREFER``: numba, then dp, then torch) keeps its place unless
another beats it by ``kernel_select.MARGIN``. The result per shape:

- ``kernels.ROWS_UPTO[(n, k, t)]``: the largest count up to which the multi-row kernel is chosen at every
  count (1: never);
- ``BEYOND[(n, k, t)]``: ((count, kernel), ...) for the products of more rows, the choice between dp and
  torch alone at each measured count; M uses the entry of the largest count <= M (the first for smaller M).

Cached beside the one-row rates (``"OUTxIN@T:rowsM:kernel"``; a cache lacking a count or an available
kernel is measured again), reported (``report()["rows"]``) and in the kernels line. Overrides:
``ZIPMOE_ROWS_UPTO=N`` (the multi-row crossover) and ``ZIPMOE_PREFILL_KERNEL=dp|torch`` (the kernel
beyond it; dp falls back to torch where unavailable); with both set nothing is measured, with one the
other is still measured. ``ZIPMOE_KERNEL=torch``: torch everywhere; ``=numba``: the multi-row kernel up
to 8 rows, beyond it ``ZIPMOE_PREFILL_KERNEL`` or torch. The choice depends only on host, shape,
threads and M, never on the weights or where they come from.
"""
from __future__ import annotations

import logging
import math
import os
import time

import torch

from . import kernel_select as ks
from . import kernels as K

__all__ = ["ROW_COUNTS", "ROWS_ENV", "PREFILL_ENV", "PREFER", "BEYOND", "measure_rows", "choose_rows",
           "rows_for", "beyond_for", "dp_available", "reset"]

log = logging.getLogger(__name__)

ROWS_ENV = "ZIPMOE_ROWS_UPTO"
PREFILL_ENV = "ZIPMOE_PREFILL_KERNEL"
ROW_COUNTS = (2, 3, 4, 6, 8, 12, 16, 24, 32)  # prefill row counts measured
FORCED_NUMBA_UPTO = 8  # ZIPMOE_KERNEL=numba: the multi-row kernel up to this many rows
PREFER = ("numba", "dp", "torch")  # order of preference within the margin
BEYOND: dict[tuple[int, int, int], tuple] = {}  # (out, in, threads) -> ((count, "dp" | "torch"), ...)
_report: dict[str, dict] = {}  # "OUTxIN@T" -> {"upto", "beyond", "gbps": {M: {kernel: GB/s}}, "how"}


def dp_available() -> bool:
    from . import kernels_dp

    return kernels_dp.available()


def _candidates() -> list[str]:
    return [kn for kn in PREFER if (kn != "numba" or K.enabled()) and (kn != "dp" or dp_available())]


def _pick(per: dict) -> str:
    """The fastest of ``per``'s kernels, unless the most preferred of them is within the margin."""
    avail = [kn for kn in PREFER if kn in per]
    fastest = max(avail, key=lambda kn: (per[kn], -PREFER.index(kn)))
    return fastest if per[fastest] > ks.MARGIN * per[avail[0]] else avail[0]


def _rows_kernel(kern: str, x: torch.Tensor, w: torch.Tensor) -> None:
    """M rows x [M, K] by w [N, K] as a prefill runs them: numba's team for ours (torch idle), torch's
    product at torch's thread count."""
    if kern == "torch":
        K._torch_linear(x, w)
        return
    with K.single_row_scope(True):
        if kern == "numba":
            from .kernels_rows import gemm_rows

            gemm_rows(x, w)
        else:
            from .kernels_dp import gemm_dp

            gemm_dp(x, w)


def measure_rows(shapes, threads: int, kernels=None, timer=time.perf_counter) -> dict:
    """``{(out, in): {M: {kernel: bytes/s}}}`` of ``kernels`` (default: the available ones) on M rows, M in
    ``ROW_COUNTS``; the multi-row kernel up to the first count where it loses. Each kernel keeps its
    fastest pass (the least disturbed on a shared host); the ``REPS`` passes of a count are spread over
    the whole measurement of the shape (round after round over all counts, the kernels alternating), so
    a busy spell of a few seconds spoils a few passes of every count rather than every pass of a few."""
    shapes = sorted(set(shapes))
    kernels = list(kernels or _candidates())
    if not shapes:
        return {}
    span = ks.SPAN_BYTES  # not span_bytes(): M >= 2 rows lean on compute more than the one-row GEMV, and two
    # pools of twice the cache (this one's ~90 MB peak beside the one-row choice's) broke the peak RSS bound
    elems = max(n * k for n, k in shapes) + span // 2
    pool = ks._pool(elems)
    xs = ks._pool(max(k for _, k in shapes) * ROW_COUNTS[-1] + 64)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict = {}
    try:
        for n, k in shapes:
            nbytes = n * k * 2
            m = max(2, min(ks.MAX_MATS, math.ceil(span / nbytes) + 1))
            step = (elems - n * k) // (m - 1) // 64 * 64
            mats = [pool[i * step:i * step + n * k].view(n, k) for i in range(m)]  # [N, K] each
            best: dict = {rows: {} for rows in ROW_COUNTS}  # fastest pass, seconds per product
            for _ in range(ks.REPS):
                numba_on = "numba" in kernels
                for rows in ROW_COUNTS:
                    x = xs[:rows * k].view(rows, k)  # [M, K]
                    for kern in kernels:
                        if kern == "numba" and not numba_on:
                            continue
                        if kern not in best[rows]:
                            _rows_kernel(kern, x, mats[0])  # warm-up
                        t0 = timer()
                        for w in mats:
                            _rows_kernel(kern, x, w)
                        dt = (timer() - t0) / m
                        best[rows][kern] = min(dt, best[rows].get(kern, dt))
                    if numba_on and _pick(_rates(best[rows], nbytes)) != "numba":
                        numba_on = False  # it only gets slower per row from here
            out[(n, k)] = {rows: _rates(per, nbytes) for rows, per in best.items() if per}
    finally:
        torch.set_num_threads(saved)
    return out


def _rates(secs: dict, nbytes: int) -> dict:
    return {kern: (nbytes / dt if dt > 0 else float("inf")) for kern, dt in secs.items()}


def _decide(name: str, rates: dict, cands: list[str]) -> tuple[int, tuple] | None:
    """(upto, beyond) from the cached rates of one shape, or None when they do not cover ``cands``."""
    upto, numba_on, beyond = 1, "numba" in cands, []
    for rows in ROW_COUNTS:
        per = {kn: rates.get(f"{name}:rows{rows}:{kn}") for kn in cands if kn != "numba" or numba_on}
        if any(v is None for v in per.values()):
            return None
        if numba_on:
            if _pick(per) == "numba":
                upto = rows
            else:
                numba_on = False  # measured no further
        rest = {kn: v for kn, v in per.items() if kn != "numba"}
        beyond.append((rows, _pick(rest) if rest else "torch"))
    return upto, _squeeze(beyond)


def _squeeze(beyond: list) -> tuple:
    """Drop entries that repeat the kernel before them: ((2, "dp"), (24, "torch")), ..."""
    out = []
    for c, kn in beyond:
        if not out or out[-1][1] != kn:
            out.append((c, kn))
    return tuple(out)


def _forced(m: str) -> tuple[int | None, str | None]:
    """(upto, beyond kernel) forced by the environment; None where it is measured."""
    upto = beyond = None
    raw = os.environ.get(ROWS_ENV, "").strip()
    if raw:
        try:
            upto = max(1, int(raw))
        except ValueError:
            log.warning("%s=%r is not an integer; measuring", ROWS_ENV, raw)
    raw = os.environ.get(PREFILL_ENV, "").strip().lower()
    if raw in ("dp", "torch"):
        beyond = "dp" if raw == "dp" and dp_available() else "torch"
        if raw == "dp" and beyond != "dp":
            log.info("%s=dp: the dp kernel is unavailable here (%s); torch", PREFILL_ENV, _why())
    elif raw and raw != "auto":
        log.warning("%s=%r is not one of dp, torch, auto; measuring", PREFILL_ENV, raw)
    if m == "torch":
        return 1, "torch"
    if m == "numba" or not K.enabled():
        return (upto if upto is not None else (FORCED_NUMBA_UPTO if K.enabled() else 1)), beyond or "torch"
    return upto, beyond


def _why() -> str:
    from . import kernels_dp

    return kernels_dp.reason()


def choose_rows(shapes, threads: int, m: str, measure_rows_fn=None, calibrator=None) -> None:
    """``kernels.ROWS_UPTO`` and ``BEYOND`` of each shape at ``threads``: forced, cached or measured now."""
    todo = sorted({(int(n), int(k)) for n, k in shapes} - {(n, k) for (n, k, t) in K.ROWS_UPTO if t == threads})
    if not todo:
        return
    f_upto, f_beyond = _forced(m)
    if f_upto is not None and f_beyond is not None:
        for n, k in todo:
            _set(n, k, threads, f_upto, ((ROW_COUNTS[0], f_beyond),), {}, "forced")
        return
    t0 = time.perf_counter()
    cands = _candidates()
    cal, key, path, d = ks._cache(calibrator)
    rates = dict(d["rates"]) if d else {}
    miss = [s for s in todo if _decide(ks._name(*s, threads), rates, cands) is None]
    if miss:
        got = (measure_rows_fn or measure_rows)(miss, threads)
        for (n, k), per_m in got.items():
            for rows, per in per_m.items():
                ks._keep_rates(rates, f"{ks._name(n, k, threads)}:rows{int(rows)}", per)
        if d is not None:  # keep what another process wrote meanwhile
            d = cal._load(path, key, fmt=ks.CACHE_FORMAT) or d
            rates = {**d["rates"], **rates}
        cal._save(path, {"format": ks.CACHE_FORMAT, "key": key, "rates": rates, "measured": rates,
                         "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    for n, k in todo:
        name = ks._name(n, k, threads)
        got = _decide(name, rates, cands) or (1, ((ROW_COUNTS[0], "torch"),))
        upto = f_upto if f_upto is not None else got[0]
        beyond = ((ROW_COUNTS[0], f_beyond),) if f_beyond is not None else got[1]
        per = {r: {kn: rates[f"{name}:rows{r}:{kn}"] for kn in PREFER if f"{name}:rows{r}:{kn}" in rates}
               for r in ROW_COUNTS}
        how = ("measured" if (n, k) in miss else "cached") + ("+forced" if f_upto or f_beyond else "")
        _set(n, k, threads, upto, beyond, {r: v for r, v in per.items() if v}, how)
    ks._state["seconds"] += time.perf_counter() - t0
    ks._state["file"] = str(path)


def _set(n: int, k: int, t: int, upto: int, beyond: tuple, per: dict, how: str) -> None:
    K.ROWS_UPTO[(n, k, t)] = int(upto)
    BEYOND[(n, k, t)] = tuple(beyond)
    _report[ks._name(n, k, t)] = {"upto": int(upto), "beyond": {str(c): kn for c, kn in beyond}, "how": how,
                                  "gbps": {str(r): {kn: round(v / 1e9, 3) for kn, v in p.items()}
                                           for r, p in per.items()}}


def rows_for(n: int, k: int, threads: int) -> int:
    """The multi-row crossover of one shape (chosen now if it has not been)."""
    if (n, k, threads) not in K.ROWS_UPTO:
        ks.choose([(n, k)], threads)
    return K.ROWS_UPTO.get((n, k, threads), 1)


def beyond_for(n: int, k: int, threads: int, m: int) -> str:
    """"dp" or "torch" for a product of m rows beyond the crossover (chosen now if it has not been)."""
    got = BEYOND.get((n, k, threads))
    if got is None:
        ks.choose([(n, k)], threads)
        got = BEYOND.get((n, k, threads), ())
    kern = got[0][1] if got else "torch"
    for c, kn in got:
        if c <= m:
            kern = kn
    return kern


def line_part(rep: dict) -> str:
    """``1408x2048@2 rows<=4 dp>=5 torch>=24`` per shape: the kernel that takes each range of M."""
    parts = []
    for name, v in rep.items():
        upto = int(v.get("upto") or 1)
        entries = sorted((int(c), kn) for c, kn in (v.get("beyond") or {}).items())
        segs = [f"rows<={upto}"]
        for i, (c, kn) in enumerate(entries):
            nxt = entries[i + 1][0] if i + 1 < len(entries) else None
            if nxt is not None and nxt <= upto + 1:
                continue  # wholly inside the multi-row kernel's range
            seg = f"{kn}>={max(c, upto + 1)}"
            if not segs[-1].startswith(kn + ">="):
                segs.append(seg)
        parts.append(f"{name} " + " ".join(segs))
    return ", ".join(parts)


def reset() -> None:
    BEYOND.clear()
    _report.clear()
