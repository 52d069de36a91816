"""The "triton" backend: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (how CI tests it).

Triton is imported lazily, inside the functions below, so ``import fastmask`` never needs it.
The ``@triton.jit`` kernels live in ``fastmask.kernels`` (the repository's ``kernels/``); their
host side is here: ``step`` (the fused step's tables and launches) and ``units`` (the low-level
ops' launchers); this module registers them, after the working copies and exact-mode unit tables.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ...reference import sampling
from ...reference.philox import split_seed
from ...reference.spec import StepConfig, TensorBatch
from ..native import as_units, exact_unit_weights, working_copies
from ..registry import register, register_probe


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
def triton_masked_step_(batch: TensorBatch, config: StepConfig, grad_scale, found_inf, sums=None,
                        unit_importance=None) -> None:
    """The step; from pass 1's ``sums`` and ``unit_importance`` when given (``masked_step_finish``),
    else it runs pass 1 too."""
    from . import step, units

    work, write_back = working_copies(batch)
    exact_weights = None
    if config.exact:
        seed_lo, seed_hi = split_seed(config.seed)

        def select(s_units: torch.Tensor, count: int, stream: torch.Tensor) -> torch.Tensor:
            keys, noise = units.gumbel_keys(s_units.contiguous(), seed_lo, seed_hi, stream.reshape(1))
            return sampling.top_by_keys(keys, noise, count)

        exact_weights, _ = exact_unit_weights(work, batch, config, grad_scale, select)
    step.launch(batch, work, config, grad_scale, found_inf, exact_weights, sums, unit_importance)
    for original, copy in write_back:
        original.copy_(copy)


@register("masked_step_sums", "triton")
def triton_masked_step_sums(batch: TensorBatch, config: StepConfig, grad_scale) -> tuple[torch.Tensor, torch.Tensor]:
    from . import step

    work, _ = working_copies(batch)
    return step.launch_sums(batch, work, config, grad_scale)


@register("masked_step_finish", "triton")
def triton_masked_step_finish(batch: TensorBatch, config: StepConfig, sums, unit_importance, grad_scale,
                              found_inf) -> None:
    triton_masked_step_(batch, config, grad_scale, found_inf, sums, unit_importance)


@register("fisher_update_", "triton")
def triton_fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float) -> None:
    work = fisher if fisher.is_contiguous() else fisher.contiguous()
    from . import units

    units.fisher_update_(work, grad.contiguous(), beta)
    if work is not fisher:
        fisher.copy_(work)


@register("inclusion_probs", "triton")
def triton_inclusion_probs(
    importance: torch.Tensor, ratio: float, granularity: str, sampling_mode: str, min_prob: float
) -> torch.Tensor:
    s_units = as_units(sampling.unit_sums(importance, granularity))
    from . import units

    pi = units.inclusion_probs_units(s_units, ratio, sampling_mode == "poisson", min_prob)
    return sampling.expand_units(pi, importance.shape, granularity).contiguous()


@register("sample_mask", "triton")
def triton_sample_mask(
    unit_probs: torch.Tensor, seed: int, stream: int | torch.Tensor, shape: torch.Size, granularity: str
) -> torch.Tensor:
    from . import units

    stream_t = units.stream_tensor(stream, unit_probs.device)
    selected = units.bernoulli_select(as_units(unit_probs), *split_seed(seed), stream_t).view(torch.bool)
    return sampling.expand_units(selected, shape, granularity).contiguous()


@register("sample_exact", "triton")
def triton_sample_exact(
    importance: torch.Tensor, count: int, seed: int, stream: int | torch.Tensor, granularity: str
) -> torch.Tensor:
    from . import units

    s_units = as_units(sampling.unit_sums(importance, granularity))
    keys, noise = units.gumbel_keys(s_units, *split_seed(seed), units.stream_tensor(stream, importance.device))
    selected = sampling.top_by_keys(keys, noise, count)
    return sampling.expand_units(selected, importance.shape, granularity).contiguous()


@register("unbiased_rescale", "triton")
def triton_unbiased_rescale(grad: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    from . import units

    return units.unbiased_rescale(grad.contiguous(), mask.contiguous(), probs.contiguous())
