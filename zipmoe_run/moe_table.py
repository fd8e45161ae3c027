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

__all__ = ["table_ready", "swiglu_table", "one_token_outputs"]


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


def _dense_parts(mlp, x: torch.Tensor):
    """((gate, up, down) as (weight, bias) pairs, act) of a gated MLP (``models._decoder.MLP``) whose gate and up the
    numba GEMV takes for x here (as ``linear_many`` would), else None: ``mlp(x)`` runs as before."""
    from . import layers as _L
    from .kernels_addr import takes_bias
    from .models._decoder import MLP

    projs = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if type(mlp).forward is not MLP.forward or not all(type(p).forward is _L.Linear.forward for p in projs):
        return None
    if not all(_numba(x, p.weight) and takes_bias(p.bias, p.weight.shape[0]) for p in projs[:2]):
        return None
    return [(p.weight, p.bias) for p in projs], mlp.act


def swiglu_table(xs: torch.Tensor | list[torch.Tensor], experts: list[dict | None], act: Callable,
                 expert_fn: Callable, dense=None, x_dense: torch.Tensor | None = None
                 ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """``[expert_fn(x_i, w) for w in experts]`` (None where an expert is None), x_i = xs (one bf16 row [1, H]
    for every expert) or xs[i] (one row per expert), each the bits ``swiglu_expert(x_i, w, act)`` gives,
    and ``dense(x_dense)`` (None without ``dense``; xs must then be one row): a gated MLP run in the same
    calls (x_dense holds xs's values; the kernel reads values, not the layout). Experts whose gate and up
    the numba GEMV does not take here (another kernel chosen, another layout or dtype) go through
    ``expert_fn`` itself, a dense MLP it does not take through ``dense``."""
    from . import layers as _L  # (layers imports moe_one, which imports this module)
    from .kernels_addr import takes_bias
    from .kernels_table import gemv_table

    ys: list[torch.Tensor | None] = [None] * len(experts)
    row = (lambda i: xs[i]) if isinstance(xs, list) else (lambda i: xs)
    parts = {}  # slot -> ((gate, None), (up, None), (down, None)), act; slot -1: the dense MLP
    for i, w in enumerate(experts):
        p = _gated(w, _L._GATE_UP_DOWN)
        if p is not None and _numba(row(i), p[0]) and _numba(row(i), p[1]):
            parts[i] = [(m, None) for m in p], act
        elif w is not None:
            ys[i] = expert_fn(row(i), w)
    dense_out = None
    if dense is not None:
        dp = _dense_parts(dense, xs)
        if dp is None:
            dense_out = dense(xs if x_dense is None else x_dense)
        else:
            parts[-1] = dp
    if not parts:
        return ys, dense_out
    gu = gemv_table([(row(i), w, b) for i, (p, _) in parts.items() for w, b in p[:2]], K._NAN16)  # [1, I] each
    hs = {i: _L.rowwise(a, gu[2 * n]) * gu[2 * n + 1] for n, (i, (_, a)) in enumerate(parts.items())}  # [1, I]
    res = {}
    table = [i for i, (p, _) in parts.items() if _numba(hs[i], p[2][0]) and takes_bias(p[2][1], p[2][0].shape[0])]
    if table:
        res = dict(zip(table, gemv_table([(hs[i], *parts[i][0][2]) for i in table], K._NAN16)))  # [1, H]
    for i, (p, _) in parts.items():
        if i not in res:
            res[i] = _L.linear(hs[i], *p[2])  # the kernel chosen for the down projection
    for i, y in res.items():
        if i >= 0:
            ys[i] = y
    return ys, res.get(-1, dense_out)


def one_token_outputs(x: torch.Tensor, wanted: list[int], bounds: list[int], tok_sorted: torch.Tensor,
                      source, layer: int, stack, expert_fn: Callable, after_open) -> dict | None:
    """A prefill's (or any grouped call's) experts that got one token, in two table calls: {slot: output
    [1, H]} after fetching every wanted expert ({slot: None} for the others, their weights in ``held``);
    None where the table does not apply (the caller fetches and computes as before). Each output is the
    bits ``expert_fn(x[tok], w)`` gives."""
    if not (getattr(expert_fn, "swiglu", False) and getattr(source, "keeps_fetched", False)
            and table_ready(x[:1])):
        return None
    held = {}
    for e, weights in source.fetch(layer, wanted, stack):  # every expert's tensors stay valid
        held[e] = weights
        if after_open is not None:
            after_open()
            after_open = None
    ones = [i for i in range(len(wanted)) if bounds[i + 1] - bounds[i] == 1 and wanted[i] in held]
    ys, _ = swiglu_table([x[tok_sorted[bounds[i]:bounds[i] + 1]] for i in ones], [held[wanted[i]] for i in ones],
                         expert_fn.__self__.act, expert_fn)
    return {"held": held, "ones": dict(zip(ones, ys))}
