"""Tiny but real Hugging Face MoE checkpoints, generated offline and deterministically from a seed.

The directories look like hub downloads: ``config.json`` + ``generation_config.json``, sharded
``model-0000K-of-0000N.safetensors`` with ``model.safetensors.index.json`` (or one ``model.safetensors``),
and a small trained tokenizer. Hugging Face transformers 5 loads them with no missing or unexpected keys.

* :func:`make_checkpoint` - one of :data:`FAMILIES` at tiny (or, through ``dims``, real) sizes, per-expert
  (hub) or fused (transformers-5 state_dict) expert layout. Tensors are written one at a time, so real
  expert dimensions (e.g. Qwen1.5-MoE's, ~2 GB for 2 layers) need only one tensor's worth of memory.
* :func:`make_from_index` - the exact tensor names, shard assignment, per-shard order and shard file names
  of a real checkpoint (its ``config.json`` + ``model.safetensors.index.json``) at scaled-down sizes.
* :func:`demo_checkpoint` - a qwen2_moe model big enough for meaningful compression ratios.

Every tensor's values come from a generator seeded by (seed, tensor name); fused expert tensors are built
from the per-expert names, so both layouts of one seed hold the same numbers. Shards hold tensors in module
order (not sorted), and with ``straddle`` shard boundaries fall between two experts of one layer.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import struct
import sys
import time

import numpy as np

from zipmoe_pack.synth_families import (FAMILIES, TensorSpec, check_config, dim_keys, template, tensor_specs,
                                        token_ids)

__all__ = ["FAMILIES", "make_checkpoint", "make_from_index", "demo_checkpoint", "build_config", "DEMO_SIZES"]

log = logging.getLogger(__name__)

_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
_CHUNK = 1 << 22  # elements generated per step

DEMO_SIZES = {
    # ~10 MB of experts: quick end-to-end runs
    "small": {"hidden": 256, "moe_intermediate": 256, "experts": 16, "top_k": 4, "layers": 4, "heads": 4,
              "kv_heads": 4, "intermediate": 512, "shared_intermediate": 512, "vocab": 1024},
    # ~150 MB of experts: compression ratios and memory budgets mean something
    "demo": {"hidden": 512, "moe_intermediate": 512, "experts": 16, "top_k": 4, "layers": 6, "heads": 8,
             "kv_heads": 8, "intermediate": 1024, "shared_intermediate": 1024, "vocab": 2048},
    # Qwen1.5-MoE-A2.7B's real expert dimensions, 2 layers (~2 GB of experts)
    "qwen1.5": {"hidden": 2048, "moe_intermediate": 1408, "experts": 60, "top_k": 4, "layers": 2, "heads": 16,
                "kv_heads": 16, "intermediate": 5632, "shared_intermediate": 5632, "vocab": 4096},
}


# ----------------------------------------------------------------------------------------------- values
def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:16], "little")


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return x.astype("<f4", copy=False)
    if dtype == "float16":
        return x.astype("<f2")
    u = x.view(np.uint32)  # bfloat16: round to nearest even on the top 16 bits
    u += 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype("<u2")


def _tensor_chunks(spec: TensorSpec, seed: int):
    for seed_name, shape in spec.pieces():
        rng = np.random.Generator(np.random.PCG64(_name_seed(seed, seed_name)))
        n = int(np.prod(shape))
        for start in range(0, n, _CHUNK):
            x = rng.standard_normal(min(_CHUNK, n - start), dtype=np.float32)
            x *= np.float32(spec.std)
            if spec.mean:
                x += np.float32(spec.mean)
            yield _encode(x, spec.dtype)


def _nbytes(spec: TensorSpec) -> int:
    return spec.numel * _ITEMSIZE[spec.dtype]


def _write_safetensors(path: pathlib.Path, specs: list[TensorSpec], seed: int) -> None:
    """Header entries and data in the given order; header padded with spaces to 8 bytes, like HF files."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in specs:
        header[s.name] = {"dtype": _ST_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + _nbytes(s)]}
        off += _nbytes(s)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for s in specs:
            for chunk in _tensor_chunks(s, seed):
                f.write(chunk.data)


