"""ZipMoE runtime: run MoE checkpoints (plain directories or .zmoe archives) with a small PyTorch engine.

    from zipmoe_run import load, Sampling
    lm = load("model.zmoe", dtype="bfloat16")
    print(lm.generate("Hello", max_new_tokens=16).texts[0])
"""
from __future__ import annotations

__all__ = ["load", "Loaded", "Sampling", "TokenEvent", "GenerationResult", "stream_generate",
           "DirectorySource", "WeightSource"]

_LAZY = {
    "load": "api", "Loaded": "api",
    "Sampling": "generate", "TokenEvent": "generate", "GenerationResult": "generate",
    "stream_generate": "generate",
    "DirectorySource": "source", "WeightSource": "source",
}


def __getattr__(name: str):  # imported lazily so `import zipmoe_run` stays cheap (torch loads on use)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
