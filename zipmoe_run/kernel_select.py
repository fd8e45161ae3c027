"""Which one-row bf16 kernel each weight shape uses on this host, chosen by measurement.

A decode step is a chain of one-row products over bf16 weights; which kernel streams them fastest depends on
the CPU (the numba GEMV of ``kernels`` is ~1.6-2x torch's on an AVX-512 Zen 4, no faster on an AVX2-only
EPYC). So the first time a host is seen, each available kernel (``KERNELS``: the numba GEMV,
``torch.nn.functional.linear`` and, where the CPU has AVX-512 BF16, the dot-product kernel of ``kernels_dp``
by way of ``kernels_dp1``) is timed on the model's own shapes (out, in) at the run's thread count, under the
same thread arrangement as a decode step (``kernels.single_row_scope``): a few distinct synthetic matrices per
shape spread over at least ``span_bytes()`` (twice the largest cache, at most ``SPAN_MAX``) so caches do not
flatter, after one warm-up call each; the kernels alternate pass by pass and each keeps its fastest of
``REPS`` passes (a busy spell of the host spoils a pass of every kernel, not every pass of one: a first
measurement on a loaded host once cached 3-13 GB/s for kernels that stream 30-50, and choices that followed
the load). The fastest per shape is used and cached, with one bias: another kernel must beat the numba GEMV by
``MARGIN`` to be chosen, because the GEMV's summation order is the same on every instruction set (torch's is
not) and because near-ties would otherwise flip between two fresh measurements of the same host.

Cache: one JSON file per host key (``calibrate.host_key``: CPU model, ISA flags, cores, machine,
package version; plus ``hostinfo.CODEGEN_ENV`` settings such as ``ATEN_CPU_CAPABILITY`` when set) under the calibration cache directory (``hosts/kernels-*.json``, atomic writes, read
with ``formats.jsonstrict``; a corrupt or foreign file is logged and measured again), whose ``rates``
hold bytes/s per ``"OUTxIN@T:kernel"``; a shape lacking any available kernel's rate (a file written before
dp existed, or on a host without it) is measured again. ``ZIPMOE_CALIBRATE=force`` measures again.

The choice depends only on host, shape and thread count, never on the weights or where they come from,
so a run of an archive and of its source directory use the same kernels and stay bit-identical. Each
kernel is deterministic, but kernels differ in summation order: tokens can differ (in rare near-ties)
between hosts that choose differently, as torch's own result already depends on the host.

Prefill rows: which kernel a product of M > 1 bf16 rows runs (the multi-row kernel, the AVX-512 BF16
dot-product kernel or torch's) is measured per shape, thread count and M by ``kernel_select_rows`` right
after the one-row choice, cached in the same file and reported under ``rows``.

``ZIPMOE_KERNEL=numba|torch|dp|auto`` (default auto) forces a one-row kernel (numba: prefill rows through the
multi-row kernel up to 8; torch: none; dp, numba where dp is unavailable: prefill rows as measured);
``ZIPMOE_RUN_KERNELS=0`` is torch.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time

import numpy as np
import torch

from . import kernels as K
from .hostinfo import codegen_env

__all__ = ["ENV", "KERNELS", "SPAN_MAX", "mode", "available", "span_bytes", "measure", "choose", "kernel_for",
           "model_shapes", "report", "line", "reset"]

log = logging.getLogger(__name__)

ENV = "ZIPMOE_KERNEL"
KERNELS = ("numba", "torch", "dp")  # in order of preference on a tie; dp only where kernels_dp.available()
SPAN_BYTES = 32 << 20  # a shape's distinct matrices are spread over at least this much memory,
LLC_TIMES = 2  # and over at least this many times the largest cache (span_bytes): a decode step streams
# its weights from memory, so must the timing (a 32 MiB span on a 32 MiB L3 measured 40-55 GB/s for what
# ran at 25-35 in a step)
SPAN_MAX = 256 << 20  # but never more than this: the timing's memory is transient but real, and a virtual
# machine's sysfs can report its host's whole cache (host A: a 480 MiB L3, so a 960 MiB pool that took the
# first run's peak RSS from 1.1 to 2.1 GiB and broke `bench e2e`'s memory caps; there the one-row rate over
# 8..1024 MiB of distinct matrices fell until 128 MiB and was flat from there)
MAX_MATS = 32
REPS = 5
CACHE_FORMAT = 7  # of the kernel choice cache entries (calibrate.Calibrator files of kind "kernels"); 2: the
# numba GEMV reads its input as bf16 pairs (faster at large K); 3: it is called by address and rounds to
# bf16 itself (about 10 us less per call), so rates measured before are stale; 4: spans beyond the cache;
# 5: kernels alternate pass by pass, each keeping its fastest (format 4 files were medians of one kernel's passes);
# 6: the numba GEMV prefetches its weights (kernels.PREFETCH), 1.5x faster on host A; 7: so does the multi-row
# kernel (2-2.7x at M = 4..8 there)
MARGIN = 1.10  # another kernel must be this much faster than the first of KERNELS to be chosen

_lock = threading.RLock()
_report: dict[str, dict] = {}  # "OUTxIN@T" -> {"kernel", "gbps": {kernel: GB/s}, "how"}
_state: dict = {"mode": None, "seconds": 0.0, "file": None, "measured_shapes": 0}


def mode() -> str:
    if not K.enabled_by_env():
        return "torch"
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in ("auto", *KERNELS):
        log.warning("%s=%r is not one of auto, %s; using auto", ENV, m, ", ".join(KERNELS))
        return "auto"
    return m


def available(dp_fn=None) -> list[str]:
    """The one-row kernels usable here (``dp_fn``: whether the dp kernel is, default ``kernels_dp.available``)."""
    on = K.enabled()
    return [k for k in KERNELS if (k != "numba" or on) and (k != "dp" or (on and (dp_fn or _dp_available)()))]


def _dp_available() -> bool:
    from .kernels_dp import available as dp

    return dp()


def _name(n: int, k: int, t: int) -> str:
    return f"{n}x{k}@{t}"


def _pool(elems: int) -> torch.Tensor:
    """[elems] bf16 of normal values (random sign and mantissa, magnitude 2^-7..2^-6): no denormals."""
    block = np.random.default_rng(0).integers(0, 1 << 16, size=1 << 19, dtype=np.uint16)
    block = (block & np.uint16(0x807F)) | np.uint16(0x3C00)
    return torch.from_numpy(np.resize(block, elems).view(np.int16)).view(torch.bfloat16)


def span_bytes() -> int:
    """Memory the distinct matrices of one shape are spread over: ``SPAN_BYTES``, or ``LLC_TIMES`` the
    host's largest cache where that is more (``hostinfo.largest_cache_bytes``), at most ``SPAN_MAX``."""
    from .hostinfo import largest_cache_bytes

    return max(SPAN_BYTES, min(LLC_TIMES * largest_cache_bytes(), SPAN_MAX))


