"""The cpp backend's pass 1 when only its own finish reads the result (``handed_out=False``):
the columns the finish does not read are left 0, the rest are the op's, bit for bit."""

import pytest
import torch

from fastmask.backends import cpp
from fastmask.backends.native import NativeStep
from fastmask.reference.spec import StepConfig, TensorBatch

pytestmark = pytest.mark.skipif(cpp.EXTENSION.module() is None, reason="the cpp extension cannot be built here")


def _batch(shapes):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    return TensorBatch(params, grads, [torch.tensor(0.0) for _ in params], list(range(len(params))),
                       exp_avgs=[torch.zeros_like(p) for p in params],
                       exp_avg_sqs=[torch.zeros_like(p) for p in params])


@pytest.mark.parametrize(("cfg", "read"), [
    (StepConfig(ratio=0.5, unbiased=True), [0, 3]),  # water-filling: S, the count and the histogram
    (StepConfig(ratio=0.5, granularity="row", importance="ema"), [0, 3]),
    (StepConfig(ratio=1.0), [3]),  # dense: the non-finite count alone
    (StepConfig(ratio=1.0, ge_noise=True, coefficient=0.5), [1, 2, 3]),  # GE's std reads sum g, g^2
])
def test_pass1_for_the_finish_leaves_only_unread_columns_zero(cfg, read):
    batch = _batch([(40_000,), (300, 70)])
    if cfg.importance == "ema":
        batch.fishers = [torch.rand_like(p) for p in batch.params]
    batch.grads[1][5, 7] = float("nan")
    step = NativeStep(cpp.EXTENSION.module, settings_in_memory=False)
    whole, _ = step.masked_step_sums(batch, cfg, None, handed_out=True)
    for_finish, _ = step.masked_step_sums(batch, cfg, None, handed_out=False)
    assert whole.shape == for_finish.shape and whole[1, 3] == 1
    unread = [c for c in range(4) if c not in read]
    bits = lambda x: x.contiguous().view(torch.int64)  # noqa: E731 (NaN sums compare by their bits)
    assert torch.equal(bits(for_finish[:, read]), bits(whole[:, read]))
    assert torch.equal(for_finish[:, 4:], whole[:, 4:])
    assert (for_finish[:, unread] == 0).all() and (whole[:, unread] != 0).all()
