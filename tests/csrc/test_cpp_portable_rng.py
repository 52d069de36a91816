"""The cpp backend's two Philox paths agree: the AVX-512 one (16 calls per vector, used
where the compiler targets AVX-512) and the portable loop (``-DFASTMASK_PORTABLE_RNG``).

The backend tests hold the default build to the reference; this builds the portable
variant as a second extension and checks that it steps exactly like the default one,
for blocks that start at a multiple of 4 and for shards that do not.
"""

import pytest
import torch

from fastmask.backends import cpp
from fastmask.backends.native import JitExtension, native_masked_step_, reference_select
from fastmask.reference.spec import Shard, StepConfig, TensorGroup

pytestmark = pytest.mark.skipif(cpp.EXTENSION.module() is None, reason="the cpp backend cannot be built here")

PORTABLE = JitExtension("fastmask_cpp_portable_rng", "fastmask._cpp_portable_rng", ["cpu/masked_step.cpp"],
                        extra_cflags=[*cpp.BUILD_FLAGS, "-DFASTMASK_PORTABLE_RNG"], extra_ldflags=["-fopenmp"])


def _run(extension, cfg: StepConfig, shard: Shard | None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(257, 3, generator=gen), torch.randn(257, 3, generator=gen)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step = torch.tensor(0.0)
    group = TensorGroup([p], [g], [step], [5], exp_avgs=[m], exp_avg_sqs=[v], shards=[shard] if shard else [])
    for _ in range(3):
        native_masked_step_(extension, group, cfg, None, None, reference_select(cfg.seed))
    return [p, m, v, step]


@pytest.mark.parametrize("shard", [None, Shard(torch.Size((300, 3)), 3 * 13)], ids=["whole", "offset-39"])
def test_portable_rng_steps_like_the_default_build(shard):
    module = PORTABLE.module()
    assert module is not None, PORTABLE.error
    cfg = StepConfig(ratio=0.3, unbiased=True, seed=2**40 + 3)
    for a, b in zip(_run(module, cfg, shard), _run(cpp.EXTENSION.module(), cfg, shard)):
        assert torch.equal(a, b)
