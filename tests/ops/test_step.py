"""The fused step on shards of a tensor equals the step on the whole tensor, bit for bit.

No process group: a tensor is cut into dim-0 shards, each a batch with ``shards`` set;
``masked_step_sums`` runs on every shard, each shard's sums are replaced by their total
(what the all-reduce does across ranks), then ``masked_step_finish`` runs on each. Cuts at rows whose first element is not a multiple of 4
exercise the unaligned RNG paths; an empty shard must work too.
"""

import dataclasses

import pytest
import torch

from fastmask import ops
from fastmask.reference.spec import Shard, StepConfig, TensorBatch
from tests.conftest import DEVICE, FAST_BACKENDS

CONFIGS = {
    "amss+-element": StepConfig(ratio=0.3, unbiased=True, seed=11),
    "amss-row-ema-uniform": StepConfig(base="sgd", momentum=0.9, ratio=0.5, granularity="row", importance="ema",
                                       sampling="uniform", seed=12),
    "amss+-row-legacy": StepConfig(base="adam", ratio=0.4, unbiased=True, rescale="legacy", granularity="row",
                                   seed=13),
    "amss+-element-legacy-ema": StepConfig(ratio=0.6, unbiased=True, rescale="legacy", importance="ema", seed=14),
    "ogm-ge": StepConfig(base="sgd", lr=0.05, coefficient=0.7, ge_noise=True, seed=15),
}
SHAPE = (11, 7)  # 77 elements: row cuts 3 and 9 start at elements 21 and 63 (not multiples of 4)
CUTS = [(0, 3), (3, 3), (3, 9), (9, 11)]  # (3, 3): an empty shard


