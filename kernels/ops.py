"""Triton kernels of the low-level ops, registered as ``torch.library`` ops (``fastmask::*``).

``triton_op`` + ``wrap_triton`` make them opaque, correctly aliased ops that
``torch.compile`` can trace. They work on units (1-D); ``fastmask.ops`` validates
the inputs and maps elements or rows to units around them.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastmask.reference import sampling

from .philox import uniform_block
from .sampling import HIST_BINS, add_histogram, inclusion_prob

BLOCK_SIZE = 1024
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK_SIZE),)


def split_seed(seed: int) -> tuple[int, int]:
    """A 64-bit seed as two 32-bit words (torch.library ints are signed 64-bit)."""
    return seed & 0xFFFFFFFF, seed >> 32


def stream_tensor(stream: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(stream, torch.Tensor):
        return stream.to(device=device, dtype=torch.int64).reshape(1)
    return torch.tensor([stream], dtype=torch.int64, device=device)


@triton.jit
def _fisher_update_kernel(f_ptr, g_ptr, n, beta, one_minus_beta, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    f = tl.load(f_ptr + offs, mask=inb)
    g = tl.load(g_ptr + offs, mask=inb).to(tl.float32)
    tl.store(f_ptr + offs, f * beta + g * g * one_minus_beta, mask=inb)


@triton_op("fastmask::fisher_update_", mutates_args={"fisher"})
def fisher_update_(fisher: torch.Tensor, grad: torch.Tensor, beta: float) -> None:
    """F = beta F + (1 - beta) g^2 in place; both contiguous."""
    n = fisher.numel()
    if n:
        wrap_triton(_fisher_update_kernel)[_grid(n)](
            fisher, grad, n, beta, 1.0 - beta, G_DTYPE=TL_DTYPES[grad.dtype], BLOCK=BLOCK_SIZE
        )


@triton.jit
def _block_sums_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
    tl.store(out_ptr + pid, tl.sum(x, axis=0))


@triton.jit
def _histogram_kernel(s_ptr, hist_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    add_histogram(tl.load(s_ptr + offs, mask=inb, other=0.0), inb, hist_ptr)


@triton.jit
def _probs_kernel(s_ptr, out_ptr, total_ptr, level_ptr, n, ratio, min_prob, POISSON: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    s = tl.load(s_ptr + offs, mask=inb, other=0.0)
    total = tl.load(total_ptr)
    degenerate = (~((total > 0) & (total < float("inf")))).to(tl.float32)
    if POISSON:
        level_x, p0 = tl.load(level_ptr), tl.load(level_ptr + 1).to(tl.float32)
    else:
        level_x, p0 = tl.full([], 0.0, tl.float64), tl.full([], 0.0, tl.float32)
    pi = inclusion_prob(s, level_x, p0, degenerate, ratio, min_prob, 0 if POISSON else 1)
    tl.store(out_ptr + offs, pi, mask=inb)


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
    wrap_triton(_block_sums_kernel)[_grid(n)](s_units, partials, n, BLOCK=BLOCK_SIZE)
    total = partials.sum().to(torch.float32)  # fp64 block partials, rounded once (as the reference)
    level = partials  # unused unless poisson
    if poisson:
        hist = torch.zeros(HIST_BINS.value, dtype=torch.float64, device=s_units.device)
        wrap_triton(_histogram_kernel)[_grid(n)](s_units, hist, n, BLOCK=BLOCK_SIZE)
        level = sampling.water_level(hist[None], ratio, min_prob)[0].contiguous()
    wrap_triton(_probs_kernel)[_grid(n)](
        s_units, out, total, level, n, ratio, min_prob, POISSON=poisson, BLOCK=BLOCK_SIZE
    )
    return out


@triton.jit
def _select_kernel(pi_ptr, out_ptr, stream_ptr, n, seed_lo, seed_hi, BLOCK: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    inb = offs < n
    stream = tl.load(stream_ptr)
    u = uniform_block(first, stream & 0xFFFFFFFF, stream >> 32, seed_lo, seed_hi, BLOCK)
    pi = tl.load(pi_ptr + offs, mask=inb, other=0.0)
    tl.store(out_ptr + offs, (u < pi).to(tl.int8), mask=inb)


@triton_op("fastmask::bernoulli_select", mutates_args=())
def bernoulli_select(probs: torch.Tensor, seed_lo: int, seed_hi: int, stream: torch.Tensor) -> torch.Tensor:
    """Unit u selected iff U(seed, stream, u) < probs[u] (probs fp32 1-D; int8 0/1 out)."""
    n = probs.numel()
    out = torch.empty(n, dtype=torch.int8, device=probs.device)
    if n:
        wrap_triton(_select_kernel)[_grid(n)](probs, out, stream, n, seed_lo, seed_hi, BLOCK=BLOCK_SIZE)
    return out


@triton.jit
def _gumbel_kernel(s_ptr, keys_ptr, noise_ptr, total_ptr, stream_ptr, n, seed_lo, seed_hi, BLOCK: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    inb = offs < n
    stream = tl.load(stream_ptr)
    u = uniform_block(first, stream & 0xFFFFFFFF, stream >> 32, seed_lo, seed_hi, BLOCK)
    noise = -tl.log(-tl.log(u))
    total = tl.load(total_ptr)
    s = tl.load(s_ptr + offs, mask=inb, other=1.0)
    weight = tl.where((total > 0) & (total < float("inf")), s, 1.0)
    tl.store(keys_ptr + offs, tl.log(weight) + noise, mask=inb)
    tl.store(noise_ptr + offs, noise, mask=inb)


@triton_op("fastmask::gumbel_keys", mutates_args=())
def gumbel_keys(
    s_units: torch.Tensor, seed_lo: int, seed_hi: int, stream: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-top-k keys log w_u - log(-log U_u) and the noise, as the reference's gumbel_keys."""
    n = s_units.numel()
    keys, noise = torch.empty_like(s_units), torch.empty_like(s_units)
    if n:
        total = s_units.sum(dtype=torch.float64).to(torch.float32)
        wrap_triton(_gumbel_kernel)[_grid(n)](
            s_units, keys, noise, total, stream, n, seed_lo, seed_hi, BLOCK=BLOCK_SIZE
        )
    return keys, noise


@triton.jit
def _rescale_kernel(g_ptr, m_ptr, pi_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    pi = tl.load(pi_ptr + offs, mask=inb, other=1.0).to(tl.float32)
    out = tl.where(m, tl.div_rn(g, pi), 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)


@triton_op("fastmask::unbiased_rescale", mutates_args=())
def unbiased_rescale(grad: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """g * m / pi (0 where m is False), contiguous inputs, out in grad's dtype."""
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        wrap_triton(_rescale_kernel)[_grid(n)](grad, mask.view(torch.int8), probs, out, n, BLOCK=BLOCK_SIZE)
    return out
