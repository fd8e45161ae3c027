"""A Hugging Face MoE checkpoint directory as a BF16 GGUF that llama.cpp loads (benchmarks only).

Written the way llama.cpp's own ``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36's vendored copy,
gguf-py 0.19) writes ``--outtype bf16``: its architecture names, metadata keys and tensor names
(``gguf.get_tensor_name_map``), routed experts stacked into 3-D ``blk.N.ffn_{gate,up,down}_exps``
tensors ([E, I, H] / [E, H, I] in PyTorch order), and the same type rule: 1-D tensors, norms, biases and
routers (``ffn_gate_inp``, ``ffn_gate_inp_shexp``) as F32, every other weight in its own dtype. Nothing is
rounded: a BF16 weight's bytes are copied as they are, BF16 -> F32 is exact, and an F32 or F16 weight
stays F32 or F16 (the script would round F32 to BF16; this exporter refuses to round, so such a file is
"mostly BF16"). For the ``llama`` architecture (Mixtral) the Q and K rows are permuted exactly as the
script's ``LlamaModel.permute`` does (llama.cpp's rope pairs adjacent dimensions; HF's halves).

Families: ``qwen2_moe`` (arch ``qwen2moe``), ``mixtral`` (``llama``), ``olmoe`` (``olmoe``), with
per-expert tensors or transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj``.

Tokenizer (:mod:`zipmoe.bench.gguf_vocab`): a byte-level BPE (``tokenizer.json``, or ``vocab.json`` +
``merges.txt``) as ``tokenizer.ggml.model = gpt2`` with its tokens, types, merges, special ids and chat
template. SentencePiece-style tokenizers (byte fallback) are refused with one line.

The GGUF is written to a temporary file next to the destination and renamed when complete. ``gguf`` is
imported lazily (the ``llamacpp`` extra). Library code: logs, never prints.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formats.jsonstrict import JSONRejected, loads

from .errors import BenchInputError

__all__ = ["export", "plan", "ARCH", "GGUFExportError", "permute_qk", "read_safetensors"]

log = logging.getLogger(__name__)

ARCH = {"qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe"}
_ST = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                     r"(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_WHICH = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
MOSTLY_BF16 = 32  # gguf.LlamaFileType.MOSTLY_BF16
_ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT


class GGUFExportError(BenchInputError):
    """A checkpoint the exporter cannot convert; the message names the file or tensor."""


@dataclass
class STTensor:
    path: Path
    dtype: str  # BF16, F16, F32
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    def array(self) -> np.ndarray:
        """A read-only memory map of the raw values (BF16 as uint16)."""
        np_dtype = _ST[self.dtype][0]
        if self.nbytes == 0:
            return np.zeros(self.shape, np_dtype)
        return np.memmap(self.path, dtype=np_dtype, mode="r", offset=self.offset, shape=self.shape)


@dataclass
class Planned:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # PyTorch (row-major) order; GGUF stores it reversed
    gtype: str  # "BF16", "F16" or "F32"
    parts: list = field(default_factory=list)  # callables returning arrays, written one after the other
    sources: list = field(default_factory=list)  # the source tensor names, for messages and tests

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.gtype == "F32" else 2)


def _json(path: Path):  # also used by gguf_vocab
    try:
        return loads(path.read_bytes())
    except JSONRejected as e:
        raise GGUFExportError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise GGUFExportError(f"{path}: cannot read ({e.strerror})") from None


def read_safetensors(model_dir: Path) -> dict[str, STTensor]:
    """Every tensor of the checkpoint's safetensors files, offsets validated against the file sizes."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir}: no *.safetensors files")
    out: dict[str, STTensor] = {}
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise GGUFExportError(f"{f}: shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100 << 20:
                raise GGUFExportError(f"{f}: header length {n} exceeds the file ({size} bytes)")
            try:
                header = loads(fh.read(n))
            except JSONRejected as e:
                raise GGUFExportError(f"{f}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise GGUFExportError(f"{f}: safetensors header is not an object")
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(meta, dict) or meta.get("dtype") not in _ST:
                raise GGUFExportError(f"{f}: tensor {name}: dtype {meta.get('dtype') if isinstance(meta, dict) else meta!r}"
                                      " not supported (BF16, F16, F32)")
            shape, offs = meta.get("shape"), meta.get("data_offsets")
            if (not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape)
                    or not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) and 0 <= o <= size for o in offs)):
                raise GGUFExportError(f"{f}: tensor {name}: bad shape or data_offsets")
            nbytes = math.prod(shape) * _ST[meta["dtype"]][1]
            if offs[1] - offs[0] != nbytes or base + offs[1] > size:
                raise GGUFExportError(f"{f}: tensor {name}: data_offsets {offs} do not match shape {shape} "
                                      f"or run past the end of the file")
            if name in out:
                raise GGUFExportError(f"{f}: tensor {name} also in {out[name].path.name}")
            out[name] = STTensor(f, meta["dtype"], tuple(shape), base + offs[0], nbytes)
    return out


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's ``LlamaModel.permute``: rows [n_head, 2, hd/2] -> [n_head, hd/2, 2] (a copy)."""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
                                .reshape(w.shape))


