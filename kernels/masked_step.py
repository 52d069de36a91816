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
of small tensors cost three launches, not thousands. Semantics: DESIGN §3. The host side
(layouts, pointer tables, the launches): ``fastmask.backends.triton.step``.
"""

import triton
import triton.language as tl

from .philox import normal_at, normal_block, uniform_at, uniform_block
from .sampling import HIST_BINS, add_histogram, importance_bins, inclusion_prob, water_level

BLOCK_SIZE = 1024  # elements per program of the element passes
REDUCE_BLOCK = 256  # partials summed per iteration of the per-tensor reduce

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
