"""`zipmoe-pack MODEL_DIR OUT.zmoe` (also `zipmoe pack`)."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from zipmoe_cli import fail, guarded, human, out, progress_bar
from zipmoe_pack.pack import PackOptions, Terminated, pack


def pack_cmd(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint folder (config.json + *.safetensors)"),
    output: Path = typer.Argument(..., help="archive to write (.zmoe)"),
    threads: int = typer.Option(0, "--threads", "-t", help="worker threads (0: all cores)"),
    chunk_elements: int = typer.Option(1 << 20, help="exponent chunk size in elements (power of two)"),
    codec: str = typer.Option("huf4x", "--codec",
                              help="exponent codec: huf4x (default: canonical Huffman, 4 streams, the faster "
                                   "decode; specs/zmoe.md 3.3.1) or zstd-lit (one zstd frame per chunk)"),
    raw: bool = typer.Option(False, "--raw", help="store BF16 experts uncompressed (baseline for benchmarks)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Pack a checkpoint into one checksummed, memory-mappable archive, losslessly.

    Every regular file of MODEL_DIR (a symlink to one counts as that file) is stored for a byte-identical unpack;
    .git, .cache and __pycache__ are skipped.
    A FIFO, socket, device, broken symlink or symlink loop in MODEL_DIR is refused with one line naming it.
    OUTPUT may not lie inside MODEL_DIR nor name one of its files.
    The archive is written to a hidden .OUTPUT.tmp-PID beside OUTPUT and renamed when complete;
    Ctrl-C, SIGTERM and SIGHUP remove it, and the next pack to OUTPUT removes one left by a killed run.
    """
    with guarded(debug):
        try:
            with progress_bar(f"packing {model_dir.name}", not as_json) as cb:
                rep = pack(model_dir, output, PackOptions(threads=threads, chunk_elements=chunk_elements,
                                                         codec=codec, raw=raw),
                           progress=cb)
        except Terminated as e:
            if debug:
                raise
            fail(f"terminated by {e}; nothing was written to {output}", 128 + e.signum)
        summary = {
            "archive": str(rep.path), "archive_bytes": rep.file_bytes, "tensors": rep.tensors,
            "expert_extents": rep.extents, "dense_bytes": rep.dense_bytes,
            "expert_original_bytes": rep.expert_bytes, "expert_stored_bytes": rep.expert_stored,
            "expert_ratio": round(rep.expert_ratio, 5), "bits_per_exponent": round(rep.bits_per_exponent, 4),
            "codec": None if raw else codec,
            "seconds": round(rep.seconds, 3), "threads": rep.threads, "expert_mb_per_s": round(rep.mb_per_s, 1),
        }
        if as_json:
            print(json.dumps(summary, indent=2))
            return
        t = Table(title=f"packed {model_dir} -> {rep.path}", show_header=False)
        t.add_row("archive", human(rep.file_bytes))
        t.add_row("tensors / expert extents", f"{rep.tensors} / {rep.extents}")
        t.add_row("dense (raw, mappable)", human(rep.dense_bytes))
        t.add_row("routed experts", f"{human(rep.expert_bytes)} -> {human(rep.expert_stored)}  "
                                    f"[bold]ratio {rep.expert_ratio:.4f}[/]")
        t.add_row("bits per exponent", f"{rep.bits_per_exponent:.3f}" + ("" if raw else f" ({codec})"))
        t.add_row("throughput", f"{rep.mb_per_s:.1f} MB/s of experts in {rep.seconds:.2f} s on {rep.threads} threads")
        out.print(t)


def main() -> None:
    from zipmoe_cli import single_command_app

    single_command_app(pack_cmd)()
