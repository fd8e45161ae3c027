"""Memory management of ``ExpertStore`` (all under the store lock): admission of a task's buffers
(reuse, allocate, give pooled buffers back, evict through the policy, or wait), release and reuse of
buffers, placement of a served expert in its tier, reverting an unfinished task, demotion, and the
FULL -> SM split without I/O. Every byte is charged to the ledger before it is touched
(specs/runtime.md sections 1, 2 and 5.4)."""
from __future__ import annotations

import time

import numpy as np

from formats.planes import split_bf16

from .budget import fmt_bytes
from .io import Buffer, ceil_page, floor_page
from .state import _CAT, StoreError, _Cancelled, _Entry, _Job, _Task
from .tiers import DEMOTIONS, ExpertInfo, Tier

__all__ = ["MemoryMixin"]

_UNLIMITED_POOL = 8  # free buffers kept for reuse when there is no budget


class MemoryMixin:
    """Mixed into ``ExpertStore``; uses its ledger, pool, policy, entries and lock."""

    def _admit(self, job: _Job, task: _Task, wait: bool = True, evict: bool = True) -> bool:
        """Reserve and attach the buffers ``task`` needs, evicting or waiting as required.

        ``wait=False`` (a prefetch): where a fetch would wait, give the buffers back and return False.
        """
        info = task.info
        need_r = info.comp_bytes if task.start == Tier.COLD else 0
        need_d = info.full_bytes
        t0 = time.perf_counter()
        waited = stuck = 0
        while True:
            if job.cancelled or self._closed:
                raise _Cancelled
            self._reap()
            if wait:
                self._reap_spec()
            if need_r and task.rbuf is None:
                task.rbuf = self._take(need_r)
            if task.dbuf is None:
                task.dbuf = self._take(need_d)
            grow = 0
            if task.start == Tier.SM and not task.grown:
                grow = task.rbuf.head  # the dropped exponent pages come back with the read
            missing = (need_r if need_r and task.rbuf is None else 0) + (need_d if task.dbuf is None else 0)
            if missing == 0 and grow == 0:
                break
            if self.ledger.fits(missing + grow):
                if need_r and task.rbuf is None:
                    task.rbuf = self._new(need_r)
                if task.dbuf is None:
                    task.dbuf = self._new(need_d)
                if grow:
                    self.ledger.charge("staging", task.rbuf.set_bounds(0, task.rbuf.tail))
                    task.grown = grow
                continue
            b = self.pool.pop_any()
            if b is not None:
                self.ledger.charge("pool", -b.charged)
                b.close()
                continue
            v = self.policy.victim(self, self._held) if evict else None
            if v is not None:
                self._demote(*v)
                continue
            if wait and self._held:  # a fetch needs the room: what prefetch protected gives way
                self._release_held()
                continue
            if not wait:
                if job.preload:
                    with job.cond:
                        busy = job.inflight > 0
                    if busy:  # what is in flight frees its read buffer when placed
                        self._mem.wait(timeout=0.02)
                        continue
                self._release(task.rbuf, "staging")
                self._release(task.dbuf, "staging")
                task.rbuf = task.dbuf = None
                return False
            # nothing to evict: wait for the consumer to hand buffers back
            waited += 1
            with job.cond:
                blocked = job.waiting and not job.ready and job.inflight == 0
            stuck = stuck + 1 if blocked else 0
            if stuck >= 50:  # ~1 s with the consumer waiting on us and nothing else in flight
                raise StoreError(
                    f"memory budget {fmt_bytes(self.capacity)} exhausted while fetching {task.ext.label}: "
                    f"{fmt_bytes(self.ledger.bytes['draining'])} of expert buffers are still referenced "
                    f"by the caller (keep no expert tensors past the next fetch step)")
            self._mem.wait(timeout=0.02)  # wake on release; the timeout re-checks draining buffers
        if waited:
            with self._stat_lock:
                self._stats["admit_wait_s"] += time.perf_counter() - t0
        return True

    def _new(self, n: int) -> Buffer:
        b = Buffer(n)
        self.ledger.charge("staging", b.charged)
        return b

    def _take(self, n: int) -> Buffer | None:
        """A pooled buffer for ``n`` bytes, whole again, charged to staging (None if none fits)."""
        b = self.pool.take(n)
        if b is None:
            return None
        extra = b.nbytes - b.charged
        if extra and not self.ledger.fits(extra):
            self.pool.put(b)
            return None
        self.ledger.move("pool", "staging", b.charged)
        self.ledger.charge("staging", b.set_bounds(0, b.nbytes))
        return b

    def _release(self, buf: Buffer | None, cat: str) -> None:
        if buf is None:
            return
        if buf.busy():
            self.ledger.move(cat, "draining", buf.charged)
            self.draining.append(buf)
        elif self.capacity is None and len(self.pool) >= _UNLIMITED_POOL:
            self.ledger.charge(cat, -buf.charged)
            buf.close()
        else:
            self.ledger.move(cat, "pool", buf.charged)
            self.pool.put(buf)
        self._mem.notify_all()

    def _reap(self) -> None:
        if not self.draining:
            return
        keep = []
        for b in self.draining:
            if b.busy():
                keep.append(b)
            else:
                self.ledger.move("draining", "pool", b.charged)
                self.pool.put(b)
        self.draining = keep

    def _shape_extent(self, buf: Buffer, ext, tier: Tier, cat: str) -> None:
        """Trim an extent-shaped buffer to ``tier``: COMP keeps [0, length), SM drops the exponent pages."""
        head = floor_page(ext.exp_length) if tier == Tier.SM else 0
        delta = buf.set_bounds(head, ceil_page(ext.length))
        if delta > 0:
            raise AssertionError("trimming an extent buffer cannot grow it")
        self.ledger.charge(cat, delta)

    def _place(self, task: _Task, tier: Tier | None = None) -> None:
        """The model is done with ``task``'s expert: keep it in the tier the policy picks (or ``tier``)."""
        key, info = task.key, task.info
        ent = self._entries.setdefault(key, _Entry())
        ent.busy = False
        if tier is None:
            tier = self.policy.placement(key, self)
        if tier not in info.tiers:
            tier = max(t for t in info.tiers if t <= tier)
        if tier == Tier.FULL:
            ent.dbuf, ent.weights = task.dbuf, task.weights
            self.ledger.move("staging", "full", task.dbuf.charged)
            self._release(task.rbuf, "staging")
        elif tier in (Tier.COMP, Tier.SM):
            self._shape_extent(task.rbuf, task.ext, tier, "staging")
            ent.rbuf = task.rbuf
            self.ledger.move("staging", _CAT[tier], task.rbuf.charged)
            task.weights = None
            self._release(task.dbuf, "staging")
        else:
            task.weights = None
            self._release(task.rbuf, "staging")
            self._release(task.dbuf, "staging")
        ent.tier = tier
        task.rbuf = task.dbuf = task.weights = None
        task.state = "placed"
        self._stats[f"placed_{tier.label}"] += 1

    def _revert(self, task: _Task) -> None:
        """Undo an unfinished task: give staging back, restore what was resident before the fetch."""
        ent = self._entries.get(task.key)
        task.weights = None
        self._release(task.dbuf, "staging")
        task.dbuf = None
        restored = Tier.COLD
        if task.rbuf is not None and task.start in (Tier.COMP, Tier.SM):
            restored = task.start
            self._shape_extent(task.rbuf, task.ext, restored, "staging")
            self.ledger.move("staging", _CAT[restored], task.rbuf.charged)
            ent.rbuf = task.rbuf
        else:
            self._release(task.rbuf, "staging")
        task.rbuf = None
        if ent is not None:
            ent.tier = restored
            ent.busy = False
        task.state = "placed"

    def _demote(self, key, to: Tier) -> None:
        ent = self._entries[key]
        frm = ent.tier
        if to not in DEMOTIONS[frm]:
            raise StoreError(f"policy {self.policy.name} asked for an impossible move {frm.name} -> {to.name}")
        info = self.infos[key]
        if to not in info.tiers:
            to = Tier.COLD
        ext = self.extents[key]
        if frm == Tier.FULL:
            if to == Tier.SM:
                sbuf = self._sm_from_decoded(ext, info, ent.dbuf)
                if sbuf is None:
                    to = Tier.COLD
                else:
                    ent.rbuf = sbuf
            ent.weights = None
            self._release(ent.dbuf, "full")
            ent.dbuf = None
        elif to == Tier.SM:  # COMP -> SM
            self._shape_extent(ent.rbuf, ext, Tier.SM, "comp")
            self.ledger.move("comp", "sm", ent.rbuf.charged)
        else:
            self._release(ent.rbuf, _CAT[frm])
            ent.rbuf = None
        ent.tier = to
        self._stats[f"demote_{frm.label}_{to.label}"] += 1
        self._mem.notify_all()

    def _sm_from_decoded(self, ext, info: ExpertInfo, dbuf: Buffer) -> Buffer | None:
        """Build the SM-tier buffer (the extent less its exponent pages) from a decoded expert, no I/O."""
        head, tail = floor_page(ext.exp_length), ceil_page(ext.length)
        b = self.pool.take(info.comp_bytes)
        if b is not None:
            grow = (tail - head) - b.charged
            if grow > 0 and not self.ledger.fits(grow):
                self.pool.put(b)
                b = None
            else:
                self.ledger.move("pool", "sm", b.charged)
                self.ledger.charge("sm", b.set_bounds(head, tail))
        if b is None:
            if not self.ledger.fits(info.sm_bytes):
                return None
            b = Buffer(info.comp_bytes)
            self.ledger.charge("sm", b.set_bounds(head, tail, drop=False) + b.nbytes)
        src = dbuf.arr
        scratch = self._split_scratch
        C = scratch.shape[0]
        for p in ext.parts:
            if p.encoding == "raw":
                lo = p.data.offset - ext.offset
                b.arr[lo:lo + p.nbytes] = src[p.out_offset:p.out_offset + p.nbytes]
                continue
            n = p.nbytes // 2
            words = src[p.out_offset:p.out_offset + p.nbytes].view(np.uint16)
            sm0 = p.sm.offset - ext.offset
            for lo in range(0, n, C):
                hi = min(n, lo + C)
                split_bf16(words[lo:hi], scratch[:hi - lo], b.arr[sm0 + lo:sm0 + hi])
        return b
