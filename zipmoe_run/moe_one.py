"""The routed-expert sum of one token (a decode step's ``layers.moe_forward``) without the grouping
that many tokens need: the same operations on the same values in the same order, so the same bits."""
from __future__ import annotations

import numpy as np
import torch

from . import decode_ops as _ops
from .errors import MissingWeightError

__all__ = ["moe_one", "sum_outputs", "distinct_rows"]

_TOKEN0 = torch.zeros(1, dtype=torch.long)  # index_add_'s index of the one token (never written)
_ONE: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # k -> weighted_sum's tokens and bounds of k experts' rows


def moe_one(x, topk_ids, topk_weights, source, layer, stack, expert_fn, after_open) -> torch.Tensor | None:
    """``moe_forward`` of one token x [1, H] (a decode step) with the same operations on the same values,
    in the same order, without the sorting and indexing that group many tokens: ids ascending
    (distinct, as top-k gives them; None for the general path otherwise), each expert's output
    weighted by its [1, 1] top-k weight, summed by ``index_add_`` in ascending expert id (for bf16 in one
    call, ``decode_ops.weighted_sum``: the same roundings). The expert
    gets x itself where x is laid out as the copy ``x[tok]`` would be (contiguous, 64-byte aligned:
    a BLAS kernel may sum differently at another alignment), else that copy."""
    ids: list[int] = topk_ids.reshape(-1).tolist()
    if len(set(ids)) != len(ids):
        return None
    order = sorted(range(len(ids)), key=ids.__getitem__)  # slot of each expert, ascending id
    wanted = [ids[j] for j in order]
    slot_of = {e: i for i, e in enumerate(wanted)}
    tw = topk_weights.reshape(-1, 1)  # [K, 1]
    xe = x if x.is_contiguous() and x.data_ptr() % 64 == 0 else x[_TOKEN0]  # [1, H]
    ys: list[torch.Tensor | None] = [None] * len(wanted)  # each expert's own output, ascending id
    for e, weights in source.fetch(layer, wanted, stack):
        ys[slot_of[e]] = expert_fn(xe, weights)  # [1, H]
        if after_open is not None:
            after_open()
            after_open = None
    if all(y is not None for y in ys) and _ops.takes_sum(x, ys, tw):  # one numba call: the same bits
        k = len(ys)
        if k not in _ONE:
            _ONE[k] = (np.zeros(k, np.int64), np.arange(k + 1, dtype=np.int64))  # token 0 each; one row each
        return _ops.weighted_sum(x, ys, tw.reshape(-1).float().numpy()[order], *_ONE[k])
    outs = [None if y is None else (y * tw[order[i]:order[i] + 1]).to(x.dtype) for i, y in enumerate(ys)]
    return sum_outputs(x, outs, wanted, layer, lambda i: _TOKEN0)


def distinct_rows(topk_ids: torch.Tensor) -> bool:
    """Whether no token [N, K] chose an expert twice (so an expert's rows are distinct tokens, as top-k gives)."""
    a = np.sort(topk_ids.reshape(-1, topk_ids.shape[-1]).numpy(), axis=1)
    return bool((a[:, 1:] != a[:, :-1]).all())


def sum_outputs(x: torch.Tensor, outs: list, wanted: list[int], layer: int, rows) -> torch.Tensor:
    """The experts' outputs ``outs`` (one per id of ``wanted``, ascending) summed into zeros like x
    [N, H] by ``index_add_`` at ``rows(i)`` (the tokens of expert i), in ascending expert id: a fixed
    order. An expert the source never yielded (None) is named in a ``MissingWeightError``."""
    missing = [wanted[i] for i, o in enumerate(outs) if o is None]
    if missing:
        raise MissingWeightError(f"layer {layer}: weight source did not yield experts {missing}")
    out = torch.zeros_like(x)
    for i, o in enumerate(outs):
        out.index_add_(0, rows(i), o)
    return out
