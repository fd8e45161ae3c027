"""Weight sources: mapped dense tensors survive an in-place write (no SIGSEGV, the file never changes),
and closing a source releases everything it opened."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from formats.errors import FormatError
from zipmoe_pack.pack import PackOptions, pack
from zipmoe_run.archive_source import ArchiveSource
from zipmoe_run.source import DirectorySource

REPO = Path(__file__).resolve().parents[1]
DIMS = {"experts": 4, "top_k": 2, "layers": 2}
NAME = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def packed(checkpoint_factory, tmp_path_factory) -> tuple[Path, Path]:
    src = checkpoint_factory("qwen2_moe", seed=3, dims=DIMS)
    arc = tmp_path_factory.mktemp("mapped") / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=4096))
    return src, arc


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


WRITER = textwrap.dedent("""
    import sys, torch
    from zipmoe_run.api import load
    lm = load(sys.argv[1], dtype="bfloat16", threads=1)
    w = lm.source.dense({name!r})
    before = w.clone()
    w.add_(1)                                    # in place, on the mapped weight
    lm.model.model.embed_tokens.weight.mul_(2)   # and on the bound parameter
    assert not torch.equal(w, before)
    lm.close()
    print("survived")
""").format(name=NAME)


@pytest.mark.parametrize("which", ["archive", "directory"])
def test_inplace_write_to_mapped_weight_neither_crashes_nor_reaches_the_file(packed, which, tmp_path):
    path = packed[1] if which == "archive" else packed[0]
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    before = {f: _sha(f) for f in files}
    r = subprocess.run([sys.executable, "-c", WRITER, str(path)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"writer died with {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip() == "survived"
    assert {f: _sha(f) for f in files} == before
    with (ArchiveSource(path) if which == "archive" else DirectorySource(path)) as src, \
            DirectorySource(packed[0]) as ref:
        assert torch.equal(src.dense(NAME), ref.dense(NAME))


def test_archive_source_close_closes_the_archive(packed):
    src = ArchiveSource(packed[1])
    w = src.dense(NAME)
    copy = w.clone()
    src.close()
    assert src.archive.closed
    assert torch.equal(w, copy)  # views handed out stay valid
    with pytest.raises(FormatError, match="closed"):
        src.dense(NAME)
    src.close()  # idempotent
