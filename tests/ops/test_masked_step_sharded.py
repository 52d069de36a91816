"""The fused step on shards of a tensor equals the step on the whole tensor, bit for bit.

No process group: a tensor is cut into dim-0 shards, each stepped as its own batch with
``shards`` set and a ``reduce_sums`` that adds the other shards' pass-1 sums (what the
all-reduce does across ranks). Cuts at rows whose first element is not a multiple of 4
exercise the unaligned RNG paths; an empty shard must work too.
"""

import dataclasses

import pytest
import torch

from fastmask import ops
from fastmask.reference.spec import Shard, StepConfig, TensorGroup
from fastmask.reference.step import pass1_sums
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


def _group(state: dict[str, torch.Tensor], step: torch.Tensor, rows: tuple[int, int] | None) -> TensorGroup:
    part = {k: (v if rows is None else v[rows[0]:rows[1]]) for k, v in state.items()}
    group = TensorGroup([part["param"]], [part["grad"]], [step], [3], stats=torch.zeros(4, dtype=torch.float64,
                                                                                         device=DEVICE))
    for key, values in (("exp_avg", group.exp_avgs), ("exp_avg_sq", group.exp_avg_sqs),
                        ("momentum_buffer", group.momentum_buffers), ("fisher", group.fishers)):
        if key in part:
            values.append(part[key])
    if rows is not None:
        group.shards = [Shard(torch.Size(SHAPE), rows[0] * SHAPE[1])]
    return group


@pytest.mark.parametrize("backend", ["torch"] + FAST_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_shards_step_like_the_whole_tensor(backend, name):
    cfg = dataclasses.replace(CONFIGS[name], masked="freeze")
    whole, sharded = _state(cfg), _state(cfg)
    whole_step = torch.tensor(4.0, device=DEVICE)
    for _ in range(3):
        ops.masked_step_(_group(whole, whole_step, None), cfg, backend=backend)

    steps = [torch.tensor(4.0, device=DEVICE) for _ in CUTS]
    for _ in range(3):
        groups = [_group(sharded, steps[i], cut) for i, cut in enumerate(CUTS)]
        sums = [pass1_sums(g, cfg, None) for g in groups]  # before any shard is written
        for i, group in enumerate(groups):
            others = sum(s for j, s in enumerate(sums) if j != i)
            group.reduce_sums = lambda table, others=others: table.add_(others)
            ops.masked_step_(group, cfg, backend=backend)
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
    groups = [_group(state, steps[i], cut) for i, cut in enumerate(CUTS)]
    sums = [pass1_sums(g, cfg, None) for g in groups]
    for i, group in enumerate(groups):
        others = sum(s for j, s in enumerate(sums) if j != i)
        group.reduce_sums = lambda table, others=others: table.add_(others)
        ops.masked_step_(group, cfg, backend=backend)
        assert group.stats[3].item() == 1.0  # every shard reports the tensor as skipped
    assert all(torch.equal(state[k], before[k]) for k in state if k != "grad")  # grad holds a NaN
    assert all(s.item() == 0.0 for s in steps)


def test_exact_sampling_on_shards_raises():
    cfg = StepConfig(ratio=0.5, sampling="exact", seed=1)
    group = _group(_state(cfg), torch.tensor(0.0, device=DEVICE), (0, 3))
    with pytest.raises(NotImplementedError, match="sampling='exact'"):
        ops.masked_step_(group, cfg)


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
    group = _group(state, torch.tensor(0.0, device=DEVICE), (0, 3))
    group.shards = [shard]
    with pytest.raises((TypeError, ValueError), match=match):
        ops.masked_step_(group, cfg)
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_reduce_sums_must_be_callable():
    cfg = CONFIGS["amss+-element"]
    group = _group(_state(cfg), torch.tensor(0.0, device=DEVICE), (0, 3))
    group.reduce_sums = "all_reduce"
    with pytest.raises(TypeError, match="group.reduce_sums must be callable"):
        ops.masked_step_(group, cfg)
