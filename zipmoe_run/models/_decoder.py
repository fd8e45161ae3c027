"""The decoder-only skeleton every decoder family shares (qwen2_moe, qwen3_moe, olmoe, mixtral,
deepseek_v2, deepseek_v3).

A family file defines its ModelArgs (with ``is_sparse(layer)``) and its attention (a subclass of
``Attention`` naming what differs, or its own module: DeepSeek's MLA), then
``class DecoderLayer(MoEDecoderLayer)`` naming its ``attention_cls`` (and ``moe_cls`` or
``block_name`` where they differ) and ``class Model(DecoderLM)`` with ``layer_cls = DecoderLayer``;
it overrides ``weight_names``, ``masks``, ``rope_dim`` or ``new_cache`` where the family differs.
Every projection is a ``layers.Linear``, so one-token bf16 steps use the runtime's GEMV kernel, and
``DecoderLM.forward`` runs them in ``single_row_scope`` (numba's threads, torch on one).

The routed-expert block is ``RoutedMoE`` (transformers' softmax top-k router: qwen2_moe, qwen3_moe,
olmoe, mixtral); a family with a shared expert (qwen2_moe) extends it. Every layer supports router
lookahead (zipmoe_run.lookahead) through its ``moe`` accessor and ``lookahead`` attribute.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import decode_ops as _ops
from ._step import step as one_token_step
from ..errors import UnsupportedModelError
from ..kernels import decode_rows_scope, single_row_scope
from ..lookahead import link_lookahead
from ..layers import (
    ACTIVATIONS,
    Embedding,
    KVCache,
    Linear,
    RaggedKV,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    args_from_dict,
    attention,
    bind_weights,
    causal_mask,
    linear_many,
    moe_forward,
    rope_config,
    rope_inv_freq,
    rowwise,
    swiglu_expert,
)
from ..source import WeightSource


def project(x: torch.Tensor, mods) -> list[torch.Tensor]:
    """``[m(x) for m in mods]``: one kernel call (``linear_many``) where every module is a plain bf16
    ``Linear``; a module holding its weight in another form (``resident.X12Linear``) runs its own
    forward (reading ``.weight`` there would decode the whole matrix per product)."""
    if all(type(m) is Linear for m in mods):
        return linear_many(x, [(m.weight, m.bias) for m in mods])
    return [m(x) for m in mods]


def gqa_args(cls, cfg: dict, experts: str, alias: str, default_theta: float = 10000.0):
    """ModelArgs of a grouped-query family from config.json: the expert count under ``experts`` or its
    other spelling ``alias``, RoPE settings normalised, num_key_value_heads defaulting to the query
    heads and head_dim to hidden_size / heads; an activation the runtime lacks is refused."""
    if experts not in cfg and alias in cfg:
        cfg = {**cfg, experts: cfg[alias]}
    a = args_from_dict(cls, cfg, rope=rope_config(cfg, default_theta))
    a.num_key_value_heads = a.num_key_value_heads or a.num_attention_heads
    a.head_dim = a.head_dim or a.hidden_size // a.num_attention_heads
    if a.hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(f"hidden_act {a.hidden_act!r} is not supported")
    return a


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings (transformers' half rotation).

    What the families change is a constructor argument: biases on q/k/v (``qkv_bias``) and on the
    output (``o_bias``), an RMSNorm on q and k (``qk_norm``: "head" normalises each head, Qwen3;
    "full" the whole projection, OLMoE) and clipping of q, k, v to +-``clip`` (OLMoE's clip_qkv).
    """

    def __init__(self, a, *, qkv_bias: bool = False, o_bias: bool = False, qk_norm: str | None = None,
                 clip: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = Linear(a.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(a.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(a.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, a.hidden_size, bias=o_bias)
        self.qk_norm, self.clip = qk_norm, clip
        if qk_norm is not None:
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else self.n_heads * self.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else self.n_kv * self.head_dim, a.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache, layer: int, start_pos: int) -> torch.Tensor:
        b, t, _ = x.shape  # [B, T, H]
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))  # [B, T, n*D]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q, k, v = (z.view(b, t, -1, self.head_dim) for z in (q, k, v))  # [B, T, n, D]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if not isinstance(cache, RaggedKV) and _ops.takes_rope_cache(q, k, v, cos, sin, cache, layer, start_pos):
            q, k, v = _ops.rope_cache(q, k, v, cos, sin, cache.k[layer], cache.v[layer], start_pos)  # one call
            return self.o_proj(attention(q, k, v, self.scale, mask).reshape(b, t, -1))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, nH or nKV, T, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(cache, RaggedKV):  # a decode step of B sequences: each row on its own cache
            o = cache.attend(q, k, v, mask, layer, self.scale)  # [B, 1, nH, D]
        else:
            k, v = cache.update(layer, k, v, start_pos)  # [B, nKV, S, D]
            o = attention(q, k, v, self.scale, mask)  # [B, T, nH, D]
        return self.o_proj(o.reshape(b, t, -1))


