"""pytest-benchmark: the fused step per backend and variant (``pytest bench``).

Small shapes so that every backend that runs here finishes quickly; ``fastmask bench``
measures the full shape sets with GB/s and ratios.
"""

import pytest
import torch

from fastmask.bench.suites import VARIANTS, _params, available_backends, fastmask_step, torch_adamw_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = {"audio": [(64, 64, 3, 3)] * 8, "visual": [(128, 64, 3, 3)] * 8, "dense": [(31, 1024)]}


@pytest.mark.parametrize("backend", available_backends(DEVICE))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_masked_step(benchmark, variant, backend):
    benchmark(fastmask_step(_params(SHAPES, DEVICE), variant, backend))


def test_torch_fused_adamw(benchmark):
    benchmark(torch_adamw_step(_params(SHAPES, DEVICE), fused=True))
