"""The counter RNG of DESIGN §4 as Triton functions (the same words as fastmask.reference.philox)."""

import triton
import triton.language as tl

UNIT_SCALE = tl.constexpr(5.9604644775390625e-08)  # 2^-24


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks; key (k0, k1) is bumped after every round."""
    for _ in tl.static_range(10):
        a0, a2 = c0, c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = tl.mul(a2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(a0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _calls_at(j, s_lo, s_hi, k_lo, k_hi):
    """Philox calls with int64 counters ``j`` (any shape) on stream (s_lo, s_hi)."""
    c0 = (j & 0xFFFFFFFF).to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + s_lo.to(tl.uint32)
    c3 = tl.zeros_like(c0) + s_hi.to(tl.uint32)
    return philox4x32(c0, c1, c2, c3, k_lo.to(tl.uint32), k_hi.to(tl.uint32))


@triton.jit
def _calls(first_call, s_lo, s_hi, k_lo, k_hi, N_CALLS: tl.constexpr):
    return _calls_at(first_call + tl.arange(0, N_CALLS).to(tl.int64), s_lo, s_hi, k_lo, k_hi)


@triton.jit
def uniform_block(first, s_lo, s_hi, k_lo, k_hi, BLOCK: tl.constexpr):
    """U(seed, stream, i) for i in [first, first + BLOCK); ``first`` a multiple of 4 (int64).

    One Philox call serves four consecutive units: word i mod 4 of call i // 4.
    """
    w0, w1, w2, w3 = _calls(first // 4, s_lo, s_hi, k_lo, k_hi, BLOCK // 4)
    # join stacks on a new last axis: element [j, a, b] is word a of join b, where
    # join 0 = (w0, w2) and join 1 = (w1, w3); so position 4j + 2a + b holds word 2a + b.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK])
    return (words >> 8).to(tl.float32) * UNIT_SCALE


@triton.jit
def uniform_at(index, s_lo, s_hi, k_lo, k_hi):
    """U(seed, stream, i) for arbitrary int64 unit indices: one Philox call per unit, so four
    times the work of ``uniform_block``; for blocks that do not start at a multiple of 4
    (shards of a tensor)."""
    w0, w1, w2, w3 = _calls_at(index >> 2, s_lo, s_hi, k_lo, k_hi)
    lane = index & 3
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return (word >> 8).to(tl.float32) * UNIT_SCALE


@triton.jit
def _box_muller(wa, wb):
    u1 = ((wa >> 8) + 1).to(tl.float32) * UNIT_SCALE
    u2 = (wb >> 8).to(tl.float32) * UNIT_SCALE
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def normal_block(first, s_lo, s_hi, k_lo, k_hi, BLOCK: tl.constexpr):
    """Standard normals for i in [first, first + BLOCK), ``first`` even: words (0, 1) of call
    i // 2 for even i, words (2, 3) for odd i (Box-Muller)."""
    w0, w1, w2, w3 = _calls(first // 2, s_lo, s_hi, k_lo, k_hi, BLOCK // 2)
    return tl.reshape(tl.join(_box_muller(w0, w1), _box_muller(w2, w3)), [BLOCK])


@triton.jit
def normal_at(index, s_lo, s_hi, k_lo, k_hi):
    """Standard normals for arbitrary int64 indices (one Philox call per element)."""
    w0, w1, w2, w3 = _calls_at(index >> 1, s_lo, s_hi, k_lo, k_hi)
    odd = (index & 1) == 1
    return _box_muller(tl.where(odd, w2, w0), tl.where(odd, w3, w1))
