"""``zipmoe bench e2e --depth full --family olmoe``: a full-depth model with OLMoE-1B-7B's dimensions, and
the llama.cpp step of the full-depth benchmark (``zipmoe.bench.e2e_full``).

The checkpoint: OLMoE-1B-7B-0924's ``config.json`` (:data:`OLMOE_CONFIG`, the transformers
``OlmoeForCausalLM`` layout: 16 layers, 64 routed experts of intermediate 1024, top-8, hidden 2048, 16
heads, q/k norms, no shared expert, untied embeddings; 12.9 GB of routed experts in BF16), except the
vocabulary: no OLMoE tokenizer is on this machine, so the tokenizer files (and ``vocab_size``, and the
bos/eos/pad ids) are those of the source folder (default: Qwen1.5-MoE-A2.7B's, 151,936 tokens instead of
OLMoE's 50,304: 0.4 GB more embedding and LM head, no expert changes). The source folder gives only its
tokenizer and those ids; it needs no weights. Shards: tensors in module order (embeddings, layers 0..N,
final norm, LM head) filled into shards of at most :data:`SHARD_BYTES` (``save_pretrained``'s 5 GB),
named ``model-0000i-of-0000N.safetensors``, tensors by name inside each shard (a hub shard's order).
Values: the generator of ``zipmoe.bench.e2e_full_gen``.

llama.cpp (:func:`prepare_llamacpp`): the BF16 GGUF of the generated checkpoint, written once into the
work folder (``zipmoe.bench.llamacpp.ensure_gguf``: reused while the source files are unchanged), its
export time, size and the free space after it, and llama.cpp's own fixed overhead for the cap (dense +
budget + overhead, as at depth 2). Library code: logs, never prints.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .errors import BenchInputError

__all__ = ["OLMOE_CONFIG", "SHARD_BYTES", "GGUF_MARGIN", "olmoe_spec", "prepare_llamacpp", "gguf_bytes"]

log = logging.getLogger(__name__)

# allenai/OLMoE-1B-7B-0924 config.json (transformers' OlmoeForCausalLM); vocab_size and the special ids are
# replaced by the tokenizer source's (module doc)
OLMOE_CONFIG = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304,
}
SHARD_BYTES = 5_000_000_000  # save_pretrained's default max_shard_size ("5GB")
GGUF_MARGIN = 256 << 20  # GGUF header, F32 norms and routers, alignment: on top of the source bytes


def olmoe_spec(source: Path, scale: float, seed: int, layers: int | None = None) -> dict:
    """``e2e_full_gen.full_spec``'s dict for the OLMoE-dims checkpoint (module doc); ``layers`` caps the
    depth (tests only)."""
    from zipmoe_pack.synth import _scale_config
    from zipmoe_pack.synth_families import tensor_specs

    from .e2e_full_gen import GENERATOR_VERSION, _read_json

    source = Path(source)
    tok = _read_json(source / "config.json")
    vocab = tok.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 0 < vocab < 1 << 24:
        raise BenchInputError(f"{source}/config.json: vocab_size {vocab!r} is not a vocabulary size")
    files = sorted(f.name for f in source.iterdir() if f.is_file() and f.name not in
                   ("config.json", "model.safetensors.index.json") and not f.name.endswith(".safetensors"))
    if not any(f in files for f in ("tokenizer.json", "vocab.json")):
        raise BenchInputError(f"{source}: no tokenizer.json or vocab.json (the OLMoE-dims model takes its "
                              "tokenizer from this folder)")
    cfg = dict(OLMOE_CONFIG, vocab_size=vocab)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg[k] = tok.get(k) if isinstance(tok.get(k), int) else None
    if cfg["pad_token_id"] is None:
        cfg["pad_token_id"] = cfg["bos_token_id"] if cfg["bos_token_id"] is not None else cfg["eos_token_id"]
    if not 0 < scale <= 1:
        raise BenchInputError(f"full-depth scale must be in (0, 1], not {scale}")
    if scale != 1 or layers is not None:
        cfg = _scale_config("olmoe", cfg, scale, layers)
    specs = tensor_specs("olmoe", cfg, layout="per-expert", dtype="bfloat16")  # module order
    n_shards, size = 1, 0
    assign: list[tuple[int, object]] = []
    for s in specs:
        b = s.numel * 2
        if size and size + b > SHARD_BYTES:
            n_shards, size = n_shards + 1, 0
        size += b
        assign.append((n_shards, s))
    shards = [(f"model-{i:05d}-of-{n_shards:05d}.safetensors",
               sorted((s for j, s in assign if j == i), key=lambda s: s.name)) for i in range(1, n_shards + 1)]
    nbytes = {s.name: s.numel * 2 for s in specs}
    expert = sum(b for n, b in nbytes.items() if ".experts." in n)
    key = {"config": cfg, "seed": seed, "scale": scale, "generator": GENERATOR_VERSION, "family": "olmoe",
           "tokenizer_source": str(source.resolve()), "shards": {f: len(v) for f, v in shards}}
    return {"config": cfg, "shards": shards, "files": files, "source": str(source),
            "source_bytes": sum(nbytes.values()), "expert_bytes": expert,
            "dense_bytes": sum(nbytes.values()) - expert, "key": key, "family": "olmoe",
            "vocab_note": f"vocabulary {vocab:,} from {source.name}'s tokenizer instead of OLMoE's 50,304 "
                          "(no OLMoE tokenizer on this machine)"}


def gguf_bytes(spec: dict) -> int:
    """Disk space the BF16 GGUF of ``spec``'s checkpoint needs (an upper bound)."""
    return spec["source_bytes"] + GGUF_MARGIN


def prepare_llamacpp(cfg, prep: dict, gguf_path: Path, free_bytes, probe: Path) -> dict:
    """The llama.cpp step: ``zipmoe.bench.llamacpp.e2e_prepare`` with the GGUF at ``gguf_path``, plus the
    export's time, size and the free space after it (``prep["steps"]["gguf"]``)."""
    from .llamacpp import e2e_prepare

    t0 = time.perf_counter()
    res = e2e_prepare(cfg, prep, gguf_path=gguf_path)
    if res.get("skipped"):
        prep["steps"]["gguf"] = {"skipped": res["skipped"]}
        return res
    exp = res["gguf"]
    size = Path(exp["path"]).stat().st_size
    made = {"seconds": exp.get("export_s"), "mb_s": size / exp["export_s"] / 1e6 if exp.get("export_s") else None}
    old = prep.get("manifest_data")
    if isinstance(old, dict) and prep.get("manifest"):  # the export's time, kept for the runs that reuse it
        if exp.get("reused") and isinstance(old.get("gguf"), dict):
            made = {k: old["gguf"].get(k) for k in ("seconds", "mb_s")}
        elif not exp.get("reused"):
            old["gguf"] = made
            Path(prep["manifest"]).write_text(json.dumps(old, indent=1))
    prep["steps"]["gguf"] = {**made, "reused": exp.get("reused"), "bytes_on_disk": size,
                             "free_after_bytes": free_bytes(probe),
                             "overhead_bytes": res["overhead"]["overhead_bytes"],
                             "total_s": time.perf_counter() - t0}
    return res
