"""RMSNorm, rotary embedding (with a one-token step's KV cache update) and the routed-expert sum of bf16
activations in one numba call each, instead of 6-16 torch operations (3 per expert for the sum).

A decode step of a 30-layer model makes about 60 RMSNorm and 60 rotary calls on a few hundred values
each; at a few microseconds per torch operation they cost more than the arithmetic. All run on the
calling thread; none uses fast-math (nothing reassociated or contracted), so results do not depend on
the vector width or the thread count, and every row is computed on its own (a batched step's rows get
what they get alone). bf16 results are rounded to nearest even; a NaN becomes 0x7FC0.

- ``rms_norm``: per row of x [..., H] bf16 (H even), the sum of squares in the fixed order of the GEMV
  (``kernels._row_sum`` of the row with itself), ``r = 1 / sqrt(sum / H + eps)`` in float32, then
  ``bf16(w * bf16(x * r))`` as the eager code rounds. ``layers.RMSNorm`` takes it for bf16 activations
  with a bf16 weight inside a decode step's kernel scope (``kernels.single_row_scope`` of a one-token
  step, ``decode_rows_scope`` of a batched one: the same rows, the same code), not for a prefill nor
  for float32 runs (their parity with transformers is unchanged): its sum of squares is in another
  order than torch's ``mean`` (last-bit differences in bf16 results).
- ``rotary``: ``bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))`` element by element: what
  ``layers.apply_rotary``'s three bf16 operations give, bit for bit for every finite input.
- ``rope_cache``: a one-token step's rotary of q and k and the KV cache update of k and v (``rotary``'s
  bits, written straight into the cache's row) in one call instead of about 16 torch operations.
- ``weighted_sum``: the routed-expert sum of one or many tokens: each expert's output rows (bf16,
  ascending expert id) times their router weights (bf16 or float32), ``acc = bf16(acc + bf16(y * w))``
  per token from +0, what ``layers.moe_forward`` did with ``(y * w).to(bf16)`` and ``index_add_`` into
  zeros, bit for bit for every finite result (the product of a bf16 and a float32 value in float32,
  rounded to bf16 once, as torch's promotion and ``.to`` do).
"""
from __future__ import annotations

import numpy as np
import torch

from .kernels import WORDS, _row_sum, _u32_as_f32, njit

__all__ = ["rms_norm", "takes_norm", "rotary", "takes_rotary", "rope_cache", "takes_rope_cache", "rope_fits",
           "cache_fits", "weighted_sum", "takes_sum"]

BF16 = torch.bfloat16

