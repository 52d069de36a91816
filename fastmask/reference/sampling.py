"""Importance, units, inclusion probabilities, selection and rescaling (DESIGN §3).

Plain vectorised PyTorch, no host synchronisation: the oracle for every backend.
Unit-level functions take 1-D tensors of N units; ``unit_view`` maps a tensor
to its units (elements, or dim-0 slices for ``granularity="row"``).
"""

from __future__ import annotations

import torch

from .philox import uniform
from .spec import exact_count, unit_count


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


def poisson_probs(
    s_units: torch.Tensor,
    ratio: float | torch.Tensor,
    min_prob: float = 0.0,
    total: torch.Tensor | None = None,
    n: int | None = None,
) -> torch.Tensor:
    """pi_u = clamp(k * s_u / S, min_prob, 1) with k = ratio * N; pi_u = ratio if S is 0 or not finite;
    pi_u = 1 when ratio >= 1 (a ratio tensor is compared on its device).

    ``total`` (S, fp32) and ``n`` (N) default to those of ``s_units``; a shard passes its
    full tensor's.
    """
    n = s_units.numel() if n is None else n
    on_device = isinstance(ratio, torch.Tensor)
    if not on_device and ratio >= 1.0:
        return torch.ones_like(s_units)
    total = unit_total(s_units) if total is None else total
    ratio32 = ratio.to(torch.float32).reshape(()) if on_device else total.new_tensor(ratio)
    # k = fp32(ratio) * N and k / S, each rounded in fp32, as the kernels compute them
    scale = (ratio32 * n) / total
    pi = (s_units * scale).clamp(min=min_prob, max=1.0)
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
    total: torch.Tensor | None = None,
    n: int | None = None,
) -> torch.Tensor:
    if sampling == "poisson":
        return poisson_probs(s_units, ratio, min_prob, total, n)
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
    (the official code's rule; p_u = 1/N when S is 0 or not finite). ``total``/``n`` as
    in ``poisson_probs``.
    """
    if not unbiased:
        return None
    if rescale == "ht":
        return 1.0 / pi
    n = s_units.numel() if n is None else n
    total = unit_total(s_units) if total is None else total
    p = torch.where(degenerate(total), torch.full_like(s_units, 1.0 / n), s_units / total)
    return 1.0 / (p + 1.0 / n)
