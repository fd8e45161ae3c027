"""`zipmoe`: the umbrella command (pack, verify, unpack, inspect, run, bench)."""
from __future__ import annotations

import typer

from zipmoe.archive_cli import inspect_cmd, unpack_cmd, verify_cmd
from zipmoe_pack.cli import pack_cmd

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Lossless MoE archives and a memory-budgeted runtime.")
app.command("pack")(pack_cmd)
app.command("verify")(verify_cmd)
app.command("unpack")(unpack_cmd)
app.command("inspect")(inspect_cmd)


def _mount_optional() -> None:
    try:
        from zipmoe_run.cli import run_cmd
    except ImportError:  # the runtime is part of the package; this only guards partial checkouts
        pass
    else:
        app.command("run", context_settings={"allow_interspersed_args": True})(run_cmd)
    try:
        from zipmoe.bench.cli import app as bench_app
    except ImportError:
        pass
    else:
        app.add_typer(bench_app, name="bench", help="Benchmarks: peers side by side, medians, table and JSON.")


_mount_optional()


def main() -> None:
    app()
