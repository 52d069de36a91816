"""The fused AMSS/AMSS+/OGM step in Triton: three launches per (device, dtype, group) batch.

- ``pass1_blocks`` / ``pass1_rows`` read g (and F for "ema" importance) and write
  fixed-order partials [sum s, sum g, sum g^2, non-finite count] per block of
  elements or per row (plus each row's importance). No float atomics.
- ``reduce_tensors`` (one program per tensor) sums its partials in a fixed order,
  decides ok = finite and not found_inf, advances ``step`` on device, computes the
  per-tensor scalars (k/S, GE std, Adam bias corrections in fp64), with water-filling
  solves the tensor's level from the histogram pass 1 added up (``sampling.water_level``,
  bit for bit: ``kernels/sampling.py``) and, for row units, samples the rows into a
  per-unit weight table (0 = not selected).
- ``pass2`` is one read-modify-write of every element: importance, inclusion
  probability, selection by the counter RNG, rescale, OGM terms and the base
  update; the mask lives in registers and unselected units are not even written. With
  ``masked="freeze"`` an unselected unit's param and states are not read either: for row
  units (and exact selection) the unit table is read first, so an unselected row costs no
  traffic in pass 2 beyond its g and Fisher EMA when the importance is an EMA.

Sharded tensors (FSDP2): ``launch_sums`` runs pass 1 and ``sum_partials`` (per-tensor
sums), the caller all-reduces them, and ``launch`` with those sums runs ``reduce_tensors``
on them and ``pass2``; N, the GE element count and the RNG index are the full tensor's
(metadata columns below).

The stats (sum pi, selected, units, skipped) are one fp64 row per pass-2 block and per tensor,
written by the kernels and summed once on the host side: with no buffer to zero-fill, a batch
costs three launches and two other device ops (three with water-filling: the histograms' zero
fill).

All tensors of a batch are reached through int64 pointer tables, so thousands
of small tensors cost three launches, not thousands. Semantics: DESIGN §3.
"""

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from fastmask.reference import sampling
from fastmask.reference.spec import KernelConfig, StepConfig, TensorGroup, exact_count

from .ops import TL_DTYPES
from .philox import normal_at, normal_block, uniform_at, uniform_block
from .sampling import HIST_BINS, add_histogram, importance_bins, inclusion_prob, water_level

# int64 metadata per tensor
M_NUMEL = tl.constexpr(0)
M_UNITS = tl.constexpr(1)
M_ROW = tl.constexpr(2)  # elements per unit (1 for element units)
M_STREAM_HI = tl.constexpr(3)  # 2 * slot: high word of the mask stream
M_PART_START = tl.constexpr(4)
M_N_PARTS = tl.constexpr(5)
M_UNIT_OFFSET = tl.constexpr(6)
M_BLOCK_START = tl.constexpr(7)
M_FULL_UNITS = tl.constexpr(8)  # units of the full tensor (N), = M_UNITS unless sharded
M_FULL_NUMEL = tl.constexpr(9)
M_FIRST_UNIT = tl.constexpr(10)  # full-tensor index of the first local unit (RNG index)
M_FIRST_ELEMENT = tl.constexpr(11)  # full-tensor index of the first local element (GE noise)
META_COLS = tl.constexpr(12)

# int64 data pointers per tensor
P_PARAM = tl.constexpr(0)
P_EXP_AVG = tl.constexpr(1)
P_EXP_AVG_SQ = tl.constexpr(2)
P_MOMENTUM = tl.constexpr(3)
P_FISHER = tl.constexpr(4)
P_STEP = tl.constexpr(5)
PTR_COLS = tl.constexpr(6)

# fp32 scalars per tensor, written by reduce_tensors for pass2
S_OK = tl.constexpr(0)
S_NEW_STEP = tl.constexpr(1)
S_DEGENERATE = tl.constexpr(2)  # S == 0 or not finite
S_TOTAL = tl.constexpr(3)  # S (legacy rescale)
S_STD = tl.constexpr(4)  # GE noise std
S_STEP_SIZE = tl.constexpr(5)  # lr / (1 - beta1^t)
S_BC2_SQRT = tl.constexpr(6)  # sqrt(1 - beta2^t)
S_DECAY = tl.constexpr(7)  # 1 - lr * weight_decay (AdamW)
S_LR = tl.constexpr(8)
SCALAR_COLS = tl.constexpr(9)

PART_COLS = tl.constexpr(4)  # partials: sum s, sum g, sum g^2, non-finite count
# fp64 rows [sum pi, selected units, units, skipped tensors]: one per pass-2 block, then one per
# tensor (written by reduce_tensors); the batch's stats are their column sums
STAT_COLS = tl.constexpr(4)