class MLP(nn.Module):
    """Gated dense MLP (a dense layer's MLP, or a shared expert)."""

    def __init__(self, hidden: int, inter: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        gate, up = project(x, (self.gate_proj, self.up_proj))  # one kernel call
        return self.down_proj(rowwise(self.act, gate) * up)


class RoutedMoE(nn.Module):
    """Routed experts behind a float32 softmax top-k router (``gate``), as transformers computes it.

    ``norm_topk`` renormalises the top-k probabilities; the weights are then cast to the router
    logits' dtype, unless ``keep_float32`` (Mixtral's router keeps them float32). The experts are
    gated MLPs fetched from ``source`` per layer (``moe_forward``).
    """

    keep_float32 = False

    def __init__(self, a, layer: int, source: WeightSource, n_experts: int | None = None,
                 norm_topk: bool | None = None):
        super().__init__()
        self.layer, self.source, self.top_k = layer, source, a.num_experts_per_tok
        self.norm_topk = a.norm_topk_prob if norm_topk is None else norm_topk
        self.act = ACTIVATIONS[a.hidden_act]
        self.gate = Linear(a.hidden_size, a.num_experts if n_experts is None else n_experts, bias=False)

    def _expert(self, x, w):
        return swiglu_expert(x, w, self.act)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flat [N, H] -> top-k weights [N, K], expert ids [N, K] (int64)."""
        logits = self.gate(flat)  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # [N, E] float32
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        if self.norm_topk:
            top_w /= top_w.sum(dim=-1, keepdim=True)
        return (top_w if self.keep_float32 else top_w.to(logits.dtype)), top_i

    def forward(self, x: torch.Tensor, after_open: Callable[[], None] | None = None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]; ``after_open`` runs once this layer's fetch is open (lookahead)."""
        b, t, h = x.shape
        flat = x.view(-1, h)  # [N, H]
        top_w, top_i = self.route(flat)  # [N, K]
        return moe_forward(flat, top_i, top_w, self.source, self.layer, None, self._expert, after_open).view(b, t, h)


class MoEDecoderLayer(nn.Module):
    """Pre-norm decoder layer: h = x + attn(norm(x)); out = h + block(norm(h)).

    The block is ``moe_cls`` where ``a.is_sparse(layer)``, else a dense ``MLP`` of ``intermediate_size``;
    it is stored under ``block_name`` (its checkpoint spelling: ``mlp``, Mixtral's ``block_sparse_moe``).
    ``lookahead`` (set by ``link_lookahead``, None when off) prefetches the next layer's guessed experts.
    """

    attention_cls: type[nn.Module]
    moe_cls: type[nn.Module] = RoutedMoE
    block_name = "mlp"

    def __init__(self, a, layer: int, source: WeightSource):
        super().__init__()
        self.layer = layer
        self.self_attn = self.attention_cls(a)
        block = self.moe_cls(a, layer, source) if a.is_sparse(layer) else self.dense_block(a)
        self.add_module(self.block_name, block)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lookahead = None  # zipmoe_run.lookahead: prefetch the next layer's guessed experts
        self._step = None  # _step.LayerStep: this layer's one-token step, worked out at the first one

    def dense_block(self, a) -> nn.Module:
        """The MLP of a layer that does not route (``intermediate_size`` wide)."""
        return MLP(a.hidden_size, a.intermediate_size, a.hidden_act)

    @property
    def moe(self) -> nn.Module | None:
        """This layer's routed-expert block (it has ``route``), or None on a dense layer."""
        block = getattr(self, self.block_name)
        return block if hasattr(block, "route") else None

    def attention_mask(self, masks):  # this layer's mask out of what ``DecoderLM.masks`` built
        return masks

    def forward(self, x, cos, sin, masks, cache, start_pos, last_only: bool = False):
        """x [B, T, H] -> [B, T, H]; [B, 1, H] with ``last_only`` (the last layer when only the last logits
        are wanted): every position's K/V is cached, the block runs on the last position (specs/runtime.md 11).
        A one-token bf16 step goes through ``_step.step`` (the same calls without the glue) where it applies."""
        if x.shape[1] == 1 and (y := one_token_step(self, x, cos, sin, masks, cache, start_pos)) is not None:
            return y
        ragged = isinstance(cache, RaggedKV)  # one mask per row (``DecoderLM.decode_step``)
        mask = [self.attention_mask(m) for m in masks] if ragged else self.attention_mask(masks)
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer, start_pos)  # [B, T, H]
        if last_only and h.shape[1] > 1:
            h = h[:, -1:].contiguous()  # [B, 1, H]
        moe = self.moe
        if moe is None:
            return h + getattr(self, self.block_name)(self.post_attention_layernorm(h))
        hook = self.lookahead(h) if self.lookahead is not None else None
        return h + moe(self.post_attention_layernorm(h), hook)


