"""Modal significance: how much each modality contributes, and the per-step knobs derived from it.

All functions run under ``torch.no_grad()`` on detached values; inputs and outputs
are dicts keyed by modality name (any number M >= 2 of modalities). Results are
Python floats, ready for ``opt.step(ratios=...)`` / ``step(coefficients=...)``;
producing them reads device values (one synchronisation per call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops.checks import check_choice, check_real, check_tensor

__all__ = ["amss_ratios", "discrepancy", "mutual_information_rate", "ogm_coefficients", "unimodal_logits"]


def _check_features(features: Mapping[str, torch.Tensor], name: str = "features") -> int:
    """Validate a modality -> [B, d] dict; returns B."""
    if not isinstance(features, Mapping) or len(features) == 0:
        raise TypeError(f"{name} must be a non-empty dict of modality -> tensor")
    batch = None
    for m, z in features.items():
        check_tensor(f"{name}[{m!r}]", z)
        if z.dim() != 2:
            raise ValueError(f"{name}[{m!r}] must be 2-D [batch, dim], got shape {tuple(z.shape)}")
        if batch is not None and z.shape[0] != batch:
            raise ValueError(f"{name}[{m!r}] has batch size {z.shape[0]}, others have {batch}")
        batch = z.shape[0]
    return batch


def _check_same_modalities(a: Mapping, b: Mapping, a_name: str, b_name: str) -> None:
    if set(a) != set(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"{b_name} must have the modalities of {a_name}: missing {missing}, unexpected {extra}")


def _check_labels(labels: torch.Tensor, batch: int, n_classes: int) -> torch.Tensor:
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if batch and bool(((labels < 0) | (labels >= n_classes)).any()):
        raise ValueError(f"labels must be in [0, {n_classes}); got values outside")
    return labels.long()


# ---- the formulas, on float64 tensors over the M modalities: the one definition that the
# functions below (one batch, Python floats) and fastmask.Balancer (pooled statistics, on the
# device, no synchronisation) both evaluate. Internal: both callers validate the arguments first
# (the balancer once, at construction), so the step's path checks nothing twice.


def _concat_logits(head: nn.Linear, features: Mapping[str, torch.Tensor], order: Sequence[str]
                  ) -> dict[str, torch.Tensor]:
    """out_m = z_m W[:, cols_m]^T + b / M for a concat-fusion head over ``features`` in ``order``
    (widths already checked against ``head.in_features``)."""
    bias = head.bias / len(order) if head.bias is not None else None
    out, start = {}, 0
    for m in order:
        width = features[m].shape[1]
        out[m] = F.linear(features[m].to(head.weight.dtype), head.weight[:, start : start + width], bias)
        start += width
    return out


def _label_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(Y) of the label frequencies ``p`` (0 ln 0 = 0), in nats."""
    return -torch.special.xlogy(p, p).sum()


def _ratios_from_rates(rates: torch.Tensor, temperature: float, bounds: tuple[float, float], bias: float
                      ) -> torch.Tensor:
    """rho = clip(1 - softmax(rates / temperature) + bias, *bounds) (float64 [M])."""
    weights = torch.softmax(rates / temperature, dim=0)
    return (1.0 - weights + bias).clamp(*bounds)


def _discrepancy_from_scores(scores: torch.Tensor, rule: str) -> torch.Tensor:
    """rho_m from the true-class probability sums s (float64 [M], > 0): the mean over j != m of
    s_m / s_j (``rule="mean"``), or s_m / min over j != m of s_j (``"min"``)."""
    ratio = scores[:, None] / scores[None, :]  # [m, j] = s_m / s_j
    others = ~torch.eye(scores.numel(), dtype=torch.bool, device=scores.device)
    if rule == "mean":
        return torch.where(others, ratio, 0.0).sum(dim=1) / (scores.numel() - 1)
    return scores / torch.where(others, scores[None, :], math.inf).amin(dim=1)