# ---------------------------------------------------------------------------------------------- sharding
def _plan_cuts(specs: list[TensorSpec], shards: int, straddle: bool) -> list[int]:
    """Indices where shards 2..N start, each nearest to an equal byte split. With ``straddle`` cuts fall
    between two experts of one layer wherever enough such places remain (at least one always does);
    without it, never inside a layer's experts."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, not {shards}")
    cum = np.cumsum([0] + [_nbytes(s) for s in specs])

    def splits_group(i):
        a, b = specs[i - 1], specs[i]
        return a.group is not None and a.group == b.group and (a.expert is None or a.expert != b.expert)

    def inside_group(i):
        return specs[i - 1].group is not None and specs[i - 1].group == specs[i].group

    bounds = range(1, len(specs))
    allowed = list(bounds) if straddle else [i for i in bounds if not inside_group(i)]
    preferred = [i for i in bounds if splits_group(i)] if straddle else allowed
    cuts: list[int] = []
    for k in range(1, shards):
        left = shards - 1 - k  # cuts still needed after this one

        def ok(c):  # after the previous cut, with enough allowed places left for the cuts after it
            return c > (cuts[-1] if cuts else 0) and len(allowed) - bisect.bisect_right(allowed, c) >= left

        pool = [c for c in preferred if ok(c)] or [c for c in allowed if ok(c)]
        if not pool:
            raise ValueError(f"cannot cut {len(specs)} tensors into {shards} shards with straddle={straddle}")
        target = cum[-1] * k / shards
        cuts.append(min(pool, key=lambda c: (abs(cum[c] - target), c)))
    if straddle and cuts and not any(splits_group(c) for c in cuts):
        raise ValueError("straddle=True but no layer has two experts to split between shards")
    return cuts


def _write_weights(out: pathlib.Path, shard_lists: list[tuple[str, list[TensorSpec]]], seed: int) -> None:
    for fname, specs in shard_lists:
        _write_safetensors(out / fname, specs, seed)
    if len(shard_lists) == 1 and shard_lists[0][0] == "model.safetensors":
        return
    wmap = {s.name: fname for fname, specs in shard_lists for s in specs}
    total = sum(_nbytes(s) for _, specs in shard_lists for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def _staging(out_dir):
    """Build in a sibling temp dir and move it into place at the end: no partial checkpoint on failure."""
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.synth-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------- configs
def _parse_value(v):
    if isinstance(v, str):
        if v.lower() in ("none", "null"):
            return None
        for conv in (int, float):
            with contextlib.suppress(ValueError):
                return conv(v)
    return v


def build_config(family: str, *, dims: dict | None = None, dtype: str = "bfloat16",
                 config_overrides: dict | None = None) -> dict:
    """The config.json dict :func:`make_checkpoint` writes (template, then ``dims``, then overrides)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if dtype not in _ST_DTYPE:
        raise ValueError(f"dtype must be one of {', '.join(_ST_DTYPE)}, not {dtype!r}")
    cfg = template(family)
    keys = dim_keys(family)
    for k, v in (dims or {}).items():
        if k not in keys:
            raise ValueError(f"unknown dims key {k!r} for {family}; known: {', '.join(sorted(keys))}")
        if family == "switch_transformers" and k == "top_k" and v != 1:
            raise ValueError("switch_transformers routes top-1 only")
        for ck in keys[k]:
            cfg[ck] = _parse_value(v)
    if family == "switch_transformers" and "layers" in (dims or {}) and "sparse_layers" not in dims:
        cfg["num_sparse_encoder_layers"] = cfg["num_sparse_decoder_layers"] = cfg["num_layers"] // 2
    cfg.update(config_overrides or {})
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = dtype
    check_config(family, cfg)
    return cfg


def _generation_config(family: str, cfg: dict) -> dict:
    ids = token_ids(family)
    if family == "switch_transformers":
        return {"_from_model_config": True, "decoder_start_token_id": ids["pad"], "eos_token_id": ids["eos"],
                "pad_token_id": ids["pad"], "transformers_version": "4.27.0.dev0"}
    gen = {"bos_token_id": ids["bos"] if ids["bos"] is not None else ids["pad"], "eos_token_id": ids["eos"]}
    if ids["pad"] is not None:
        gen["pad_token_id"] = ids["pad"]
    return {**gen, "transformers_version": cfg.get("transformers_version", "4.46.3")}


