"""`zipmoe verify | unpack | inspect`: tools over an existing archive."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from formats.decoder import MAX_THREADS, ParallelDecoder
from formats.reader import Archive
from formats.restore import unpack, verify
from formats.summary import summarize
from zipmoe_cli import guarded, human, out, progress_bar


def _decoder(threads: int) -> ParallelDecoder:
    """0: one thread per core (capped); anything outside 0..MAX_THREADS is a one-line error."""
    return ParallelDecoder(threads or min(os.cpu_count() or 1, MAX_THREADS))


def verify_cmd(
    archive: Path = typer.Argument(..., help=".zmoe archive"),
    source: Optional[Path] = typer.Option(None, "--source", help="original checkpoint folder to compare against"),
    threads: int = typer.Option(0, "--threads", "-t", help="decode threads (0: all cores)"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Check every checksum, padding byte and tensor hash; optionally compare with the source folder."""
    with guarded(debug), Archive(archive) as ar, _decoder(threads) as dec:
        with progress_bar("verifying") as cb:
            rep = verify(ar, dec, source, progress=cb)
        msg = (f"ok: {rep.files} files, {rep.tensors} tensors, {rep.extents} expert extents, "
               f"{human(rep.bytes_checked)} restored and hashed")
        if source is not None:
            msg += f"; all {len(rep.source_checked)} files match {source}"
        out.print(msg, markup=False)


def unpack_cmd(
    archive: Path = typer.Argument(..., help=".zmoe archive"),
    dest: Path = typer.Argument(..., help="folder to create (must not exist, or be empty)"),
    threads: int = typer.Option(0, "--threads", "-t"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Rewrite every original file, byte for byte (SHA-256 checked)."""
    with guarded(debug), Archive(archive) as ar, _decoder(threads) as dec:
        with progress_bar("unpacking") as cb:
            files = unpack(ar, dec, dest, progress=cb)
        out.print(f"restored {len(files)} files into {dest} (every SHA-256 matches the original)", markup=False)


def inspect_cmd(
    archive: Path = typer.Argument(..., help=".zmoe archive"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Header, model, sizes and ratios per tensor kind, codec and entropy statistics."""
    with guarded(debug), Archive(archive) as ar:
        s = summarize(ar)
        if as_json:
            print(json.dumps(s, indent=2))
            return
        # every string from the archive (path, names, codec ids) is escaped: it is data, not markup
        out.print(f"[bold]{escape(s['path'])}[/]  format v{s['format_version']}, {human(s['file_bytes'])}, "
                  f"index {human(s['index_bytes'])}, data at {s['data_offset']}; {escape(s['created_by'])}",
                  soft_wrap=True)
        out.print(f"model_type {s['model_type']}: {s['tensors']} tensors, {s['layers']} MoE layers, "
                  f"{s['expert_extents']} experts; chunk {s['chunk_elements']} elements; "
                  f"codecs {', '.join(s['codecs']) or 'none'}", markup=False, soft_wrap=True)
        t = Table(title="sizes by kind")
        for c in ("kind", "tensors", "original", "stored", "ratio"):
            t.add_column(c, justify="left" if c == "kind" else "right")
        for k, v in s["kinds"].items():
            t.add_row(escape(k), str(v["tensors"]), human(v["original_bytes"]), human(v["stored_bytes"]),
                      f"{v['ratio']:.4f}")
        t.add_row("[bold]routed experts (with padding)", "", human(s["experts_original_bytes"]),
                  human(s["experts_stored_bytes"]), f"[bold]{s['experts_ratio']:.4f}")
        out.print(t)
        if s["coding"]:
            c = Table(title="exponent coding")
            for col in ("projection", "elements", "bits/exponent", "entropy bound", "ratio", "bound ratio"):
                c.add_column(col, justify="right")
            for proj, v in s["coding"].items():
                c.add_row(escape(proj), f"{v['elements']:,}", f"{v['bits_per_exponent']:.3f}",
                          f"{v['entropy_bound_bits']:.3f}", f"{v['ratio']:.4f}", f"{v['bound_ratio']:.4f}")
            out.print(c)
        out.print("checks: preamble ok, index ok (run `zipmoe verify` to check every chunk)")
