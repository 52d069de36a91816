"""The Triton counter RNG gives the reference's words (DESIGN §4 known answers)."""

import pytest
import torch

from fastmask.reference.philox import philox4x32, uniform
from tests.conftest import DEVICE, FAST_BACKENDS

if "triton" not in FAST_BACKENDS:
    pytest.skip("triton cannot run here", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastmask.kernels.philox import normal_block, uniform_block  # noqa: E402
from fastmask.kernels.philox import philox4x32 as triton_philox  # noqa: E402


@triton.jit
def _words(c_ptr, k0, k1, out_ptr):
    one = tl.arange(0, 1)
    c = [tl.load(c_ptr + i + one).to(tl.uint32) for i in tl.static_range(4)]
    w0, w1, w2, w3 = triton_philox(c[0], c[1], c[2], c[3], k0.to(tl.uint32), k1.to(tl.uint32))
    tl.store(out_ptr + 0 + one, w0.to(tl.int64))
    tl.store(out_ptr + 1 + one, w1.to(tl.int64))
    tl.store(out_ptr + 2 + one, w2.to(tl.int64))
    tl.store(out_ptr + 3 + one, w3.to(tl.int64))


@triton.jit
def _blocks(u_ptr, z_ptr, first, s_lo, s_hi, k_lo, k_hi, BLOCK: tl.constexpr):
    tl.store(u_ptr + tl.arange(0, BLOCK), uniform_block(first, s_lo, s_hi, k_lo, k_hi, BLOCK))
    tl.store(z_ptr + tl.arange(0, BLOCK), normal_block(first, s_lo, s_hi, k_lo, k_hi, BLOCK))


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_known_answers(counter, key, expected):
    out = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    _words[(1,)](torch.tensor(counter, dtype=torch.int64, device=DEVICE), *key, out)
    assert [w & 0xFFFFFFFF for w in out.tolist()] == expected


def test_blocks_match_reference():
    seed, stream, first = (0xDEADBEEF << 32) | 0xFFFFFFF7, (9 << 32) | 0xFFFFFFFE, 2**33 + 64
    u = torch.zeros(64, device=DEVICE)
    z = torch.zeros(64, device=DEVICE)
    _blocks[(1,)](u, z, first, stream & 0xFFFFFFFF, stream >> 32, seed & 0xFFFFFFFF, seed >> 32, BLOCK=64)
    assert torch.equal(u.cpu(), uniform(seed, stream, 64, start=first))
    i = torch.arange(first, first + 64)
    j = i // 2
    w = torch.stack(philox4x32(j & 0xFFFFFFFF, j >> 32, torch.full_like(i, stream & 0xFFFFFFFF),
                               torch.full_like(i, stream >> 32), seed & 0xFFFFFFFF, seed >> 32))
    wa, wb = torch.where(i % 2 == 0, w[0], w[2]), torch.where(i % 2 == 0, w[1], w[3])
    u1, u2 = ((wa >> 8) + 1).float() * 2**-24, (wb >> 8).float() * 2**-24
    expected = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)
    torch.testing.assert_close(z.cpu(), expected, rtol=1e-5, atol=1e-6)
