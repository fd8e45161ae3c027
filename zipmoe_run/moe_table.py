"""A decode step's routed gated experts in two kernel calls: every expert's gate and up, then every down.

``moe_one`` runs this when the source keeps fetched experts valid (no budget: it can hold the layer's
experts at once) and the expert function is ``layers.swiglu_expert`` (it says so: ``swiglu``). Each
product goes into ``kernels_table.gemv_table`` only where ``kernels.linear`` would have run the numba GEMV
for it (the kernel chosen for its shape on this host, bf16, contiguous); the rest take ``linear`` as
before. The activation and the product of gate and up are the same torch operations as in
``swiglu_expert``. So each expert's output is bit for bit what ``swiglu_expert`` gives, with one call
of the thread team for all gates and ups and one for all downs instead of two per expert.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import kernels as K

__all__ = ["table_ready", "swiglu_table"]


def table_ready(x: torch.Tensor) -> bool:
    """Whether one token's products may go through ``gemv_table``: the numba GEMV by address is in use,
    x is one bf16 row on the CPU and no batched decode step is running (its rows take their own path)."""
    return (K._NAN16 is not None and not K._decode_rows and x.dtype is torch.bfloat16
            and x.numel() == x.shape[-1] and x.is_cpu and K.enabled())


def _gated(w: dict | None, spellings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(gate, up, down) of an expert in ``swiglu_expert``'s spelling with separate projections, else None."""
    if w is None or "gate_up_proj" in w:
        return None
    for g, u, d in spellings:
        if g in w and u in w and d in w:
            return w[g], w[u], w[d]
    return None


def _numba(x: torch.Tensor, w: torch.Tensor) -> bool:
    return w.is_cpu and w.shape[-1] == x.shape[-1] and K._one_row_kernel(x, w) == "numba"


def swiglu_table(x: torch.Tensor, experts: list[dict | None], act: Callable,
                 expert_fn: Callable) -> list[torch.Tensor | None]:
    """``[expert_fn(x, w) for w in experts]`` (None where an expert is None) for one bf16 row x [1, H], each
    the bits ``swiglu_expert(x, w, act)`` gives; experts whose gate and up the numba GEMV does not take
    here (another kernel chosen, another layout or dtype) go through ``expert_fn`` itself."""
    from . import layers as _L  # (layers imports moe_one, which imports this module)
    from .kernels_table import gemv_table

    ys: list[torch.Tensor | None] = [None] * len(experts)
    parts = {}
    for i, w in enumerate(experts):
        p = _gated(w, _L._GATE_UP_DOWN)
        if p is not None and _numba(x, p[0]) and _numba(x, p[1]):
            parts[i] = p
        elif w is not None:
            ys[i] = expert_fn(x, w)
    if not parts:
        return ys
    gu = gemv_table([(x, m, None) for p in parts.values() for m in p[:2]], K._NAN16)  # [1, I] each
    hs = {i: _L.rowwise(act, gu[2 * n]) * gu[2 * n + 1] for n, i in enumerate(parts)}  # [1, I]
    table = [i for i in parts if _numba(hs[i], parts[i][2])]
    if table:
        for i, y in zip(table, gemv_table([(hs[i], parts[i][2], None) for i in table], K._NAN16)):
            ys[i] = y  # [1, H]
    for i in parts:
        if ys[i] is None:
            ys[i] = _L.linear(hs[i], parts[i][2])  # the kernel chosen for the down projection
    return ys
