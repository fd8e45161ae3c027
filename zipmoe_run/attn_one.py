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
  rounded to bf16, nearest even (a NaN becomes 0x7FC0).

No fast-math (nothing reassociated or contracted), so the result does not depend on the vector width
or the thread count (the loops run on the calling thread); a row of a batched step (``RaggedKV`` calls
this per row) gets what it gets alone. The loops get the tensors' addresses (a numpy view costs more
than the arithmetic here). Only bf16 q, k, v with T = 1, even head dims and a mask of
shape [1, S] (or none) take this path (``takes``); everything else is ``layers.attention``'s eager
code, float32 runs included (their parity with transformers is unchanged).
"""
from __future__ import annotations

import numpy as np
import torch

from .kernels import WORDS, _row_sum, njit

__all__ = ["takes", "attend_one", "reference"]

if njit is not None:
    from llvmlite import ir
    from numba import carray, types
    from numba.extending import intrinsic

    from .decode_ops import _f, _r
    from .kernels_addr import _u16_at, _u32_at

    @intrinsic
    def _f32_at(typingctx, addr):
        """An integer address as a float32 pointer."""
        if not isinstance(addr, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], ir.FloatType().as_pointer())

        return types.CPointer(types.float32)(addr), codegen

    @njit(nogil=True, cache=True)  # no fastmath: the order written here
    def _scores(qa, ka, b_, h_, hkv, len_, s_, d_, scale64, ma, oa):
        # at addresses: q bf16 [B, H, D], k bf16 [B, Hkv, L, D] (the first s_ of L rows are the keys), mask
        # f32 [S] (0: none), out f32 [B, H, S]
        q = carray(_u32_at(qa), (b_, h_, d_ // 2))  # bf16 pairs
        k = carray(_u32_at(ka), (b_, hkv, len_, d_ // 2))
        mask = carray(_f32_at(ma), (s_ if ma != 0 else 0,))
        out = carray(_f32_at(oa), (b_, h_, s_))
        scale = np.float32(scale64)
        rep = h_ // hkv
        nb = (d_ // 2) // WORDS
        for b in range(b_):
            for h in range(h_):
                kg = k[b, h // rep]
                qh = q[b, h]
                for s in range(s_):
                    v = _row_sum(kg, s, qh, nb) * scale
                    if ma != 0:
                        v += mask[s]
                    out[b, h, s] = v

    @njit(nogil=True, cache=True)  # no fastmath: ascending s for every lane
    def _mix(pa, va, b_, h_, hkv, len_, s_, dv, oa):
        # at addresses: p f32 [B, H, S], v bf16 [B, Hkv, L, Dv] (the first S of L rows are the values),
        # out bf16 [B, H, Dv]
        p = carray(_f32_at(pa), (b_, h_, s_))
        v = carray(_u16_at(va), (b_, hkv, len_, dv))
        out = carray(_u16_at(oa), (b_, h_, dv))
        rep = h_ // hkv
        acc = np.zeros(dv, np.float32)
        for b in range(b_):
            for h in range(h_):
                g = h // rep
                acc[:] = 0.0
                for s in range(s_):
                    ps = p[b, h, s]
                    row = v[b, g, s]
                    for d in range(dv):
                        acc[d] += ps * _f(row[d])
                for d in range(dv):
                    out[b, h, d] = _r(acc[d])


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
    if not q3.is_contiguous() or q3.data_ptr() % 4:  # read as 4-byte words
        q3 = q3.clone(memory_format=torch.contiguous_format)
    scores = torch.empty(b, h, s, dtype=torch.float32)
    m = None if mask is None else mask.reshape(s).float().contiguous()
    kw = _whole(k)  # [B, Hkv, L, D]
    if kw.data_ptr() % 4:  # read as 4-byte words
        kw = kw.clone()
    _scores(q3.data_ptr(), kw.data_ptr(), b, h, kw.shape[1], kw.shape[2], s, d, scale,
            0 if m is None else m.data_ptr(), scores.data_ptr())
    probs = torch.softmax(scores, dim=-1)  # [B, H, S] float32
    vw = _whole(v)  # [B, Hkv, L, Dv]
    out = torch.empty(b, 1, h, dv, dtype=torch.bfloat16)
    _mix(probs.data_ptr(), vw.data_ptr(), b, h, vw.shape[1], vw.shape[2], s, dv, out.data_ptr())
    return out


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
