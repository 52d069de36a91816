"""The fused step as ``torch.library`` ops (``fastmask::masked_step_``, ``masked_step_sums``,
``masked_step_finish``): their schemas, mutation annotations and fake implementations, and how a
``TensorBatch`` and its ``StepConfig`` are encoded into (and decoded from) their arguments."""

from __future__ import annotations

import torch

from ..backends.registry import implementation
from ..reference.philox import split_seed
from ..reference.sampling import unit_count
from ..reference.spec import Shard, StepConfig, TensorBatch

# The fused step as torch.library ops: torch.compile sees one node per batch, and each
# registered implementation dispatches to the chosen backend. Eager calls go to the same
# implementation without the op's dispatch (see _mutated). The StepConfig travels as its
# choices (one comma-joined string), numbers, flags and the seed's 32-bit halves (the schema
# has no record type); its tensor fields (lr, ratio, coefficient) as tensors; shards as one
# int list (per tensor [-1], or [offset, ndim, *full_shape]).
CHOICES = ("base", "sampling", "rescale", "importance", "granularity", "masked", "modulate")
NUMBERS = ("lr", "momentum", "dampening", "beta1", "beta2", "eps", "weight_decay", "ratio", "fisher_beta", "min_prob",
           "coefficient")
FLAGS = ("nesterov", "maximize", "unbiased", "ge_noise")
STEP_MUTATES = ("params", "steps", "exp_avgs", "exp_avg_sqs", "momentum_buffers", "fishers", "stats")


def _number(value: float | torch.Tensor) -> float:
    return 0.0 if isinstance(value, torch.Tensor) else float(value)  # a tensor travels as itself


def tensor_args(batch: TensorBatch) -> tuple:
    return (batch.params, batch.grads, batch.steps, batch.exp_avgs, batch.exp_avg_sqs, batch.momentum_buffers,
            batch.fishers, batch.stats, list(batch.slots))


def config_args(config: StepConfig, backend: str | None) -> tuple:
    lr, ratio, coefficient = (value if isinstance(value, torch.Tensor) else None
                              for value in (config.lr, config.ratio, config.coefficient))
    return (lr, ratio, coefficient, ",".join(getattr(config, name) for name in CHOICES),
            [_number(getattr(config, name)) for name in NUMBERS], [getattr(config, name) for name in FLAGS],
            list(split_seed(config.seed)), backend or "")


def encode_shards(shards: list[Shard | None]) -> list[int]:
    out: list[int] = []
    for shard in shards:
        out += [-1] if shard is None else [shard.offset, len(shard.full_shape), *shard.full_shape]
    return out


def _decode_shards(encoded: list[int]) -> list[Shard | None]:
    shards: list[Shard | None] = []
    i = 0
    while i < len(encoded):
        if encoded[i] < 0:
            shards.append(None)
            i += 1
        else:
            ndim = encoded[i + 1]
            shards.append(Shard(torch.Size(encoded[i + 2 : i + 2 + ndim]), encoded[i]))
            i += 2 + ndim
    return shards


def _batch(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, stats, slots,
           shards: list[int]) -> TensorBatch:
    return TensorBatch(list(params), list(grads), list(steps), list(slots), list(exp_avgs), list(exp_avg_sqs),
                       list(momentum_buffers), list(fishers), stats, _decode_shards(shards))


def _config(lr, ratio, coefficient, choices: str, numbers: list[float], flags: list[bool], seed: list[int]
            ) -> StepConfig:
    values = {**dict(zip(CHOICES, choices.split(","))), **dict(zip(NUMBERS, numbers)), **dict(zip(FLAGS, flags)),
              "seed": seed[0] | (seed[1] << 32)}
    for name, tensor in (("lr", lr), ("ratio", ratio), ("coefficient", coefficient)):
        if tensor is not None:
            values[name] = tensor
    return StepConfig(**values)


@torch.library.custom_op("fastmask::masked_step_", mutates_args=STEP_MUTATES)
def _masked_step_op(
    params: list[torch.Tensor], grads: list[torch.Tensor], steps: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], momentum_buffers: list[torch.Tensor], fishers: list[torch.Tensor],
    stats: torch.Tensor | None, slots: list[int], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
    lr: torch.Tensor | None, ratio: torch.Tensor | None, coefficient: torch.Tensor | None, choices: str,
    numbers: list[float], flags: list[bool], seed: list[int], backend: str,
) -> None:
    """The fused step of one (device, dtype) batch of whole tensors (see ``masked_step_``)."""
    batch = _batch(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, stats, slots, [])
    cfg = _config(lr, ratio, coefficient, choices, numbers, flags, seed)
    implementation("masked_step_", backend or None, params[0].device)(batch, cfg, grad_scale, found_inf)


@_masked_step_op.register_fake
def _(*args, **kwargs) -> None:
    return None


@torch.library.custom_op("fastmask::masked_step_sums", mutates_args=())
def _masked_step_sums_op(
    params: list[torch.Tensor], grads: list[torch.Tensor], steps: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], momentum_buffers: list[torch.Tensor], fishers: list[torch.Tensor],
    slots: list[int], shards: list[int], grad_scale: torch.Tensor | None, lr: torch.Tensor | None,
    ratio: torch.Tensor | None, coefficient: torch.Tensor | None, choices: str, numbers: list[float],
    flags: list[bool], seed: list[int], backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 of one batch (see ``masked_step_sums``)."""
    batch = _batch(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, None, slots, shards)
    cfg = _config(lr, ratio, coefficient, choices, numbers, flags, seed)
    return implementation("masked_step_sums", backend or None, params[0].device)(batch, cfg, grad_scale)


@_masked_step_sums_op.register_fake
def _(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, slots, shards, grad_scale, lr, ratio,
      coefficient, choices, numbers, flags, seed, backend) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = _config(lr, ratio, coefficient, choices, numbers, flags, seed)
    units = sum(unit_count(p.shape, "row") for p in params) if cfg.row else 0
    return (params[0].new_empty((len(params), cfg.sums_width), dtype=torch.float64),
            params[0].new_empty((units,), dtype=torch.float32))


@torch.library.custom_op("fastmask::masked_step_finish", mutates_args=STEP_MUTATES)
def _masked_step_finish_op(
    params: list[torch.Tensor], grads: list[torch.Tensor], steps: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], momentum_buffers: list[torch.Tensor], fishers: list[torch.Tensor],
    stats: torch.Tensor | None, slots: list[int], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
    shards: list[int], sums: torch.Tensor, unit_importance: torch.Tensor, lr: torch.Tensor | None,
    ratio: torch.Tensor | None, coefficient: torch.Tensor | None, choices: str, numbers: list[float],
    flags: list[bool], seed: list[int], backend: str,
) -> None:
    """The reduce and update of one batch from its (all-reduced) pass-1 sums (see ``masked_step_finish``)."""
    batch = _batch(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, stats, slots, shards)
    cfg = _config(lr, ratio, coefficient, choices, numbers, flags, seed)
    implementation("masked_step_finish", backend or None, params[0].device)(batch, cfg, sums, unit_importance,
                                                                             grad_scale, found_inf)


@_masked_step_finish_op.register_fake
def _(*args, **kwargs) -> None:
    return None
