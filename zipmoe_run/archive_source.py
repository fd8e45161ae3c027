"""`ArchiveSource`: the `WeightSource` of a `.zmoe` archive.

Dense tensors are zero-copy views of a private (copy-on-write) map of the archive, checked against
their checksums on first use; that mapping is the only file-backed memory the runtime keeps. The map
is private rather than read-only so that an in-place write to a weight (a bug, or a user's
experiment) cannot kill the process with SIGSEGV: the written page becomes a private anonymous copy
(charged to the process like any other memory, 4 KiB or the host's page size at a time) and never
reaches the file. Pages that are only read stay shared, clean page cache, as with a read-only map. Routed experts come
from `zipmoe_run.store.ExpertStore`: a memory-budgeted store with four tiers (decoded, compressed,
sign/mantissa only, cold), honest I/O (O_DIRECT or read + DONTNEED) and cache-affinity scheduling
(resident experts first, the missing ones read and decoded as a two-stage flow shop). See
specs/runtime.md.

``memory_budget``: None (unlimited: every expert stays decoded once fetched), bytes (int or
``"3GiB"``), a percentage of the routed-expert bytes (``"30%"``) or ``"auto"``. With a budget, a
yielded weights dict is valid until the caller asks for the next expert; the store then empties it.

``preload``: ``"auto"`` (the default) warms the store up from the moment the archive is open, reading
and decoding experts layer by layer into the decoded tier until the budget is full, when the budget
holds every expert decoded (no budget, or one of at least the experts' decoded bytes: the budget is
meant to hold the model, as in transformers or llama.cpp, which also load everything before the first
token); ``True`` always, ``False`` never (experts load on first use). The preload runs in the
background (a thread of this source) while the caller imports torch, builds the model and loads the
tokenizer; the first ``fetch`` or ``prefetch`` waits for it to end, decoding queued chunks on its own
thread meanwhile (``preload_s`` in ``stats()``: how long it ran). A preload that fails raises its
error there.

Opening an archive does not import torch: the store keeps each decoded expert as its buffer
(``_Decoded``) and the tensors are made on the thread that fetches it, so an archive can be opened,
and its experts decoded, while torch is still being imported (``zipmoe-run`` does that).

``cost``: the store's cost model; by default this host's self-calibration (``zipmoe_run.calibrate``:
measured once per host and file system, cached), reported with the host in ``stats()``
(``calibration``, ``host``).
"""
from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from formats.decoder import ParallelDecoder
from formats.errors import CorruptDataError, FormatError
from formats.fused import hash_many
from formats.jsonstrict import JSONRejected, loads
from formats.preamble import xxh3
from formats.reader import Archive

from .calibrate import stats_fields, store_cost
from .cores import decode_nice
from .store.budget import available_memory, fmt_bytes
from .hostinfo import usable_cores
from .errors import MissingWeightError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PRELOAD_JOIN_S = 60.0  # how long close() waits for a cancelled preload (its thread is a daemon)

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2"}  # source.SAFETENSORS_DTYPES by name: this module does not import torch


