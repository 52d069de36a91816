"""The overhead benchmarks run (their timings are reported, never asserted)."""

from fastmask.bench import balancer_overhead


def test_balancer_overhead_cases_run():
    cases = {**balancer_overhead.balancer_cases(batch=8, width=4), **balancer_overhead.dispatch_cases("torch")}
    for fn in cases.values():
        assert balancer_overhead.median_ms(fn, iters=2) >= 0.0
