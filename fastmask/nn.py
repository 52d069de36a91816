"""Modules: OPM prediction modulation and auxiliary uni-modal heads."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .ops.checks import check_choice, check_int, check_real
from .reference.philox import draw_seed, uniform
from .significance import _check_features, _check_same_modalities

__all__ = ["AuxiliaryHeads", "PredictionModulation"]

_EXECUTE_UNIT = 255  # the per-call stream word that decides whether this call drops at all


class PredictionModulation(nn.Module):
    """OPM: drop whole feature vectors of dominant modalities during training.

    For each modality with discrepancy ratio rho > 1 (``fastmask.significance.discrepancy``)
    the drop probability is q = q_base * (1 + lam * tanh(rho - 1)); modalities with
    rho <= 1 are never dropped. In a fraction ``p_exe`` of training calls, each
    sample's feature vector of modality m is zeroed with probability q_m and the
    kept ones are rescaled (inverted dropout): ``rescale="modality"`` divides by
    1 - q_m, so E[output] = input for every modality (the default);
    ``rescale="shared"`` divides every modality by 1 - theta, theta = sum d_m q_m /
    sum d_m (the official code). A sample whose every modality was dropped keeps
    the one with the smallest q. Identity in eval mode.

    Randomness comes from the counter RNG (DESIGN §4): call c, modality j (in the
    features dict's order) draws U(seed, 256 c + j, sample), and the execute
    decision U(seed, 256 c + 255, 0), so a run is reproducible from ``seed`` on any
    device; the call counter is a buffer (saved in ``state_dict``).
    """

    def __init__(
        self, q_base: float = 0.5, lam: float = 0.5, p_exe: float = 0.7, *, rescale: str = "modality",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.q_base = check_real("q_base", q_base, 0.0, 1.0, high_open=True)
        self.lam = check_real("lam", lam, 0.0, math.inf, high_open=True)
        if self.q_base * (1 + self.lam) >= 1:
            raise ValueError(f"q_base * (1 + lam) must be < 1 so that some features survive, got {self.q_base * (1 + self.lam)}")
        self.p_exe = check_real("p_exe", p_exe, 0.0, 1.0)
        self.rescale = check_choice("rescale", rescale, ("modality", "shared"))
        self.seed = check_int("seed", draw_seed() if seed is None else seed, 0, 2**64)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.last_keep: dict[str, torch.Tensor] = {}

    def drop_probs(self, rho: Mapping[str, float]) -> dict[str, float]:
        """q_m = q_base * (1 + lam * tanh(rho_m - 1)) if rho_m > 1, else 0."""
        out = {}
        for m, r in rho.items():
            r = check_real(f"rho[{m!r}]", r, 0.0, math.inf, high_open=True)
            out[m] = self.q_base * (1.0 + self.lam * math.tanh(r - 1.0)) if r > 1 else 0.0
        return out

    def forward(self, features: Mapping[str, torch.Tensor], rho: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """features: modality -> [B, d_m]; rho: modality -> discrepancy ratio. Returns a new dict."""
        batch = _check_features(features)
        _check_same_modalities(features, rho, "features", "rho")
        if len(features) > _EXECUTE_UNIT:
            raise ValueError(f"PredictionModulation supports at most {_EXECUTE_UNIT} modalities")
        if not self.training:
            return dict(features)
        q = self.drop_probs(rho)
        names = list(features)
        device = next(iter(features.values())).device
        base = self.calls.to(device) * 256
        self.calls += 1
        keep = torch.stack(
            [uniform(self.seed, base + j, batch, device) >= q[m] for j, m in enumerate(names)]
        )  # [M, B]
        weakest = min(range(len(names)), key=lambda j: q[names[j]])
        keep[weakest] |= ~keep.any(dim=0)
        execute = uniform(self.seed, base + _EXECUTE_UNIT, 1, device)[0] < self.p_exe
        if self.rescale == "shared":
            dims = {m: features[m].shape[1] for m in names}
            theta = sum(dims[m] * q[m] for m in names) / sum(dims.values())
            scale = {m: 1.0 / (1.0 - theta) for m in names}
        else:
            scale = {m: 1.0 / (1.0 - q[m]) for m in names}
        out = {}
        for j, m in enumerate(names):
            factor = torch.where(execute & ~keep[j], 0.0, torch.where(execute, scale[m], 1.0))
            out[m] = features[m] * factor.to(features[m].dtype)[:, None]
            self.last_keep[m] = (keep[j] | ~execute).detach()
        return out


class AuxiliaryHeads(nn.Module):
    """One linear classifier per modality (the uni-modal losses of MIMO-style methods).

    ``AuxiliaryHeads({"audio": 512, "visual": 512}, n_classes)``; forward(features)
    maps each modality's [B, d_m] features to [B, n_classes] logits.
    """

    def __init__(self, dims: Mapping[str, int], n_classes: int) -> None:
        super().__init__()
        if not isinstance(dims, Mapping) or not dims:
            raise TypeError("dims must be a non-empty dict of modality -> feature width")
        n_classes = check_int("n_classes", n_classes, 1, 2**31)
        self.heads = nn.ModuleDict(
            {m: nn.Linear(check_int(f"dims[{m!r}]", d, 1, 2**31), n_classes) for m, d in dims.items()}
        )

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _check_features(features)
        _check_same_modalities(self.heads, features, "the heads", "features")
        return {m: self.heads[m](z) for m, z in features.items()}
