"""Continuous batching: one engine thread owns the model and serves many requests at once.

Requests wait in a bounded queue. At every token boundary, finished and cancelled sequences leave the
running batch (their KV cache is dropped) and waiting ones join, up to ``max_batch``. Every engine
iteration runs prefill chunks (``prefill_chunk`` tokens of one request each: a chunk never mixes
requests' tokens) and then one decode step of every decoding sequence (``DecoderLM.decode_step``: one
token per sequence, each on its own cache and position; each layer fetches the union of the experts the
batch routes to, once). The chunks and the step run in one sweep of the layers (``DecoderLM.sweep``: at
each layer every chunk's call, then the rows'), so under a budget the later fetches of a layer find
resident what the first just read, instead of one sweep of every layer each. How many requests get a
chunk per iteration: one where every expert fits the budget (a chunk then costs its compute, about one
full step); where they do not (a sweep then costs its expert reads), up to ``prefill_chunks``: all while
nothing decodes, and beside decoding rows as many as a decode step's measured time covers at a chunk's
measured compute (``_chunks_now``). So a decoding stream waits about one step's time (or one chunk) at
most between two of its steps.

Batch invariance: a decode step computes each row exactly as a step of that sequence alone
(``kernels.decode_rows_scope``), and a prefill depends only on its own prompt and the chunk size, so a
request gives the same tokens alone or in any batch (greedy, or sampled with a seed: each request has
its own ``torch.Generator``). See specs/runtime.md, "Batched decoding".

    eng = Engine(load("model.zmoe"), max_batch=8)
    eng.start()
    h = eng.submit(ids, 32, Sampling())
    ids, text, finish = h.result()
    eng.shutdown()
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from .engine_handle import EngineClosedError, EngineEvent, Handle, QueueFullError
from .engine_text import TextStream, check_stops
from .errors import GenerationError, PromptTooLongError, UnsupportedModelError
from .generate import Sampling, _is_int, peak_rss_bytes, sample_next

__all__ = ["Engine", "EngineEvent", "Handle", "QueueFullError", "EngineClosedError", "DEFAULT_PREFILL_CHUNK"]

log = logging.getLogger(__name__)

#: prompt tokens per prefill chunk. Measured on host C (2 threads, a 4-layer qwen2_moe with hidden 1024,
#: 16 experts of 704, top-4, all resident; medians of 5, loaded host): a 16-token chunk took 36 ms, a
#: decode step of 8 sequences 32 ms, of 4 17.6 ms, of 1 9.1 ms (32 tokens: 46 ms; 64: 66 ms). A chunk
#: touches nearly every expert of a layer and runs the attention and dense GEMMs, so it never costs
#: less than a few one-sequence steps; 16 tokens cost about one step of a full batch of 8.
DEFAULT_PREFILL_CHUNK = 16


def _sweep_bound(lm) -> bool:
    """True when the model's experts do not all fit its store's budget: a sweep of the layers then reads
    experts, and costs far more than the compute of a few prefill chunks riding along in it."""
    store = getattr(lm.source, "store", None)
    cap = getattr(store, "capacity", None)
    return cap is not None and cap < int(getattr(store, "expert_bytes", 0) or 0)


class _Seq:
    """A running request: its prompt, its KV cache, where it is, how it samples and releases text."""

    def __init__(self, h: Handle, prompt: list[int], budget: int, sampling: Sampling, stream: TextStream):
        self.h, self.prompt, self.budget, self.sampling, self.stream = h, prompt, budget, sampling, stream
        self.gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.cache = None
        self.prefilled = 0  # prompt tokens in the cache
        self.pos = 0  # tokens in the cache
        self.last = -1  # the token to feed next
        self.completion = 0
        self.t0 = time.perf_counter()
        self.bytes0: int | None = None  # the source's bytes_read when it joined the batch


class Engine:
    """Continuous batching over one ``zipmoe_run.api.Loaded`` model (see the module doc)."""

    def __init__(self, lm, max_batch: int = 8, max_queue: int = 32, prefill_chunk: int | None = None,
                 prefill_chunks: int | None = None):
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if not _is_int(v) or v < lo:
                raise GenerationError(f"{name} must be an integer >= {lo} (got {v!r})")
        if prefill_chunks is not None and (not _is_int(prefill_chunks) or prefill_chunks < 1):
            raise GenerationError(f"prefill_chunks must be an integer >= 1 (got {prefill_chunks!r})")
        if prefill_chunk is not None and (not _is_int(prefill_chunk) or prefill_chunk < 0):
            raise GenerationError(f"prefill_chunk must be an integer >= 0 (0: whole prompt; got {prefill_chunk!r})")
        model = lm.model
        family = (getattr(lm.source, "config", None) or {}).get("model_type", type(model).__module__)
        why = model.ragged_unsupported() if hasattr(model, "ragged_unsupported") else \
            f"{family}: batched decoding is not supported for this family"
        if why is not None:
            raise UnsupportedModelError(why)
        self.lm, self.model = lm, model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk  # 0: whole prompt
        self.prefill_chunks = prefill_chunks or (max_batch if _sweep_bound(lm) else 1)  # requests' chunks per sweep
        self._eos = set(int(e) for e in lm.eos_token_ids)
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._counts = {"requests_done": 0, "tokens_generated": 0, "steps": 0, "prefill_chunks": 0,
                        "shared_sweeps": 0, "errors": 0, "cancelled": 0}
        self._shared_sweep = hasattr(model, "sweep")
        self._req_s = 0.0  # moving average of a request's duration (for Retry-After)
        self._t_step = self._t_chunk = 0.0  # moving averages: a decode step alone, a chunk's compute

    # -- public ---------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="zipmoe-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling = Sampling(),
               stop: Sequence[str] = (), on_event: Callable[[EngineEvent], None] | None = None) -> Handle:
        """Queue a request (validated here, in the caller's thread); its events follow on the engine thread."""
        prompt = self._check_prompt(prompt_ids)
        if not _is_int(max_tokens) or max_tokens < 1:
            raise GenerationError(f"max_tokens must be an integer >= 1 (got {max_tokens!r})")
        if not isinstance(sampling, Sampling):
            raise GenerationError(f"sampling must be a zipmoe_run.generate.Sampling (got {type(sampling).__name__})")
        stops = check_stops(stop, self.lm.tokenizer)
        budget = min(max_tokens, self.model.max_context - len(prompt))  # clipped: finishes with "length"
        with self._cv:
            if self._closing:
                raise EngineClosedError("the engine is shutting down; no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting)", self._retry_after())
            h = Handle(self, f"req-{next(self._ids)}", len(prompt), on_event)
            self._waiting.append(_Seq(h, prompt, budget, sampling, TextStream(self.lm.tokenizer, stops)))
            self._cv.notify_all()
        return h

    def stats(self) -> dict:
        src = self.lm.source.stats()
        with self._cv:
            st = {"running": len(self._running), "waiting": len(self._waiting), "max_batch": self.max_batch,
                  "max_queue": self.max_queue, "prefill_chunk": self.prefill_chunk,
                  "prefill_chunks_per_sweep": self.prefill_chunks, **self._counts}
        st.update(source=src, expert_bytes_read=int(src.get("bytes_read", 0) or 0),
                  memory_budget_bytes=src.get("budget_bytes"), peak_rss_bytes=peak_rss_bytes())
        return st

    def shutdown(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Refuse new requests; finish the accepted ones (``cancel=False``) or cancel them (each gets its
        final event); join the engine thread (up to ``timeout`` s)."""
        with self._cv:
            self._closing = True
            if cancel:
                for s in (*self._waiting, *self._running):
                    s.h._cancelled = True
            self._cv.notify_all()
            thread = self._thread
        if thread is None:  # never started: nothing runs the queue, end it here
            with self._cv:
                left, self._waiting = list(self._waiting), deque()
            for s in left:
                self._finish(s, None, "cancelled")
            return
        thread.join(timeout)

    # -- engine thread --------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _check_prompt(self, prompt_ids) -> list[int]:
        try:
            prompt = [int(t) for t in prompt_ids]
            if any(isinstance(t, bool) or int(t) != t for t in prompt_ids):
                raise ValueError
        except (TypeError, ValueError):
            raise GenerationError("the prompt must be a list of integer token ids") from None
        if not prompt:
            raise GenerationError("empty prompt: give at least one token")
        vocab = self.model.args.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise GenerationError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        ctx = self.model.max_context
        if len(prompt) >= ctx:
            raise PromptTooLongError(f"prompt has {len(prompt)} tokens; the model's context is {ctx} tokens")
        return prompt

    def _retry_after(self) -> float:
        batches = (len(self._waiting) + len(self._running)) / self.max_batch
        return round(max(1.0, batches * (self._req_s or 1.0)), 1)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._waiting and not self._running and not self._closing:
                        self._cv.wait()
                    if not self._waiting and not self._running:
                        return
                    joining = []
                    while self._waiting and len(self._running) + len(joining) < self.max_batch:
                        joining.append(self._waiting.popleft())
                    cancelled = [s for s in self._waiting if s.h._cancelled]
                    for s in cancelled:
                        self._waiting.remove(s)
                for s in cancelled:
                    self._finish(s, None, "cancelled")
                for s in joining:
                    self._admit(s)
                self._iteration()

    def _admit(self, s: _Seq) -> None:
        if s.h._cancelled:
            self._finish(s, None, "cancelled")
            return
        s.t0, s.bytes0 = time.perf_counter(), self._bytes_read()
        try:
            s.cache = self.model.new_cache(1, len(s.prompt) + s.budget)
        except Exception as exc:
            self._fail([s], exc, "allocating the KV cache")
            return
        with self._cv:
            self._running.append(s)

    def _iteration(self) -> None:
        """One token boundary: drop cancelled sequences, prefill chunks (one, or ``prefill_chunks`` requests'
        at once), one decode step; in one sweep of the layers (``DecoderLM.sweep``) where the model has it."""
        for s in [s for s in self._running if s.h._cancelled]:
            self._finish(s, None, "cancelled")
        rows = [s for s in self._running if s.prefilled == len(s.prompt) and s.h.finish_reason is None]
        pres = [s for s in self._running if s.prefilled < len(s.prompt)][:self._chunks_now(bool(rows))]
        if self._shared_sweep and (len(pres) > 1 or (pres and rows)):
            try:
                self._sweep(pres, rows)
            except Exception as exc:
                self._fail([s for s in (*pres, *rows) if s.h.finish_reason is None], exc,
                           "prefill chunk and decode step" if rows else "prefill")
            return
        for pre in pres:
            try:
                self._sweep([pre], [])
            except Exception as exc:
                self._fail([pre], exc, "prefill")
        rows = [s for s in self._running if s.prefilled == len(s.prompt) and s.h.finish_reason is None]
        if rows:
            try:
                t0, stall0 = time.perf_counter(), self._stall_s()
                logits = self.model.decode_step([s.last for s in rows], [s.cache for s in rows], [s.pos for s in rows])
                self._note(0, time.perf_counter() - t0, self._stall_s() - stall0)
                self._take(rows, logits)
            except Exception as exc:
                self._fail([s for s in rows if s.h.finish_reason is None], exc, "decode step")

    def _chunks_now(self, decoding: bool) -> int:
        """How many prefilling requests get a chunk in this sweep: ``prefill_chunks`` while nothing decodes
        (nobody waits); beside decoding rows as many as one decode step's time covers (a step alone against
        a chunk's compute, both measured: moving averages), at least one."""
        if not decoding or self.prefill_chunks == 1 or not self._t_step or not self._t_chunk:
            return 1 if decoding else self.prefill_chunks
        return max(1, min(self.prefill_chunks, int(self._t_step / self._t_chunk)))

    def _note(self, chunks: int, dt: float, stall: float) -> None:
        """A sweep without rows (``chunks`` > 0: a chunk's compute is its time less the fetch stalls, per
        chunk) or a decode step alone (its whole time): update the moving averages."""
        if chunks:
            x = max(0.0, dt - stall) / chunks
            self._t_chunk = x if not self._t_chunk else 0.7 * self._t_chunk + 0.3 * x
        else:
            self._t_step = dt if not self._t_step else 0.7 * self._t_step + 0.3 * dt

    def _stall_s(self) -> float:
        if self.prefill_chunks == 1:  # nothing to steer
            return 0.0
        try:
            return float(self.lm.source.stats().get("stall_s", 0.0) or 0.0)
        except Exception:  # timings only steer the chunk count; never fail a request over them
            return 0.0

    def _chunk(self, s: _Seq) -> tuple[int, int]:
        a = s.prefilled
        b = len(s.prompt) if self.prefill_chunk == 0 else min(len(s.prompt), a + self.prefill_chunk)
        if len(s.prompt) - b == 1:  # never a last chunk of one token: that would take the one-row kernels
            b = len(s.prompt)
        return a, b

    def _sweep(self, pres: Sequence[_Seq], rows: Sequence[_Seq]) -> None:
        """The next chunk of each of ``pres``' prompts and, with ``rows``, their decode step: one ``forward``
        for a lone chunk, else one ``DecoderLM.sweep`` of the layers."""
        t0, stall0 = time.perf_counter(), self._stall_s()
        spans = [self._chunk(s) for s in pres]
        chunks = [(torch.tensor([s.prompt[a:b]], dtype=torch.long), s.cache, a, True)  # [1, T]
                  for s, (a, b) in zip(pres, spans)]
        if len(chunks) == 1 and not rows:
            logits, row_logits = [self.model(*chunks[0][:3], last_only=True)], None  # [1, 1, V]
        else:
            logits, row_logits = self.model.sweep(chunks, [r.last for r in rows], [r.cache for r in rows],
                                                  [r.pos for r in rows])
            self._counts["shared_sweeps"] += 1
        if not rows:
            self._note(len(pres), time.perf_counter() - t0, self._stall_s() - stall0)
        for s, (_, b), lg in zip(pres, spans, logits):
            s.prefilled = s.pos = b
            self._counts["prefill_chunks"] += 1
            if b == len(s.prompt):
                self._accept(s, int(sample_next(lg[:, -1], s.sampling, s.gen)[0]))
        if rows:
            self._take(rows, row_logits)

    def _take(self, rows: Sequence[_Seq], logits: torch.Tensor) -> None:
        """A decode step's logits [N, V]: each row samples its token."""
        self._counts["steps"] += 1
        toks = [int(sample_next(logits[i:i + 1], s.sampling, s.gen)[0]) for i, s in enumerate(rows)]  # [1, V] each
        for s, tok in zip(rows, toks):
            s.pos += 1
            self._accept(s, tok)

    def _accept(self, s: _Seq, tok: int) -> None:
        s.completion += 1
        s.last = tok
        self._counts["tokens_generated"] += 1
        eos = tok in self._eos
        final = eos or s.completion >= s.budget
        text, stopped = s.stream.add(None if eos else tok, final)
        finish = "stop" if (eos or stopped) else ("length" if final else None)
        if finish is None:
            s.h._emit(EngineEvent(s.h.request_id, tok, text, None, len(s.prompt), s.completion))
        else:
            self._finish(s, tok, finish, text)

    def _finish(self, s: _Seq, tok: int | None, reason: str, text: str = "", error: str | None = None) -> None:
        with self._cv:
            if s in self._running:
                self._running.remove(s)
        s.cache = None  # the KV slot is freed here
        dt = time.perf_counter() - s.t0
        self._counts["requests_done"] += 1
        self._counts["cancelled"] += reason == "cancelled"
        self._counts["errors"] += reason == "error"
        self._req_s = dt if not self._req_s else 0.8 * self._req_s + 0.2 * dt
        gen_s = s.completion / dt if dt > 0 else 0.0
        log.info("request %s: %d prompt tokens, %d completion tokens, %.1f tok/s, %d expert bytes read while it "
                 "ran, finish %s", s.h.request_id, len(s.prompt), s.completion, gen_s,
                 self._bytes_read() - s.bytes0 if s.bytes0 is not None else 0, reason)
        s.h._emit(EngineEvent(s.h.request_id, tok, text, reason, len(s.prompt), s.completion, error))

    def _fail(self, seqs: list[_Seq], exc: BaseException, where: str) -> None:
        msg = f"{where} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        log.error("engine: %s (requests %s)", msg, ", ".join(s.h.request_id for s in seqs), exc_info=exc)
        for s in seqs:
            self._finish(s, None, "error", error=msg)

    def _bytes_read(self) -> int:
        try:
            return int(self.lm.source.stats().get("bytes_read", 0) or 0)
        except Exception:  # stats are for the log; never fail a request over them
            return 0