def _f32(t: STTensor) -> np.ndarray:
    """The tensor as float32, exactly (BF16: the bits shifted into the high half)."""
    a = t.array()
    if t.dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def plan(model_dir, tensors: dict[str, STTensor] | None = None) -> tuple[dict, list[Planned]]:
    """(config, the GGUF tensors in write order) for ``model_dir``; nothing is read but headers."""
    import gguf

    d = Path(model_dir)
    cfg = _json(d / "config.json")
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mt not in ARCH:
        raise GGUFExportError(f"{d / 'config.json'}: model_type {mt!r} not supported by the GGUF exporter "
                              f"(supported: {', '.join(ARCH)})")
    tensors = read_safetensors(d) if tensors is None else tensors
    arch = ARCH[mt]
    n_layers = int(cfg["num_hidden_layers"])
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    nmap = gguf.get_tensor_name_map(arch_enum, n_layers)
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    n_exp = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    f32_kinds = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)
    f32_names = {gguf.TENSOR_NAMES[k].format(bid=b) + ".weight" for k in f32_kinds for b in range(n_layers)}

    out: list[Planned] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}
    for name, t in tensors.items():
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((int(m[1]), _WHICH[m[3]]), {})[int(m[2])] = name
            continue
        m = _FUSED.match(name)
        if m:
            out += _fused(m, name, t, nmap)
            continue
        new = nmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFExportError(f"{d}: tensor {name} has no GGUF name for arch {arch}")
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_head if name.endswith("q_proj.weight") else n_kv
            part = (lambda t=t, h=heads: permute_qk(t.array(), h))
        else:
            part = t.array
        if len(t.shape) <= 1 or new.endswith("_norm.weight") or new in f32_names or not new.endswith(".weight"):
            f32 = (lambda t=t: _f32(t))
            if arch == "llama" and name.endswith(("q_proj.bias", "k_proj.bias")):
                f32 = (lambda t=t, h=n_head if "q_proj" in name else n_kv: permute_qk(_f32(t), h))
            out.append(Planned(new, t.shape, "F32", [f32], [name]))
        else:
            out.append(Planned(new, t.shape, t.dtype, [part], [name]))
    for (layer, which), by_e in sorted(experts.items()):
        if sorted(by_e) != list(range(n_exp)):
            raise GGUFExportError(f"{d}: layer {layer} {which} experts {sorted(by_e)[:8]}... are not 0..{n_exp - 1}")
        ts = [tensors[by_e[e]] for e in range(n_exp)]
        if len({(t.dtype, t.shape) for t in ts}) != 1:
            raise GGUFExportError(f"{d}: layer {layer} {which} experts differ in dtype or shape")
        kind = {"gate": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
                "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP}[which]
        new = gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"
        out.append(Planned(new, (n_exp, *ts[0].shape), ts[0].dtype, [t.array for t in ts], [by_e[e] for e in range(n_exp)]))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise GGUFExportError(f"{d}: two source tensors map to one GGUF name")
    return cfg, out


def _fused(m, name: str, t: STTensor, nmap) -> list[Planned]:
    """transformers 5's fused experts: gate_up_proj [E, 2I, H] -> gate [E, I, H] + up [E, I, H]; down_proj as is."""
    layer = int(m[1])
    if len(t.shape) != 3:
        raise GGUFExportError(f"{t.path}: tensor {name}: expected 3 dimensions, got {list(t.shape)}")
    e, rows, h = t.shape
    if m[2] == "down_proj":
        return [Planned(f"blk.{layer}.ffn_down_exps.weight", t.shape, t.dtype, [t.array], [name])]
    if rows % 2:
        raise GGUFExportError(f"{t.path}: tensor {name}: gate_up_proj rows {rows} are odd")
    i = rows // 2
    gate = Planned(f"blk.{layer}.ffn_gate_exps.weight", (e, i, h), t.dtype,
                   [lambda t=t, x=x: t.array()[x, :i] for x in range(e)], [name])
    up = Planned(f"blk.{layer}.ffn_up_exps.weight", (e, i, h), t.dtype,
                 [lambda t=t, x=x: t.array()[x, i:] for x in range(e)], [name])
    return [gate, up]


# -- metadata ----------------------------------------------------------------------------------------------


def _metadata(w, cfg: dict, arch: str, name: str) -> None:
    """The keys convert_hf_to_gguf writes for these architectures (TextModel.set_gguf_parameters + the class)."""
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    if cfg.get("max_position_embeddings"):
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    if cfg.get("intermediate_size"):
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts")
    if n_exp:
        w.add_expert_count(int(n_exp))
    if cfg.get("num_experts_per_tok"):
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    if cfg.get("head_dim"):
        w.add_key_length(int(cfg["head_dim"]))
        w.add_value_length(int(cfg["head_dim"]))
    w.add_file_type(MOSTLY_BF16)
    if arch == "qwen2moe":
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))
    if arch == "llama":
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_rope_dimension_count(int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]))
    w.add_quantization_version(2)  # gguf.GGML_QUANT_VERSION, written by the script's prepare_metadata


