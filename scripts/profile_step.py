"""Profile one all-resident bf16 decode step of a checkpoint (default: the realdims Qwen one).

    python scripts/profile_step.py [PATH] [--threads 2] [--steps 40] [--ops] [--split]

Prints the median step time, a per-part breakdown (attention, router, shared expert, routed experts,
norms, lm_head, the rest) from forward hooks, the GEMV calls per step, and with ``--ops`` torch.profiler's
table of ops (self CPU time). ``--split`` separates the matrix kernels from the rest of the step
(``split``). The host is shared: numbers are medians of ``--steps`` steps; compare variants in the same
process. Reads the checkpoint only.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

DEFAULT = "/tmp/zipmoe-bench-e2e/qwen15moe-ckpt"


def _part(name: str) -> str | None:
    if name.endswith("self_attn"):
        return "attention"
    if name.endswith("shared_expert"):
        return "shared_expert"
    if name.endswith(("mlp.gate", "block_sparse_moe.gate")):
        return "router"
    if name.endswith("layernorm") or name == "model.norm":
        return "norms"
    if name == "lm_head":
        return "lm_head"
    if name.endswith((".mlp", ".block_sparse_moe")):  # Mixtral's spelling
        return "moe_block"
    return None


def hook_parts(model) -> dict[str, list[float]]:
    """Forward hooks timing each part; moe_block minus its children is the routed experts and the rest."""
    acc: dict[str, list[float]] = defaultdict(list)
    for name, mod in model.named_modules():
        part = _part(name)
        if part is None:
            continue
        t0 = [0.0]

        def pre(m, a, t0=t0):
            t0[0] = time.perf_counter()

        def post(m, a, o, t0=t0, part=part):
            acc[part].append(time.perf_counter() - t0[0])

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)
    return acc


@functools.cache
def variants() -> dict:
    """name -> switch(on) of the trims that can be undone in a running process (built once, with the
    trims on, so switching on restores them)."""
    from zipmoe_run import kernels as K

    nan16 = K._NAN16

    def addr(on: bool) -> None:  # the GEMV by address (kernels_addr) or the numpy-view path
        K._NAN16 = nan16 if on else None

    from zipmoe_run import layers as L

    one = L.moe_one

    def moe(on: bool) -> None:  # one token's routed sum (moe_one) or the grouping path
        L.moe_one = one if on else (lambda *a: None)

    def both(on: bool) -> None:
        addr(on)
        moe(on)

    return {"gemv by address": addr, "moe_one": moe, "both": both}


def ab(step, steps: int, rounds: int = 8, clock=time.perf_counter) -> None:
    """Each trim off and on in alternating rounds of ``steps // 4`` steps; median step time of each
    (``clock``: wall time, or with --cpu this thread's CPU time: at 1 thread the step's own work, which
    other processes on the cores disturb less than the wall clock)."""
    for name, switch in variants().items():
        res: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds):
            for on in ((True, False) if r % 2 else (False, True)):
                switch(on)
                step()
                for _ in range(max(1, steps // 4)):
                    t = clock()
                    step()
                    res[on].append(clock() - t)
        switch(True)
        off, on = statistics.median(res[False]) * 1e3, statistics.median(res[True]) * 1e3
        lo_off, lo_on = min(res[False]) * 1e3, min(res[True]) * 1e3  # the least disturbed steps
        print(f"A/B {name}: off {off:.2f} ms, on {on:.2f} ms ({off - on:+.2f} ms; minima {lo_off:.2f} / {lo_on:.2f}, "
              f"{lo_off - lo_on:+.2f} ms; {len(res[True])} steps each)")


def _kernel_entries() -> list[tuple[object, str, object]]:
    """(module, name, bytes(args)) of the matrix kernels' entry points a decode step calls by address."""
    from zipmoe_run import kernels_addr as KA

    out = [(KA, "_gemv_bf16_kernel", lambda a: a[1] * a[2] * 4),  # (w, n, K/2, ...)
           (KA, "_gemv3_bf16_kernel", lambda a: (a[3] + a[7] + a[11]) * a[0] * 4)]  # (K/2, x, w1, n1, ..)
    try:
        from zipmoe_run import kernels_dp1 as D1
        out.append((D1, "_dp16_kernel", lambda a: a[1] * a[2] * 4))
    except ImportError:  # numba without the dp kernel
        pass
    return out


