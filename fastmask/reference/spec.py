"""The inputs of one fused optimizer step, shared by every backend.

``StepConfig`` is the resolved hyper-parameters of one param group for one step, with every
term the kernels derive from them; ``TensorBatch`` the tensors of that group that share a
device and a param dtype (a batch). A backend's ``masked_step_`` reads both and updates the
tensors in place.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

BASES = ("sgd", "adam", "adamw")
SUM_COLS = 4  # pass 1's per-tensor sums before the histogram
HIST_BINS = 2048  # bins of the importance histogram (fastmask.reference.sampling)
SAMPLINGS = ("poisson", "uniform", "exact")
RESCALES = ("ht", "legacy")
IMPORTANCES = ("grad2", "ema")
GRANULARITIES = ("element", "row")
MASKED_MODES = ("freeze", "zero_grad")
MODULATE_MODES = ("grad", "update")
# Ids the kernels read for the choices of a StepConfig; csrc/fastmask_math.h's enums Base and
# Rescale hold the same values (a test checks it).
BASE_IDS = {"sgd": 0, "adam": 1, "adamw": 2}
RESCALE_IDS = {"none": 0, "ht": 1, "legacy": 2}


@dataclass(frozen=True)
class StepConfig:
    """Resolved hyper-parameters of one group's step (DESIGN §3).

    ``ratio`` is the modality's fraction of units to update (1.0 = dense).
    ``lr`` may be a 0-d tensor (schedulers, CUDA graphs). ``coefficient`` and
    ``ge_noise`` are the OGM terms (coefficient 1.0 and no noise for AMSS).
    ``ratio`` and ``coefficient`` may be one-element fp32 tensors on the step's device: the
    kernels then read them from memory, and "ratio 1 is exactly the base optimizer" (and
    "coefficient 1 leaves the update as it is") is decided on the device, without a sync.
    """

    base: str = "adamw"
    lr: float | torch.Tensor = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    maximize: bool = False
    ratio: float | torch.Tensor = 1.0
    unbiased: bool = False
    sampling: str = "poisson"
    rescale: str = "ht"
    importance: str = "grad2"
    fisher_beta: float = 0.9
    granularity: str = "element"
    masked: str = "freeze"
    min_prob: float = 0.0
    seed: int = 0
    coefficient: float | torch.Tensor = 1.0
    ge_noise: bool = False
    modulate: str = "grad"

    # ---- the derived terms: computed here and nowhere else, read by every backend (the
    # reference and Triton as these properties, C++ and CUDA through kernel_fields)

    @property
    def plain(self) -> bool:
        """Every field a plain bool, int, float or str (no tensor setting): the config can be kept
        and compared by value (``step_config``, the native backends' typed configs)."""
        return plain_values(self.__dict__.values())

    @property
    def is_masked(self) -> bool:
        """True when units may be sampled: a ratio below 1, or a ratio tensor (its value is read
        on the device, where a ratio of 1 gives exactly the base optimizer)."""
        return isinstance(self.ratio, torch.Tensor) or self.ratio < 1.0

    @property
    def water_filling(self) -> bool:
        """True when pass 1 gathers each tensor's importance histogram (sampling="poisson")."""
        return self.is_masked and self.poisson

    @property
    def exact(self) -> bool:
        """Masked with sampling="exact": units chosen on the host side, as a weight table."""
        return self.is_masked and self.sampling == "exact"

    @property
    def freeze(self) -> bool:
        """Masked units keep param and moments (masked="freeze" in a masked group)."""
        return self.is_masked and self.masked == "freeze"

    @property
    def row(self) -> bool:
        return self.granularity == "row"

    @property
    def poisson(self) -> bool:
        return self.sampling == "poisson"

    @property
    def mask_mode(self) -> int:
        """0: dense; 1: elements sampled in the element pass; 2: a per-unit weight table (rows, exact)."""
        return 0 if not self.is_masked else (1 if not (self.row or self.exact) else 2)

    @property
    def sums_width(self) -> int:
        """Columns of pass 1's per-tensor sums: [sum s, sum g, sum g^2, non-finite count], then
        with water-filling the importance histogram (``sampling.HIST_BINS`` counts)."""
        return SUM_COLS + (HIST_BINS if self.water_filling else 0)

    @property
    def base_id(self) -> int:
        return BASE_IDS[self.base]

    @property
    def rescale_id(self) -> int:
        """RESCALE_IDS of the rescale rule: "none" unless unbiased."""
        return RESCALE_IDS[self.rescale if self.unbiased else "none"]

    @property
    def has_momentum(self) -> bool:
        return self.base == "sgd" and self.momentum != 0.0

    @property
    def modulate_update(self) -> bool:
        """The update is scaled by the coefficient (modulate="update", and a coefficient that is
        not 1, or a tensor)."""
        return self.modulate == "update" and (isinstance(self.coefficient, torch.Tensor) or self.coefficient != 1.0)

    @property
    def grad_coefficient(self) -> float | torch.Tensor:
        """OGM's k on the gradient: the coefficient with modulate="grad", else 1."""
        return self.coefficient if self.modulate == "grad" else 1.0

    def kernel_fields(self, ema: bool) -> dict[str, int | float | bool]:
        """The fields of the C++ ``fastmask::KernelConfig`` (``FASTMASK_KERNEL_CONFIG_FIELDS`` in
        csrc/fastmask_math.h: the same names in the same order, a test checks it), as the cpp and
        cuda bindings receive them. ``ema``: the batch carries fishers (masked groups with
        importance "ema"). A tensor setting is NaN here (lr: 0.0), since those kernels read it
        from memory."""
        def host(value: float | torch.Tensor, tensor_value: float = float("nan")) -> float:
            return tensor_value if isinstance(value, torch.Tensor) else float(value)

        return dict(
            base_id=self.base_id, rescale_id=self.rescale_id, lr=host(self.lr, 0.0), momentum=self.momentum,
            dampening=self.dampening, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
            weight_decay=self.weight_decay, ratio=host(self.ratio), min_prob=self.min_prob,
            fisher_beta=self.fisher_beta, grad_coefficient=host(self.grad_coefficient),
            update_coefficient=host(self.coefficient), nesterov=self.nesterov, maximize=self.maximize,
            is_masked=self.is_masked, poisson=self.poisson, ema=ema, row=self.row,
            freeze=self.freeze, ge_noise=self.ge_noise, modulate_update=self.modulate_update, exact=self.exact,
            water_filling=self.water_filling, sums_width=self.sums_width, seed=self.seed,
        )

    def to(self, device: torch.device) -> StepConfig:
        """This config with tensor settings on ``device`` (a non-blocking copy if elsewhere)."""
        moved = {name: value.to(device, non_blocking=True) for name in ("ratio", "coefficient")
                 if isinstance(value := getattr(self, name), torch.Tensor) and value.device != device}
        return dataclasses.replace(self, **moved) if moved else self

    def on_host(self) -> StepConfig:
        """This config with tensor settings read as floats (a device-to-host sync for device
        tensors): for the paths that decide on the host (the cpp backend, exact sampling)."""
        if not isinstance(self.ratio, torch.Tensor) and not isinstance(self.coefficient, torch.Tensor):
            return self
        return dataclasses.replace(self, ratio=float(self.ratio), coefficient=float(self.coefficient))

    def device_settings(self, device: torch.device) -> torch.Tensor:
        """[ratio, gradient coefficient, update coefficient], fp32 on ``device``: what the
        Triton and CUDA kernels read from memory (no host read of a tensor setting)."""
        values = [self.ratio, self.grad_coefficient, self.coefficient]
        if not any(isinstance(v, torch.Tensor) for v in values):
            return _constant_settings(device, tuple(float(v) for v in values))
        return torch.stack([
            v.to(device=device, dtype=torch.float32).reshape(()) if isinstance(v, torch.Tensor)
            else torch.full((), v, dtype=torch.float32, device=device) for v in values
        ])


_PLAIN_TYPES = frozenset((bool, int, float, str))


def plain_values(values: Iterable[object]) -> bool:
    """Whether every value is a plain bool, int, float or str: a tensor setting, compared by value,
    would need a read, and by identity it could go stale."""
    return set(map(type, values)) <= _PLAIN_TYPES


def step_config(fields: dict) -> StepConfig:
    """``StepConfig(**fields)``, the same object again for the same plain fields: a step builds one
    per group, and most steps change none of a group's hyper-parameters (the native backends also
    keep their typed config per StepConfig). Made anew when a field is not plain (``plain_values``).
    The 256 most recently used are kept: a scheduler that changes lr every step makes one per step."""
    if not plain_values(fields.values()):
        return StepConfig(**fields)
    return _kept_step_config(tuple(fields.items()))


@functools.lru_cache(maxsize=256)
def _kept_step_config(fields: tuple[tuple[str, object], ...]) -> StepConfig:
    return StepConfig(**dict(fields))


_SETTINGS: dict[tuple[torch.device, tuple[float, ...]], torch.Tensor] = {}


def _constant_settings(device: torch.device, values: tuple[float, ...]) -> torch.Tensor:
    """Float settings as a device tensor, made once per (device, values) and never written: no
    host-to-device copy per step, so a step captured in a CUDA graph (after a warm-up step) copies
    nothing from host memory that the replay would read."""
    key = (device, values)
    cached = _SETTINGS.get(key)
    if cached is None:
        if len(_SETTINGS) >= 1024:  # float settings are a handful per run; bound the table anyway
            _SETTINGS.clear()
        host = torch.tensor(values, dtype=torch.float32)
        cached = _SETTINGS[key] = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    return cached


def exact_count(ratio: float, n_units: int) -> int:
    """ceil(ratio * N) clamped to [1, N], tolerant to float error (0.3 * 10 -> 3)."""
    return min(n_units, max(1, math.ceil(ratio * n_units - 1e-9)))


@dataclass(frozen=True)
class Shard:
    """Where a local tensor lies in its full (unsharded) tensor: a run of dim-0 slices.

    ``offset`` is the full tensor's flat (row-major) index of the local tensor's first
    element; a row boundary, so row units stay whole. The counter RNG is indexed by the
    full tensor's unit index, and N (units) is the full tensor's, so a sharded step draws
    the same masks as the unsharded one.
    """

    full_shape: torch.Size
    offset: int

    def units(self, granularity: str) -> tuple[int, int]:
        """(first unit's index in the full tensor, the full tensor's number of units)."""
        total = unit_count(self.full_shape, granularity)
        if granularity == "row" and total:
            return self.offset // (self.full_shape.numel() // total), total
        return self.offset, total


def unit_count(shape: torch.Size, granularity: str) -> int:
    """Units of a tensor: its elements, or its dim-0 slices (one for a 0-d tensor)."""
    if granularity == "row":
        return shape[0] if len(shape) > 0 else 1
    return shape.numel()


class IndexSpace(NamedTuple):
    """A local tensor's place in its full tensor: the RNG indices of its first unit and first
    element, and the full tensor's units (N) and elements."""

    first_unit: int
    units: int
    first_element: int
    numel: int


@dataclass
class TensorBatch:
    """Tensors of one (device, param dtype, param group) batch, index-aligned.

    ``steps`` are 0-d fp32 tensors on the param device; state lists are empty
    when the configuration keeps no such state (e.g. ``exp_avgs`` for SGD,
    ``fishers`` unless importance is "ema" in a masked group). ``slots`` are the
    params' positions in the optimizer (the RNG stream input). ``stats`` is a
    float64 tensor [sum_pi, selected_units, units, skipped_tensors] that the
    step adds to, or None (counted over the local tensors).

    Sharded tensors (FSDP2/DTensor): ``shards`` gives each tensor's place in its full
    tensor (None for a whole tensor; an empty list: all whole). Such a batch is stepped in
    two ops (``fastmask.ops.masked_step_sums`` / ``masked_step_finish``) around one
    all-reduce of its per-tensor pass-1 sums, so that S, the GE std and the non-finite skip
    are the full tensor's.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    steps: list[torch.Tensor]
    slots: list[int]
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    momentum_buffers: list[torch.Tensor] = field(default_factory=list)
    fishers: list[torch.Tensor] = field(default_factory=list)
    stats: torch.Tensor | None = None
    shards: list[Shard | None] = field(default_factory=list)

    def shard(self, i: int) -> Shard | None:
        return self.shards[i] if self.shards else None

    def index_space(self, i: int, granularity: str) -> IndexSpace:
        """Tensor i's place in its full tensor (itself, unless sharded)."""
        shard = self.shard(i)
        if shard is None:
            shape = self.params[i].shape
            return IndexSpace(0, unit_count(shape, granularity), 0, shape.numel())
        first_unit, units = shard.units(granularity)
        return IndexSpace(first_unit, units, shard.offset, shard.full_shape.numel())

    def __len__(self) -> int:
        return len(self.params)


def check_shardable(batch: TensorBatch, cfg: StepConfig) -> None:
    """Raise for configurations a sharded step cannot compute shard-locally."""
    if cfg.exact and any(batch.shards):
        raise NotImplementedError("sampling='exact' needs every unit of a tensor on one rank; sharded "
                                  "tensors support sampling='poisson' or 'uniform'")
