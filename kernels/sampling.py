"""Water-filling in Triton: the importance bins and the inclusion probability of a unit
(DESIGN §3 item 3; the reference is ``fastmask.reference.sampling``), shared by the fused step
and the low-level ops."""

import triton
import triton.language as tl

HIST_BINS = tl.constexpr(2048)  # bins of the importance histogram (after the 4 sums of pass 1)
BIN_SHIFT = tl.constexpr(20)


@triton.jit
def importance_bins(s):
    """Each unit's histogram bin: the top 11 bits of its fp32 importance (s >= 0)."""
    return (s.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >> BIN_SHIFT


@triton.jit
def inclusion_prob(s, level_x, p0, degenerate, ratio, min_prob, SAMPLING: tl.constexpr):
    """Water-filling (SAMPLING 0): pi = clamp(fp32(q x), min_prob, 1), q = s rounded down to 4
    significant bits, or p0 in bin 0, from the tensor's water level (x fp64, p0); ratio for
    uniform (1), or when S is 0 or not finite (degenerate != 0)."""
    if SAMPLING == 0:
        bins = importance_bins(s)
        q = (bins << BIN_SHIFT).to(tl.float32, bitcast=True)
        pi = tl.minimum(tl.maximum((q.to(tl.float64) * level_x).to(tl.float32), min_prob), 1.0)
        pi = tl.where(bins == 0, p0, pi)
        return tl.where(degenerate != 0, ratio, pi)
    return tl.zeros_like(s) + ratio


@triton.jit
def add_histogram(s, inb, hist_row):
    """Add the counts of a block's bins to ``hist_row`` (fp64 [HIST_BINS]): integer counts,
    exact in any order of the atomic adds; NaN bits go to the last bin."""
    counts = tl.histogram(tl.minimum(importance_bins(s), HIST_BINS - 1), HIST_BINS, mask=inb)
    tl.atomic_add(hist_row + tl.arange(0, HIST_BINS), counts.to(tl.float64), mask=counts > 0)


# The water level in a kernel: ``fastmask.reference.sampling.water_level``, the same operations
# in the same order. Masses are exact integers (limbs of MASS_LIMB_BITS bits at a unit of
# 2^-129, in a vector of MASS_LIMBS), so the order of the reductions that sum them is free.
FINITE_BINS = tl.constexpr(2040)  # bins 1 .. 2039 are the positive, finite importances
MASS_LIMB_BITS = tl.constexpr(24)
MASS_LIMBS = tl.constexpr(16)  # the reference's 13, padded to a power of two


@triton.jit
def _shift_up(values, idx):
    """values[i - 1] at i (0 at 0), for a vector over idx = arange(MASS_LIMBS)."""
    return tl.sum(tl.where(idx[:, None] + 1 == idx[None, :], values[:, None], 0), axis=0)


@triton.jit
def _mass_to_float(limbs):
    """``sampling.mass_to_float`` of non-negative int64 limbs [MASS_LIMBS] (each below 2^40):
    the canonical limbs (each below 2^24, the top one holding the rest), then the top three as
    float64 times their power of two. Two rounds of carries leave every limb at most 2^24; the
    last carries (a limb at 2^24, through limbs at 2^24 - 1) are looked ahead, as an adder does."""
    idx = tl.arange(0, MASS_LIMBS)
    mask = 0xFFFFFF  # MASS_LIMB_BITS ones
    below_top = idx < MASS_LIMBS - 1
    for _ in tl.static_range(2):
        carry = tl.where(below_top, limbs >> MASS_LIMB_BITS, 0)
        limbs = tl.where(below_top, limbs & mask, limbs) + _shift_up(carry, idx)
    generate = below_top & (limbs == mask + 1)
    stops = tl.where(below_top & (limbs == mask), 0, 1)  # a limb that does not pass a carry on
    stops_below = tl.sum(tl.where(idx[:, None] < idx[None, :], stops[:, None], 0), axis=0)  # over k < i
    # carry into i: some j < i generates and every limb strictly between passes it on
    carried = generate[:, None] & (idx[:, None] < idx[None, :]) & ((stops_below + stops)[:, None] == stops_below[None, :])
    limbs = limbs + tl.max(carried.to(tl.int64), axis=0)
    limbs = tl.where(below_top, limbs & mask, limbs)
    top = tl.max(tl.where(limbs != 0, idx, -1), axis=0)
    limb_top = tl.sum(tl.where(idx == top, limbs, 0), axis=0)
    limb_1 = tl.sum(tl.where(idx == top - 1, limbs, 0), axis=0)
    limb_2 = tl.sum(tl.where(idx == top - 2, limbs, 0), axis=0)
    high = limb_top * 16777216 + limb_1  # < 2^49: exact in float64
    value = high.to(tl.float64) * 16777216.0 + limb_2.to(tl.float64)
    scale = (((top - 2) * MASS_LIMB_BITS - 129 + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    return tl.where(top >= 0, value * scale, 0.0)


@triton.jit
def _range_mass(values, bins, first_bin, end_bin):
    """The mass of bins [first_bin, end_bin) as float64 (``sampling.mass_to_float`` of their
    exact sum). ``values``: int64 [256, 8], n_j M_j of bin j at [j >> 3, j & 7] (0 outside the
    positive bins); ``bins``: those bin numbers."""
    group = tl.sum(tl.where((bins >= first_bin) & (bins < end_bin), values, 0), axis=1)
    # [256]: one exponent field's bins share a power of two, 2^(binade - 129); below 2^51
    binade = tl.maximum(tl.arange(0, 256), 1) - 1
    shift, limb = binade % MASS_LIMB_BITS, binade // MASS_LIMB_BITS
    mask = 0xFFFFFF  # MASS_LIMB_BITS ones
    w0 = (group & mask) << shift
    w1 = ((group >> MASS_LIMB_BITS) & mask) << shift
    w2 = (group >> 48) << shift
    pieces = (w0 & mask, (w0 >> MASS_LIMB_BITS) + (w1 & mask), (w1 >> MASS_LIMB_BITS) + (w2 & mask),
              w2 >> MASS_LIMB_BITS)
    d = tl.arange(0, MASS_LIMBS)[None, :] - limb[:, None]  # [256, MASS_LIMBS]: limb - the group's first
    placed = tl.where(d == 0, pieces[0][:, None],
                      tl.where(d == 1, pieces[1][:, None],
                               tl.where(d == 2, pieces[2][:, None], tl.where(d == 3, pieces[3][:, None], 0))))
    return _mass_to_float(tl.sum(placed, axis=0))


@triton.jit
def _level_f(counts, values, bins, n_zero, n_pos, min_prob, events_x, events_a, events_c, e):
    """f at breakpoint e: min_prob (N0 + C(a)) + x D(a, c) + (n+ - C(c)), in that order."""
    a = tl.load(events_a + e)
    c = tl.load(events_c + e)
    count_a = tl.sum(tl.sum(tl.where(bins < a + 1, counts, 0.0), axis=1), axis=0)  # exact integers
    count_c = tl.sum(tl.sum(tl.where(bins < c + 1, counts, 0.0), axis=1), axis=0)
    mass = _range_mass(values, bins, a + 1, c + 1)
    return min_prob * (n_zero + count_a) + tl.load(events_x + e) * mass + (n_pos - count_c)


@triton.jit
def water_level(hist_row, ratio, min_prob_ptr, events_x, events_a, events_c, n_events, n_halvings):
    """One tensor's water level (x fp64, p0 fp32) from its histogram row (fp64 [HIST_BINS]):
    ``fastmask.reference.sampling.water_level``, bit for bit. ``ratio``: fp32; ``min_prob_ptr``:
    fp64 [1]; events: ``sampling.level_events``' (x fp64, a and c int64, [n_events]);
    ``n_halvings``: n_events.bit_length(). f at the bracketing breakpoints is kept from the
    bisection (the reference evaluates them again: the same operations, the same bits)."""
    bins = tl.arange(0, 256)[:, None] * 8 + tl.arange(0, 8)[None, :]
    counts = tl.load(hist_row + bins, mask=(bins >= 1) & (bins < FINITE_BINS), other=0.0)
    exponent = bins >> 3
    values = counts.to(tl.int64) * (tl.where(exponent > 0, 8, 0) + (bins & 7))  # n_j M_j: q_j = M_j 2^(B_j - 129)
    min_prob = tl.load(min_prob_ptr)
    n_zero = tl.load(hist_row)
    n_pos = tl.sum(tl.sum(counts, axis=1), axis=0)
    n = n_zero + n_pos
    k = ratio.to(tl.float64) * n
    f_start = min_prob * n
    lo = tl.zeros([], tl.int64)
    hi = tl.zeros([], tl.int64) + n_events
    f_lo = f_start  # f before the first breakpoint above lo, and at hi
    f_hi = f_start
    for _ in range(n_halvings):
        mid = (lo + hi) // 2
        active = lo < hi
        f_mid = _level_f(counts, values, bins, n_zero, n_pos, min_prob, events_x, events_a, events_c,
                         tl.minimum(mid, n_events - 1))
        reached = f_mid >= k
        hi = tl.where(active & reached, mid, hi)
        f_hi = tl.where(active & reached, f_mid, f_hi)
        lo = tl.where(active & ~reached, mid + 1, lo)
        f_lo = tl.where(active & ~reached, f_mid, f_lo)
    saturated = lo == n_events
    x_hi = tl.load(events_x + tl.minimum(lo, n_events - 1))
    x_lo = tl.where(lo > 0, tl.load(events_x + tl.maximum(lo - 1, 0)), 0.0)
    x = x_lo + (k - f_lo) * (x_hi - x_lo) / (f_hi - f_lo)
    x = tl.where(k <= f_start, 0.0, tl.where(saturated, float("inf"), x))
    share = tl.minimum(tl.maximum((k - n_pos) / n_zero, min_prob), 1.0)
    p0 = tl.where(saturated & (n_zero > 0), share, min_prob).to(tl.float32)
    p0 = tl.where(n_pos == 0, ratio, p0)
    return x, p0