# -- writing -----------------------------------------------------------------------------------------------


def export(model_dir, out_path, *, name: str | None = None) -> dict:
    """Write ``model_dir`` as a GGUF at ``out_path`` (atomically); returns a summary dict."""
    import gguf

    from .gguf_vocab import write_vocab

    d, out = Path(model_dir), Path(out_path)
    cfg, planned = plan(d)
    arch = ARCH[cfg["model_type"]]
    need = sum(p.nbytes + _ALIGN for p in planned) + (64 << 20)  # tensors + padding + header room
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise GGUFExportError(f"{out.parent}: the GGUF needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch)
    try:
        _metadata(w, cfg, arch, name or d.name)
        write_vocab(w, d, cfg)
        np_of = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
        for p in planned:
            raw = gguf.GGMLQuantizationType.BF16 if p.gtype == "BF16" else None
            w.add_tensor_info(p.name, p.shape, np.dtype(np_of[p.gtype]), p.nbytes, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        for p in planned:
            fout.write(b"\0" * (-fout.tell() % _ALIGN))
            start = fout.tell()
            for part in p.parts:
                a = np.ascontiguousarray(part())
                fout.write(memoryview(a).cast("B"))
            if fout.tell() - start != p.nbytes:
                raise GGUFExportError(f"{out}: wrote {fout.tell() - start} bytes for {p.name}, expected {p.nbytes}")
        fout.write(b"\0" * (-fout.tell() % _ALIGN))
        fout.flush()
        os.fsync(fout.fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    total = sum(p.nbytes for p in planned)
    log.info("gguf: %s -> %s (%s, %d tensors, %.1f MB)", d, out, arch, len(planned), total / 1e6)
    return {"path": str(out), "arch": arch, "tensors": len(planned), "tensor_bytes": total}
