"""Benchmarks (installed as ``fastmask.bench``): the suites of ``fastmask bench`` and
pytest-benchmark microbenchmarks (``pytest bench``)."""
