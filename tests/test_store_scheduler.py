"""The flow-shop scheduler: Johnson's order meets the bound of specs/runtime.md on random task sets."""
from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from zipmoe_run.store.scheduler import FlowTask, bound, flow_makespan, johnson_order, simulate

times = st.floats(min_value=0.0, max_value=50.0, allow_nan=False, allow_infinity=False)


@st.composite
def task_sets(draw, max_tasks=24):
    workers = draw(st.integers(1, 4))
    n = draw(st.integers(0, max_tasks))
    tasks = []
    for j in range(n):
        a = draw(times)
        chunks = tuple(draw(st.lists(st.floats(0.0, 20.0, allow_nan=False), min_size=1, max_size=6)))
        tasks.append(FlowTask(j, a, sum(chunks) / workers, chunks))
    return tasks, workers


EPS = 1e-7


@settings(max_examples=400, deadline=None)
@given(task_sets())
def test_johnson_meets_the_bound(ts):
    tasks, workers = ts
    order = johnson_order(tasks)
    assert sorted(t.key for t in order) == sorted(t.key for t in tasks)
    span = simulate(order, workers)
    assert span <= bound(tasks, workers) * (1 + EPS) + EPS
    # and never below the trivial lower bounds
    if tasks:
        assert span + EPS >= max(sum(t.read_s for t in tasks), sum(t.decode_s for t in tasks) - EPS)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(times, times), min_size=0, max_size=6))
def test_johnson_is_optimal_for_one_worker(pairs):
    tasks = [FlowTask(j, a, b) for j, (a, b) in enumerate(pairs)]
    best = min((flow_makespan(p) for p in itertools.permutations(tasks)), default=0.0)
    got = simulate(johnson_order(tasks), 1)
    assert abs(got - flow_makespan(johnson_order(tasks))) <= EPS * (1 + got)  # simulator = formula
    assert got <= best * (1 + EPS) + EPS
    assert got <= bound(tasks, 1) * (1 + EPS) + EPS


def test_bad_order_can_break_the_bound():
    """Why the order matters: read-heavy tasks first leave the decoder idle, then overload it."""
    m = 5
    reads = [FlowTask(f"r{i}", 1.0, 0.0) for i in range(m)]
    decodes = [FlowTask(f"d{i}", 0.0, 1.0) for i in range(m)]
    bad = reads + decodes
    assert flow_makespan(bad) == 2 * m
    assert flow_makespan(johnson_order(bad)) == m
    assert bound(bad) == m


def test_order_is_deterministic_and_stable():
    tasks = [FlowTask(i, 1.0, 1.0) for i in range(5)] + [FlowTask(9, 0.0, 3.0)]
    assert [t.key for t in johnson_order(tasks)] == [9, 0, 1, 2, 3, 4]
    assert simulate([], 3) == 0.0 and bound([], 3) == 0.0
