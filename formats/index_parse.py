"""Parse the index JSON into `formats.index` entries, checking specs/zmoe.md section 3.

Nothing is trusted: every field is type-checked, every size is recomputed from dtype and shape,
every region is bounds-checked and no two regions may overlap. Errors are FormatError with a
message naming the entry (tensor name, file path, expert key) and the offending offset or value.
"""
from __future__ import annotations

from formats.codec import CODECS
from formats.dtypes import DTYPE_BITS, tensor_nbytes
from formats.errors import FormatError
from formats.index import (ALIGNMENT_V1, OUT_ALIGN, STACKS, ExpChunk, Extent, FileEntry, Index, Part, Region,
                           TensorEntry)
from formats.index_fields import Ctx as _Ctx
from formats.index_fields import ceil_div as _ceil_div
from formats.index_fields import check_path
from formats.index_fields import parse_codecs as _parse_codecs
from formats.index_fields import parse_stats as _parse_stats
from formats.jsonstrict import JSONRejected, loads
from formats.names import parse_expert_name

MAX_DEPTH = 32  # arrays/objects; the index itself needs 7
MAX_DIGITS = 20  # 2^64 - 1 has 20 digits
_STACK_ORDER = {s: i for i, s in enumerate(STACKS)}


def _nbytes(ctx: _Ctx, obj, shape, what) -> tuple[str, int]:
    dtype = ctx.get(obj, "dtype", str, what)
    if dtype not in DTYPE_BITS:
        ctx.fail(what, f"unknown dtype {dtype!r}")
    nbytes = ctx.get(obj, "nbytes", int, what)
    try:
        want = tensor_nbytes(dtype, shape)
    except ValueError as e:
        ctx.fail(what, str(e))
    if nbytes != want:
        ctx.fail(what, f"nbytes {nbytes} disagrees with dtype {dtype} and shape {list(shape)} ({want})")
    return dtype, nbytes


def _parse_file(ctx: _Ctx, f) -> FileEntry:
    path = ctx.get(f, "path", str, "files[]")
    what = f"file {path!r}"
    check_path(ctx, path, what)
    kind = ctx.get(f, "kind", str, what)
    size = ctx.get(f, "size", int, what)
    sha = ctx.hexval(ctx.get(f, "sha256", str, what), 64, what)
    if kind == "blob":
        data = ctx.region(ctx.get(f, "data", dict, what), what)
        if data.length != size:
            ctx.fail(what, f"blob region holds {data.length} bytes but the file has {size}")
        return FileEntry(path, kind, size, sha, data=data, xxh3=ctx.xxh(ctx.get(f, "xxh3", str, what), what))
    if kind == "safetensors":
        hdr = ctx.get(f, "header", dict, what)
        header = ctx.region(hdr, what + " header")
        names = ctx.get(f, "tensors", list, what)
        if any(not isinstance(n, str) for n in names):
            ctx.fail(what, "tensor names must be strings")
        return FileEntry(path, kind, size, sha, header=header,
                         header_xxh3=ctx.xxh(ctx.get(hdr, "xxh3", str, what), what), tensors=tuple(names))
    ctx.fail(what, f"unknown file kind {kind!r}")


def _parse_tensor(ctx: _Ctx, t, R: int) -> TensorEntry:
    name = ctx.get(t, "name", str, "tensors[]")
    what = f"tensor {name}"
    shape = ctx.shape(t, what)
    dtype, nbytes = _nbytes(ctx, t, shape, what)
    common = dict(name=name, file=ctx.get(t, "file", str, what), dtype=dtype, shape=shape, nbytes=nbytes,
                  sha256=ctx.hexval(ctx.get(t, "sha256", str, what), 64, what))
    role = ctx.get(t, "role", str, what)
    if role == "dense":
        data = ctx.region(ctx.get(t, "data", dict, what), what)
        if data.length != nbytes:
            ctx.fail(what, f"data region at offset {data.offset} holds {data.length} bytes, expected {nbytes}")
        if data.offset % ALIGNMENT_V1:
            ctx.fail(what, f"dense data offset {data.offset} is not a multiple of {ALIGNMENT_V1}")
        xs = ctx.xxh_list(t["data"], "xxh3", _ceil_div(nbytes, R), what)
        return TensorEntry(role=role, data=data, xxh3=xs, **common)
    if role == "expert":
        e = ctx.get(t, "expert", dict, what)
        stack = ctx.key(e, "stack", what)
        if stack not in STACKS:
            ctx.fail(what, f"unknown stack {stack!r}")
        fused = ctx.get(e, "fused", bool, what)
        if fused and not shape:
            ctx.fail(what, "a fused expert tensor needs an expert dimension")
        return TensorEntry(role=role, stack=stack, layer=ctx.get(e, "layer", int, what),
                           proj=ctx.get(e, "proj", str, what), fused=fused, **common)
    ctx.fail(what, f"unknown role {role!r}")


