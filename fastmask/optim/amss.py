"""AMSS and AMSS+: update a sampled, importance-weighted subnetwork of each modality.

Per masked tensor and step (DESIGN §3): importance s (this step's g², or an EMA
of it), units (elements or rows), inclusion probabilities pi from the modality's
ratio, selection U < pi on the counter RNG, optional unbiased rescale g/pi
(AMSS+), then the base SGD/Adam/AdamW update on the selected units only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..ops.checks import check_choice, check_real
from ..reference.spec import GRANULARITIES, IMPORTANCES, MASKED_MODES, RESCALES, SAMPLINGS
from .base import FusedOptimizer
from .groups import check_bool


class AMSS(FusedOptimizer):
    """Adaptively masked subnetwork updates as a drop-in ``torch.optim`` optimizer.

    Args:
        params: tensors or param-group dicts; a group with ``"modality": name`` is
            masked by that modality's ratio, a group without one updates densely.
        lr, base ("sgd" | "adam" | "adamw"), momentum, dampening, nesterov, betas,
            eps, weight_decay, maximize: the base optimizer, as in torch
            (weight_decay defaults to 0.01 for adamw, 0 otherwise).
        unbiased: rescale selected gradients so that E[g~] = g (AMSS+).
        sampling: "poisson" (pi ∝ importance, capped at 1), "uniform" (pi = ratio)
            or "exact" (exactly ceil(ratio*N) units without replacement, as the
            official code's torch.multinomial).
        rescale: "ht" (g / pi, needs poisson/uniform) or "legacy" (g / (p + 1/N)).
        importance: "grad2" (this step's g²) or "ema" (F = b*F + (1-b)*g², b = fisher_beta).
        granularity: "element" or "row" (dim-0 slices: conv filters, linear rows).
        masked: "freeze" (unselected units keep param and moments) or "zero_grad"
            (their gradient is 0 but momentum and decay still move them, as the paper's code).
        min_prob: lower bound on pi (poisson).
        seed: RNG seed; None draws one from torch's default generator (rank 0's under
            torch.distributed, so that every rank draws the same masks).
        backend: "auto" | "torch" | "triton" | "cpp" | "cuda"; None reads FASTMASK_BACKEND.
        balancer: a :class:`fastmask.Balancer`; a ``step()`` without ``ratios`` then takes
            its values for this step (measured from the forward passes since the last step).
        unscale_in_step: AMP: unscale inside the step (default); False lets GradScaler
            unscale first (needed to clip gradients under Lightning's AMP).

    ``step(closure=None, *, ratios=None, grad_scale=None, found_inf=None)``; see
    :class:`~fastmask.optim.base.FusedOptimizer`.
    """

    METHOD_DEFAULTS: dict[str, Any] = {
        "unbiased": False,
        "sampling": "poisson",
        "rescale": "ht",
        "importance": "grad2",
        "fisher_beta": 0.9,
        "granularity": "element",
        "masked": "freeze",
        "min_prob": 0.0,
    }

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float | torch.Tensor = 1e-3, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, **kwargs)

    def _validate_method(self, group: dict[str, Any], where: str) -> None:
        check_bool(f"unbiased{where}", group["unbiased"])
        check_choice(f"sampling{where}", group["sampling"], SAMPLINGS)
        check_choice(f"rescale{where}", group["rescale"], RESCALES)
        check_choice(f"importance{where}", group["importance"], IMPORTANCES)
        group["fisher_beta"] = check_real(f"fisher_beta{where}", group["fisher_beta"], 0.0, 1.0, high_open=True)
        check_choice(f"granularity{where}", group["granularity"], GRANULARITIES)
        check_choice(f"masked{where}", group["masked"], MASKED_MODES)
        group["min_prob"] = check_real(f"min_prob{where}", group["min_prob"], 0.0, 1.0)
        if group["unbiased"] and group["rescale"] == "ht" and group["sampling"] == "exact":
            raise ValueError(
                f"rescale='ht' needs inclusion probabilities: use sampling='poisson' or 'uniform', "
                f"or rescale='legacy' with sampling='exact'{where}"
            )

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        ratios: Mapping[str, float] | None = None,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> Any:
        """One step; ``ratios`` (modality -> fraction in (0, 1]) = ``set_ratios(ratios)`` first.

        The closure runs first. ``grad_scale`` / ``found_inf``: AMP unscale and skip
        (also read from the attributes ``torch.amp.GradScaler`` sets). Returns the
        closure's loss.
        """
        return self._run_step(closure, ratios, grad_scale, found_inf)

    def set_ratios(self, ratios: Mapping[str, float]) -> None:
        """Set per-modality fractions in (0, 1] for this and later steps (others keep theirs)."""
        self._set_settings(ratios)

    def ratio(self, modality: str | None) -> float:
        """The current fraction of ``modality`` (1.0 until set; 1.0 for dense groups)."""
        return self._setting(modality)

    def _needs_fisher(self, group: dict[str, Any]) -> bool:
        return group.get("modality") is not None and group["importance"] == "ema"

    def _method_terms(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"ratio": group.get(self.SETTING_LABEL, 1.0), **{key: group[key] for key in self.METHOD_DEFAULTS}}


class AMSSPlus(AMSS):
    """AMSS+ : AMSS with ``unbiased=True`` (Horvitz-Thompson rescale g / pi by default)."""

    METHOD_DEFAULTS = {**AMSS.METHOD_DEFAULTS, "unbiased": True}