@triton.jit
def _grad(grad_table, t, offs, inb, grad_scale_ptr, HAS_SCALE: tl.constexpr, G_DTYPE: tl.constexpr):
    gp = tl.load(grad_table + t).to(tl.pointer_type(G_DTYPE))
    g = tl.load(gp + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(grad_scale_ptr).to(tl.float32)
    return g


@triton.jit
def _importance(g, ptr_table, t, offs, inb, fisher_beta, one_minus_fisher_beta, EMA: tl.constexpr):
    """(s, F') for a block: s = g^2, or the updated EMA F' = beta F + (1 - beta) g^2."""
    if EMA:
        fp = tl.load(ptr_table + t * PTR_COLS + P_FISHER).to(tl.pointer_type(tl.float32))
        fisher = tl.load(fp + offs, mask=inb, other=0.0)
        fisher = fisher * fisher_beta + g * g * one_minus_fisher_beta
        return fisher, fisher
    return g * g, g


@triton.jit
def _partials(out, g, s, inb):
    """fp64 partial sums: S is accumulated in fp64 and rounded once, as the reference does."""
    nonfinite = tl.sum((inb & ~(tl.abs(g) < float("inf"))).to(tl.float64), axis=0)
    g64 = g.to(tl.float64)
    tl.store(out + 0, tl.sum(s.to(tl.float64), axis=0))
    tl.store(out + 1, tl.sum(g64, axis=0))
    tl.store(out + 2, tl.sum(g64 * g64, axis=0))
    tl.store(out + 3, nonfinite)


@triton.jit
def pass1_blocks(
    grad_table, ptr_table, meta, block_tensor, partials, hist, sums_width, grad_scale_ptr, fisher_beta,
    one_minus_fisher_beta, HAS_SCALE: tl.constexpr, EMA: tl.constexpr, HIST: tl.constexpr, G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """HIST: add the block's importance histogram to its tensor's row of ``hist`` (the sums'
    histogram columns): integer counts in fp64, exact in any order of the atomic adds."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    n = tl.load(meta + t * META_COLS + M_NUMEL)
    b = pid - tl.load(meta + t * META_COLS + M_BLOCK_START)
    offs = b * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    g = _grad(grad_table, t, offs, inb, grad_scale_ptr, HAS_SCALE, G_DTYPE)
    s, _ = _importance(g, ptr_table, t, offs, inb, fisher_beta, one_minus_fisher_beta, EMA)
    _partials(partials + pid.to(tl.int64) * PART_COLS, g, tl.where(inb, s, 0.0), inb)
    if HIST:
        add_histogram(s, inb, hist + t * sums_width)


@triton.jit
def pass1_rows(
    grad_table, ptr_table, meta, row_tensor, partials, row_importance, hist, sums_width, grad_scale_ptr, fisher_beta,
    one_minus_fisher_beta, HAS_SCALE: tl.constexpr, EMA: tl.constexpr, HIST: tl.constexpr, G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row (global unit index): the row's importance and partials (and, HIST,
    one count in its tensor's importance histogram)."""
    pid = tl.program_id(0)
    t = tl.load(row_tensor + pid)
    row_size = tl.load(meta + t * META_COLS + M_ROW)
    r = pid - tl.load(meta + t * META_COLS + M_UNIT_OFFSET)
    acc_s = tl.zeros([BLOCK], tl.float64)
    acc_g = tl.zeros([BLOCK], tl.float64)
    acc_g2 = tl.zeros([BLOCK], tl.float64)
    acc_bad = tl.zeros([BLOCK], tl.float64)
    for start in range(0, row_size, BLOCK):
        local = start + tl.arange(0, BLOCK).to(tl.int64)
        inb = local < row_size
        offs = r * row_size + local
        g = _grad(grad_table, t, offs, inb, grad_scale_ptr, HAS_SCALE, G_DTYPE)
        s, _ = _importance(g, ptr_table, t, offs, inb, fisher_beta, one_minus_fisher_beta, EMA)
        g64 = g.to(tl.float64)
        acc_s += tl.where(inb, s, 0.0).to(tl.float64)
        acc_g += g64
        acc_g2 += g64 * g64
        acc_bad += (inb & ~(tl.abs(g) < float("inf"))).to(tl.float64)
    out = partials + pid.to(tl.int64) * PART_COLS
    row_s = tl.sum(acc_s, axis=0).to(tl.float32)  # s_u is fp32, S sums the rounded s_u
    tl.store(row_importance + pid, row_s)
    if HIST:
        bin = tl.minimum(importance_bins(row_s), HIST_BINS - 1)  # NaN bits: the last bin
        tl.atomic_add(hist + t * sums_width + bin, tl.full([], 1.0, tl.float64))
    tl.store(out + 0, row_s.to(tl.float64))
    tl.store(out + 1, tl.sum(acc_g, axis=0))
    tl.store(out + 2, tl.sum(acc_g2, axis=0))
    tl.store(out + 3, tl.sum(acc_bad, axis=0))


@triton.jit
def _pow(base_hi, base_lo, e):
    """(base_hi + base_lo)^e in fp64 by repeated squaring (e < 2^32): exact to ~1e-15."""
    b = tl.full([], base_hi, tl.float64) + tl.full([], base_lo, tl.float64)
    r = tl.full([], 1.0, tl.float64)
    for i in tl.static_range(32):
        r = tl.where(((e >> i) & 1) == 1, r * b, r)
        b = b * b
    return r


@triton.jit
def _level(levels, t, SAMPLING: tl.constexpr):
    """Tensor t's water level (x fp64, p0 fp32); unused (0, 0) unless poisson."""
    if SAMPLING == 0:
        return tl.load(levels + 2 * t), tl.load(levels + 2 * t + 1).to(tl.float32)
    return tl.full([], 0.0, tl.float64), tl.full([], 0.0, tl.float32)


@triton.jit
def _weight(pi, s, total, degenerate, n_units, RESCALE: tl.constexpr):
    """Gradient weight of a selected unit: 1 (AMSS), 1/pi (ht) or 1/(s/S + 1/N) (legacy)."""
    if RESCALE == 1:
        return tl.div_rn(tl.full(pi.shape, 1.0, tl.float32), pi)
    if RESCALE == 2:
        inv_n = tl.div_rn(1.0, n_units.to(tl.float32))
        p = tl.where(degenerate != 0, inv_n, tl.div_rn(s, total))
        return tl.div_rn(tl.full(s.shape, 1.0, tl.float32), p + inv_n)
    return tl.full(s.shape, 1.0, tl.float32)


@triton.jit
def _tensor_sums(partials, mrow, RBLOCK: tl.constexpr):
    """A tensor's pass-1 partials summed in a fixed order: [sum s, sum g, sum g^2, non-finite]."""
    start = tl.load(mrow + M_PART_START)
    count = tl.load(mrow + M_N_PARTS)
    acc = tl.zeros([RBLOCK, PART_COLS], tl.float64)
    cols = tl.arange(0, PART_COLS)
    for c in range(0, count, RBLOCK):
        idx = c + tl.arange(0, RBLOCK).to(tl.int64)
        ptrs = partials + (start + idx)[:, None] * PART_COLS + cols[None, :]
        acc += tl.load(ptrs, mask=(idx < count)[:, None], other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def sum_partials(meta, partials, sums_out, sums_width, RBLOCK: tl.constexpr):
    """Per-tensor pass-1 sums: the first PART_COLS columns of the rows of ``sums_out``."""
    t = tl.program_id(0)
    tl.store(sums_out + t * sums_width + tl.arange(0, PART_COLS), _tensor_sums(partials, meta + t * META_COLS, RBLOCK))


@triton.jit
def reduce_tensors(
    ptr_table, meta, partials, histograms, sums_width, levels, row_importance, unit_weight, scalars, stat_rows,
    n_blocks, exact_counts, found_inf_ptr, lr_ptr,
    lr_hi, lr_lo, decay_value, weight_decay, settings_ptr, min_prob, seed_lo, seed_hi,
    beta1_hi, beta1_lo, beta2_hi, beta2_lo, min_prob_f64, events_x, events_a, events_c, n_events, n_halvings,
    HAS_FOUND_INF: tl.constexpr, LR_IS_TENSOR: tl.constexpr, MASK_MODE: tl.constexpr, ROW_SAMPLING: tl.constexpr,
    EXACT: tl.constexpr, SAMPLING: tl.constexpr, RESCALE: tl.constexpr, PRE_SUMMED: tl.constexpr,
    WATER_LEVEL: tl.constexpr, ALIGNED: tl.constexpr, RBLOCK: tl.constexpr,
):
    """PRE_SUMMED: ``partials`` holds the per-tensor sums [T, sums_width] (from sum_partials,
    reduced). WATER_LEVEL: each tensor's water level (x, p0) is solved here from its histogram
    (the columns of ``histograms`` [T, sums_width] after the sums; ``sampling.water_level``,
    with ``min_prob_f64`` fp64 [1] and the breakpoints ``events_*``) and written to ``levels``
    fp64 [T, 2] for pass 2. ``settings_ptr``: [ratio, grad coefficient, update coefficient],
    read from memory."""
    t = tl.program_id(0)
    ratio = tl.load(settings_ptr + 0)
    if WATER_LEVEL:
        level_x, level_p0 = water_level(histograms + t * sums_width + PART_COLS, ratio, min_prob_f64, events_x,
                                        events_a, events_c, n_events, n_halvings)
        tl.store(levels + 2 * t, level_x)
        tl.store(levels + 2 * t + 1, level_p0.to(tl.float64))
    else:
        level_x, level_p0 = _level(levels, t, SAMPLING)
    dense_ratio = ratio >= 1.0  # a ratio of 1 (read here, on the device): the base optimizer
    mrow = meta + t * META_COLS
    cols = tl.arange(0, PART_COLS)
    if PRE_SUMMED:
        sums = tl.load(partials + t * sums_width + cols)
    else:
        sums = _tensor_sums(partials, mrow, RBLOCK)
    total = tl.sum(tl.where(cols == 0, sums, 0.0), axis=0).to(tl.float32)
    g_sum = tl.sum(tl.where(cols == 1, sums, 0.0), axis=0)
    g_sq = tl.sum(tl.where(cols == 2, sums, 0.0), axis=0)
    nonfinite = tl.sum(tl.where(cols == 3, sums, 0.0), axis=0)

    ok = nonfinite == 0
    skipped = ~ok
    if HAS_FOUND_INF:
        inf_flag = tl.load(found_inf_ptr).to(tl.float32) != 0
        ok = ok & ~inf_flag
        skipped = skipped & ~inf_flag
    step_ptr = tl.load(ptr_table + t * PTR_COLS + P_STEP).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr)
    new_step = step + 1.0
    tl.store(step_ptr, tl.where(ok, new_step, step))

    n = tl.load(mrow + M_FULL_NUMEL)
    units = tl.load(mrow + M_UNITS)
    full_units = tl.load(mrow + M_FULL_UNITS)
    degenerate = ~((total > 0) & (total < float("inf")))
    nf = n.to(tl.float64)
    var = tl.maximum(g_sq - g_sum * g_sum / nf, 0.0) / tl.maximum(nf - 1.0, 1.0)
    std = tl.where(n > 1, tl.sqrt(var), 0.0).to(tl.float32)
    # as the reference: a float lr is a double (sent as fp32 hi + lo) and 1 - lr*wd is
    # computed on the host; a tensor lr is fp32 and 1 - lr*wd is fp32 arithmetic
    if LR_IS_TENSOR:
        lr32 = tl.load(lr_ptr).to(tl.float32)
        lr = lr32.to(tl.float64)
        decay = 1.0 - lr32 * weight_decay
    else:
        lr = tl.full([], lr_hi, tl.float64) + tl.full([], lr_lo, tl.float64)
        decay = tl.full([], decay_value, tl.float32)
    e = new_step.to(tl.int64)
    bc1 = 1.0 - _pow(beta1_hi, beta1_lo, e)
    bc2 = 1.0 - _pow(beta2_hi, beta2_lo, e)
    out = scalars + t * SCALAR_COLS
    tl.store(out + S_OK, ok.to(tl.float32))
    tl.store(out + S_NEW_STEP, new_step)
    tl.store(out + S_DEGENERATE, degenerate.to(tl.float32))
    tl.store(out + S_TOTAL, total)
    tl.store(out + S_STD, std)
    tl.store(out + S_STEP_SIZE, (lr / bc1).to(tl.float32))
    tl.store(out + S_BC2_SQRT, tl.sqrt(bc2).to(tl.float32))
    tl.store(out + S_DECAY, decay)
    tl.store(out + S_LR, lr.to(tl.float32))

    units_done = tl.where(ok, units.to(tl.float64), 0.0)
    stats = stat_rows + (n_blocks + t) * STAT_COLS
    # columns 0 and 1: the selected units and their expected number (pass 2's block rows hold them
    # when it samples elements); a dense step updates every unit of a good tensor
    if MASK_MODE == 0:
        tl.store(stats + 0, units_done)
        tl.store(stats + 1, units_done)
    elif EXACT:
        chosen = tl.where(ok, tl.load(exact_counts + t), 0.0)
        tl.store(stats + 0, chosen)
        tl.store(stats + 1, chosen)
    elif not ROW_SAMPLING:
        tl.store(stats + 0, tl.full([], 0.0, tl.float64))
        tl.store(stats + 1, tl.full([], 0.0, tl.float64))
    if ROW_SAMPLING:
        # rows are few: sample them here, once, into the unit weight table
        offset = tl.load(mrow + M_UNIT_OFFSET)
        first_unit = tl.load(mrow + M_FIRST_UNIT)
        s_hi = tl.load(mrow + M_STREAM_HI)
        sum_pi = tl.zeros([RBLOCK], tl.float32)
        n_sel = tl.zeros([RBLOCK], tl.float32)
        for r0 in range(0, units, RBLOCK):
            r = r0 + tl.arange(0, RBLOCK).to(tl.int64)
            inb = r < units
            s = tl.load(row_importance + offset + r, mask=inb, other=0.0)
            pi = tl.where(dense_ratio, 1.0, inclusion_prob(s, level_x, level_p0, degenerate.to(tl.float32), ratio,
                                                         min_prob, SAMPLING))
            if ALIGNED:
                u = uniform_block(first_unit + r0, new_step.to(tl.int64), s_hi, seed_lo, seed_hi, RBLOCK)
            else:
                u = uniform_at(first_unit + r, new_step.to(tl.int64), s_hi, seed_lo, seed_hi)
            sel = inb & (u < pi)
            w = tl.where(dense_ratio, 1.0, _weight(pi, s, total, degenerate.to(tl.float32), full_units, RESCALE))
            tl.store(unit_weight + offset + r, tl.where(sel, w, 0.0), mask=inb)
            sum_pi += tl.where(inb, pi, 0.0)
            n_sel += sel.to(tl.float32)
        tl.store(stats + 0, tl.where(ok, tl.sum(sum_pi, axis=0), 0.0).to(tl.float64))
        tl.store(stats + 1, tl.where(ok, tl.sum(n_sel, axis=0), 0.0).to(tl.float64))
    tl.store(stats + 2, units_done)
    tl.store(stats + 3, skipped.to(tl.float64))


@triton.jit
def pass2(
    grad_table, ptr_table, meta, block_tensor, scalars, levels, unit_weight, stat_rows, grad_scale_ptr,
    seed_lo, seed_hi, settings_ptr, min_prob,
    one_minus_beta1, beta2, one_minus_beta2, eps, momentum, one_minus_dampening, weight_decay,
    fisher_beta, one_minus_fisher_beta,
    BASE: tl.constexpr,  # 0 sgd, 1 adam, 2 adamw
    MASK_MODE: tl.constexpr,  # 0 dense, 1 sample elements here, 2 per-unit weight table
    SAMPLING: tl.constexpr,  # 0 poisson, 1 uniform
    RESCALE: tl.constexpr,  # 0 none, 1 ht, 2 legacy
    FREEZE: tl.constexpr, EMA: tl.constexpr, GE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, MODULATE_UPDATE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor's first full-tensor index is a multiple of 4
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    mrow = meta + t * META_COLS
    n = tl.load(mrow + M_NUMEL)
    b = pid - tl.load(mrow + M_BLOCK_START)
    first = b * BLOCK
    offs = first + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    sc = scalars + t * SCALAR_COLS
    ratio = tl.load(settings_ptr + 0)
    dense_ratio = ratio >= 1.0  # a ratio of 1 (read here, on the device): the base optimizer
    grad_coefficient = tl.load(settings_ptr + 1)
    update_coefficient = tl.load(settings_ptr + 2)
    ok = tl.load(sc + S_OK) != 0
    new_step = tl.load(sc + S_NEW_STEP)
    lr = tl.load(sc + S_LR)
    prow = ptr_table + t * PTR_COLS

    live = tl.where(ok, inb, False)  # the elements whose param and states are read
    g_mask = inb
    if MASK_MODE == 2:
        # the unit table is known before any element is read: with "freeze", an unselected unit
        # (a whole row) is neither read nor written, but for its Fisher EMA (which reads g)
        w = tl.load(unit_weight + tl.load(mrow + M_UNIT_OFFSET) + offs // tl.load(mrow + M_ROW), mask=inb, other=0.0)
        if FREEZE:
            live = live & (w != 0)
            if not EMA:
                g_mask = live
    g = _grad(grad_table, t, offs, g_mask, grad_scale_ptr, HAS_SCALE, G_DTYPE)
    if MAXIMIZE:
        g = -g
    s, fisher = _importance(g, ptr_table, t, offs, inb, fisher_beta, one_minus_fisher_beta, EMA)
    g_mod = g * grad_coefficient
    s_hi = tl.load(mrow + M_STREAM_HI)
    first_global = tl.load(mrow + M_FIRST_ELEMENT) + first  # the RNG index of the full tensor
    if GE:
        if ALIGNED:
            z = normal_block(first_global, new_step.to(tl.int64), s_hi + 1, seed_lo, seed_hi, BLOCK)
        else:
            z = normal_at(first_global + tl.arange(0, BLOCK), new_step.to(tl.int64), s_hi + 1, seed_lo, seed_hi)
        g_mod += tl.load(sc + S_STD) * z

    selected = inb
    pi_sum = tl.full([], 0.0, tl.float64)  # this block's row of the stats (sampled elements only)
    selected_sum = tl.full([], 0.0, tl.float64)
    if MASK_MODE == 1:
        degenerate = tl.load(sc + S_DEGENERATE)
        level_x, level_p0 = _level(levels, t, SAMPLING)
        pi = tl.where(dense_ratio, 1.0, inclusion_prob(s, level_x, level_p0, degenerate, ratio, min_prob, SAMPLING))
        if ALIGNED:
            u = uniform_block(first_global, new_step.to(tl.int64), s_hi, seed_lo, seed_hi, BLOCK)
        else:
            u = uniform_at(first_global + tl.arange(0, BLOCK), new_step.to(tl.int64), s_hi, seed_lo, seed_hi)
        selected = inb & (u < pi)
        if FREEZE:
            live = live & selected
        w = tl.where(dense_ratio, 1.0, _weight(pi, s, tl.load(sc + S_TOTAL), degenerate, tl.load(mrow + M_FULL_UNITS),
                                              RESCALE))
        g_mod = tl.where(selected, g_mod * w, 0.0)
        # where, not a product: a skipped tensor's pi may be NaN
        pi_sum = tl.where(ok, tl.sum(tl.where(inb, pi, 0.0), axis=0), 0.0).to(tl.float64)
        selected_sum = tl.where(ok, tl.sum(selected.to(tl.float32), axis=0), 0.0).to(tl.float64)
    elif MASK_MODE == 2:
        selected = inb & (w != 0)
        g_mod = tl.where(selected, g_mod * w, 0.0)

    pp = tl.load(prow + P_PARAM).to(tl.pointer_type(P_DTYPE))
    p = tl.load(pp + offs, mask=live, other=0.0).to(tl.float32)
    if BASE == 0:
        d = g_mod + weight_decay * p
        if HAS_MOMENTUM:
            bp = tl.load(prow + P_MOMENTUM).to(tl.pointer_type(tl.float32))
            buf = tl.load(bp + offs, mask=live, other=0.0)
            buf = tl.where(new_step == 1.0, d, buf * momentum + d * one_minus_dampening)
            if NESTEROV:
                d = d + momentum * buf
            else:
                d = buf
        new_p = p - lr * d
    else:
        if BASE == 2:
            p_decayed = p * tl.load(sc + S_DECAY)
        else:
            p_decayed = p
            g_mod = g_mod + weight_decay * p
        mp = tl.load(prow + P_EXP_AVG).to(tl.pointer_type(tl.float32))
        vp = tl.load(prow + P_EXP_AVG_SQ).to(tl.pointer_type(tl.float32))
        m = tl.load(mp + offs, mask=live, other=0.0)
        v = tl.load(vp + offs, mask=live, other=0.0)
        # IEEE-rounded sqrt and division (Triton's defaults are approximate on GPU)
        m = m + (g_mod - m) * one_minus_beta1
        v = v * beta2 + g_mod * g_mod * one_minus_beta2
        denom = tl.div_rn(tl.sqrt_rn(v), tl.load(sc + S_BC2_SQRT)) + eps
        new_p = p_decayed - tl.load(sc + S_STEP_SIZE) * tl.div_rn(m, denom)
    if MODULATE_UPDATE:
        new_p = tl.where(update_coefficient != 1.0, p + (new_p - p) * update_coefficient, new_p)

    update = tl.where(ok, inb, False)  # (a block & a loaded scalar bool fails in the interpreter)
    if FREEZE:
        update = update & selected
    tl.store(pp + offs, new_p.to(P_DTYPE), mask=update)
    if BASE == 0:
        if HAS_MOMENTUM:
            tl.store(bp + offs, buf, mask=update)
    else:
        tl.store(mp + offs, m, mask=update)
        tl.store(vp + offs, v, mask=update)
    if EMA:
        fp = tl.load(prow + P_FISHER).to(tl.pointer_type(tl.float32))
        tl.store(fp + offs, fisher, mask=update if not FREEZE else tl.where(ok, inb, False))
    row = stat_rows + pid.to(tl.int64) * STAT_COLS
    zero = tl.full([], 0.0, tl.float64)
    tl.store(row + 0, pi_sum)
    tl.store(row + 1, selected_sum)
    tl.store(row + 2, zero)
    tl.store(row + 3, zero)


# ----------------------------------------------------------------------------- host side

BLOCK_SIZE = 1024
REDUCE_BLOCK = 256


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


def _layout(work: dict, group: TensorGroup, granularity: str) -> _Layout:
    params = work["params"]
    device = params[0].device

    def ptr(values, i):
        return values[i].data_ptr() if values else 0

    rows = [
        (ptr(params, i), ptr(work["exp_avgs"], i), ptr(work["exp_avg_sqs"], i),
         ptr(work["momentum_buffers"], i), ptr(work["fishers"], i), group.steps[i].data_ptr())
        for i in range(len(params))
    ]
    key = (device, granularity, tuple(rows), tuple(p.shape for p in params), tuple(group.slots),
           tuple(group.shards))

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
            space = group.index_space(t, granularity)
            aligned = aligned and space.first_unit % 4 == 0 and space.first_element % 4 == 0
            meta.append([n, units, max(row, 1), 2 * group.slots[t], part_start, parts, unit_offset, block_start,
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


def _check_batch(group: TensorGroup) -> torch.device:
    params = group.params
    device = params[0].device
    p_dtype, g_dtype = params[0].dtype, group.grads[0].dtype
    if any(p.dtype != p_dtype for p in params) or any(g.dtype != g_dtype for g in group.grads):
        raise TypeError("triton masked_step_: all params (and all grads) of a batch must share a dtype")
    if any(x.device != device for x in params + group.grads + group.steps):
        raise ValueError("triton masked_step_: all tensors of a batch must be on one device")
    return device


def _pass1(layout: _Layout, grads: torch.Tensor, work: dict, k: KernelConfig, grad_scale: torch.Tensor | None,
           device: torch.device, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: (fp64 partials [blocks or rows, 4], each row's importance fp32 [n_units]); with
    water-filling, each tensor's importance histogram is added to ``sums``'s columns after the
    first PART_COLS (``sums``: zeros [T, PART_COLS + HIST_BINS])."""
    n_partials = layout.n_units if k.row else layout.n_blocks
    partials = torch.empty((max(n_partials, 1), PART_COLS.value), dtype=torch.float64, device=device)
    row_importance = torch.empty(max(layout.n_units, 1), dtype=torch.float32, device=device)
    hist = k.masked and k.poisson
    pass1 = dict(grad_table=grads, ptr_table=layout.pointers, meta=layout.meta, partials=partials,
                 hist=sums[:, PART_COLS.value:] if hist else partials, sums_width=sums.shape[1],
                 grad_scale_ptr=grad_scale if grad_scale is not None else partials, fisher_beta=k.fisher_beta,
                 one_minus_fisher_beta=1.0 - k.fisher_beta, HAS_SCALE=grad_scale is not None, EMA=k.ema, HIST=hist,
                 G_DTYPE=TL_DTYPES[work["grads"][0].dtype], BLOCK=BLOCK_SIZE)
    if k.row and layout.n_units:
        pass1_rows[(layout.n_units,)](row_tensor=layout.row_tensor, row_importance=row_importance, **pass1)
    elif not k.row and layout.n_blocks:
        pass1_blocks[(layout.n_blocks,)](block_tensor=layout.block_tensor, **pass1)
    return partials, row_importance


def launch_sums(
    group: TensorGroup, work: dict[str, list[torch.Tensor]], cfg: StepConfig, grad_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 of a batch alone: (per-tensor sums float64 [T, cfg.sums_width], each row's
    importance fp32 [units] for row granularity, else empty), for ``launch(..., sums=...)``
    after the caller has all-reduced the sums of sharded tensors. ``work``, ``group``: as
    ``launch``."""
    device = _check_batch(group)
    k = KernelConfig.from_step(cfg, ema=bool(work["fishers"]))
    layout = _layout(work, group, cfg.granularity)
    sums = torch.zeros((len(group), cfg.sums_width), dtype=torch.float64, device=device)
    partials, row_importance = _pass1(layout, _grad_table(work["grads"]), work, k, grad_scale, device, sums)
    sum_partials[(len(group),)](meta=layout.meta, partials=partials, sums_out=sums, sums_width=sums.shape[1],
                                RBLOCK=REDUCE_BLOCK)
    return sums, row_importance[: layout.n_units] if k.row else row_importance.new_empty(0)


def launch(
    group: TensorGroup, work: dict[str, list[torch.Tensor]], cfg: StepConfig, grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None, exact_weights: torch.Tensor | None, sums: torch.Tensor | None = None,
    unit_importance: torch.Tensor | None = None,
) -> None:
    """Launch the step (the semantics of ``fastmask.reference.step``) on one batch.

    ``work``: contiguous versions of the batch's params, grads and states (lists keyed by the
    ``TensorGroup`` field names; the caller writes copies back); ``group`` supplies the steps,
    slots, shards and stats. ``exact_weights``: for sampling="exact", the per-unit weight table
    of the units chosen on the host (0 = not selected), else None. ``sums`` and
    ``unit_importance``: ``launch_sums``'s results (the sums all-reduced over shards); pass 1 is
    then not run again. Water-filling: pass 1 adds the histograms to a [T, cfg.sums_width]
    buffer, from which ``reduce_tensors`` solves each tensor's level (no host sync): three
    launches.
    """
    params = group.params
    device = _check_batch(group)
    p_dtype, g_dtype = params[0].dtype, group.grads[0].dtype
    k = KernelConfig.from_step(cfg, ema=bool(work["fishers"]))
    layout = _layout(work, group, cfg.granularity)
    grads = _grad_table(work["grads"])
    n_tensors = len(params)
    f32 = dict(dtype=torch.float32, device=device)
    # every entry read is written first (row sampling fills the whole unit table): no fills
    unit_weight = torch.empty(max(layout.n_units if k.masked else 1, 1), **f32)
    scalars = torch.empty((n_tensors, SCALAR_COLS.value), **f32)
    stat_rows = torch.empty((layout.n_blocks + n_tensors, STAT_COLS.value), dtype=torch.float64, device=device)
    dummy = scalars
    settings = cfg.device_settings(device)
    grad_scale_ptr = grad_scale if grad_scale is not None else dummy
    seed = dict(seed_lo=k.seed & 0xFFFFFFFF, seed_hi=k.seed >> 32)
    importance = dict(fisher_beta=k.fisher_beta, one_minus_fisher_beta=1.0 - k.fisher_beta)

    exact_counts = dummy
    if k.exact:
        unit_weight = exact_weights
        exact_counts = torch.tensor(
            [float(exact_count(float(cfg.ratio), u)) if u else 0.0 for u in layout.units], dtype=torch.float64,
            device=device
        )

    if sums is None:
        histograms = (torch.zeros((n_tensors, cfg.sums_width), dtype=torch.float64, device=device)
                      if cfg.water_filling else dummy)
        partials, row_importance = _pass1(layout, grads, work, k, grad_scale, device, histograms)
    else:
        partials = histograms = sums.to(device=device, dtype=torch.float64).contiguous()
        row_importance = unit_importance if k.row and layout.n_units else dummy
    if cfg.water_filling:  # solved by reduce_tensors, read by pass 2
        levels = torch.empty((n_tensors, 2), dtype=torch.float64, device=device)
        min_prob_f64, events_x, events_a, events_c = _level_constants(cfg.min_prob, device)
    else:
        levels = min_prob_f64 = events_x = events_a = events_c = dummy

    lr_is_tensor = isinstance(cfg.lr, torch.Tensor)
    lr_hi, lr_lo = _split_f64(k.lr)
    beta1_hi, beta1_lo = _split_f64(k.beta1)
    beta2_hi, beta2_lo = _split_f64(k.beta2)
    reduce_tensors[(n_tensors,)](
        ptr_table=layout.pointers, meta=layout.meta, partials=partials, histograms=histograms,
        sums_width=histograms.shape[1] if cfg.water_filling else partials.shape[1], levels=levels,
        row_importance=row_importance,
        unit_weight=unit_weight, scalars=scalars, stat_rows=stat_rows, n_blocks=layout.n_blocks,
        exact_counts=exact_counts, found_inf_ptr=found_inf if found_inf is not None else dummy,
        lr_ptr=cfg.lr.to(device=device, dtype=torch.float32) if lr_is_tensor else dummy,
        lr_hi=lr_hi, lr_lo=lr_lo, decay_value=1.0 if lr_is_tensor else 1.0 - k.lr * k.weight_decay,
        weight_decay=k.weight_decay, settings_ptr=settings, min_prob=k.min_prob, **seed,
        beta1_hi=beta1_hi, beta1_lo=beta1_lo, beta2_hi=beta2_hi, beta2_lo=beta2_lo, min_prob_f64=min_prob_f64,
        events_x=events_x, events_a=events_a, events_c=events_c, n_events=events_x.numel(),
        n_halvings=events_x.numel().bit_length(), WATER_LEVEL=cfg.water_filling, HAS_FOUND_INF=found_inf is not None, LR_IS_TENSOR=lr_is_tensor, MASK_MODE=k.mask_mode,
        ROW_SAMPLING=k.masked and k.row and not k.exact, EXACT=k.exact, SAMPLING=0 if k.poisson else 1, RESCALE=k.rescale,
        PRE_SUMMED=sums is not None, ALIGNED=layout.aligned, RBLOCK=REDUCE_BLOCK,
        enable_fp_fusion=False,
    )

    if layout.n_blocks:
        pass2[(layout.n_blocks,)](
            grad_table=grads, ptr_table=layout.pointers, meta=layout.meta, block_tensor=layout.block_tensor,
            scalars=scalars, levels=levels, unit_weight=unit_weight, stat_rows=stat_rows,
            grad_scale_ptr=grad_scale_ptr, **seed,
            settings_ptr=settings, min_prob=k.min_prob, one_minus_beta1=1.0 - k.beta1, beta2=k.beta2,
            one_minus_beta2=1.0 - k.beta2, eps=k.eps, momentum=k.momentum, one_minus_dampening=1.0 - k.dampening,
            weight_decay=k.weight_decay, **importance,
            BASE=k.base, MASK_MODE=k.mask_mode, SAMPLING=0 if k.poisson else 1, RESCALE=k.rescale, FREEZE=k.freeze,
            EMA=k.ema, GE=k.ge, HAS_MOMENTUM=k.has_momentum, NESTEROV=k.nesterov, MAXIMIZE=k.maximize,
            HAS_SCALE=grad_scale is not None, MODULATE_UPDATE=k.modulate_update, ALIGNED=layout.aligned,
            P_DTYPE=TL_DTYPES[p_dtype], G_DTYPE=TL_DTYPES[g_dtype], BLOCK=BLOCK_SIZE,
            enable_fp_fusion=False,  # no contraction into FMAs: every op rounds as the reference's
        )
    if group.stats is not None:
        group.stats += stat_rows.sum(0)


__all__ = ["launch", "launch_sums", "pass1_blocks", "pass1_rows", "pass2", "reduce_tensors", "sum_partials"]
