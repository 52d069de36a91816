"""Independent oracles for the tests: slow, obvious implementations of DESIGN's definitions."""

from __future__ import annotations

import math

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


def gumbel_top_k(importance_units: torch.Tensor, count: int, u: torch.Tensor) -> torch.Tensor:
    """DESIGN §3's exact sampling, one unit at a time in float64: the ``count`` units with the
    largest keys log s_u - log(-log U_u) (weight 1 for every unit when sum s is 0 or not finite;
    key -inf for s_u = 0), ties broken by the larger noise -log(-log U_u), then the lower index.
    ``u``: the units' uniforms U_u. Returns a bool mask."""
    s = [float(x) for x in importance_units.double().reshape(-1)]
    total = sum(s)
    uniform_weights = total == 0 or not math.isfinite(total)
    ranked = []
    for i, (w, ui) in enumerate(zip(s, u.double().reshape(-1).tolist())):
        w = 1.0 if uniform_weights else w
        noise = -math.inf if ui == 0 else -math.log(-math.log(ui))
        key = math.log(w) + noise if w > 0 else -math.inf
        ranked.append((-key, -noise, i))
    mask = torch.zeros(len(s), dtype=torch.bool)
    for _, _, i in sorted(ranked)[:count]:
        mask[i] = True
    return mask
