"""The "torch" backend: the reference implementations, registered for every op."""

from __future__ import annotations

import torch

from ..reference import sampling
from ..reference import step
from .registry import register

register("masked_step_", "torch")(step.masked_step_)
register("masked_step_sums", "torch")(step.masked_step_sums)
register("masked_step_finish", "torch")(step.masked_step_finish)


@register("fisher_update_", "torch")
def torch_fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float) -> None:
    fisher.copy_(sampling.fisher_update(fisher, grad.to(torch.float32), beta))


@register("inclusion_probs", "torch")
def torch_inclusion_probs(
    importance: torch.Tensor, ratio: float, granularity: str, sampling_mode: str, min_prob: float
) -> torch.Tensor:
    s_units = sampling.unit_sums(importance, granularity)
    pi = sampling.inclusion_probs_units(s_units, ratio, sampling_mode, min_prob)
    return sampling.expand_units(pi, importance.shape, granularity).contiguous()


@register("sample_mask", "torch")
def torch_sample_mask(
    unit_probs: torch.Tensor, seed: int, stream: int | torch.Tensor, shape: torch.Size, granularity: str
) -> torch.Tensor:
    selected = sampling.bernoulli_select(unit_probs, seed, stream)
    return sampling.expand_units(selected, shape, granularity).contiguous()


@register("sample_exact", "torch")
def torch_sample_exact(
    importance: torch.Tensor, k: int, seed: int, stream: int | torch.Tensor, granularity: str
) -> torch.Tensor:
    s_units = sampling.unit_sums(importance, granularity)
    selected = sampling.exact_select(s_units, k, seed, stream)
    return sampling.expand_units(selected, importance.shape, granularity).contiguous()


@register("unbiased_rescale", "torch")
def torch_unbiased_rescale(grad: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    g = grad.to(torch.float32)
    out = torch.where(mask, g / probs.to(torch.float32), torch.zeros((), device=g.device))
    return out.to(grad.dtype)
