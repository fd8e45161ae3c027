"""What an ``ExpertStore`` reports (``ExpertStore.stats``): its counters, the ledger, the cost model's
estimates, the core budget it runs with, disk utilisation and the compression verdict
(specs/runtime.md sections 4 and 13)."""
from __future__ import annotations

from zipmoe_run.cores import compression_verdict
from zipmoe_run.store import hugepages

__all__ = ["store_stats", "verdict"]

#: counters reported as 0 before their first event
COUNTERS = ("hits_full", "hits_comp", "hits_sm", "hits_cold", "bytes_read", "reads", "read_s", "read_busy_s",
            "experts_decoded", "bytes_decoded", "expert_decode_s", "stall_s", "fetch_calls", "requests",
            "hits_prefetch", "prefetch_predicted", "prefetch_correct", "bytes_from_page_cache")


def verdict(store) -> dict | None:
    """``cores.compression_verdict`` for the store's average expert at its cost model's current rates."""
    n = max(1, len(store.infos))
    cold = sum(i.read_cold for i in store.infos.values()) // n
    decoded = sum(i.decoded for i in store.infos.values()) // n
    return compression_verdict(store.cost.read_bps, store.cost.decode_bps, cold, decoded)


def store_stats(store) -> dict:
    with store.cond:
        store.prefetcher.reap()
        store.memory.reap()
        led = store.memory.ledger.snapshot()
        tiers = store.table.counts()
    st = store.counters.snapshot()
    for k in COUNTERS:
        st.setdefault(k, 0)
    cost = store.cost
    st.update(
        budget_bytes=store.budget.nbytes, budget=store.budget.how, min_budget_bytes=store.min_budget,
        io_mode=store.reader.mode, io_throttle_bps=store.reader.throttle_bps, throttle_s=store.reader.throttle_s,
        policy=store.policy.name, page_bytes=store.page,
        huge_page_bytes=(hugepages.report() or {}).get("use"),  # what buffers ask for (0: none; None: undecided)
        store_bytes=led["used"], store_peak_bytes=led["peak"],
        resident_full_bytes=led["full"], resident_comp_bytes=led["comp"], resident_sm_bytes=led["sm"],
        staging_bytes=led["staging"], pool_bytes=led["pool"], draining_bytes=led["draining"],
        fixed_bytes=led["fixed"], resident_experts=tiers,
        read_bps_est=cost.read_bps, decode_bps_est=cost.decode_bps, read_share=cost.read_share,
        expert_bytes=store.expert_bytes, extent_bytes=store.extent_bytes,
        read_depth=store.worker.read_depth, decode_threads=store.decoder.threads,
        compression=store.compression, compression_now=verdict(store),
    )
    # disk utilisation: the rate while reads were in flight against the calibrated disk speed
    st["disk_utilisation"] = (st["bytes_read"] / st["read_busy_s"] / store.read_bps_calibrated
                              if st["read_busy_s"] > 0 else None)
    return st
