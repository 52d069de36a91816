"""The "triton" backend: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (how CI tests it).

Triton is imported lazily, inside the functions below, so ``import fastmask`` never needs it.
The kernels and their launchers live in ``fastmask.kernels`` (the repository's ``kernels/``);
the host-side preparation (working copies, exact-mode unit tables) is here.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..reference import sampling
from ..reference.spec import StepConfig, TensorGroup
from .native import as_units, exact_unit_weights, working_copies
from .registry import register, register_probe


def _probe(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'fastmask[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"Triton does not run on {device.type} tensors"


register_probe("triton", _probe)


@register("masked_step_", "triton")
def masked_step_(group: TensorGroup, config: StepConfig, grad_scale, found_inf) -> None:
    _step(group, config, grad_scale, found_inf, None, None)


@register("masked_step_sums", "triton")
def masked_step_sums(group: TensorGroup, config: StepConfig, grad_scale) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import masked_step

    work, _ = working_copies(group)
    return masked_step.launch_sums(group, work, config, grad_scale)


@register("masked_step_finish", "triton")
def masked_step_finish(group: TensorGroup, config: StepConfig, sums, unit_importance, grad_scale, found_inf) -> None:
    _step(group, config, grad_scale, found_inf, sums, unit_importance)


def _step(group: TensorGroup, config: StepConfig, grad_scale, found_inf, sums, unit_importance) -> None:
    """The step; from pass 1's ``sums`` and ``unit_importance`` when given (else it runs pass 1)."""
    from ..kernels import masked_step, ops

    work, write_back = working_copies(group)
    exact_weights = None
    if config.is_masked and config.sampling == "exact":
        seed_lo, seed_hi = config.seed & 0xFFFFFFFF, config.seed >> 32

        def select(s_units: torch.Tensor, count: int, stream: torch.Tensor) -> torch.Tensor:
            keys, noise = ops.gumbel_keys(s_units.contiguous(), seed_lo, seed_hi, stream.reshape(1))
            return sampling.top_by_keys(keys, noise, count)

        exact_weights, _ = exact_unit_weights(work, group, config, grad_scale, select)
    masked_step.launch(group, work, config, grad_scale, found_inf, exact_weights, sums, unit_importance)
    for original, copy in write_back:
        original.copy_(copy)


@register("fisher_update_", "triton")
def fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float) -> None:
    work = fisher if fisher.is_contiguous() else fisher.contiguous()
    from ..kernels import ops

    ops.fisher_update_(work, grad.contiguous(), beta)
    if work is not fisher:
        fisher.copy_(work)


@register("inclusion_probs", "triton")
def inclusion_probs(
    importance: torch.Tensor, ratio: float, granularity: str, sampling_mode: str, min_prob: float
) -> torch.Tensor:
    s_units = as_units(sampling.unit_sums(importance, granularity))
    from ..kernels import ops

    pi = ops.inclusion_probs_units(s_units, ratio, sampling_mode == "poisson", min_prob)
    return sampling.expand_units(pi, importance.shape, granularity).contiguous()


@register("sample_mask", "triton")
def sample_mask(
    unit_probs: torch.Tensor, seed: int, stream: int | torch.Tensor, shape: torch.Size, granularity: str
) -> torch.Tensor:
    from ..kernels import ops

    stream_t = ops.stream_tensor(stream, unit_probs.device)
    selected = ops.bernoulli_select(as_units(unit_probs), *ops.split_seed(seed), stream_t).view(torch.bool)
    return sampling.expand_units(selected, shape, granularity).contiguous()


@register("sample_exact", "triton")
def sample_exact(
    importance: torch.Tensor, count: int, seed: int, stream: int | torch.Tensor, granularity: str
) -> torch.Tensor:
    from ..kernels import ops

    s_units = as_units(sampling.unit_sums(importance, granularity))
    keys, noise = ops.gumbel_keys(s_units, *ops.split_seed(seed), ops.stream_tensor(stream, importance.device))
    selected = sampling.top_by_keys(keys, noise, count)
    return sampling.expand_units(selected, importance.shape, granularity).contiguous()


@register("unbiased_rescale", "triton")
def unbiased_rescale(grad: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    from ..kernels import ops

    return ops.unbiased_rescale(grad.contiguous(), mask.contiguous(), probs.contiguous())