if njit is not None:
    from numba import carray

    from .kernels_addr import _f32_bits, _u16_at, _u32_at

    @njit(nogil=True, cache=True, inline="always")
    def _f(u):  # bf16 bits (any unsigned int) -> float32
        return _u32_as_f32(np.uint32(np.uint32(u) << np.uint32(16)))

    @njit(nogil=True, cache=True, inline="always")
    def _r(s):  # float32 -> bf16 bits, nearest even (NaN: 0x7FC0)
        if s != s:
            return np.uint16(0x7FC0)
        b = _f32_bits(s)
        return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    @njit(nogil=True, cache=True)  # no fastmath
    def _rms_rows(xa, m_, h_, wa, eps64, oa):
        # at addresses: x bf16 [M, H] (H even, 4-byte aligned), w bf16 [H], out bf16 [M, H]
        xw = carray(_u32_at(xa), (m_, h_ // 2))  # x as bf16 pairs
        x = carray(_u16_at(xa), (m_, h_))
        w = carray(_u16_at(wa), (h_,))
        out = carray(_u16_at(oa), (m_, h_))
        nb = xw.shape[1] // WORDS
        eps = np.float32(eps64)
        inv_h = np.float32(h_)
        for m in range(m_):
            ss = _row_sum(xw, m, xw[m], nb)
            r = np.float32(1.0) / np.sqrt(ss / inv_h + eps)
            for j in range(h_):
                out[m, j] = _r(_f(w[j]) * _f(_r(_f(x[m, j]) * r)))

    @njit(nogil=True, cache=True)  # no fastmath; the rounding of each eager bf16 operation
    def _rotary_rows(xa, r_, d_, ca, sa, h, t, oa):
        # at addresses: x bf16 [B*H*T, D] (rows in b, h, t order), cos and sin bf16 [B*T, D] (each b, t's),
        # out bf16 [B*H*T, D]
        x = carray(_u16_at(xa), (r_, d_))
        c = carray(_u16_at(ca), (r_ // h, d_))
        s = carray(_u16_at(sa), (r_ // h, d_))
        out = carray(_u16_at(oa), (r_, d_))
        for i in range(r_):
            k = (i // (h * t)) * t + i % t  # this row's cos/sin row
            _rot(x[i], c[k], s[k], out[i])

    @njit(nogil=True, cache=True, inline="always")
    def _rot(x, c, s, out):
        # one row: out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), all bf16 bits [D]
        d_ = x.shape[0]
        half = d_ // 2
        for j in range(d_):
            rot = -_f(x[j + half]) if j < half else _f(x[j - half])
            a = _f(_r(_f(x[j]) * _f(c[j])))
            b = _f(_r(rot * _f(s[j])))
            out[j] = _r(a + b)

    @njit(nogil=True, cache=True)  # no fastmath: _rot's roundings
    def _rope_cache_rows(qa, ka, va, hq, hkv, d_, ca, sa, oa, kca, vca, ml, pos):
        # at addresses: one token's heads q bf16 [hq, D], k and v bf16 [hkv, D]; cos and sin bf16 [D]; out: the
        # rotated q bf16 [hq, D]; caches bf16 [hkv, ml, D]: the rotated k and the v written at row pos
        q, oq = carray(_u16_at(qa), (hq, d_)), carray(_u16_at(oa), (hq, d_))
        k, v = carray(_u16_at(ka), (hkv, d_)), carray(_u16_at(va), (hkv, d_))
        c, s = carray(_u16_at(ca), (d_,)), carray(_u16_at(sa), (d_,))
        kc, vc = carray(_u16_at(kca), (hkv, ml, d_)), carray(_u16_at(vca), (hkv, ml, d_))
        for h in range(hq):
            _rot(q[h], c, s, oq[h])
        for h in range(hkv):
            _rot(k[h], c, s, kc[h, pos])
            vc[h, pos, :] = v[h]

    @njit(nogil=True, cache=True)  # no fastmath; the rounding of each eager bf16 operation
    def _wsum_rows(ya, bounds, tok, w32, n_, h_, oa):
        # ya int64 [E]: addresses of expert outputs bf16 [M_e, H] (ascending expert id), rows bounds[e]:bounds[e+1]
        # of tok int64 (their tokens, distinct within an expert) and w32 float32 (their router weights);
        # out bf16 [N, H] at oa
        out = carray(_u16_at(oa), (n_, h_))
        for t in range(n_):
            for j in range(h_):
                out[t, j] = 0  # +0, as zeros_like
        for e in range(ya.shape[0]):
            lo = bounds[e]
            y = carray(_u16_at(ya[e]), (bounds[e + 1] - lo, h_))
            for m in range(y.shape[0]):
                t, w = tok[lo + m], w32[lo + m]
                for j in range(h_):
                    out[t, j] = _r(_f(out[t, j]) + _f(_r(_f(y[m, j]) * w)))


def takes_sum(x: torch.Tensor, ys: list, w: torch.Tensor) -> bool:
    """Whether ``weighted_sum`` computes this routed sum: x bf16 [N, H] on the CPU, every y a contiguous bf16
    [M_e, H], w (the router weights, one per row of the ys together) bf16 or float32."""
    h = x.shape[-1]
    return (njit is not None and x.dtype is BF16 and x.dim() == 2 and x.is_cpu and w.dtype in (BF16, torch.float32)
            and w.numel() == sum(y.shape[0] for y in ys if y is not None)
            and all(y is not None and y.dtype is BF16 and y.dim() == 2 and y.shape[1] == h and y.is_contiguous()
                    and y.is_cpu for y in ys))


def weighted_sum(x: torch.Tensor, ys: list, w, tok, bounds) -> torch.Tensor:
    """out = zeros like x [N, H]; for each expert e in list order and each of its rows m (token tok[b_e + m],
    weight w[b_e + m], b_e = bounds[e]): out[token] = bf16(out[token] + bf16(y_e[m] * w)) (``takes_sum`` must
    hold; tokens distinct within an expert). w: the weights (tensor or float32 array), tok: int64."""
    out = torch.empty(x.shape, dtype=BF16)
    addrs = np.array([y.data_ptr() for y in ys], dtype=np.int64)
    w32 = w.reshape(-1).float().numpy() if isinstance(w, torch.Tensor) else w  # exact for bf16 weights
    _wsum_rows(addrs, np.asarray(bounds, dtype=np.int64), np.asarray(tok, dtype=np.int64),
               np.asarray(w32, dtype=np.float32), x.shape[0], x.shape[1], out.data_ptr())
    return out


def _one_token_heads(z: torch.Tensor, d: int) -> bool:
    return z.dtype is BF16 and z.dim() == 4 and z.shape[:2] == (1, 1) and z.shape[3] == d and z.is_contiguous() \
        and z.is_cpu


def takes_rope_cache(q, k, v, cos, sin, cache, layer: int, pos: int) -> bool:
    """Whether ``rope_cache`` does this step's rotary and KV update: one token's q [1, 1, nH, D] and k, v
    [1, 1, nKV, D] (bf16, contiguous, D even), one position's cos/sin (``rope_fits``) and a batch-1 bf16
    ``layers.KVCache`` with room at ``pos`` (``cache_fits``)."""
    if njit is None or q.dim() != 4:
        return False
    d = q.shape[3]
    return (d % 2 == 0 and _one_token_heads(q, d) and _one_token_heads(k, d) and _one_token_heads(v, d)
            and k.shape[2] == v.shape[2] and rope_fits(cos, sin, d) and cache_fits(cache, layer, k.shape[2], d, pos))


def rope_fits(cos: torch.Tensor, sin: torch.Tensor, d: int) -> bool:
    """Whether cos/sin are what ``rope_cache`` takes for heads of width d: one position's, bf16, contiguous."""
    return (cos.dtype is BF16 and sin.dtype is BF16 and cos.numel() == d and sin.numel() == d and cos.is_contiguous()
            and sin.is_contiguous())


def cache_fits(cache, layer: int, n_kv: int, d: int, pos: int) -> bool:
    """Whether ``rope_cache`` can write ``layer``'s keys and values at ``pos``: bf16 [1, n_kv, L, d] buffers,
    contiguous, with pos < L."""
    kc, vc = cache.k[layer], cache.v[layer]
    return (all(c.dtype is BF16 and c.dim() == 4 and c.shape[0] == 1 and c.shape[1] == n_kv and c.shape[3] == d
                and c.is_contiguous() for c in (kc, vc))
            and 0 <= pos < kc.shape[2] == vc.shape[2])


def rope_cache(q, k, v, cos, sin, kc, vc, pos: int):
    """``apply_rotary`` of q and k, then ``KVCache.update`` of the rotated k and of v at ``pos``, in one call
    (``takes_rope_cache`` must hold): -> q [1, nH, 1, D] (rotated), the cached keys and values [1, nKV,
    pos + 1, D] (views), what the eager path returns, bit for bit for every finite input."""
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    oq = torch.empty(1, hq, 1, d, dtype=BF16)
    _rope_cache_rows(q.data_ptr(), k.data_ptr(), v.data_ptr(), hq, hkv, d, cos.data_ptr(), sin.data_ptr(),
                     oq.data_ptr(), kc.data_ptr(), vc.data_ptr(), kc.shape[2], pos)
    return oq, kc[:, :, :pos + 1], vc[:, :, :pos + 1]


def takes_norm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``rms_norm`` computes this RMSNorm: bf16 x [..., H] (H even) and a bf16 weight [H], on the CPU."""
    return (njit is not None and x.dtype is BF16 and w.dtype is BF16 and x.dim() >= 1 and x.shape[-1] % 2 == 0
            and w.dim() == 1 and w.shape[0] == x.shape[-1] and w.is_contiguous() and x.is_cpu and w.is_cpu
            and x.numel() > 0)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] bf16, w [H] bf16 (contiguous) -> [..., H] bf16 (``takes_norm`` must hold)."""
    if not x.is_contiguous() or x.data_ptr() % 4:  # read as 4-byte words
        x = x.clone(memory_format=torch.contiguous_format)
    out = torch.empty_like(x)
    h = x.shape[-1]
    _rms_rows(x.data_ptr(), x.numel() // h, h, w.data_ptr(), eps, out.data_ptr())
    return out.view(x.shape)


def takes_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rotary`` computes ``apply_rotary(x, cos, sin)``: bf16 x [B, H, T, D] (D even), cos and sin
    bf16 broadcasting to [B, 1, T, D] and no wider than x."""
    if njit is None or x.dtype is not BF16 or cos.dtype is not BF16 or sin.dtype is not BF16 or x.dim() != 4:
        return False
    if x.shape[-1] % 2 or not x.is_cpu or cos.shape != sin.shape or cos.dim() > 4 or x.numel() == 0:
        return False
    b, _, t, d = x.shape
    want = (b, 1, t, d)
    shape = (1,) * (4 - cos.dim()) + tuple(cos.shape)
    return all(c in (1, w) for c, w in zip(shape, want))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``layers.apply_rotary`` (x [B, H, T, D], cos/sin broadcasting to [B, 1, T, D]) in one call
    (``takes_rotary`` must hold) -> [B, H, T, D] bf16, contiguous."""
    b, h, t, d = x.shape
    xc = x.contiguous()
    c = cos.expand(b, 1, t, d).reshape(b * t, d).contiguous()  # [B*T, D]
    s = sin.expand(b, 1, t, d).reshape(b * t, d).contiguous()
    out = torch.empty(b, h, t, d, dtype=BF16)
    _rotary_rows(xc.data_ptr(), b * h * t, d, c.data_ptr(), s.data_ptr(), h, t, out.data_ptr())
    return out
