"""The attention core of a one-token bf16 decode step (``layers.attention`` with T = 1), in float32.

torch's bf16 ``matmul`` on a decode step's tiny shapes (a few query heads against S cached keys) costs
about 100 us per call here, two calls per layer, far more than the few kilobytes of keys it reads.
This path computes the same attention with two small numba loops and torch's float32 softmax:

- scores [B, H, S]: each query head's dot product with each cached key of its group, summed in the
  fixed order of ``kernels._row_sum`` (the GEMV's blocks of 32 bf16 values, the sequential tail, even +
  odd), then ``* scale`` and ``+ mask`` in float32; no bf16 rounding of the scores (the bf16 ``matmul``
  rounded them);
- ``torch.softmax`` in float32 (as before), the probabilities kept in float32 (before: rounded to bf16);
- out [B, H, Dv]: for every value lane, the sum over s of p[s] * v[s] in ascending s (one float32
  multiply and one add per term, each lane on its own: any vectorisation the compiler does keeps it);
  rounded to bf16 by torch.

No fast-math (nothing reassociated or contracted), so the result does not depend on the vector width
or the thread count (the loops run on the calling thread); a row of a batched step (``RaggedKV`` calls
this per row) gets what it gets alone. Only bf16 q, k, v with T = 1, even head dims and a mask of
shape [1, S] (or none) take this path (``takes``); everything else is ``layers.attention``'s eager
code, float32 runs included (their parity with transformers is unchanged).
"""
from __future__ import annotations

import numpy as np
import torch

from .kernels import WORDS, _row_sum, njit

__all__ = ["takes", "attend_one", "reference"]

_EMPTY = np.zeros(0, np.float32)

if njit is not None:
    @njit(nogil=True, cache=True)  # no fastmath: the order written here
    def _scores(q, k, s_, scale, mask, out):
        # q uint32 [B, H, D/2] (bf16 pairs), k uint32 [B, Hkv, L, D/2] (the first s_ of L rows are the keys),
        # mask f32 [S] or [0], out f32 [B, H, S]
        nb_, h_, _ = q.shape
        hkv = k.shape[1]
        rep = h_ // hkv
        nb = k.shape[3] // WORDS
        has_mask = mask.shape[0] != 0
        for b in range(nb_):
            for h in range(h_):
                kg = k[b, h // rep]
                qh = q[b, h]
                for s in range(s_):
                    v = _row_sum(kg, s, qh, nb) * scale
                    if has_mask:
                        v += mask[s]
                    out[b, h, s] = v

    @njit(nogil=True, cache=True)  # no fastmath: ascending s for every lane
    def _mix(p, v, out):
        # p f32 [B, H, S], v uint16 [B, Hkv, L, Dv] (bf16 bits; the first S of L rows are the values),
        # out f32 [B, H, Dv]
        nb_, h_, s_ = p.shape
        hkv, dv = v.shape[1], v.shape[3]
        rep = h_ // hkv
        acc = np.zeros(dv, np.float32)
        for b in range(nb_):
            for h in range(h_):
                g = h // rep
                acc[:] = 0.0
                for s in range(s_):
                    ps = p[b, h, s]
                    row = v[b, g, s]
                    for d in range(dv):
                        acc[d] += ps * _bf16(row[d])
                out[b, h, :] = acc

    from .kernels import _u32_as_f32

    @njit(nogil=True, cache=True, inline="always")
    def _bf16(u):
        return _u32_as_f32(np.uint32(np.uint32(u) << np.uint32(16)))


def _whole(t: torch.Tensor) -> torch.Tensor:
    """t [B, Hkv, S, D] (a ``KVCache``'s first S of L positions, or any layout) as a C-contiguous
    [B, Hkv, L, D] whose first S rows per head are t: the cache buffer itself where t is such a slice
    (no copy; numba's loops vectorise only on contiguous arrays), else a contiguous copy (L = S)."""
    b, h, s, d = t.shape
    st = t.stride()
    if st[3] == 1 and st[2] == d and d and st[1] % d == 0 and st[1] // d >= s and st[0] == h * st[1]:
        whole = (b, h, st[1] // d, d)
        end = t.storage_offset() + (b - 1) * st[0] + h * st[1]  # one past the last element of the whole view
        if end * t.element_size() <= t.untyped_storage().nbytes():
            return t.as_strided(whole, st)
    return t.contiguous()


def _u32(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor whose last dim is contiguous and even, at an even start, as uint32 bf16 pairs."""
    return t.view(torch.int32).numpy().view(np.uint32)


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``attend_one`` computes this attention (see the module doc)."""
    if njit is None or q.dtype is not torch.bfloat16 or k.dtype is not torch.bfloat16 or v.dtype is not torch.bfloat16:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != 1 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        return False
    b, h, _, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if hkv == 0 or h % hkv or v.shape[:3] != k.shape[:3] or k.shape[0] != b or s == 0:
        return False
    if not (q.is_cpu and k.is_cpu and v.is_cpu):
        return False
    return mask is None or (mask.dim() == 2 and tuple(mask.shape) == (1, s))


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, 1, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] bf16, mask [1, S] additive or None -> [B, 1, H, Dv]
    bf16 (``takes`` must hold)."""
    b, h, _, d = q.shape
    s, dv = k.shape[2], v.shape[3]
    q3 = q.reshape(b, h, d)
    if not q3.is_contiguous() or q3.storage_offset() % 2:
        q3 = q3.clone(memory_format=torch.contiguous_format)
    scores = torch.empty(b, h, s, dtype=torch.float32)
    m = _EMPTY if mask is None else mask.reshape(s).float().numpy()
    kw = _whole(k)  # [B, Hkv, L, D]
    if kw.storage_offset() % 2:  # 4-byte words need an even start
        kw = kw.clone()
    _scores(_u32(q3), _u32(kw), s, np.float32(scale), m, scores.numpy())
    probs = torch.softmax(scores, dim=-1)  # [B, H, S] float32
    out = torch.empty(b, h, dv, dtype=torch.float32)
    _mix(probs.numpy(), _whole(v).view(torch.int16).numpy().view(np.uint16), out.numpy())
    return out.to(torch.bfloat16).view(b, 1, h, dv)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: torch.Tensor | None) -> torch.Tensor:
    """``attend_one``'s arithmetic in plain numpy/torch (for tests): the same orders, no numba."""
    from .kernels import gemv_reference

    b, h, _, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    rep = h // hkv
    scores = np.empty((b, h, s), np.float32)
    for i in range(b):
        for j in range(h):
            kw = k[i, j // rep].contiguous().view(torch.int32).numpy().view(np.uint32)
            scores[i, j] = gemv_reference(kw, q[i, j, 0].float().numpy()) * np.float32(scale)
            if mask is not None:
                scores[i, j] += mask.reshape(s).float().numpy()
    probs = torch.softmax(torch.from_numpy(scores), dim=-1).numpy()
    out = np.zeros((b, h, dv), np.float32)
    vf = v.float().numpy()
    for i in range(b):
        for j in range(h):
            for t in range(s):
                out[i, j] += probs[i, j, t] * vf[i, j // rep, t]
    return torch.from_numpy(out).to(torch.bfloat16).view(b, 1, h, dv)
