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
    """(q, x, a, c): the floors q_j of the positive bins, and the breakpoints x of
    f(x) = sum_j n_j clamp(q_j x, min_prob, 1) (x = 1/tau, ascending), with for each the
    positive bins at min_prob there ([0, a)) and the first bin at 1 (bins [c, end)). They depend
    only on min_prob: computed once, in float64 on the host, so every device reads the same
    values. With min_prob = 0, a is 0 and c runs down from the last bin (both None)."""
    key = (min_prob, device)
    if key not in _LEVEL_EVENTS:
        q = bin_floor(torch.arange(1, FINITE_BINS))
        if min_prob == 0:
            _LEVEL_EVENTS[key] = (q.to(device), (1.0 / q).flip(0).to(device), None, None)
        else:
            index = torch.arange(q.numel())
            # bin i reaches 1 at x = 1/q_i, and leaves min_prob at x = min_prob/q_i
            x = torch.cat((1.0 / q, min_prob / q))
            a = torch.cat((torch.searchsorted(q, min_prob * q, right=True), index + 1))
            c = torch.cat((index, torch.searchsorted(q, q / min_prob)))
            order = torch.argsort(x, stable=True)
            _LEVEL_EVENTS[key] = tuple(v.to(device) for v in (q, x[order], a[order], c[order]))
    return _LEVEL_EVENTS[key]


def water_level(histograms: torch.Tensor, ratio: float | torch.Tensor, min_prob: float) -> torch.Tensor:
    """The water level of each tensor from its importance histogram: float64 [T, 2] = (x, p0).

    ``histograms``: float64 [T, HIST_BINS] (``unit_histogram``'s, summed over shards). A unit in
    bin j > 0 gets pi = clamp(fp32(q_j * x), min_prob, 1) and a unit in bin 0 gets p0, with x
    (= 1/tau) such that sum_u pi_u = k = fp32(ratio) * N, N the tensor's units (DESIGN §3 item
    3, on importances rounded down to 4 significant bits):

    - f(x) = N0 p0 + sum_j n_j clamp(q_j x, min_prob, 1) is continuous, non-decreasing and linear
      between its breakpoints (``level_events``). f is evaluated at every breakpoint from the
      prefix sums of n_j and n_j q_j; x is the linear interpolation between the last breakpoint
      below k and the first at or above it. Exact up to float64 rounding; no host sync.
    - k <= N min_prob: x = 0, every unit at min_prob. k at or above f(inf) (every unit with
      q > 0 at 1): x = inf, and the N0 units of bin 0 share the rest, p0 = max(min_prob,
      (k - n+) / N0). No unit with q > 0 (every unit in bin 0): p0 = ratio.
    The caller handles ratio >= 1 (every unit at 1) and S = 0 or not finite (pi = ratio).
    """
    if histograms.dim() != 2 or histograms.shape[1] != HIST_BINS:
        raise ValueError(f"histograms must be [tensors, {HIST_BINS}] (unit_histogram's), got "
                         f"{tuple(histograms.shape)}")
    hist = histograms.to(torch.float64)
    q, x_events, a, c = level_events(float(min_prob), hist.device)
    positive = hist[:, 1:FINITE_BINS]
    zero = hist.new_zeros(len(hist), 1)
    counts = torch.cat((zero, positive.cumsum(1)), 1)  # exclusive prefix sums; counts are exact
    mass = torch.cat((zero, (positive * q).cumsum(1)), 1)
    n_zero, n_pos = hist[:, 0], counts[:, -1]
    n = n_zero + n_pos
    ratio32 = ratio.to(torch.float32).reshape(()) if isinstance(ratio, torch.Tensor) else hist.new_tensor(
        ratio, dtype=torch.float32)
    k = ratio32.to(torch.float64) * n
    if a is None:  # min_prob = 0: at x = 1/q_i, bins below i are proportional, bins from i at 1
        f = x_events * mass[:, :-1].flip(1) + (n_pos[:, None] - counts[:, :-1].flip(1))
    else:
        f = (min_prob * (n_zero[:, None] + counts[:, a]) + x_events * (mass[:, c] - mass[:, a])
             + (n_pos[:, None] - counts[:, c]))
    reached = f >= k[:, None]
    first = reached.to(torch.int32).argmax(1)
    before = (first - 1).clamp(min=0)
    f_start = min_prob * n
    x_hi, f_hi = x_events[first], f.gather(1, first[:, None])[:, 0]
    x_lo = torch.where(first > 0, x_events[before], 0.0)
    f_lo = torch.where(first > 0, f.gather(1, before[:, None])[:, 0], f_start)
    x = x_lo + (k - f_lo) * (x_hi - x_lo) / (f_hi - f_lo)
    saturated = ~reached.any(1)
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