def _mats(elems: int, n: int, k: int, m: int) -> list[torch.Tensor]:
    """``m`` matrices [n, k] spread evenly over a pool of ``elems`` bf16 elements, filled by ``_pool``'s
    pattern; the pool is left unwritten between them (memory only they touch is faulted in, so a small
    shape costs m of its own size, not the span)."""
    pool = torch.empty(elems, dtype=torch.bfloat16)
    step = (elems - n * k) // (m - 1) // 64 * 64  # elements; even offsets for the int32 view
    fill = _pool(n * k)
    mats = []
    for i in range(m):
        w = pool[i * step:i * step + n * k]
        w.copy_(fill)
        mats.append(w.view(n, k))  # [N, K]
    return mats


def measure(shapes, threads: int, kernels, timer=time.perf_counter) -> dict:
    """``{(out, in): {kernel: bytes/s}}`` of each kernel on each shape at ``threads`` threads."""
    shapes = sorted(set(shapes))
    if not shapes:
        return {}
    span = span_bytes()
    elems = max(n * k for n, k in shapes) + span // 2
    x_all = _pool(max(k for _, k in shapes) + 64)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict = {}
    try:
        with K.single_row_scope(True):
            for n, k in shapes:
                nbytes = n * k * 2
                m = max(2, min(MAX_MATS, math.ceil(span / nbytes) + 1))
                mats = _mats(elems, n, k, m)  # [N, K] each
                x = x_all[:k].view(1, k)  # [1, K]
                for kern in kernels:
                    K.run_kernel(kern, x, mats[0])  # warm-up
                best: dict[str, float] = {}
                for _ in range(REPS):  # the kernels alternate pass by pass; each keeps its fastest pass
                    for kern in kernels:
                        t0 = timer()
                        for w in mats:
                            K.run_kernel(kern, x, w)
                        dt = (timer() - t0) / m
                        best[kern] = min(dt, best.get(kern, dt))
                out[(n, k)] = {kern: nbytes / dt if dt > 0 else float("inf") for kern, dt in best.items()}
    finally:
        torch.set_num_threads(saved)
    return out


