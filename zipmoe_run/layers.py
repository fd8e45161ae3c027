"""Pieces shared by every architecture: norms, rotary embeddings, KV cache, attention, MoE dispatch.

Numerics follow transformers' eager implementations (float32 RMSNorm, float32 softmax, rotary
tables computed in float32 then cast) so float32 runs match it to rounding.
"""
from __future__ import annotations

import math
from dataclasses import fields
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MissingWeightError, UnsupportedModelError
from . import attn_one as _attn_one
from . import decode_ops as _ops
from . import kernels as _kernels
from .kernels import linear
try:
    from .kernels_addr import linear_many
except ImportError:  # pragma: no cover - numba is a dependency; torch only without it
    def linear_many(x, prods):
        return [linear(x, w, b) for w, b in prods]
from .moe_one import distinct_rows, moe_one, sum_outputs

if TYPE_CHECKING:
    from .source import WeightSource

__all__ = [
    "Linear",
    "Embedding",
    "linear",
    "linear_many",
    "RMSNorm",
    "rope_config",
    "rope_inv_freq",
    "RotaryEmbedding",
    "apply_rotary",
    "KVCache",
    "RaggedKV",
    "rowwise",
    "attention",
    "causal_mask",
    "ACTIVATIONS",
    "swiglu_expert",
    "moe_forward",
    "bind_weights",
    "args_from_dict",
]


class Linear(nn.Linear):
    """nn.Linear whose one-row bf16 products (decode steps) use the fast kernel of ``kernels``.

    Built without an initialiser: every parameter is bound from the checkpoint (``bind_weights``), so
    the skeleton (on the meta device) only needs shapes; torch's kaiming init would be wasted work.
    """

    def reset_parameters(self) -> None:
        pass  # no initialiser: weights come from the checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding without its ``normal_`` initialiser (which on the meta device imports torch._dynamo,
    about a second of start-up); the table is bound from the checkpoint (``bind_weights``)."""

    def reset_parameters(self) -> None:
        pass  # no initialiser: weights come from the checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype is torch.bfloat16 and (_kernels._scope_threads or _kernels._decode_rows)
                and _ops.takes_norm(x, self.weight)):  # a bf16 decode step: one numba call (decode_ops)
            return _ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


# -- rotary ---------------------------------------------------------------------------------------


def rope_config(cfg: dict, default_theta: float = 10000.0) -> dict:
    """Normalise the RoPE spellings of config.json into one dict with rope_type and rope_theta.

    Accepts ``rope_parameters`` (transformers 5), ``rope_scaling`` (older), a top-level
    ``rope_theta``, and the legacy ``type`` key.
    """
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta", default_theta))
    rp.setdefault("rope_type", rp.get("type", "default"))
    if rp["rope_type"] in ("llama3", "yarn") and "original_max_position_embeddings" not in rp:
        rp["original_max_position_embeddings"] = cfg.get("max_position_embeddings")
    return rp


def rope_inv_freq(rp: dict, dim: int, max_position_embeddings: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float32) and the cos/sin scaling factor, as transformers computes them."""
    base = float(rp["rope_theta"])
    kind = rp["rope_type"]
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / rp["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, inv_l), 1.0
    if kind == "yarn":
        return _yarn(rp, base, dim, max_position_embeddings)
    raise UnsupportedModelError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3, yarn)")