def _parse_part(ctx: _Ctx, p, ext: str, C: int, R: int, out_offset: int) -> Part:
    tname = ctx.get(p, "tensor", str, ext)
    sl = ctx.key(p, "slice", ext)
    if sl is not None and (not isinstance(sl, int) or isinstance(sl, bool) or sl < 0):
        ctx.fail(ext, f"bad slice {sl!r}")
    what = f"tensor {tname}" + (f" slice {sl}" if sl is not None else "") + f" ({ext})"
    shape = ctx.shape(p, what)
    dtype, nbytes = _nbytes(ctx, p, shape, what)
    if ctx.get(p, "out_offset", int, what) != out_offset:
        ctx.fail(what, f"out_offset {p['out_offset']} should be {out_offset}")
    enc = ctx.get(p, "encoding", str, what)
    base = dict(tensor=tname, slice=sl, proj=ctx.get(p, "proj", str, what), dtype=dtype, shape=shape,
                nbytes=nbytes, out_offset=out_offset, encoding=enc)
    if enc == "raw":
        data = ctx.region(ctx.get(p, "data", dict, what), what)
        if data.length != nbytes:
            ctx.fail(what, f"raw region at offset {data.offset} holds {data.length} bytes, expected {nbytes}")
        xs = ctx.xxh_list(p["data"], "xxh3", _ceil_div(nbytes, R), what)
        return Part(codec=None, data=data, data_xxh3=xs, **base)
    if enc != "bf16-split":
        ctx.fail(what, f"unknown encoding {enc!r}")
    if dtype != "BF16":
        ctx.fail(what, f"bf16-split encoding on a {dtype} tensor")
    codec = ctx.get(p, "codec", str, what)
    if codec not in CODECS:
        ctx.fail(what, f"unknown codec id {codec!r} (known: {', '.join(sorted(CODECS))})")
    n = nbytes // 2
    nchunks = _ceil_div(n, C)
    raw = ctx.get(p, "exp_chunks", list, what)
    if len(raw) != nchunks:
        ctx.fail(what, f"{len(raw)} exponent chunks for {n} elements, expected {nchunks}")
    chunks = []
    for i, c in enumerate(raw):
        if not (isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in c[:2])):
            ctx.fail(what, f"exponent chunk {i} is not [offset, length, xxh3]")
        r = ctx.region({"offset": c[0], "length": c[1]}, f"{what} chunk {i}")
        if r.length == 0:
            ctx.fail(what, f"exponent chunk {i} at offset {r.offset} is empty")
        chunks.append(ExpChunk(r.offset, r.length, ctx.xxh(c[2], what)))
    sm = ctx.region(ctx.get(p, "sm", dict, what), what + " sm")
    if sm.length != n:
        ctx.fail(what, f"sign+mantissa region at offset {sm.offset} holds {sm.length} bytes, expected {n}")
    return Part(codec=codec, exp_chunks=tuple(chunks), sm=sm,
                sm_xxh3=ctx.xxh_list(p["sm"], "xxh3", nchunks, what), **base)


