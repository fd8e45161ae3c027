"""The bulk preload: every expert that fits read and decoded into FULL in a few GIL-free calls.

The store's preload runs while the process imports ``torch`` and builds the model, on the same two
cores. Through the ordinary task pipeline (admission, reads in pieces on read threads, chunk batches on
the decoder pool, a completion per task) it took the interpreter lock about twenty times per expert and
each hand-over could wait a scheduler slot or a switch interval behind the importing thread: the demo's
``import torch`` ran 0.5-0.6 s longer beside it, and the preload itself crawled between hand-overs.

Here the calling thread first reserves, under the store lock, a decode buffer for each expert in preload
order until the budget has no room (nothing is evicted), and one read buffer per lane. Then ``lanes``
lanes (the calling thread and ``lanes - 1`` decoder-pool workers) take batches of ``BATCH`` experts in
turn; a batch is one call of ``preload_kernel.run_batch`` (read each extent, verify and decode its
chunks), after which its experts are placed FULL under the lock. So a preload of N experts takes the lock
about 2 N / ``BATCH`` times. A batch whose bytes are mostly in the page cache already (an archive just
packed or run before) is read through it (``ExpertReader.fd_for``): the cached pages are copied from
memory instead of read from the disk again with ``O_DIRECT``, and the pages that were not cached are
dropped after, so the cache ends as it began (stats: ``bytes_from_page_cache``).

``bulk_preload`` returns None where it does not apply (no native xxh3 or libc ``pread``, a chunk codec
the fused kernel lacks, a read throttle, another kind of expert source), and the store uses its task
pipeline. A failing read, a truncated file or a chunk the kernel rejects stops that lane: the expert and
the rest of its batch are left to the task pipeline, which preloads what it can and leaves a failing
expert COLD, where its first fetch reports the failure with the usual one-line error (a corrupt chunk
surfaces on first use, as the store's preload promises).
"""
from __future__ import annotations

import logging
import queue
import threading

import numpy as np

from formats import fused
from formats.xxh3_native import address as xxh3_address
from zipmoe_run.tiers import Tier

from . import preload_kernel
from .buffers import ceil_align
from .bytesource import ArchiveBytes
from .io import drop_pages
from .state import detach

__all__ = ["BATCH", "bulk_preload"]

log = logging.getLogger(__name__)

BATCH = 8  # experts per GIL-free call


def _applies(store, keys: list) -> bool:
    src = store.source
    return (isinstance(src, ArchiveBytes) and src.reader.throttle is None and fused.available(True)
            and preload_kernel.libc() is not None
            and all(p.encoding == "raw" or p.codec == fused.CODEC for k in keys for p in store.extents[k].parts))


def _claim(store, keys: list, rbuf_bytes: int, lanes: int) -> tuple[list, list]:
    """Under the store lock: read buffers for the lanes, then a decode buffer per COLD expert in order
    while it fits (the task stays ``admitted`` until placed or reverted)."""
    mem, table = store.memory, store.table
    rbufs, tasks = [], []
    with store.cond:
        for _ in range(lanes):
            if not mem.fits(mem.ceil(rbuf_bytes)):
                break
            rbufs.append(mem.alloc(rbuf_bytes))
        if not rbufs:
            return [], []
        for key in keys:
            need = table.info(key).full_bytes
            task = table.claim_cold(key)
            if task is None:
                continue
            task.dbuf = mem.reuse(need)
            if task.dbuf is None:
                if not mem.fits(need):
                    table.forget(key)
                    break
                task.dbuf = mem.alloc(need)
            task.state = "admitted"
            tasks.append(task)
    return rbufs, tasks


def _describe(store, batch: list, rbuf):
    """The kernel's arrays for ``batch`` read one by one into ``rbuf``; None if any chunk is not fusable."""
    k = len(batch)
    offs, lens, want = (np.empty(k, np.int64) for _ in range(3))
    outs, out_lens = np.empty(k, np.int64), np.empty(k, np.int64)
    first = np.zeros(k + 1, np.int64)
    descs, sums, keep, nmax = [], [], [], 1
    for j, task in enumerate(batch):
        ext = task.ext
        lo = ext.offset

        def view(offset, length, lo=lo, ext=ext):
            a = offset - lo
            if a < 0 or a + length > min(ext.length, rbuf.nbytes):
                raise ValueError(f"{ext.label}: region [{offset}, {offset + length}) outside its extent")
            return rbuf.arr[a:a + length]
        out = task.dbuf.arr[:ext.decoded_nbytes]
        plan = fused.describe(store.source.archive.extent_refs(ext, view=view), out, True)
        if plan is None:
            return None
        descs.append(plan[0])
        sums.append(plan[1])
        keep.append((plan[2], out))  # the kernel writes through addresses: these keep the memory mapped
        nmax = max(nmax, plan[3])
        offs[j], want[j], lens[j] = ext.offset, ext.length, ceil_align(ext.length)
        outs[j], out_lens[j] = out.ctypes.data, out.shape[0]
        first[j + 1] = first[j] + plan[0].shape[0]
    return offs, lens, want, outs, out_lens, first, np.concatenate(descs), np.concatenate(sums), keep, nmax


