"""`zipmoe`: the umbrella command (pack, verify, unpack, inspect, run, serve, bench).

Subcommand modules import torch and the heavy runtime only inside their functions, so `zipmoe pack`
and the archive tools start fast. Usage errors of every subcommand are one ``error: ...`` line and
exit status 2 (``zipmoe_cli.OneLineGroup``).
"""
from __future__ import annotations

import typer

from zipmoe.archive_cli import inspect_cmd, unpack_cmd, verify_cmd
from zipmoe.bench.cli import app as bench_app
from zipmoe_cli import OneLineGroup
from zipmoe_pack.cli import pack_cmd
from zipmoe_run.cli import run_cmd
from zipmoe_run.serve.cli import serve_cmd

app = typer.Typer(cls=OneLineGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Lossless MoE archives and a memory-budgeted runtime.")
app.command("pack")(pack_cmd)
app.command("verify")(verify_cmd)
app.command("unpack")(unpack_cmd)
app.command("inspect")(inspect_cmd)
app.command("run")(run_cmd)
app.command("serve")(serve_cmd)
app.add_typer(bench_app, name="bench", help="Benchmarks: peers side by side, medians, table and JSON.")


def main() -> None:
    app()
