"""Philox4x32-10 counter RNG in plain PyTorch (DESIGN §4).

Every backend draws its random numbers from this one definition, so the same
``(seed, stream, index)`` gives the same number on torch, Triton, C++ and CUDA.
Unsigned 32-bit arithmetic is emulated with int64 tensors: a 32x32-bit product
does not fit a signed 64-bit integer, so it is formed from 16-bit halves.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
UNIT_SCALE = 2.0**-24  # U = (word >> 8) * 2^-24: exact in float32

def draw_seed() -> int:
    """A 63-bit seed from torch's default CPU generator (so torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


# Stream layout: the low 32 bits carry the optimizer step, the high 32 bits the
# parameter slot and the purpose (mask or noise), see ``rng_stream``.
STREAM_MASK = 0
STREAM_NOISE = 1


def rng_stream(step: int | torch.Tensor, slot: int, purpose: int = STREAM_MASK) -> int | torch.Tensor:
    """The documented stream of one parameter tensor at one optimizer step.

    ``stream = ((2 * slot + purpose) << 32) | step``, where ``step`` is the
    parameter's step count after this step (1 for its first update), ``slot`` its
    position in the optimizer's flattened parameter list and ``purpose`` 0 for
    masks, 1 for OGM-GE noise. ``step`` may be a 0-d tensor (kept on device).
    """
    high = (2 * slot + purpose) << 32
    if isinstance(step, torch.Tensor):
        return step.to(torch.int64) + high
    return int(step) + high


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of constant ``a`` and ``b``."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    low = mid & MASK32
    high = (p_hi >> 16) + (mid >> 32)
    return high & MASK32, low


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding unsigned 32-bit words (broadcasting)."""
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1): a 64-bit seed's low and high 32-bit words."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed}")
    return seed & MASK32, seed >> 32


def _stream_words(stream: int | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(stream, torch.Tensor):
        s = stream.to(device=device, dtype=torch.int64)
        return s & MASK32, (s >> 32) & MASK32
    stream = int(stream)
    if not 0 <= stream < 2**63:
        raise ValueError(f"stream must be an integer in [0, 2^63), got {stream}")
    return (torch.tensor(stream & MASK32, device=device), torch.tensor(stream >> 32, device=device))


def random_words(
    seed: int, stream: int | torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """The 32-bit word (as int64) that unit ``index`` draws: word ``i mod 4`` of call ``i // 4``."""
    k0, k1 = split_seed(seed)
    s0, s1 = _stream_words(stream, index.device)
    j = index >> 2
    words = torch.stack(philox4x32(j & MASK32, j >> 32, s0.expand_as(j), s1.expand_as(j), k0, k1))
    return words.gather(0, (index & 3).unsqueeze(0)).squeeze(0)


def uniform(
    seed: int, stream: int | torch.Tensor, n: int, device: torch.device | str = "cpu", start: int = 0
) -> torch.Tensor:
    """U(seed, stream, i) for i in [start, start + n): float32 in [0, 1), multiples of 2^-24.

    One Philox call serves four consecutive units, so each call is computed once.
    ``start`` lets a shard draw exactly the numbers of its slice of the full tensor.
    """
    device = torch.device(device)
    if n == 0:
        return torch.empty(0, device=device)
    k0, k1 = split_seed(seed)
    s0, s1 = _stream_words(stream, device)
    j = torch.arange(start >> 2, ((start + n - 1) >> 2) + 1, device=device, dtype=torch.int64)
    words = torch.stack(philox4x32(j & MASK32, j >> 32, s0.expand_as(j), s1.expand_as(j), k0, k1), dim=1)
    offset = start & 3
    flat = words.reshape(-1)[offset : offset + n]
    return (flat >> 8).to(torch.float32) * UNIT_SCALE


def uniform_at(seed: int, stream: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """U(seed, stream, i) for arbitrary global unit indices (an int64 tensor)."""
    return (random_words(seed, stream, index) >> 8).to(torch.float32) * UNIT_SCALE


def normal(
    seed: int, stream: int | torch.Tensor, n: int, device: torch.device | str = "cpu", start: int = 0
) -> torch.Tensor:
    """Standard normals by Box-Muller (DESIGN §4), float32, for i in [start, start + n).

    Unit i uses words (0, 1) of call i // 2 if i is even, words (2, 3) if odd;
    u1 = ((wa >> 8) + 1) * 2^-24 in (0, 1], u2 = (wb >> 8) * 2^-24,
    z = sqrt(-2 ln u1) * cos(2 pi u2).
    """
    device = torch.device(device)
    if n == 0:
        return torch.empty(0, device=device)
    k0, k1 = split_seed(seed)
    s0, s1 = _stream_words(stream, device)
    j = torch.arange(start >> 1, ((start + n - 1) >> 1) + 1, device=device, dtype=torch.int64)
    w0, w1, w2, w3 = philox4x32(j & MASK32, j >> 32, s0.expand_as(j), s1.expand_as(j), k0, k1)
    offset = start & 1
    wa = torch.stack((w0, w2), dim=1).reshape(-1)[offset : offset + n]
    wb = torch.stack((w1, w3), dim=1).reshape(-1)[offset : offset + n]
    u1 = ((wa >> 8) + 1).to(torch.float32) * UNIT_SCALE
    u2 = (wb >> 8).to(torch.float32) * UNIT_SCALE
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
