// bf16 / fp16 params and grads to fp32 and back, a block at a time, in vectors: bit for bit the
// conversions of c10::BFloat16 and c10::Half, which the element loops called one element at a
// time and which kept them scalar (bf16's rounding tests isnan with a branch; with F16C, c10's
// fp16 conversions are the one-element _cvtsh_ss / _cvtss_sh). The passes widen a block of a
// half tensor into an fp32 buffer on the stack, run their fp32 loop on it, and round the
// params back.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../fastmask_math.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastmask_cpu {

// Elements converted at a time: the fp32 buffers of a block live on the stack, in L1.
constexpr int64_t kWidenBlock = 256;

// dst[i] = float(src[i]), i < n: exact (bf16 is fp32's upper half).
inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = fastmask::bits_float(static_cast<uint32_t>(src[i].x) << 16);
}

// dst[i] = BFloat16(src[i]), i < n: round to nearest even, NaN to 0x7FC0 (c10's
// round_to_nearest_even, as a select).
inline void narrow(const float* src, c10::BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = fastmask::float_bits(src[i]);
    const uint32_t rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
    dst[i].x = static_cast<uint16_t>(src[i] != src[i] ? 0x7FC0u : rounded);
  }
}

// dst[i] = float(src[i]), i < n: with F16C, 8 at a time by the instruction c10 uses one at a time.
inline void widen(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst[i] = Half(src[i]), i < n: round to nearest even, as c10 (with F16C the same instruction).
inline void narrow(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

// The n values from src as fp32: src itself (fp32), or widened into `buffer` (at least n floats);
// writable where src is.
template <typename T>
std::conditional_t<std::is_const_v<T>, const float*, float*> as_float(T* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<std::remove_const_t<T>, float>) {
    return src;
  } else {
    widen(src, buffer, n);
    return buffer;
  }
}

// After as_float(dst, buffer, n) and writes to its result: the values written, rounded into
// dst (nothing to do for fp32, written in place).
template <typename T>
void store_from_float(const float* buffer, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) narrow(buffer, dst, n);
}

// An fp32 buffer for a block of T values (one float where T is fp32, read in place).
template <typename T>
using WidenBuffer = float[std::is_same_v<T, float> ? 1 : kWidenBlock];

}  // namespace fastmask_cpu
