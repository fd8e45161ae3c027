"""config.json is untrusted input: check it before a model is built from it.

``check_config(args_cls, cfg, where)`` runs on the raw dict, before ``ModelArgs.from_dict`` does
arithmetic with it: every key the family reads must have the type its dataclass field declares,
sizes must be positive (counts non-negative) and below bounds no real checkpoint comes near (so a
lie cannot make the runtime allocate or loop without end), and the keys every family needs must be
there. ``check_args(args, where)`` checks the relations of the parsed arguments (top-k within the
expert count, query heads a multiple of the key/value heads). Both raise ``InputError`` with one line
naming the file and the key.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import fields

from formats.errors import InputError

__all__ = ["check_config", "check_args"]

_DIM = 1 << 20  # widths: hidden, intermediate, head and latent sizes
_SIZES: dict[str, tuple[int, int]] = {  # key -> (smallest, largest) allowed
    **{k: (1, _DIM) for k in (
        "hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
        "head_dim", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "d_model", "d_kv", "d_ff")},
    "qk_nope_head_dim": (0, _DIM),
    "vocab_size": (1, 1 << 24),
    "max_position_embeddings": (1, 1 << 31),
    **{k: (1, 1 << 12) for k in ("num_hidden_layers", "num_layers", "num_decoder_layers")},
    **{k: (1, 1 << 16) for k in ("num_attention_heads", "num_key_value_heads", "num_heads")},
    **{k: (0, 1 << 16) for k in ("num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts",
                                 "num_experts_per_tok", "n_group", "topk_group", "expert_capacity")},
    **{k: (0, 1 << 12) for k in ("first_k_dense_replace", "num_sparse_encoder_layers", "num_sparse_decoder_layers",
                                 "encoder_sparse_step", "decoder_sparse_step", "max_window_layers")},
    "moe_layer_freq": (1, 1 << 12),
    "sliding_window": (0, 1 << 31),  # 0: none
    "relative_attention_num_buckets": (1, 1 << 16),
    "relative_attention_max_distance": (1, 1 << 31),
}
_POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta")
_ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                 "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "partial_rotary_factor")
_ROPE_NEEDS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
# every family needs these in config.json (a default would only fail later, against the weights)
_REQUIRED = {"decoder": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"),
             "encoder-decoder": ("vocab_size", "d_model", "num_layers", "num_heads")}


def _bad(where: str, key: str, why: str, v) -> InputError:
    shown = repr(v)
    return InputError(f"{where}: {key} {why} (got {shown[:60] + '...' if len(shown) > 60 else shown})")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _matches(v, tp) -> bool:
    """Whether a JSON value fits a dataclass field type (int, float, bool, str, dict, list[...], X | None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(v, t) for t in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if tp is int:
        return _is_int(v)
    if tp is float:
        return _is_number(v)
    if tp is bool:
        return isinstance(v, bool) or (_is_int(v) and v in (0, 1))
    if tp is str:
        return isinstance(v, str)
    if tp is dict or origin is dict:
        return isinstance(v, dict)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(v, list) and all(_matches(x, item) for x in v)
    return True  # a field type this check does not know: the family validates it


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_config(args_cls, cfg, where: str = "config.json") -> None:
    """Types, ranges and required keys of the raw config.json dict (see the module doc)."""
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: not a JSON object")
    kind = "encoder-decoder" if getattr(args_cls, "ENCODER_DECODER", False) else "decoder"
    for key in _REQUIRED[kind]:
        if key not in cfg:
            raise InputError(f"{where}: missing key {key}")
    hints = typing.get_type_hints(args_cls)
    for f in fields(args_cls):
        if f.name not in cfg:
            continue
        v = cfg[f.name]
        if not _matches(v, hints[f.name]):
            raise _bad(where, f.name, f"must be {_type_name(hints[f.name])}", v)
    for key, (lo, hi) in _SIZES.items():
        v = cfg.get(key)
        if v is None:
            continue
        if not _is_int(v):
            raise _bad(where, key, "must be an integer", v)
        if not lo <= v <= hi:
            raise _bad(where, key, f"must be in {lo}..{hi}", v)
    for key in _POSITIVE_FLOATS:
        v = cfg.get(key)
        if v is not None and not (_is_number(v) and v > 0):
            raise _bad(where, key, "must be a positive number", v)
    for name in ("rope_parameters", "rope_scaling"):
        rp = cfg.get(name)
        if rp is None:
            continue
        if not isinstance(rp, dict):
            raise _bad(where, name, "must be an object", rp)
        for key in _ROPE_NUMBERS:
            v = rp.get(key)
            if v is not None and not (_is_number(v) and v > 0):
                raise _bad(where, f"{name}.{key}", "must be a positive number", v)
        for key in ("rope_type", "type"):
            if rp.get(key) is not None and not isinstance(rp[key], str):
                raise _bad(where, f"{name}.{key}", "must be a string", rp[key])
        kind = rp.get("rope_type", rp.get("type"))
        for key in _ROPE_NEEDS.get(kind, ()):
            if rp.get(key) is None:
                raise InputError(f"{where}: {name} of rope_type {kind} needs {name}.{key}")
        if kind == "llama3" and rp["low_freq_factor"] == rp["high_freq_factor"]:
            raise _bad(where, f"{name}.high_freq_factor", "must differ from low_freq_factor", rp["high_freq_factor"])


    _relations(cfg, where)


_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def _relations(a, where: str) -> None:
    get = a.get if isinstance(a, dict) else lambda n: getattr(a, n, None)
    experts = next((get(n) for n in _EXPERT_COUNTS if get(n) is not None), None)
    k = get("num_experts_per_tok")
    if experts and k is not None and not 1 <= k <= experts:
        raise _bad(where, "num_experts_per_tok", f"must be in 1..{experts} (the number of experts)", k)
    heads, kv = get("num_attention_heads"), get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise _bad(where, "num_key_value_heads", f"must divide num_attention_heads={heads}", kv)


def check_args(args, where: str = "config.json") -> None:
    """Relations between the parsed arguments, defaults included (see the module doc)."""
    _relations(args, where)
