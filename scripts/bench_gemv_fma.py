"""Measure variants of the bf16 GEMV's inner loop against the current kernel, from memory.

    python scripts/bench_gemv_fma.py [--threads 1,2] [--mb 160] [--reps 9] [--shapes 1408x2048,...]
                                     [--variants cur,fma,...] [--out FILE.json]

Every variant keeps each output row's float32 order: blocks of 16 uint32 words (32 bf16), even/odd
weights by shift/mask, 2 + 2 accumulator vectors of 8 lanes, block after block, pairwise lane sums.
What changes is how the loop is written:

* ``cur``: ``kernels._gemv_kernel`` as it is in the tree (``fmul`` then ``fadd``; the input as bf16 pairs);
* ``mul``: the same order written here (``fmul`` + ``fadd``) with the input as two float32 vectors
  (even, odd: the kernel before the input became bf16 pairs);
* ``..._xb``: the input as bf16 pairs (uint32 [K/2], half the bytes), split by shift/mask like the weights;
* ``fma``: ``llvm.fma.v8f32`` (one correctly rounded multiply-add) in place of ``fmul`` + ``fadd``;
* ``..._rR``: R weight rows per pass (each input vector loaded once for R rows; each row keeps its order);
* ``..._pfD``: ``llvm.prefetch`` of each row's weights D bytes ahead, one line per block;
* ``..._uU``: U blocks per loop iteration.

Variant names combine: ``fma_r2_pf1024``, ``mul_r4``. For each shape (out x in) it makes distinct
random bf16 matrices, ``--mb`` MiB in all (more than the last-level cache, so each product streams its
weights from memory as a decode step does), checks every variant bit for bit against its order's
reference (``mul``/``cur``: ``kernels.gemv_reference`` order; ``fma``: the first fma variant),
then times product by product, the variants interleaved call by call (rotating order, each on a matrix
none has touched for ``--mb`` MiB of products), and reports per variant the median over ``--reps``
passes and the best pass, in GB/s (bf16 bytes / time per product), with the ratio to the first
variant. On a shared host the figures are noisy (the best pass is the steadier comparison); compare
variants within one run. Shapes need K/2 divisible by 16 * U (no tail) and N divisible by R.
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
import torch  # noqa: F401  - before numba, as in the runtime (numba's OpenMP layer then shares torch's runtime)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from zipmoe_run import kernels as K  # noqa: E402

SHAPES = "1408x2048,2048x1408,2048x5632,5632x2048,2048x2048,576x1536"
VARIANTS = "cur,mul,fma,mul_xb,fma_xb"
LANES, WORDS = K.LANES, K.WORDS


def parse_variant(name: str) -> dict:
    parts = name.split("_")
    opt = {"fma": parts[0] == "fma", "rows": 1, "pf": 0, "unroll": 1, "xb": 0, "name": name}
    if parts[0] not in ("fma", "mul"):
        raise ValueError(f"unknown variant {name!r}")
    for p in parts[1:]:
        key = {"r": "rows", "pf": "pf", "u": "unroll", "xb": "xb"}[p.rstrip("0123456789")]
        opt[key] = int(p[len(p.rstrip("0123456789")):] or 1)
    return opt


def make_blocks(fma: bool, rows: int, pf: int, unroll: int, xb: int = 0):
    """An intrinsic (w, i, xe, xo, nb) -> (even_0, odd_0, ..., even_R-1, odd_R-1) of rows i..i+R-1."""
    nvec = WORDS // LANES

    @intrinsic
    def blocks(typingctx, w, i, xe, xo, nb):
        sig = types.UniTuple(types.float32, 2 * rows)(w, i, xe, xo, nb)

        def codegen(context, builder, signature, args):
            wa = context.make_array(signature.args[0])(context, builder, value=args[0])
            xea = context.make_array(signature.args[2])(context, builder, value=args[2])
            xoa = context.make_array(signature.args[3])(context, builder, value=args[3])
            i64, i32, f32, i8 = ir.IntType(64), ir.IntType(32), ir.FloatType(), ir.IntType(8)
            vi, vf = ir.VectorType(i32, LANES), ir.VectorType(f32, LANES)
            stride = cgutils.unpack_tuple(builder, wa.strides, 2)[0]
            base8 = builder.bitcast(wa.data, i8.as_pointer())
            rowp = [builder.gep(base8, [builder.mul(builder.add(args[1], ir.Constant(i64, r)), stride)])
                    for r in range(rows)]  # i8* of each row
            wvs = [builder.bitcast(p, vi.as_pointer()) for p in rowp]
            xev, xov = builder.bitcast(xea.data, vf.as_pointer()), builder.bitcast(xoa.data, vf.as_pointer())
            shift, mask = ir.Constant(vi, [16] * LANES), ir.Constant(vi, [0xFFFF0000 - (1 << 32)] * LANES)
            fmaf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v8f32")
            pfn = None
            if pf:
                fnty = ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32])
                pfn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            niter = builder.sdiv(args[4], ir.Constant(i64, unroll))
            entry = builder.block
            loop, done = builder.append_basic_block("vblocks"), builder.append_basic_block("vblocks_done")
            builder.cbranch(builder.icmp_signed(">", niter, ir.Constant(i64, 0)), loop, done)
            builder.position_at_end(loop)
            b = builder.phi(i64)
            acc = [builder.phi(vf) for _ in range(rows * 2 * nvec)]  # per row: even vectors, then odd
            cur = list(acc)
            for u in range(unroll):
                blk = builder.add(builder.mul(b, ir.Constant(i64, unroll)), ir.Constant(i64, u))
                if pf:
                    off = builder.add(builder.mul(blk, ir.Constant(i64, 4 * WORDS)), ir.Constant(i64, pf))
                    for p in rowp:
                        builder.call(pfn, [builder.gep(p, [off]), ir.Constant(i32, 0), ir.Constant(i32, 3),
                                           ir.Constant(i32, 1)])
                for v in range(nvec):
                    k = builder.add(builder.mul(blk, ir.Constant(i64, nvec)), ir.Constant(i64, v))
                    if xb:  # x as bf16 pairs (uint32 [K/2] passed as xe): split like the weights
                        xw = builder.load(builder.gep(builder.bitcast(xev, vi.as_pointer()), [k]), align=4)
                        xe_v = builder.bitcast(builder.shl(xw, shift), vf)
                        xo_v = builder.bitcast(builder.and_(xw, mask), vf)
                    else:
                        xe_v = builder.load(builder.gep(xev, [k]), align=4)
                        xo_v = builder.load(builder.gep(xov, [k]), align=4)
                    for r in range(rows):
                        wv = builder.load(builder.gep(wvs[r], [k]), align=4)
                        lo = builder.bitcast(builder.shl(wv, shift), vf)
                        hi = builder.bitcast(builder.and_(wv, mask), vf)
                        a = r * 2 * nvec
                        if fma:
                            cur[a + v] = builder.call(fmaf, [lo, xe_v, cur[a + v]])
                            cur[a + nvec + v] = builder.call(fmaf, [hi, xo_v, cur[a + nvec + v]])
                        else:
                            cur[a + v] = builder.fadd(cur[a + v], builder.fmul(lo, xe_v))
                            cur[a + nvec + v] = builder.fadd(cur[a + nvec + v], builder.fmul(hi, xo_v))
            sums = K.close_blocks(builder, entry, loop, done, b, acc, cur, niter, nvec)
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return blocks


def make_kernel(opt: dict):
    blk = make_blocks(opt["fma"], opt["rows"], opt["pf"], opt["unroll"], opt["xb"])
    rows = opt["rows"]

    @njit(parallel=True, nogil=True)
    def kern(w, xe, xo, out):  # w uint32 [N, K/2] (K/2 % (16 * U) == 0, N % R == 0); xe, xo f32 [K/2]
        n, kh = w.shape
        nb = kh // WORDS
        for c in prange(n // rows):
            s = blk(w, c * rows, xe, xo, nb)
            for r in range(rows):
                out[c * rows + r] = s[2 * r] + s[2 * r + 1]

    return kern


def bench(shapes, variants, threads, mb, reps):
    kerns = {}
    for name in variants:
        kerns[name] = (lambda w, xw, _, out: K._gemv_kernel(w, xw, out)) if name == "cur" else \
            make_kernel(parse_variant(name))
    rng = np.random.default_rng(0)
    res = []
    for shape in shapes:
        n, k = (int(v) for v in shape.split("x"))
        kh = k // 2
        nbytes = n * k * 2
        mats = max(2 * len(kerns), int(mb * 2 ** 20 // nbytes))  # reuse distance: mats products
        w0 = (rng.standard_normal((n, k), np.float32) * 0.02).view(np.uint32) >> 16
        w0 = w0.astype(np.uint16).view(np.uint32).reshape(n, kh)
        ws = [w0.copy() for _ in range(mats)]
        x = (rng.standard_normal(k, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)  # bf16 values
        xe, xo = np.ascontiguousarray(x[0::2]), np.ascontiguousarray(x[1::2])
        xw = x.view(np.uint32) >> 16
        xw = xw.astype(np.uint16).view(np.uint32)  # [K/2] bf16 pairs (x holds bf16 values)
        xargs = {nm: (xw, xw) if "_xb" in nm or nm == "cur" else (xe, xo) for nm in kerns}
        out = np.empty(n, np.float32)
        ref_mul = K.gemv_reference(w0, x) if "cur" in variants or any(v.startswith("mul") for v in variants) else None
        ref_fma = None
        for name, f in kerns.items():
            f(w0, *xargs[name], out)
            if name.startswith("fma"):
                if ref_fma is None:
                    ref_fma = out.copy()
                ok = np.array_equal(out.view(np.uint32), ref_fma.view(np.uint32))
            else:
                ok = np.array_equal(out.view(np.uint32), ref_mul.view(np.uint32))
            if not ok:
                raise SystemExit(f"{name} on {shape}: differs from its order's reference")
        for t in threads:
            numba.set_num_threads(t)
            names = list(kerns)
            nv = len(names)
            times = {name: [] for name in names}
            for rep in range(reps):
                tot = dict.fromkeys(names, 0.0)
                for i in range(mats):  # call by call, the variants interleaved, each on its own matrix
                    for v in range(nv):
                        name = names[(v + rep + i) % nv]
                        w = ws[(i + v * mats // nv) % mats]  # every matrix is touched once a pass per variant
                        t0 = time.perf_counter()
                        kerns[name](w, *xargs[name], out)
                        tot[name] += time.perf_counter() - t0
                for name in names:
                    times[name].append(tot[name] / mats)
            row = {"shape": shape, "threads": t, "mats": mats,
                   "gbps": {nm: nbytes / statistics.median(v) / 1e9 for nm, v in times.items()},
                   "best_gbps": {nm: nbytes / min(v) / 1e9 for nm, v in times.items()}}
            res.append(row)
            for key in ("gbps", "best_gbps"):
                base = row[key].get("cur") or next(iter(row[key].values()))
                print(f"{shape:>10} t={t} {key[:4]:4} " + " ".join(f"{nm}={g:5.1f}({g / base:4.2f})"
                                                               for nm, g in row[key].items()), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--mb", type=float, default=160.0)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--out")
    a = ap.parse_args()
    print(f"host: {os.uname().machine}, numba {numba.__version__}, threads {numba.config.NUMBA_NUM_THREADS}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    res = bench(a.shapes.split(","), a.variants.split(","), [int(t) for t in a.threads.split(",")], a.mb, a.reps)
    print(f"load after {os.getloadavg()[0]:.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
