"""Read a Hugging Face checkpoint directory without trusting it.

Every safetensors header is parsed strictly (sizes recomputed from dtype and shape, data offsets must
tile the data area exactly); the shard index, when present, must agree with the shards. JSON (config,
shard index, headers) goes through `formats.jsonstrict`. Only regular files are packed (a symlink to
one counts as that file): a FIFO, socket or device anywhere in the folder, a broken symlink, a symlink
loop, a folder that cannot be listed or a file name the archive cannot hold is refused, because the
archive promises a byte-identical restore of every file. Errors are `InputError` with one line naming
the file and tensor.
"""
from __future__ import annotations

import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from formats.dtypes import DTYPE_BITS, tensor_nbytes
from formats.errors import FormatError, InputError
from formats.index_fields import MAX_PATH_BYTES, MAX_RANK, U64_LIMIT, Ctx, check_path
from formats.jsonstrict import JSONRejected, loads
from formats.names import FAMILIES, ExpertName, parse_expert_name

log = logging.getLogger(__name__)

MAX_HEADER = 100 << 20  # the safetensors library's own cap
MAX_JSON = 100 << 20  # config.json and the shard index (DeepSeek-V3's index is 9 MB)
MAX_EXTENTS = 1 << 20  # experts in one archive (DeepSeek-V3 has 58 x 256 = 14,848); bounds the plan's size
SKIP_DIRS = {".git", ".cache", "__pycache__"}


@dataclass
class SrcTensor:
    name: str
    file: str  # relative path of its shard
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute byte offset inside the shard
    role: ExpertName | None = None


@dataclass
class SrcFile:
    path: str  # relative POSIX path inside the checkpoint
    abspath: Path
    size: int
    kind: str  # "blob" | "safetensors"
    header_length: int = 0  # 8 + N for safetensors
    tensors: list[SrcTensor] = field(default_factory=list)  # in data order


@dataclass
class Checkpoint:
    root: Path
    config: dict
    model_type: str
    files: list[SrcFile]
    tensors: dict[str, SrcTensor]
    folders: list[Path] = field(default_factory=list)  # resolved real path of every folder walked

    @property
    def experts(self) -> list[SrcTensor]:
        return [t for t in self.tensors.values() if t.role is not None]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def not_regular(path: Path, st: os.stat_result) -> InputError:
    link = f" (a symlink to {os.readlink(path)})" if os.path.islink(path) else ""
    return InputError(f"{path}: is {_kind(st.st_mode)}{link}, not a regular file; only regular files "
                      f"can be packed (move it out of the folder)")


