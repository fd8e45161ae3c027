"""``TierTable``: which tier every expert is held in, and every move between tiers.

It owns the entries (tier, resident buffers, pins, busy) and applies the policy's answers: it is the
policy's ``ResidencyView`` (``info``, ``tier_of``, ``resident``, ``resident_bytes``, ``reserve``,
``capacity``, ``now``), it *claims* an expert for a fetch or prefetch (its resident bytes become the
task's read buffer), *places* a served expert in the tier the policy picks, *reverts* an unfinished
task and *demotes* the policy's victims (FULL -> SM by splitting the decoded bytes, no I/O). Every
byte moves through ``Memory`` (specs/runtime.md sections 2 and 4). All methods run under the store lock.
"""
from __future__ import annotations

import logging

import numpy as np

from formats.planes import split_bf16
from zipmoe_run.tiers import DEMOTIONS, ExpertInfo, Tier

from .memory import Memory
from .state import CAT, Entry, Stats, StoreError, Task

__all__ = ["TierTable"]

log = logging.getLogger(__name__)


class TierTable:
    def __init__(self, extents: dict, infos: dict, memory: Memory, policy, stats: Stats, reserve: int,
                 scratch_elements: int):
        self.extents, self.infos = extents, infos
        self.memory = memory
        self.policy = policy
        self.stats = stats
        self._reserve = reserve
        self.entries: dict[tuple, Entry] = {}
        self.now = 0  # fetch calls so far (the policy's clock)
        self._scratch = np.empty(max(1, scratch_elements), dtype=np.uint8)  # FULL -> SM split

    # -- the policy's view ----------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        return self.memory.capacity

    @property
    def reserve(self) -> int:
        return self._reserve

    @property
    def resident_bytes(self) -> int:
        return self.memory.ledger.resident

    def info(self, key) -> ExpertInfo:
        return self.infos[key]

    def tier_of(self, key) -> Tier:
        e = self.entries.get(key)
        return e.tier if e is not None else Tier.COLD

    def resident(self):
        for k, e in self.entries.items():
            if e.tier != Tier.COLD and not e.pins and not e.busy:
                yield k, e.tier

    def counts(self) -> dict:
        out: dict = {}
        for e in self.entries.values():
            if e.tier != Tier.COLD:
                out[e.tier.label] = out.get(e.tier.label, 0) + 1
        return out

    # -- claiming experts for tasks ---------------------------------------------------------------------
    def claim(self, key) -> Task | None:
        """A fetch asks for ``key``: pin it and return None when it is FULL, else a task that starts
        from its tier (its resident extent bytes become the task's read buffer)."""
        ent = self.entries.get(key)
        t = ent.tier if ent is not None else Tier.COLD
        if t == Tier.FULL:
            ent.pins += 1
            return None
        task = Task(key, self.extents[key], self.infos[key], t)
        if ent is None:
            ent = self.entries[key] = Entry()
        elif t in (Tier.COMP, Tier.SM):
            task.rbuf, ent.rbuf = ent.rbuf, None
            self.memory.ledger.move(CAT[t], "staging", task.rbuf.charged)
            ent.tier = Tier.COLD
        ent.busy = True
        return task

    def claim_cold(self, key) -> Task | None:
        """A prefetch names ``key``: a task when it is COLD and no task owns it, else None."""
        ent = self.entries.get(key)
        if ent is not None and (ent.tier != Tier.COLD or ent.busy):
            return None
        return self.claim(key)

    def hold(self, key) -> bool:
        """Pin a resident, unowned expert (a prefetch named it); False when there is nothing to pin."""
        ent = self.entries.get(key)
        if ent is None or ent.tier == Tier.COLD or ent.busy:
            return False
        ent.pins += 1
        return True

    def unpin(self, key) -> None:
        ent = self.entries.get(key)
        if ent is not None and ent.pins:
            ent.pins -= 1

    def forget(self, key) -> None:
        """A claimed task that never got buffers is dropped: the expert stays COLD, unowned."""
        ent = self.entries.get(key)
        if ent is not None:
            ent.busy = False

    # -- moves ----------------------------------------------------------------------------------------
    def place(self, task: Task, tier: Tier | None = None) -> Tier:
        """The model is done with ``task``'s expert: keep it in the tier the policy picks (or ``tier``)."""
        key, info, mem = task.key, task.info, self.memory
        ent = self.entries.setdefault(key, Entry())
        ent.busy = False
        if tier is None:
            tier = self.policy.placement(key, self)
        if tier not in info.tiers:
            tier = max(t for t in info.tiers if t <= tier)
        if tier == Tier.FULL:
            ent.dbuf, ent.weights = task.dbuf, task.weights
            mem.ledger.move("staging", "full", task.dbuf.charged)
            mem.release(task.rbuf, "staging")
        elif tier in (Tier.COMP, Tier.SM):
            self._shape(task.rbuf, task.ext, tier, "staging")
            ent.rbuf = task.rbuf
            mem.ledger.move("staging", CAT[tier], task.rbuf.charged)
            task.weights = None
            mem.release(task.dbuf, "staging")
        else:
            task.weights = None
            mem.release(task.rbuf, "staging")
            mem.release(task.dbuf, "staging")
        ent.tier = tier
        task.rbuf = task.dbuf = task.weights = None
        task.state = "placed"
        self.stats.add(f"placed_{tier.label}")
        return tier

    def revert(self, task: Task) -> None:
        """Undo an unfinished task: give staging back, restore what was resident before it started."""
        ent = self.entries.get(task.key)
        mem = self.memory
        task.weights = None
        mem.release(task.dbuf, "staging")
        task.dbuf = None
        restored = Tier.COLD
        if task.rbuf is not None and task.start in (Tier.COMP, Tier.SM):
            restored = task.start
            self._shape(task.rbuf, task.ext, restored, "staging")
            mem.ledger.move("staging", CAT[restored], task.rbuf.charged)
            ent.rbuf = task.rbuf
        else:
            mem.release(task.rbuf, "staging")
        task.rbuf = None
        if ent is not None:
            ent.tier = restored
            ent.busy = False
        task.state = "placed"

    def evict_one(self, pinned) -> bool:
        """Demote the policy's victim (never one in ``pinned``, nor one an open fetch has pinned or a task
        owns: a policy's view of residency may lag the table's); False when nothing can move."""
        skip = set(pinned)
        while True:
            v = self.policy.victim(self, skip)
            if v is None:
                return False
            ent = self.entries.get(v[0])
            if ent is None or not (ent.pins or ent.busy):
                self.demote(*v)
                return True
            if v[0] in skip:  # a policy that ignores what it is told to spare: nothing safe to move
                log.warning("policy %s offered %s, which is in use, twice; not evicting", self.policy.name, v[0])
                return False
            skip.add(v[0])

    def demote(self, key, to: Tier) -> None:
        ent = self.entries[key]
        frm = ent.tier
        if to not in DEMOTIONS[frm]:
            raise StoreError(f"policy {self.policy.name} asked for an impossible move {frm.name} -> {to.name}")
        info, ext, mem = self.infos[key], self.extents[key], self.memory
        if to not in info.tiers:
            to = Tier.COLD
        if frm == Tier.FULL:
            if to == Tier.SM:
                sbuf = self._sm_from_decoded(ext, info, ent.dbuf)
                if sbuf is None:
                    to = Tier.COLD
                else:
                    ent.rbuf = sbuf
            ent.weights = None
            mem.release(ent.dbuf, "full")
            ent.dbuf = None
        elif to == Tier.SM:  # COMP -> SM
            self._shape(ent.rbuf, ext, Tier.SM, "comp")
            mem.ledger.move("comp", "sm", ent.rbuf.charged)
        else:
            mem.release(ent.rbuf, CAT[frm])
            ent.rbuf = None
        ent.tier = to
        self.stats.add(f"demote_{frm.label}_{to.label}")
        mem.cond.notify_all()

    def _shape(self, buf, ext, tier: Tier, cat: str) -> None:
        """Trim an extent-shaped buffer to ``tier``: COMP keeps [0, length), SM drops the exponent pages."""
        head = self.memory.floor(ext.exp_length) if tier == Tier.SM else 0
        self.memory.trim(buf, head, ext.length, cat)

    def _sm_from_decoded(self, ext, info: ExpertInfo, dbuf):
        """Build the SM-tier buffer (the extent less its exponent pages) from a decoded expert, no I/O."""
        b = self.memory.bounded(info.comp_bytes, self.memory.floor(ext.exp_length), ext.length, "sm")
        if b is None:
            return None
        src, scratch = dbuf.arr, self._scratch
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

    def clear(self) -> None:
        """Close: drop every resident buffer (the store's I/O has stopped)."""
        for ent in self.entries.values():
            ent.weights = None
            for b in (ent.dbuf, ent.rbuf):
                if b is not None:
                    b.close()
            ent.dbuf = ent.rbuf = None
            ent.tier = Tier.COLD