def _as_tensor(buf, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int) -> "torch.Tensor":
    import torch

    dt = getattr(torch, _DTYPES.get(dtype, ""), None)
    if not isinstance(dt, torch.dtype):
        raise FormatError(f"runtime cannot use tensors of dtype {dtype}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dt)
    t = torch.frombuffer(buf, dtype=dt, count=nbytes // dt.itemsize, offset=offset)
    return t.view(shape)


def _private_map(archive: Archive) -> tuple[mmap.mmap | None, int]:
    """A copy-on-write map of the span of the archive that holds dense tensors, and the file offset
    where it starts (writes stay in this process; see the module doc). (None, 0) if there are none."""
    spans = [(t.data.offset, t.data.offset + t.data.length) for t in archive.index.tensors.values()
             if t.role == "dense" and t.nbytes]
    if not spans:
        return None, 0
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    base = lo - lo % mmap.ALLOCATIONGRANULARITY
    fd = os.open(archive.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != archive.size:
            raise FormatError(f"{archive.path}: the archive changed while it was being opened")
        return mmap.mmap(fd, hi - base, offset=base, access=mmap.ACCESS_COPY), base
    finally:
        os.close(fd)


class _Decoded:
    """What the store keeps of a decoded expert (its ``wrap``): the extent and the decoded buffer, no
    torch on the store's threads. ``tensors()`` makes the {proj: tensor} views of the buffer once, on the
    thread that fetches the expert."""

    __slots__ = ("ext", "buf", "_tensors")

    def __init__(self, ext, buf):
        self.ext, self.buf, self._tensors = ext, buf, None

    def tensors(self) -> dict[str, "torch.Tensor"]:
        if self._tensors is None:
            self._tensors = {p.proj: _as_tensor(self.buf, p.dtype, p.shape, p.out_offset, p.nbytes)
                             for p in self.ext.parts}
        return self._tensors


class ArchiveSource:
    def __init__(self, path: str | os.PathLike, threads: int | None = None, memory_budget=None, *,
                 policy=None, io_mode: str = "auto", io_throttle_bps: float | None = None, cost=None,
                 preload: bool | str = "auto"):
        from .store.store import ExpertStore

        self.archive = Archive(path)
        try:
            cfg = self.archive.file_bytes(self.archive.index.model.get("config_file", "config.json"))
            if cfg is None:
                raise FormatError(f"{path}: archive carries no config.json")
            try:
                self.config: dict = loads(cfg)
            except JSONRejected as exc:
                raise FormatError(f"{path}: config.json: {exc}") from None
            if not isinstance(self.config, dict):
                raise FormatError(f"{path}: config.json is not a JSON object")
            self.config_name = f"{path}: config.json"  # how errors about config.json name it
            try:
                self._dense_map, self._dense_base = _private_map(self.archive)
            except OSError as exc:
                raise FormatError(f"{path}: cannot map the file ({exc.strerror})") from None
            self.dense_bytes = sum(t.nbytes for t in self.archive.index.tensors.values() if t.role == "dense")
            if cost is None:  # this host's calibration (cached per host; see zipmoe_run.calibrate)
                cost = store_cost(self.archive, threads or usable_cores(), io_mode, io_throttle_bps)
            self.cores = cost.extra.get("cores")  # the core budget (zipmoe_run.cores), None uncalibrated
            self.decoder = ParallelDecoder(self.cores["decode_threads"] if self.cores else threads or usable_cores(),
                                           nice=decode_nice())
            try:
                self.calibration = cost.to_json()  # what the store starts from (stats: its estimates now)
                self.store = ExpertStore(self.archive, self.decoder, budget=memory_budget, policy=policy,
                                         io_mode=io_mode, io_throttle_bps=io_throttle_bps, wrap=_Decoded,
                                         dense_bytes=self.dense_bytes, cost=cost,
                                         read_depth=self.cores["read_depth"] if self.cores else 1)
                self._preload_thread: threading.Thread | None = None
                self._preload_error: BaseException | None = None
                self._checked: set[str] = set()  # dense tensors whose checksums have been verified
                if preload is True or (preload == "auto" and self._holds_all()):
                    self._preload_thread = threading.Thread(target=self._preload, name="zipmoe-preload",
                                                            daemon=True)
                    self._preload_thread.start()
            except BaseException:
                if hasattr(self, "store"):
                    self.store.close()
                self.decoder.close()
                raise
        except BaseException:
            self.archive.close()
            raise
        self._closed = False
        self._stats = {"experts_fetched": 0}

    def _holds_all(self) -> bool:
        """Whether an ``auto`` preload decodes every expert: a budget of at least their decoded bytes, or
        no budget while they fit in the memory available now (beside the dense weights); with no budget
        and a model bigger than memory, experts load on first use (``--memory-budget auto`` plans for it)."""
        cap, need = self.store.capacity, self.store.expert_bytes
        if cap is not None:
            return cap >= need
        room = available_memory() - self.dense_bytes
        if need > room:
            log.warning("no memory budget and the experts (%s decoded) exceed the memory available (%s after "
                        "the dense weights): loading them on first use; --memory-budget auto keeps within it",
                        fmt_bytes(need), fmt_bytes(max(room, 0)))
            return False
        return True

    def _preload(self) -> None:
        """The background preload (the preload thread): the store's load-time warm-up. The cost model
        learns nothing from it: every expert is queued at once (a decode's time there is mostly its wait
        behind the others) and the process imports torch and builds the model beside it, so its rates
        are not this host's; the drift watcher would write them into the calibration cache (a decode
        rate of 7 MB/s was written that way, and the next run warned that compression does not pay)."""
        cost = self.store.cost
        frozen, cost.frozen = cost.frozen, True
        try:
            self._verify_dense()
            n = self.store.preload()
            log.info("preloaded %d of %d experts", n, len(self.store.extents))
        except BaseException as exc:  # raised by the first fetch or prefetch
            self._preload_error = exc
        finally:
            cost.frozen = frozen

    def _verify_dense(self) -> None:
        """On the preload thread: check every dense tensor's checksums in one GIL-free call
        (``formats.fused.hash_many``), so ``dense`` need not hash them (and fault their pages in) on the
        thread that builds the model. A tensor that fails is left to ``dense``, which reports it."""
        if self._dense_map is None:
            return
        pieces, R = [], self.archive.index.raw_chunk_bytes
        for name, t in self.archive.index.tensors.items():
            if t.role == "dense" and t.nbytes:
                off = t.data.offset - self._dense_base
                pieces += [(name, i, off + i * R, min(R, t.data.length - i * R), h) for i, h in enumerate(t.xxh3)]
        buf = np.frombuffer(self._dense_map, np.uint8)
        try:
            got = hash_many(buf, [(p[2], p[3]) for p in pieces])
        finally:
            del buf
        if got is None:
            return
        bad = {p[0] for p, g in zip(pieces, got) if int(g) != p[4]}
        self._checked.update({p[0] for p in pieces} - bad)

    def wait_preload(self) -> None:
        """Block until the background preload has ended (decoding queued chunks on this thread meanwhile);
        raise its error if it failed. Called by the first ``fetch`` or ``prefetch``."""
        t = self._preload_thread
        if t is None:
            return
        while t.is_alive():
            if not self.decoder.help():
                t.join(0.002)
        self._preload_thread = None
        err, self._preload_error = self._preload_error, None
        if err is not None:
            raise err

    @property
    def budget(self):
        return self.store.budget

    # -- dense ----------------------------------------------------------------------------------
    def file_bytes(self, name: str) -> bytes | None:
        return self.archive.file_bytes(name)

    def expert_shapes(self) -> list[tuple[int, int]]:
        return sorted({tuple(p.shape) for e in self.archive.index.experts for p in e.parts
                       if p.dtype == "BF16" and len(p.shape) == 2})

    def has_dense(self, name: str) -> bool:
        t = self.archive.index.tensors.get(name)
        return t is not None and t.role == "dense"

    def dense(self, name: str) -> "torch.Tensor":
        t = self.archive.index.tensors.get(name)
        if t is None or t.role != "dense":
            raise MissingWeightError(f"{self.archive.path}: no dense tensor {name}")
        if self._closed:
            raise FormatError(f"{self.archive.path}: source is closed")
        if not t.nbytes:  # (the index guarantees data.length == nbytes)
            return _as_tensor(None, t.dtype, t.shape, 0, 0)
        off = t.data.offset - self._dense_base
        v = memoryview(self._dense_map)[off:off + t.data.length]  # the bytes handed out are the bytes checked
        if name not in self._checked:
            R = self.archive.index.raw_chunk_bytes
            for i, h in enumerate(t.xxh3):
                if xxh3(v[i * R:(i + 1) * R]) != h:
                    raise CorruptDataError(f"{self.archive.path}: tensor {name} piece {i} at offset "
                                           f"{t.data.offset + i * R} fails its checksum")
            self._checked.add(name)
        v.release()
        return _as_tensor(self._dense_map, t.dtype, t.shape, off, t.nbytes)

    # -- experts --------------------------------------------------------------------------------
    def fetch(self, layer: int, experts: Sequence[int], stack: str | None = None
              ) -> Iterator[tuple[int, dict[str, "torch.Tensor"]]]:
        """Resident experts first, then the missing ones as they are read and decoded (see the store).
        With a budget a yielded dict is emptied when the caller asks for the next expert."""
        if self._preload_thread is not None:
            self.wait_preload()
        persistent = self.store.persistent
        for e, d in self.store.fetch(layer, experts, stack):
            self._stats["experts_fetched"] += 1
            w = d.tensors() if persistent else dict(d.tensors())
            del d  # no local: the frame must not keep the expert alive
            try:
                yield e, w
            finally:  # also when the caller abandons the fetch or raises at this expert
                if not persistent:
                    w.clear()  # the caller's references to this expert's tensors go with it
            del w

    def prefetch(self, layer: int, experts: Sequence[int], stack: str | None = None, *,
                 speculative: bool = True) -> int:
        """Start reading and decoding experts the model will (or may) ask for next (see the store)."""
        if self._preload_thread is not None:
            self.wait_preload()
        return self.store.prefetch(layer, experts, stack, speculative=speculative)

    def stats(self) -> dict:
        st = self.store.stats()
        st.update(self._stats, cache_hits=st.get("hits_full", 0), dense_bytes=self.dense_bytes)
        st.update(stats_fields(self.calibration, self.store.cost))
        return st

    def close(self) -> None:
        """Stop the store and the decoder and release the maps (idempotent). Tensors handed out
        earlier stay valid: they keep their mapped pages alive until they are dropped."""
        try:
            self.store.close()  # cancels a preload still running: its thread ends with it
            t = self._preload_thread
            if t is not None:
                t.join(PRELOAD_JOIN_S)
                if t.is_alive():  # the store's I/O thread is stuck in a read (the store logged it)
                    log.error("%s: the preload thread has not ended after %g s", self.archive.path, PRELOAD_JOIN_S)
                self._preload_thread = None
        finally:
            try:
                self.decoder.close()
            finally:
                self._closed, self._dense_map = True, None  # not mmap.close(): live tensors export it
                self.archive.close()

    def __enter__(self) -> "ArchiveSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
