"""Low-level ops: importance, inclusion probabilities, sampling, rescaling, the fused step.

Each op is defined here once: it validates its inputs (errors name the argument), then runs
on the backend chosen by ``fastmask.backends.registry`` (``backend=`` argument, else
``FASTMASK_BACKEND``, else auto); the fused step's three ops are ``torch.library`` ops.
Units are elements, or dim-0 slices with ``granularity="row"``; a unit's random number is
U(seed, stream, unit index), the counter RNG of DESIGN §4, so masks agree across backends
and devices.
"""

from __future__ import annotations

import torch

from ..reference.sampling import unit_count
from ..reference.spec import GRANULARITIES, Shard, StepConfig, TensorGroup, check_shardable
from .. import backends  # noqa: F401  (registers every backend's implementations)
from ..backends.registry import BACKENDS, BackendUnavailableError, backend_report, implementation, resolve
from .checks import check_choice, check_int, check_real, check_stream, check_tensor

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend_report",
    "fisher_update_",
    "inclusion_probs",
    "masked_step_",
    "masked_step_finish",
    "masked_step_sums",
    "resolve",
    "sample_exact",
    "sample_mask",
    "unbiased_rescale",
]


def fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float, *, backend: str | None = None) -> torch.Tensor:
    """In place: ``fisher = beta * fisher + (1 - beta) * grad**2``; returns ``fisher``.

    fisher: fp32, any shape. grad: fp32/bf16/fp16, same shape and device.
    beta: in [0, 1).
    """
    check_tensor("fisher", fisher, dtypes=(torch.float32,))
    check_tensor("grad", grad, device=fisher.device, shape=fisher.shape)
    beta = check_real("beta", beta, 0.0, 1.0, high_open=True)
    implementation("fisher_update_", backend, fisher.device)(fisher, grad, beta)
    return fisher