def _parse_extent(ctx: _Ctx, e, C: int, R: int) -> Extent:
    stack = ctx.key(e, "stack", "experts[]")
    if stack not in STACKS:
        ctx.fail("experts[]", f"unknown stack {stack!r}")
    layer = ctx.get(e, "layer", int, "experts[]")
    expert = ctx.get(e, "expert", int, "experts[]")
    label = f"expert {stack + '.' if stack else ''}layer {layer} expert {expert}"
    region = ctx.region(e, label)
    if region.offset % ALIGNMENT_V1:
        ctx.fail(label, f"extent offset {region.offset} is not a multiple of {ALIGNMENT_V1}")
    exp_length = ctx.get(e, "exp_length", int, label)
    if exp_length > region.length:
        ctx.fail(label, f"exp_length {exp_length} exceeds the extent length {region.length}")
    raw_parts = ctx.get(e, "parts", list, label)
    if not raw_parts:
        ctx.fail(label, "extent has no parts")
    parts, out = [], 0
    for p in raw_parts:
        part = _parse_part(ctx, p, label, C, R, out)
        parts.append(part)
        out = (part.out_offset + part.nbytes + OUT_ALIGN - 1) // OUT_ALIGN * OUT_ALIGN
    exp_lo, exp_hi, body_hi = region.offset, region.offset + exp_length, region.end
    for part in parts:
        for c in part.exp_chunks:
            if not (exp_lo <= c.offset and c.offset + c.length <= exp_hi):
                ctx.fail(label, f"tensor {part.tensor}: exponent chunk at offset {c.offset} lies outside "
                                f"the extent's exponent area [{exp_lo}, {exp_hi})")
        for r in (part.sm, part.data):
            if r is not None and not (exp_hi <= r.offset and r.end <= body_hi):
                ctx.fail(label, f"tensor {part.tensor}: region at offset {r.offset} lies outside "
                                f"the extent's body [{exp_hi}, {body_hi})")
    return Extent(stack, layer, expert, region.offset, exp_length, region.length, tuple(parts))


def check_overlaps(ctx: _Ctx, files, tensors, experts) -> None:
    """No two top-level regions overlap, nor two regions inside one extent (their containment in the
    extent is checked by _parse_extent)."""
    top = [(r, f"file {f.path}") for f in files for r in (f.data, f.header) if r is not None]
    top += [(t.data, f"tensor {t.name}") for t in tensors.values() if t.data is not None]
    top += [(Region(e.offset, e.length), e.label) for e in experts]
    groups = [top]
    for e in experts:
        inner = [(Region(c.offset, c.length), f"tensor {p.tensor} exponent chunk")
                 for p in e.parts for c in p.exp_chunks]
        inner += [(r, f"tensor {p.tensor}") for p in e.parts for r in (p.sm, p.data) if r is not None]
        groups.append(inner)
    for group in groups:
        group = sorted((x for x in group if x[0].length), key=lambda x: x[0].offset)
        for (a, la), (b, lb) in zip(group, group[1:]):
            if b.offset < a.end:
                ctx.fail(lb, f"region at offset {b.offset} overlaps {la} ending at {a.end}")


def parse_index(raw: bytes, *, version: int, data_offset: int, file_length: int, where: str) -> Index:
    """Parse and validate the index bytes of an archive whose preamble was already checked."""
    ctx = _Ctx(where, data_offset, file_length)
    try:
        doc = loads(raw, max_int_digits=MAX_DIGITS, max_depth=MAX_DEPTH)
    except JSONRejected as e:
        raise FormatError(f"{where}: index at offset 64 is not accepted JSON ({e})") from None
    if not isinstance(doc, dict):
        ctx.fail("root", "not a JSON object")
    if doc.get("format") != "zmoe":
        ctx.fail("format", f"expected 'zmoe', got {doc.get('format')!r}")
    if ctx.get(doc, "version", int, "version") != version:
        ctx.fail("version", f"{doc['version']} disagrees with the preamble's {version}")
    if ctx.get(doc, "alignment", int, "alignment") != ALIGNMENT_V1:
        ctx.fail("alignment", f"must be {ALIGNMENT_V1}")
    C = ctx.get(doc, "chunk_elements", int, "chunk_elements")
    R = ctx.get(doc, "raw_chunk_bytes", int, "raw_chunk_bytes")
    if C & (C - 1) or not 1 << 12 <= C <= 1 << 26:
        ctx.fail("chunk_elements", f"{C} is not a power of two in [2^12, 2^26]")
    if R & (R - 1) or not 1 << 12 <= R <= 1 << 28:
        ctx.fail("raw_chunk_bytes", f"{R} is not a power of two in [2^12, 2^28]")

    files = tuple(_parse_file(ctx, f) for f in ctx.get(doc, "files", list, "files"))
    if len({f.path for f in files}) != len(files):
        ctx.fail("files", "duplicate file paths")
    tensors: dict[str, TensorEntry] = {}
    for t in ctx.get(doc, "tensors", list, "tensors"):
        te = _parse_tensor(ctx, t, R)
        if te.name in tensors:
            ctx.fail(f"tensor {te.name}", "duplicate tensor name")
        tensors[te.name] = te
    experts = tuple(_parse_extent(ctx, e, C, R) for e in ctx.get(doc, "experts", list, "experts"))
    by_key = {}
    prev = None
    for e in experts:
        if e.key in by_key:
            ctx.fail(e.label, "duplicate expert extent")
        sort_key = (_STACK_ORDER[e.stack], e.layer, e.expert)
        if prev is not None and sort_key < prev:
            ctx.fail(e.label, "experts are not sorted by (stack, layer, expert)")
        prev = sort_key
        by_key[e.key] = e
    _check_files(ctx, files, tensors)
    _check_parts(ctx, tensors, experts)
    check_overlaps(ctx, files, tensors, experts)
    model = ctx.get(doc, "model", dict, "model")
    for k in ("model_type", "config_file"):
        ctx.get(model, k, str, "model")
    created_by = doc.get("created_by", "")
    if not isinstance(created_by, str):
        ctx.fail("created_by", f"has type {type(created_by).__name__}, expected str")
    return Index(version=version, alignment=ALIGNMENT_V1, chunk_elements=C, raw_chunk_bytes=R,
                 codecs=_parse_codecs(ctx, doc), model=model, created_by=created_by,
                 files=files, tensors=tensors, experts=experts, stats=_parse_stats(ctx, doc), by_key=by_key)


