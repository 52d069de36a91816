"""MIMO: a smoothed worst-modality objective next to the fused loss.

The paper (arXiv 2511.06686) is confirmed only at abstract level: a penalised
objective combining the multi-modal loss with a smooth approximation of the max
of the uni-modal losses. Its exact form is unconfirmed, so every choice here is
a parameter (ALGORITHMS §3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .ops.checks import check_choice, check_int, check_real

__all__ = ["gamma_schedule", "mimo_loss", "unimodal_losses"]


def mimo_loss(
    fused_loss: torch.Tensor,
    unimodal_losses: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    gamma: float = 1.0,
    mu: float = 0.5,
) -> torch.Tensor:
    """L = L_fused + gamma * mu * log(sum_m exp(L_m / mu)).

    mu * logsumexp(L / mu) lies in [max_m L_m, max_m L_m + mu log M]: the worst
    modality dominates as mu -> 0. Its gradient is sum_m softmax(L / mu)_m grad L_m,
    so one backward pass suffices. All losses are 0-d tensors; gamma >= 0, mu > 0.
    """
    if not isinstance(fused_loss, torch.Tensor) or fused_loss.dim() != 0:
        raise ValueError("fused_loss must be a 0-d tensor")
    values = list(unimodal_losses.values()) if isinstance(unimodal_losses, Mapping) else list(unimodal_losses)
    if not values:
        raise ValueError("unimodal_losses must hold at least one loss")
    for i, loss in enumerate(values):
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"unimodal_losses[{i}] must be a 0-d tensor")
    gamma = check_real("gamma", gamma, 0.0, math.inf, high_open=True)
    mu = check_real("mu", mu, 0.0, math.inf, low_open=True, high_open=True)
    smooth_max = mu * torch.logsumexp(torch.stack(values) / mu, dim=0)
    return fused_loss + gamma * smooth_max


def unimodal_losses(
    logits: Mapping[str, torch.Tensor], labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Cross-entropy of each modality's logits (e.g. from ``fastmask.nn.AuxiliaryHeads``)."""
    if not isinstance(logits, Mapping) or not logits:
        raise TypeError("logits must be a non-empty dict of modality -> [B, C] tensor")
    return {m: F.cross_entropy(out, labels) for m, out in logits.items()}


def gamma_schedule(step: int, *, start: float, end: float, steps: int, kind: str = "linear") -> float:
    """gamma at ``step`` going from ``start`` to ``end`` over ``steps`` steps, then held.

    kind: "constant" (always start), "linear", or "geometric" (needs start, end > 0).
    """
    step = check_int("step", step, 0, 2**63)
    steps = check_int("steps", steps, 1, 2**63)
    start = check_real("start", start, 0.0, math.inf, high_open=True)
    end = check_real("end", end, 0.0, math.inf, high_open=True)
    check_choice("kind", kind, ("constant", "linear", "geometric"))
    t = min(step, steps) / steps
    if kind == "constant":
        return start
    if kind == "linear":
        return start + (end - start) * t
    if start <= 0 or end <= 0:
        raise ValueError("geometric schedule needs start > 0 and end > 0")
    return start * (end / start) ** t
