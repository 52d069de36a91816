"""The "cpp" backend: ``csrc/cpu`` compiled on first use (cached), or at install.

``pip install`` never compiles unless asked (``FASTMASK_BUILD_EXT=1``, with
``--no-build-isolation`` so that the installed torch is used); otherwise the first
call that needs the backend compiles it with ``torch.utils.cpp_extension.load``
into torch's extension cache (``TORCH_EXTENSIONS_DIR``), reused by later runs. If
it cannot be built, the backend reports why (``fastmask info``), an explicit
``backend="cpp"`` raises with that reason, and auto-selection warns once and uses
the torch backend. ``FASTMASK_DISABLE_CPP=1`` turns it off.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from ..reference import sampling
from ..reference.spec import StepConfig
from .native import JitExtension, NativeStep, as_units, unit_level
from .registry import register, register_probe

# -ffp-contract=off: no fused multiply-adds, so every operation rounds as the reference's.
# -fno-math-errno / -fno-trapping-math let sqrt and division vectorise and be if-converted;
# results are unchanged (IEEE either way; no FP traps are enabled).
BUILD_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]

SOURCES = ["cpu/masked_step.cpp", "cpu/water_level.cpp", "cpu/units.cpp"]  # under csrc/, with their headers
EXTENSION = JitExtension("fastmask_cpp", "fastmask._cpp", SOURCES, extra_cflags=BUILD_FLAGS, extra_ldflags=["-fopenmp"])


def rng_variant(path: str, cap_at_avx2: bool = False) -> JitExtension:
    """The extension built with one Philox loop whatever this CPU has ("portable", "avx2" or
    "avx512"; ``rng_path()`` says which it compiled), and with ``cap_at_avx2`` no AVX-512
    anywhere (what an AVX2 machine compiles): for the tests that hold the loops to the same bits
    and the bench that times them side by side. Each runs only on a CPU with its instructions."""
    loops = {"portable": ["-DFASTMASK_PORTABLE_RNG"], "avx2": ["-mavx2", "-mno-avx512f"],
             "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]}
    if path not in loops:
        raise ValueError(f"path must be one of {list(loops)}, got {path!r}")
    flags = loops[path]
    if cap_at_avx2:
        if path == "avx512":
            raise ValueError("the avx512 loop cannot be capped at AVX2")
        flags = [*flags, "-mavx2", "-mno-avx512f"]
    name = f"fastmask_cpp_{path}_rng" + ("_avx2_isa" if cap_at_avx2 and path != "avx2" else "")
    return JitExtension(name, f"fastmask._{name.removeprefix('fastmask_')}", SOURCES,
                        extra_cflags=[*BUILD_FLAGS, *flags], extra_ldflags=["-fopenmp"])


def _probe(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the cpp backend runs CPU tensors (CUDA tensors: triton or cuda)"
    if os.environ.get("FASTMASK_DISABLE_CPP") == "1":
        return "disabled by FASTMASK_DISABLE_CPP=1"
    if EXTENSION.module() is None:
        return EXTENSION.error
    return None


register_probe("cpp", _probe)


def _ext() -> ModuleType:
    module = EXTENSION.module()
    assert module is not None, "dispatch only selects cpp after a successful build"
    return module


def cpp_water_levels(sums: torch.Tensor, cfg: StepConfig, module: ModuleType | None = None) -> torch.Tensor:
    """The water levels by the extension's copy of ``sampling.water_level`` (bit-identical);
    ``module``: another build of the extension (``rng_variant``), default the backend's."""
    _, x, a, c = sampling.level_events(cfg.min_prob, sums.device)
    return (module or _ext()).water_levels(sums, float(cfg.ratio), cfg.min_prob, x, a, c)


# the fused step: the extension's binding, one call per batch (water levels solved inside it)
STEP = NativeStep(_ext, settings_in_memory=False)
register("masked_step_", "cpp")(STEP.masked_step_)
register("masked_step_sums", "cpp")(STEP.masked_step_sums)
register("masked_step_finish", "cpp")(STEP.masked_step_finish)


@register("fisher_update_", "cpp")
def cpp_fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float) -> None:
    work = fisher if fisher.is_contiguous() else fisher.contiguous()
    _ext().fisher_update(work, grad.contiguous(), beta)
    if work is not fisher:
        fisher.copy_(work)


@register("inclusion_probs", "cpp")
def cpp_inclusion_probs(importance, ratio, granularity, sampling_mode, min_prob) -> torch.Tensor:
    s_units = as_units(sampling.unit_sums(importance, granularity))
    x, p0, degenerate = unit_level(s_units, ratio, sampling_mode, min_prob)
    pi = _ext().inclusion_probs(s_units, ratio, sampling_mode == "poisson", min_prob, x, p0, degenerate)
    return sampling.expand_units(pi, importance.shape, granularity).contiguous()


@register("sample_mask", "cpp")
def cpp_sample_mask(unit_probs, seed, stream, shape, granularity) -> torch.Tensor:
    selected = _ext().bernoulli_select(as_units(unit_probs), seed, int(stream))
    return sampling.expand_units(selected, shape, granularity).contiguous()


@register("sample_exact", "cpp")
def cpp_sample_exact(importance, count, seed, stream, granularity) -> torch.Tensor:
    s_units = sampling.unit_sums(importance, granularity)
    selected = sampling.exact_select(s_units, count, seed, stream)
    return sampling.expand_units(selected, importance.shape, granularity).contiguous()


@register("unbiased_rescale", "cpp")
def cpp_unbiased_rescale(grad, mask, probs) -> torch.Tensor:
    return _ext().unbiased_rescale(grad.contiguous(), mask.contiguous(), as_units(probs))
