"""pytest-benchmark: the low-level ops per backend (``pytest bench``)."""

import pytest
import torch

from fastmask import ops
from fastmask.bench.suites import available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N = 2**20


@pytest.fixture(scope="module")
def inputs():
    g = torch.randn(N, device=DEVICE)
    pi = ops.inclusion_probs(g * g, 0.3)
    return g, pi, ops.sample_mask(pi, seed=1)


@pytest.mark.parametrize("backend", available_backends(DEVICE))
def test_inclusion_probs(benchmark, inputs, backend):
    g, _, _ = inputs
    benchmark(ops.inclusion_probs, g * g, 0.3, backend=backend)


@pytest.mark.parametrize("backend", available_backends(DEVICE))
def test_sample_mask(benchmark, inputs, backend):
    _, pi, _ = inputs
    benchmark(ops.sample_mask, pi, seed=1, stream=2, backend=backend)


@pytest.mark.parametrize("backend", available_backends(DEVICE))
def test_unbiased_rescale(benchmark, inputs, backend):
    g, pi, mask = inputs
    benchmark(ops.unbiased_rescale, g, mask, pi, backend=backend)


@pytest.mark.parametrize("backend", available_backends(DEVICE))
def test_fisher_update(benchmark, inputs, backend):
    g, _, _ = inputs
    fisher = torch.zeros_like(g)
    benchmark(ops.fisher_update_, fisher, g, 0.9, backend=backend)
