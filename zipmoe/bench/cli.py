"""``zipmoe bench``: the typer app (``app``) the umbrella CLI mounts; the only bench module that prints."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Benchmarks: peers side by side, medians, table and JSON.")


@app.command("codec")
def codec_cmd(
    elements: int = typer.Option(1 << 24, "--elements", "-n", min=1,
                                 help="BF16 elements per dataset (issue 3: 8-32 M)."),
    runs: int = typer.Option(5, "--runs", "-r", min=1, help="Timed runs per measurement (median; after a warm-up)."),
    datasets: str = typer.Option("gaussian,mixed,student-t", "--datasets",
                                 help="Comma-separated: gaussian, mixed, student-t."),
    chunk: int = typer.Option(1 << 20, "--chunk", min=1, help="Exponent chunk size in elements."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON result to this file."),
    debug: bool = typer.Option(False, "--debug", help="Log progress."),
) -> None:
    """Exponent codec + parallel decoder vs ZipNN, zstd -1 and LZ4-HC: ratio, pack and decode speed."""
    from rich.console import Console

    from zipmoe.bench.codec import render_table, run

    logging.basicConfig(level=logging.INFO if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    try:
        result = run(elements, runs=runs, datasets=names, chunk=chunk)
    except ValueError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if as_json:
        typer.echo(text)
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
        console.print(render_table(result))


@app.callback()
def _bench() -> None:
    """Benchmarks."""
