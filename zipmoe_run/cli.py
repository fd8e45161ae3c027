"""`zipmoe-run PATH --prompt "..."`: generate text from a checkpoint directory or a .zmoe archive.

Text streams to stdout as it is generated; one stats line goes to stderr. Every expected failure
is one line on stderr and a non-zero exit (a traceback only with --debug).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import typer

from formats.errors import ZmoeError
from zipmoe_cli import fail, guarded, human, single_command_app, threads_option

__all__ = ["run_cmd", "run", "app", "main"]


def _temperature(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0 (use --greedy for greedy decoding); got {value}")
    return value


def _top_p(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 < value <= 1):
        raise typer.BadParameter(f"must be in (0, 1]; got {value}")
    return value


def _top_k(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise typer.BadParameter(f"must be >= 0 (0: no limit); got {value}")
    return value


def _seed(value: int | None) -> int | None:
    if value is not None and not 0 <= value < 1 << 64:
        raise typer.BadParameter(f"must be in [0, 2^64); got {value}")
    return value


def _choice(choices: tuple[str, ...]):
    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"must be {', '.join(choices[:-1])} or {choices[-1]}; got {value!r}")
        return value
    return check


def _memory_budget(value: str | None) -> str | None:
    """Check the syntax now (the share of the archive's experts is worked out when it is opened)."""
    if value is not None:
        from zipmoe_run.store.budget import parse_budget

        try:
            parse_budget(value, expert_bytes=1, available=1)
        except ZmoeError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        fail(f"--prompt-ids: expected comma-separated integers, got {text!r}", 2)
    if not ids:
        fail("--prompt-ids: no token ids given", 2)
    return ids


def _open_archive(path: Path, threads: int | None, store_opts: dict):
    """A .zmoe archive's source, opened before torch is imported (None for anything else: ``load``
    opens it). Opening starts the store's preload (with no budget, or one that holds every expert), so
    the experts decode on the other cores while torch loads on this one."""
    if path.suffix != ".zmoe" or not path.is_file():
        return None
    try:
        from zipmoe_run.archive_source import ArchiveSource
        from zipmoe_run.store import store as _  # noqa: F401 (its C extensions: loaded before the warm-up)
    except ImportError:
        return None  # load() says why
    from zipmoe_run.startup import wait_warm, warm_torch_libs

    warm_torch_libs()  # torch's native core maps beside the opening and the decoding (zipmoe_run.startup)
    try:
        return ArchiveSource(path, threads=threads, **store_opts)
    except BaseException:
        wait_warm()  # not inside dlopen at the interpreter's finalisation
        raise


def _note(line: str) -> None:
    """One literal line on stderr, written directly: a successful run never imports rich."""
    sys.stderr.write(line + "\n")


def _stats_line(st: dict) -> str:
    parts = [
        f"prompt {st.get('prompt_tokens', 0)} tok @ {st.get('prompt_tok_s', 0):.1f} tok/s",
        f"gen {st.get('generated_tokens', 0)} tok @ {st.get('gen_tok_s', 0):.2f} tok/s",
    ]
    if st.get("ttft_s") is not None:
        parts.append(f"TTFT {st['ttft_s']:.3f} s")
    if "experts_fetched" in st:
        parts.append(f"experts {st['experts_fetched']} fetched, {human(st.get('bytes_read', 0))} read")
    if st.get("budget_bytes"):
        parts.append(f"store {human(st.get('store_peak_bytes', 0))} of {human(st['budget_bytes'])} budget "
                     f"({st.get('io_mode')}), dense {human(st.get('dense_bytes', 0))}")
    parts.append(f"peak RSS {human(st.get('peak_rss_bytes', 0))}")
    return " | ".join(parts)


def run_cmd(
    path: Path = typer.Argument(..., help="Checkpoint directory or .zmoe archive."),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (repeat for a batch)."),
    prompt_ids: list[str] = typer.Option(None, "--prompt-ids", help="Prompt as token ids: 9707,1879 (repeatable)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=0, help="Tokens to generate at most."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (default unless a sampling option is given)."),
    temperature: float = typer.Option(None, "--temperature", "-t", callback=_temperature,
                                     help="Sample with this temperature (> 0)."),
    top_p: float = typer.Option(None, "--top-p", callback=_top_p, help="Nucleus sampling threshold (0, 1]."),
    top_k: int = typer.Option(None, "--top-k", callback=_top_k,
                               help="Sample among the k most likely tokens (0: all)."),
    seed: int = typer.Option(None, "--seed", callback=_seed, help="Random seed for sampling, 0 .. 2^64-1."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Compute dtype: bfloat16 or float32."),
    threads: int = typer.Option(None, "--threads", callback=threads_option,
                                 help="CPU threads (torch and the archive reader): 1 .. 1024."),
    memory_budget: str = typer.Option(None, "--memory-budget", "-m", callback=_memory_budget,
                                      help="Memory for routed experts (of a .zmoe, or of a folder, read from its shards): "
                                           "bytes (3GiB, 500MB), a percentage of the expert bytes (30%) or auto. "
                                           "Default: no limit."),
    prefetch: str = typer.Option("off", "--prefetch", callback=_choice(("off", "lookahead")),
                                 help="off: prefetch only what the model will certainly ask for next; lookahead: "
                                      "also guess the next layer's experts from the current hidden state."),
    preload: str = typer.Option("auto", "--preload", callback=_choice(("auto", "on", "off")),
                                help="auto: with no budget or one of at least the experts' size, decode every expert "
                                     "into memory in the background while loading; on: fill the budget while "
                                     "loading; off: load on first use."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (token_ids, text, stats) instead."),
    debug: bool = typer.Option(False, "--debug", help="Debug logging and full tracebacks."),
) -> None:
    """Generate from a MoE checkpoint (directory or .zmoe archive)."""
    if not prompt and not prompt_ids:
        fail("give --prompt TEXT or --prompt-ids 1,2,3", 2)
    if prompt and prompt_ids:
        fail("give either --prompt or --prompt-ids, not both", 2)
    if prompt_ids and chat:
        fail("--chat needs --prompt text", 2)
    given_ids = [_parse_ids(p) for p in prompt_ids] if prompt_ids else None
    with guarded(debug):
        store_opts = {"memory_budget": memory_budget} if memory_budget is not None else {}
        if preload != "auto" and (path.suffix == ".zmoe" or memory_budget is not None):
            store_opts["preload"] = preload == "on"
        source = _open_archive(path, threads, store_opts)  # before torch: its experts decode meanwhile
        pending = None
        if source is not None:
            from zipmoe_run.tokenizer import TokenizerLoad

            pending = TokenizerLoad(source)  # parsed beside torch's import (no interpreter lock)
        try:
            from zipmoe_run.api import load
            from zipmoe_run.generate import Sampling

            sampling_asked = temperature is not None or top_p is not None or top_k is not None
            sampling = Sampling(
                greedy=greedy or not sampling_asked,
                temperature=1.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                top_k=0 if top_k is None else top_k,
                seed=seed,
            )
        except BaseException:
            if source is not None:
                from zipmoe_run.startup import wait_warm

                wait_warm()
                pending.wait()  # it reads the source
                source.close()
            raise
        if source is not None:  # load() owns it (and the tokenizer's load) from here
            lm = load(source, dtype=dtype, threads=threads, prefetch=prefetch, tokenizer=pending)
        else:
            lm = load(path, dtype=dtype, threads=threads, prefetch=prefetch, **store_opts)
        budget = getattr(lm.source, "budget", None)
        if memory_budget is not None and budget is not None and not as_json:
            _note(f"memory budget: {budget.how}")
        try:
            if prompt:
                if lm.tokenizer is None:
                    fail(f"{path}: no tokenizer in this checkpoint; use --prompt-ids")
                ids = [lm.encode(p, chat=chat) for p in prompt]
            else:
                ids = given_ids
            stats: dict = {}
            outs: list[list[int]] = [[] for _ in ids]
            stream_text = not as_json and len(ids) == 1 and lm.tokenizer is not None
            ended_nl = True
            for ev in lm.stream(ids, max_new_tokens=max_new_tokens, sampling=sampling, stats=stats):
                outs[ev.seq].append(ev.token_id)
                if stream_text and ev.text:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                    ended_nl = ev.text.endswith("\n")
            stats.update(lm.source.stats())
            texts = [lm.tokenizer.decode(o) for o in outs] if lm.tokenizer else None
            if as_json:
                one = len(ids) == 1
                obj = {
                    "prompt_ids": ids[0] if one else ids,
                    "token_ids": outs[0] if one else outs,
                    "text": (texts[0] if one else texts) if texts is not None else None,
                    "stats": stats,
                }
                sys.stdout.write(json.dumps(obj) + "\n")
            elif stream_text:
                if not ended_nl:
                    sys.stdout.write("\n")
            else:
                for i, o in enumerate(outs):
                    line = texts[i] if texts is not None else ",".join(map(str, o))
                    sys.stdout.write((f"[{i}] " if len(outs) > 1 else "") + line + "\n")
            sys.stdout.flush()
            _note(_stats_line(stats))
        finally:
            lm.close()


run = run_cmd

app = single_command_app(run_cmd, help="Run a MoE checkpoint or .zmoe archive.",
                         context_settings={"allow_interspersed_args": True})


def _flush_all() -> bool:
    """Flush stdout, stderr and the logging handlers; False if one cannot be (a closed pipe)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        return True
    except (OSError, ValueError):
        return False


def main() -> None:
    """The console script. A run that succeeded ends with ``os._exit(0)`` once its output is flushed
    (the source is closed by then): tearing the interpreter down (torch, numba and some 1,500 modules)
    took another 0.3-1 s of the command's wall time. Failures exit the ordinary way."""
    try:
        app()
    except SystemExit as exc:
        if exc.code in (0, None) and _flush_all():
            os._exit(0)
        raise


if __name__ == "__main__":
    main()
