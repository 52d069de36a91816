"""The fused step's entry points: ``masked_step_`` (a batch of whole tensors) and, for shards
of larger tensors, ``masked_step_sums`` / ``masked_step_finish`` around the caller's all-reduce.
Each checks what it needs to run safely, then calls the chosen backend: directly when eager,
through its ``torch.library`` op (``fastmask.ops.encoding``) when ``torch.compile`` traces it."""

from __future__ import annotations

import torch

from ..backends.registry import implementation
from ..reference.sampling import unit_count
from ..reference.spec import Shard, StepConfig, TensorBatch, check_shardable
from .checks import check_tensor
from .encoding import STEP_MUTATES, config_args, encode_shards, tensor_args


def _check_shard(name: str, shard: object, local_shape: torch.Size) -> None:
    """A shard is a run of whole dim-0 slices of its full tensor."""
    if not isinstance(shard, Shard):
        raise TypeError(f"{name} must be a fastmask.reference.spec.Shard or None, got {type(shard).__name__}")
    full = torch.Size(shard.full_shape)
    if len(local_shape) == 0 or len(full) != len(local_shape) or full[1:] != local_shape[1:]:
        raise ValueError(f"{name}: a local tensor of shape {tuple(local_shape)} is not a dim-0 slice of "
                         f"full_shape {tuple(full)}")
    row = full[1:].numel()
    if not isinstance(shard.offset, int) or shard.offset < 0 or (row and shard.offset % row):
        raise ValueError(f"{name}: offset must be a non-negative multiple of {row} (a row start), got {shard.offset!r}")
    first_row = shard.offset // row if row else 0
    if first_row + local_shape[0] > full[0]:
        raise ValueError(f"{name}: rows [{first_row}, {first_row + local_shape[0]}) exceed full_shape's {full[0]} rows")


def _check_batch(batch: TensorBatch, config: StepConfig, tensors: dict[str, torch.Tensor | None]) -> None:
    """What the step ops check before any write: list lengths, shards, and that each of
    ``tensors`` (AMP and settings) is one element on the batch's device."""
    device = batch.params[0].device
    n = len(batch.params)
    for name in ("grads", "steps", "slots"):
        if len(getattr(batch, name)) != n:
            raise ValueError(f"batch.{name} has {len(getattr(batch, name))} entries for {n} params")
    for name in ("exp_avgs", "exp_avg_sqs", "momentum_buffers", "fishers", "shards"):
        if len(getattr(batch, name)) not in (0, n):
            raise ValueError(f"batch.{name} has {len(getattr(batch, name))} entries for {n} params")
    for i, shard in enumerate(batch.shards):
        if shard is not None:
            _check_shard(f"batch.shards[{i}]", shard, batch.params[i].shape)
    check_shardable(batch, config)
    settings = {"config.ratio": config.ratio, "config.coefficient": config.coefficient}
    for name, value in {**tensors, **settings}.items():
        if not isinstance(value, torch.Tensor):
            continue  # absent, or a float setting
        check_tensor(name, value, dtypes=(torch.float32,) if name.startswith("config.") else None, device=device)
        if value.numel() != 1:
            raise ValueError(f"{name} must have exactly one element, got shape {tuple(value.shape)}")


def masked_step_(
    batch: TensorBatch,
    config: StepConfig,
    *,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """The fused optimizer step on one (device, dtype) batch of whole tensors; in place.

    The optimizers call this after validating their groups; it checks only what it needs to
    run safely (lengths, devices). ``config.ratio`` / ``config.coefficient`` may be
    one-element fp32 tensors on the batch's device, read by the kernels from memory.
    Semantics: ``fastmask.reference.step``. A batch of shards of larger tensors is stepped
    by ``masked_step_sums``, an all-reduce of its sums, then ``masked_step_finish``.
    """
    if not batch.params:
        return
    _check_batch(batch, config, {"grad_scale": grad_scale, "found_inf": found_inf})
    if any(batch.shards):
        raise ValueError("batch has shards of larger tensors: step it with masked_step_sums, an all-reduce of "
                         "the sums over the shards, then masked_step_finish")
    if torch.compiler.is_compiling():
        torch.ops.fastmask.masked_step_(*tensor_args(batch), grad_scale, found_inf, *config_args(config, backend))
    else:
        implementation("masked_step_", backend, batch.params[0].device)(batch, config, grad_scale, found_inf)
        _mutated(batch)


def masked_step_sums(
    batch: TensorBatch, config: StepConfig, *, grad_scale: torch.Tensor | None = None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 of the fused step on one batch; writes nothing.

    Returns (sums, unit_importance): sums is float64 [T, config.sums_width] on the batch's
    device, per tensor the sum of its unit importances s_u, sum g, sum g^2 and its count of
    non-finite grads (g unscaled by ``grad_scale``), then with water-filling
    (sampling="poisson") the histogram of its s_u (exact counts in 2048 bins, see
    ``fastmask.reference.sampling.water_level``); unit_importance is the backend's fp32 per-row s_u for
    row granularity (empty for elements), which ``masked_step_finish`` reads. For a batch of
    shards, all-reduce (sum) ``sums`` over the shards of each tensor, then call
    ``masked_step_finish``: S, the GE std, the non-finite skip and the water level are then the
    full tensor's.
    """
    if not batch.params:
        raise ValueError("batch has no params")
    _check_batch(batch, config, {"grad_scale": grad_scale})
    if not torch.compiler.is_compiling():
        return implementation("masked_step_sums", backend, batch.params[0].device)(batch, config, grad_scale)
    tensors = tensor_args(batch)
    return torch.ops.fastmask.masked_step_sums(*tensors[:7], tensors[8], encode_shards(batch.shards), grad_scale,
                                               *config_args(config, backend))


def masked_step_finish(
    batch: TensorBatch,
    config: StepConfig,
    sums: torch.Tensor,
    unit_importance: torch.Tensor,
    *,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """The rest of the fused step after ``masked_step_sums``: the per-tensor reduce from
    ``sums`` (float64 [T, config.sums_width], all-reduced over shards) and the update; in place.
    ``unit_importance``, ``grad_scale`` and ``backend`` must be those of the sums call."""
    if not batch.params:
        return
    _check_batch(batch, config, {"grad_scale": grad_scale, "found_inf": found_inf})
    device = batch.params[0].device
    check_tensor("sums", sums, dtypes=(torch.float64,), device=device, shape=(len(batch), config.sums_width))
    check_tensor("unit_importance", unit_importance, dtypes=(torch.float32,), device=device)
    units = sum(unit_count(p.shape, "row") for p in batch.params) if config.row else 0
    if unit_importance.shape != (units,):
        raise ValueError(f"unit_importance must have shape ({units},) (masked_step_sums's), got "
                         f"{tuple(unit_importance.shape)}")
    if torch.compiler.is_compiling():
        torch.ops.fastmask.masked_step_finish(*tensor_args(batch), grad_scale, found_inf,
                                              encode_shards(batch.shards), sums, unit_importance,
                                              *config_args(config, backend))
    else:
        implementation("masked_step_finish", backend, device)(batch, config, sums, unit_importance, grad_scale,
                                                              found_inf)
        _mutated(batch)


def _mutated(batch: TensorBatch) -> None:
    """Eager calls skip the ops' dispatch (about 0.12 ms per call, ten times a small batch's step),
    so the tensors a step writes through raw pointers get their autograd version bumped here, as
    the op's mutation annotations would do."""
    written = [t for name in STEP_MUTATES[:-1] for t in getattr(batch, name)]  # all but "stats"
    torch.autograd.graph.increment_version(written + ([batch.stats] if batch.stats is not None else []))
