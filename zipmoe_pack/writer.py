"""Write a `.zmoe` archive (specs/zmoe.md): plan, then stream tensor by tensor.

The plan fixes the order of every region and bounds the index length (every number serialised at its
maximum width), so the data section starts at a known aligned offset before a byte is written.
Experts are split and entropy-coded on a thread pool with a bounded window of experts in flight, and
written in plan order, so the output does not depend on the thread count.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from formats.codec import DEFAULT_CODEC, codec_params
from formats.extent_plan import ExtentPlan  # noqa: F401 (re-exported for zipmoe_pack.pack)
from formats.extent_plan import plan_extents as _plan_extents
from formats.index import OUT_ALIGN
from formats.preamble import ALIGNMENT, VERSION, hex64
from zipmoe_pack import __version__
from zipmoe_pack.scan import Checkpoint, SrcTensor

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 1 << 20
RAW_CHUNK_BYTES = 1 << 21
_MAXNUM = (1 << 53) - 1  # placeholder of maximum width when bounding the index length


@dataclass
class PackOptions:
    threads: int = 0  # 0: all cores
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    codec: str = DEFAULT_CODEC
    raw: bool = False  # store BF16 experts uncompressed (benchmark baseline)


@dataclass
class PackReport:
    path: Path
    seconds: float
    threads: int
    file_bytes: int
    dense_bytes: int
    expert_bytes: int  # original bytes of the routed experts
    expert_stored: int  # bytes the extents take in the archive
    exp_elements: int
    exp_coded: int
    extents: int
    tensors: int

    @property
    def expert_ratio(self) -> float:
        return self.expert_stored / self.expert_bytes if self.expert_bytes else 1.0

    @property
    def bits_per_exponent(self) -> float:
        return 8 * self.exp_coded / self.exp_elements if self.exp_elements else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.expert_bytes / self.seconds / 1e6 if self.seconds else 0.0


def plan_extents(ck: Checkpoint) -> list[ExtentPlan]:
    return _plan_extents(ck.experts)


def _encoding(t: SrcTensor, opts: PackOptions) -> str:
    return "bf16-split" if t.dtype == "BF16" and not opts.raw else "raw"


def _raw_region(offset: int, nbytes: int, xs=None) -> dict:
    n = math.ceil(nbytes / RAW_CHUNK_BYTES)
    return {"offset": offset, "length": nbytes, "xxh3": xs if xs is not None else [hex64(_MAXNUM)] * n}


def _bound_index(ck: Checkpoint, plans: list[ExtentPlan], opts: PackOptions) -> int:
    """Length of the index with every number at its maximum width: the real index is never longer."""
    doc = build_index(ck, plans, opts, placeholder=True)
    return len(_dumps(doc))


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def build_index(ck, plans, opts, placeholder=False, layout=None) -> dict:
    """The index document; with placeholder=True every unknown number takes its widest value."""
    M, H = _MAXNUM, hex64(_MAXNUM)
    sha0 = "f" * 64
    L = layout or {}
    C = opts.chunk_elements
    files, tensors = [], []
    for f in ck.files:
        e = {"path": f.path, "kind": f.kind, "size": f.size, "sha256": L.get(("sha", f.path), sha0)}
        if f.kind == "blob":
            e["data"] = {"offset": L.get(("off", f.path), M), "length": f.size}
            e["xxh3"] = L.get(("xxh", f.path), H)
        else:
            e["header"] = {"offset": L.get(("off", f.path), M), "length": f.header_length,
                           "xxh3": L.get(("xxh", f.path), H)}
            e["tensors"] = [t.name for t in f.tensors]
        files.append(e)
        for t in f.tensors:
            te = {"name": t.name, "file": f.path, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes,
                  "sha256": L.get(("sha", t.name), sha0)}
            if t.role is None:
                te["role"] = "dense"
                te["data"] = _raw_region(L.get(("off", t.name), M), t.nbytes, L.get(("xxh", t.name)))
            else:
                te["role"] = "expert"
                te["expert"] = {"stack": t.role.stack, "layer": t.role.layer, "proj": t.role.proj,
                                "fused": t.role.fused}
            tensors.append(te)
    experts = []
    for ep in plans:
        ext = L.get(("ext", ep.key), {})
        parts, out = [], 0
        for i, pp in enumerate(ep.parts):
            t = pp.tensor
            pe = {"tensor": t.name, "slice": pp.slice, "proj": t.role.proj, "dtype": t.dtype, "shape": pp.shape,
                  "nbytes": pp.nbytes, "out_offset": out}
            got = ext.get(i, {})
            if _encoding(t, opts) == "raw":
                pe["encoding"] = "raw"
                pe["data"] = _raw_region(got.get("off", M), pp.nbytes, got.get("xxh"))
            else:
                n = pp.nbytes // 2
                k = math.ceil(n / C)
                pe["encoding"] = "bf16-split"
                pe["codec"] = opts.codec
                pe["exp_chunks"] = got.get("chunks", [[M, M, H]] * k)
                pe["sm"] = {"offset": got.get("sm_off", M), "length": n, "xxh3": got.get("sm_xxh", [H] * k)}
            parts.append(pe)
            out = (out + pp.nbytes + OUT_ALIGN - 1) // OUT_ALIGN * OUT_ALIGN
        experts.append({"stack": ep.stack, "layer": ep.layer, "expert": ep.expert,
                        "offset": ext.get("off", M), "exp_length": ext.get("exp_length", M),
                        "length": ext.get("length", M), "parts": parts})
    projs = sorted({p.tensor.role.proj for ep in plans for p in ep.parts if _encoding(p.tensor, opts) != "raw"})
    stats = L.get("stats") or {p: {"elements": M, "coded_bytes": M, "exp_histogram": [M] * 256} for p in projs}
    return {"format": "zmoe", "version": VERSION, "alignment": ALIGNMENT, "chunk_elements": C,
            "raw_chunk_bytes": RAW_CHUNK_BYTES, "created_by": f"zipmoe-pack {__version__}",
            "codecs": {opts.codec: codec_params(opts.codec)} if projs else {},
            "model": {"model_type": ck.model_type, "config_file": "config.json"},
            "files": files, "tensors": tensors, "experts": experts, "stats": stats}