# -------------------------------------------------------------------------------------------- public API
def make_checkpoint(out_dir, family, *, layout="per-expert", shards=3, seed=0, dims=None, peaky_router=True,
                    tokenizer=True, straddle=True, dtype="bfloat16", config_overrides=None) -> pathlib.Path:
    """Write a tiny ``family`` checkpoint into ``out_dir`` (absent or empty) and return its path.

    ``dims`` sets sizes by friendly names (hidden, intermediate, moe_intermediate, experts, top_k, layers,
    vocab, heads, kv_heads, head_dim, ...; see ``synth_families.dim_keys``); ``config_overrides`` sets raw
    config.json keys last (e.g. ``{"q_lora_rank": None}`` or ``{"mlp_only_layers": [1]}``).
    """
    t0 = time.perf_counter()
    cfg = build_config(family, dims=dims, dtype=dtype, config_overrides=config_overrides)
    specs = tensor_specs(family, cfg, layout=layout, dtype=dtype, peaky_router=peaky_router)
    if shards == 1:
        shard_lists = [("model.safetensors", specs)]
    else:
        cuts = [0, *_plan_cuts(specs, shards, straddle), len(specs)]
        shard_lists = [(f"model-{k + 1:05d}-of-{shards:05d}.safetensors", specs[a:b])
                       for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    out = pathlib.Path(out_dir)
    with _staging(out) as tmp:
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", _generation_config(family, cfg))
        _write_weights(tmp, shard_lists, seed)
        if tokenizer:
            from zipmoe_pack.synth_tokenizer import write_tokenizer

            write_tokenizer(tmp, family, cfg["vocab_size"])
    log.info("%s: %s %s checkpoint, %d tensors, %.1f MB in %d file(s), %.2f s", out, family, layout, len(specs),
             sum(map(_nbytes, specs)) / 1e6, len(shard_lists), time.perf_counter() - t0)
    return out


_DIM_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
               "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim", "d_model", "d_ff", "d_kv")
_EVEN_FIELDS = ("head_dim", "qk_rope_head_dim")  # rotary dimensions must stay even
_LAYER_RE = re.compile(r"(?:^model\.layers|^(?:encoder|decoder)\.block)\.(\d+)\.")


