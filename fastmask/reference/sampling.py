"""Importance, units, inclusion probabilities, selection and rescaling (DESIGN §3).

Plain vectorised PyTorch, no host synchronisation: the oracle for every backend.
Unit-level functions take 1-D tensors of N units; ``unit_view`` maps a tensor
to its units (elements, or dim-0 slices for ``granularity="row"``).
"""

from __future__ import annotations

import torch

from .philox import uniform
from .spec import HIST_BINS, exact_count, unit_count


def fisher_update(fisher: torch.Tensor, grad32: torch.Tensor, beta: float) -> torch.Tensor:
    """F' = beta * F + (1 - beta) * g^2 (fp32), returned out of place."""
    return fisher * beta + grad32 * grad32 * (1.0 - beta)


def unit_sums(importance: torch.Tensor, granularity: str) -> torch.Tensor:
    """Per-unit importance s_u, 1-D fp32 of length N (row: sum over the dim-0 slice)."""
    n = unit_count(importance.shape, granularity)
    flat = importance.reshape(n, -1) if n else importance.reshape(0, 1)
    if granularity == "row":
        return flat.sum(dim=1, dtype=torch.float64).to(torch.float32)
    return flat.reshape(-1).to(torch.float32)


def unit_total(s_units: torch.Tensor) -> torch.Tensor:
    """S = sum of s_u, accumulated in fp64 and rounded to fp32: every backend sums this way,
    so S (and pi) agree bit for bit except at fp32 rounding boundaries."""
    return s_units.sum(dtype=torch.float64).to(torch.float32)


def expand_units(values: torch.Tensor, shape: torch.Size, granularity: str) -> torch.Tensor:
    """Broadcast per-unit values back to a tensor of ``shape`` (logical row-major)."""
    if granularity == "element":
        return values.reshape(shape)
    if len(shape) == 0:
        return values.reshape(())
    return values.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape)


def degenerate(total: torch.Tensor) -> torch.Tensor:
    """S == 0 or S not finite: the importance carries no usable signal."""
    return ~(torch.isfinite(total) & (total > 0))


# Water-filling (DESIGN §3 item 3) runs on a per-tensor histogram of the unit importances s_u:
# a unit's bin is the top 11 bits of s_u's fp32 pattern (8 exponent bits, 3 mantissa bits), so
# a bin is a 1/8-octave and its floor q_j (the bin's smallest value) is s_u rounded down to 4
# significant bits. Bin 0 holds s_u = 0 (and s_u < 2^-129, which counts as 0); bins from
# FINITE_BINS hold inf / NaN; HIST_BINS (spec) = 2048. The counts are exact integers, so a histogram sums exactly over
# blocks, threads and shards in any order, and one all-reduce gives the full tensor's.
BIN_SHIFT = 20  # 23 mantissa bits, 3 kept
FINITE_BINS = 0x7F800000 >> BIN_SHIFT  # 2040


def importance_bins(s_units: torch.Tensor) -> torch.Tensor:
    """Each unit's histogram bin (int64): the top 11 bits of its fp32 importance (s_u >= 0)."""
    return ((s_units.to(torch.float32).view(torch.int32) & 0x7FFFFFFF) >> BIN_SHIFT).to(torch.int64)


def bin_floor(bins: torch.Tensor) -> torch.Tensor:
    """q_j, the smallest fp32 value of bin j, as float64 (q_0 = 0): s_u rounded down to 4 bits."""
    return (bins.to(torch.int32) << BIN_SHIFT).view(torch.float32).to(torch.float64)


def unit_histogram(s_units: torch.Tensor) -> torch.Tensor:
    """Counts of the units in each bin, float64 [HIST_BINS] (exact integers)."""
    return torch.bincount(importance_bins(s_units), minlength=HIST_BINS).to(torch.float64)


_LEVEL_EVENTS: dict[tuple[float, torch.device], tuple[torch.Tensor, ...]] = {}