def _state(cfg: StepConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {"param": torch.randn(SHAPE, generator=gen), "grad": torch.randn(SHAPE, generator=gen)}
    if cfg.base != "sgd":
        state["exp_avg"] = torch.randn(SHAPE, generator=gen) * 0.1
        state["exp_avg_sq"] = torch.rand(SHAPE, generator=gen) * 0.1
    elif cfg.momentum:
        state["momentum_buffer"] = torch.randn(SHAPE, generator=gen) * 0.1
    if cfg.importance == "ema":
        state["fisher"] = torch.rand(SHAPE, generator=gen)
    return {k: v.to(DEVICE) for k, v in state.items()}


def _batch(state: dict[str, torch.Tensor], step: torch.Tensor, rows: tuple[int, int] | None) -> TensorBatch:
    part = {k: (v if rows is None else v[rows[0]:rows[1]]) for k, v in state.items()}
    batch = TensorBatch([part["param"]], [part["grad"]], [step], [3], stats=torch.zeros(4, dtype=torch.float64,
                                                                                         device=DEVICE))
    for key, values in (("exp_avg", batch.exp_avgs), ("exp_avg_sq", batch.exp_avg_sqs),
                        ("momentum_buffer", batch.momentum_buffers), ("fisher", batch.fishers)):
        if key in part:
            values.append(part[key])
    if rows is not None:
        batch.shards = [Shard(torch.Size(SHAPE), rows[0] * SHAPE[1])]
    return batch


def _step_shards(groups: list[TensorBatch], cfg: StepConfig, backend: str) -> None:
    """One step of a tensor cut into ``groups``: pass 1 on each shard (before any is written),
    the sums' total in place of each shard's (the all-reduce), then each shard's finish."""
    passes = [ops.masked_step_sums(g, cfg, backend=backend) for g in groups]
    total = sum(sums for sums, _ in passes)
    for batch, (_, unit_importance) in zip(groups, passes):
        ops.masked_step_finish(batch, cfg, total.clone(), unit_importance, backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + FAST_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_shards_step_like_the_whole_tensor(backend, name):
    cfg = dataclasses.replace(CONFIGS[name], masked="freeze")
    whole, sharded = _state(cfg), _state(cfg)
    whole_step = torch.tensor(4.0, device=DEVICE)
    for _ in range(3):
        ops.masked_step_(_batch(whole, whole_step, None), cfg, backend=backend)

    steps = [torch.tensor(4.0, device=DEVICE) for _ in CUTS]
    for _ in range(3):
        _step_shards([_batch(sharded, steps[i], cut) for i, cut in enumerate(CUTS)], cfg, backend)
    for key in whole:
        assert torch.equal(sharded[key], whole[key]), f"{key} differs"
    assert all(torch.equal(s, whole_step) for s in steps)
    if cfg.is_masked:
        assert not torch.equal(whole["param"], _state(cfg)["param"])


@pytest.mark.parametrize("backend", ["torch"] + FAST_BACKENDS)
def test_nonfinite_shard_skips_every_shard(backend):
    cfg = CONFIGS["amss+-element"]
    state = _state(cfg)
    state["grad"][9, 2] = float("nan")
    before = {k: v.clone() for k, v in state.items()}
    steps = [torch.tensor(0.0, device=DEVICE) for _ in CUTS]
    groups = [_batch(state, steps[i], cut) for i, cut in enumerate(CUTS)]
    _step_shards(groups, cfg, backend)
    assert all(batch.stats[3].item() == 1.0 for batch in groups)  # every shard reports the tensor as skipped
    assert all(torch.equal(state[k], before[k]) for k in state if k != "grad")  # grad holds a NaN
    assert all(s.item() == 0.0 for s in steps)


def test_exact_sampling_on_shards_raises():
    cfg = StepConfig(ratio=0.5, sampling="exact", seed=1)
    batch = _batch(_state(cfg), torch.tensor(0.0, device=DEVICE), (0, 3))
    with pytest.raises(NotImplementedError, match="sampling='exact'"):
        ops.masked_step_sums(batch, cfg)


def test_a_batch_of_shards_needs_the_two_ops():
    cfg = CONFIGS["amss+-element"]
    batch = _batch(_state(cfg), torch.tensor(0.0, device=DEVICE), (0, 3))
    with pytest.raises(ValueError, match="masked_step_sums, an all-reduce"):
        ops.masked_step_(batch, cfg)


@pytest.mark.parametrize("backend", ["torch"] + FAST_BACKENDS)
@pytest.mark.parametrize("name", ["amss-row-ema-uniform", "amss+-element-legacy-ema"])
def test_sums_then_finish_equals_the_whole_step(backend, name):
    """Unsharded, the two ops are the step: bit for bit, stats included."""
    cfg = CONFIGS[name]
    one, two = _state(cfg), _state(cfg)
    one_step, two_step = torch.tensor(2.0, device=DEVICE), torch.tensor(2.0, device=DEVICE)
    for _ in range(2):
        whole = _batch(one, one_step, None)
        ops.masked_step_(whole, cfg, backend=backend)
        split = _batch(two, two_step, None)
        sums, unit_importance = ops.masked_step_sums(split, cfg, backend=backend)
        assert sums.dtype == torch.float64 and sums.shape == (1, cfg.sums_width)
        assert unit_importance.shape == ((SHAPE[0],) if cfg.granularity == "row" else (0,))
        ops.masked_step_finish(split, cfg, sums, unit_importance, backend=backend)
        assert torch.equal(whole.stats, split.stats)
    assert all(torch.equal(one[k], two[k]) for k in one) and torch.equal(one_step, two_step)


@pytest.mark.parametrize(("sums", "importance", "match"), [
    (torch.zeros(1, 4), torch.zeros(11), "sums must have dtype in \\(float64\\)"),
    (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(11), "sums must have shape \\(1, 4\\)"),
    (torch.zeros(1, 4, dtype=torch.float64), torch.zeros(3), "unit_importance must have shape \\(11,\\)"),
])
def test_finish_rejects_bad_sums_before_any_write(sums, importance, match):
    cfg = CONFIGS["amss-row-ema-uniform"]
    state = _state(cfg)
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises((TypeError, ValueError), match=match):
        ops.masked_step_finish(_batch(state, torch.tensor(0.0, device=DEVICE), None), cfg, sums.to(DEVICE),
                               importance.to(DEVICE))
    assert all(torch.equal(state[k], before[k]) for k in state)


@pytest.mark.parametrize(
    ("shard", "match"),
    [
        ((SHAPE, 0), "must be a fastmask.reference.spec.Shard"),
        (Shard(torch.Size((11, 6)), 0), "is not a dim-0 slice"),
        (Shard(torch.Size(SHAPE), 5), "offset must be a non-negative multiple of 7"),
        (Shard(torch.Size(SHAPE), -7), "offset must be a non-negative multiple of 7"),
        (Shard(torch.Size(SHAPE), 7 * 9), r"rows \[9, 12\) exceed"),
    ],
)
def test_bad_shards_are_rejected_before_any_write(shard, match):
    cfg = CONFIGS["amss+-element"]
    state = _state(cfg)
    before = {k: v.clone() for k, v in state.items()}
    batch = _batch(state, torch.tensor(0.0, device=DEVICE), (0, 3))
    batch.shards = [shard]
    with pytest.raises((TypeError, ValueError), match=match):
        ops.masked_step_sums(batch, cfg)
    assert all(torch.equal(state[k], before[k]) for k in state)
