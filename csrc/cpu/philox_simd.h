// The counter RNG of DESIGN §4 (Philox4x32-10) for blocks of 64 units, with the calls side
// by side so the rounds run in vectors. Bit-identical to fastmask::philox_call (fastmask_math.h)
// and the reference; the tests build each variant and compare. Header-only, no torch.
#pragma once

#include <cstdint>

#include "../fastmask_math.h"

// Philox in vectors, one call per 64-bit lane: AVX-512 (8 calls per vector), else AVX2 (4), unless
// FASTMASK_PORTABLE_RNG asks for the portable loop (the tests build every variant, so all stay
// bit-identical to the reference)
#if defined(__AVX512F__) && !defined(FASTMASK_PORTABLE_RNG)
#define FASTMASK_AVX512_RNG 1
#include <immintrin.h>
#elif defined(__AVX2__) && !defined(FASTMASK_PORTABLE_RNG)
#define FASTMASK_AVX2_RNG 1
#include <immintrin.h>
#endif

namespace fastmask_cpu {

constexpr int kBlock = 64;  // units per block: 16 Philox calls side by side

// U for the 4 * kCalls units from 4 * first_call: kCalls Philox calls side by side, so
// the rounds vectorise across calls (structure of arrays).
template <int kCalls>
inline void uniform_calls(uint64_t first_call, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1, float* out) {
  uint32_t c0[kCalls], c1[kCalls], c2[kCalls], c3[kCalls];
  for (int j = 0; j < kCalls; ++j) {
    const uint64_t call = first_call + j;
    c0[j] = static_cast<uint32_t>(call);
    c1[j] = static_cast<uint32_t>(call >> 32);
    c2[j] = s_lo;
    c3[j] = s_hi;
  }
  uint32_t key0[10], key1[10];
  for (int r = 0; r < 10; ++r) {
    key0[r] = k0 + static_cast<uint32_t>(r) * fastmask::kPhiloxW0;
    key1[r] = k1 + static_cast<uint32_t>(r) * fastmask::kPhiloxW1;
  }
  for (int j = 0; j < kCalls; ++j) {  // lanes outside, rounds inside: one vector of 16 calls
    uint32_t x0 = c0[j], x1 = c1[j], x2 = c2[j], x3 = c3[j];
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(x0) * fastmask::kPhiloxM0;
      const uint64_t p2 = static_cast<uint64_t>(x2) * fastmask::kPhiloxM1;
      x0 = static_cast<uint32_t>(p2 >> 32) ^ x1 ^ key0[r];
      x2 = static_cast<uint32_t>(p0 >> 32) ^ x3 ^ key1[r];
      x1 = static_cast<uint32_t>(p2);
      x3 = static_cast<uint32_t>(p0);
    }
    c0[j] = x0;
    c1[j] = x1;
    c2[j] = x2;
    c3[j] = x3;
  }
  for (int j = 0; j < kCalls; ++j) {
    out[4 * j + 0] = fastmask::uniform_from_word(c0[j]);
    out[4 * j + 1] = fastmask::uniform_from_word(c1[j]);
    out[4 * j + 2] = fastmask::uniform_from_word(c2[j]);
    out[4 * j + 3] = fastmask::uniform_from_word(c3[j]);
  }
}

