// The counter RNG of DESIGN §4 (Philox4x32-10) for blocks of 64 units, with the calls side
// by side so the rounds run in vectors. Bit-identical to fastmask::philox_call (fastmask_math.h)
// and the reference; the tests build each variant and compare. Header-only, no torch.
#pragma once

#include <cstdint>

#include "../fastmask_math.h"

// Philox in vectors: AVX-512 (16 calls per vector), else AVX2 (8 calls per vector), unless
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
// (high, low) 32-bit halves of x * m in each of the 16 lanes: vpmuludq multiplies the even
// lanes; the odd lanes are shifted down and multiplied separately.
inline __m512i mulhilo_avx512(__m512i x, __m512i m, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// uniform_calls<16> with one call per vector lane; the 4 x 16 words are transposed back
// to unit order (word w of call j is unit 4j + w).
inline void uniform_calls16(uint64_t first_call, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1,
                            float* out) {
  const uint32_t lo = static_cast<uint32_t>(first_call), hi = static_cast<uint32_t>(first_call >> 32);
  __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(lo), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                         13, 14, 15));
  const __mmask16 carry = _mm512_cmplt_epu32_mask(x0, _mm512_set1_epi32(lo));  // the counter's low word wrapped
  __m512i x1 = _mm512_mask_add_epi32(_mm512_set1_epi32(hi), carry, _mm512_set1_epi32(hi), _mm512_set1_epi32(1));
  __m512i x2 = _mm512_set1_epi32(s_lo), x3 = _mm512_set1_epi32(s_hi);
  const __m512i m0 = _mm512_set1_epi32(fastmask::kPhiloxM0), m1 = _mm512_set1_epi32(fastmask::kPhiloxM1);
  for (int r = 0; r < 10; ++r) {
    __m512i lo0, lo2;
    const __m512i hi0 = mulhilo_avx512(x0, m0, &lo0);
    const __m512i hi2 = mulhilo_avx512(x2, m1, &lo2);
    x0 = _mm512_xor_si512(_mm512_xor_si512(hi2, x1), _mm512_set1_epi32(k0 + r * fastmask::kPhiloxW0));
    x2 = _mm512_xor_si512(_mm512_xor_si512(hi0, x3), _mm512_set1_epi32(k1 + r * fastmask::kPhiloxW1));
    x1 = lo2;
    x3 = lo0;
  }
  const __m512 scale = _mm512_set1_ps(fastmask::kUnitScale);
  auto uniform = [&](__m512i w) { return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), scale); };
  auto as_pd = [](__m512 x) { return _mm512_castps_pd(x); };
  auto as_ps = [](__m512d x) { return _mm512_castpd_ps(x); };
  const __m512 u0 = uniform(x0), u1 = uniform(x1), u2 = uniform(x2), u3 = uniform(x3);
  // per 128-bit lane: (u0, u1) and (u2, u3) interleaved, then 64-bit pairs: calls j, j+4, j+8, j+12
  const __m512 a_lo = _mm512_unpacklo_ps(u0, u1), a_hi = _mm512_unpackhi_ps(u0, u1);
  const __m512 b_lo = _mm512_unpacklo_ps(u2, u3), b_hi = _mm512_unpackhi_ps(u2, u3);
  const __m512 r0 = as_ps(_mm512_unpacklo_pd(as_pd(a_lo), as_pd(b_lo)));
  const __m512 r1 = as_ps(_mm512_unpackhi_pd(as_pd(a_lo), as_pd(b_lo)));
  const __m512 r2 = as_ps(_mm512_unpacklo_pd(as_pd(a_hi), as_pd(b_hi)));
  const __m512 r3 = as_ps(_mm512_unpackhi_pd(as_pd(a_hi), as_pd(b_hi)));
  // a 4 x 4 transpose of 128-bit lanes: output vector q holds calls 4q .. 4q + 3
  const __m512 t0 = _mm512_shuffle_f32x4(r0, r1, 0x44), t1 = _mm512_shuffle_f32x4(r2, r3, 0x44);
  const __m512 t2 = _mm512_shuffle_f32x4(r0, r1, 0xEE), t3 = _mm512_shuffle_f32x4(r2, r3, 0xEE);
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(t0, t1, 0x88));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
}
#elif defined(FASTMASK_AVX2_RNG)
// (high, low) 32-bit halves of x * m in each of the 8 lanes: vpmuludq multiplies the even
// lanes; the odd lanes are shifted down and multiplied separately.
inline __m256i mulhilo_avx2(__m256i x, __m256i m, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(x, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// uniform_calls<8> with one call per vector lane, transposed back to unit order.
inline void uniform_calls8(uint64_t first_call, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1,
                           float* out) {
  const uint32_t lo = static_cast<uint32_t>(first_call), hi = static_cast<uint32_t>(first_call >> 32);
  const __m256i lo_v = _mm256_set1_epi32(static_cast<int>(lo));
  __m256i x0 = _mm256_add_epi32(lo_v, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // the counter's low word wrapped where x0 < lo (unsigned: compared with the sign bits flipped)
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(lo_v, sign), _mm256_xor_si256(x0, sign));
  __m256i x1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(hi)), carry);  // carry lanes are -1
  __m256i x2 = _mm256_set1_epi32(static_cast<int>(s_lo)), x3 = _mm256_set1_epi32(static_cast<int>(s_hi));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(fastmask::kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(fastmask::kPhiloxM1));
  for (int r = 0; r < 10; ++r) {
    __m256i lo0, lo2;
    const __m256i hi0 = mulhilo_avx2(x0, m0, &lo0);
    const __m256i hi2 = mulhilo_avx2(x2, m1, &lo2);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi2, x1),
                          _mm256_set1_epi32(static_cast<int>(k0 + r * fastmask::kPhiloxW0)));
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3),
                          _mm256_set1_epi32(static_cast<int>(k1 + r * fastmask::kPhiloxW1)));
    x1 = lo2;
    x3 = lo0;
  }
  const __m256 scale = _mm256_set1_ps(fastmask::kUnitScale);
  auto uniform = [&](__m256i w) { return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), scale); };
  auto as_pd = [](__m256 x) { return _mm256_castps_pd(x); };
  auto as_ps = [](__m256d x) { return _mm256_castpd_ps(x); };
  const __m256 u0 = uniform(x0), u1 = uniform(x1), u2 = uniform(x2), u3 = uniform(x3);
  // per 128-bit lane: (u0, u1) and (u2, u3) interleaved, then 64-bit pairs: calls j and j + 4
  const __m256 a_lo = _mm256_unpacklo_ps(u0, u1), a_hi = _mm256_unpackhi_ps(u0, u1);
  const __m256 b_lo = _mm256_unpacklo_ps(u2, u3), b_hi = _mm256_unpackhi_ps(u2, u3);
  const __m256 r0 = as_ps(_mm256_unpacklo_pd(as_pd(a_lo), as_pd(b_lo)));  // calls 0 | 4
  const __m256 r1 = as_ps(_mm256_unpackhi_pd(as_pd(a_lo), as_pd(b_lo)));  // calls 1 | 5
  const __m256 r2 = as_ps(_mm256_unpacklo_pd(as_pd(a_hi), as_pd(b_hi)));  // calls 2 | 6
  const __m256 r3 = as_ps(_mm256_unpackhi_pd(as_pd(a_hi), as_pd(b_hi)));  // calls 3 | 7
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(r0, r1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(r2, r3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(r0, r1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(r2, r3, 0x31));
}

inline void uniform_calls16(uint64_t first_call, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1,
                            float* out) {
  uniform_calls8(first_call, s_lo, s_hi, k0, k1, out);
  uniform_calls8(first_call + 8, s_lo, s_hi, k0, k1, out + 32);
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
