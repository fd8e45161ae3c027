"""Several one-row bf16 products in one call of the numba GEMV: a decode step's routed experts.

A decode step of a MoE layer makes two one-row products per routed expert (gate and up in one call,
then down), each through ``kernels.linear``: its Python checks, its own fork and join of the thread
team, its own start of the hardware prefetcher's streams. ``gemv_table`` takes a list of products
that may have different inputs and widths (every expert's gate and up, or every expert's down) and
runs all their output rows in one parallel loop over chunks of about ``GRAIN`` bytes of weights.

Exactly ``kernels_addr.gemv_bf16``'s bits for each product: every row is ``kernels._row_sum`` (the same
blocks and tail in the same order), a bias is added in float32 and the sum is rounded to bf16 by
``kernels_addr._round16`` (torch's rounding; ``nan16`` its NaN). Which thread computes a row never
changes how it is computed, so the result does not depend on the chunking or the thread count.
"""
from __future__ import annotations

import numpy as np
import torch

from .kernels import WORDS, _row_sum, _u32_as_f32, njit
from .kernels_addr import _round16, _u16_at, _u32_at

if njit is None:  # pragma: no cover - numba is a dependency
    raise ImportError("numba is not installed")

from numba import carray, prange  # noqa: E402

__all__ = ["gemv_table", "GRAIN"]

GRAIN = 64 << 10  # bytes of weights per chunk of rows (the unit of work a thread takes)


@njit(parallel=True, nogil=True, cache=True)  # no fastmath: each row as kernels_addr._gemv_bf16_rows computes it
def _table_rows(tab, chunks, nan16):
    # tab int64 [P, 6]: per product the weight's address, its rows N and words K/2 (bf16 pairs), the input
    # row's address (K/2 words), the output's address (N bf16), the bias's address (N bf16; 0: none).
    # chunks int64 [C, 3]: product, first row, end row. The arrays are made inside the loop body.
    sh = np.uint32(16)
    for c in prange(chunks.shape[0]):
        p = chunks[c, 0]
        n, kh, ba = tab[p, 1], tab[p, 2], tab[p, 5]
        w = carray(_u32_at(tab[p, 0]), (n, kh))
        xw = carray(_u32_at(tab[p, 3]), (kh,))
        out = carray(_u16_at(tab[p, 4]), (n,))
        bias = carray(_u16_at(ba if ba != 0 else tab[p, 4]), (n if ba != 0 else 0,))
        nb = kh // WORDS
        for i in range(chunks[c, 1], chunks[c, 2]):
            s = _row_sum(w, i, xw, nb)
            if ba != 0:
                s += _u32_as_f32(np.uint32(np.uint32(bias[i]) << sh))
            out[i] = _round16(s, nan16)


@njit(nogil=True, cache=True)
def _table_kernel(tab, grain_words, nan16):
    # the chunks of every product (rows whose weights come to about grain_words words), then one parallel loop
    total = 0
    for p in range(tab.shape[0]):
        rows = max(1, grain_words // max(tab[p, 2], 1))
        total += (tab[p, 1] + rows - 1) // rows
    chunks = np.empty((total, 3), np.int64)
    c = 0
    for p in range(tab.shape[0]):
        rows = max(1, grain_words // max(tab[p, 2], 1))
        for lo in range(0, tab[p, 1], rows):
            chunks[c, 0] = p
            chunks[c, 1] = lo
            chunks[c, 2] = min(lo + rows, tab[p, 1])
            c += 1
    _table_rows(tab, chunks, nan16)


def gemv_table(prods: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], nan16: int,
               grain: int = GRAIN) -> list[torch.Tensor]:
    """``[kernels_addr.gemv_bf16(x, w, b, nan16) for x, w, b in prods]`` in one kernel call: each x [..., K_j]
    one bf16 row on the CPU, w [N_j, K_j] bf16 on the CPU (contiguous, even storage offset, K_j even), b None
    or a contiguous bf16 [N_j] (``kernels_addr.takes_bias``). The caller checks those; the kernel reads K_j
    values at x's address. Returns bf16 [..., N_j] per product, each the bits ``gemv_bf16`` gives."""
    tab = np.empty((len(prods), 6), dtype=np.int64)
    keep, outs = [], []
    for j, (x, w, b) in enumerate(prods):
        if not x.is_contiguous() or x.storage_offset() % 2:  # 4-byte words need an even start
            x = x.clone(memory_format=torch.contiguous_format)
        keep.append(x)  # alive until the kernel has run
        n, k = w.shape
        y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
        outs.append(y)
        tab[j] = (w.data_ptr(), n, k // 2, x.data_ptr(), y.data_ptr(), 0 if b is None else b.data_ptr())
    if len(prods):
        _table_kernel(tab, max(1, grain // 4), nan16)
    return outs