def open_regular(path: Path, size: int | None = None):
    """Open a regular file for reading without ever blocking (a FIFO swapped in after the scan is
    refused, not waited on); with `size`, refuse a file whose size changed since the scan."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st)
        if size is not None and st.st_size != size:
            raise InputError(f"{path}: changed while packing (size {st.st_size}, was {size} when scanned)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def json_error(path: Path, what: str, e: JSONRejected) -> InputError:
    msg = str(e)
    if msg.startswith("malformed "):
        return InputError(f"{path}: malformed JSON {msg[len('malformed '):]}")
    return InputError(f"{path}: {what} refused as JSON: {msg}")


def _load_json(path: Path, what: str) -> object:
    with open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON:
                raise InputError(f"{path}: {what} has {size} bytes, more than the {MAX_JSON} this packer reads")
            raw = f.read(MAX_JSON + 1)
        except OSError as e:
            raise InputError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return loads(raw)
    except JSONRejected as e:
        raise json_error(path, what, e) from None


def read_safetensors_header(path: Path, rel: str) -> SrcFile:
    """Parse and check one safetensors header; returns its tensors in data order."""
    with open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: only {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or 8 + n > size:
                raise InputError(f"{path}: header length {n} at offset 0 exceeds the file size {size} or the cap")
            raw = f.read(n)
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        doc = loads(raw)
    except JSONRejected as e:
        raise InputError(f"{path}: safetensors header at offset 8 is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    base = 8 + n
    tensors = []
    for name, info in doc.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise InputError(f"{path}: __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            raise InputError(f"{path}: tensor {name}: header entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise InputError(f"{path}: tensor {name}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not (isinstance(offs, list) and len(offs) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)):
            raise InputError(f"{path}: tensor {name}: malformed shape or data_offsets")
        if len(shape) > MAX_RANK:
            raise InputError(f"{path}: tensor {name}: rank {len(shape)} (an archive holds at most {MAX_RANK})")
        if any(isinstance(d, int) and d >= U64_LIMIT for d in shape):
            raise InputError(f"{path}: tensor {name}: a dimension of shape {shape} is 2^64 or more")
        try:
            nbytes = tensor_nbytes(dtype, shape)
        except ValueError as e:
            raise InputError(f"{path}: tensor {name}: {e}") from None
        b, e = offs
        if e < b or e - b != nbytes:
            raise InputError(f"{path}: tensor {name}: data_offsets [{b}, {e}] hold {e - b} bytes but "
                             f"{dtype}{shape} needs {nbytes} (header lies about sizes)")
        tensors.append(SrcTensor(name, rel, dtype, tuple(shape), nbytes, base + b))
    tensors.sort(key=lambda t: (t.offset, t.nbytes))
    pos = base
    for t in tensors:
        if t.offset != pos:
            kind = "overlaps the previous tensor" if t.offset < pos else f"leaves a hole at offset {pos}"
            raise InputError(f"{path}: tensor {t.name} at offset {t.offset} {kind} (header lies about sizes)")
        pos += t.nbytes
    if pos != size:
        raise InputError(f"{path}: tensors end at offset {pos} but the file has {size} bytes "
                         f"(header lies about sizes, or the file is truncated)")
    return SrcFile(rel, path, size, "safetensors", base, tensors)


def path_problem(rel: str) -> str | None:
    """Why an archive cannot hold this relative path (the reader's rules, formats/index_fields.py), or None."""
    bad = next((c for c in rel if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        return f"its name contains the control character {bad!r}"
    if "\\" in rel:
        return "its name contains a backslash"
    try:
        n = len(rel.encode("utf-8"))
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if n > MAX_PATH_BYTES:
        return f"its path is longer than {MAX_PATH_BYTES} bytes"
    if len(rel) > 1 and rel[1] == ":" and rel[0].isascii() and rel[0].isalpha():
        return "its name looks like a drive letter (X:)"
    try:  # the reader's own rule decides (any rule added there is enforced here too)
        check_path(Ctx(rel, 0, 0), rel, "file")
    except FormatError as e:
        return str(e).removeprefix(f"{rel}: index file: ")
    return None


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """Every regular file under root (symlinks followed), refusing anything the archive cannot restore;
    and the real path of every folder walked."""

    def refuse(e: OSError) -> None:
        raise InputError(f"{e.filename}: cannot list folder ({e.strerror})")

    out = []
    seen: dict[tuple[int, int], Path] = {}
    try:
        st = os.stat(root)
        seen[(st.st_dev, st.st_ino)] = root
    except OSError as e:
        refuse(e)
    for dirpath, dirnames, filenames in os.walk(root, onerror=refuse, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for d in dirnames:
            p = Path(dirpath) / d
            try:
                st = os.stat(p)
            except OSError as e:
                refuse(e)
            first = seen.setdefault((st.st_dev, st.st_ino), p)
            if first != p:
                raise InputError(f"{p}: folder reached twice (also as {first}; a symlink loop or a second "
                                 f"link to one folder)")
        for f in sorted(filenames):
            p = Path(dirpath) / f
            try:
                st = os.stat(p)
            except OSError as e:
                kind = "broken symlink" if os.path.islink(p) else "cannot read"
                raise InputError(f"{p}: {kind} ({e.strerror})") from None
            if not stat.S_ISREG(st.st_mode):
                raise not_regular(p, st)
            why = path_problem(p.relative_to(root).as_posix())
            if why:
                raise InputError(f"{str(p)!r}: cannot be stored in an archive: {why}")
            out.append(p)
    return out, [Path(os.path.realpath(p)) for p in seen.values()]


def scan_checkpoint(root: str | os.PathLike) -> Checkpoint:
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such directory")
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (expected a Hugging Face checkpoint folder)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise InputError(f"{root}: directory is not readable")
    cfg_path = root / "config.json"
    if not os.path.lexists(cfg_path):
        raise InputError(f"{root}: no config.json (not a Hugging Face checkpoint folder)")
    config = _load_json(cfg_path, "config")
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path}: config is not a JSON object")
    model_type = config.get("model_type", "")
    if not isinstance(model_type, str):
        raise InputError(f"{cfg_path}: model_type must be a string, not {type(model_type).__name__}")

    paths, folders = _walk(root)
    files: list[SrcFile] = []
    tensors: dict[str, SrcTensor] = {}
    for p in paths:
        rel = p.relative_to(root).as_posix()
        if p.suffix == ".safetensors":
            sf = read_safetensors_header(p, rel)
            for t in sf.tensors:
                if t.name in tensors:
                    raise InputError(f"{p}: tensor {t.name} also appears in {tensors[t.name].file}")
                t.role = _role(p, t)
                tensors[t.name] = t
            files.append(sf)
        else:
            try:
                files.append(SrcFile(rel, p, p.stat().st_size, "blob"))
            except OSError as e:
                raise InputError(f"{p}: cannot read ({e.strerror})") from None
    if not any(f.kind == "safetensors" for f in files):
        raise InputError(f"{root}: no *.safetensors files (only safetensors checkpoints are supported)")

    index_path = root / "model.safetensors.index.json"
    if os.path.lexists(index_path):
        _check_index(root, index_path, tensors, {f.path for f in files if f.kind == "safetensors"})
    if not any(t.role for t in tensors.values()):
        raise InputError(f"{root}: no routed-expert tensors recognised (model_type {model_type!r}); "
                         f"supported families: {', '.join(FAMILIES)}")
    n_extents = 0
    for t in tensors.values():
        if t.role is not None:
            n_extents += t.shape[0] if t.role.fused else 1
    if n_extents > MAX_EXTENTS:
        raise InputError(f"{root}: the expert tensors name {n_extents} experts in all (at most {MAX_EXTENTS})")
    log.info("scanned %s: %d files, %d tensors (%d expert)", root, len(files), len(tensors),
             sum(1 for t in tensors.values() if t.role))
    return Checkpoint(root, config, model_type, files, tensors, folders)


def _role(path: Path, t: SrcTensor) -> ExpertName | None:
    """The tensor's expert role, refusing what the archive's index cannot record or slice."""
    try:
        role = parse_expert_name(t.name)
    except ValueError:  # a layer or expert number of thousands of digits
        raise InputError(f"{path}: tensor {t.name[:120]}...: layer or expert number too long") from None
    if role is None:
        return None
    if role.layer >= U64_LIMIT or (role.expert or 0) >= U64_LIMIT:
        raise InputError(f"{path}: tensor {t.name}: layer or expert number is 2^64 or more")
    if role.fused:
        if len(t.shape) < 2:
            raise InputError(f"{path}: fused expert tensor {t.name} has shape {list(t.shape)}, expected [experts, ...]")
        try:
            tensor_nbytes(t.dtype, t.shape[1:])
        except ValueError as e:
            raise InputError(f"{path}: fused expert tensor {t.name}: one expert's slice {e} "
                             f"(it cannot be cut into experts)") from None
        if t.shape[0] > MAX_EXTENTS:
            raise InputError(f"{path}: fused expert tensor {t.name} claims {t.shape[0]} experts "
                             f"(at most {MAX_EXTENTS})")
    return role


def _check_index(root: Path, index_path: Path, tensors: dict[str, SrcTensor], shards: set[str]) -> None:
    """The shard index must agree with the shards scanned (its names are compared, never opened)."""
    doc = _load_json(index_path, "shard index")
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict):
        raise InputError(f"{index_path}: no weight_map object")
    for name, shard in wm.items():
        if not isinstance(shard, str):
            raise InputError(f"{index_path}: weight_map[{name!r}] is not a file name")
        if shard not in shards:
            raise InputError(f"{index_path}: names shard {shard[:300]!r} for tensor {name[:300]!r}, but that "
                             f"safetensors file is missing from the folder")
        t = tensors.get(name)
        if t is None or t.file != shard:
            raise InputError(f"{root / shard}: tensor {name[:300]!r} is missing from its shard (the index places it there)")
