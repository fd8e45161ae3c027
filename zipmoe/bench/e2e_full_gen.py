"""The full-depth checkpoint of ``zipmoe bench e2e --depth full`` (``zipmoe.bench.e2e_full``): its description
from the real config and index, the disk space each step needs, and a fast writer.

Values are N(0, 0.02) in BF16 but generated fast (:func:`write_checkpoint`): one pool of ``POOL_ELEMENTS``
Gaussian BF16 values per seed (round to nearest even, like ``zipmoe_pack.synth``), and every 1 Mi-element
chunk of a large N(0, 0.02) tensor is a slice of the pool at its own offset
``(g * OFFSET_STEP + base) mod (POOL_ELEMENTS - CHUNK)`` (``g`` counts chunks over the whole checkpoint).
Each chunk is therefore a contiguous run of iid Gaussian values (its exponent statistics are Gaussian), and
no two chunks of the first ``POOL_ELEMENTS - CHUNK`` (about 33 million, far more than the 14,730 of the real
checkpoint) start at the same pool offset, so no chunk repeats another byte for byte. Small tensors and
those with another distribution (norms: 1 + N(0, 0.05); routers: the generator's peaky std) come from
``zipmoe_pack.synth``'s per-tensor seeded generator. Shards are written with the real index's file names
and tensor assignment, tensors in the index's order (a hub shard's: by name), and synced and dropped from
the page cache every GiB.

Library code: logs, never prints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import BenchInputError

__all__ = ["FULL_SOURCE", "POOL_ELEMENTS", "CHUNK", "WORK_BYTES", "full_spec", "disk_need", "free_space",
           "write_checkpoint"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
FULL_SOURCE = REPO.parent / "shared" / "models" / "qwen1.5-moe-a2.7b-chat"
POOL_ELEMENTS = 1 << 25  # 32 Mi BF16 values (64 MiB)
CHUNK = 1 << 20  # elements per written chunk (the packer's default chunk)
OFFSET_STEP = 1_000_003  # prime, coprime to POOL_ELEMENTS - CHUNK = 31 * 2**20: offsets distinct over a window
WORK_BYTES = 2 << 30  # working space on top of source and archive (temporary files, logs, plan files)
ARCHIVE_RATIO_BOUND = 0.68  # routed experts' archive bytes / BF16 bytes, with margin (measured 0.663 on N(0, 0.02))
GENERATOR_VERSION = 1
WEIGHT_STD = 0.02


# -- the checkpoint's description ----------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    from formats.jsonstrict import JSONRejected, loads

    try:
        obj = loads(path.read_bytes())
    except FileNotFoundError:
        raise BenchInputError(f"{path}: missing (--depth full needs the real config and index)") from None
    except (OSError, JSONRejected) as e:
        raise BenchInputError(f"{path}: cannot read ({e})") from None
    if not isinstance(obj, dict):
        raise BenchInputError(f"{path}: not a JSON object")
    return obj


def full_spec(source: Path, scale: float = 1.0, seed: int = 0, family: str = "qwen2_moe",
              layers: int | None = None) -> dict:
    """The checkpoint to generate: ``{"config", "shards": [(file, [TensorSpec])], "files": [names to copy],
    "source_bytes", "expert_bytes", "dense_bytes", "key"}``. ``scale`` < 1 shrinks every dimension but the
    vocabulary (``zipmoe_pack.synth``'s rule; tests), 1 is the exact config. ``family`` ``olmoe``: OLMoE-1B-7B's
    dims with ``source``'s tokenizer (``zipmoe.bench.e2e_full_olmoe``; ``layers`` caps its depth, tests)."""
    from zipmoe_pack.synth import _scale_config
    from zipmoe_pack.synth_families import tensor_specs

    if family == "olmoe":
        from .e2e_full_olmoe import olmoe_spec

        return olmoe_spec(Path(source), scale, seed, layers)
    if family != "qwen2_moe":
        raise BenchInputError(f"--depth full builds qwen2_moe or olmoe, not {family!r}")
    source = Path(source)
    cfg = _read_json(source / "config.json")
    index = _read_json(source / "model.safetensors.index.json")
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise BenchInputError(f"{source}/model.safetensors.index.json: no weight_map")
    if cfg.get("model_type") != "qwen2_moe":
        raise BenchInputError(f"{source}/config.json: model_type {cfg.get('model_type')!r}, --depth full builds qwen2_moe")
    if not 0 < scale <= 1:
        raise BenchInputError(f"full-depth scale must be in (0, 1], not {scale}")
    new_cfg = cfg if scale == 1 else _scale_config("qwen2_moe", cfg, scale, None)
    specs = {s.name: s for s in tensor_specs("qwen2_moe", new_cfg, layout="per-expert", dtype="bfloat16")}
    unknown = [n for n in wmap if n not in specs]
    missing = [n for n in specs if n not in wmap]
    if unknown or missing:
        raise BenchInputError(f"{source}: index and config disagree: {len(unknown)} unexpected tensors "
                              f"(e.g. {unknown[:2]}), {len(missing)} missing (e.g. {missing[:2]})")
    shards: dict[str, list] = {}
    for n in wmap:  # the index's order per shard (the generator of zipmoe_pack.synth.make_from_index)
        shards.setdefault(wmap[n], []).append(specs[n])
    nbytes = {n: s.numel * 2 for n, s in specs.items()}
    expert = sum(b for n, b in nbytes.items() if ".experts." in n)
    files = sorted(f.name for f in source.iterdir() if f.is_file() and f.name not in
                   ("config.json", "model.safetensors.index.json") and not f.name.endswith(".safetensors"))
    key = {"config": new_cfg, "seed": seed, "scale": scale, "generator": GENERATOR_VERSION,
           "shards": {f: len(v) for f, v in shards.items()}}
    return {"config": new_cfg, "shards": sorted(shards.items()), "files": files, "source": str(source),
            "source_bytes": sum(nbytes.values()), "expert_bytes": expert, "dense_bytes": sum(nbytes.values()) - expert,
            "key": key}


def disk_need(spec: dict, have_source: bool, have_archive: bool, gguf: int = 0) -> dict:
    """Bytes each remaining step needs on the work folder's file system (``gguf``: the llama.cpp GGUF's,
    0 when it is not wanted or already there)."""
    src = 0 if have_source else spec["source_bytes"] + (1 << 20) * len(spec["shards"])  # + headers
    arc = 0 if have_archive else int(spec["expert_bytes"] * ARCHIVE_RATIO_BOUND) + spec["dense_bytes"] + (64 << 20)
    return {"source": src, "archive": arc, "gguf": gguf, "work": WORK_BYTES, "total": src + arc + gguf + WORK_BYTES}


def free_space(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- fast generation --------------------------------------------------------------------------------


def _pool(seed: int) -> np.ndarray:
    """POOL_ELEMENTS N(0, 0.02) values as BF16 bits (round to nearest even), from a seeded PCG64."""
    from zipmoe_pack.synth import _encode

    rng = np.random.Generator(np.random.PCG64([int(seed), 0x5EED]))
    x = rng.standard_normal(POOL_ELEMENTS, dtype=np.float32)
    x *= np.float32(WEIGHT_STD)
    return _encode(x, "bfloat16")


def _pooled(spec) -> bool:
    return spec.dtype == "bfloat16" and spec.std == WEIGHT_STD and not spec.mean and spec.numel >= CHUNK


class _Offsets:
    """Pool offsets of successive chunks: distinct for the first POOL_ELEMENTS - CHUNK chunks."""

    def __init__(self, seed: int):
        self.span = POOL_ELEMENTS - CHUNK
        self.base = int.from_bytes(hashlib.sha256(f"pool/{seed}".encode()).digest()[:8], "little") % self.span
        self.g = 0

    def next(self) -> int:
        off = (self.g * OFFSET_STEP + self.base) % self.span
        self.g += 1
        return off


def _write_shard(path: Path, specs: list, seed: int, pool: np.ndarray, offs: _Offsets) -> int:
    """One safetensors shard (header as zipmoe_pack.synth writes it); returns its size."""
    from zipmoe_pack.synth import _ST_DTYPE, _tensor_chunks

    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in specs:
        n = s.numel * 2
        header[s.name] = {"dtype": _ST_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        written = 0
        for s in specs:
            if _pooled(s):
                for start in range(0, s.numel, CHUNK):
                    m = min(CHUNK, s.numel - start)
                    o = offs.next()
                    f.write(pool[o:o + m].data)  # [m] bf16 bits, a slice of the pool
            else:
                for chunk in _tensor_chunks(s, seed):
                    f.write(chunk.data)
            written += s.numel * 2
            if written >= 1 << 30:  # keep the page cache from filling with a 28 GB write
                f.flush()
                os.fdatasync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                written = 0
        f.flush()
        os.fdatasync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.tell()


def write_checkpoint(spec: dict, out: Path, seed: int = 0) -> dict:
    """Write ``spec`` (``full_spec``) into ``out`` (absent or empty; built in a sibling folder and moved into
    place); returns ``{"bytes", "seconds", "mb_s"}``."""
    from zipmoe_pack.synth import _staging, _write_json

    t0 = time.perf_counter()
    pool = _pool(seed)
    offs = _Offsets(seed)
    total = 0
    with _staging(out) as tmp:
        _write_json(tmp / "config.json", spec["config"])
        wmap, size = {}, 0
        for fname, specs in spec["shards"]:
            total += _write_shard(tmp / fname, specs, seed, pool, offs)
            size += sum(s.numel * 2 for s in specs)
            wmap.update({s.name: fname for s in specs})
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(wmap.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in spec["files"]:
            shutil.copyfile(Path(spec["source"]) / name, tmp / name)
    dt = time.perf_counter() - t0
    log.info("%s: generated %.2f GB in %.1f s (%.0f MB/s), %d pooled chunks", out, total / 1e9, dt,
             total / dt / 1e6, offs.g)
    return {"bytes": total, "seconds": dt, "mb_s": total / dt / 1e6, "pooled_chunks": offs.g}
