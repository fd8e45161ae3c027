"""Encoder-decoder generation (Switch Transformers / T5 family): encode once, then decode on the cache.

For each group of equal-length prompts (no padding, so each row computes what it would alone) the
encoder runs once; the model's ``new_cache`` computes every decoder block's cross-attention
keys/values once; the decoder starts from ``model.decoder_start_token_id`` and takes one-token steps
on its self-attention KV cache. Events and stats are those of ``zipmoe_run.generate.stream_generate``,
which dispatches here for models with ``is_encoder_decoder``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import torch

from .generate import (Sampling, TokenEvent, _check_prompts, count_step, emit_tokens, finish_stats, new_stats,
                       sample_next)
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["stream_generate_seq2seq"]

log = logging.getLogger(__name__)


def stream_generate_seq2seq(
    model,
    prompts: Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    eos_token_ids: Sequence[int] = (),
    tokenizer: Tokenizer | None = None,
    stats: dict | None = None,
) -> Iterator[TokenEvent]:
    """Yield a TokenEvent per generated decoder token; ``prompts`` are encoder inputs (EOS included)."""
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # type: ignore[list-item]
    plist = _check_prompts(model, prompts, max_new_tokens)
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    eos = set(int(e) for e in eos_token_ids)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(plist):
        groups.setdefault(len(p), []).append(i)
    st = new_stats()
    budget = min(max_new_tokens, model.max_context)
    if budget < max_new_tokens:
        log.info("max_new_tokens cut to %d by the model's context (%d)", budget, model.max_context)
    t0 = time.perf_counter()
    for _, rows in groups.items():
        if budget == 0:
            break
        ts = time.perf_counter()
        x = torch.tensor([plist[i] for i in rows], dtype=torch.long)  # [B, S]
        cache = model.new_cache(model.encode(x), budget)
        st["prompt_tokens"] += x.numel()
        decoders = [IncrementalDecoder(tokenizer) if tokenizer else None for _ in rows]
        done = [False] * len(rows)
        y = torch.full((len(rows), 1), model.decoder_start_token_id, dtype=torch.long)  # [B, 1]
        for step in range(budget):
            if step:
                ts = time.perf_counter()
            logits = model.decode(y, cache, step, last_only=True)[:, -1]  # [B, V]
            nxt = sample_next(logits, sampling, gen)  # [B]
            dt = time.perf_counter() - ts  # the first step includes the encoder and the cross K/V
            count_step(st, step, dt, t0)
            yield from emit_tokens(st, nxt, rows, done, decoders, eos, step, budget, t0, dt)
            if all(done):
                break
            y = nxt[:, None]  # [B, 1]
    finish_stats(st, t0, stats)