def _check_files(ctx: _Ctx, files, tensors) -> None:
    owner: dict[str, str] = {}
    for f in files:
        if f.kind != "safetensors":
            continue
        total = f.header.length
        for name in f.tensors:
            t = tensors.get(name)
            if t is None or t.file != f.path:
                ctx.fail(f"file {f.path!r}", f"lists tensor {name} which the index does not place in this file")
            if name in owner:
                ctx.fail(f"tensor {name}", f"listed by both {owner[name]!r} and {f.path!r}")
            owner[name] = f.path
            total += t.nbytes
        if total != f.size:
            ctx.fail(f"file {f.path!r}", f"header + tensors make {total} bytes, but size is {f.size}")
    for name in tensors:
        if name not in owner:
            ctx.fail(f"tensor {name}", "is not listed by any safetensors file")


def _check_parts(ctx: _Ctx, tensors, experts) -> None:
    """Every expert tensor is covered exactly once by parts that agree with it and with their extent.

    Counts come from the index (a fused tensor's shape[0] may claim 2^60 experts): they are compared
    with the number of parts actually present, never used to size an allocation."""
    seen: dict[str, list[int | None]] = {}
    for e in experts:
        for p in e.parts:
            t = tensors.get(p.tensor)
            what = f"tensor {p.tensor} ({e.label})"
            if t is None or t.role != "expert":
                ctx.fail(what, "part names no expert tensor of the index")
            if (t.stack, t.layer) != (e.stack, e.layer):
                ctx.fail(what, f"tensor belongs to layer {t.layer}, not to this extent")
            want_shape = t.shape[1:] if t.fused else t.shape
            if p.dtype != t.dtype or p.shape != want_shape or (p.slice is None) == t.fused or p.proj != t.proj:
                ctx.fail(what, "part dtype, shape, slice or proj disagrees with the tensor")
            if t.fused and p.slice != e.expert:
                ctx.fail(what, f"slice {p.slice} sits in the extent of expert {e.expert}")
            n = parse_expert_name(p.tensor)
            if n is not None and ((n.stack, n.layer, n.proj, n.fused) != (t.stack, t.layer, t.proj, t.fused)
                                  or (not n.fused and n.expert != e.expert)):
                ctx.fail(what, f"the name says {n.stack + '.' if n.stack else ''}layer {n.layer} "
                               f"expert {'(fused)' if n.fused else n.expert} proj {n.proj}, which disagrees "
                               f"with its entry or its extent")
            seen.setdefault(p.tensor, []).append(p.slice)
    for name, t in tensors.items():
        if t.role != "expert":
            continue
        got = seen.get(name, [])
        count = t.shape[0] if t.fused else 1
        ok = len(got) == count and sorted(got, key=lambda s: -1 if s is None else s) == (
            list(range(count)) if t.fused else [None])  # len(got) == count: bounded by the index size
        if not ok:
            shown = got if len(got) <= 8 else f"{got[:8]} and {len(got) - 8} more"
            ctx.fail(f"tensor {name}", f"{len(got)} expert parts {shown} do not cover its {count} "
                                       f"expert(s) exactly once")