def _scale_config(family: str, cfg: dict, scale: float, max_layers: int | None) -> dict:
    out = dict(cfg)

    def sc(v, even=False):
        return max(2, 2 * round(v * scale / 2)) if even else max(1, round(v * scale))

    for k in _DIM_FIELDS + _EVEN_FIELDS:
        if isinstance(out.get(k), int):
            out[k] = sc(out[k], k in _EVEN_FIELDS)
    if family != "switch_transformers" and "head_dim" not in cfg:  # keep hidden = heads x head_dim, even
        nh = cfg["num_attention_heads"]
        out["hidden_size"] = nh * sc(cfg["hidden_size"] // nh, family not in ("deepseek_v2", "deepseek_v3"))
    if max_layers is not None:
        if family == "switch_transformers":
            if max_layers < 2:
                raise ValueError("switch_transformers needs max_layers >= 2 to keep its dense/sparse pattern")
            for stack, n_key in (("encoder", "num_layers"), ("decoder", "num_decoder_layers")):
                n = cfg.get(n_key) or cfg["num_layers"]
                m = min(max_layers, n)
                step = n // (cfg[f"num_sparse_{stack}_layers"] or n)
                out[n_key] = m
                out[f"num_sparse_{stack}_layers"] = sum(1 for i in range(m) if i % step == 1 or step == 1)
                if f"{stack}_sparse_step" in out and out[f"num_sparse_{stack}_layers"]:
                    out[f"{stack}_sparse_step"] = m // out[f"num_sparse_{stack}_layers"]
        else:
            out["num_hidden_layers"] = min(max_layers, cfg["num_hidden_layers"])
    return out


def make_from_index(src_model_dir, out_dir, *, scale=1 / 32, seed=0, max_layers=None) -> pathlib.Path:
    """Rebuild a real checkpoint's layout (names, shard files, per-shard order) at ``scale`` of its sizes.

    Reads ``config.json`` and ``model.safetensors.index.json`` in ``src_model_dir`` (never modified). Tensor
    dimensions shrink by ``scale`` except the vocabulary, which stays real so that the tokenizer files,
    copied verbatim along with ``generation_config.json``, still fit. ``max_layers`` keeps the first layers
    (blocks of each stack for encoder-decoders) and drops the rest from the index; shards left empty are
    not written, the others keep their real file names.
    """
    from formats.errors import InputError

    t0 = time.perf_counter()
    src = pathlib.Path(src_model_dir)
    try:
        cfg = json.loads((src / "config.json").read_text())
        wmap = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{src}: cannot read config.json / model.safetensors.index.json ({e})") from None
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise InputError(f"{src}/config.json: model_type {family!r} is not one of {', '.join(FAMILIES)}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], not {scale}")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    layout = "fused" if any(".experts.gate_up_proj" in n for n in wmap) else "per-expert"
    new_cfg = _scale_config(family, cfg, scale, max_layers)
    specs = {s.name: s for s in tensor_specs(family, new_cfg, layout=layout, dtype=dtype)}

    def kept(name):
        m = _LAYER_RE.match(name)
        return max_layers is None or m is None or int(m.group(1)) < max_layers

    names = [n for n in wmap if kept(n)]
    unknown = [n for n in names if n not in specs]
    missing = [n for n, s in specs.items() if n not in wmap and s.parts is None]
    if unknown or missing:
        raise InputError(f"{src}: index and config disagree: {len(unknown)} unexpected tensors "
                         f"(e.g. {unknown[:2]}), {len(missing)} missing (e.g. {missing[:2]})")
    shard_lists: dict[str, list[TensorSpec]] = {}
    for n in names:
        shard_lists.setdefault(wmap[n], []).append(specs[n])
    out = pathlib.Path(out_dir)
    with _staging(out) as tmp:
        _write_json(tmp / "config.json", new_cfg)
        _write_weights(tmp, list(shard_lists.items()), seed)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json") \
                    and not f.name.endswith(".safetensors"):
                shutil.copyfile(f, tmp / f.name)
    log.info("%s: %s from %s, %d tensors in %d shard(s), %.2f s", out, family, src, len(names), len(shard_lists),
             time.perf_counter() - t0)
    return out


def demo_checkpoint(out_dir, size="demo") -> pathlib.Path:
    """A qwen2_moe checkpoint with a tokenizer; ``size`` is one of :data:`DEMO_SIZES`."""
    if size not in DEMO_SIZES:
        raise ValueError(f"size must be one of {', '.join(DEMO_SIZES)}, not {size!r}")
    return make_checkpoint(out_dir, "qwen2_moe", dims=DEMO_SIZES[size], shards=4)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zipmoe_pack.synth", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=(*FAMILIES, "demo", "from-index"),
                   help="a family, 'demo' (qwen2_moe, see --size) or 'from-index' (needs --src)")
    p.add_argument("out_dir", type=pathlib.Path, help="output directory (absent or empty)")
    p.add_argument("--layout", choices=("per-expert", "fused"), default="per-expert")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--dims", default="", help="k=v,... e.g. hidden=2048,moe_intermediate=1408,experts=60")
    p.add_argument("--set", default="", help="raw config.json overrides k=v,... (values parsed as int/float/none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(_ST_DTYPE), default="bfloat16")
    p.add_argument("--no-tokenizer", action="store_true")
    p.add_argument("--no-straddle", action="store_true")
    p.add_argument("--flat-router", action="store_true", help="plain std-0.02 routers (no peaky margins)")
    p.add_argument("--size", choices=tuple(DEMO_SIZES), default="demo", help="demo size")
    p.add_argument("--src", type=pathlib.Path, help="real model dir for from-index")
    p.add_argument("--scale", type=float, default=1 / 32)
    p.add_argument("--max-layers", type=int)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def kv(s):
        items = [x.split("=", 1) for x in s.split(",") if x.strip()]
        if any(len(i) != 2 for i in items):
            raise ValueError(f"expected k=v,... not {s!r}")
        return {k.strip(): _parse_value(v.strip()) for k, v in items}

    from formats.errors import ZmoeError

    try:
        if a.what == "demo":
            demo_checkpoint(a.out_dir, a.size)
        elif a.what == "from-index":
            if a.src is None:
                raise ValueError("from-index needs --src DIR")
            make_from_index(a.src, a.out_dir, scale=a.scale, seed=a.seed, max_layers=a.max_layers)
        else:
            make_checkpoint(a.out_dir, a.what, layout=a.layout, shards=a.shards, seed=a.seed, dims=kv(a.dims),
                            peaky_router=not a.flat_router, tokenizer=not a.no_tokenizer,
                            straddle=not a.no_straddle, dtype=a.dtype, config_overrides=kv(a.set))
    except (ValueError, OSError, ZmoeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TypeError, KeyError) as e:  # a --set value of the wrong type, or a config key removed
        print(f"error: invalid config: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
