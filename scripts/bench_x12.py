"""Benchmark the 12-bit form (x12) against bf16: one-row products and the decode to bf16.

    python scripts/bench_x12.py [--threads 1,2] [--rows 1] [--mats 64] [--reps 7] [--clock wall|cpu]
                                [--shapes 1408x2048,...] [--out FILE.json]

For each shape (out x in) it makes ``--mats`` distinct copies of one N(0, 0.02) bf16 matrix (distinct
memory, so each product streams its weights from DRAM as a decode step does; more than the last-level
cache in all) and their x12 encodings, then times, alternating the kernels pass by pass:

* ``x12``: ``resident.x12_linear`` (the x12 GEMV, bf16 in, bf16 out);
* ``numba``: the bf16 numba GEMV (``kernels.run_kernel("numba")``);
* ``torch``: ``torch.nn.functional.linear`` (``kernels.run_kernel("torch")``, torch's threads);
* ``decode``: x12 -> bf16 of the whole matrix (``x12.decode_into``), the cost of an x12 tier that is
  expanded to bf16 before use.

With ``--rows M`` (> 1: batched decode) each product has M input rows: ``numba`` is then the bf16
multi-row kernel (``kernels.gemm_rows``) and ``torch`` ``F.linear`` of the M rows (x12 is checked bit for
bit against the multi-row kernel first).

All under ``kernels.single_row_scope`` (as a decode step runs). A pass runs every matrix once; the
figure is the median over ``--reps`` passes of the time per product and its bf16-equivalent GB/s
(bf16 bytes of the matrix / time: the same work for every kernel), plus the bytes actually moved per
second (x12: its exact bytes). Prints the host line (``zipmoe_run.calibrate.report``), the load average
before and after, a table, and writes JSON with ``--out``. ``NUMBA_CPU_NAME=haswell`` (with
``ATEN_CPU_CAPABILITY=avx2``) in the environment emulates the AVX2 instruction set on an AVX-512 host
(not its microarchitecture); the JSON records those variables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zipmoe_run import kernels as K  # noqa: E402
from zipmoe_run import x12 as X  # noqa: E402
from zipmoe_run.resident import x12_linear  # noqa: E402

SHAPES = "1408x2048,2048x1408,5632x2048,2048x5632,2048x2048"
ENV_KEYS = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "ATEN_CPU_CAPABILITY")


def _matrix(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16()


def _bf16_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """M rows through the bf16 multi-row kernel (``kernels.gemm_rows``, each row in the one-row order)."""
    return torch.from_numpy(K.gemm_rows(x, w)).to(torch.bfloat16)


def _torch_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return K._torch_linear(x, w)


def bench_shape(n: int, k: int, threads: int, mats: int, reps: int, clock=time.perf_counter, rows: int = 1) -> dict:
    base = _matrix(n, k)
    ws = [base.clone() for _ in range(mats)]  # [N, K] bf16, distinct memory
    bits = base.view(torch.int16).numpy().view(np.uint16)
    X.from_bf16(bits)  # compile
    enc_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        enc = X.from_bf16(bits)
        enc_s.append(time.perf_counter() - t0)
    xs = [X.X12(enc.shape, *(a.copy() for a in (enc.nibbles, enc.sm, enc.table, enc.row_ptr, enc.esc_col,
                                                  enc.esc_exp))) for _ in range(mats)]
    outs = [w.view(torch.int32).numpy().view(np.uint32).reshape(n, k // 2) for w in ws]  # decode targets
    x = _matrix(rows, k, seed=1)  # [M, K]
    one = rows == 1
    numba_f = (lambda i: K.run_kernel("numba", x, ws[i])) if one else (lambda i: _bf16_rows(x, ws[i]))
    torch_f = (lambda i: K.run_kernel("torch", x, ws[i])) if one else (lambda i: _torch_rows(x, ws[i]))
    assert torch.equal(x12_linear(x, xs[0]).view(torch.int16), numba_f(0).view(torch.int16)), "x12 != bf16 kernel"
    runs = {
        "x12": lambda i: x12_linear(x, xs[i]),
        "numba": numba_f,
        "torch": torch_f,
        "decode": lambda i: X.decode_into(xs[i], outs[i]),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for f in runs.values():
        f(0)  # warm-up (compile, first touch)
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))  # alternate who runs first
        for name in order:
            f = runs[name]
            t0 = clock()
            for i in range(mats):
                f(i)
            times[name].append((clock() - t0) / mats)
    assert all(np.array_equal(o, outs[0]) for o in outs)
    assert np.array_equal(outs[0].view(np.uint16).reshape(n, k), bits)  # the decode gave the weights back
    bf16 = 2 * n * k
    res = {"shape": f"{n}x{k}", "threads": threads, "rows": rows, "mats": mats, "reps": reps, "bf16_bytes": bf16,
           "x12_bytes": enc.nbytes, "x12_ratio": round(enc.ratio, 4), "escapes": enc.escapes,
           "encode_gbps_bf16_in": round(2 * n * k / min(enc_s) / 1e9, 3), "kernels": {}}
    # adjacent passes (the same rep) paired: slow drifts of a shared host cancel in the ratio
    res["paired_numba_over_x12"] = round(statistics.median(b / a for a, b in zip(times["x12"], times["numba"])), 3)
    res["paired_torch_over_x12"] = round(statistics.median(b / a for a, b in zip(times["x12"], times["torch"])), 3)
    for name, ts in times.items():
        med = statistics.median(ts)
        moved = enc.nbytes + (bf16 if name == "decode" else 0) if name in ("x12", "decode") else bf16
        res["kernels"][name] = {"us": round(med * 1e6, 1), "us_best": round(min(ts) * 1e6, 1),
                                "us_all": [round(t * 1e6, 1) for t in ts],
                                "gbps_bf16_equiv": round(bf16 / med / 1e9, 2),
                                "gbps_moved": round(moved / med / 1e9, 2)}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--mats", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--rows", type=int, default=1,
                    help="input rows per product (batched decode): >1 compares with the bf16 multi-row kernel "
                         "(kernels.gemm_rows) and F.linear on M rows")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (1 thread only: every kernel then runs on the calling "
                         "thread), which leaves out the time other processes hold the core on a shared host")
    a = ap.parse_args(argv)
    if not K.enabled():
        print("error: the numba kernels are unavailable", file=sys.stderr)
        return 2
    from zipmoe_run.calibrate import report as host_report

    host = host_report(threads=max(int(t) for t in a.threads.split(",")))
    print(host["host_line"])
    env = {k: os.environ[k] for k in ENV_KEYS if os.environ.get(k)}
    if env:
        print("emulated instruction set (not the microarchitecture): " + " ".join(f"{k}={v}" for k, v in env.items()))
    if a.clock == "cpu" and a.threads.strip() != "1":
        print("error: --clock cpu measures one thread (use --threads 1)", file=sys.stderr)
        return 2
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    load0 = os.getloadavg()
    results = []
    if a.rows > 1:
        print(f"{a.rows} input rows per product: numba = the bf16 multi-row kernel, torch = F.linear; GB/s per "
              "product (the weights are read once)")
    print(f"{'shape':>10} {'thr':>3} | {'x12 us':>8} {'GB/s':>6} | {'numba us':>8} {'GB/s':>6} | {'torch us':>8} "
          f"{'GB/s':>6} | {'x12/numba':>9} {'best':>5} {'paired':>6} {'x12/torch':>9} | {'decode GB/s':>11}")
    for t in (int(s) for s in a.threads.split(",")):
        torch.set_num_threads(t)
        with K.single_row_scope(True):
            for shape in a.shapes.split(","):
                n, k = (int(v) for v in shape.lower().split("x"))
                r = bench_shape(n, k, t, a.mats, a.reps, clock, a.rows)
                results.append(r)
                kk = r["kernels"]
                print(f"{r['shape']:>10} {t:>3} | {kk['x12']['us']:>8.0f} {kk['x12']['gbps_bf16_equiv']:>6.2f} | "
                      f"{kk['numba']['us']:>8.0f} {kk['numba']['gbps_bf16_equiv']:>6.2f} | {kk['torch']['us']:>8.0f} "
                      f"{kk['torch']['gbps_bf16_equiv']:>6.2f} | {kk['numba']['us'] / kk['x12']['us']:>9.2f} "
                      f"{kk['numba']['us_best'] / kk['x12']['us_best']:>5.2f} {r['paired_numba_over_x12']:>6.2f} "
                      f"{kk['torch']['us'] / kk['x12']['us']:>9.2f} | {kk['decode']['gbps_bf16_equiv']:>11.2f}",
                      flush=True)
    load1 = os.getloadavg()
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f} (cores: {os.cpu_count()}); "
          "GB/s = bf16 bytes of the matrix per second (the same work for every kernel); medians of "
          f"{a.reps} passes over {a.mats} distinct matrices ({a.clock} clock); 'best': the ratio of the "
          "fastest passes; 'paired': median of the ratios of adjacent passes; x12/numba > 1: x12 is faster; decode: "
          "bf16 bytes written per second")
    out = {"benchmark": "x12", **host, "codegen_env": env, "clock": a.clock, "rows": a.rows,
           "loadavg_before": load0, "loadavg_after": load1, "results": results}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
