"""The triton backend's low-level ops: launchers of ``kernels/units.py``, registered as
``torch.library`` ops (``fastmask::*``).

``triton_op`` + ``wrap_triton`` make them opaque, correctly aliased ops that ``torch.compile``
can trace. They work on units (1-D); ``fastmask.ops`` validates the inputs, and
``fastmask.backends.triton`` maps elements or rows to units around them. Imported only where
Triton can run (the backend imports it on first use).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...kernels.units import (BLOCK_SIZE, block_sums_kernel, fisher_update_kernel, gumbel_kernel, histogram_kernel,
                              probs_kernel, rescale_kernel, select_kernel)
from ...reference import sampling

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK_SIZE),)


def stream_tensor(stream: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(stream, torch.Tensor):
        return stream.to(device=device, dtype=torch.int64).reshape(1)
    return torch.tensor([stream], dtype=torch.int64, device=device)


@triton_op("fastmask::fisher_update_", mutates_args={"fisher"})
def fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float) -> None:
    """F = beta F + (1 - beta) g^2 in place; both contiguous."""
    n = fisher.numel()
    if n:
        wrap_triton(fisher_update_kernel)[_grid(n)](
            fisher, grad, n, beta, 1.0 - beta, G_DTYPE=TL_DTYPES[grad.dtype], BLOCK=BLOCK_SIZE
        )


@triton_op("fastmask::inclusion_probs_units", mutates_args=())
def inclusion_probs_units(s_units: torch.Tensor, ratio: float, poisson: bool, min_prob: float) -> torch.Tensor:
    """Per-unit pi from per-unit importance (fp32, 1-D): DESIGN §3 step 3 (water-filling for
    poisson: the histogram here, the level by ``sampling.water_level``)."""
    n = s_units.numel()
    out = torch.empty_like(s_units)
    if n == 0:
        return out
    if ratio >= 1.0:
        return out.fill_(1.0)
    partials = torch.empty(_grid(n)[0], dtype=torch.float64, device=s_units.device)
    wrap_triton(block_sums_kernel)[_grid(n)](s_units, partials, n, BLOCK=BLOCK_SIZE)
    total = partials.sum().to(torch.float32)  # fp64 block partials, rounded once (as the reference)
    level = partials  # unused unless poisson
    if poisson:
        hist = torch.zeros(sampling.HIST_BINS, dtype=torch.float64, device=s_units.device)
        wrap_triton(histogram_kernel)[_grid(n)](s_units, hist, n, BLOCK=BLOCK_SIZE)
        level = sampling.water_level(hist[None], ratio, min_prob)[0].contiguous()
    wrap_triton(probs_kernel)[_grid(n)](
        s_units, out, total, level, n, ratio, min_prob, POISSON=poisson, BLOCK=BLOCK_SIZE
    )
    return out


@triton_op("fastmask::bernoulli_select", mutates_args=())
def bernoulli_select(probs: torch.Tensor, seed_lo: int, seed_hi: int, stream: torch.Tensor) -> torch.Tensor:
    """Unit u selected iff U(seed, stream, u) < probs[u] (probs fp32 1-D; int8 0/1 out)."""
    n = probs.numel()
    out = torch.empty(n, dtype=torch.int8, device=probs.device)
    if n:
        wrap_triton(select_kernel)[_grid(n)](probs, out, stream, n, seed_lo, seed_hi, BLOCK=BLOCK_SIZE)
    return out


@triton_op("fastmask::gumbel_keys", mutates_args=())
def gumbel_keys(
    s_units: torch.Tensor, seed_lo: int, seed_hi: int, stream: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-top-k keys log w_u - log(-log U_u) and the noise, as the reference's gumbel_keys."""
    n = s_units.numel()
    keys, noise = torch.empty_like(s_units), torch.empty_like(s_units)
    if n:
        total = s_units.sum(dtype=torch.float64).to(torch.float32)
        wrap_triton(gumbel_kernel)[_grid(n)](
            s_units, keys, noise, total, stream, n, seed_lo, seed_hi, BLOCK=BLOCK_SIZE
        )
    return keys, noise


@triton_op("fastmask::unbiased_rescale", mutates_args=())
def unbiased_rescale(grad: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """g * m / pi (0 where m is False), contiguous inputs, out in grad's dtype."""
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        wrap_triton(rescale_kernel)[_grid(n)](grad, mask.view(torch.int8), probs, out, n, BLOCK=BLOCK_SIZE)
    return out