#ifdef FASTMASK_AVX512_RNG
// uniform_calls<16> in two vectors of 8 calls, one call per 64-bit lane, as the AVX2 loop below
// (one multiply and one shuffle per (high, low) pair; the three-way xor in one vpternlogd).
inline void uniform_calls16(uint64_t first_call, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1,
                            float* out) {
  constexpr int kVectors = 2;
  __m512i x0[kVectors], x1[kVectors], x2[kVectors], x3[kVectors];
  const __m512i first = _mm512_set1_epi64(static_cast<long long>(first_call));
  for (int q = 0; q < kVectors; ++q) {  // the 64-bit counters: the low word wraps into the high
    x0[q] = _mm512_add_epi64(first, _mm512_setr_epi64(8 * q, 8 * q + 1, 8 * q + 2, 8 * q + 3, 8 * q + 4,
                                                      8 * q + 5, 8 * q + 6, 8 * q + 7));
    x1[q] = _mm512_srli_epi64(x0[q], 32);
    x2[q] = _mm512_set1_epi64(s_lo);
    x3[q] = _mm512_set1_epi64(s_hi);
  }
  const __m512i m0 = _mm512_set1_epi64(fastmask::kPhiloxM0), m1 = _mm512_set1_epi64(fastmask::kPhiloxM1);
  constexpr int kXor3 = 0x96;  // vpternlogd's table of a ^ b ^ c
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0 + r * fastmask::kPhiloxW0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1 + r * fastmask::kPhiloxW1));
    for (int q = 0; q < kVectors; ++q) {
      const __m512i p0 = _mm512_mul_epu32(x0[q], m0), p2 = _mm512_mul_epu32(x2[q], m1);
      // _MM_PERM_DDBB (0xF5): each lane's high word into its low word (and kept in the high)
      x0[q] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p2, _MM_PERM_DDBB), x1[q], key0, kXor3);
      x2[q] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p0, _MM_PERM_DDBB), x3[q], key1, kXor3);
      x1[q] = p2;
      x3[q] = p0;
    }
  }
  const __m512 scale = _mm512_set1_ps(fastmask::kUnitScale);
  auto uniform = [&](__m512i w) { return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), scale); };
  // 64-bit indices of the even and odd vectors below: calls 8q .. 8q + 3, then 8q + 4 .. 8q + 7
  const __m512i low_calls = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i high_calls = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int q = 0; q < kVectors; ++q) {
    // per 64-bit lane (words 0, 1) and (words 2, 3) of its call, then per 128-bit lane a call's 4 words
    const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, x0[q], _mm512_slli_epi64(x1[q], 32));
    const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, x2[q], _mm512_slli_epi64(x3[q], 32));
    const __m512i even = _mm512_unpacklo_epi64(w01, w23);  // calls 8q, 8q + 2, 8q + 4, 8q + 6
    const __m512i odd = _mm512_unpackhi_epi64(w01, w23);   // calls 8q + 1, 8q + 3, 8q + 5, 8q + 7
    _mm512_storeu_ps(out + 32 * q, uniform(_mm512_permutex2var_epi64(even, low_calls, odd)));
    _mm512_storeu_ps(out + 32 * q + 16, uniform(_mm512_permutex2var_epi64(even, high_calls, odd)));
  }
}
#elif defined(FASTMASK_AVX2_RNG)
// uniform_calls<16> in four vectors of 4 calls, one call per 64-bit lane: vpmuludq multiplies a
// lane's low words into the whole 64-bit product, so a round's (high, low) halves cost one
// multiply and one shuffle (vpshufd, off the multiply's ports), where 32-bit lanes need two
// multiplies, three shifts and two blends per 8 calls. The lanes' high words are left unmasked
// between rounds: vpmuludq reads only the low words, and the output keeps only them.
inline void uniform_calls16(uint64_t first_call, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1,
                            float* out) {
  constexpr int kVectors = 4;
  __m256i x0[kVectors], x1[kVectors], x2[kVectors], x3[kVectors];
  const __m256i first = _mm256_set1_epi64x(static_cast<long long>(first_call));
  for (int q = 0; q < kVectors; ++q) {  // the 64-bit counters: the low word wraps into the high
    x0[q] = _mm256_add_epi64(first, _mm256_setr_epi64x(4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3));
    x1[q] = _mm256_srli_epi64(x0[q], 32);
    x2[q] = _mm256_set1_epi64x(s_lo);
    x3[q] = _mm256_set1_epi64x(s_hi);
  }
  const __m256i m0 = _mm256_set1_epi64x(fastmask::kPhiloxM0), m1 = _mm256_set1_epi64x(fastmask::kPhiloxM1);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0 + r * fastmask::kPhiloxW0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1 + r * fastmask::kPhiloxW1));
    for (int q = 0; q < kVectors; ++q) {
      const __m256i p0 = _mm256_mul_epu32(x0[q], m0), p2 = _mm256_mul_epu32(x2[q], m1);
      // 0xF5: each lane's high word into its low word (and kept in the high)
      x0[q] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p2, 0xF5), x1[q]), key0);
      x2[q] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p0, 0xF5), x3[q]), key1);
      x1[q] = p2;
      x3[q] = p0;
    }
  }
  const __m256 scale = _mm256_set1_ps(fastmask::kUnitScale);
  auto uniform = [&](__m256i w) { return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), scale); };
  for (int q = 0; q < kVectors; ++q) {
    // per 64-bit lane (words 0, 1) and (words 2, 3) of its call, then per 128-bit lane a call's 4 words
    const __m256i w01 = _mm256_blend_epi32(x0[q], _mm256_slli_epi64(x1[q], 32), 0xAA);
    const __m256i w23 = _mm256_blend_epi32(x2[q], _mm256_slli_epi64(x3[q], 32), 0xAA);
    const __m256i even = _mm256_unpacklo_epi64(w01, w23);  // calls 4q | 4q + 2
    const __m256i odd = _mm256_unpackhi_epi64(w01, w23);   // calls 4q + 1 | 4q + 3
    _mm256_storeu_ps(out + 16 * q, uniform(_mm256_permute2x128_si256(even, odd, 0x20)));
    _mm256_storeu_ps(out + 16 * q + 8, uniform(_mm256_permute2x128_si256(even, odd, 0x31)));
  }
}
#else
inline void uniform_calls16(uint64_t first_call, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1,
                            float* out) {
  uniform_calls<16>(first_call, s_lo, s_hi, k0, k1, out);
}
#endif

// U for the 64 units [first, first + 64); a shard's `first` need not be a multiple of 4.
inline void uniform_block(uint64_t first, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1, float* out) {
  const int shift = static_cast<int>(first & 3);
  if (shift == 0) return uniform_calls16(first >> 2, s_lo, s_hi, k0, k1, out);
  alignas(64) float words[kBlock + 4];
  uniform_calls16(first >> 2, s_lo, s_hi, k0, k1, words);
  uniform_calls<1>((first >> 2) + 16, s_lo, s_hi, k0, k1, words + kBlock);
  for (int l = 0; l < kBlock; ++l) out[l] = words[shift + l];
}

}  // namespace fastmask_cpu
