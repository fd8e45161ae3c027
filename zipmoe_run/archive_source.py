"""`ArchiveSource`: the `WeightSource` of a `.zmoe` archive.

Dense tensors are zero-copy views of the mapped archive (their checksums are checked on first use).
Experts are decoded through `formats.decoder.ParallelDecoder` into per-expert buffers, and kept in a
least-recently-used cache bounded by `cache_bytes` (None: keep every decoded expert; 0: keep none).
The memory-budgeted tiered store replaces this cache behind the same interface.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from formats.decoder import ParallelDecoder
from formats.errors import CorruptDataError, FormatError
from formats.preamble import xxh3
from formats.reader import Archive

from .errors import MissingWeightError
from .source import SAFETENSORS_DTYPES

log = logging.getLogger(__name__)


def _as_tensor(buf, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int) -> torch.Tensor:
    dt = SAFETENSORS_DTYPES.get(dtype)
    if dt is None:
        raise FormatError(f"runtime cannot use tensors of dtype {dtype}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dt)
    with warnings.catch_warnings():  # read-only map: the model never writes its weights
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(buf, dtype=dt, count=nbytes // torch.empty((), dtype=dt).element_size(),
                             offset=offset)
    return t.view(shape)


class ArchiveSource:
    def __init__(self, path: str | os.PathLike, threads: int | None = None, cache_bytes: int | None = None):
        self.archive = Archive(path)
        cfg = self.archive.file_bytes(self.archive.index.model.get("config_file", "config.json"))
        if cfg is None:
            raise FormatError(f"{path}: archive carries no config.json")
        self.config: dict = json.loads(cfg)
        self.decoder = ParallelDecoder(threads or os.cpu_count() or 1)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, tuple[np.ndarray, dict[str, torch.Tensor]]] = OrderedDict()
        self._cached = 0
        self._checked: set[str] = set()
        self._lock = threading.Lock()
        self._stats = {"experts_fetched": 0, "experts_decoded": 0, "cache_hits": 0, "bytes_read": 0,
                       "bytes_decoded": 0}

    # -- dense ----------------------------------------------------------------------------------
    def file_bytes(self, name: str) -> bytes | None:
        return self.archive.file_bytes(name)

    def has_dense(self, name: str) -> bool:
        t = self.archive.index.tensors.get(name)
        return t is not None and t.role == "dense"

    def dense(self, name: str) -> torch.Tensor:
        t = self.archive.index.tensors.get(name)
        if t is None or t.role != "dense":
            raise MissingWeightError(f"{self.archive.path}: no dense tensor {name}")
        v = self.archive.region(t.data)
        if name not in self._checked:
            R = self.archive.index.raw_chunk_bytes
            for i, h in enumerate(t.xxh3):
                if xxh3(v[i * R:(i + 1) * R]) != h:
                    raise CorruptDataError(f"{self.archive.path}: tensor {name} piece {i} at offset "
                                           f"{t.data.offset + i * R} fails its checksum")
            self._checked.add(name)
        return _as_tensor(self.archive._map, t.dtype, t.shape, t.data.offset, t.nbytes)

    # -- experts --------------------------------------------------------------------------------
    def _weights(self, extent, buf: np.ndarray) -> dict[str, torch.Tensor]:
        return {p.proj: _as_tensor(buf, p.dtype, p.shape, p.out_offset, p.nbytes) for p in extent.parts}

    def _remember(self, key, buf, weights) -> None:
        if self.cache_bytes == 0:
            return
        with self._lock:
            self._cache[key] = (buf, weights)
            self._cached += buf.nbytes
            while self.cache_bytes is not None and self._cached > self.cache_bytes and len(self._cache) > 1:
                _, (old, _) = self._cache.popitem(last=False)
                self._cached -= old.nbytes

    def fetch(self, layer: int, experts: Sequence[int], stack: str | None = None
              ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Resident experts first; the missing ones are decoded in parallel and yielded in request order."""
        missing = []
        for e in experts:
            key = (stack, layer, e)
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            self._stats["experts_fetched"] += 1
            if hit is not None:
                self._stats["cache_hits"] += 1
                yield e, hit[1]
            else:
                missing.append(e)
        jobs = []
        for e in missing:
            ext = self.archive.extent(layer, e, stack)
            buf = np.empty(ext.decoded_nbytes, dtype=np.uint8)
            jobs.append((e, ext, buf, self.decoder.submit(self.archive.extent_refs(ext), buf)))
        try:
            for e, ext, buf, fut in jobs:
                fut.result()  # raises CorruptDataError naming the tensor: never compute from bad bytes
                self._stats["experts_decoded"] += 1
                self._stats["bytes_read"] += ext.length
                self._stats["bytes_decoded"] += buf.nbytes
                weights = self._weights(ext, buf)
                self._remember((stack, layer, e), buf, weights)
                yield e, weights
        finally:
            for *_, fut in jobs:
                fut.cancel()
                if not fut.cancelled():
                    try:
                        fut.result()
                    except Exception:  # already reported by the loop above, or abandoned
                        pass

    def stats(self) -> dict:
        return dict(self._stats, cached_bytes=self._cached)

    def close(self) -> None:
        self.decoder.close()
        self._cache.clear()
