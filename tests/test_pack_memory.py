"""Packing streams: a checkpoint larger than the memory the packer may use still packs.

The packer runs in a child memory cgroup (v1 `memory.limit_in_bytes`) capped well below the
checkpoint's size; page cache is charged to the cgroup too, so only bounded working memory passes.
Skipped where no cgroup can be made.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zipmoe_pack.synth import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CAP = 220 << 20


def _memory_cgroup() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, path = line.split(":", 2)
            if "memory" in ctrl.split(","):
                base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                return base if (base / "memory.limit_in_bytes").exists() else None
    except OSError:
        return None
    return None


def test_pack_larger_than_its_memory_cap(tmp_path):
    base = _memory_cgroup()
    if base is None:
        pytest.skip("no cgroup v1 memory controller here")
    cg = base / f"zipmoe-test-{os.getpid()}"
    try:
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(CAP))
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup ({e.strerror})")
    try:
        src = make_checkpoint(tmp_path / "src", "qwen2_moe", shards=4, seed=3, tokenizer=False,
                              dims=dict(hidden=1024, moe_intermediate=1024, experts=32, layers=3, vocab=1000))
        size = sum(p.stat().st_size for p in src.iterdir())
        assert size > 2 * CAP
        code = (f"import os; open('{cg}/cgroup.procs','w').write(str(os.getpid())); "
                "import sys; from zipmoe.cli import main; sys.argv=['zipmoe']+sys.argv[1:]; main()")
        out, restored = tmp_path / "a.zmoe", tmp_path / "restored"
        for args in (["pack", src, out, "--threads", "2"], ["unpack", out, restored]):
            r = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, r.stderr
        assert int((cg / "memory.max_usage_in_bytes").read_text()) <= CAP
        for p in src.iterdir():
            assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256((restored / p.name).read_bytes()).digest()
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                import time
                time.sleep(0.1)