def _yarn(rp: dict, base: float, dim: int, max_pos: int | None) -> tuple[torch.Tensor, float]:
    factor = rp.get("factor")
    orig = rp["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rp.get("attention_factor")
    if attn is None:
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        attn = float(mscale(factor, m) / mscale(factor, m_all)) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos = base ** (torch.arange(0, dim, 2).to(torch.float) / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra
    return inv, attn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions; transformers' half-rotation layout."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], cos/sin [T, D] (or [B, 1, T, D])."""
    if x.dtype is torch.bfloat16 and _ops.takes_rotary(x, cos, sin):  # the same bits in one call (decode_ops)
        return _ops.rotary(x, cos, sin)
    return (x * cos) + (_rotate_half(x) * sin)


# -- KV cache and attention ------------------------------------------------------------------------


class KVCache:
    """Preallocated per-layer key/value buffers [B, Hkv, max_len, D]."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, k_dim: int, v_dim: int | None,
                 dtype: torch.dtype):
        v_dim = k_dim if v_dim is None else v_dim
        self.max_len = max_len
        self.k = [torch.zeros(batch, n_kv_heads, max_len, k_dim, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(batch, n_kv_heads, max_len, v_dim, dtype=dtype) for _ in range(n_layers)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at start_pos; return all keys/values so far [B, Hkv, start_pos+T, D]."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RaggedKV:
    """One decode step of N independent sequences (one token each), passed where a ``KVCache`` goes:
    row i has its own cache ``caches[i]`` (batch 1) and its own position ``positions[i]``. The
    attention core runs per row on that row's cache, with exactly the shapes of a step of that
    sequence alone, so every row computes what it would alone."""

    def __init__(self, caches: Sequence[KVCache], positions: Sequence[int]):
        if len(caches) != len(positions):
            raise ValueError(f"{len(caches)} caches for {len(positions)} positions")
        self.caches, self.positions = list(caches), [int(p) for p in positions]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: Sequence, layer: int,
               scale: float) -> torch.Tensor:
        """q [N, H, 1, D], k/v [N, Hkv, 1, D] (rotated) -> [N, 1, H, Dv]; row i's k/v go into its own cache."""
        outs = []
        for i, (cache, pos) in enumerate(zip(self.caches, self.positions)):
            ki, vi = cache.update(layer, k[i:i + 1], v[i:i + 1], pos)  # [1, Hkv, pos+1, D]
            outs.append(attention(q[i:i + 1], ki, vi, scale, masks[i]))  # [1, 1, H, Dv]
        return torch.cat(outs)


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an element-wise function with transcendental math (silu, gelu): inside a batched
    decode step (``kernels.decode_rows_scope``) applied one row at a time, because torch's vectorized and
    scalar loops can differ in the last bit and which elements take which depends on the tensor's size."""
    if not _kernels._decode_rows or x.dim() < 2 or x.numel() == x.shape[-1]:
        return fn(x)
    rows = x.reshape(-1, 1, x.shape[-1])  # [M, 1, I]
    return torch.cat([fn(r) for r in rows]).view(x.shape)


def causal_mask(t: int, start_pos: int, dtype: torch.dtype, sliding_window: int | None = None) -> torch.Tensor | None:
    """Additive mask [T, start_pos+T] (0 where visible, dtype min where not); None when nothing is masked."""
    if t == 1 and (not sliding_window or start_pos < sliding_window):  # one query sees every position
        return None
    s = start_pos + t
    q = torch.arange(start_pos, s)[:, None]
    kv = torch.arange(s)[None, :]
    visible = kv <= q
    if sliding_window:
        visible &= kv > q - sliding_window
    if bool(visible.all()):
        return None
    return torch.zeros(t, s, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: torch.Tensor | None) -> torch.Tensor:
    """Eager attention with grouped KV heads.

    q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], mask [T, S] additive -> [B, T, H, Dv].
    Query heads sharing a KV head are folded into the time axis so keys are never repeated.
    """
    b, h, t, d = q.shape
    if t == 1 and _attn_one.takes(q, k, v, mask):  # a bf16 decode step: float32 loops (attn_one)
        return _attn_one.attend_one(q, k, v, scale, mask)
    hkv = k.shape[1]
    rep = h // hkv
    qg = q.reshape(b, hkv, rep * t, d)  # [B, Hkv, rep*T, D]
    scores = torch.matmul(qg, k.transpose(2, 3)) * scale  # [B, Hkv, rep*T, S]
    if mask is not None:
        scores = (scores.view(b, hkv, rep, t, -1) + mask).view(b, hkv, rep * t, -1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, Hkv, rep*T, Dv]
    return out.view(b, h, t, -1).transpose(1, 2)  # [B, T, H, Dv]


# -- experts ---------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

_GATE_UP_DOWN = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _as(w: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """w in dtype dt (w itself when it is: ``Tensor.to`` costs a call even then)."""
    return w if w.dtype is dt else w.to(dt)


def swiglu_expert(x: torch.Tensor, w: dict[str, torch.Tensor], act: Callable = F.silu) -> torch.Tensor:
    """act(x Wg^T) * (x Wu^T) Wd^T for any checkpoint spelling of a gated expert. x [N, H] -> [N, H]."""
    dt = x.dtype
    if "gate_up_proj" in w:  # fused [2I, H]
        gate, up = linear(x, _as(w["gate_up_proj"], dt)).chunk(2, dim=-1)
        return linear(rowwise(act, gate) * up, _as(w["down_proj"], dt))
    for g, u, d in _GATE_UP_DOWN:
        if g in w:
            gate, up = linear_many(x, [(_as(w[g], dt), None), (_as(w[u], dt), None)])  # one kernel call
            return linear(rowwise(act, gate) * up, _as(w[d], dt))
    raise MissingWeightError(f"expert weights have no gated projections (got {sorted(w)})")


def announce(source: "WeightSource", layer: int, topk_ids: torch.Tensor, stack: str | None = None,
             speculative: bool = False) -> None:
    """Tell a source that can prefetch (``ArchiveSource``) which experts of ``layer`` come next, so it
    reads them while the caller computes something else (a shared expert, the current layer)."""
    pf = getattr(source, "prefetch", None)
    if pf is not None:
        pf(layer, sorted(set(topk_ids.reshape(-1).tolist())), stack, speculative=speculative)  # torch.unique's list


def moe_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    source: "WeightSource",
    layer: int,
    stack: str | None = None,
    expert_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] = swiglu_expert,
    after_open: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Routed-expert output for tokens x [N, H] with top-k choices topk_ids/topk_weights [N, K].

    Experts are fetched through ``source.fetch`` in whatever order it yields them; outputs are
    summed per token in ascending expert id, so the result never depends on fetch order (and
    matches transformers' eager loop, which visits experts in that order). ``after_open`` runs once
    the fetch has started (after the first expert), e.g. to prefetch the next layer behind it.
    """
    n, _ = x.shape
    if n == 1:
        out = moe_one(x, topk_ids, topk_weights, source, layer, stack, expert_fn, after_open)
        if out is not None:
            return out
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots grouped by ascending expert id
    ids_sorted = flat[order]
    uniq, counts = torch.unique_consecutive(ids_sorted, return_counts=True)
    wanted: list[int] = uniq.tolist()
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    slot_of = {e: i for i, e in enumerate(wanted)}
    k = topk_ids.shape[-1]
    tok_sorted = order // k  # token index per sorted slot
    w_sorted = topk_weights.reshape(-1)[order]
    ys: list[torch.Tensor | None] = [None] * len(wanted)  # each expert's output [M_e, H]
    # bf16: numba's team at torch's thread count for the loop and the sum, torch's own products keep its count;
    # a fallback sum's index_add_ calls on torch's one thread, not a fork beside numba's spinning team
    with _kernels.single_row_scope(x.dtype is torch.bfloat16):
        for e, weights in source.fetch(layer, wanted, stack):
            i = slot_of[e]
            ys[i] = expert_fn(x[tok_sorted[bounds[i]:bounds[i + 1]]], weights)  # [M_e, H]
            if after_open is not None:
                after_open()
                after_open = None
        if all(y is not None for y in ys) and _ops.takes_sum(x, ys, w_sorted) and distinct_rows(topk_ids):
            return _ops.weighted_sum(x, ys, w_sorted, tok_sorted.numpy(), bounds)  # one call: the same bits
        outs = [None if y is None else (y * w_sorted[bounds[i]:bounds[i + 1], None]).to(x.dtype)
                for i, y in enumerate(ys)]
        return sum_outputs(x, outs, wanted, layer, lambda i: tok_sorted[bounds[i]:bounds[i + 1]])


# -- binding dense weights -------------------------------------------------------------------------


def bind_weights(module: nn.Module, source: "WeightSource", dtype: torch.dtype,
                 rename: Callable[[str], Sequence[str]] | None = None) -> None:
    """Replace every parameter of ``module`` by the source tensor of the same (checkpoint) name.

    ``rename(name)`` may offer alternative checkpoint spellings, tried in order. Tensors already in
    ``dtype`` are bound without a copy; a shape mismatch is an error naming the tensor.
    """
    for full, p in list(module.named_parameters()):
        names = list(rename(full)) if rename else [full]
        name = next((n for n in names if source.has_dense(n)), None)
        if name is None:
            raise MissingWeightError(f"checkpoint has no tensor {names[0]!r}")
        t = source.dense(name)
        if tuple(t.shape) != tuple(p.shape):
            raise MissingWeightError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        if t.dtype != dtype:
            t = t.to(dtype)
        owner_path, _, leaf = full.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        setattr(owner, leaf, nn.Parameter(t, requires_grad=False))


def args_from_dict(cls, cfg: dict, **overrides):
    """Build a config dataclass from config.json: known fields taken, unknown ones ignored."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in cfg.items() if k in names}
    kw.update(overrides)
    return cls(**kw)
