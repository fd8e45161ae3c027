"""The offline simulator (benchmark side; the runtime never imports it): routing traces replayed
through cache policies without weights, in the delay model of :mod:`zipmoe_run.tiers`.

* :mod:`.trace`           -- trace files -> a token-level access sequence (dense layers left out);
* :mod:`.kernels`         -- numba: the replay policies' state and per-layer step;
* :mod:`.replay_kernels`  -- numba: the whole replay, the makespan, the predictor, trace statistics;
* :mod:`.policy`          -- :class:`ReplayPolicy` (``lru``, ``lfu``, ``paper``, ``zipmoe``, ``belady``);
* :mod:`.simulate`        -- :func:`replay`: hit rates per tier, bytes read, modelled time, prefetch;
* :mod:`.protocol_replay` -- the same replay through the runtime's own policy objects (slow, exact);
* :mod:`.stats`           -- activation statistics for the planner from a trace.
"""
