"""The fused step's torch.library ops checked by torch.library.opcheck (schema and mutation
annotations, fake implementations, AOT dispatch), and the eager path that skips their dispatch:
it steps like the op and bumps the autograd versions the op would."""

import pytest
import torch

from fastmask import ops
from fastmask.ops.encoding import config_args, encode_shards, tensor_args
from fastmask.reference.spec import Shard, StepConfig, TensorBatch
from tests.conftest import DEVICE, FAST_BACKENDS

CONFIGS = {
    "element-ema": StepConfig(ratio=0.4, unbiased=True, importance="ema", seed=3),
    "row-sgd": StepConfig(base="sgd", momentum=0.9, ratio=0.5, granularity="row", seed=4),
}


def _batch(cfg: StepConfig, shards: bool = False) -> TensorBatch:
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,)]
    params = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    batch = TensorBatch(params, [torch.randn(s, generator=gen).to(DEVICE) for s in shapes],
                        [torch.tensor(2.0, device=DEVICE) for _ in shapes], [0, 1],
                        stats=torch.zeros(4, dtype=torch.float64, device=DEVICE))
    if cfg.base == "sgd":
        batch.momentum_buffers = [torch.zeros(s, device=DEVICE) for s in shapes]
    else:
        batch.exp_avgs = [torch.zeros(s, device=DEVICE) for s in shapes]
        batch.exp_avg_sqs = [torch.zeros(s, device=DEVICE) for s in shapes]
    if cfg.importance == "ema":
        batch.fishers = [torch.rand(s, generator=gen).to(DEVICE) for s in shapes]
    if shards:  # the first tensor is rows 2-6 of a 9 x 3 tensor
        batch.shards = [Shard(torch.Size((9, 3)), 6), None]
    return batch


@pytest.mark.parametrize("backend", ["torch"] + FAST_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_opcheck(backend, name):
    cfg = CONFIGS[name]
    whole = _batch(cfg)
    torch.library.opcheck(torch.ops.fastmask.masked_step_.default,
                          (*tensor_args(whole), None, None, *config_args(cfg, backend)))
    sharded = _batch(cfg, shards=True)
    tensors = tensor_args(sharded)
    sums_args = (*tensors[:7], tensors[8], encode_shards(sharded.shards), None, *config_args(cfg, backend))
    torch.library.opcheck(torch.ops.fastmask.masked_step_sums.default, sums_args)
    sums, unit_importance = torch.ops.fastmask.masked_step_sums(*sums_args)
    torch.library.opcheck(torch.ops.fastmask.masked_step_finish.default,
                          (*tensors, None, None, encode_shards(sharded.shards), sums, unit_importance,
                           *config_args(cfg, backend)))


@pytest.mark.parametrize("backend", ["torch"] + FAST_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_path_steps_like_the_op_and_bumps_versions(backend, name):
    cfg = CONFIGS[name]
    eager, through_op = _batch(cfg), _batch(cfg)
    versions = [p._version for p in eager.params]
    for _ in range(2):
        ops.masked_step_(eager, cfg, backend=backend)
        torch.ops.fastmask.masked_step_(*tensor_args(through_op), None, None, *config_args(cfg, backend))
    for a, b in zip(tensor_args(eager)[:7], tensor_args(through_op)[:7]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(eager.stats, through_op.stats)
    assert all(p._version > v for p, v in zip(eager.params, versions))
