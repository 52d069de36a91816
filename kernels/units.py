"""Triton kernels of the low-level ops (importance EMA, inclusion probabilities, Bernoulli and
Gumbel selection, the unbiased rescale). They work on units (1-D); their launchers, registered
as ``torch.library`` ops, are ``fastmask.backends.triton.units``.
"""

import triton
import triton.language as tl

from .philox import uniform_block
from .sampling import add_histogram, inclusion_prob

BLOCK_SIZE = 1024


@triton.jit
def fisher_update_kernel(f_ptr, g_ptr, n, beta, one_minus_beta, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    f = tl.load(f_ptr + offs, mask=inb)
    g = tl.load(g_ptr + offs, mask=inb).to(tl.float32)
    tl.store(f_ptr + offs, f * beta + g * g * one_minus_beta, mask=inb)


@triton.jit
def block_sums_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
    tl.store(out_ptr + pid, tl.sum(x, axis=0))


@triton.jit
def histogram_kernel(s_ptr, hist_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    add_histogram(tl.load(s_ptr + offs, mask=inb, other=0.0), inb, hist_ptr)


@triton.jit
def probs_kernel(s_ptr, out_ptr, total_ptr, level_ptr, n, ratio, min_prob, POISSON: tl.constexpr,
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


@triton.jit
def select_kernel(pi_ptr, out_ptr, stream_ptr, n, seed_lo, seed_hi, BLOCK: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    inb = offs < n
    stream = tl.load(stream_ptr)
    u = uniform_block(first, stream & 0xFFFFFFFF, stream >> 32, seed_lo, seed_hi, BLOCK)
    pi = tl.load(pi_ptr + offs, mask=inb, other=0.0)
    tl.store(out_ptr + offs, (u < pi).to(tl.int8), mask=inb)


@triton.jit
def gumbel_kernel(s_ptr, keys_ptr, noise_ptr, total_ptr, stream_ptr, n, seed_lo, seed_hi, BLOCK: tl.constexpr):
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


@triton.jit
def rescale_kernel(g_ptr, m_ptr, pi_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    pi = tl.load(pi_ptr + offs, mask=inb, other=1.0).to(tl.float32)
    out = tl.where(m, tl.div_rn(g, pi), 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)