def _coefficients_from_discrepancy(rho: torch.Tensor, alpha: float, form: str) -> torch.Tensor:
    """k = 1 where rho <= 1, else 1 - tanh(alpha * rho) (``form="cvpr"``) or
    1 - tanh(alpha * (rho - 1)) (``"continuous"``)."""
    x = rho if form == "cvpr" else rho - 1.0
    return torch.where(rho <= 1.0, torch.ones_like(rho), 1.0 - torch.tanh(alpha * x))


@torch.no_grad()
def unimodal_logits(
    head: nn.Linear | None,
    features: Mapping[str, torch.Tensor],
    order: Sequence[str] | None = None,
    *,
    fusion: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each modality's logits from the shared fusion head.

    Concat fusion (``head`` an ``nn.Linear`` over the features concatenated in
    ``order``, default the dict's order): out_m = z_m W[:, cols_m]^T + b / M, as all
    three official codes compute it. Any other fusion (``fusion=callable`` taking
    the features dict, ``head=None``): out_m = fusion(features with every other
    modality set to zero). features: modality -> [B, d_m].
    """
    _check_features(features)
    if fusion is not None:
        if head is not None:
            raise ValueError("pass either head (a concat-fusion nn.Linear) or fusion=callable, not both")
        return {
            m: fusion({n: z if n == m else torch.zeros_like(z) for n, z in features.items()}) for m in features
        }
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear concat-fusion head, got {type(head).__name__}")
    order = list(features) if order is None else list(order)
    if sorted(order) != sorted(features) or len(set(order)) != len(order):
        raise ValueError(f"order {order} must list each modality of features {sorted(features)} once")
    widths = [features[m].shape[1] for m in order]
    if sum(widths) != head.in_features:
        raise ValueError(f"features widths {dict(zip(order, widths))} sum to {sum(widths)}, head expects {head.in_features}")
    return _concat_logits(head, features, order)


@torch.no_grad()
def mutual_information_rate(
    unimodal_logits: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    features: Mapping[str, torch.Tensor],
    *,
    legacy: str | None = None,
) -> dict[str, float]:
    """AMSS's modal significance: MIR_m = (H(Y) + mean log q(y|x_m)) / H(softmax(z_m)), in nats.

    H(Y) is the entropy of the batch's label frequencies over all classes (0 ln 0 = 0);
    mean log q(y|x_m) = -CE(out_m, y) (a variational lower bound on I(X_m; Y) with
    H(Y)); the denominator is the batch mean of the entropy of softmax over z_m's
    features. ``legacy="av"`` reproduces the official audio-visual code instead:
    H(Y) = CE(p, p) with the label frequencies p used as logits, +0.5 in the
    numerator, and every rate NaN (so ``amss_ratios`` falls back to 0.5) when any
    numerator is <= 0.
    """
    batch = _check_features(unimodal_logits, "unimodal_logits")
    _check_features(features)
    _check_same_modalities(unimodal_logits, features, "unimodal_logits", "features")
    if legacy not in (None, "av"):
        raise ValueError(f"legacy must be None or 'av', got {legacy!r}")
    n_classes = next(iter(unimodal_logits.values())).shape[1]
    if any(out.shape[1] != n_classes for out in unimodal_logits.values()):
        raise ValueError("unimodal_logits must all have the same number of classes")
    if batch == 0:
        raise ValueError("mutual_information_rate needs a non-empty batch")
    labels = _check_labels(labels, batch, n_classes)
    if legacy == "av":
        p = torch.bincount(labels).float() / batch  # length max(y) + 1, as the official code
        h_y = -(p * F.log_softmax(p, dim=0)).sum()
        offset = 0.5
    else:
        h_y = _label_entropy(torch.bincount(labels, minlength=n_classes).double() / batch)
        offset = 0.0
    numerators, rates = {}, {}
    for m, out in unimodal_logits.items():
        score = -F.cross_entropy(out.double(), labels)
        z = features[m].double()
        h_z = -(F.softmax(z, dim=1) * F.log_softmax(z, dim=1)).sum(dim=1).mean()
        numerators[m] = float(score + h_y.double() + offset)
        rates[m] = numerators[m] / float(h_z) if float(h_z) > 0 else math.nan
    if legacy == "av" and any(n <= 0 for n in numerators.values()):
        return {m: math.nan for m in rates}
    return rates


def amss_ratios(
    mir: Mapping[str, float],
    temperature: float = 0.2,
    bounds: tuple[float, float] = (0.1, 0.9),
    bias: float = 0.0,
    *,
    fallback: float = 0.5,
) -> dict[str, float]:
    """rho_m = clip(1 - softmax(MIR / T)_m + bias, *bounds): the dominant modality updates less.

    For M = 2 the fractions sum to 1 before clipping; for M modalities to M - 1.
    A NaN or infinite rate anywhere gives every modality ``fallback`` (the official
    code's 0.5): softmax of an infinite rate is undefined.
    """
    if not isinstance(mir, Mapping) or len(mir) < 2:
        raise ValueError("mir must be a dict with at least two modalities")
    temperature = check_real("temperature", temperature, 0.0, math.inf, low_open=True, high_open=True)
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"bounds must be a pair (low, high), got {bounds!r}")
    low = check_real("bounds[0]", bounds[0], 0.0, 1.0, low_open=True)
    high = check_real("bounds[1]", bounds[1], low, 1.0)
    bias = check_real("bias", bias, -1.0, 1.0)
    fallback = check_real("fallback", fallback, 0.0, 1.0, low_open=True)
    values = [float(v) for v in mir.values()]
    if not all(math.isfinite(v) for v in values):
        return {m: fallback for m in mir}
    rho = _ratios_from_rates(torch.tensor(values, dtype=torch.float64), temperature, (low, high), bias)
    return {m: float(r) for m, r in zip(mir, rho)}


@torch.no_grad()
def discrepancy(
    unimodal_logits: Mapping[str, torch.Tensor], labels: torch.Tensor, *, rule: str = "mean"
) -> dict[str, float]:
    """OGM/OPM discrepancy ratio from summed true-class probabilities s_m = sum_i softmax(out_m)_i[y_i].

    M = 2: rho_a = s_a / s_b and rho_b = 1 / rho_a (the official code). M > 2:
    ``rule="mean"``: rho_m = mean over j != m of s_m / s_j (reduces to the M = 2
    rule; a re-implementation's reading of the TPAMI paper); ``rule="min"``:
    rho_m = s_m / min over j != m of s_j (BalanceBenchmark's). rho_m > 1 marks a
    dominant modality.
    """
    batch = _check_features(unimodal_logits, "unimodal_logits")
    if len(unimodal_logits) < 2:
        raise ValueError("discrepancy needs at least two modalities")
    check_choice("rule", rule, ("mean", "min"))
    n_classes = next(iter(unimodal_logits.values())).shape[1]
    labels = _check_labels(labels, batch, n_classes)
    rows = torch.arange(batch, device=labels.device)
    scores = torch.stack([F.softmax(out.double(), dim=1)[rows, labels].sum() for out in unimodal_logits.values()])
    rho = _discrepancy_from_scores(scores.clamp_min(1e-300).cpu(), rule)
    return {m: float(r) for m, r in zip(unimodal_logits, rho)}


def ogm_coefficients(rho: Mapping[str, float], alpha: float, form: str = "cvpr") -> dict[str, float]:
    """OGM's gradient coefficients: k = 1 for rho <= 1 (weaker modalities), else

    ``"cvpr"`` (the official code, CVPR Eq. 10): k = 1 - tanh(alpha * rho), which jumps
    from 1 to 1 - tanh(alpha) as rho crosses 1; ``"continuous"``: k = 1 - tanh(alpha * (rho - 1)).
    """
    alpha = check_real("alpha", alpha, 0.0, math.inf, high_open=True)
    check_choice("form", form, ("cvpr", "continuous"))
    if not isinstance(rho, Mapping) or not rho:
        raise TypeError("rho must be a non-empty dict of modality -> ratio")
    values = torch.tensor([check_real(f"rho[{m!r}]", r, 0.0, math.inf, high_open=True) for m, r in rho.items()],
                          dtype=torch.float64)
    return {m: float(k) for m, k in zip(rho, _coefficients_from_discrepancy(values, alpha, form))}
