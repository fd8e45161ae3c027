"""The one weight interface the model code uses, and its plain-checkpoint implementation.

Model code never opens files: it asks a ``WeightSource`` for dense tensors by their checkpoint
name and for routed experts by (layer, expert ids). ``DirectorySource`` serves a Hugging Face
checkpoint directory straight from memory-mapped safetensors shards (zero-copy views);
``zipmoe_run.archive_source.ArchiveSource`` serves a ``.zmoe`` archive the same way.

With a ``memory_budget``, a directory's routed experts come from the same budgeted
``zipmoe_run.store.ExpertStore`` as an archive's, reading each expert's bytes from the shards with
honest I/O (``zipmoe_run.store.dirbytes``; FULL and COLD tiers only, as on a ``--raw`` archive);
dense tensors stay mapped. Without one, every expert is a view of the map (no limit).
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from formats.errors import InputError
from formats.jsonstrict import JSONRejected, loads
from formats.names import parse_expert_name

from .errors import MissingWeightError

__all__ = ["WeightSource", "DirectorySource", "first_present", "SAFETENSORS_DTYPES"]

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@runtime_checkable
class WeightSource(Protocol):
    """What a model needs from storage. Tensors come back in their stored dtype and shape."""

    config: dict  # parsed config.json

    def file_bytes(self, name: str) -> bytes | None:
        """Side files (tokenizer.json, tokenizer_config.json, generation_config.json); None if absent."""

    def dense(self, name: str) -> torch.Tensor:
        """A non-expert tensor by checkpoint name; MissingWeightError if absent."""

    def has_dense(self, name: str) -> bool: ...

    def fetch(
        self, layer: int, experts: Sequence[int], stack: str | None = None
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (expert_id, {proj: weight}) for each requested expert, in any order."""

    def stats(self) -> dict: ...

    def expert_shapes(self) -> list[tuple[int, int]]:
        """Distinct 2-D shapes of the routed experts' BF16 weights, one expert's (a fused tensor's
        without its expert dimension): the same list for an archive and its source directory."""
        ...

    def close(self) -> None: ...


def first_present(source: WeightSource, *names: str) -> str | None:
    """The first of ``names`` the source holds as a dense tensor (checkpoint spellings differ)."""
    for n in names:
        if source.has_dense(n):
            return n
    return None


