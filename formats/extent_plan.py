"""Which bytes make up one routed expert: expert tensors grouped into extents.

Shared by the packer (``zipmoe_pack.writer``: one archive extent per expert) and the runtime's
directory store (``zipmoe_run.store.dirbytes``: one read plan per expert straight from the shards),
so both agree on what an expert is, on the order of its parts and on its decoded layout.

A tensor is any object with ``name``, ``shape``, ``nbytes``, ``offset`` (absolute byte offset in its
file) and ``role`` (a ``formats.names.ExpertName``). A per-expert tensor is one part of its expert;
a fused tensor [E, ...] gives expert ``e`` its slice ``e`` (contiguous: ``nbytes / E`` bytes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from formats.index import OUT_ALIGN, STACKS

__all__ = ["PartPlan", "ExtentPlan", "plan_extents", "out_offsets"]


@dataclass
class PartPlan:
    tensor: object
    slice: int | None

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes // self.tensor.shape[0] if self.slice is not None else self.tensor.nbytes

    @property
    def shape(self) -> list[int]:
        return list(self.tensor.shape[1:] if self.slice is not None else self.tensor.shape)

    @property
    def src_offset(self) -> int:
        return self.tensor.offset + (self.slice or 0) * self.nbytes


@dataclass
class ExtentPlan:
    key: tuple  # (stack order, layer, expert)
    stack: str | None
    layer: int
    expert: int
    parts: list[PartPlan] = field(default_factory=list)


def plan_extents(tensors: Iterable) -> list[ExtentPlan]:
    """One plan per expert, sorted by (stack, layer, expert); parts sorted by (proj, tensor name)."""
    extents: dict[tuple, ExtentPlan] = {}
    for t in tensors:
        r = t.role
        experts = range(t.shape[0]) if r.fused else [r.expert]
        for e in experts:
            key = (STACKS.index(r.stack), r.layer, e)
            ep = extents.setdefault(key, ExtentPlan(key, r.stack, r.layer, e))
            ep.parts.append(PartPlan(t, e if r.fused else None))
    out = sorted(extents.values(), key=lambda x: x.key)
    for ep in out:
        ep.parts.sort(key=lambda p: (p.tensor.role.proj, p.tensor.name))
    return out


def out_offsets(parts: Iterable[PartPlan]) -> tuple[list[int], int]:
    """Where each part starts in the decoded expert buffer (multiples of ``OUT_ALIGN``), and its size."""
    offs, out = [], 0
    for pp in parts:
        offs.append(out)
        end = out + pp.nbytes
        out = (end + OUT_ALIGN - 1) // OUT_ALIGN * OUT_ALIGN
    return offs, (end if offs else 0)
