"""The low-level ops on one tensor: importance EMA, inclusion probabilities, mask sampling
(Bernoulli and exact), the unbiased rescale. Each validates its inputs (errors name the
argument), then runs on the backend chosen by ``fastmask.backends.registry``."""

from __future__ import annotations

import torch

from ..backends.registry import implementation
from ..reference.sampling import unit_count
from ..reference.spec import GRANULARITIES
from .checks import check_choice, check_int, check_real, check_stream, check_tensor


def fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float, *, backend: str | None = None) -> torch.Tensor:
    """In place: ``fisher = beta * fisher + (1 - beta) * grad**2``; returns ``fisher``.

    fisher: fp32, any shape. grad: fp32/bf16/fp16, same shape and device.
    beta: in [0, 1).
    """
    check_tensor("fisher", fisher, dtypes=(torch.float32,))
    check_tensor("grad", grad, device=fisher.device, shape=fisher.shape)
    beta = check_real("beta", beta, 0.0, 1.0, high_open=True)
    implementation("fisher_update_", backend, fisher.device)(fisher, grad, beta)
    return fisher


def inclusion_probs(
    importance: torch.Tensor,
    ratio: float,
    *,
    granularity: str = "element",
    sampling: str = "poisson",
    min_prob: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-unit inclusion probabilities pi, broadcast to ``importance``'s shape (fp32).

    poisson (water-filling): pi_u = clamp(q_u / tau, min_prob, 1), q_u = s_u rounded down to
    4 significant bits, with tau chosen so that sum_u pi_u = k = ratio * N (units above the
    level are capped at 1 and their excess goes to the others; see
    ``fastmask.reference.sampling.water_level`` for the edge cases); pi_u = ratio if S = sum of
    s_u is 0 or not finite. uniform: pi_u = ratio. ratio == 1 gives 1 everywhere.
    importance: non-negative fp32/bf16/fp16; ratio in (0, 1]; min_prob in [0, 1].
    """
    check_tensor("importance", importance)
    ratio = check_real("ratio", ratio, 0.0, 1.0, low_open=True)
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("sampling", sampling, ("poisson", "uniform"))
    min_prob = check_real("min_prob", min_prob, 0.0, 1.0)
    if bool((importance < 0).any()):
        raise ValueError("importance must be non-negative")
    fn = implementation("inclusion_probs", backend, importance.device)
    return fn(importance, ratio, granularity, sampling, min_prob)


def _row_units(name: str, values: torch.Tensor, granularity: str) -> torch.Tensor:
    """Per-unit values of a per-element tensor that is constant within each unit."""
    if granularity == "element" or values.dim() == 0:
        return values.reshape(-1)
    rows = values.reshape(values.shape[0], -1)
    if rows.shape[1] == 0:
        return values.new_zeros(values.shape[0])
    if bool((rows != rows[:, :1]).any()):
        raise ValueError(f"{name} must be constant within each dim-0 slice for granularity='row'")
    return rows[:, 0].contiguous()


def sample_mask(
    probs: torch.Tensor,
    *,
    seed: int,
    stream: int | torch.Tensor = 0,
    granularity: str = "element",
    backend: str | None = None,
) -> torch.Tensor:
    """Bool mask of ``probs``'s shape: unit u selected iff U(seed, stream, u) < probs[u].

    probs: fp32/bf16/fp16 in [0, 1] (for rows, constant within each dim-0 slice,
    as ``inclusion_probs`` returns). seed: int in [0, 2^64). stream: int in
    [0, 2^63) or a 0-d int64 tensor.
    """
    check_tensor("probs", probs)
    seed = check_int("seed", seed, 0, 2**64)
    stream = check_stream("stream", stream)
    check_choice("granularity", granularity, GRANULARITIES)
    if bool(((probs < 0) | (probs > 1) | probs.isnan()).any()):
        raise ValueError("probs must be in [0, 1]")
    units = _row_units("probs", probs.to(torch.float32), granularity)
    fn = implementation("sample_mask", backend, probs.device)
    return fn(units, seed, stream, probs.shape, granularity)


def sample_exact(
    importance: torch.Tensor,
    k: int,
    *,
    seed: int,
    stream: int | torch.Tensor = 0,
    granularity: str = "element",
    backend: str | None = None,
) -> torch.Tensor:
    """Bool mask with exactly ``k`` units selected without replacement, weights s.

    Same distribution as ``torch.multinomial(s, k, replacement=False)``, drawn as
    Gumbel-top-k on the counter RNG: key_u = log s_u - log(-log U_u). Uniform
    weights when S is 0 or not finite. importance: non-negative; k in [0, N].
    """
    check_tensor("importance", importance)
    check_choice("granularity", granularity, GRANULARITIES)
    k = check_int("k", k, 0, unit_count(importance.shape, granularity) + 1)
    seed = check_int("seed", seed, 0, 2**64)
    stream = check_stream("stream", stream)
    if bool((importance < 0).any()):
        raise ValueError("importance must be non-negative")
    fn = implementation("sample_exact", backend, importance.device)
    return fn(importance, k, seed, stream, granularity)


def unbiased_rescale(
    grad: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Horvitz-Thompson rescale: ``grad * mask / probs``, 0 where ``mask`` is False.

    grad: fp32/bf16/fp16; mask: bool of the same shape; probs: same shape,
    > 0 wherever mask is True. Returns a new tensor in grad's dtype (fp32 math).
    """
    check_tensor("grad", grad)
    check_tensor("mask", mask, dtypes=(torch.bool,), device=grad.device, shape=grad.shape)
    check_tensor("probs", probs, device=grad.device, shape=grad.shape)
    if bool(((probs <= 0) & mask).any()):
        raise ValueError("probs must be > 0 wherever mask is True")
    return implementation("unbiased_rescale", backend, grad.device)(grad, mask, probs)
