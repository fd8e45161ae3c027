"""``zipmoe bench``: the typer app (``app``) the umbrella CLI mounts; the only bench module that prints.

Errors: bad input (a ``ZmoeError`` such as ``BenchInputError``, an ``OSError`` naming a file, a usage
error) is one ``error: ...`` line and exit status 2; anything else is a bug and shows its traceback
(``zipmoe_cli.guarded``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from zipmoe_cli import OneLineGroup, fail, guarded, threads_option

app = typer.Typer(cls=OneLineGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Benchmarks: peers side by side, medians, table and JSON.")


def _logging(debug: bool) -> None:
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _emit(result: dict, as_json: bool, out: Optional[Path]) -> bool:
    """Write the JSON to `out` if given, print it if `as_json`; True when the caller is done. Without
    ``--json`` the host line is printed first (the JSON carries it as ``host_line``)."""
    text = json.dumps(result, indent=2)
    if result.get("host_line") and not as_json:
        typer.echo(result["host_line"])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if as_json:
        typer.echo(text)
    return as_json


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

    _logging(debug)
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    with guarded(debug, 2):
        result = run(elements, runs=runs, datasets=names, chunk=chunk)
    if not _emit(result, as_json, out):
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
        console.print(render_table(result))


@app.command("io")
def io_cmd(
    directory: Optional[Path] = typer.Option(None, "--dir", help="Where to write the scratch file that is read back "
                                             "(default ~/.cache/zipmoe; use the disk the archives live on)."),
    archive: Optional[Path] = typer.Option(None, "--archive", help="Read and decode this archive's experts instead."),
    size_mib: int = typer.Option(256, "--size-mib", min=8, help="Scratch file size."),
    read_mib: int = typer.Option(8, "--read-mib", min=1, help="Bytes per read (about one expert)."),
    cores: Optional[int] = typer.Option(None, "--cores", callback=threads_option,
                                        help="Decoder threads, 1 .. 1024 (default: all CPUs)."),
    runs: int = typer.Option(3, "--runs", "-r", min=1, help="Timed decode runs (median; after a warm-up)."),
    io_mode: str = typer.Option("auto", "--io", help="auto (O_DIRECT when possible), direct, buffered."),
    out: Optional[Path] = typer.Option(None, "--out", help="Calibration file (default ~/.cache/zipmoe/calibration.json)."),
    no_write: bool = typer.Option(False, "--no-write", help="Measure and print only."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the summary."),
    debug: bool = typer.Option(False, "--debug", help="Log progress."),
) -> None:
    """Measure read bandwidth (O_DIRECT), decode throughput and expert compute; write the calibration JSON."""

    from zipmoe.bench.io import record, run
    from zipmoe_run.tiers import CostModel as Calibration, save_calibration

    _logging(debug)
    with guarded(debug, 2):
        result = run(directory=directory, archive_path=archive, size=size_mib << 20, read_size=read_mib << 20,
                     cores=cores, runs=runs, io_mode=io_mode)
        if not no_write:
            result["written_to"] = str(save_calibration(Calibration.from_json(result["calibration"]), out))
            result["self_calibration_files"] = record(result, io_mode)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    c = result["calibration"]
    lines = [result["host_line"],
             f"read    {c['disk_bps'] / 1e9:.2f} GB/s ({c['read_method']}, {result['read']['reads']} reads of "
             f"{result['read']['bytes'] / max(1, result['read']['reads']) / 2**20:.1f} MiB)",
             f"decode  {c['decode_bps_per_core'] / 1e9:.2f} GB/s on 1 thread, {c['decode_bps'] / 1e9:.2f} GB/s on "
             f"{c['cores']} (BF16 output; {result['decode']['source']})",
             f"compute {c['compute_bps'] / 1e9:.2f} GB/s of expert weights, one token"]
    if "written_to" in result:
        lines.append(f"written to {result['written_to']}")
    typer.echo("\n".join(lines))


@app.command("cache")
def cache_cmd(
    trace: Path = typer.Option(..., "--trace", help="Routing trace .npy [prompts, layers, experts] of token counts."),
    budget: list[str] = typer.Option(..., "--budget", help="Bytes (3GiB, 500MB) or a percentage of all the "
                                     "trace's experts' bytes (15%); repeat for several."),
    expert_bytes: Optional[int] = typer.Option(None, "--expert-bytes", min=1, help="BF16 bytes of one expert."),
    archive: Optional[Path] = typer.Option(None, "--archive", help="Take tier ratios (and, without --expert-bytes, "
                                           "the expert size) from this archive."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration JSON (default "
                                               "~/.cache/zipmoe/calibration.json if present, else documented defaults)."),
    prompts: Optional[int] = typer.Option(None, "--prompts", min=1, help="Replay only the first N prompts."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Experts per token (default: inferred)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the token-sequence derivation."),
    policies: str = typer.Option(",".join(("lru", "lfu", "paper", "zipmoe", "zipmoe+prefetch", "belady",
                                           "belady-tiered")), "--policies", help="Comma-separated."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON result to this file."),
    debug: bool = typer.Option(False, "--debug", help="Log progress."),
) -> None:
    """Replay a routing trace through the cache policies: hit rate per tier, bytes read, modelled time per token."""
    from rich.console import Console

    from zipmoe.bench.cache import render_notes, render_table, run

    _logging(debug)
    with guarded(debug, 2):
        result = run(trace, budgets=budget, expert_bytes=expert_bytes, archive=archive, calibration=calibration,
                     prompts=prompts, seed=seed, top_k=top_k,
                     policies=tuple(p.strip() for p in policies.split(",") if p.strip()))
    if not _emit(result, as_json, out):
        console = Console()
        if not console.is_terminal:
            console = Console(width=170)
        console.print(render_table(result))
        for line in render_notes(result):
            console.print(line, highlight=False)


@app.command("run")
def run_cmd(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint folder (default: a synthetic "
                                              "one with real Qwen1.5-MoE expert sizes)."),
    size: str = typer.Option("qwen1.5", "--size", help="Synthetic checkpoint size (zipmoe_pack.synth.DEMO_SIZES)."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(32, "--new-tokens", min=2),
    runs: int = typer.Option(5, "--runs", "-r", min=1, help="Timed runs per system (median)."),
    threads: Optional[int] = typer.Option(None, "--threads", callback=threads_option,
                                          help="Compute threads, 1 .. 1024 (default: torch's)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 or float32."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Keep the synthetic checkpoint here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON result to this file."),
    debug: bool = typer.Option(False, "--debug", help="Log progress."),
) -> None:
    """All experts resident: this runtime vs transformers, same threads and dtype, side by side."""
    from rich.console import Console

    from zipmoe.bench.run import render_table, run

    _logging(debug)
    with guarded(debug, 2):
        result = run(checkpoint, size=size, prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
                     threads=threads, dtype=dtype, workdir=workdir)
    if not _emit(result, as_json, out):
        Console(width=170).print(render_table(result))


@app.command("e2e")
def e2e_cmd(
    budgets: str = typer.Option("15,30,60,100", "--budgets", help="Memory budgets, % of the routed-expert bytes."),
    systems: Optional[str] = typer.Option(None, "--systems",
                                help="Comma-separated: zipmoe, zipmoe-lookahead (router lookahead prefetch on), "
                                     "raw, dir (the checkpoint folder under the budget), hf-offload, llamacpp "
                                     "(skipped with a note when llama_cpp does not import), resident. Default: all but dir (--depth 2); zipmoe,dir (--depth full)."),
    depth: str = typer.Option("2", "--depth", help="2: the 2-layer model with Qwen1.5-MoE-A2.7B's dims; full: its "
                              "exact config, 24 layers, 28.6 GB (generated once into --workdir, needs ~50 GB "
                              "free), zipmoe, zipmoe-lookahead, dir and llamacpp, cold pass only."),
    routing: Optional[str] = typer.Option(None, "--routing", help="replay:FILE.npy: route by a real trace "
                                          "(e.g. ../shared/traces/qwen1.5-moe-a2.7b.npy) instead of the "
                                          "routers, the same choices for every system."),
    prompt_tokens: int = typer.Option(16, "--prompt-tokens", min=1, help="Fixed prompt length (token ids)."),
    new_tokens: int = typer.Option(24, "--new-tokens", min=2, help="Greedy tokens to generate per pass."),
    threads: int = typer.Option(1, "--threads", callback=threads_option,
                                help="Compute threads (torch) of every system, 1 .. 1024; the "
                                "decoder pool uses all cores. On a shared 2-core machine 1 is much faster."),
    workdir: Path = typer.Option(Path("/tmp/zipmoe-bench-e2e"), "--workdir",
                                 help="Where the generated checkpoint and archives are kept (reused)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny model, two budgets, few tokens: a smoke run."),
    no_cap: bool = typer.Option(False, "--no-cap", help="Do not create memory cgroups (figures uncapped)."),
    no_warm: bool = typer.Option(False, "--no-warm-pass", help="Only the cold pass."),
    repeat: int = typer.Option(1, "--repeat", min=1, help="Runs per system and budget (each cold); the table "
                               "shows the run with the median tokens/s, the JSON every run's."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Emulate slower storage: emmc (300 MB/s), ufs "
                                          "(2 GB/s) or bytes/s (500M, 1.5G); caps zipmoe's and raw's reads, "
                                          "skips hf-offload (page cache, cannot be throttled). Default: the real disk."),
    family: str = typer.Option("qwen2_moe", "--family", help="qwen2_moe (Qwen1.5-MoE-A2.7B's dims) or "
                               "switch_transformers (switch-large-128's expert dims, 2+2 sparse blocks; "
                               "hf-offload skipped); with --depth full: qwen2_moe or olmoe (OLMoE-1B-7B's "
                               "dims, 16 layers, 12.9 GB of experts, Qwen's tokenizer; needs ~40 GB free "
                               "with llamacpp)."),
    codec: str = typer.Option("huf4x", "--codec", help="Exponent codec of the compressed archive "
                              "(huf4x or zstd-lit; see zipmoe-pack --codec)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON result to this file."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of tokens/s vs budget (matplotlib)."),
    debug: bool = typer.Option(False, "--debug", help="Log progress."),
) -> None:
    """End to end under a memory budget: this runtime vs its --raw archive, transformers disk offload and
    everything resident; capped by memory cgroups, experts cold at the start of every run."""
    from rich.console import Console

    from zipmoe.bench.e2e import FAMILIES, SYSTEMS, E2EConfig, plot, render_table, render_targets, run

    _logging(debug)
    err = Console(stderr=True)
    try:
        pcts = tuple(float(b.strip().rstrip("%")) for b in budgets.split(",") if b.strip())
    except ValueError:
        fail(f"--budgets: expected comma-separated percentages, got {budgets!r}", 2)
    if not pcts or not all(0 < p < float("inf") for p in pcts):
        fail(f"--budgets: expected percentages above 0, got {budgets!r}", 2)
    if depth not in ("2", "full"):
        fail(f"--depth: expected 2 or full, got {depth!r}", 2)
    if systems is None:
        systems = "zipmoe,dir" if depth == "full" else "zipmoe,zipmoe-lookahead,raw,hf-offload,llamacpp,resident"
    names = tuple(x.strip() for x in systems.split(",") if x.strip())
    bad = [n for n in names if n not in SYSTEMS]
    if bad or not names:
        fail(f"--systems: unknown systems {bad} (known: {', '.join(SYSTEMS)})", 2)
    from zipmoe_run.store.io import parse_storage

    try:
        parse_storage(storage)
    except ValueError as exc:
        fail(f"--storage: {exc}", 2)
    if depth == "full" and family not in ("qwen2_moe", "olmoe"):
        fail(f"--depth full --family: expected qwen2_moe or olmoe, got {family!r}", 2)
    if depth != "full" and family not in FAMILIES:
        fail(f"--family: expected one of {', '.join(FAMILIES)}, got {family!r}", 2)
    from formats.codec import CODECS

    if codec not in CODECS:
        fail(f"--codec: expected one of {', '.join(sorted(CODECS))}, got {codec!r}", 2)
    cfg = E2EConfig(workdir=workdir, budgets=pcts, systems=names, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, threads=threads, cap=not no_cap,
                    warm_pass=not no_warm and depth != "full", storage=storage, family=family, repeat=repeat,
                    depth=depth, routing=routing, codec=codec)
    if depth == "full" and quick:
        fail("--depth full: builds Qwen1.5-MoE-A2.7B (qwen2_moe) or OLMoE-1B-7B's dims (olmoe); --quick does not apply", 2)
    if depth == "full" and budgets == "15,30,60,100":
        cfg.budgets = (15.0, 30.0, 60.0)
    if quick:
        cfg.quick, cfg.prompt_tokens, cfg.new_tokens = True, min(prompt_tokens, 6), min(new_tokens, 4)
        cfg.budgets = pcts if budgets != "15,30,60,100" else (30.0, 100.0)
    with guarded(debug, 2):
        from zipmoe.bench.routing import parse_routing

        parse_routing(routing)  # a bad --routing is refused before anything is generated
        result = run(cfg)
    if plot_path is not None and not plot(result, plot_path):
        err.print("matplotlib is not installed: no plot written (pip install 'zipmoe[bench]')", markup=False)
    if _emit(result, as_json, out):
        return
    console = Console(width=240)
    if result["model"].get("depth") == "full":
        from zipmoe.bench.e2e_full import render_full

        for table in render_full(result):
            console.print(table)
    else:
        table = render_table(result)
        if result.get("routing"):
            table.title = f"{table.title} ROUTING: {result['routing']['label']} ({result['routing']['trace']})"
        console.print(table)
    for s, why in (result.get("routing_skipped") or {}).items():
        console.print(f"{s} skipped ({result['routing']['label']}): {why}", highlight=False, markup=False)
    for line in render_targets(result):
        console.print(line, highlight=False, markup=False)
    if result["storage"]["emulated"]:
        console.print(result["storage"]["note"], highlight=False, markup=False)
    if result["hf_offload"]["skipped"]:
        console.print(result["hf_offload"]["note"], highlight=False, markup=False)
    if result["cgroup"] != "capped runs join a child memory cgroup":
        console.print(f"no memory cap: {result['cgroup']} (figures are uncapped)", highlight=False, markup=False)


@app.command("serve")
def serve_cmd(
    model: Path = typer.Argument(..., help="A .zmoe archive or a checkpoint folder."),
    budgets: str = typer.Option("30%,100%", "--budgets", help="Memory budgets (comma-separated: 30%, 3GiB, none)."),
    streams: str = typer.Option("1,2,4,8", "--streams", help="Concurrent clients (1, the sequential baseline, "
                                "is always run)."),
    requests: int = typer.Option(16, "--requests", "-n", min=1, max=10000, help="Requests per stream count."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, max=100000, help="Greedy tokens per request at most."),
    repeat: int = typer.Option(1, "--repeat", "-r", min=1, max=100, help="Runs per stream count (medians)."),
    threads: Optional[int] = typer.Option(None, "--threads", callback=threads_option, help="Compute threads."),
    llamacpp: bool = typer.Option(False, "--llamacpp", help="Also llama.cpp's server (skipped, saying why, when "
                                  "llama_cpp or its server does not import)."),
    no_cap: bool = typer.Option(False, "--no-cap", help="Run the server without its memory cgroup (uncapped)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON result to this file."),
    debug: bool = typer.Option(False, "--debug", help="Log progress."),
) -> None:
    """zipmoe serve: aggregate tok/s, TTFT and bytes read per token at 1-8 concurrent streams, per budget; the
    server runs in a child process capped by a memory cgroup at dense + budget + its measured overhead."""
    from rich.console import Console

    from zipmoe.bench.serve import render_table, run

    _logging(debug)
    try:
        stream_list = [int(s) for s in streams.split(",") if s.strip()]
    except ValueError:
        fail(f"--streams: expected comma-separated integers, got {streams!r}", 2)
    budget_list = [b.strip() for b in budgets.split(",") if b.strip()]
    if not budget_list or not stream_list:
        fail("--budgets and --streams need at least one value each", 2)
    with guarded(debug, 2):
        result = run(model, budgets=budget_list, streams=stream_list, requests=requests, max_tokens=max_tokens,
                     threads=threads, llamacpp=llamacpp, repeat=repeat, capped=not no_cap)
    if not _emit(result, as_json, out):
        Console(width=200).print(render_table(result))


@app.callback()
def _bench() -> None:
    """Benchmarks."""
