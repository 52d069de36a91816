"""The triton backend's fused step: the host side of ``kernels/masked_step.py``.

Per (device, dtype, batch) batch: the tables that depend only on the batch's shapes, storages and
slots (metadata, pointer tables, block and row maps; cached), then three launches: pass 1
(``pass1_blocks`` / ``pass1_rows``), the per-tensor reduce (``reduce_tensors``, which with
water-filling also solves each tensor's level) and ``pass2``. Sharded batches: ``launch_sums``
(pass 1 and ``sum_partials``), the caller's all-reduce, then ``launch`` with the sums.
Imported only where Triton can run (the backend imports it on first use).
"""

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ...kernels.masked_step import (BLOCK_SIZE, PART_COLS, REDUCE_BLOCK, SCALAR_COLS, STAT_COLS, pass1_blocks,
                                    pass1_rows, pass2, reduce_tensors, sum_partials)
from ...reference import sampling
from ...reference.philox import split_seed
from ...reference.spec import StepConfig, TensorBatch, exact_count
from .units import TL_DTYPES


@dataclass
class _Layout:
    """Device tables that depend only on the batch's shapes, storages and slots."""

    meta: torch.Tensor  # int64 [T, META_COLS]
    pointers: torch.Tensor  # int64 [T, PTR_COLS]
    block_tensor: torch.Tensor  # int32 [n_blocks]
    row_tensor: torch.Tensor  # int32 [n_units] (row granularity)
    n_blocks: int
    n_units: int
    units: list[int]
    aligned: bool  # every first full-tensor index is a multiple of 4: block-wise RNG


_LAYOUTS: OrderedDict[tuple, _Layout] = OrderedDict()
_GRAD_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_CACHE_SIZE = 64


