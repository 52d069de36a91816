"""OGM / OGM-GE: slow the dominant modality down by scaling its gradients (plus noise).

Per step each modality m has a coefficient k_m (``fastmask.significance.
ogm_coefficients`` computes the papers' k = 1 - tanh(alpha * rho) from the
discrepancy ratio). Every tensor of a group with ``"modality": m`` gets

- ``modulate="grad"`` (the papers, with SGD): g <- k_m * g (+ GE noise), then the base step;
- ``modulate="update"``: the base step's parameter change is scaled by k_m. Adam
  normalises a scaled gradient away (ALGORITHMS §4.8); scaling the update survives it.

The default (``modulate=None``) is "grad" for ``base="sgd"`` and "update" for Adam and
AdamW. ``modulate="grad"`` with an Adam-family base and no GE noise would change nothing
(Adam's update is invariant to a constant scale of the gradient) and is refused.

With ``ge=True`` (OGM-GE) noise N(0, std(g)^2) is added to the gradient of every
modality tensor (also where k = 1, as the official code does), std over the
tensor's unmodulated gradient, drawn from the counter RNG (DESIGN §4) on the
parameter's noise stream. Groups without a modality update densely.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..ops.checks import check_choice
from ..reference.spec import MODULATE_MODES
from .base import FusedOptimizer
from .groups import check_bool


class OGM(FusedOptimizer):
    """On-the-fly gradient modulation (OGM, OGM-GE) as a drop-in ``torch.optim`` optimizer.

    Args:
        params: tensors or param-group dicts; groups with ``"modality"`` are modulated.
        lr, base ("sgd" | "adam" | "adamw"), momentum, dampening, nesterov, betas,
            eps, weight_decay, maximize, seed, backend, unscale_in_step: as in :class:`fastmask.AMSS`.
        balancer: a :class:`fastmask.Balancer`; a ``step()`` without ``coefficients`` then
            takes its values for this step.
        ge: add the generalisation-enhancement noise N(0, std(g)^2) (OGM-GE).
        modulate: "grad" (scale the gradient, the papers) or "update" (scale the step);
            None (default): "grad" for base="sgd", "update" for "adam" / "adamw".

    ``step(closure=None, *, coefficients=None, grad_scale=None, found_inf=None)``;
    coefficients are in [0, 1] (1: unmodulated) and persist until changed.
    """

    METHOD_DEFAULTS: dict[str, Any] = {"ge": False, "modulate": None}
    SETTING = "coefficients"
    SETTING_LABEL = "coefficient"
    SETTING_LOW_OPEN = False  # OGM only slows a modality down: k = 1 - tanh(...) is in [0, 1]

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float | torch.Tensor = 1e-3, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, **kwargs)


    def _validate_method(self, group: dict[str, Any], where: str) -> None:
        check_bool(f"ge{where}", group["ge"])
        if group["modulate"] is None:
            group["modulate"] = "grad" if group["base"] == "sgd" else "update"
        check_choice(f"modulate{where}", group["modulate"], MODULATE_MODES)
        if group["modulate"] == "grad" and group["base"] != "sgd" and not group["ge"]:
            raise ValueError(
                f"modulate='grad' with base={group['base']!r} and ge=False does nothing{where}: Adam's update is "
                f"invariant to a constant scale of the gradient, so a coefficient of 0.3 moves the params as much "
                f"as 1.0. Use modulate='update' (the default for Adam and AdamW), or base='sgd' as the papers do"
            )

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        coefficients: Mapping[str, float] | None = None,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> Any:
        """One step; ``coefficients`` (modality -> k in [0, 1]) = ``set_coefficients`` first."""
        return self._run_step(closure, coefficients, grad_scale, found_inf)

    def set_coefficients(self, coefficients: Mapping[str, float]) -> None:
        """Set per-modality coefficients in [0, 1] for this and later steps."""
        self._set_settings(coefficients)

    def coefficient(self, modality: str | None) -> float:
        """The current coefficient of ``modality`` (1.0 until set; 1.0 for dense groups)."""
        return self._setting(modality)

    def _method_terms(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"coefficient": group.get(self.SETTING_LABEL, 1.0),
                "ge_noise": group["ge"] and group.get("modality") is not None, "modulate": group["modulate"]}
