"""The cpp backend's three Philox paths agree: the AVX-512 one (8 calls per vector), the AVX2
one (4 calls per vector; both one call per 64-bit lane) and the portable loop
(``-DFASTMASK_PORTABLE_RNG``).

Each variant is built explicitly as an extension of its own, and each build reports which
loop it compiled (``rng_path()``), so that the comparison cannot pass by comparing the
portable loop with itself: on a compiler target without AVX-512, ``-march=native`` alone
would compile the portable loop in both. Each vector build runs only on a CPU that has its
instructions (skipped with that reason elsewhere); each is checked to step exactly like the
portable one, for blocks that start at a multiple of 4 and for shards that do not.
"""

import pytest
import torch

from fastmask.backends import cpp
from fastmask.backends.native import NativeStep
from fastmask.reference.spec import Shard, StepConfig, TensorBatch

pytestmark = pytest.mark.skipif(cpp.EXTENSION.module() is None, reason="the cpp backend cannot be built here")

PORTABLE, AVX2, AVX512 = (cpp.rng_variant(path) for path in ("portable", "avx2", "avx512"))
PORTABLE_AVX2_ISA = cpp.rng_variant("portable", cap_at_avx2=True)  # an AVX2 machine's portable build
CPU_HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
CPU_HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _run(extension, cfg: StepConfig, shard: Shard | None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(257, 3, generator=gen), torch.randn(257, 3, generator=gen)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step = torch.tensor(0.0)
    batch = TensorBatch([p], [g], [step], [5], exp_avgs=[m], exp_avg_sqs=[v], shards=[shard] if shard else [])
    native = NativeStep(lambda: extension, settings_in_memory=False)
    for _ in range(3):
        native.masked_step_(batch, cfg, None, None)
    return [p, m, v, step]


def test_each_variant_compiles_the_loop_it_is_named_for():
    for extension, path in ((PORTABLE, "portable"), (AVX512, "avx512"), (AVX2, "avx2"),
                            (PORTABLE_AVX2_ISA, "portable")):
        module = extension.module()
        assert module is not None, extension.error
        assert module.rng_path() == path
    default = cpp.EXTENSION.module().rng_path()
    expected = "avx512" if CPU_HAS_AVX512 else "avx2" if CPU_HAS_AVX2 else "portable"
    assert default == expected, (default, torch.backends.cpu.get_cpu_capability())


# a shard whose Philox counter (its full-tensor index / 4) crosses 2^32 inside a vector: the
# carry into the counter's high word; its first element is not a multiple of 4 either
WRAPPING = Shard(torch.Size((5_726_623_050 + 300, 3)), 17_179_869_150)


@pytest.mark.parametrize("shard", [None, Shard(torch.Size((300, 3)), 3 * 13), WRAPPING],
                         ids=["whole", "offset-39", "counter-wraps"])
@pytest.mark.parametrize("vector, runs_here", [(AVX512, CPU_HAS_AVX512), (AVX2, CPU_HAS_AVX2),
                                               (PORTABLE_AVX2_ISA, CPU_HAS_AVX2)],
                         ids=["avx512", "avx2", "portable-avx2-isa"])
def test_vector_rng_steps_like_the_portable_loop(vector, runs_here, shard):
    if not runs_here:
        pytest.skip(f"this CPU lacks the instructions of {vector.name}: it cannot run here")
    cfg = StepConfig(ratio=0.3, unbiased=True, seed=2**40 + 3)
    for a, b in zip(_run(vector.module(), cfg, shard), _run(PORTABLE.module(), cfg, shard)):
        assert torch.equal(a, b)


def test_an_unknown_loop_is_refused():
    with pytest.raises(ValueError, match="path must be one of"):
        cpp.rng_variant("avx1024")
    with pytest.raises(ValueError, match="cannot be capped at AVX2"):
        cpp.rng_variant("avx512", cap_at_avx2=True)
