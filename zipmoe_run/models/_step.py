"""A decoder layer's one-token bf16 step with the per-call glue taken out: the same kernel and torch calls on
the same values as ``MoEDecoderLayer.forward``, so the same bits.

A decode step of a small model is mostly glue: the demo's 30 layers make some 14,000 Python calls per step
(module calls, each product's dispatch checks in ``kernels.linear``, views, allocations) around 22 ms of
GEMVs, 5-6 ms of it. What the general path decides per call from the tensors it is given (which kernel a
weight's shape uses, whether a bias can be added by the kernel, whether a norm, the rotary and the KV update
fit their one-call forms) is fixed for a layer's dense weights, so a :class:`LayerStep` works it out once and
the step then calls the kernels by address. What it cannot know in advance is checked per call (the
activations' and the cache's layout, the experts' weights, the mask), and anything unusual goes the general
way, piece by piece:

- attention: inlined only for the base ``Attention`` (no q/k norm, no clipping) whose four projections are
  plain bf16 ``Linear`` weights on the numba GEMV; otherwise ``self_attn`` is called;
- norms: ``layers.RMSNorm``'s decode-step call (``decode_ops``) inlined, else the module is called;
- routed experts: only for a block that keeps ``RoutedMoE.forward``; the router is the block's own
  ``route``, the experts go through ``moe_forward`` (one token: ``moe_one``) with an expert function that
  inlines ``swiglu_expert``'s GEMVs where the fetched weights are plain bf16 on the numba GEMV, else calls the
  block's ``_expert``. Other blocks (a shared expert, a dense MLP) are called as modules.

A plan is rebuilt when the kernel choices (``kernels.CHOICE_EPOCH``), the thread arrangement or the
GEMV's rounding change. A forward hook on a module it would not call (a profiler's, a user's) sends the
step through the modules, so hooks fire as they would. ``ZIPMOE_FAST_STEP=0`` turns the whole thing off (the general path everywhere).
"""
from __future__ import annotations

import os

import torch
from torch.nn.modules import module as _nn_module

from .. import attn_one as _attn
from .. import decode_ops as _ops
from .. import kernels as K
from ..layers import KVCache, Linear, RMSNorm, moe_forward

__all__ = ["step", "LayerStep"]

BF16 = torch.bfloat16
_ENABLED = os.environ.get("ZIPMOE_FAST_STEP", "1") not in ("0", "false", "no") and _ops.njit is not None
_SPELLINGS = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # layers._GATE_UP_DOWN's order


def _plain(w: torch.Tensor) -> bool:
    """A bf16 matrix the GEMVs read by address: 2-D, contiguous, at an even element offset, on the CPU."""
    return w.dtype is BF16 and w.dim() == 2 and w.is_contiguous() and w.storage_offset() % 2 == 0 and w.is_cpu


def _numba(n: int, k: int, t: int) -> bool:
    """Whether a one-row product of w [n, k] runs the numba GEMV (``kernels._one_row_kernel``'s answer for a
    plain weight, read from the choices made so far; a shape not chosen yet goes the general way)."""
    return k % 2 == 0 and K.CHOICE.get((n, k, t)) == "numba"


