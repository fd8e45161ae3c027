"""The one knob: parsing, percentages, auto, the minimum, and the policy module staying torch-free."""
from __future__ import annotations

import subprocess
import sys

import pytest

from zipmoe_run.store.budget import BudgetError, Ledger, available_memory, parse_budget, parse_bytes
from zipmoe_run.tiers import CostModel, ExpertInfo, Tier, info_from_extent

GIB = 1 << 30


@pytest.mark.parametrize("text,want", [
    ("3GiB", 3 * GIB), ("3G", 3 * GIB), ("3 gib", 3 * GIB), ("500MB", 500 * 10**6), ("500MiB", 500 << 20),
    ("1.5GiB", int(1.5 * GIB)), ("4096", 4096), ("2T", 2 << 40), ("64k", 64 << 10), ("10kb", 10_000),
])
def test_parse_bytes(text, want):
    assert parse_bytes(text) == want
    assert parse_budget(text, expert_bytes=1).nbytes == want


@pytest.mark.parametrize("bad", ["", "lots", "3XB", "-1G", "1e9", "GiB", "3 GiB extra"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(BudgetError):
        parse_bytes(bad)


def test_percent_and_unlimited():
    b = parse_budget("30%", expert_bytes=1000 * GIB)
    assert b.nbytes == 300 * GIB and "30% of" in b.how and "routed-expert" in b.how
    assert parse_budget("12.5%", expert_bytes=800).nbytes == 100
    for spec in (None, "none", "unlimited"):
        assert parse_budget(spec, expert_bytes=1).unlimited
    assert parse_budget(123, expert_bytes=1).nbytes == 123
    for bad in ("0%", "-5%", 0, -3):
        with pytest.raises(BudgetError):
            parse_budget(bad, expert_bytes=1000)
    with pytest.raises(BudgetError):
        parse_budget(True, expert_bytes=1)


def test_auto_says_what_it_picked():
    b = parse_budget("auto", expert_bytes=10 * GIB, need_all=12 * GIB, dense_bytes=GIB, available=8 * GIB)
    want = int((8 * GIB - GIB - (512 << 20)) * 0.8)
    assert b.nbytes == want and b.spec == "auto" and "available" in b.how and "dense" in b.how
    fits = parse_budget("auto", expert_bytes=GIB, need_all=2 * GIB, dense_bytes=0, available=64 * GIB)
    assert fits.nbytes == 2 * GIB and "every expert" in fits.how
    assert available_memory() > 0


def test_ledger_categories_and_peak():
    led = Ledger(1000)
    led.charge("fixed", 100)
    led.charge("staging", 500)
    led.move("staging", "full", 300)
    assert led.used == 600 and led.resident == 300 and led.free == 400 and led.fits(400) and not led.fits(401)
    led.charge("staging", -200)
    assert led.peak == 600 and led.used == 400
    assert Ledger(None).fits(1 << 60) and Ledger(None).free == float("inf")


class _Ext:
    def __init__(self, length, exp_length, decoded):
        self.key, self.length, self.exp_length, self.decoded_nbytes = (None, 0, 0), length, exp_length, decoded


def test_tier_bytes_and_offered_tiers():
    i = info_from_extent(_Ext(length=11_534_000, exp_length=2_900_000, decoded=17_301_504))
    assert i.full_bytes == 17_301_504 and i.comp_bytes == 11_534_336
    assert i.sm_bytes == 11_534_336 - 2_899_968 and i.read_sm == 2_899_968 + 4096
    assert i.tiers == (Tier.COLD, Tier.SM, Tier.COMP, Tier.FULL)
    assert i.staging(Tier.COLD) == i.comp_bytes + i.full_bytes == i.min_working_set
    assert i.staging(Tier.SM) == i.comp_bytes - i.sm_bytes + i.full_bytes
    raw = info_from_extent(_Ext(length=17_301_504, exp_length=0, decoded=17_301_504))
    assert raw.tiers == (Tier.COLD, Tier.FULL)  # --raw: only decoded or nothing is worth anything


def test_cost_model_follows_the_bottleneck():
    i = ExpertInfo((None, 0, 0), full_bytes=2000, comp_bytes=1333, sm_bytes=1000, read_cold=1333, read_sm=333,
                   decoded=2000, tiers=(Tier.COLD, Tier.SM, Tier.COMP, Tier.FULL))
    read_bound = CostModel(read_bps=1.0, decode_bps=1e9, read_share=1.0)
    assert read_bound.saving(i, Tier.SM) == pytest.approx(1000)
    assert read_bound.saving(i, Tier.COMP) == read_bound.saving(i, Tier.FULL)
    decode_bound = CostModel(read_bps=1e9, decode_bps=1.0, read_share=0.0)
    assert decode_bound.saving(i, Tier.SM) == decode_bound.saving(i, Tier.COMP) == 0
    assert decode_bound.saving(i, Tier.FULL) == pytest.approx(2000)


def test_policy_and_scheduler_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import zipmoe_run.policies, zipmoe_run.store.scheduler, zipmoe_run.tiers, "
            "zipmoe_run.store.budget\n"
            "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None and m == 'torch']\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
