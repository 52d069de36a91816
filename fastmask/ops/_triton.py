"""The "triton" backend: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (how CI tests it).

Triton is imported lazily, on the first call, so ``import fastmask`` never needs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ..reference import sampling
from ._native import as_units
from .dispatch import register, register_probe


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


def kernels(name: str):
    """The kernel module ``fastmask.kernels.<name>`` (imports Triton on first use)."""
    return importlib.import_module(f"fastmask.kernels.{name}")


@register("masked_step_", "triton")
def masked_step_(group, config, grad_scale, found_inf) -> None:
    kernels("masked_step").masked_step_(group, config, grad_scale, found_inf)


@register("fisher_update_", "triton")
def fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float) -> None:
    work = fisher if fisher.is_contiguous() else fisher.contiguous()
    kernels("ops").fisher_update_(work, grad.contiguous(), beta)
    if work is not fisher:
        fisher.copy_(work)


@register("inclusion_probs", "triton")
def inclusion_probs(
    importance: torch.Tensor, ratio: float, granularity: str, sampling_mode: str, min_prob: float
) -> torch.Tensor:
    s_units = as_units(sampling.unit_sums(importance, granularity))
    pi = kernels("ops").inclusion_probs_units(s_units, ratio, sampling_mode == "poisson", min_prob)
    return sampling.expand_units(pi, importance.shape, granularity).contiguous()


@register("sample_mask", "triton")
def sample_mask(
    unit_probs: torch.Tensor, seed: int, stream: int | torch.Tensor, shape: torch.Size, granularity: str
) -> torch.Tensor:
    k = kernels("ops")
    stream_t = k.stream_tensor(stream, unit_probs.device)
    selected = k.bernoulli_select(as_units(unit_probs), *k.split_seed(seed), stream_t).view(torch.bool)
    return sampling.expand_units(selected, shape, granularity).contiguous()


@register("sample_exact", "triton")
def sample_exact(
    importance: torch.Tensor, count: int, seed: int, stream: int | torch.Tensor, granularity: str
) -> torch.Tensor:
    k = kernels("ops")
    s_units = as_units(sampling.unit_sums(importance, granularity))
    keys, noise = k.gumbel_keys(s_units, *k.split_seed(seed), k.stream_tensor(stream, importance.device))
    selected = sampling.top_by_keys(keys, noise, count)
    return sampling.expand_units(selected, importance.shape, granularity).contiguous()


@register("unbiased_rescale", "triton")
def unbiased_rescale(grad: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return kernels("ops").unbiased_rescale(grad.contiguous(), mask.contiguous(), probs.contiguous())
