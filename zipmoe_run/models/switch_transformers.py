"""Switch Transformers (google/switch-base-*, switch-large-128, ...): a T5 encoder-decoder whose FFNs are
top-1 mixtures of experts every ``{encoder,decoder}_sparse_step`` blocks.

Semantics follow transformers' modeling_switch_transformers.py (5.x):

* T5 attention: no score scaling; a bucketed relative position bias computed by the first block of
  each stack and shared by the others (bidirectional in the encoder, causal in the decoder, whose
  query positions continue after the cached ones); cross-attention has no bias.
* T5 layer norm (RMS without mean subtraction, no bias, float32 variance) before every sub-layer,
  residual after it; a final norm per stack.
* Router in ``router_dtype`` (float32): softmax, cast back to the activation dtype, argmax, weight =
  the winning probability. No jitter (inference). **Expert capacity** is applied as transformers
  applies it, at inference too: per batch row, tokens queue for their expert in sequence order and
  those beyond ``expert_capacity`` get a zero MoE output (they keep the residual). Capacity counts
  the tokens of one forward call, so one-token decode steps never overflow.
* Token embeddings per stack (``{stack}.embed_tokens.weight``, else ``shared.weight``), LM head
  ``lm_head.weight`` (else ``shared.weight``); with ``tie_word_embeddings`` the decoder output is
  scaled by ``d_model ** -0.5`` before the head.

Generation is encoder-decoder (``zipmoe_run.seq2seq``): ``encode`` once, ``new_cache`` computes the
cross-attention keys/values once, then ``decode`` steps on the self-attention KV cache.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingWeightError, UnsupportedModelError
from ..kernels import single_row_scope
from ..layers import (ACTIVATIONS, Embedding, KVCache, Linear, RMSNorm, args_from_dict, bind_weights, causal_mask,
                      linear, moe_forward)
from ..source import WeightSource
from ..tokenizer import read_json

# Relative position buckets put no limit on length; this only bounds what one request may allocate.
MAX_CONTEXT = 1 << 15


@dataclass
class ModelArgs:
    ENCODER_DECODER: ClassVar[bool] = True

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_decoder_layers: int | None = 12  # transformers' default when config.json has no such key
    num_heads: int = 12
    num_experts: int = 8
    expert_capacity: int = 64
    num_sparse_encoder_layers: int = 3
    num_sparse_decoder_layers: int = 3
    encoder_sparse_step: int | None = None  # derived as transformers does unless config.json sets it
    decoder_sparse_step: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    router_bias: bool = False
    router_dtype: str = "float32"
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    decoder_start_token_id: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        a = args_from_dict(cls, cfg)
        if a.num_decoder_layers is None:
            a.num_decoder_layers = a.num_layers
        # SwitchTransformersConfig.__post_init__: step = layers // sparse layers (or layers when 0);
        # an explicit *_sparse_step in config.json is applied after that and wins.
        if a.encoder_sparse_step is None:
            n = a.num_sparse_encoder_layers
            a.encoder_sparse_step = a.num_layers // n if n > 0 else a.num_layers
        if a.decoder_sparse_step is None:
            n = a.num_sparse_decoder_layers
            a.decoder_sparse_step = a.num_decoder_layers // n if n > 0 else a.num_decoder_layers
        act = a.dense_act_fn
        if act.startswith("gated-"):  # T5 spelling: "gated-gelu" means gated gelu_new
            a.is_gated_act, act = True, act[len("gated-"):]
            act = "gelu_new" if act == "gelu" else act
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"dense_act_fn {a.dense_act_fn!r} is not supported")
        a.dense_act_fn = act
        if not hasattr(torch, a.router_dtype) or not isinstance(getattr(torch, a.router_dtype), torch.dtype):
            raise UnsupportedModelError(f"router_dtype {a.router_dtype!r} is not a torch dtype")
        return a

    def is_sparse(self, stack: str, i: int) -> bool:
        """transformers' rule: block i is sparse if i % step == 1 (every block when step == 1)."""
        step = self.encoder_sparse_step if stack == "encoder" else self.decoder_sparse_step
        return (i % step == 1 or step == 1) if step > 0 else False


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of ``rel = key_pos - query_pos``: exact for small distances, log-spaced up to max_distance."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).to(torch.long) * num_buckets
        rel = torch.abs(rel)
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, rel, large)