class _Shard:
    """One safetensors file, memory-mapped copy-on-write so tensors are writable zero-copy views."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                (hlen,) = struct.unpack("<Q", f.read(8))
                if hlen <= 0 or 8 + hlen > size:
                    raise InputError(f"{path}: bad safetensors header length {hlen}")
                header = loads(f.read(hlen))
                if not isinstance(header, dict):
                    raise InputError(f"{path}: safetensors header is not a JSON object")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
        except JSONRejected as exc:
            raise InputError(f"{path}: bad safetensors header ({exc})") from None
        except (OSError, ValueError, struct.error) as exc:
            raise InputError(f"{path}: cannot read safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self.base = 8 + hlen
        self.size = size
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors spelling (BF16, F32, ...)
        for name, e in header.items():
            try:
                dt = SAFETENSORS_DTYPES[e["dtype"]]
                start, end = e["data_offsets"]
                shape = tuple(e["shape"])
                if not all(type(v) is int and v >= 0 for v in (start, end, *shape)):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{path}: tensor {name!r} has an unsupported or malformed header entry") from None
            if self.base + end > size or start > end:
                raise InputError(f"{path}: tensor {name!r} data offsets run past the end of the file")
            if math.prod(shape) * dt.itemsize != end - start:
                raise InputError(f"{path}: tensor {name!r} has shape {list(shape)} of {dt} but "
                                 f"{end - start} bytes")
            self.entries[name] = (dt, shape, self.base + start, end - start)
            self.dtypes[name] = e["dtype"]

    def tensor(self, name: str) -> torch.Tensor:
        dt, shape, off, nbytes = self.entries[name]
        itemsize = torch.empty((), dtype=dt).element_size()
        count = nbytes // itemsize
        if count == 0:
            return torch.empty(shape, dtype=dt)
        t = torch.frombuffer(self._mm, dtype=dt, count=count, offset=off)
        return t.view(shape)

    def close(self) -> None:
        # Views handed out keep the buffer alive; mmap.close() would fail with live exports.
        self._mm = None


class DirectorySource:
    """A Hugging Face checkpoint directory: config.json plus safetensors shard(s).

    Shards are listed by ``model.safetensors.index.json`` when present, else ``model.safetensors``,
    else every ``*.safetensors`` in the directory. Expert tensors are recognised only through
    ``formats.names.parse_expert_name``; fused [E, ...] tensors are sliced per expert (views).

    ``memory_budget`` (bytes, ``"3GiB"``, ``"30%"`` of the routed-expert bytes, ``"auto"``; None: no
    limit) serves experts through an ``ExpertStore`` reading the shards (module doc); ``threads``,
    ``policy``, ``io_mode``, ``io_throttle_bps``, ``cost`` and ``preload`` then mean what they mean
    for ``ArchiveSource``, and are ignored without a budget.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, memory_budget=None, *,
                 policy=None, io_mode: str = "auto", io_throttle_bps: float | None = None, cost=None,
                 preload: bool | str = "auto"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a directory")
        cfg_path = self.path / "config.json"
        self.config_name = str(cfg_path)  # how errors about config.json name it
        try:
            self.config: dict = loads(cfg_path.read_bytes())
        except FileNotFoundError:
            raise InputError(f"{cfg_path}: missing config.json") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{cfg_path}: cannot parse ({exc})") from None
        if not isinstance(self.config, dict):
            raise InputError(f"{cfg_path}: not a JSON object")
        self._shards: dict[str, _Shard] = {}
        self._where: dict[str, _Shard] = {}
        for fname in self._shard_files():
            shard = _Shard(self.path / fname)
            self._shards[fname] = shard
            for name in shard.entries:
                self._where[name] = shard
        # (stack, layer) -> expert -> proj -> name ; (stack, layer) -> proj -> fused name
        self._experts: dict[tuple[str | None, int], dict[int, dict[str, str]]] = {}
        self._fused: dict[tuple[str | None, int], dict[str, str]] = {}
        self._dense: set[str] = set()
        for name in self._where:
            p = parse_expert_name(name)
            if p is None:
                self._dense.add(name)
            elif p.fused:
                self._fused.setdefault((p.stack, p.layer), {})[p.proj] = name
            else:
                self._experts.setdefault((p.stack, p.layer), {}).setdefault(p.expert, {})[p.proj] = name
        self._cache: dict[tuple[str | None, int, int], dict[str, torch.Tensor]] = {}
        self._stats = {"experts_fetched": 0, "bytes_read": 0, "dense_bytes": 0, "fetch_calls": 0}
        self.store = None
        self.budget = None
        if memory_budget is not None:
            try:
                self._open_store(threads, memory_budget, policy=policy, io_mode=io_mode,
                                 io_throttle_bps=io_throttle_bps, cost=cost, preload=preload)
            except BaseException:
                self.close()
                raise
        log.debug("DirectorySource %s: %d tensors in %d shard(s)", self.path, len(self._where), len(self._shards))

    def _open_store(self, threads, memory_budget, *, policy, io_mode, io_throttle_bps, cost, preload) -> None:
        from .store.dirbytes import CopyDecoder, DirectoryBytes, ShardTensor
        from .store.store import ExpertStore

        files = list(self._shards)
        index = {f: i for i, f in enumerate(files)}
        tensors = []
        for name, shard in self._where.items():
            role = parse_expert_name(name)
            if role is None:
                continue
            _, shape, off, nbytes = shard.entries[name]
            if role.fused and (not shape or shape[0] == 0 or nbytes % shape[0]):
                raise InputError(f"{shard.path}: fused expert tensor {name!r} has shape {list(shape)}, "
                                 f"which cannot be cut into experts")
            tensors.append(ShardTensor(name, index[shard.path.name], shard.dtypes[name], shape, nbytes, off, role))
        if not tensors:
            raise InputError(f"{self.path}: no routed-expert tensors recognised; --memory-budget needs some")
        self.dense_bytes = sum(self._where[n].entries[n][3] for n in self._dense)
        source = DirectoryBytes(self.path, [(self._shards[f].path, self._shards[f].size) for f in files], tensors,
                                io_mode, io_throttle_bps)
        try:
            from .cores import decode_nice

            self.decoder = CopyDecoder(threads or os.cpu_count() or 1, nice=decode_nice())
        except BaseException:
            source.close()
            raise
        try:
            if cost is None:  # this host's calibration; reads measured on the largest shard's expert bytes
                from .calibrate import current

                big = max(files, key=lambda f: self._shards[f].size)
                spans = [(t.offset, t.nbytes) for t in tensors if t.shard == index[big]]
                cost = current(self._shards[big].path, spans or None, self.decoder.threads, io_mode,
                               io_throttle_bps)
            self.calibration = cost.to_json()
            self.store = ExpertStore(None, self.decoder, budget=memory_budget, policy=policy, wrap=self._weights,
                                     dense_bytes=self.dense_bytes, cost=cost, source=source,
                                     read_depth=(cost.extra.get("cores") or {}).get("read_depth", 1))
            self.budget = self.store.budget
            self.prefetch = self.store.prefetch  # models announce what comes next (layers.announce)
            if preload is True or (preload == "auto" and self.store.capacity is not None
                                   and self.store.capacity >= self.store.expert_bytes):
                n = self.store.preload()
                log.info("preloaded %d of %d experts", n, len(self.store.extents))
        except BaseException:
            if self.store is not None:
                self.store.close()
            self.store = None
            self.decoder.close()
            raise

    def _weights(self, extent, buf) -> dict[str, torch.Tensor]:
        """The store's ``wrap``: an expert's decoded bytes as {proj: tensor} views (stored dtype and shape)."""
        out = {}
        for p in extent.parts:
            dt = SAFETENSORS_DTYPES[p.dtype]
            count = p.nbytes // dt.itemsize
            out[p.proj] = (torch.frombuffer(buf, dtype=dt, count=count, offset=p.out_offset).view(p.shape)
                           if count else torch.empty(p.shape, dtype=dt))
        return out

    def _shard_files(self) -> list[str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = loads(index.read_bytes())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise InputError(f"{index}: cannot parse weight_map ({exc})") from None
            if not all(isinstance(f, str) and f and "/" not in f and "\\" not in f and not f.startswith(".")
                       for f in files):
                raise InputError(f"{index}: weight_map names a file outside the checkpoint folder")
            for f in files:
                if not (self.path / f).is_file():
                    raise InputError(f"{self.path / f}: shard listed in the index is missing")
            return files
        if (self.path / "model.safetensors").is_file():
            return ["model.safetensors"]
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise InputError(f"{self.path}: no safetensors weights found")
        return files

    # -- WeightSource ------------------------------------------------------------------------

    def file_bytes(self, name: str) -> bytes | None:
        if "/" in name or "\\" in name or name.startswith("."):
            return None
        p = self.path / name
        return p.read_bytes() if p.is_file() else None

    def expert_shapes(self) -> list[tuple[int, int]]:
        out = set()
        for name, shard in self._where.items():
            role = parse_expert_name(name)
            shape = tuple(shard.entries[name][1])
            if role is None or shard.dtypes[name] != "BF16":
                continue
            shape = shape[1:] if role.fused else shape
            if len(shape) == 2:
                out.add(shape)
        return sorted(out)

    def has_dense(self, name: str) -> bool:
        return name in self._dense

    def dense(self, name: str) -> torch.Tensor:
        if name not in self._dense:
            raise MissingWeightError(f"{self.path}: checkpoint has no dense tensor {name!r}")
        t = self._where[name].tensor(name)
        self._stats["dense_bytes"] += t.numel() * t.element_size()
        return t

    def fetch(
        self, layer: int, experts: Sequence[int], stack: str | None = None
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        if self.store is not None:
            for e, w in self.store.fetch(layer, experts, stack):
                self._stats["experts_fetched"] += 1
                yield e, w
            return
        self._stats["fetch_calls"] += 1
        for e in experts:
            e = int(e)
            key = (stack, layer, e)
            w = self._cache.get(key)
            if w is None:
                w = self._load_expert(stack, layer, e)
                self._cache[key] = w
            self._stats["experts_fetched"] += 1
            self._stats["bytes_read"] += sum(t.numel() * t.element_size() for t in w.values())
            yield e, w

    def _load_expert(self, stack: str | None, layer: int, e: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        names = self._experts.get((stack, layer), {}).get(e)
        if names:
            for proj, name in names.items():
                out[proj] = self._where[name].tensor(name)
        for proj, name in self._fused.get((stack, layer), {}).items():
            t = self._where[name].tensor(name)
            if e >= t.shape[0]:
                raise MissingWeightError(f"{self.path}: fused tensor {name!r} has no expert {e}")
            out[proj] = t[e]
        if not out:
            where = f"{stack} " if stack else ""
            raise MissingWeightError(f"{self.path}: checkpoint has no weights for {where}layer {layer} expert {e}")
        return out

    def stats(self) -> dict:
        if self.store is None:
            return dict(self._stats)
        st = self.store.stats()
        st.update(experts_fetched=self._stats["experts_fetched"], cache_hits=st.get("hits_full", 0),
                  dense_bytes=self.dense_bytes)
        from .calibrate import stats_fields

        st.update(stats_fields(self.calibration, self.store.cost))
        return st

    def close(self) -> None:
        if self.store is not None:
            try:
                self.store.close()
            finally:
                self.decoder.close()
                self.store = None
        self._cache.clear()
        for s in self._shards.values():
            s.close()

    def __enter__(self) -> "DirectorySource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
