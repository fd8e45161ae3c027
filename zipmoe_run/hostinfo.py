"""What host this is: CPU model, the instruction-set flags the kernels and codecs care about, usable
cores, page size. One helper for the runtime's stats, the self-calibration's cache key and the host
line every benchmark prints. Nothing is assumed: what cannot be read is reported as unknown.

``host_info()`` -> dict; ``host_line(info, calibration)`` -> one line of text (no printing here).
"""
from __future__ import annotations

import functools
import os
import platform

__all__ = ["ISA_FLAGS", "host_info", "host_line", "usable_cores", "largest_cache_bytes", "CODEGEN_ENV", "codegen_env"]

#: settings that change what numba and torch compile to (an emulated instruction set): part of the keys of
#: every cached measurement of compiled code (the kernel choices, the decoder's speeds)
CODEGEN_ENV = ("ATEN_CPU_CAPABILITY", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_OPT")


def codegen_env() -> dict:
    """The ``CODEGEN_ENV`` settings present in the environment (empty for a native run)."""
    return {k: os.environ[k] for k in CODEGEN_ENV if os.environ.get(k)}

#: flags reported (x86 /proc/cpuinfo ``flags``, Arm ``Features``), in this order, when present
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "neon", "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm")


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpuinfo(text: str) -> tuple[str, list[str]]:
    model, flags = "", set()
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if not model and k in ("model name", "hardware", "cpu model", "processor") and not v.strip().isdigit():
            model = v.strip()
        elif k in ("flags", "features"):
            flags.update(v.split())
    return model, [f for f in ISA_FLAGS if f in flags]


def _size(text: str) -> int:
    """A sysfs cache size ("32768K", "1M", "512") in bytes; 0 where it cannot be read."""
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        return 0


@functools.lru_cache(maxsize=4)
def largest_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The size of the largest data or unified CPU cache (Linux sysfs); 0 where it cannot be read."""
    best = 0
    try:
        entries = os.listdir(root)
    except OSError:
        return 0
    for name in entries:
        if not name.startswith("index"):
            continue
        try:
            with open(os.path.join(root, name, "type"), encoding="ascii") as f:
                kind = f.read().strip()
            with open(os.path.join(root, name, "size"), encoding="ascii") as f:
                size = _size(f.read())
        except OSError:
            continue
        if kind in ("Data", "Unified"):
            best = max(best, size)
    return best


def _page_size() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


@functools.lru_cache(maxsize=1)
def _host_info(cpuinfo_path: str) -> tuple:
    model, flags = "", []
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            model, flags = _cpuinfo(f.read())
    except OSError:
        pass
    return (model or platform.processor() or "unknown CPU", tuple(flags), platform.machine() or "unknown",
            platform.system() or "unknown")


def host_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """``{"cpu", "isa", "machine", "system", "cores", "page_bytes", "huge_page_bytes"}`` of this host
    (``isa`` lists the flags of :data:`ISA_FLAGS` the CPU reports, empty where they cannot be read;
    ``huge_page_bytes`` the transparent huge page the kernel offers, 0 for none; ``huge_pages`` the
    store's verdict on them, ``store.hugepages.report()``, once made)."""
    from .store import hugepages
    from .store.buffers import HUGE

    cpu, isa, machine, system = _host_info(cpuinfo_path)
    out = {"cpu": cpu, "isa": list(isa), "machine": machine, "system": system, "cores": usable_cores(),
           "page_bytes": _page_size(), "huge_page_bytes": HUGE}
    hv = hugepages.report()  # the store's decision, once made in this process (never made here)
    if hv is not None:
        out["huge_pages"] = hv
    return out


def _gb(v) -> str:
    return f"{v / 1e9:.2f}" if isinstance(v, (int, float)) else "?"


def host_line(info: dict | None = None, calibration: dict | None = None) -> str:
    """``host: <cpu> | <isa> | N cores | page P | disk X GB/s (method) | decode Y GB/s 1T, Z GB/s nT (source)``.

    ``calibration`` is a ``CostModel.to_json()`` dict (``disk_bps``, ``decode_bps_per_core``,
    ``decode_bps``, ``cores``, ``read_method``, ``source``)."""
    h = info if info is not None else host_info()
    parts = [f"host: {h.get('cpu', '?')}", " ".join(h.get("isa") or ["no ISA flags read"]),
             f"{h.get('cores', '?')} cores", f"page {h.get('page_bytes') or '?'}"]
    if "huge_page_bytes" in h:  # transparent huge pages the kernel offers, and the store's verdict
        hp = h["huge_page_bytes"]
        parts[-1] += f", huge {hp >> 20} MiB" if hp and hp % (1 << 20) == 0 else f", huge {hp}" if hp else ", huge none"
        hv = h.get("huge_pages")
        if hp and hv:
            m = hv.get("measured") or {}
            why = (f"{hv.get('how')}: fault {m['huge_ms_per_mib']:.2f} vs {m['small_ms_per_mib']:.2f} ms/MiB"
                   if "huge_ms_per_mib" in m else hv.get("how"))
            parts[-1] += f" {'used' if hv.get('use') else 'not used'} ({why})"
    if calibration:
        c = calibration
        parts.append(f"disk {_gb(c.get('disk_bps'))} GB/s ({c.get('read_method', '?')})")
        plan = (c.get("extra") or {}).get("cores")
        beside = " beside compute" if isinstance(plan, dict) and "beside compute" in str(plan.get("why", "")) else ""
        parts.append(f"decode {_gb(c.get('decode_bps_per_core'))} GB/s 1T, {_gb(c.get('decode_bps'))} GB/s "
                     f"{c.get('cores', '?')}T{beside}")  # the planned rate: contended where so measured
        if isinstance(plan, dict):  # the core budget chosen from these rates (zipmoe_run.cores)
            parts.append(f"core budget: {plan.get('decode_threads', '?')} decoder thread(s), "
                         f"{plan.get('read_depth', '?')} read(s) in flight")
        parts.append(f"calibration: {c.get('source', '?')}")
    return " | ".join(parts)
