"""Token generation: one prefill forward, then one-token decode steps on the KV cache.

Sampling is greedy or temperature / top-k / top-p with a seeded generator. A batch of prompts is
served by grouping prompts of equal length (no padding, so every row computes exactly what it
would alone); rows stop at EOS or after ``max_new_tokens``.
"""
from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import GenerationError, PromptTooLongError
from .store.buffers import anon_huge_bytes
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["Sampling", "TokenEvent", "GenerationResult", "stream_generate", "generate", "sample_next", "peak_rss_bytes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 1 << 64):
            raise GenerationError(f"seed must be an integer in [0, 2^64) (got {self.seed!r})")
        if not self.greedy:
            if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                    and self.temperature > 0):
                raise GenerationError(f"temperature must be a finite number > 0 (got {self.temperature}); "
                                      "use greedy decoding instead")
            if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
                raise GenerationError(f"top_p must be in (0, 1] (got {self.top_p})")
            if not _is_int(self.top_k) or self.top_k < 0:
                raise GenerationError(f"top_k must be an integer >= 0 (got {self.top_k!r})")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class TokenEvent:
    """One generated token of one sequence."""

    seq: int  # index of the prompt in the batch
    index: int  # position among this sequence's generated tokens (0 = first)
    token_id: int
    text: str  # decoded piece ("" without a tokenizer or while a UTF-8 character is incomplete)
    elapsed_s: float  # since generation started
    step_s: float  # duration of the forward pass that produced it
    finish_reason: str | None = None  # "eos" / "length" on the last token of a sequence


@dataclass
class GenerationResult:
    token_ids: list[list[int]]
    texts: list[str] | None
    stats: dict = field(default_factory=dict)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sample_next(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> next ids [B]."""
    if s.greedy:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > s.top_p  # always keeps the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _check_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    out = [list(map(int, p)) for p in prompts]
    if not out or any(len(p) == 0 for p in out):
        raise GenerationError("empty prompt: give at least one token")
    vocab = model.args.vocab_size
    for p in out:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    ctx = model.max_context
    longest = max(len(p) for p in out)
    if longest >= ctx:
        raise PromptTooLongError(f"prompt has {longest} tokens; the model's context is {ctx} tokens")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0 (got {max_new_tokens!r})")
    return out


def new_stats() -> dict:
    return {"prompt_tokens": 0, "generated_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0, "ttft_s": None,
            "decode_steps": 0, "decode_tokens": 0}


def count_step(st: dict, step: int, dt: float, t0: float) -> None:
    """Book one forward step: the first of a group is prefill (it fixes the TTFT), the rest decode."""
    if step == 0:
        st["prefill_s"] += dt
        if st["ttft_s"] is None:
            st["ttft_s"] = time.perf_counter() - t0
    else:
        st["decode_s"] += dt
        st["decode_steps"] += 1


def emit_tokens(st: dict, nxt: torch.Tensor, rows: list[int], done: list[bool], decoders: list, eos: set,
                step: int, budget: int, t0: float, dt: float) -> Iterator[TokenEvent]:
    """One TokenEvent per still-running row of a step's sampled tokens ``nxt`` [B]."""
    for r, tok in enumerate(nxt.tolist()):
        if done[r]:
            continue
        finish = "eos" if tok in eos else ("length" if step == budget - 1 else None)
        done[r] = finish is not None
        piece = decoders[r].add(tok) if decoders[r] else ""
        if finish and decoders[r]:
            piece += decoders[r].flush()
        st["generated_tokens"] += 1
        st["decode_tokens"] += step > 0
        yield TokenEvent(rows[r], step, tok, piece, time.perf_counter() - t0, dt, finish)


def finish_stats(st: dict, t0: float, stats: dict | None) -> None:
    st["total_s"] = time.perf_counter() - t0
    st["prompt_tok_s"] = st["prompt_tokens"] / st["prefill_s"] if st["prefill_s"] else 0.0
    st["gen_tok_s"] = st["decode_tokens"] / st["decode_s"] if st["decode_s"] else 0.0
    st["peak_rss_bytes"] = peak_rss_bytes()
    st["anon_huge_bytes"] = anon_huge_bytes()  # the process's anonymous memory on huge pages (None: unknown)
    if stats is not None:
        stats.update(st)


def stream_generate(
    model,
    prompts: Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    eos_token_ids: Sequence[int] = (),
    tokenizer: Tokenizer | None = None,
    stats: dict | None = None,
) -> Iterator[TokenEvent]:
    """Yield a TokenEvent per generated token (sequences of one length group are interleaved).

    ``prompts`` is one list of ids or a list of them. If ``stats`` is given it is filled with
    prompt/generation token counts, tokens/s, time to first token and peak RSS when the stream ends.
    Encoder-decoder models (``model.is_encoder_decoder``) are served by ``zipmoe_run.seq2seq``.
    """
    if getattr(model, "is_encoder_decoder", False):
        from .seq2seq import stream_generate_seq2seq

        yield from stream_generate_seq2seq(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                           eos_token_ids=eos_token_ids, tokenizer=tokenizer, stats=stats)
        return
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # type: ignore[list-item]
    plist = _check_prompts(model, prompts, max_new_tokens)
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    eos = set(int(e) for e in eos_token_ids)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(plist):
        groups.setdefault(len(p), []).append(i)
    st = new_stats()
    t0 = time.perf_counter()
    for plen, rows in groups.items():
        budget = min(max_new_tokens, model.max_context - plen)
        if budget < max_new_tokens:
            log.info("max_new_tokens cut to %d by the model's context (%d)", budget, model.max_context)
        if budget == 0:
            continue
        cache = model.new_cache(len(rows), plen + budget)
        decoders = [IncrementalDecoder(tokenizer) if tokenizer else None for _ in rows]
        done = [False] * len(rows)
        x = torch.tensor([plist[i] for i in rows], dtype=torch.long)  # [B, T]
        st["prompt_tokens"] += x.numel()
        pos = 0
        for step in range(budget):
            ts = time.perf_counter()
            logits = model(x, cache, pos, last_only=True)[:, -1]  # [B, V]
            nxt = sample_next(logits, sampling, gen)  # [B]
            dt = time.perf_counter() - ts
            count_step(st, step, dt, t0)
            pos += x.shape[1]
            yield from emit_tokens(st, nxt, rows, done, decoders, eos, step, budget, t0, dt)
            if all(done):
                break
            x = nxt[:, None]  # [B, 1]
    finish_stats(st, t0, stats)

def generate(
    model,
    prompts: Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    eos_token_ids: Sequence[int] = (),
    tokenizer: Tokenizer | None = None,
) -> GenerationResult:
    """Run ``stream_generate`` to the end; token ids (and texts with a tokenizer) per prompt."""
    single = bool(prompts) and isinstance(prompts[0], int)
    n = 1 if single else len(prompts)
    ids: list[list[int]] = [[] for _ in range(n)]
    stats: dict = {}
    for ev in stream_generate(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                              eos_token_ids=eos_token_ids, tokenizer=tokenizer, stats=stats):
        ids[ev.seq].append(ev.token_id)
    texts = [tokenizer.decode(t) for t in ids] if tokenizer else None
    return GenerationResult(ids, texts, stats)
