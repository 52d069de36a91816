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

import importlib
import importlib.util
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..reference import sampling
from ..reference.spec import StepConfig, TensorGroup
from ._batch import exact_unit_weights, working_copies
from .dispatch import register, register_probe

# -ffp-contract=off: no fused multiply-adds, so every operation rounds as the reference's.
# -fno-math-errno / -fno-trapping-math let sqrt and division vectorise and be if-converted;
# results are unchanged (IEEE either way; no FP traps are enabled).
BUILD_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def csrc_dir() -> Path:
    spec = importlib.util.find_spec("fastmask.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fastmask's C++ sources (fastmask.csrc) are not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _build() -> ModuleType:
    try:
        return importlib.import_module("fastmask._cpp")  # built at install (FASTMASK_BUILD_EXT=1)
    except ImportError:
        pass
    from torch.utils.cpp_extension import load

    return load(
        name="fastmask_cpp",
        sources=[str(csrc_dir() / "cpu" / "masked_step.cpp")],
        extra_cflags=BUILD_FLAGS,
        extra_ldflags=["-fopenmp"],
        verbose=os.environ.get("FASTMASK_VERBOSE_BUILD") == "1",
    )


def extension() -> ModuleType | None:
    """The compiled module, building it on first call; None if it cannot be built."""
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
            except Exception as exc:  # any build failure is reported, never hidden
                _state["module"] = None
                lines = [line for line in str(exc).strip().splitlines() if line.strip()]
                _state["error"] = f"build failed ({type(exc).__name__}: {lines[-1] if lines else exc})"
                warnings.warn(
                    f"fastmask: the cpp backend could not be built: {_state['error']}; CPU tensors use the "
                    "torch backend (set FASTMASK_VERBOSE_BUILD=1 for the compiler output)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _state["module"]  # type: ignore[return-value]


def _probe(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the cpp backend runs CPU tensors (CUDA tensors: triton or cuda)"
    if os.environ.get("FASTMASK_DISABLE_CPP") == "1":
        return "disabled by FASTMASK_DISABLE_CPP=1"
    if extension() is None:
        return str(_state["error"])
    return None


register_probe("cpp", _probe)


def _ext() -> ModuleType:
    module = extension()
    assert module is not None, "dispatch only selects cpp after a successful build"
    return module


def _reference_select(seed: int):
    def select(s_units: torch.Tensor, count: int, stream: torch.Tensor) -> torch.Tensor:
        return sampling.exact_select(s_units, count, seed, stream)

    return select


def step_config_dict(cfg: StepConfig) -> dict:
    """The StepConfig as the flat dict the native step functions read."""
    exact = cfg.is_masked and cfg.sampling == "exact"
    return dict(
        base={"sgd": 0, "adam": 1, "adamw": 2}[cfg.base],
        rescale=0 if not cfg.unbiased else (1 if cfg.rescale == "ht" else 2),
        lr=0.0 if isinstance(cfg.lr, torch.Tensor) else float(cfg.lr),
        momentum=cfg.momentum, dampening=cfg.dampening, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, ratio=cfg.ratio, min_prob=cfg.min_prob, fisher_beta=cfg.fisher_beta,
        grad_coefficient=cfg.coefficient if cfg.modulate == "grad" else 1.0, update_coefficient=cfg.coefficient,
        nesterov=cfg.nesterov, maximize=cfg.maximize, masked=cfg.is_masked, poisson=cfg.sampling == "poisson",
        ema=False, row=cfg.granularity == "row",  # ema: set from the batch (fishers are kept)
        freeze=cfg.masked == "freeze", ge=cfg.ge_noise, modulate_update=cfg.modulate == "update" and cfg.coefficient != 1.0,
        exact=exact, seed=cfg.seed,
    )


@register("masked_step_", "cpp")
def masked_step_(group: TensorGroup, cfg: StepConfig, grad_scale, found_inf) -> None:
    work, write_back = working_copies(group)
    p_dtype = work["params"][0].dtype
    if any(g.dtype not in (p_dtype, torch.float32) for g in work["grads"]):  # the kernel's dtype pairs
        work["grads"] = [g.to(torch.float32) for g in work["grads"]]
    config = step_config_dict(cfg)
    config["ema"] = bool(work["fishers"])
    unit_weight, offsets = None, []
    if config["exact"]:
        unit_weight, offsets = exact_unit_weights(work, group, cfg, grad_scale, _reference_select(cfg.seed))
    lr = cfg.lr.to(torch.float32) if isinstance(cfg.lr, torch.Tensor) else None
    _ext().masked_step(
        work["params"], work["grads"], group.steps, work["exp_avgs"], work["exp_avg_sqs"],
        work["momentum_buffers"], work["fishers"], group.slots, config, lr, grad_scale, found_inf, unit_weight,
        offsets, group.stats,
    )
    for original, copy in write_back:
        original.copy_(copy)


def _units(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float32).contiguous()


@register("fisher_update_", "cpp")
def fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float) -> None:
    work = fisher if fisher.is_contiguous() else fisher.contiguous()
    _ext().fisher_update(work, grad.contiguous(), beta)
    if work is not fisher:
        fisher.copy_(work)


@register("inclusion_probs", "cpp")
def inclusion_probs(importance, ratio, granularity, sampling_mode, min_prob) -> torch.Tensor:
    s_units = _units(sampling.unit_sums(importance, granularity))
    pi = _ext().inclusion_probs(s_units, ratio, sampling_mode == "poisson", min_prob)
    return sampling.expand_units(pi, importance.shape, granularity).contiguous()


@register("sample_mask", "cpp")
def sample_mask(unit_probs, seed, stream, shape, granularity) -> torch.Tensor:
    selected = _ext().bernoulli_select(_units(unit_probs), seed, int(stream))
    return sampling.expand_units(selected, shape, granularity).contiguous()


@register("sample_exact", "cpp")
def sample_exact(importance, count, seed, stream, granularity) -> torch.Tensor:
    s_units = sampling.unit_sums(importance, granularity)
    selected = sampling.exact_select(s_units, count, seed, stream)
    return sampling.expand_units(selected, importance.shape, granularity).contiguous()


@register("unbiased_rescale", "cpp")
def unbiased_rescale(grad, mask, probs) -> torch.Tensor:
    return _ext().unbiased_rescale(grad.contiguous(), mask.contiguous(), _units(probs))