def level_events(min_prob: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(q, x, a, c): the floors q_j of the positive bins (float64), and the breakpoints x of
    f(x) = sum_j n_j clamp(q_j x, min_prob, 1) (x = 1/tau, ascending, float64), with for each
    the positive bins at min_prob there ([0, a), int64) and the first bin at 1 (bins [c, end),
    int64). They depend only on min_prob: computed once, in float64 on the host, so every device
    reads the same values. With min_prob = 0, a is 0 and c runs down from the last bin."""
    key = (min_prob, device)
    if key not in _LEVEL_EVENTS:
        q = bin_floor(torch.arange(1, FINITE_BINS))
        index = torch.arange(q.numel())
        if min_prob == 0:
            x, a, c = (1.0 / q).flip(0), torch.zeros_like(index), index.flip(0)
        else:
            # bin i reaches 1 at x = 1/q_i, and leaves min_prob at x = min_prob/q_i
            x = torch.cat((1.0 / q, min_prob / q))
            a = torch.cat((torch.searchsorted(q, min_prob * q, right=True), index + 1))
            c = torch.cat((index, torch.searchsorted(q, q / min_prob)))
            order = torch.argsort(x, stable=True)
            x, a, c = x[order], a[order], c[order]
        _LEVEL_EVENTS[key] = tuple(v.to(device) for v in (q, x, a, c))
    return _LEVEL_EVENTS[key]


# The masses n_j q_j of the level's prefix sums are summed exactly, as integers, so that every
# backend gets the same sums whatever order it adds them in (a GPU's parallel scan, a CPU's
# loop). A positive bin's floor is q_j = M_j 2^(B_j - 129), with M_j <= 15 and B_j in [0, 253]
# (bin_mass_terms): n_j q_j is the integer n_j M_j at bit B_j of a fixed-point number whose
# unit is 2^-129. That number is carried as MASS_LIMBS int64 limbs of MASS_LIMB_BITS bits
# (mass_limbs; sums of them are exact for counts below 2^44), and rounded to float64 by one
# rule (mass_to_float).
MASS_LIMB_BITS = 24
MASS_LIMBS = 13  # 312 bits: bit 253 of the top binade, a bin's 48-bit count x mantissa, carries
POSITIVE_BINS = FINITE_BINS - 1  # bins 1 .. 2039
_LIMB_MASK = (1 << MASS_LIMB_BITS) - 1


def bin_mass_terms(device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, B) int64 [POSITIVE_BINS]: bin j's floor is q_j = M_j 2^(B_j - 129) (bins 1-7 are
    fp32 denormals, M_j = j, B_j = 0; a normal bin of exponent field E has M_j = 8 + (j & 7),
    B_j = E - 1)."""
    j = torch.arange(1, FINITE_BINS, device=device)
    exponent = j >> 3
    return torch.where(exponent > 0, 8, 0) + (j & 7), exponent.clamp(min=1) - 1


def mass_limbs(counts: torch.Tensor) -> torch.Tensor:
    """int64 [..., POSITIVE_BINS, MASS_LIMBS]: each positive bin's mass n_j q_j as limbs (in
    units of 2^-129; each limb below 2^25). ``counts``: int64 [..., POSITIVE_BINS], below 2^44."""
    _check_int64("counts", counts, POSITIVE_BINS)
    mantissa, binade = bin_mass_terms(counts.device)
    value = counts * mantissa  # < 2^48: split in two so that shifting by up to 23 bits stays in int64
    shift, limb = binade % MASS_LIMB_BITS, binade // MASS_LIMB_BITS
    low, high = (value & _LIMB_MASK) << shift, (value >> MASS_LIMB_BITS) << shift
    pieces = torch.stack((low & _LIMB_MASK, (low >> MASS_LIMB_BITS) + (high & _LIMB_MASK), high >> MASS_LIMB_BITS), -1)
    index = (limb[:, None] + torch.arange(3, device=counts.device)).expand(pieces.shape)
    return torch.zeros(pieces.shape[:-1] + (MASS_LIMBS,), dtype=torch.int64, device=counts.device).scatter_add_(
        -1, index, pieces)


def mass_to_float(limbs: torch.Tensor) -> torch.Tensor:
    """A non-negative fixed-point mass (int64 [..., MASS_LIMBS] limbs, each of either sign and
    below 2^61 in size) rounded to float64 by one rule: carries propagated upwards (floor
    division), then the top nonzero limb t and the two below it, (L_t 2^24 + L_t-1) 2^24 +
    L_t-2, as float64 (one rounding; the limbs below are dropped), times 2^(24 (t - 2) - 129).
    Relative error below 2^-47; the same bits on every backend."""
    _check_int64("limbs", limbs, MASS_LIMBS)
    limbs = list(limbs.unbind(-1))
    for i in range(MASS_LIMBS - 1):
        limbs[i + 1] = limbs[i + 1] + (limbs[i] >> MASS_LIMB_BITS)
        limbs[i] = limbs[i] & _LIMB_MASK
    stacked = torch.stack(limbs, -1)
    index = torch.arange(MASS_LIMBS, device=stacked.device)
    top = torch.where(stacked != 0, index, -1).amax(-1)  # -1: zero

    def limb(i: torch.Tensor) -> torch.Tensor:  # limb i, 0 below limb 0
        return torch.where(i >= 0, stacked.gather(-1, i.clamp(min=0)[..., None])[..., 0], 0)

    high = limb(top) * (1 << MASS_LIMB_BITS) + limb(top - 1)  # < 2^49: exact in float64
    value = high.to(torch.float64) * float(1 << MASS_LIMB_BITS) + limb(top - 2).to(torch.float64)
    scale = ((MASS_LIMB_BITS * (top - 2) - 129 + 1023) << 52).view(torch.float64)  # 2^(24 (t - 2) - 129)
    return torch.where(top >= 0, value * scale, 0.0)


def _check_int64(name: str, value: object, last_dim: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.dim() < 1 or \
            value.shape[-1] != last_dim:
        got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be an int64 tensor [..., {last_dim}], got {got}")


def water_level(histograms: torch.Tensor, ratio: float | torch.Tensor, min_prob: float) -> torch.Tensor:
    """The water level of each tensor from its importance histogram: float64 [T, 2] = (x, p0).

    ``histograms``: float64 [T, HIST_BINS] (``unit_histogram``'s, summed over shards). A unit in
    bin j > 0 gets pi = clamp(fp32(q_j * x), min_prob, 1) and a unit in bin 0 gets p0, with x
    (= 1/tau) such that sum_u pi_u = k = fp32(ratio) * N, N the tensor's units (DESIGN §3 item
    3, on importances rounded down to 4 significant bits):

    - f(x) = N0 p0 + sum_j n_j clamp(q_j x, min_prob, 1) is continuous, non-decreasing and linear
      between its breakpoints (``level_events``: x_e, and the bins [0, a_e) at min_prob and
      [c_e, end) at 1). At breakpoint e, f_e = min_prob (N0 + C(a_e)) + x_e D(a_e, c_e)
      + (n+ - C(c_e)), in that order of float64 operations, with C(i) the count of the positive
      bins below i (exact) and D(a, c) the mass of the bins [a, c), summed exactly and rounded
      by ``mass_to_float``. The first breakpoint with f_e >= k is found by bisection (lo = 0,
      hi = E; while lo < hi: mid = (lo + hi) // 2, f_mid >= k ? hi = mid : lo = mid + 1), and
      x is the linear interpolation between it and the one before (f = min_prob N before the
      first). The same operations give the same bits on every backend; no host sync.
    - k <= N min_prob: x = 0, every unit at min_prob. k above every f_e (every unit with q > 0
      at 1): x = inf, and the N0 units of bin 0 share the rest, p0 = max(min_prob,
      (k - n+) / N0). No unit with q > 0 (every unit in bin 0): p0 = ratio.
    The caller handles ratio >= 1 (every unit at 1) and S = 0 or not finite (pi = ratio).
    """
    if histograms.dim() != 2 or histograms.shape[1] != HIST_BINS:
        raise ValueError(f"histograms must be [tensors, {HIST_BINS}] (unit_histogram's), got "
                         f"{tuple(histograms.shape)}")
    hist = histograms.to(torch.float64)
    _, x_events, a_events, c_events = level_events(float(min_prob), hist.device)
    positive = hist[:, 1:FINITE_BINS]
    zero = hist.new_zeros(len(hist), 1)
    counts = torch.cat((zero, positive.cumsum(1)), 1)  # exclusive prefix sums of exact integers
    limbs = mass_limbs(positive.to(torch.int64)).cumsum(1)
    mass = torch.cat((limbs.new_zeros(len(hist), 1, MASS_LIMBS), limbs), 1)  # exclusive, exact
    n_zero, n_pos = hist[:, 0], counts[:, -1]
    n = n_zero + n_pos
    ratio32 = ratio.to(torch.float32).reshape(()) if isinstance(ratio, torch.Tensor) else hist.new_tensor(
        ratio, dtype=torch.float32)
    k = ratio32.to(torch.float64) * n
    f_start = min_prob * n

    def f_at(e: torch.Tensor) -> torch.Tensor:  # f at breakpoint e[t] of each tensor t
        a, c = a_events[e], c_events[e]
        between = (mass.gather(1, c[:, None, None].expand(-1, 1, MASS_LIMBS))
                   - mass.gather(1, a[:, None, None].expand(-1, 1, MASS_LIMBS)))[:, 0]
        count_a, count_c = counts.gather(1, a[:, None])[:, 0], counts.gather(1, c[:, None])[:, 0]
        return min_prob * (n_zero + count_a) + x_events[e] * mass_to_float(between) + (n_pos - count_c)

    n_events = len(x_events)
    lo = torch.zeros(len(hist), dtype=torch.int64, device=hist.device)
    hi = torch.full_like(lo, n_events)
    for _ in range(n_events.bit_length()):  # enough halvings of [0, E]
        mid = (lo + hi) // 2
        active = lo < hi
        reached = f_at(mid.clamp(max=n_events - 1)) >= k
        hi = torch.where(active & reached, mid, hi)
        lo = torch.where(active & ~reached, mid + 1, lo)
    first = lo
    saturated = first == n_events
    at, before = first.clamp(max=n_events - 1), (first - 1).clamp(min=0)
    x_hi, f_hi = x_events[at], f_at(at)
    x_lo = torch.where(first > 0, x_events[before], 0.0)
    f_lo = torch.where(first > 0, f_at(before), f_start)
    x = x_lo + (k - f_lo) * (x_hi - x_lo) / (f_hi - f_lo)
    x = torch.where(k <= f_start, 0.0, torch.where(saturated, float("inf"), x))
    share = ((k - n_pos) / n_zero).clamp(min=min_prob, max=1.0)
    p0 = torch.where(saturated & (n_zero > 0), share, min_prob).to(torch.float32)
    p0 = torch.where(n_pos == 0, ratio32, p0)
    return torch.stack((x, p0.to(torch.float64)), 1)


def poisson_probs(
    s_units: torch.Tensor,
    ratio: float | torch.Tensor,
    min_prob: float = 0.0,
    level: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Water-filling: pi_u = clamp(fp32(q_u * x), min_prob, 1) for units with q_u > 0 and p0 for
    the rest, (x, p0) = ``level`` (``water_level``'s row for this tensor); pi_u = ratio if S is
    0 or not finite; pi_u = 1 when ratio >= 1 (a ratio tensor is compared on its device).

    ``level`` and ``total`` (S, fp32) default to those of ``s_units``; a shard passes its full
    tensor's.
    """
    on_device = isinstance(ratio, torch.Tensor)
    if not on_device and ratio >= 1.0:
        return torch.ones_like(s_units)
    total = unit_total(s_units) if total is None else total
    if level is None:
        level = water_level(unit_histogram(s_units)[None], ratio, min_prob)[0]
    ratio32 = ratio.to(torch.float32).reshape(()) if on_device else total.new_tensor(ratio)
    bins = importance_bins(s_units)
    pi = (bin_floor(bins) * level[0]).to(torch.float32).clamp(min=min_prob, max=1.0)
    pi = torch.where(bins == 0, level[1].to(torch.float32), pi)
    pi = torch.where(degenerate(total), ratio32, pi)
    return torch.where(ratio32 >= 1.0, 1.0, pi) if on_device else pi


def uniform_probs(s_units: torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
    """pi_u = ratio for every unit (the paper's uniform-subnetwork baseline)."""
    if isinstance(ratio, torch.Tensor):
        return ratio.to(torch.float32).reshape(()).clamp(max=1.0).expand(s_units.shape)
    return torch.full_like(s_units, min(ratio, 1.0))


def inclusion_probs_units(
    s_units: torch.Tensor,
    ratio: float | torch.Tensor,
    sampling: str,
    min_prob: float,
    level: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    if sampling == "poisson":
        return poisson_probs(s_units, ratio, min_prob, level, total)
    if sampling == "uniform":
        return uniform_probs(s_units, ratio)
    raise ValueError(f"sampling={sampling!r} has no closed-form inclusion probabilities; use sample_exact")


def bernoulli_select(pi: torch.Tensor, seed: int, stream: int | torch.Tensor, start: int = 0) -> torch.Tensor:
    """Unit u selected iff U(seed, stream, start + u) < pi_u."""
    return uniform(seed, stream, pi.numel(), pi.device, start=start) < pi


def gumbel_keys(s_units: torch.Tensor, seed: int, stream: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-top-k keys log w_u - log(-log U_u) and the noise G_u = -log(-log U_u).

    w_u = s_u, or 1 for every unit when S is 0 or not finite (uniform fallback).
    """
    u = uniform(seed, stream, s_units.numel(), s_units.device)
    noise = -torch.log(-torch.log(u))
    weights = torch.where(degenerate(unit_total(s_units)), torch.ones_like(s_units), s_units)
    return torch.log(weights) + noise, noise


def top_by_keys(keys: torch.Tensor, noise: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` largest keys; ties (zero-weight units, key -inf) are broken
    by the Gumbel noise, then by index: two stable sorts make the order total."""
    by_noise = torch.argsort(noise, descending=True, stable=True)
    order = by_noise[torch.argsort(keys[by_noise], descending=True, stable=True)]
    selected = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    selected[order[:count]] = True
    return selected


def exact_select(s_units: torch.Tensor, count: int, seed: int, stream: int | torch.Tensor) -> torch.Tensor:
    """Exactly ``count`` units without replacement, weights s (torch.multinomial semantics),
    as Gumbel-top-k on the counter RNG."""
    return top_by_keys(*gumbel_keys(s_units, seed, stream), count)


def exact_select_ratio(s_units: torch.Tensor, ratio: float, seed: int, stream: int | torch.Tensor) -> torch.Tensor:
    return exact_select(s_units, exact_count(ratio, s_units.numel()), seed, stream)


def rescale_weights(
    s_units: torch.Tensor,
    pi: torch.Tensor | None,
    unbiased: bool,
    rescale: str,
    total: torch.Tensor | None = None,
    n: int | None = None,
) -> torch.Tensor | None:
    """Per-unit gradient weight on selected units, or None for weight 1 (AMSS).

    ht: 1 / pi_u (Horvitz-Thompson, E[g~] = g). legacy: 1 / (p_u + 1/N), p_u = s_u / S
    (the official code's rule; p_u = 1/N when S is 0 or not finite). ``total`` (S, fp32) and
    ``n`` (N) default to those of ``s_units``; a shard passes its full tensor's.
    """
    if not unbiased:
        return None
    if rescale == "ht":
        return 1.0 / pi
    n = s_units.numel() if n is None else n
    total = unit_total(s_units) if total is None else total
    p = torch.where(degenerate(total), torch.full_like(s_units, 1.0 / n), s_units / total)
    return 1.0 / (p + 1.0 / n)
