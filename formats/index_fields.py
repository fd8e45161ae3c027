"""Field-level checks of the index (specs/zmoe.md section 3): typed access that names the entry,
integer bounds, file paths, and the informative `codecs` and `stats` objects.

`formats.index_parse` builds the entries with these; every failure is one FormatError line.
"""
from __future__ import annotations

from formats.errors import FormatError
from formats.index import Region

U64_LIMIT = 1 << 64  # every integer of the index is below this (specs/zmoe.md section 3)
MAX_RANK = 8
MAX_PATH_BYTES = 4096


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Ctx:
    """Field access with type checks; every failure names the entry being parsed."""

    def __init__(self, where: str, data_offset: int, file_length: int):
        self.where, self.data_offset, self.file_length = where, data_offset, file_length

    def fail(self, what: str, msg: str):
        raise FormatError(f"{self.where}: index {what}: {msg}")

    def get(self, obj, key, typ, what):
        if not isinstance(obj, dict) or key not in obj:
            self.fail(what, f"missing field {key!r}")
        v = obj[key]
        ok = (isinstance(v, int) and not isinstance(v, bool)) if typ is int else isinstance(v, typ)
        if not ok:
            self.fail(what, f"field {key!r} has type {type(v).__name__}, expected {getattr(typ, '__name__', typ)}")
        if typ is int and not 0 <= v < U64_LIMIT:
            self.fail(what, f"field {key!r} is {'negative' if v < 0 else 'above 2^64 - 1'} ({v})")
        return v

    def key(self, obj, key, what):
        """A field that must be present, of any type (checked by the caller)."""
        if not isinstance(obj, dict) or key not in obj:
            self.fail(what, f"missing field {key!r}")
        return obj[key]

    def hexval(self, v, width, what) -> str:
        if not isinstance(v, str) or len(v) != width or any(c not in "0123456789abcdef" for c in v):
            self.fail(what, f"bad hash {v!r} (expected {width} lowercase hex digits)")
        return v

    def xxh(self, v, what) -> int:
        return int(self.hexval(v, 16, what), 16)

    def region(self, obj, what) -> Region:
        off = self.get(obj, "offset", int, what)
        n = self.get(obj, "length", int, what)
        if off < self.data_offset or off + n > self.file_length:
            self.fail(what, f"region [{off}, {off + n}) lies outside the data section "
                            f"[{self.data_offset}, {self.file_length})")
        return Region(off, n)

    def xxh_list(self, obj, key, count, what) -> tuple[int, ...]:
        lst = self.get(obj, key, list, what)
        if len(lst) != count:  # count is derived from a region already bounded by the file size
            self.fail(what, f"{key} has {len(lst)} checksums, expected {count}")
        return tuple(self.xxh(v, what) for v in lst)

    def shape(self, obj, what) -> tuple[int, ...]:
        shape = self.get(obj, "shape", list, what)
        if len(shape) > MAX_RANK or any(not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < U64_LIMIT
                                        for d in shape):
            self.fail(what, f"bad shape {shape!r}")
        return tuple(shape)


def check_path(ctx: Ctx, path: str, what: str) -> None:
    """A relative POSIX path that stays inside the destination folder (specs/zmoe.md 3.1)."""
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in path.split("/")):
        ctx.fail(what, "path must be relative, without '..' or empty components")
    bad = next((c for c in path if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        ctx.fail(what, f"path contains the control character {bad!r}")
    try:
        n = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        ctx.fail(what, "path is not valid Unicode (a lone surrogate)")
    if n > MAX_PATH_BYTES or (len(path) > 1 and path[1] == ":" and path[0].isascii() and path[0].isalpha()):
        ctx.fail(what, f"path is longer than {MAX_PATH_BYTES} bytes or names a drive")


def parse_codecs(ctx: Ctx, doc) -> dict:
    codecs = ctx.get(doc, "codecs", dict, "codecs")
    for k, v in codecs.items():
        if not isinstance(v, dict):
            ctx.fail(f"codecs {k!r}", f"has type {type(v).__name__}, expected object")
    return codecs


def parse_stats(ctx: Ctx, doc) -> dict:
    """Informative, but typed: what `inspect` computes from it must not fail."""
    stats = doc.get("stats", {})
    if not isinstance(stats, dict):
        ctx.fail("stats", f"has type {type(stats).__name__}, expected object")
    for proj, s in stats.items():
        what = f"stats {proj!r}"
        ctx.get(s, "elements", int, what)
        ctx.get(s, "coded_bytes", int, what)
        hist = ctx.get(s, "exp_histogram", list, what)
        if len(hist) != 256:
            ctx.fail(what, f"exp_histogram has {len(hist)} counts, expected 256")
        for i, c in enumerate(hist):
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < U64_LIMIT:
                ctx.fail(what, f"exp_histogram[{i}] is {c!r}, expected an integer in [0, 2^64)")
    return stats