def _to_device(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _cached(cache: OrderedDict, key: tuple, build):
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return value


def _layout(work: dict, batch: TensorBatch, granularity: str) -> _Layout:
    params = work["params"]
    device = params[0].device

    def ptr(values, i):
        return values[i].data_ptr() if values else 0

    rows = [
        (ptr(params, i), ptr(work["exp_avgs"], i), ptr(work["exp_avg_sqs"], i),
         ptr(work["momentum_buffers"], i), ptr(work["fishers"], i), batch.steps[i].data_ptr())
        for i in range(len(params))
    ]
    key = (device, granularity, tuple(rows), tuple(p.shape for p in params), tuple(batch.slots),
           tuple(batch.shards))

    def build() -> _Layout:
        meta, block_tensor, row_tensor, units_list = [], [], [], []
        block_start = unit_offset = 0
        aligned = True
        for t, p in enumerate(params):
            n = p.numel()
            units = sampling.unit_count(p.shape, granularity)
            row = n // units if units else 1
            blocks = -(-n // BLOCK_SIZE)
            parts = units if granularity == "row" else blocks
            part_start = unit_offset if granularity == "row" else block_start
            space = batch.index_space(t, granularity)
            aligned = aligned and space.first_unit % 4 == 0 and space.first_element % 4 == 0
            meta.append([n, units, max(row, 1), 2 * batch.slots[t], part_start, parts, unit_offset, block_start,
                         space.units, space.numel, space.first_unit, space.first_element])
            block_tensor += [t] * blocks
            row_tensor += [t] * units
            units_list.append(units)
            block_start += blocks
            unit_offset += units
        return _Layout(
            meta=_to_device(meta, device, torch.int64),
            pointers=_to_device([list(r) for r in rows], device, torch.int64),
            block_tensor=_to_device(block_tensor or [0], device, torch.int32),
            row_tensor=_to_device(row_tensor or [0], device, torch.int32),
            n_blocks=block_start,
            n_units=unit_offset,
            units=units_list,
            aligned=aligned,
        )

    return _cached(_LAYOUTS, key, build)


def _grad_table(grads: list[torch.Tensor]) -> torch.Tensor:
    key = (grads[0].device, tuple(g.data_ptr() for g in grads))
    return _cached(_GRAD_TABLES, key, lambda: _to_device([g.data_ptr() for g in grads], grads[0].device, torch.int64))


_LEVEL_CONSTANTS: dict[tuple[float, torch.device], tuple[torch.Tensor, ...]] = {}


def _level_constants(min_prob: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(min_prob fp64 [1], and ``sampling.level_events``' x, a, c) on ``device``, made once per
    (min_prob, device): kernel args are fp32, the level's arithmetic is float64."""
    key = (min_prob, device)
    if key not in _LEVEL_CONSTANTS:
        _, x, a, c = sampling.level_events(min_prob, device)
        _LEVEL_CONSTANTS[key] = (torch.tensor([min_prob], dtype=torch.float64, device=device), x, a, c)
    return _LEVEL_CONSTANTS[key]


def _split_f64(value: float) -> tuple[float, float]:
    """A double as fp32 hi + lo (kernel args are fp32): ~48 bits of the value survive."""
    hi = float(np.float32(value))  # host arithmetic: no torch op, no device work
    return hi, float(np.float32(value - hi))


def _check_batch(batch: TensorBatch) -> torch.device:
    params = batch.params
    device = params[0].device
    p_dtype, g_dtype = params[0].dtype, batch.grads[0].dtype
    if any(p.dtype != p_dtype for p in params) or any(g.dtype != g_dtype for g in batch.grads):
        raise TypeError("triton masked_step_: all params (and all grads) of a batch must share a dtype")
    if any(x.device != device for x in params + batch.grads + batch.steps):
        raise ValueError("triton masked_step_: all tensors of a batch must be on one device")
    return device


def _launch_pass1(layout: _Layout, grads: torch.Tensor, work: dict, cfg: StepConfig, grad_scale: torch.Tensor | None,
                  device: torch.device, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: (fp64 partials [blocks or rows, 4], each row's importance fp32 [n_units]); with
    water-filling, each tensor's importance histogram is added to ``sums``'s columns after the
    first PART_COLS (``sums``: zeros [T, PART_COLS + HIST_BINS])."""
    n_partials = layout.n_units if cfg.row else layout.n_blocks
    partials = torch.empty((max(n_partials, 1), PART_COLS.value), dtype=torch.float64, device=device)
    row_importance = torch.empty(max(layout.n_units, 1), dtype=torch.float32, device=device)
    hist = cfg.water_filling
    pass1 = dict(grad_table=grads, ptr_table=layout.pointers, meta=layout.meta, partials=partials,
                 hist=sums[:, PART_COLS.value:] if hist else partials, sums_width=sums.shape[1],
                 grad_scale_ptr=grad_scale if grad_scale is not None else partials, fisher_beta=cfg.fisher_beta,
                 one_minus_fisher_beta=1.0 - cfg.fisher_beta, HAS_SCALE=grad_scale is not None,
                 EMA=bool(work["fishers"]), HIST=hist,
                 G_DTYPE=TL_DTYPES[work["grads"][0].dtype], BLOCK=BLOCK_SIZE)
    if cfg.row and layout.n_units:
        pass1_rows[(layout.n_units,)](row_tensor=layout.row_tensor, row_importance=row_importance, **pass1)
    elif not cfg.row and layout.n_blocks:
        pass1_blocks[(layout.n_blocks,)](block_tensor=layout.block_tensor, **pass1)
    return partials, row_importance


def launch_sums(
    batch: TensorBatch, work: dict[str, list[torch.Tensor]], cfg: StepConfig, grad_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 of a batch alone: (per-tensor sums float64 [T, cfg.sums_width], each row's
    importance fp32 [units] for row granularity, else empty), for ``launch(..., sums=...)``
    after the caller has all-reduced the sums of sharded tensors. ``work``, ``batch``: as
    ``launch``."""
    device = _check_batch(batch)
    layout = _layout(work, batch, cfg.granularity)
    sums = torch.zeros((len(batch), cfg.sums_width), dtype=torch.float64, device=device)
    partials, row_importance = _launch_pass1(layout, _grad_table(work["grads"]), work, cfg, grad_scale, device, sums)
    sum_partials[(len(batch),)](meta=layout.meta, partials=partials, sums_out=sums, sums_width=sums.shape[1],
                                RBLOCK=REDUCE_BLOCK)
    return sums, row_importance[: layout.n_units] if cfg.row else row_importance.new_empty(0)


def launch(
    batch: TensorBatch, work: dict[str, list[torch.Tensor]], cfg: StepConfig, grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None, exact_weights: torch.Tensor | None, sums: torch.Tensor | None = None,
    unit_importance: torch.Tensor | None = None,
) -> None:
    """Launch the step (the semantics of ``fastmask.reference.step``) on one batch.

    ``work``: contiguous versions of the batch's params, grads and states (lists keyed by the
    ``TensorBatch`` field names; the caller writes copies back); ``batch`` supplies the steps,
    slots, shards and stats. ``exact_weights``: for sampling="exact", the per-unit weight table
    of the units chosen on the host (0 = not selected), else None. ``sums`` and
    ``unit_importance``: ``launch_sums``'s results (the sums all-reduced over shards); pass 1 is
    then not run again. Water-filling: pass 1 adds the histograms to a [T, cfg.sums_width]
    buffer, from which ``reduce_tensors`` solves each tensor's level (no host sync): three
    launches.
    """
    params = batch.params
    device = _check_batch(batch)
    p_dtype, g_dtype = params[0].dtype, batch.grads[0].dtype
    layout = _layout(work, batch, cfg.granularity)
    grads = _grad_table(work["grads"])
    n_tensors = len(params)
    f32 = dict(dtype=torch.float32, device=device)
    # every entry read is written first (row sampling fills the whole unit table): no fills
    unit_weight = torch.empty(max(layout.n_units if cfg.is_masked else 1, 1), **f32)
    scalars = torch.empty((n_tensors, SCALAR_COLS.value), **f32)
    stat_rows = torch.empty((layout.n_blocks + n_tensors, STAT_COLS.value), dtype=torch.float64, device=device)
    dummy = scalars
    settings = cfg.device_settings(device)
    grad_scale_ptr = grad_scale if grad_scale is not None else dummy
    seed = dict(zip(("seed_lo", "seed_hi"), split_seed(cfg.seed)))
    importance = dict(fisher_beta=cfg.fisher_beta, one_minus_fisher_beta=1.0 - cfg.fisher_beta)

    exact_counts = dummy
    if cfg.exact:
        unit_weight = exact_weights
        exact_counts = torch.tensor(
            [float(exact_count(float(cfg.ratio), u)) if u else 0.0 for u in layout.units], dtype=torch.float64,
            device=device
        )

    if sums is None:
        histograms = (torch.zeros((n_tensors, cfg.sums_width), dtype=torch.float64, device=device)
                      if cfg.water_filling else dummy)
        partials, row_importance = _launch_pass1(layout, grads, work, cfg, grad_scale, device, histograms)
    else:
        partials = histograms = sums.to(device=device, dtype=torch.float64).contiguous()
        row_importance = unit_importance if cfg.row and layout.n_units else dummy
    if cfg.water_filling:  # solved by reduce_tensors, read by pass 2
        levels = torch.empty((n_tensors, 2), dtype=torch.float64, device=device)
        min_prob_f64, events_x, events_a, events_c = _level_constants(cfg.min_prob, device)
    else:
        levels = min_prob_f64 = events_x = events_a = events_c = dummy

    lr_is_tensor = isinstance(cfg.lr, torch.Tensor)
    lr = 0.0 if lr_is_tensor else float(cfg.lr)  # a tensor lr is read from lr_ptr
    lr_hi, lr_lo = _split_f64(lr)
    beta1_hi, beta1_lo = _split_f64(cfg.beta1)
    beta2_hi, beta2_lo = _split_f64(cfg.beta2)
    reduce_tensors[(n_tensors,)](
        ptr_table=layout.pointers, meta=layout.meta, partials=partials, histograms=histograms,
        sums_width=histograms.shape[1] if cfg.water_filling else partials.shape[1], levels=levels,
        row_importance=row_importance,
        unit_weight=unit_weight, scalars=scalars, stat_rows=stat_rows, n_blocks=layout.n_blocks,
        exact_counts=exact_counts, found_inf_ptr=found_inf if found_inf is not None else dummy,
        lr_ptr=cfg.lr.to(device=device, dtype=torch.float32) if lr_is_tensor else dummy,
        lr_hi=lr_hi, lr_lo=lr_lo, decay_value=1.0 if lr_is_tensor else 1.0 - lr * cfg.weight_decay,
        weight_decay=cfg.weight_decay, settings_ptr=settings, min_prob=cfg.min_prob, **seed,
        beta1_hi=beta1_hi, beta1_lo=beta1_lo, beta2_hi=beta2_hi, beta2_lo=beta2_lo, min_prob_f64=min_prob_f64,
        events_x=events_x, events_a=events_a, events_c=events_c, n_events=events_x.numel(),
        n_halvings=events_x.numel().bit_length(), WATER_LEVEL=cfg.water_filling, HAS_FOUND_INF=found_inf is not None,
        LR_IS_TENSOR=lr_is_tensor, MASK_MODE=cfg.mask_mode, ROW_SAMPLING=cfg.is_masked and cfg.row and not cfg.exact,
        EXACT=cfg.exact, SAMPLING=0 if cfg.poisson else 1, RESCALE=cfg.rescale_id,
        PRE_SUMMED=sums is not None, ALIGNED=layout.aligned, RBLOCK=REDUCE_BLOCK,
        enable_fp_fusion=False,
    )

    if layout.n_blocks:
        pass2[(layout.n_blocks,)](
            grad_table=grads, ptr_table=layout.pointers, meta=layout.meta, block_tensor=layout.block_tensor,
            scalars=scalars, levels=levels, unit_weight=unit_weight, stat_rows=stat_rows,
            grad_scale_ptr=grad_scale_ptr, **seed,
            settings_ptr=settings, min_prob=cfg.min_prob, one_minus_beta1=1.0 - cfg.beta1, beta2=cfg.beta2,
            one_minus_beta2=1.0 - cfg.beta2, eps=cfg.eps, momentum=cfg.momentum,
            one_minus_dampening=1.0 - cfg.dampening, weight_decay=cfg.weight_decay, **importance,
            BASE=cfg.base_id, MASK_MODE=cfg.mask_mode, SAMPLING=0 if cfg.poisson else 1, RESCALE=cfg.rescale_id,
            FREEZE=cfg.freeze, EMA=bool(work["fishers"]), GE=cfg.ge_noise, HAS_MOMENTUM=cfg.has_momentum,
            NESTEROV=cfg.nesterov, MAXIMIZE=cfg.maximize, HAS_SCALE=grad_scale is not None,
            MODULATE_UPDATE=cfg.modulate_update, ALIGNED=layout.aligned,
            P_DTYPE=TL_DTYPES[p_dtype], G_DTYPE=TL_DTYPES[g_dtype], BLOCK=BLOCK_SIZE,
            enable_fp_fusion=False,  # no contraction into FMAs: every op rounds as the reference's
        )
    if batch.stats is not None:
        batch.stats += stat_rows.sum(0)