def _fail(store, stop: threading.Event, exc: BaseException, locked: bool = False) -> None:
    """The preload fails with ``exc`` (raised by ``store.preload``); every lane stops after its batch.
    ``locked``: the caller holds the store lock (it is not re-entrant)."""
    stop.set()
    if not locked:
        with store.cond:
            _fail(store, stop, exc, locked=True)
    elif store.prefetcher.preload_error is None:
        store.prefetcher.preload_error = exc


def _lane(store, batches: queue.Queue, rbuf, results: list, stop: threading.Event) -> None:
    """Take batches until none is left, one fails or ``stop``; place each batch's decoded experts FULL."""
    try:
        _lane_loop(store, batches, rbuf, results, stop)
    except BaseException as exc:  # noqa: BLE001 - fails the preload with it
        _fail(store, stop, detach(exc))


def _lane_loop(store, batches, rbuf, results, stop) -> None:
    xxh3 = xxh3_address()
    scratch = None
    while not store._closed and not stop.is_set():
        try:
            batch = batches.get_nowait()
        except queue.Empty:
            return
        arrays = _describe(store, batch, rbuf)
        if arrays is None:
            results.append((batch, 0, "a chunk the fused decoder does not take"))
            return
        offs, lens, want, outs, out_lens, first, desc, sums, _keep, nmax = arrays
        if scratch is None or scratch.shape[0] < nmax:
            scratch = np.empty(nmax, np.uint8)
        lo, hi = int(offs.min()), int((offs + lens).max())
        fd, drop, cached = store.reader.fd_for(lo, hi - lo)  # mostly in the page cache already: read there
        done, fail, detail, nread = preload_kernel.run_batch(fd, xxh3, offs, lens, want, rbuf.arr, outs, out_lens,
                                                            first, desc, sums, scratch)
        for off, n in drop if nread else ():
            drop_pages(fd, off, n)
        if cached:
            store.counters.add("bytes_from_page_cache", nread)
        reads = done + (fail != preload_kernel.FAIL_NONE)  # no read time: the kernel interleaves reads and decodes
        store.reader.count(nbytes=nread, reads=reads)
        store.counters.add("bytes_read", nread)
        store.counters.add("reads", reads)
        with store.cond:
            if store._closed:  # close() has taken the table and the buffers down
                return
            for i, task in enumerate(batch[:done]):
                try:  # as ExpertStore._on_decoded: a failure to keep one fails the preload with its error
                    task.weights = store.wrap(task.ext, task.dbuf.lend(task.ext.decoded_nbytes))
                except BaseException as exc:
                    task.weights = None
                    results.append((batch[i:], i, None))
                    _fail(store, stop, detach(exc), locked=True)  # no frame keeps the lent view alive
                    return
                store.table.place(task, Tier.FULL)
                store.counters.add("preloaded")
                store.counters.add("experts_decoded")
                store.counters.add("bytes_decoded", task.ext.decoded_nbytes)
        if fail != preload_kernel.FAIL_NONE:
            what = {preload_kernel.FAIL_READ: f"read error (errno {detail})",
                    preload_kernel.FAIL_SHORT: f"the file ends after {detail} of its bytes",
                    preload_kernel.FAIL_DECODE: f"chunk {detail} rejected"}[fail]
            results.append((batch[done:], done, what))
            return
        results.append((batch, done, None))


def bulk_preload(store, keys: list, lanes: int) -> int | None:
    """Preload ``keys`` (in order) as the module docstring says; the number placed FULL, or None where
    the bulk path does not apply (the task pipeline then preloads them all)."""
    if not keys or not _applies(store, keys):
        return None
    lanes = max(1, int(lanes))
    rbufs, tasks = _claim(store, keys, max(ceil_align(store.extents[k].length) for k in keys), lanes)
    if not tasks:
        with store.cond:
            for b in rbufs:
                store.memory.release(b, "staging")
        return 0
    batches: queue.Queue = queue.Queue()
    for i in range(0, len(tasks), BATCH):
        batches.put(tasks[i:i + BATCH])
    results: list = []
    stop = threading.Event()
    futs = [store.decoder.call(_lane, store, batches, rb, results, stop) for rb in rbufs[1:]]
    _lane(store, batches, rbufs[0], results, stop)
    for f in futs:
        f.exception()  # waits; a lane records its own failure (_fail)
    placed = 0
    with store.cond:
        left = [t for t in tasks if t.state != "placed"]
        if not store._closed:
            for task in left:
                store.table.revert(task)
            for b in rbufs:
                store.memory.release(b, "staging")
        store.cond.notify_all()
    for batch, done, why in results:
        placed += done
        if why is not None and batch:
            log.warning("preload stopped at %s: %s; it is read on first use", batch[0].ext.label, why)
    log.debug("bulk preload: %d experts in %d lane(s), %d left for first use", placed, len(rbufs), len(left))
    return placed
