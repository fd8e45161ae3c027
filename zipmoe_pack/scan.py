"""Read a Hugging Face checkpoint directory without trusting it.

Every safetensors header is parsed strictly (sizes recomputed from dtype and shape, data offsets must
tile the data area exactly); the shard index, when present, must agree with the shards. Errors are
`InputError` with one line naming the file and tensor.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from formats.dtypes import DTYPE_BITS, tensor_nbytes
from formats.errors import InputError
from formats.names import FAMILIES, ExpertName, parse_expert_name

log = logging.getLogger(__name__)

MAX_HEADER = 100 << 20  # the safetensors library's own cap
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

    @property
    def experts(self) -> list[SrcTensor]:
        return [t for t in self.tensors.values() if t.role is not None]


def _load_json(path: Path, what: str) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: {what} is not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_safetensors_header(path: Path, rel: str) -> SrcFile:
    """Parse and check one safetensors header; returns its tensors in data order."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
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
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
        if dtype not in DTYPE_BITS:
            raise InputError(f"{path}: tensor {name}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not (isinstance(offs, list) and len(offs) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)):
            raise InputError(f"{path}: tensor {name}: malformed shape or data_offsets")
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


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        out += [Path(dirpath) / f for f in sorted(filenames)]
    return out


def scan_checkpoint(root: str | os.PathLike) -> Checkpoint:
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such directory")
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (expected a Hugging Face checkpoint folder)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise InputError(f"{root}: directory is not readable")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{root}: no config.json (not a Hugging Face checkpoint folder)")
    config = _load_json(cfg_path, "config")
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path}: config is not a JSON object")
    model_type = str(config.get("model_type", ""))

    paths = _walk(root)
    files: list[SrcFile] = []
    tensors: dict[str, SrcTensor] = {}
    for p in paths:
        rel = p.relative_to(root).as_posix()
        if p.suffix == ".safetensors":
            sf = read_safetensors_header(p, rel)
            for t in sf.tensors:
                if t.name in tensors:
                    raise InputError(f"{p}: tensor {t.name} also appears in {tensors[t.name].file}")
                t.role = parse_expert_name(t.name)
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
    if index_path.is_file():
        _check_index(root, index_path, tensors)
    if not any(t.role for t in tensors.values()):
        raise InputError(f"{root}: no routed-expert tensors recognised (model_type {model_type!r}); "
                         f"supported families: {', '.join(FAMILIES)}")
    for t in tensors.values():
        if t.role is not None and t.role.fused and len(t.shape) < 2:
            raise InputError(f"{root}: fused expert tensor {t.name} has shape {list(t.shape)}, "
                             f"expected [experts, ...]")
    log.info("scanned %s: %d files, %d tensors (%d expert)", root, len(files), len(tensors),
             sum(1 for t in tensors.values() if t.role))
    return Checkpoint(root, config, model_type, files, tensors)


def _check_index(root: Path, index_path: Path, tensors: dict[str, SrcTensor]) -> None:
    doc = _load_json(index_path, "shard index")
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict):
        raise InputError(f"{index_path}: no weight_map object")
    for name, shard in wm.items():
        if not isinstance(shard, str):
            raise InputError(f"{index_path}: weight_map[{name!r}] is not a file name")
        if not (root / shard).is_file():
            raise InputError(f"{index_path}: names shard {shard} for tensor {name}, but {root / shard} is missing")
        t = tensors.get(name)
        if t is None or t.file != shard:
            raise InputError(f"{root / shard}: tensor {name} is missing from its shard (the index places it there)")