class Backbone(nn.Module):
    def __init__(self, a, layer_cls, source: WeightSource):
        super().__init__()
        self.embed_tokens = Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(layer_cls(a, i, source) for i in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class DecoderLM(nn.Module):
    layer_cls: type[nn.Module]
    rope_dtype: torch.dtype | None = None  # cos/sin tables in this dtype (None: the activations')

    def __init__(self, args, source: WeightSource, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.args, self.dtype = args, dtype
        with torch.device("meta"):
            self.model = Backbone(args, self.layer_cls, source)
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(*rope_inv_freq(args.rope, self.rope_dim, args.max_position_embeddings))
        bind_weights(self, source, dtype, self.weight_names)
        self.source = source

    def set_lookahead(self, enabled: bool) -> int:
        """Router lookahead prefetch (zipmoe_run.lookahead) on or off; returns the layers that use it."""
        return link_lookahead(self.model.layers, self.source, enabled)

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of a head."""
        return self.args.head_dim

    def weight_names(self, name: str) -> list[str]:
        """Checkpoint spellings of a parameter, in order of preference (the LM head may be tied)."""
        if name == "lm_head.weight" and self.args.tie_word_embeddings:
            return ["model.embed_tokens.weight"]
        return [name]

    def masks(self, t: int, start_pos: int, dtype: torch.dtype):
        """What each layer's attention receives as its mask."""
        return causal_mask(t, start_pos, dtype, getattr(self.args, "sliding_window", None))

    @property
    def max_context(self) -> int:
        return self.args.max_position_embeddings

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, batch, max_len, a.num_key_value_heads, a.head_dim, None, self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.LongTensor, cache: KVCache, start_pos: int, last_only: bool = False):
        with self._chunk_scope(input_ids):
            h, cos, sin, mask = self._chunk_inputs(input_ids, start_pos)
            last = len(self.model.layers) - 1
            for i, layer in enumerate(self.model.layers):
                h = layer(h, cos, sin, mask, cache, start_pos, last_only and i == last)  # [B, T or 1, H]
            return self._chunk_logits(h, last_only)  # [B, T or 1, V]

    def _chunk_scope(self, input_ids: torch.LongTensor):
        return single_row_scope(input_ids.numel() == 1 and self.dtype is torch.bfloat16)

    def _chunk_inputs(self, input_ids: torch.LongTensor, start_pos: int):
        """input_ids [B, T] -> h [B, T, H], cos/sin [T, D], mask: what every layer of ``forward`` gets."""
        t = input_ids.shape[1]
        h = self.model.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = self.rope(torch.arange(start_pos, start_pos + t), self.rope_dtype or h.dtype)  # [T, D]
        return h, cos, sin, self.masks(t, start_pos, h.dtype)

    def _chunk_logits(self, h: torch.Tensor, last_only: bool) -> torch.Tensor:
        h = self.model.norm(h[:, -1:] if last_only else h)
        return self.lm_head(h).float()  # [B, T or 1, V]

    # -- batched decoding of independent sequences (zipmoe_run.engine) ----------------------------------

    def ragged_unsupported(self) -> str | None:
        """Why :meth:`decode_step` cannot run this model (one line), or None when it can: it needs every
        layer to attend through the shared ``Attention`` (DeepSeek's MLA does not)."""
        if all(isinstance(layer.self_attn, Attention) for layer in self.model.layers):
            return None
        family = type(self).__module__.rpartition(".")[2]
        return f"{family}: batched decoding is not supported for this family (its attention is its own)"

    @torch.inference_mode()
    def decode_step(self, token_ids, caches, positions) -> torch.Tensor:
        """One decode step of N independent sequences: row i feeds ``token_ids[i]`` at ``positions[i]``
        into its own cache ``caches[i]`` (a ``new_cache(1, ...)``) -> logits [N, V] float32.

        Embeddings, projections, norms, routers, experts and lm_head run once over the N rows (each
        layer fetches the union of the experts the rows route to, once); rotary tables, the KV update,
        masks and the attention core are per row. Everything runs in ``kernels.decode_rows_scope``, so
        every row computes bit for bit what a step of that sequence alone (N = 1) computes.
        """
        self._check_rows(token_ids, caches, positions)
        with self._rows_scope():
            h, cos, sin, masks, kv = self._rows_inputs(token_ids, caches, positions)
            for layer in self.model.layers:
                h = layer(h, cos, sin, masks, kv, None)
            return self._rows_logits(h)  # [N, V]

    @torch.inference_mode()
    def prefill_and_decode_step(self, input_ids: torch.LongTensor, cache: KVCache, start_pos: int,
                                token_ids, caches, positions, last_only: bool = False
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefill chunk and a decode step together, layer by layer: what ``forward(input_ids, cache,
        start_pos, last_only)`` and ``decode_step(token_ids, caches, positions)`` return, bit for bit
        (chunk logits [B, T or 1, V], row logits [N, V]). See :meth:`sweep`."""
        (chunk,), rows = self.sweep([(input_ids, cache, start_pos, last_only)], token_ids, caches, positions)
        return chunk, rows

    @torch.inference_mode()
    def sweep(self, chunks, token_ids=(), caches=(), positions=()) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Prefill chunks and a decode step in one sweep of the layers: ``chunks`` is a list of
        ``(input_ids [B, T], cache, start_pos, last_only)``, each what ``forward`` takes; the rows (none: no
        decode step) what ``decode_step`` takes. Returns each chunk's ``forward`` logits and the rows'
        ``decode_step`` logits (None without rows), bit for bit.

        At each layer every chunk's layer call runs (in ``forward``'s kernel scope), then the rows' (in
        ``decode_step``'s), so under a memory budget the later fetches of a layer come right after the
        first one and find resident what it just read (separate calls would sweep every layer's experts
        once each). Each call sees exactly the inputs it would see alone, so the results are the separate
        calls' results.
        """
        rows = len(token_ids) > 0
        if rows:
            self._check_rows(token_ids, caches, positions)
        hs = []
        for ids, _, start, _ in chunks:
            with self._chunk_scope(ids):
                hs.append(self._chunk_inputs(ids, start))  # h [B, T, H], cos, sin, mask
        if rows:
            with self._rows_scope():
                hr, cos_r, sin_r, masks_r, kv = self._rows_inputs(token_ids, caches, positions)
        last = len(self.model.layers) - 1
        for j, layer in enumerate(self.model.layers):
            for i, ((ids, cache, start, lo), (h, cos, sin, mask)) in enumerate(zip(chunks, hs)):
                with self._chunk_scope(ids):
                    hs[i] = (layer(h, cos, sin, mask, cache, start, lo and j == last), cos, sin, mask)  # [B, T or 1, H]
            if rows:
                with self._rows_scope():
                    hr = layer(hr, cos_r, sin_r, masks_r, kv, None)  # [N, 1, H]
        out = []
        for (ids, _, _, last_only), (h, *_) in zip(chunks, hs):
            with self._chunk_scope(ids):
                out.append(self._chunk_logits(h, last_only))
        if not rows:
            return out, None
        with self._rows_scope():
            return out, self._rows_logits(hr)

    def _check_rows(self, token_ids, caches, positions) -> None:
        why = self.ragged_unsupported()
        if why is not None:
            raise UnsupportedModelError(why)
        n = len(token_ids)
        if not n == len(caches) == len(positions):
            raise ValueError(f"decode_step: {n} tokens, {len(caches)} caches, {len(positions)} positions")

    def _rows_scope(self):
        return decode_rows_scope(bf16=self.dtype is torch.bfloat16)

    def _rows_inputs(self, token_ids, caches, positions):
        """What every layer of ``decode_step`` gets: h [N, 1, H], cos/sin [N, 1, 1, D], per-row masks, RaggedKV."""
        ids = torch.tensor([int(t) for t in token_ids], dtype=torch.long)[:, None]  # [N, 1]
        h = self.model.embed_tokens(ids)  # [N, 1, H]
        dt = self.rope_dtype or h.dtype
        rows = [self.rope(torch.arange(p, p + 1), dt) for p in positions]  # per row, as alone: [1, D] each
        cos = torch.stack([c for c, _ in rows])[:, None]  # [N, 1, 1, D]: broadcast over heads
        sin = torch.stack([s for _, s in rows])[:, None]
        masks = [self.masks(1, p, h.dtype) for p in positions]
        return h, cos, sin, masks, RaggedKV(caches, positions)

    def _rows_logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        return self.lm_head(h)[:, -1].float()  # [N, V]
