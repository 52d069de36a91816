"""The cpp step on bf16 / fp16 params and grads is its fp32 step on the values widened, with the
new params rounded to their dtype (round to nearest even) and fp32 moments: bit for bit.

The widening of every finite bf16 and fp16 value and the rounding of fp32 values (ties, the
largest finite fp16 and past it, subnormals) are checked exhaustively or densely through a dense
SGD step with lr 1, which is p - g exactly where p or g is 0."""

import pytest
import torch

from fastmask.backends import cpp
from fastmask.backends.native import NativeStep
from fastmask.reference.spec import StepConfig, TensorBatch

pytestmark = pytest.mark.skipif(cpp.EXTENSION.module() is None, reason="the cpp extension cannot be built here")

LOW = [torch.bfloat16, torch.float16]
COPY_SGD = StepConfig(base="sgd", lr=1.0, ratio=1.0)  # p - g, the dense base step


def _step(batch: TensorBatch, cfg: StepConfig) -> None:
    NativeStep(cpp.EXTENSION.module, settings_in_memory=False).masked_step_(batch, cfg, None, None)


def _sgd_batch(params, grads) -> TensorBatch:
    return TensorBatch(params, grads, [torch.tensor(0.0) for _ in params], list(range(len(params))))


def _finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype (both zeros included)."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return every[torch.isfinite(every.float())]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_every_finite_value_widens_exactly(dtype):
    values = _finite_values(dtype)
    p, g = values.clone(), torch.zeros_like(values)  # p - 0: the param read and written back
    q, h = torch.zeros_like(values), values.clone()  # 0 - g: the grad read (exact, 0 - 0 is +0)
    _step(_sgd_batch([p, q], [g, h]), COPY_SGD)
    assert torch.equal(_bits(p), _bits(values))
    assert torch.equal(_bits(q), _bits((0.0 - values.float()).to(dtype)))


def _rounding_targets() -> torch.Tensor:
    """fp32 values whose rounding to bf16 / fp16 is worth checking: random bit patterns over
    the whole finite range, every tie and near-tie around bf16's and fp16's values in [1, 4),
    fp16's largest finite value and past it, fp16's subnormals and the values between them."""
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(0, 2**31 - 2**23, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    random = random_bits.view(torch.float32)
    base = torch.arange(0x3F800000, 0x40800000, 1 << 13, dtype=torch.int32)  # fp16's grid in [1, 4)
    near_ties = torch.cat([base + (1 << 12) + d for d in (-1, 0, 1)] + [base + (1 << 15) + d for d in (-1, 0, 1)])
    past_max = torch.linspace(65000.0, 70000.0, 4097)
    subnormal = torch.linspace(0.0, 2.0**-13, 8193)
    targets = torch.cat([random, near_ties.view(torch.float32), past_max, subnormal])
    return torch.cat([targets, -targets])


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_fp32_results_round_to_nearest_even(dtype):
    targets = _rounding_targets()
    p = torch.zeros(targets.shape, dtype=dtype)
    _step(_sgd_batch([p], [-targets]), COPY_SGD)  # (half param, fp32 grad): 0 - (-t) = t, rounded
    assert torch.equal(_bits(p), _bits((0.0 - (-targets)).to(dtype)))  # (+0 for t = -0)


STEP_CASES = {
    "element-grad2": StepConfig(ratio=0.5, unbiased=True),
    "element-ema": StepConfig(ratio=0.4, unbiased=True, importance="ema"),
    "row": StepConfig(ratio=0.5, unbiased=True, granularity="row"),
    "row-ema": StepConfig(ratio=0.5, unbiased=True, granularity="row", importance="ema"),
    "dense": StepConfig(ratio=1.0, weight_decay=0.01),
    "ogm-ge": StepConfig(ratio=1.0, coefficient=0.6, ge_noise=True),
}


@pytest.mark.parametrize("grad_dtype", ["param", torch.float32], ids=["grads-alike", "fp32-grads"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(STEP_CASES))
def test_step_is_the_fp32_step_rounded(name, dtype, grad_dtype):
    cfg = STEP_CASES[name]
    gen = torch.Generator().manual_seed(7)
    # several items, a 1-D tensor, rows longer than a widened block (frozen ones too), a small tail
    shapes = [(700, 33), (5000,), (20, 600), (3, 3, 7)]
    params = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(dtype if grad_dtype == "param" else grad_dtype)
             for s in shapes]

    def batch(ps, gs):
        g2 = torch.Generator().manual_seed(1)  # the same moments, importance EMA and step counts for both
        return TensorBatch(
            ps, gs, [torch.tensor(3.0) for _ in ps], [5, 6, 7, 8],
            exp_avgs=[torch.randn(p.shape, generator=g2) * 1e-2 for p in ps],
            exp_avg_sqs=[torch.rand(p.shape, generator=g2) * 1e-4 for p in ps],
            fishers=[torch.rand(p.shape, generator=g2) * 1e-4 for p in ps] if cfg.importance == "ema" else [])

    low = batch([p.clone() for p in params], grads)
    wide = batch([p.float() for p in params], [g.float() for g in grads])
    _step(low, cfg)
    _step(wide, cfg)
    for p, p32 in zip(low.params, wide.params):
        assert torch.equal(_bits(p), _bits(p32.to(dtype)))
    moved = torch.cat([p32.flatten() != before.float().flatten() for p32, before in zip(wide.params, params)])
    rounded = torch.cat([p32.flatten() != p.float().flatten() for p32, p in zip(wide.params, low.params)])
    assert moved.any() and rounded.any()  # the step was not empty, and its results not all representable
    for name_ in ("exp_avgs", "exp_avg_sqs", "fishers", "steps"):
        for x, y in zip(getattr(low, name_), getattr(wide, name_)):
            assert torch.equal(x, y), name_