class Attention(nn.Module):
    """T5 attention (unscaled scores plus an additive bias); ``relative_attention_bias`` only in block 0."""

    def __init__(self, a: ModelArgs, has_bias: bool, bidirectional: bool):
        super().__init__()
        self.n_heads, self.d_kv = a.num_heads, a.d_kv
        inner = a.num_heads * a.d_kv
        self.q = Linear(a.d_model, inner, bias=False)
        self.k = Linear(a.d_model, inner, bias=False)
        self.v = Linear(a.d_model, inner, bias=False)
        self.o = Linear(inner, a.d_model, bias=False)
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = a.relative_attention_num_buckets, a.relative_attention_max_distance
        if has_bias:
            self.relative_attention_bias = Embedding(a.relative_attention_num_buckets, a.num_heads)

    def position_bias(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """[1, nH, q_len, k_len] for queries at offset..offset+q_len-1 and keys at 0..k_len-1."""
        ctx = torch.arange(q_len, dtype=torch.long)[:, None] + offset
        mem = torch.arange(k_len, dtype=torch.long)[None, :]
        bucket = relative_position_bucket(mem - ctx, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)

    def heads(self, proj: Linear, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # [B, T, D]
        return proj(x).view(b, t, self.n_heads, self.d_kv).transpose(1, 2)  # [B, nH, T, Dkv]

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.heads(self.q, x)  # [B, nH, T, Dkv]
        scores = torch.matmul(q, k.transpose(2, 3))  # [B, nH, T, S], no 1/sqrt(d) in T5
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(probs, v)  # [B, nH, T, Dkv]
        return self.o(o.transpose(1, 2).reshape(b, t, -1))


class LayerSelfAttention(nn.Module):
    def __init__(self, a: ModelArgs, has_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = Attention(a, has_bias, bidirectional)
        self.layer_norm = RMSNorm(a.d_model, a.layer_norm_epsilon)

    def forward(self, x, bias, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0):
        h = self.layer_norm(x)  # [B, T, D]
        att = self.SelfAttention
        k, v = att.heads(att.k, h), att.heads(att.v, h)  # [B, nH, T, Dkv]
        if cache is not None:
            k, v = cache.update(layer, k, v, start_pos)  # [B, nH, start_pos+T, Dkv]
        return x + att(h, k, v, bias)


class LayerCrossAttention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.EncDecAttention = Attention(a, False, True)
        self.layer_norm = RMSNorm(a.d_model, a.layer_norm_epsilon)

    def forward(self, x, k, v):
        return x + self.EncDecAttention(self.layer_norm(x), k, v, None)


def _ffn(x: torch.Tensor, w: dict[str, torch.Tensor], act: Callable, gated: bool) -> torch.Tensor:
    """wo(act(wi x)), or T5's gated form wo(act(wi_0 x) * wi_1 x). x [N, D] -> [N, D]."""
    dt = x.dtype
    try:
        if gated:
            h = act(linear(x, w["wi_0"].to(dt))) * linear(x, w["wi_1"].to(dt))
        else:
            h = act(linear(x, w["wi"].to(dt)))
        return linear(h, w["wo"].to(dt))
    except KeyError as exc:
        want = "wi_0, wi_1, wo" if gated else "wi, wo"
        raise MissingWeightError(f"feed-forward weights {want} expected, got {sorted(w)} (missing {exc})") from None


class DenseFF(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gated, self.act = a.is_gated_act, ACTIVATIONS[a.dense_act_fn]
        names = ("wi_0", "wi_1") if self.gated else ("wi",)
        for n in names:
            setattr(self, n, Linear(a.d_model, a.d_ff, bias=False))
        self.wo = Linear(a.d_ff, a.d_model, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        w = {n: m.weight for n, m in self.named_children()}
        return _ffn(x.reshape(-1, d), w, self.act, self.gated).view(b, t, d)


class Router(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.classifier = Linear(a.d_model, a.num_experts, bias=a.router_bias)
        self.dtype = getattr(torch, a.router_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.to(self.dtype))  # [B, T, E] in router dtype


class SparseFF(nn.Module):
    """Top-1 routed experts with per-row expert capacity; experts come from ``source.fetch``."""

    def __init__(self, a: ModelArgs, stack: str, layer: int, source: WeightSource):
        super().__init__()
        self.router = Router(a)
        self.stack, self.layer, self.source = stack, layer, source
        self.capacity, self.n_experts = a.expert_capacity, a.num_experts
        self.gated, self.act = a.is_gated_act, ACTIVATIONS[a.dense_act_fn]
        self.dropped = 0  # tokens that overflowed an expert's capacity, summed over calls

    def _expert(self, x, w):
        return _ffn(x, w, self.act, self.gated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        logits = self.router(x)  # [B, T, E]
        probs = torch.softmax(logits, dim=-1, dtype=self.router.dtype).to(x.dtype)
        top_i = probs.argmax(dim=-1)  # [B, T]
        top_w = probs.max(dim=-1).values  # [B, T]
        # place of each token in its expert's queue, counted along the sequence of its own row
        prio = F.one_hot(top_i, self.n_experts).cumsum(dim=1).gather(-1, top_i[..., None]).squeeze(-1)  # [B, T]
        keep = (prio <= self.capacity).view(-1)
        kept = keep.nonzero().squeeze(-1)  # [N_kept]
        self.dropped += b * t - kept.numel()
        flat = x.reshape(-1, d)  # [N, D]
        out = torch.zeros_like(flat)
        if kept.numel():
            ids, w = top_i.view(-1)[kept, None], top_w.view(-1)[kept, None]  # [N_kept, 1]
            out[kept] = moe_forward(flat[kept], ids, w, self.source, self.layer, self.stack, self._expert)
        return out.view(b, t, d)


class LayerFF(nn.Module):
    def __init__(self, a: ModelArgs, stack: str, layer: int, source: WeightSource):
        super().__init__()
        self.mlp = SparseFF(a, stack, layer, source) if a.is_sparse(stack, layer) else DenseFF(a)
        self.layer_norm = RMSNorm(a.d_model, a.layer_norm_epsilon)

    def forward(self, x):
        return x + self.mlp(self.layer_norm(x))


class EncoderBlock(nn.Module):
    def __init__(self, a: ModelArgs, i: int, source: WeightSource):
        super().__init__()
        self.layer = nn.ModuleList([LayerSelfAttention(a, i == 0, True), LayerFF(a, "encoder", i, source)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class DecoderBlock(nn.Module):
    def __init__(self, a: ModelArgs, i: int, source: WeightSource):
        super().__init__()
        self.i = i
        self.layer = nn.ModuleList([LayerSelfAttention(a, i == 0, False), LayerCrossAttention(a),
                                    LayerFF(a, "decoder", i, source)])

    def forward(self, x, bias, cache: "Seq2SeqCache", start_pos: int):
        x = self.layer[0](x, bias, cache.self_kv, self.i, start_pos)
        x = self.layer[1](x, *cache.cross[self.i])
        return self.layer[2](x)


class Stack(nn.Module):
    def __init__(self, a: ModelArgs, block: type, n: int, source: WeightSource):
        super().__init__()
        self.embed_tokens = Embedding(a.vocab_size, a.d_model)
        self.block = nn.ModuleList(block(a, i, source) for i in range(n))
        self.final_layer_norm = RMSNorm(a.d_model, a.layer_norm_epsilon)


@dataclass
class Seq2SeqCache:
    """Decoder state of one batch: self-attention KV cache and per-block cross-attention keys/values."""

    self_kv: KVCache
    cross: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder block: k, v [B, nH, S_enc, Dkv]

    @property
    def max_len(self) -> int:
        return self.self_kv.max_len


def _start_token(args: ModelArgs, source: WeightSource) -> int:
    """generation_config.json, then config.json ``decoder_start_token_id``; else the pad id (T5), else 0."""
    gen = read_json(source, "generation_config.json")
    for v in (gen.get("decoder_start_token_id"), args.decoder_start_token_id, args.pad_token_id):
        if isinstance(v, int):
            return v
    return 0


class Model(nn.Module):
    is_encoder_decoder = True

    def __init__(self, args: ModelArgs, source: WeightSource, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.args, self.dtype = args, dtype
        if args.num_experts < 1 or args.num_heads < 1 or args.num_layers < 1 or args.num_decoder_layers < 1:
            raise UnsupportedModelError("switch_transformers needs at least one layer, head and expert per stack")
        with torch.device("meta"):
            self.encoder = Stack(args, EncoderBlock, args.num_layers, source)
            self.decoder = Stack(args, DecoderBlock, args.num_decoder_layers, source)
            self.lm_head = Linear(args.d_model, args.vocab_size, bias=False)
        self.scale_output = args.d_model**-0.5 if args.tie_word_embeddings else None

        def rename(name: str) -> list[str]:
            # transformers 5 prefers each stored tensor and falls back to shared.weight when it is absent
            if name.endswith("embed_tokens.weight"):
                return [name, "shared.weight"]
            if name == "lm_head.weight":
                return [name, "shared.weight"] if args.tie_word_embeddings else [name]
            return [name]

        bind_weights(self, source, dtype, rename)
        for name, m in self.named_modules():  # routers keep their own dtype (selective precision)
            if isinstance(m, Router):
                for leaf in ("weight", "bias"):
                    if getattr(m.classifier, leaf, None) is not None:
                        t = source.dense(f"{name}.classifier.{leaf}").to(m.dtype)
                        setattr(m.classifier, leaf, nn.Parameter(t, requires_grad=False))
        self.decoder_start_token_id = _start_token(args, source)

    @property
    def max_context(self) -> int:
        return MAX_CONTEXT

    def sparse_blocks(self) -> list[SparseFF]:
        return [m for m in self.modules() if isinstance(m, SparseFF)]

    @torch.inference_mode()
    def encode(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Encoder output [B, S, D] for input_ids [B, S] (no padding: every position is attended)."""
        enc = self.encoder
        h = enc.embed_tokens(input_ids)  # [B, S, D]
        s = h.shape[1]
        bias = enc.block[0].layer[0].SelfAttention.position_bias(s, s)  # [1, nH, S, S]
        for blk in enc.block:
            h = blk(h, bias)
        return enc.final_layer_norm(h)

    @torch.inference_mode()
    def new_cache(self, encoder_out: torch.Tensor, max_len: int) -> Seq2SeqCache:
        """Decoder cache for ``max_len`` decoder positions; cross-attention K/V computed here, once."""
        a = self.args
        cross = []
        for blk in self.decoder.block:
            att = blk.layer[1].EncDecAttention
            cross.append((att.heads(att.k, encoder_out), att.heads(att.v, encoder_out)))
        kv = KVCache(a.num_decoder_layers, encoder_out.shape[0], max_len, a.num_heads, a.d_kv, None, self.dtype)
        return Seq2SeqCache(kv, cross)

    @torch.inference_mode()
    def decode(self, input_ids: torch.LongTensor, cache: Seq2SeqCache, start_pos: int,
               last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (float32) for decoder tokens [B, T] at positions start_pos.. on ``cache``."""
        with single_row_scope(input_ids.numel() == 1 and self.dtype is torch.bfloat16):
            return self._decode(input_ids, cache, start_pos, last_only)

    def _decode(self, input_ids, cache: Seq2SeqCache, start_pos: int, last_only: bool) -> torch.Tensor:
        dec = self.decoder
        h = dec.embed_tokens(input_ids)  # [B, T, D]
        t = h.shape[1]
        bias = dec.block[0].layer[0].SelfAttention.position_bias(t, start_pos + t, start_pos)  # [1, nH, T, S]
        mask = causal_mask(t, start_pos, bias.dtype)
        if mask is not None:
            bias = bias + mask  # visible entries keep the bias exactly (+0)
        for blk in dec.block:
            h = blk(h, bias, cache, start_pos)
        h = dec.final_layer_norm(h[:, -1:] if last_only else h)
        if self.scale_output is not None:
            h = h * self.scale_output
        return self.lm_head(h).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.LongTensor, decoder_input_ids: torch.LongTensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]: encoder on input_ids [B, S], decoder on decoder_input_ids [B, T]."""
        enc = self.encode(input_ids)
        cache = self.new_cache(enc, decoder_input_ids.shape[1])
        return self.decode(decoder_input_ids, cache, 0)