def inclusion_probs(
    importance: torch.Tensor,
    ratio: float,
    *,
    granularity: str = "element",
    sampling: str = "poisson",
    min_prob: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-unit inclusion probabilities pi, broadcast to ``importance``'s shape (fp32).

    poisson (water-filling): pi_u = clamp(q_u / tau, min_prob, 1), q_u = s_u rounded down to
    4 significant bits, with tau chosen so that sum_u pi_u = k = ratio * N (units above the
    level are capped at 1 and their excess goes to the others; see
    ``fastmask.reference.sampling.water_level`` for the edge cases); pi_u = ratio if S = sum of
    s_u is 0 or not finite. uniform: pi_u = ratio. ratio == 1 gives 1 everywhere.
    importance: non-negative fp32/bf16/fp16; ratio in (0, 1]; min_prob in [0, 1].
    """
    check_tensor("importance", importance)
    ratio = check_real("ratio", ratio, 0.0, 1.0, low_open=True)
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("sampling", sampling, ("poisson", "uniform"))
    min_prob = check_real("min_prob", min_prob, 0.0, 1.0)
    if bool((importance < 0).any()):
        raise ValueError("importance must be non-negative")
    fn = implementation("inclusion_probs", backend, importance.device)
    return fn(importance, ratio, granularity, sampling, min_prob)


def _row_units(name: str, values: torch.Tensor, granularity: str) -> torch.Tensor:
    """Per-unit values of a per-element tensor that is constant within each unit."""
    if granularity == "element" or values.dim() == 0:
        return values.reshape(-1)
    rows = values.reshape(values.shape[0], -1)
    if rows.shape[1] == 0:
        return values.new_zeros(values.shape[0])
    if bool((rows != rows[:, :1]).any()):
        raise ValueError(f"{name} must be constant within each dim-0 slice for granularity='row'")
    return rows[:, 0].contiguous()


def sample_mask(
    probs: torch.Tensor,
    *,
    seed: int,
    stream: int | torch.Tensor = 0,
    granularity: str = "element",
    backend: str | None = None,
) -> torch.Tensor:
    """Bool mask of ``probs``'s shape: unit u selected iff U(seed, stream, u) < probs[u].

    probs: fp32/bf16/fp16 in [0, 1] (for rows, constant within each dim-0 slice,
    as ``inclusion_probs`` returns). seed: int in [0, 2^64). stream: int in
    [0, 2^63) or a 0-d int64 tensor.
    """
    check_tensor("probs", probs)
    seed = check_int("seed", seed, 0, 2**64)
    stream = check_stream("stream", stream)
    check_choice("granularity", granularity, GRANULARITIES)
    if bool(((probs < 0) | (probs > 1) | probs.isnan()).any()):
        raise ValueError("probs must be in [0, 1]")
    units = _row_units("probs", probs.to(torch.float32), granularity)
    fn = implementation("sample_mask", backend, probs.device)
    return fn(units, seed, stream, probs.shape, granularity)


def sample_exact(
    importance: torch.Tensor,
    k: int,
    *,
    seed: int,
    stream: int | torch.Tensor = 0,
    granularity: str = "element",
    backend: str | None = None,
) -> torch.Tensor:
    """Bool mask with exactly ``k`` units selected without replacement, weights s.

    Same distribution as ``torch.multinomial(s, k, replacement=False)``, drawn as
    Gumbel-top-k on the counter RNG: key_u = log s_u - log(-log U_u). Uniform
    weights when S is 0 or not finite. importance: non-negative; k in [0, N].
    """
    check_tensor("importance", importance)
    check_choice("granularity", granularity, GRANULARITIES)
    k = check_int("k", k, 0, unit_count(importance.shape, granularity) + 1)
    seed = check_int("seed", seed, 0, 2**64)
    stream = check_stream("stream", stream)
    if bool((importance < 0).any()):
        raise ValueError("importance must be non-negative")
    fn = implementation("sample_exact", backend, importance.device)
    return fn(importance, k, seed, stream, granularity)


def unbiased_rescale(
    grad: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Horvitz-Thompson rescale: ``grad * mask / probs``, 0 where ``mask`` is False.

    grad: fp32/bf16/fp16; mask: bool of the same shape; probs: same shape,
    > 0 wherever mask is True. Returns a new tensor in grad's dtype (fp32 math).
    """
    check_tensor("grad", grad)
    check_tensor("mask", mask, dtypes=(torch.bool,), device=grad.device, shape=grad.shape)
    check_tensor("probs", probs, device=grad.device, shape=grad.shape)
    if bool(((probs <= 0) & mask).any()):
        raise ValueError("probs must be > 0 wherever mask is True")
    return implementation("unbiased_rescale", backend, grad.device)(grad, mask, probs)


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


def _check_batch(group: TensorGroup, config: StepConfig, tensors: dict[str, torch.Tensor | None]) -> None:
    """What the step ops check before any write: list lengths, shards, and that each of
    ``tensors`` (AMP and settings) is one element on the batch's device."""
    device = group.params[0].device
    n = len(group.params)
    for name in ("grads", "steps", "slots"):
        if len(getattr(group, name)) != n:
            raise ValueError(f"group.{name} has {len(getattr(group, name))} entries for {n} params")
    for name in ("exp_avgs", "exp_avg_sqs", "momentum_buffers", "fishers", "shards"):
        if len(getattr(group, name)) not in (0, n):
            raise ValueError(f"group.{name} has {len(getattr(group, name))} entries for {n} params")
    for i, shard in enumerate(group.shards):
        if shard is not None:
            _check_shard(f"group.shards[{i}]", shard, group.params[i].shape)
    check_shardable(group, config)
    settings = {"config.ratio": config.ratio, "config.coefficient": config.coefficient}
    for name, value in {**tensors, **settings}.items():
        if not isinstance(value, torch.Tensor):
            continue  # absent, or a float setting
        check_tensor(name, value, dtypes=(torch.float32,) if name.startswith("config.") else None, device=device)
        if value.numel() != 1:
            raise ValueError(f"{name} must have exactly one element, got shape {tuple(value.shape)}")


def masked_step_(
    group: TensorGroup,
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
    if not group.params:
        return
    _check_batch(group, config, {"grad_scale": grad_scale, "found_inf": found_inf})
    if any(group.shards):
        raise ValueError("group has shards of larger tensors: step it with masked_step_sums, an all-reduce of "
                         "the sums over the shards, then masked_step_finish")
    if torch.compiler.is_compiling():
        torch.ops.fastmask.masked_step_(*_tensor_args(group), grad_scale, found_inf, *_config_args(config, backend))
    else:
        implementation("masked_step_", backend, group.params[0].device)(group, config, grad_scale, found_inf)
        _mutated(group)


def masked_step_sums(
    group: TensorGroup, config: StepConfig, *, grad_scale: torch.Tensor | None = None, backend: str | None = None
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
    if not group.params:
        raise ValueError("group has no params")
    _check_batch(group, config, {"grad_scale": grad_scale})
    if not torch.compiler.is_compiling():
        return implementation("masked_step_sums", backend, group.params[0].device)(group, config, grad_scale)
    tensors = _tensor_args(group)
    return torch.ops.fastmask.masked_step_sums(*tensors[:7], tensors[8], _encode_shards(group.shards), grad_scale,
                                               *_config_args(config, backend))


def masked_step_finish(
    group: TensorGroup,
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
    if not group.params:
        return
    _check_batch(group, config, {"grad_scale": grad_scale, "found_inf": found_inf})
    device = group.params[0].device
    check_tensor("sums", sums, dtypes=(torch.float64,), device=device, shape=(len(group), config.sums_width))
    check_tensor("unit_importance", unit_importance, dtypes=(torch.float32,), device=device)
    units = sum(unit_count(p.shape, "row") for p in group.params) if config.granularity == "row" else 0
    if unit_importance.shape != (units,):
        raise ValueError(f"unit_importance must have shape ({units},) (masked_step_sums's), got "
                         f"{tuple(unit_importance.shape)}")
    if torch.compiler.is_compiling():
        torch.ops.fastmask.masked_step_finish(*_tensor_args(group), grad_scale, found_inf,
                                              _encode_shards(group.shards), sums, unit_importance,
                                              *_config_args(config, backend))
    else:
        implementation("masked_step_finish", backend, device)(group, config, sums, unit_importance, grad_scale,
                                                              found_inf)
        _mutated(group)


def _mutated(group: TensorGroup) -> None:
    """Eager calls skip the ops' dispatch (about 0.12 ms per call, ten times a small batch's step),
    so the tensors a step writes through raw pointers get their autograd version bumped here, as
    the op's mutation annotations would do."""
    written = [t for name in STEP_MUTATES[:-1] for t in getattr(group, name)]  # all but "stats"
    torch.autograd.graph.increment_version(written + ([group.stats] if group.stats is not None else []))


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


def _tensor_args(group: TensorGroup) -> tuple:
    return (group.params, group.grads, group.steps, group.exp_avgs, group.exp_avg_sqs, group.momentum_buffers,
            group.fishers, group.stats, list(group.slots))


def _config_args(config: StepConfig, backend: str | None) -> tuple:
    lr, ratio, coefficient = (value if isinstance(value, torch.Tensor) else None
                              for value in (config.lr, config.ratio, config.coefficient))
    return (lr, ratio, coefficient, ",".join(getattr(config, name) for name in CHOICES),
            [_number(getattr(config, name)) for name in NUMBERS], [getattr(config, name) for name in FLAGS],
            [config.seed & 0xFFFFFFFF, config.seed >> 32], backend or "")


def _encode_shards(shards: list[Shard | None]) -> list[int]:
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
           shards: list[int]) -> TensorGroup:
    return TensorGroup(list(params), list(grads), list(steps), list(slots), list(exp_avgs), list(exp_avg_sqs),
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
    group = _batch(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, stats, slots, [])
    cfg = _config(lr, ratio, coefficient, choices, numbers, flags, seed)
    implementation("masked_step_", backend or None, params[0].device)(group, cfg, grad_scale, found_inf)


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
    group = _batch(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, None, slots, shards)
    cfg = _config(lr, ratio, coefficient, choices, numbers, flags, seed)
    return implementation("masked_step_sums", backend or None, params[0].device)(group, cfg, grad_scale)


@_masked_step_sums_op.register_fake
def _(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, slots, shards, grad_scale, lr, ratio,
      coefficient, choices, numbers, flags, seed, backend) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = _config(lr, ratio, coefficient, choices, numbers, flags, seed)
    units = sum(unit_count(p.shape, "row") for p in params) if cfg.granularity == "row" else 0
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
    group = _batch(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, stats, slots, shards)
    cfg = _config(lr, ratio, coefficient, choices, numbers, flags, seed)
    implementation("masked_step_finish", backend or None, params[0].device)(group, cfg, sums, unit_importance,
                                                                             grad_scale, found_inf)


@_masked_step_finish_op.register_fake
def _(*args, **kwargs) -> None:
    return None
