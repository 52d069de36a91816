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
