"""The "cuda" backend: ``csrc/cuda`` (multi-tensor CUDA kernels) compiled on first use.

Needs a CUDA build of torch and nvcc (CUDA_HOME); built for the GPUs it finds (Hopper:
sm_90), with ``--fmad=false`` so that every operation rounds as the reference's. If it
cannot be built, ``backend="cuda"`` raises with the reason and auto picks triton.
"""

from __future__ import annotations

import torch

from ..reference.spec import StepConfig, TensorGroup
from .native import JitExtension, native_masked_step_, native_masked_step_sums, reference_select
from .registry import register, register_probe

EXTENSION = JitExtension(
    "fastmask_cuda",
    None,  # setup.py prebuilds only the cpp extension: a CUDA build needs nvcc and a CUDA torch at install
    ["cuda/masked_step.cpp", "cuda/masked_step_kernels.cu"],
    extra_cflags=["-O3"],
    extra_cuda_cflags=["-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true"],
)


def _probe(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the cuda backend runs CUDA tensors"
    if torch.version.cuda is None:
        return "this build of torch has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME)"
    if EXTENSION.module() is None:
        return EXTENSION.error
    return None


register_probe("cuda", _probe)


def _ext():
    module = EXTENSION.module()
    assert module is not None, "dispatch only selects cuda after a successful build"
    return module


@register("masked_step_", "cuda")
def cuda_masked_step_(group: TensorGroup, cfg: StepConfig, grad_scale, found_inf) -> None:
    native_masked_step_(_ext(), group, cfg, grad_scale, found_inf, reference_select(cfg.seed), settings_in_memory=True,
                        levels_in_kernel=True)


@register("masked_step_sums", "cuda")
def cuda_masked_step_sums(group: TensorGroup, cfg: StepConfig, grad_scale) -> tuple[torch.Tensor, torch.Tensor]:
    return native_masked_step_sums(_ext(), group, cfg, grad_scale, settings_in_memory=True)


@register("masked_step_finish", "cuda")
def cuda_masked_step_finish(group: TensorGroup, cfg: StepConfig, sums, unit_importance, grad_scale, found_inf) -> None:
    native_masked_step_(_ext(), group, cfg, grad_scale, found_inf, reference_select(cfg.seed), settings_in_memory=True,
                        sums=sums, unit_importance=unit_importance, levels_in_kernel=True)