def split(step, steps: int, rounds: int = 3) -> None:
    """Where a step's time goes, in three modes alternated round by round (medians):

    * ``real``: the matrix kernels as they are; the time inside them and the rest of the step;
    * ``stubbed``: the kernels replaced by no-ops (the results are garbage; the step's Python, torch and
      small numba work still runs, with warm caches): what the rest costs by itself;
    * ``streamed``: each stub reads as many bytes as the kernel would, from a 512 MiB pool (numpy,
      one thread: no arithmetic), so the caches are flushed between the pieces of the step as the
      weights flush them: the rest of ``streamed`` minus that of ``stubbed`` is the cost of running
      the step's small work on cold caches.
    """
    import numpy as np

    pool = np.ones(64 << 20, np.uint64)  # 512 MiB
    at = [0]
    inside = [0.0]
    entries = _kernel_entries()
    orig = {(m, n): getattr(m, n) for m, n, _ in entries}

    def wrap(mode: str):
        for mod, name, nbytes in entries:
            f = orig[(mod, name)]

            def w(*a, f=f, nbytes=nbytes):
                t = time.perf_counter()
                if mode == "real":
                    f(*a)
                elif mode == "streamed":
                    n = max(1, nbytes(a) // 8)
                    if at[0] + n > pool.size:
                        at[0] = 0
                    np.bitwise_or.reduce(pool[at[0]:at[0] + n])
                    at[0] += n
                inside[0] += time.perf_counter() - t

            setattr(mod, name, w)

    res: dict[str, list[tuple[float, float]]] = {m: [] for m in ("real", "stubbed", "streamed")}
    try:
        for r in range(rounds):
            for mode in (("real", "stubbed", "streamed") if r % 2 == 0 else ("streamed", "stubbed", "real")):
                wrap(mode)
                step()
                for _ in range(steps):
                    inside[0] = 0.0
                    t = time.perf_counter()
                    step()
                    res[mode].append((time.perf_counter() - t, inside[0]))
    finally:
        for (mod, name), f in orig.items():
            setattr(mod, name, f)
    for mode, v in res.items():
        tot = statistics.median(a for a, _ in v) * 1e3
        ins = statistics.median(b for _, b in v) * 1e3
        rest = statistics.median(a - b for a, b in v) * 1e3
        what = {"real": "in the kernels", "stubbed": "in the stubs", "streamed": "streaming"}[mode]
        print(f"split {mode:8s}: step {tot:7.2f} ms, {what} {ins:7.2f} ms, rest {rest:6.2f} ms ({len(v)} steps)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", default=DEFAULT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ops", action="store_true", help="torch.profiler table of ops")
    ap.add_argument("--no-parts", action="store_true", help="skip the hook breakdown")
    ap.add_argument("--off", action="store_true", help="this session's trims off for the whole run (the old paths)")
    ap.add_argument("--cpu", action="store_true", help="--ab by this thread's CPU time (use with --threads 1)")
    ap.add_argument("--split", action="store_true",
                    help="kernels vs the rest; the rest alone (kernels stubbed) and on flushed caches")
    ap.add_argument("--ab", action="store_true",
                    help="alternate the step with and without this session's trims (same process), medians")
    args = ap.parse_args()

    from zipmoe_run import kernels as K
    from zipmoe_run.api import load

    lm = load(args.path, threads=args.threads)
    model = lm.model
    prompt = torch.arange(1, 9)[None]  # [1, 8]
    cache = model.new_cache(1, 64)
    model(prompt, cache, 0, last_only=True)
    x = torch.tensor([[5]])
    pos = prompt.shape[1]

    def step():
        return model(x, cache, pos, last_only=True)

    if args.off:
        variants()["both"](False)

    for _ in range(5):
        step()
    calls = [0]
    entries = _kernel_entries()
    saved = [getattr(mod, name) for mod, name, _ in entries]
    for (mod, name, _), fn in zip(entries, saved):
        setattr(mod, name, lambda *a, fn=fn: calls.__setitem__(0, calls[0] + 1) or fn(*a))
    step()
    for (mod, name, _), fn in zip(entries, saved):
        setattr(mod, name, fn)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(f"threads {args.threads}: step median {statistics.median(times) * 1e3:.2f} ms "
          f"(min {min(times) * 1e3:.2f}, {args.steps} steps); matrix kernel calls per step: {calls[0]}")

    if args.split:
        split(step, args.steps)

    if args.ab:
        ab(step, args.steps, clock=time.thread_time if args.cpu else time.perf_counter)
        if args.off:
            variants()["both"](False)

    if not args.no_parts:
        acc = hook_parts(model)
        tot = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            tot.append(time.perf_counter() - t)
        n = args.steps
        per = {k: sum(v) / n for k, v in acc.items()}
        moe = per.pop("moe_block", 0.0) - per.get("shared_expert", 0.0) - per.get("router", 0.0) \
            - per.get("norms_in_moe", 0.0)
        per["routed+gate+sum"] = moe
        step_mean = sum(tot) / n
        per["other"] = step_mean - sum(per.values())
        print(f"with hooks (the module path: hooks bypass models/_step.py): step mean {step_mean * 1e3:.2f} ms")
        for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
            print(f"  {k:18s} {v * 1e3:7.3f} ms")

    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    lm.close()


if __name__ == "__main__":
    main()
