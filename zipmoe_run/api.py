"""Library entry point: ``load(path)`` -> model + tokenizer + weight source, ready to generate.

    from zipmoe_run import load
    lm = load("model.zmoe")            # or a Hugging Face checkpoint directory
    out = lm.generate("Hello", max_new_tokens=32)
    print(out.texts[0])
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from formats.errors import InputError

from . import kernel_select
from .errors import GenerationError, TokenizerError
from .generate import GenerationResult, Sampling, TokenEvent, generate, stream_generate
from .models import build_model
from .source import DirectorySource, WeightSource
from .tokenizer import Tokenizer, TokenizerLoad, eos_ids_from, load_tokenizer, read_json

__all__ = ["Loaded", "load", "open_source", "parse_dtype", "PREFETCH_MODES"]

PREFETCH_MODES = ("off", "lookahead")
MAX_THREADS = 1024  # torch's OpenMP pool segfaults at absurd counts (100,000); no machine needs more

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise GenerationError(f"unknown dtype {dtype!r} (use bfloat16 or float32)") from None


def open_source(path: str | os.PathLike, *, threads: int | None = None, **store_opts) -> WeightSource:
    """DirectorySource for a checkpoint directory (budgeted when ``memory_budget`` is given), ArchiveSource
    for a ``.zmoe`` file."""
    p = Path(path)
    if p.is_dir():
        if store_opts.get("memory_budget") is not None:  # experts through the budgeted store, read from the shards
            return DirectorySource(p, threads=threads, **store_opts)
        if store_opts:
            log.debug("store options %s ignored for a plain checkpoint directory without a budget", sorted(store_opts))
        return DirectorySource(p)
    if p.suffix == ".zmoe":
        if not p.is_file():
            raise InputError(f"{p}: no such archive")
        try:
            from .archive_source import ArchiveSource
        except ImportError as exc:
            raise InputError(f"{p}: .zmoe archives are not readable in this build ({exc})") from None
        return ArchiveSource(p, threads=threads, **store_opts)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    raise InputError(f"{p}: not a checkpoint directory or a .zmoe archive")


def _with_kernels(it: Iterator[TokenEvent], stats: dict, used: bool) -> Iterator[TokenEvent]:
    yield from it
    stats["kernels"] = kernel_select.report(used)  # after the run: shapes first seen in it are chosen by then


def _measure_alone(source: WeightSource):
    """kernel_select's measurement (a host seen for the first time), after the source's background
    preload has ended: decoding experts beside it would skew the rates it compares."""
    def measure(shapes, threads, kernels):
        wait = getattr(source, "wait_preload", None)
        if wait is not None:
            wait()
        return kernel_select.measure(shapes, threads, kernels)
    return measure


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Tokenizer | None
    source: WeightSource
    dtype: torch.dtype
    eos_token_ids: list[int]

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerError("this checkpoint has no tokenizer; pass token ids instead")
        return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)

    def _ids(self, prompts, chat: bool) -> list[list[int]]:
        if isinstance(prompts, str):
            return [self.encode(prompts, chat)]
        if prompts and isinstance(prompts[0], int):
            return [list(prompts)]
        return [self.encode(p, chat) if isinstance(p, str) else list(p) for p in prompts]

    def stream(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], *, max_new_tokens: int = 64,
               sampling: Sampling = Sampling(), chat: bool = False, stats: dict | None = None) -> Iterator[TokenEvent]:
        it = stream_generate(self.model, self._ids(prompts, chat), max_new_tokens=max_new_tokens,
                             sampling=sampling, eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer,
                             stats=stats)
        return it if stats is None else _with_kernels(it, stats, self.dtype is torch.bfloat16)

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], *, max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), chat: bool = False) -> GenerationResult:
        res = generate(self.model, self._ids(prompts, chat), max_new_tokens=max_new_tokens, sampling=sampling,
                       eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer)
        res.stats.update(self.source.stats())
        res.stats["kernels"] = kernel_select.report(self.dtype is torch.bfloat16)
        return res

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "Loaded":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | os.PathLike | WeightSource, *, dtype: str | torch.dtype = "bfloat16", threads: int | None = None,
         memory_budget: str | int | None = None, prefetch: str = "off", tokenizer: TokenizerLoad | None = None,
         **store_opts) -> Loaded:
    """Open a checkpoint directory or ``.zmoe`` archive and build its model.

    ``path`` may also be a source opened already (``open_source``, ``ArchiveSource``: an archive's
    experts start decoding as it opens; ``zipmoe-run`` opens it before it imports torch). The returned
    ``Loaded`` owns it (closes it), and so does ``load`` when it fails; store options are then refused.
    An archive's preload (``ArchiveSource``'s ``preload``) runs while the model is built and has ended
    when ``load`` returns.

    ``threads`` sets torch's intra-op thread count (process-wide) and is passed to the archive
    reader; ``memory_budget`` bounds the memory of the routed experts of a ``.zmoe`` archive (bytes,
    ``"3GiB"``, ``"30%"`` of the expert bytes or ``"auto"``; None: no limit; see specs/runtime.md);
    other ``store_opts`` go to ``ArchiveSource`` (policy, io_mode, io_throttle_bps: a read-rate cap in
    bytes/s emulating slower storage, ...). ``prefetch="lookahead"`` turns on router lookahead (the
    next layer's experts guessed from the current hidden state and prefetched; zipmoe_run.lookahead)
    for families that support it; ``"off"`` (the default) prefetches only what the model is certain
    to ask for next. ``tokenizer``: a ``TokenizerLoad`` already started on ``path`` (an open source;
    ``zipmoe-run`` starts one as the archive opens, so the tokenizer is parsed beside ``import torch``);
    without one the tokenizer is loaded here.
    """
    opened = None if isinstance(path, (str, os.PathLike)) else path

    def close(src) -> None:  # on failure: the pending tokenizer load reads the source, so it ends first
        if tokenizer is not None:
            tokenizer.wait()
        src.close()

    try:
        if prefetch not in PREFETCH_MODES:
            raise GenerationError(f"unknown prefetch mode {prefetch!r} (use {' or '.join(PREFETCH_MODES)})")
        if memory_budget is not None:
            store_opts["memory_budget"] = memory_budget
        if opened is not None and store_opts:
            raise GenerationError(f"store options {sorted(store_opts)} go to the source, which is open already")
        dt = parse_dtype(dtype)
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
                raise GenerationError(f"threads must be an integer in 1..{MAX_THREADS} (got {threads!r})")
            torch.set_num_threads(threads)
    except BaseException:
        if opened is not None:
            close(opened)
        raise
    source = opened if opened is not None else open_source(path, threads=threads, **store_opts)
    try:
        model = build_model(source, dt)
        tok = tokenizer.result() if tokenizer is not None else load_tokenizer(source)
    except BaseException:
        close(source)
        raise
    if tok is not None:
        eos = tok.eos_token_ids
    else:
        eos = eos_ids_from(source.config, read_json(source, "generation_config.json"))
    model.eval()
    if dt is torch.bfloat16:  # one-row kernels for this host and the model's shapes (cached per host)
        shapes = set(kernel_select.model_shapes(model)) | set(source.expert_shapes())
        kernel_select.choose(sorted(shapes), torch.get_num_threads(), measure_fn=_measure_alone(source))
    if os.environ.get("ZIPMOE_RESIDENT", "").strip():  # the dense weights in another resident form (x12)
        from .resident import resident_mode, to_x12

        try:
            mode = resident_mode()
        except ValueError as exc:
            source.close()
            raise GenerationError(f"ZIPMOE_RESIDENT: {exc}") from None
        if mode == "x12" and dt is torch.bfloat16:
            model.x12_stats = to_x12(model)
            log.info("resident x12: %s", model.x12_stats)
    if hasattr(model, "set_lookahead"):
        n = model.set_lookahead(prefetch == "lookahead")
        log.info("router lookahead prefetch: %s", f"{n} layers" if n else "off")
    elif prefetch == "lookahead":
        log.info("router lookahead prefetch: not available for this family")
    wait = getattr(source, "wait_preload", None)  # an archive's preload ran beside all of the above;
    if wait is not None:  # what is left of it is part of loading, as it was (load_s, TTFT and stats keep
        try:  # their meaning for the benchmarks and the server)
            wait()
        except BaseException:
            source.close()
            raise
    return Loaded(model, tok, source, dt, eos)
