"""Host-side helpers shared by the native backends (triton, cpp, cuda): working copies,
exact-mode unit tables, the flat step config, and building C++/CUDA extensions on first use."""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from ..reference import sampling
from ..reference.philox import rng_stream
from ..reference.spec import StepConfig, TensorGroup, exact_count

BATCH_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "momentum_buffers", "fishers")


def working_copies(group: TensorGroup) -> tuple[dict[str, list[torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Contiguous versions of every tensor a kernel touches, and the (original, copy) pairs
    to write back after the step: kernels index elements in logical (row-major) order."""
    work, write_back = {}, []
    for name in BATCH_LISTS:
        values = []
        for x in getattr(group, name):
            if x.is_contiguous():
                values.append(x)
            else:
                copy = x.contiguous()
                values.append(copy)
                if name != "grads":
                    write_back.append((x, copy))
        work[name] = values
    return work, write_back


def as_units(values: torch.Tensor) -> torch.Tensor:
    """Per-unit values as the contiguous fp32 tensor the native op kernels read."""
    return values.to(torch.float32).contiguous()


def unit_layout(params: list[torch.Tensor], granularity: str) -> tuple[list[int], list[int]]:
    """Units per tensor and each tensor's offset in a concatenated per-unit table."""
    units = [sampling.unit_count(p.shape, granularity) for p in params]
    offsets, total = [], 0
    for n in units:
        offsets.append(total)
        total += n
    return units, offsets


Selector = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def exact_unit_weights(
    work: dict, group: TensorGroup, cfg: StepConfig, grad_scale: torch.Tensor | None, select: Selector
) -> tuple[torch.Tensor, list[int]]:
    """Exact (Gumbel-top-k) selection of every tensor into one per-unit weight table
    (0 = not selected, else the rescale weight); ``select(s_units, count, stream)`` picks
    the units. Returns the table and the unit offsets."""
    units, offsets = unit_layout(work["params"], cfg.granularity)
    device = work["params"][0].device
    table = torch.zeros(max(sum(units), 1), dtype=torch.float32, device=device)
    for t, g in enumerate(work["grads"]):
        if not units[t]:
            continue
        g32 = g.to(torch.float32)
        if grad_scale is not None:
            g32 = g32 / grad_scale
        s = sampling.fisher_update(work["fishers"][t], g32, cfg.fisher_beta) if work["fishers"] else g32 * g32
        s_units = sampling.unit_sums(s, cfg.granularity)
        stream = rng_stream(group.steps[t] + 1, group.slots[t])
        selected = select(s_units, exact_count(cfg.ratio, units[t]), stream)
        weights = sampling.rescale_weights(s_units, None, cfg.unbiased, cfg.rescale)
        table[offsets[t] : offsets[t] + units[t]] = (
            selected.to(torch.float32) if weights is None else torch.where(selected, weights, 0.0)
        )
    return table, offsets


def step_config_dict(cfg: StepConfig, ema: bool) -> dict:
    """The StepConfig as the flat dict the C++/CUDA step functions read."""
    return dict(
        base={"sgd": 0, "adam": 1, "adamw": 2}[cfg.base],
        rescale=0 if not cfg.unbiased else (1 if cfg.rescale == "ht" else 2),
        lr=0.0 if isinstance(cfg.lr, torch.Tensor) else float(cfg.lr),
        momentum=cfg.momentum, dampening=cfg.dampening, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, ratio=cfg.ratio, min_prob=cfg.min_prob, fisher_beta=cfg.fisher_beta,
        grad_coefficient=cfg.coefficient if cfg.modulate == "grad" else 1.0, update_coefficient=cfg.coefficient,
        nesterov=cfg.nesterov, maximize=cfg.maximize, masked=cfg.is_masked, poisson=cfg.sampling == "poisson",
        ema=ema, row=cfg.granularity == "row", freeze=cfg.masked == "freeze", ge=cfg.ge_noise,
        modulate_update=cfg.modulate == "update" and cfg.coefficient != 1.0,
        exact=cfg.is_masked and cfg.sampling == "exact", seed=cfg.seed,
    )


def shard_config(group: TensorGroup, granularity: str) -> dict:
    """The config entries of a sharded batch (none for whole tensors): per tensor the full
    tensor's units and elements and the full-tensor index of its first local unit and
    element, and ``reduce_sums``, which the extension calls between pass 1 and pass 2."""
    out: dict = {}
    if any(group.shards):
        spaces = [group.index_space(i, granularity) for i in range(len(group))]
        out.update(
            first_units=[s.first_unit for s in spaces], full_units=[s.units for s in spaces],
            full_numels=[s.numel for s in spaces], first_elements=[s.first_element for s in spaces],
        )
    if group.reduce_sums is not None:
        out["reduce_sums"] = group.reduce_sums
    return out


def csrc_dir() -> Path:
    spec = importlib.util.find_spec("fastmask.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fastmask's C++ sources (fastmask.csrc) are not installed")
    return Path(list(spec.submodule_search_locations)[0])


class JitExtension:
    """A C++/CUDA extension: the module built at install if there is one, else compiled on
    first use with ``torch.utils.cpp_extension.load`` (cached in TORCH_EXTENSIONS_DIR).

    ``module()`` returns None when it cannot be built; ``error`` then says why, and one
    warning is issued. ``FASTMASK_VERBOSE_BUILD=1`` shows the compiler output.
    """

    def __init__(self, name: str, prebuilt: str, sources: list[str], **load_kwargs) -> None:
        self.name, self.prebuilt, self.sources, self.load_kwargs = name, prebuilt, sources, load_kwargs
        self.error: str | None = None
        self._module: ModuleType | None = None
        self._tried = False
        self._lock = threading.Lock()

    def _build(self) -> ModuleType:
        try:
            return importlib.import_module(self.prebuilt)
        except ImportError:
            pass
        from torch.utils.cpp_extension import load

        root = csrc_dir()
        return load(name=self.name, sources=[str(root / s) for s in self.sources],
                    verbose=os.environ.get("FASTMASK_VERBOSE_BUILD") == "1", **self.load_kwargs)

    def module(self) -> ModuleType | None:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    self._module = self._build()
                except Exception as exc:  # any build failure is reported, never hidden
                    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
                    self.error = f"build failed ({type(exc).__name__}: {lines[-1] if lines else exc})"
                    warnings.warn(
                        f"fastmask: the {self.name} extension could not be built: {self.error}; set "
                        "FASTMASK_VERBOSE_BUILD=1 for the compiler output",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            return self._module


def native_masked_step_(extension: ModuleType, group: TensorGroup, cfg: StepConfig, grad_scale, found_inf,
                        select: Selector) -> None:
    """Run an extension's ``masked_step`` on a batch (the cpp and cuda backends)."""
    work, write_back = working_copies(group)
    p_dtype = work["params"][0].dtype
    if any(g.dtype not in (p_dtype, torch.float32) for g in work["grads"]):  # the kernels' dtype pairs
        work["grads"] = [g.to(torch.float32) for g in work["grads"]]
    config = step_config_dict(cfg, ema=bool(work["fishers"]))
    config.update(shard_config(group, cfg.granularity))
    unit_weight, offsets = None, []
    if config["exact"]:
        unit_weight, offsets = exact_unit_weights(work, group, cfg, grad_scale, select)
    lr = cfg.lr.to(torch.float32) if isinstance(cfg.lr, torch.Tensor) else None
    extension.masked_step(
        work["params"], work["grads"], group.steps, work["exp_avgs"], work["exp_avg_sqs"],
        work["momentum_buffers"], work["fishers"], group.slots, config, lr, grad_scale, found_inf, unit_weight,
        offsets, group.stats,
    )
    for original, copy in write_back:
        original.copy_(copy)


def reference_select(seed: int) -> Selector:
    """Exact-mode selection by the reference (Gumbel keys and top-k in torch)."""

    def select(s_units: torch.Tensor, count: int, stream: torch.Tensor) -> torch.Tensor:
        return sampling.exact_select(s_units, count, seed, stream)

    return select
