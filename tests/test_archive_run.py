"""Lossless end to end: the runtime on an archive and on its source folder gives bit-identical logits."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from formats.decoder import ParallelDecoder
from formats.errors import CorruptDataError
from formats.reader import Archive
from formats.restore import unpack, verify
from tests.stfile import read_index
from zipmoe_pack.pack import PackOptions, pack
from zipmoe_pack.synth import make_checkpoint
from zipmoe_run.api import load

FAMILIES = ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3"]
PROMPT = [[5, 17, 42, 7, 99, 3, 250, 11]]


@pytest.fixture(scope="module", params=[(f, "per-expert") for f in FAMILIES] + [("qwen2_moe", "fused")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def packed(request, tmp_path_factory) -> tuple[Path, Path]:
    family, layout = request.param
    root = tmp_path_factory.mktemp(f"{family}-{layout}")
    src = make_checkpoint(root / "src", family, layout=layout, shards=3, seed=1)
    arc = root / "m.zmoe"
    pack(src, arc, PackOptions(threads=2, chunk_elements=4096))
    return src, arc


def _sha_tree(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_unpack_is_byte_identical(packed, tmp_path):
    src, arc = packed
    with Archive(arc) as ar, ParallelDecoder(2) as dec:
        verify(ar, dec, source=src)
        unpack(ar, dec, tmp_path / "out")
    assert _sha_tree(tmp_path / "out") == _sha_tree(src)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_archive_and_directory_logits_bit_identical(packed, dtype):
    src, arc = packed
    logits = []
    for path in (src, arc):
        lm = load(path, dtype=dtype, threads=2)
        model = lm.model
        with torch.no_grad():
            cache = model.new_cache(1, 32)
            x = model(torch.tensor(PROMPT), cache, 0)  # [1, T, V]
            step = model(x[:, -1:].argmax(-1), cache, len(PROMPT[0]))  # [1, 1, V]
        logits.append((x.clone(), step.clone()))
        lm.source.close()
    (a, sa), (b, sb) = logits
    assert torch.equal(a, b) and torch.equal(sa, sb)


def test_corrupt_expert_chunk_stops_generation(packed, tmp_path):
    _, arc = packed
    doc, buf = read_index(arc)
    part = doc["experts"][0]["parts"][0]
    off = part["exp_chunks"][0][0] if part["encoding"] == "bf16-split" else part["data"]["offset"]
    buf[off] ^= 0xFF
    bad = tmp_path / "bad.zmoe"
    bad.write_bytes(bytes(buf))
    lm = load(bad, dtype="float32", threads=2)
    with pytest.raises(CorruptDataError, match=part["tensor"].replace(".", r"\.")):
        for layer_id in range(len(doc["experts"])):  # touch every expert the archive has
            e = doc["experts"][layer_id]
            list(lm.source.fetch(e["layer"], [e["expert"]], e["stack"]))
    lm.source.close()
