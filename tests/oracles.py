"""Independent oracles for the tests: slow, obvious implementations of DESIGN's definitions."""

from __future__ import annotations

import torch


def quantized(s: torch.Tensor) -> torch.Tensor:
    """s rounded down to 4 significant bits (the floor of its histogram bin), float64; values
    below 2^-129 count as 0."""
    bits = s.to(torch.float32).reshape(-1).view(torch.int32) & 0x7FFFFFFF
    q = ((bits >> 20) << 20).view(torch.float32).to(torch.float64)
    return torch.where(bits < (1 << 20), 0.0, q)


def water_fill(values: torch.Tensor, k: float, min_prob: float = 0.0) -> torch.Tensor:
    """pi_u = clamp(v_u / tau, min_prob, 1) with sum pi = k, tau found by bisection on its
    exponent (float64, 200 halvings); k must lie strictly between N * min_prob and the count
    of positive values plus min_prob times the zeros."""
    v = values.to(torch.float64).reshape(-1)

    def total(tau: float) -> float:
        return float((v / tau).clamp(min=min_prob, max=1.0).sum())

    lo, hi = -1100.0, 1100.0  # log2 tau
    for _ in range(200):
        mid = (lo + hi) / 2
        if total(2.0**mid) > k:
            lo = mid
        else:
            hi = mid
    return (v / 2.0 ** ((lo + hi) / 2)).clamp(min=min_prob, max=1.0)
