"""Architecture registry: config.json ``model_type`` -> module ``zipmoe_run.models.<model_type>``.

Each module exposes ``ModelArgs`` (a dataclass with ``from_dict(cfg)``) and ``Model(args, source,
dtype)`` with ``new_cache(batch, max_len)`` and ``forward(input_ids, cache, start_pos)``. Encoder-decoder
models set ``is_encoder_decoder = True`` and expose ``encode`` / ``new_cache(encoder_out, max_len)`` /
``decode`` instead (see ``zipmoe_run.seq2seq``).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from formats.errors import InputError

from ..errors import UnsupportedModelError
from ._config import check_args, check_config

if TYPE_CHECKING:
    from ..source import WeightSource

__all__ = ["SUPPORTED", "get_model_module", "build_model"]

SUPPORTED: tuple[str, ...] = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3",
                               "switch_transformers")


def get_model_module(model_type: str | None) -> ModuleType:
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    try:
        return importlib.import_module(f"{__name__}.{model_type}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{model_type}":
            raise
        raise UnsupportedModelError(f"model_type {model_type!r} is not available in this build") from None


def build_model(source: "WeightSource", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Instantiate the model for ``source.config`` with dense weights bound from ``source``.

    config.json is checked first (``_config``): a bad value is an ``InputError`` naming the key.
    """
    cfg = source.config
    where = getattr(source, "config_name", "config.json")
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: not a JSON object")
    mod = get_model_module(cfg.get("model_type"))
    check_config(mod.ModelArgs, cfg, where)
    args = mod.ModelArgs.from_dict(cfg)
    check_args(args, where)
    return mod.Model(args, source, dtype)
