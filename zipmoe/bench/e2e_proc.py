"""Processes of ``zipmoe bench e2e``: memory cgroups, memory and I/O readings, warm-up, cold files.

Shared by the parent (``zipmoe.bench.e2e``) and the child it runs per system (``e2e_child``).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

CAP_SLACK = 128 << 20  # activations, allocator and library working memory allowed above the budget
MIB = 1 << 20


# -- memory cgroups ------------------------------------------------------------------------------


class MemCap:
    """A child memory cgroup under this process's own (v1 or v2); ``None`` from ``create`` if impossible."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @staticmethod
    def parent() -> tuple[Path | None, int, str]:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError as e:
            return None, 0, f"cannot read /proc/self/cgroup ({e})"
        for line in lines:
            _, ctrls, rel = line.split(":", 2)
            if "memory" in ctrls.split(","):
                p = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
                if (p / "memory.limit_in_bytes").exists():
                    return p, 1, ""
        for line in lines:
            _, ctrls, rel = line.split(":", 2)
            if ctrls == "":
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    p = root / rel.lstrip("/")
                    try:
                        if "memory" in (p / "cgroup.subtree_control").read_text().split():
                            return p, 2, ""
                    except OSError:
                        continue
        return None, 0, "no writable memory cgroup (v1 memory controller or v2 with memory delegated)"

    @classmethod
    def create(cls, name: str) -> tuple["MemCap | None", str]:
        parent, version, why = cls.parent()
        if parent is None:
            return None, why
        path = parent / name
        try:
            path.mkdir()
        except OSError as e:
            return None, f"cannot create {path} ({e.strerror})"
        return cls(path, version), ""

    def limit_file(self) -> Path:
        return self.path / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")

    def stats(self) -> dict:
        def rd(name):
            try:
                return int((self.path / name).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None

        if self.version == 1:
            return {"cap_peak_bytes": rd("memory.max_usage_in_bytes"), "cap_failcnt": rd("memory.failcnt")}
        return {"cap_peak_bytes": rd("memory.peak"), "cap_failcnt": None}

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        log.warning("could not remove cgroup %s", self.path)


def join_cap(path: str, version: int, limit: int) -> None:
    """Set the cap's limit and move this process into it (called by the child)."""
    p = Path(path)
    (p / ("memory.limit_in_bytes" if version == 1 else "memory.max")).write_text(str(int(limit)))
    (p / "cgroup.procs").write_text(str(os.getpid()))


# -- helpers shared by parent and child ------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_anon() -> int:
    """Anonymous resident bytes (heap, tensors, buffers): what a process brings into a cap it joins
    late. File-backed pages (libraries, mapped weights) are left out."""
    return _status("RssAnon") or _rss()


def _trim_heap() -> None:
    """Give freed heap memory back to the kernel, so memory reused after joining a cap is charged to it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _io_read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def warm_up_runtime(threads: int) -> None:
    """Everything the runtime loads lazily on first use, so ``base`` RSS includes it: the numba
    kernels, torch's bf16 linear and the first meta-device module (which imports ~800 modules,
    ~70 MiB)."""
    import torch

    from formats import huf4x
    from formats.planes import warm_up

    torch.set_num_threads(threads)
    warm_up()
    huf4x.warm_up()
    one = torch.ones(1, 64, dtype=torch.bfloat16)
    torch.nn.functional.linear(one, torch.ones(64, 64, dtype=torch.bfloat16))
    try:
        from zipmoe_run.layers import linear  # the one-row decode kernel, where this build has it

        linear(one, torch.ones(64, 64, dtype=torch.bfloat16))
    except ImportError:
        pass
    with torch.device("meta"):
        torch.nn.Embedding(4, 4)
    torch.set_num_threads(threads)  # numba's OpenMP layer, started by the first kernel call, resets it


def _cap_stat(a: dict) -> dict | None:
    """rss / cache / mapped_file of the cap at the end of the run (cgroup v1 memory.stat)."""
    if not a.get("cap_path") or a.get("cap_version") != 1:
        return None
    try:
        kv = dict(line.split() for line in (Path(a["cap_path"]) / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return {k: int(kv[k]) for k in ("rss", "cache", "mapped_file", "max_usage_in_bytes") if k in kv} or None


def kv_cache_bytes(cfg: dict, batch: int, max_len: int, itemsize: int = 2) -> int:
    """Bytes of a standard attention KV cache (keys and values, every layer) for ``cfg``. Encoder-decoders
    (``d_kv``): the decoder's self-attention and cross-attention caches, both counted at ``max_len``
    (an upper bound: the cross cache holds the prompt only)."""
    if cfg.get("is_encoder_decoder") or "d_kv" in cfg:
        layers = cfg.get("num_decoder_layers") or cfg.get("num_layers") or 0
        return 2 * 2 * layers * batch * cfg.get("num_heads", 1) * cfg.get("d_kv", 64) * max_len * itemsize
    layers = cfg.get("num_hidden_layers") or cfg.get("num_layers") or 0
    heads = cfg.get("num_attention_heads") or 1
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads)
    return 2 * layers * batch * kv * hd * max_len * itemsize


def prompt_ids(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % max(2, vocab - 3) + 3 for i in range(n)]


def _drop(paths) -> None:
    from zipmoe_run.store.io import drop_page_cache

    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()] if p.is_dir() else []
        for f in files:
            try:
                drop_page_cache(f)
            except OSError as e:
                log.debug("drop cache %s: %s", f, e)


def machine_info(compute_threads: int, load_at_start: tuple[float, ...] | None) -> dict:
    """The machine a result came from, with the load it ran under (``os.getloadavg`` at the start and
    the end: another job on the same cores skews every timing, and the note says so)."""
    import os
    import platform

    end = os.getloadavg() if hasattr(os, "getloadavg") else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = max((load_at_start or (0.0,))[0], (end or (0.0,))[0])
    note = (f"1-min load average {load_at_start[0]:.1f} at start, {end[0]:.1f} at end on {cores} cores"
            if load_at_start and end else "load average not available")
    if busy > 1.5 * (cores or 1):
        note += ": other jobs shared the cores, timings are noisy"
    return {"cpus": cores, "compute_threads": compute_threads, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_start": load_at_start, "load_average_end": end,
            "note": note}
