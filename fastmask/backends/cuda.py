"""The "cuda" backend: ``csrc/cuda`` (multi-tensor CUDA kernels) compiled on first use.

Needs a CUDA build of torch and nvcc (CUDA_HOME); built for the GPUs it finds (Hopper:
sm_90), with ``--fmad=false`` so that every operation rounds as the reference's. If it
cannot be built, ``backend="cuda"`` raises with the reason and auto picks triton.
"""

from __future__ import annotations

import torch

from .native import JitExtension, NativeStep
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


# the fused step: the extension's binding, one call per batch (settings read from device memory)
STEP = NativeStep(_ext, settings_in_memory=True)
register("masked_step_", "cuda")(STEP.masked_step_)
register("masked_step_sums", "cuda")(STEP.masked_step_sums)
register("masked_step_finish", "cuda")(STEP.masked_step_finish)