def cache_key(cal) -> dict:
    """The calibration host key plus the code-generation settings in the environment (when set)."""
    env = codegen_env()
    return {**cal.key, "codegen": env} if env else dict(cal.key)


def choose(shapes, threads: int | None = None, *, measure_fn=None, calibrator=None, measure_rows_fn=None) -> dict:
    """Make sure each (out, in) shape has a kernel at ``threads`` (default: torch's thread count):
    forced, cached or measured now (``measure_fn(shapes, threads, kernels)``, default :func:`measure`),
    and its prefill crossover (``measure_rows_fn(shapes, threads)``, default ``kernel_select_rows.measure_rows``);
    returns :func:`report`."""
    threads = int(threads or torch.get_num_threads())
    m = mode()
    with _lock:
        if _state["mode"] != m:
            reset()
            _state["mode"] = m
        todo = sorted({(int(n), int(k)) for n, k in shapes} - {s for s in _known(threads)})
        if not todo:
            return _rows_then_report(shapes, threads, m, measure_rows_fn, calibrator)
        avail = available()
        if m != "auto" or len(avail) < 2:
            kern = m if m in avail else avail[0]
            for n, k in todo:
                _set(n, k, threads, kern, {}, "forced" if m != "auto" else "only one available")
            return _rows_then_report(shapes, threads, m, measure_rows_fn, calibrator)
        t0 = time.perf_counter()
        cal, key, path, d = _cache(calibrator)
        rates = dict(d["rates"]) if d else {}
        miss = [s for s in todo if any(f"{_name(*s, threads)}:{kn}" not in rates for kn in avail)]
        if miss:
            got = (measure_fn or measure)(miss, threads, avail)
            for (n, k), per in got.items():
                _keep_rates(rates, _name(n, k, threads), per)
            cal._save(path, {"format": CACHE_FORMAT, "key": key, "rates": rates, "measured": rates,
                             "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            _state["measured_shapes"] += len(miss)
        for n, k in todo:
            per = {kn: rates.get(f"{_name(n, k, threads)}:{kn}", 0.0) for kn in avail}
            best = _pick(avail, per)
            _set(n, k, threads, best, per, "measured" if (n, k) in miss else "cached")
        _state["seconds"] += time.perf_counter() - t0
        _state["file"] = str(path)
        log.info("one-row kernels (%d threads): %s", threads, ", ".join(
            f"{_name(n, k, threads)} {K.CHOICE[(n, k, threads)]}" for n, k in todo))
        return _rows_then_report(shapes, threads, m, measure_rows_fn, calibrator)


def _cache(calibrator):
    """(calibrator, host key, file, its entry or None) of this host's kernel cache."""
    if calibrator is None:
        from .calibrate import Calibrator

        calibrator = Calibrator()
    key = cache_key(calibrator)
    path = calibrator._file("kernels", key)
    return calibrator, key, path, calibrator._load(path, key, fmt=CACHE_FORMAT)


def _keep_rates(rates: dict, prefix: str, per: dict) -> None:
    """rates["PREFIX:kernel"] = bytes/s for each finite, positive measurement in ``per``."""
    for kn, bps in per.items():
        if isinstance(bps, (int, float)) and math.isfinite(bps) and bps > 0:
            rates[f"{prefix}:{kn}"] = float(bps)


def _rows_then_report(shapes, threads, m, measure_rows_fn, calibrator) -> dict:
    """After the one-row kernels (whose measurement waits for a preload): the prefill crossovers."""
    from .kernel_select_rows import choose_rows

    choose_rows(shapes, threads, m, measure_rows_fn, calibrator)
    return report()


def _pick(avail, per: dict) -> str:
    """The fastest kernel, except that the preferred one (first of ``KERNELS``) keeps its place unless
    another beats it by ``MARGIN``."""
    fastest = max(avail, key=lambda kn: (per[kn], -KERNELS.index(kn)))
    pref = next((kn for kn in KERNELS if kn in avail), fastest)
    return fastest if per[fastest] > MARGIN * per[pref] else pref


def _known(threads: int):
    return [(n, k) for (n, k, t) in K.CHOICE if t == threads]


def _set(n: int, k: int, t: int, kern: str, per: dict, how: str) -> None:
    K.CHOICE[(n, k, t)] = kern
    K.CHOICE_EPOCH += 1
    _report[_name(n, k, t)] = {"kernel": kern, "gbps": {kn: round(v / 1e9, 3) for kn, v in per.items()}, "how": how}


def kernel_for(n: int, k: int, threads: int) -> str:
    """The kernel for one shape (chosen now if it has not been): ``kernels.linear``'s fallback."""
    choose([(n, k)], threads)
    return K.CHOICE.get((n, k, threads), "torch")


def model_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Distinct (out, in) of the model's bf16 ``layers.Linear`` weights (attention, shared expert, dense
    MLPs, lm_head); ``load`` adds the routed experts' (``WeightSource.expert_shapes``); any other shape
    is chosen on first use."""
    from .layers import Linear

    return sorted({tuple(mod.weight.shape) for mod in model.modules()
                   if isinstance(mod, Linear) and mod.weight.dtype is torch.bfloat16 and mod.weight.dim() == 2})


def report(used: bool = True) -> dict:
    """What the stats say: mode, the cache file, seconds spent choosing, and per shape (``OUTxIN@threads``,
    every shape chosen in this process) the kernel and the GB/s measured for each candidate. ``used=False``
    (a float32 run): says that no one-row kernel was chosen, torch ran everything."""
    if not used:
        return {"mode": "unused", "note": "one-row kernels serve bf16 runs only; torch ran everything",
                "file": None, "seconds": 0.0, "measured_shapes": 0, "shapes": {}}
    from .kernel_select_rows import _report as rows_report

    with _lock:
        return {"mode": _state["mode"] or mode(), "file": _state["file"], "seconds": round(_state["seconds"], 4),
                "measured_shapes": _state["measured_shapes"], "shapes": {k: dict(v) for k, v in _report.items()},
                "rows": {k: dict(v) for k, v in rows_report.items()}}


def line(rep: dict | None = None) -> str:
    """One line of :func:`report`: ``kernels (auto): 512x1024@2 numba (numba 31.6, torch 21.4 GB/s), ...``."""
    rep = rep if rep is not None else report()
    parts = []
    for name, v in rep.get("shapes", {}).items():
        g = ", ".join(f"{k} {x:.1f}" for k, x in v.get("gbps", {}).items())
        parts.append(f"{name} {v.get('kernel')}" + (f" ({g} GB/s)" if g else f" ({v.get('how')})"))
    from .kernel_select_rows import line_part

    rows = line_part(rep.get("rows", {}))
    return (f"kernels ({rep.get('mode')}): " + ("; ".join(parts) or rep.get("note") or "none chosen")
            + (f" | prefill by rows (multi-row kernel up to, then the kernel from): {rows}" if rows else ""))


def reset() -> None:
    """Forget this process's choices (tests; a changed ``ZIPMOE_KERNEL``)."""
    with _lock:
        K.CHOICE.clear()
        K.CHOICE_EPOCH += 1
        K.ROWS_UPTO.clear()
        _report.clear()
        from .kernel_select_rows import reset as rows_reset

        rows_reset()
        _state.update(mode=None, seconds=0.0, file=None, measured_shapes=0)