def _norm_weight(norm, hidden: int) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a norm whose decode-step form is ``decode_ops.rms_norm``, else None (call the module)."""
    w = norm.weight
    if (type(norm) is RMSNorm and hidden % 2 == 0 and w.dtype is BF16 and w.dim() == 1 and w.shape[0] == hidden
            and w.is_contiguous() and w.is_cpu):
        return w, norm.eps
    return None


class LayerStep:
    """What one layer's one-token step needs, worked out once for a thread count and kernel choices."""

    def __init__(self, layer, hidden: int, threads: int):
        from ._decoder import Attention, RoutedMoE

        self.hidden, self.threads, self.nan16, self.epoch = hidden, threads, K._NAN16, K.CHOICE_EPOCH
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.norm_in, self.norm_post = _norm_weight(self.in_norm, hidden), _norm_weight(self.post_norm, hidden)
        self.block_mod, self.sparse = getattr(layer, layer.block_name), layer.moe is not None
        a = self.self_attn = layer.self_attn
        self.attn = None  # (the attention module, its q, k, v, o projections) where the attention is inlined
        if type(a).forward is Attention.forward and a.qk_norm is None and a.clip is None:
            self.attn = self._attention(a, hidden, threads)
        moe = self.block_mod if self.sparse else None
        self.moe = moe if moe is not None and type(moe).forward is RoutedMoE.forward else None
        self.expert = None
        if self.moe is not None:
            self.expert = self._swiglu if type(moe)._expert is RoutedMoE._expert else moe._expert
        inlined = ([self.in_norm] if self.norm_in else []) + ([self.post_norm] if self.norm_post else [])
        inlined += [a, *self.attn[1]] if self.attn is not None else []
        self.inlined = inlined + ([self.moe] if self.moe is not None else [])  # modules whose calls it skips

    def hooked(self) -> bool:
        """Whether a forward hook would have fired on a module this path does not call (then the modules run)."""
        g = _nn_module
        if g._global_forward_hooks or g._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.inlined)

    def _attention(self, a, hidden: int, threads: int):
        projs = (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
        if any(type(p) is not Linear or not _plain(p.weight) for p in projs):
            return None
        if any(p.bias is not None and not K._addr.takes_bias(p.bias, p.weight.shape[0]) for p in projs):
            return None
        q, k, v, o = (p.weight for p in projs)
        if (a.head_dim % 2 or a.n_kv == 0 or a.n_heads % a.n_kv or q.shape != (a.n_heads * a.head_dim, hidden)
                or k.shape != (a.n_kv * a.head_dim, hidden) or v.shape != k.shape
                or o.shape != (hidden, a.n_heads * a.head_dim)):
            return None
        if not all(_numba(w.shape[0], w.shape[1], threads) for w in (q, k, v, o)):
            return None
        return a, projs

    def valid(self) -> bool:
        return (self.threads, self.nan16, self.epoch) == (K._scope_threads, K._NAN16, K.CHOICE_EPOCH)

    # -- pieces ------------------------------------------------------------------------------------------

    def norm(self, plan, module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` for x [1, 1, H] bf16 (``decode_ops.rms_norm`` inlined where it applies)."""
        if plan is None or not x.is_contiguous() or x.data_ptr() % 4:
            return module(x)
        out = torch.empty(x.shape, dtype=BF16)
        _ops._rms_rows(x.data_ptr(), 1, self.hidden, plan[0].data_ptr(), plan[1], out.data_ptr())
        return out

    def attention(self, layer, xn, cos, sin, mask, cache, pos: int) -> torch.Tensor:
        """``layer.self_attn(xn, ...)``: [1, 1, H]."""
        a = self.attn[0] if self.attn is not None else None
        if (a is None or mask is not None or not _ops.cache_fits(cache, layer.layer, a.n_kv, a.head_dim, pos)
                or not _ops.rope_fits(cos, sin, a.head_dim) or not xn.is_contiguous() or xn.storage_offset() % 2):
            return self.self_attn(xn, cos, sin, mask, cache, layer.layer, pos)
        pq, pk, pv, po = self.attn[1]
        nh, nkv, d, h = a.n_heads, a.n_kv, a.head_dim, self.hidden
        q = torch.empty(1, 1, nh, d, dtype=BF16)  # [B, T, nH, D]
        k = torch.empty(1, 1, nkv, d, dtype=BF16)
        v = torch.empty(1, 1, nkv, d, dtype=BF16)
        ad = K._addr  # kernels_addr: the GEMVs by address
        ad._gemv3_bf16_kernel(h // 2, xn.data_ptr(), pq.weight.data_ptr(), nh * d, _ptr(pq.bias), q.data_ptr(),
                              pk.weight.data_ptr(), nkv * d, _ptr(pk.bias), k.data_ptr(),
                              pv.weight.data_ptr(), nkv * d, _ptr(pv.bias), v.data_ptr(), self.nan16)
        kc, vc = cache.k[layer.layer], cache.v[layer.layer]
        oq = torch.empty(1, nh, 1, d, dtype=BF16)  # [B, nH, T, D]
        _ops._rope_cache_rows(q.data_ptr(), k.data_ptr(), v.data_ptr(), nh, nkv, d, cos.data_ptr(), sin.data_ptr(),
                              oq.data_ptr(), kc.data_ptr(), vc.data_ptr(), kc.shape[2], pos)
        o = _attn.attend_one(oq, kc[:, :, :pos + 1], vc[:, :, :pos + 1], a.scale, None)  # [B, T, nH, D]
        y = torch.empty(1, 1, h, dtype=BF16)
        ad._gemv_bf16_kernel(po.weight.data_ptr(), h, nh * d // 2, o.data_ptr(), y.data_ptr(), _ptr(po.bias),
                             self.nan16)
        return y

    def _swiglu(self, x: torch.Tensor, w: dict) -> torch.Tensor:
        """``layers.swiglu_expert(x, w, act)`` for x [1, H] with the GEMVs called by address where the weights
        are plain bf16 on the numba GEMV (else the block's own ``_expert``)."""
        names = next((s for s in _SPELLINGS if s[0] in w), None)
        if names is None or "gate_up_proj" in w:
            return self.moe._expert(x, w)
        wg, wu, wd = w[names[0]], w[names[1]], w[names[2]]
        h, t = self.hidden, self.threads
        i = wg.shape[0] if wg.dim() == 2 else -1
        if (not (_plain(wg) and _plain(wu) and _plain(wd)) or wg.shape != (i, h) or wu.shape != (i, h)
                or wd.shape != (h, i) or not (_numba(i, h, t) and _numba(h, i, t)) or x.numel() != h
                or not x.is_contiguous() or x.storage_offset() % 2):
            return self.moe._expert(x, w)
        ad = K._addr
        gate = torch.empty(1, i, dtype=BF16)  # [1, I]
        up = torch.empty(1, i, dtype=BF16)
        xp = x.data_ptr()
        ad._gemv3_bf16_kernel(h // 2, xp, wg.data_ptr(), i, 0, gate.data_ptr(), wu.data_ptr(), i, 0, up.data_ptr(),
                              xp, 0, 0, xp, self.nan16)
        z = self.moe.act(gate) * up  # [1, I]
        y = torch.empty(1, h, dtype=BF16)
        ad._gemv_bf16_kernel(wd.data_ptr(), h, i // 2, z.data_ptr(), y.data_ptr(), 0, self.nan16)
        return y

    def block(self, h: torch.Tensor, hook) -> torch.Tensor:
        """The layer's block on h [1, 1, H] -> [1, 1, H] (its residual not added)."""
        hn = self.norm(self.norm_post, self.post_norm, h)
        moe = self.moe
        if moe is None:
            return self.block_mod(hn, hook) if self.sparse else self.block_mod(hn)
        flat = hn.view(1, self.hidden)  # [N, H]
        top_w, top_i = moe.route(flat)  # [N, K]
        return moe_forward(flat, top_i, top_w, moe.source, moe.layer, None, self.expert, hook).view(1, 1, self.hidden)


def _ptr(b: torch.Tensor | None) -> int:
    return 0 if b is None else b.data_ptr()


def step(layer, x: torch.Tensor, cos, sin, masks, cache, pos: int) -> torch.Tensor | None:
    """``layer(x, cos, sin, masks, cache, pos)`` for one token x [1, 1, H] bf16 inside a one-row kernel scope,
    or None where this path does not apply (nothing has been computed then)."""
    if (not _ENABLED or x.dtype is not BF16 or x.shape[0] != 1 or not K._scope_threads or K._decode_rows
            or K._NAN16 is None or type(cache) is not KVCache):
        return None
    plan = layer._step
    if plan is None or not plan.valid():
        plan = layer._step = LayerStep(layer, x.shape[-1], K._scope_threads)
    if plan.hooked():
        return None
    mask = layer.attention_mask(masks)
    h = x + plan.attention(layer, plan.norm(plan.norm_in, plan.in_norm, x), cos, sin, mask, cache, pos)  # [1, 1, H]
    hook = layer.lookahead(h) if plan.sparse and layer.lookahead is not None else None
    return h + plan.block(h, hook)
