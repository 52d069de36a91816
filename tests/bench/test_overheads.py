"""The overhead benchmarks run (their timings are reported, never asserted)."""

import json
import math
import subprocess
import sys

from fastmask.bench import balancer_overhead


def test_balancer_overhead_cases_run_and_time_real_work():
    cases = {**balancer_overhead.balancer_cases(batch=8, width=4), **balancer_overhead.dispatch_cases("torch")}
    ratios = cases["forward + balancer"]()
    assert set(ratios) == {"a", "b"} and set(cases["forward + manual significance"]()) == {"a", "b"}
    for fn in cases.values():
        ms = balancer_overhead.median_ms(fn, iters=2)
        assert math.isfinite(ms) and ms > 0.0


def test_balancer_overhead_writes_its_json(tmp_path):
    out = tmp_path / "overhead.json"
    subprocess.run([sys.executable, "-m", "fastmask.bench.balancer_overhead", "--iters", "3", "--backend", "torch",
                    "--json", str(out)], check=True, capture_output=True)
    record = json.loads(out.read_text())
    assert set(record["median_ms"]) >= {"forward + balancer", "forward + manual significance"}
    assert record["args"]["iters"] == 3 and record["cpu"]
