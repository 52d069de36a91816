"""The cpp backend's two Philox paths agree: the AVX-512 one (16 calls per vector) and the
portable loop (``-DFASTMASK_PORTABLE_RNG``).

Each variant is built explicitly as an extension of its own, and each build reports which
loop it compiled (``rng_path()``), so that the comparison cannot pass by comparing the
portable loop with itself: on a compiler target without AVX-512, ``-march=native`` alone
would compile the portable loop in both. The AVX-512 build runs only on a CPU that has
AVX-512 (skipped with that reason elsewhere); it is checked to step exactly like the portable
one, for blocks that start at a multiple of 4 and for shards that do not.
"""

import pytest
import torch

from fastmask.backends import cpp
from fastmask.backends.native import JitExtension, native_masked_step_, reference_select
from fastmask.reference.spec import Shard, StepConfig, TensorGroup

pytestmark = pytest.mark.skipif(cpp.EXTENSION.module() is None, reason="the cpp backend cannot be built here")

PORTABLE = JitExtension("fastmask_cpp_portable_rng", "fastmask._cpp_portable_rng", ["cpu/masked_step.cpp"],
                        extra_cflags=[*cpp.BUILD_FLAGS, "-DFASTMASK_PORTABLE_RNG"], extra_ldflags=["-fopenmp"])
AVX512 = JitExtension("fastmask_cpp_avx512_rng", "fastmask._cpp_avx512_rng", ["cpu/masked_step.cpp"],
                      extra_cflags=[*cpp.BUILD_FLAGS, "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
                      extra_ldflags=["-fopenmp"])
CPU_HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _run(extension, cfg: StepConfig, shard: Shard | None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(257, 3, generator=gen), torch.randn(257, 3, generator=gen)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step = torch.tensor(0.0)
    group = TensorGroup([p], [g], [step], [5], exp_avgs=[m], exp_avg_sqs=[v], shards=[shard] if shard else [])
    for _ in range(3):
        native_masked_step_(extension, group, cfg, None, None, reference_select(cfg.seed))
    return [p, m, v, step]


def test_each_variant_compiles_the_loop_it_is_named_for():
    for extension, path in ((PORTABLE, "portable"), (AVX512, "avx512")):
        module = extension.module()
        assert module is not None, extension.error
        assert module.rng_path() == path
    default = cpp.EXTENSION.module().rng_path()
    assert default == ("avx512" if CPU_HAS_AVX512 else "portable"), (default, CPU_HAS_AVX512)


@pytest.mark.skipif(not CPU_HAS_AVX512, reason="this CPU has no AVX-512: the AVX-512 build cannot run here")
@pytest.mark.parametrize("shard", [None, Shard(torch.Size((300, 3)), 3 * 13)], ids=["whole", "offset-39"])
def test_avx512_rng_steps_like_the_portable_loop(shard):
    cfg = StepConfig(ratio=0.3, unbiased=True, seed=2**40 + 3)
    for a, b in zip(_run(AVX512.module(), cfg, shard), _run(PORTABLE.module(), cfg, shard)):
        assert torch.equal(a, b)
