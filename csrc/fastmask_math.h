// The per-element math of fastmask, shared by the CPU (OpenMP) and CUDA kernels.
//
// Every function reproduces fastmask.reference bit for bit in fp32: each operation is
// one IEEE-rounded op in the reference's order (build with -ffp-contract=off / no
// --use_fast_math), beta^t is binary exponentiation in double, S is summed in fp64.
// Semantics: DESIGN §3 (the step) and §4 (the counter RNG).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif

namespace fastmask {

constexpr float kUnitScale = 5.9604644775390625e-08f;  // 2^-24
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

enum Base : int { kSGD = 0, kAdam = 1, kAdamW = 2 };
enum Rescale : int { kNoRescale = 0, kHT = 1, kLegacy = 2 };

FM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox4x32-10: counter (c0..c3), key (k0, k1); the key is bumped between rounds.
FM_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c[0], a2 = c[2];
    c[0] = mulhi32(a2, kPhiloxM1) ^ c[1] ^ k0;
    c[2] = mulhi32(a0, kPhiloxM0) ^ c[3] ^ k1;
    c[1] = a2 * kPhiloxM1;
    c[3] = a0 * kPhiloxM0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The four words of call j = i / 4 of stream (s_lo, s_hi) under seed (k0, k1).
FM_HD void philox_call(uint64_t j, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  out[0] = static_cast<uint32_t>(j);
  out[1] = static_cast<uint32_t>(j >> 32);
  out[2] = s_lo;
  out[3] = s_hi;
  philox4x32_10(out, k0, k1);
}

FM_HD float uniform_from_word(uint32_t w) { return static_cast<float>(w >> 8) * kUnitScale; }

// U(seed, stream, i): word i mod 4 of call i / 4.
FM_HD float uniform_at(uint64_t i, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1) {
  uint32_t w[4];
  philox_call(i >> 2, s_lo, s_hi, k0, k1, w);
  return uniform_from_word(w[i & 3]);
}

// Standard normal of unit i: words (0, 1) of call i / 2 if i is even, (2, 3) if odd.
FM_HD float normal_at(uint64_t i, uint32_t s_lo, uint32_t s_hi, uint32_t k0, uint32_t k1) {
  uint32_t w[4];
  philox_call(i >> 1, s_lo, s_hi, k0, k1, w);
  const uint32_t wa = (i & 1) ? w[2] : w[0];
  const uint32_t wb = (i & 1) ? w[3] : w[1];
  const float u1 = static_cast<float>((wa >> 8) + 1u) * kUnitScale;
  const float u2 = static_cast<float>(wb >> 8) * kUnitScale;
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

// base^e in double by binary exponentiation (as fastmask.reference.step.power).
FM_HD double power(double base, uint32_t e) {
  double result = 1.0, square = base;
  for (int bit = 0; bit < 32; ++bit) {
    if ((e >> bit) & 1u) result = result * square;
    square = square * square;
  }
  return result;
}

// torch.clamp: NaN stays NaN (fminf/fmaxf would drop it).
FM_HD float clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

FM_HD uint32_t float_bits(float x) {
  uint32_t b;
  memcpy(&b, &x, sizeof b);
  return b;
}

FM_HD float bits_float(uint32_t b) {
  float x;
  memcpy(&x, &b, sizeof x);
  return x;
}

// The importance histogram (fastmask.reference.sampling): a unit's bin is the top 11 bits of
// its fp32 importance; the bin's floor q is the importance rounded down to 4 significant bits.
constexpr int kHistBins = 2048;
constexpr int kBinShift = 20;
constexpr int kSumCols = 4;  // pass-1 sums before the histogram

FM_HD uint32_t importance_bin(float s) { return (float_bits(s) & 0x7FFFFFFFu) >> kBinShift; }

// ---- per element: pass 1's terms, the importance EMA, the OGM update modulation

// The importance EMA F' = beta F + (1 - beta) x^2 (x: the unscaled gradient): pass 1's s for
// importance "ema", pass 2's new F, and the fisher_update op.
FM_HD float importance_ema(float fisher, float x, float beta, float one_minus_beta) {
  return fisher * beta + x * x * one_minus_beta;
}

// NaN or +-inf: x - x is NaN exactly for those (a compare that vectorises, unlike isfinite).
FM_HD bool is_nonfinite(float x) { return x - x != 0.0f; }

// Pass 1's non-finite count term: 1 for NaN and +-inf, else 0.
FM_HD double nonfinite(float x) { return is_nonfinite(x) ? 1.0 : 0.0; }

// OGM's modulate="update": the base update scaled by k, p_old + (p_new - p_old) * k.
FM_HD float modulated(float p_old, float p_new, float k) { return p_old + (p_new - p_old) * k; }

// Water-filling (poisson): pi = clamp(fp32(q * x), min_prob, 1), or p0 in bin 0, from the
// tensor's water level (x, p0); ratio for uniform, or when S is 0 or not finite.
FM_HD float inclusion_prob(float s, double level_x, float p0, bool degenerate, float ratio, float min_prob,
                           bool poisson) {
  if (!poisson || degenerate) return ratio;
  const uint32_t bin = importance_bin(s);
  const float q_x = static_cast<float>(static_cast<double>(bits_float(bin << kBinShift)) * level_x);
  return bin == 0 ? p0 : clamp(q_x, min_prob, 1.0f);
}

// ---- the water level (fastmask.reference.sampling.water_level, operation for operation)

// The masses of the level's prefix sums, exact: a positive bin's n q is the integer
// n * mantissa at bit `binade` of a fixed-point number whose unit is 2^-129, carried as
// kMassLimbs limbs of kMassLimbBits bits (sampling.mass_limbs), so that any order of adding
// them gives the same sum; mass_to_double rounds one by sampling.mass_to_float's rule.
constexpr int kPositiveBins = (0x7F800000 >> kBinShift) - 1;  // bins 1 .. 2039
constexpr int kMassLimbBits = 24;
constexpr int kMassLimbs = 13;
constexpr int64_t kMassLimbMask = (int64_t{1} << kMassLimbBits) - 1;

struct Mass {
  int64_t limb[kMassLimbs];
};

FM_HD Mass mass_zero() {
  Mass m;
  for (int i = 0; i < kMassLimbs; ++i) m.limb[i] = 0;
  return m;
}

// m += count * q of positive bin p (bin p + 1; count < 2^44)
FM_HD void mass_add_bin(Mass& m, int64_t count, int p) {
  const int bin = p + 1, exponent = bin >> 3;
  const int64_t value = count * ((exponent > 0 ? 8 : 0) + (bin & 7));  // < 2^48
  const int binade = (exponent > 1 ? exponent : 1) - 1, shift = binade % kMassLimbBits;
  int64_t* limb = m.limb + binade / kMassLimbBits;
  const int64_t low = (value & kMassLimbMask) << shift, high = (value >> kMassLimbBits) << shift;
  limb[0] += low & kMassLimbMask;
  limb[1] += (low >> kMassLimbBits) + (high & kMassLimbMask);
  limb[2] += high >> kMassLimbBits;
}

FM_HD double mass_to_double(Mass m) {
  for (int i = 0; i + 1 < kMassLimbs; ++i) {  // carries up (arithmetic shifts: floor division)
    m.limb[i + 1] += m.limb[i] >> kMassLimbBits;
    m.limb[i] &= kMassLimbMask;
  }
  int top = -1;
  for (int i = 0; i < kMassLimbs; ++i) top = m.limb[i] != 0 ? i : top;
  if (top < 0) return 0.0;
  const int64_t high = m.limb[top] * (int64_t{1} << kMassLimbBits) + (top >= 1 ? m.limb[top - 1] : 0);
  const double value = static_cast<double>(high) * 16777216.0 + static_cast<double>(top >= 2 ? m.limb[top - 2] : 0);
  const int64_t scale_bits = static_cast<int64_t>(kMassLimbBits * (top - 2) - 129 + 1023) << 52;
  double scale;
  memcpy(&scale, &scale_bits, sizeof scale);
  return value * scale;
}

// One tensor's level (x, p0). `bins.range(a, c, &count_a, &count_c, &between)` gives, for
// positive-bin indices a <= c in [0, kPositiveBins], the counts of the positive bins below a
// and below c (exact doubles) and the exact mass of the bins [a, c); `n_pos` is the count below
// kPositiveBins. Events (x, a, c): sampling.level_events'. Bisection for the first breakpoint
// with f >= k (f at the two bracketing breakpoints kept from it), then the interpolation, in the
// reference's order of operations. On a GPU every thread of a block runs it, `bins.range`
// reducing over the block: the control flow is uniform.
template <class Bins>
FM_HD void water_level(const Bins& bins, double n_zero, double n_pos, float ratio, double min_prob, const double* ex,
                       const int64_t* ea, const int64_t* ec, int64_t n_events, double* x_out, double* p0_out) {
  const double n = n_zero + n_pos;
  const double k = static_cast<double>(ratio) * n, f_start = min_prob * n;
  auto f_at = [&](int64_t e) {
    double count_a, count_c;
    Mass between;
    bins.range(ea[e], ec[e], &count_a, &count_c, &between);
    return min_prob * (n_zero + count_a) + ex[e] * mass_to_double(between) + (n_pos - count_c);
  };
  int64_t lo = 0, hi = n_events;
  double f_lo = f_start, f_hi = f_start;  // f at lo - 1 (before the first: f_start) and at hi, kept
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    const double f_mid = f_at(mid);
    if (f_mid >= k) {
      hi = mid;
      f_hi = f_mid;
    } else {
      lo = mid + 1;
      f_lo = f_mid;
    }
  }
  const bool saturated = lo == n_events;
  double x;
  if (k <= f_start) {
    x = 0.0;
  } else if (saturated) {
    x = INFINITY;
  } else {
    const double x_hi = ex[lo], x_lo = lo > 0 ? ex[lo - 1] : 0.0;
    x = x_lo + (k - f_lo) * (x_hi - x_lo) / (f_hi - f_lo);
  }
  float p0 = static_cast<float>(min_prob);
  if (saturated && n_zero > 0) {  // the zeros share what the capped units leave
    const double share = (k - n_pos) / n_zero;
    p0 = static_cast<float>(share < min_prob ? min_prob : (share > 1.0 ? 1.0 : share));
  }
  if (n_pos == 0) p0 = ratio;
  *x_out = x;
  *p0_out = p0;
}

// Gradient weight of a selected unit: 1 (AMSS), 1/pi (ht), 1/(s/S + 1/N) (legacy).
FM_HD float rescale_weight(int mode, float pi, float s, float total, bool degenerate, float inv_n) {
  if (mode == kHT) return 1.0f / pi;
  if (mode == kLegacy) return 1.0f / ((degenerate ? inv_n : s / total) + inv_n);
  return 1.0f;
}

// Scalars of one step of one tensor (Adam terms from its step count). The flags are 0/1
// floats: base_update tests each with one comparison in a select, which a CPU compiler
// vectorises (a bool branch, or a select on a combination of bools, it does not).
struct UpdateScalars {
  int kind;  // UpdateKind
  float lr, momentum, one_minus_dampening, weight_decay;
  float one_minus_beta1, beta2, one_minus_beta2, eps;
  float step_size, bc2_sqrt, decay;  // lr / (1 - beta1^t), sqrt(1 - beta2^t), 1 - lr * wd
  float adamw, adam_l2;              // AdamW's decoupled decay; Adam's L2 term (weight_decay != 0)
  float nesterov, first_step;        // first_step: t == 1, SGD's momentum buffer starts as d_p
};

// The three forms of the base update (base_update's template argument).
enum UpdateKind : int { kUpdateSgd = 0, kUpdateSgdMomentum = 1, kUpdateAdam = 2 };

// X(C++ type, name, default): the step's kernel config, in the order of
// fastmask.reference.spec.StepConfig.kernel_fields (a test checks names, order and types).
#define FASTMASK_KERNEL_CONFIG_FIELDS(X)                                                    \
  X(int, base_id, kAdamW) /* enum Base */                                                   \
  X(int, rescale_id, kNoRescale) /* enum Rescale */                                         \
  X(double, lr, 0) X(double, momentum, 0) X(double, dampening, 0) X(double, beta1, 0)       \
  X(double, beta2, 0) X(double, eps, 0) X(double, weight_decay, 0) X(double, ratio, 1)      \
  X(double, min_prob, 0) X(double, fisher_beta, 0) X(double, grad_coefficient, 1)           \
  X(double, update_coefficient, 1) X(bool, nesterov, false) X(bool, maximize, false)        \
  X(bool, is_masked, false) X(bool, poisson, true) X(bool, ema, false) X(bool, row, false)  \
  X(bool, freeze, false) X(bool, ge_noise, false) X(bool, modulate_update, false)           \
  X(bool, exact, false) X(bool, water_filling, false) X(int64_t, sums_width, kSumCols)      \
  X(uint64_t, seed, 0)

// The step's kernel config, one per batch: StepConfig.kernel_fields as the CPU and CUDA code
// reads it (the binding: kernel_config.h), plain data that a CUDA kernel takes by value.
struct KernelConfig {
#define FASTMASK_DECLARE_FIELD(type, name, init) type name = init;
  FASTMASK_KERNEL_CONFIG_FIELDS(FASTMASK_DECLARE_FIELD)
#undef FASTMASK_DECLARE_FIELD
  // Terms every C++ kernel derives alike: the Philox key (the seed's 32-bit halves, as
  // fastmask.reference.philox.split_seed) and the EMA's fp32 factors.
  FM_HD uint32_t key0() const { return static_cast<uint32_t>(seed); }
  FM_HD uint32_t key1() const { return static_cast<uint32_t>(seed >> 32); }
  FM_HD float fisher_beta32() const { return static_cast<float>(fisher_beta); }
  FM_HD float one_minus_fisher_beta32() const { return static_cast<float>(1.0 - fisher_beta); }
};

// Per-tensor scalars of one step, from the tensor's pass-1 sums (DESIGN §5's reduce).
struct TensorScalars {
  bool ok, degenerate;
  float new_step, total, std, inv_n;  // step after this one, S, GE std, 1 / N
  uint32_t step_word, mask_hi, noise_hi;     // the RNG stream words
  UpdateScalars update;
};

// The reduce of one tensor, shared by the CPU host loop and the CUDA reduce kernel: ok (its
// grads are finite and found_inf is not set), the step, S, the degenerate case, 1 / N,
// the GE std and the base optimizer's scalars (Adam bias corrections from fp64). `sums`:
// [sum s, sum g, sum g^2, non-finite count] of the full tensor; N = `full_units` and
// `full_numel` elements; `stream_hi` = 2 * the param's slot; `lr_value`: the lr tensor's
// value when `lr_is_tensor` (else c.lr).
FM_HD TensorScalars tensor_scalars(const KernelConfig& c, bool lr_is_tensor, const double* sums, float old_step,
                                   bool inf_flag, int64_t full_units, int64_t full_numel, uint32_t stream_hi,
                                   float lr_value) {
  TensorScalars sc;
  sc.ok = sums[3] == 0.0 && !inf_flag;
  sc.new_step = old_step + 1.0f;
  sc.total = static_cast<float>(sums[0]);
  sc.degenerate = !(sc.total > 0.0f && sc.total < INFINITY);
  sc.inv_n = static_cast<float>(1.0 / static_cast<double>(full_units));
  const double n = static_cast<double>(full_numel);
  const double var = sums[2] - sums[1] * sums[1] / n;
  sc.std = full_numel > 1 ? static_cast<float>(sqrt((var > 0.0 ? var : 0.0) / (n - 1.0))) : 0.0f;
  const uint32_t step_int = static_cast<uint32_t>(sc.new_step);
  sc.step_word = step_int;
  sc.mask_hi = stream_hi;
  sc.noise_hi = stream_hi + 1;

  UpdateScalars& u = sc.update;
  u.kind = c.base_id != kSGD ? kUpdateAdam : (c.momentum != 0.0 ? kUpdateSgdMomentum : kUpdateSgd);
  // as the reference: a float lr is a double and 1 - lr * wd is computed in double, then
  // rounded; a tensor lr is fp32 and 1 - lr * wd is fp32 arithmetic
  double lr64;
  if (lr_is_tensor) {
    u.lr = lr_value;
    lr64 = lr_value;
    u.decay = 1.0f - lr_value * static_cast<float>(c.weight_decay);
  } else {
    u.lr = static_cast<float>(c.lr);
    lr64 = c.lr;
    u.decay = static_cast<float>(1.0 - c.lr * c.weight_decay);
  }
  u.momentum = static_cast<float>(c.momentum);
  u.one_minus_dampening = static_cast<float>(1.0 - c.dampening);
  u.weight_decay = static_cast<float>(c.weight_decay);
  u.one_minus_beta1 = static_cast<float>(1.0 - c.beta1);
  u.beta2 = static_cast<float>(c.beta2);
  u.one_minus_beta2 = static_cast<float>(1.0 - c.beta2);
  u.eps = static_cast<float>(c.eps);
  u.step_size = static_cast<float>(lr64 / (1.0 - power(c.beta1, step_int)));
  u.bc2_sqrt = static_cast<float>(sqrt(1.0 - power(c.beta2, step_int)));
  u.adamw = c.base_id == kAdamW ? 1.0f : 0.0f;
  u.adam_l2 = c.base_id == kAdam && u.weight_decay != 0.0f ? 1.0f : 0.0f;
  u.nesterov = c.nesterov ? 1.0f : 0.0f;
  u.first_step = sc.new_step == 1.0f ? 1.0f : 0.0f;
  return sc;
}

// ---- per unit: the row draw of the per-tensor reduce

// One unit's draw (row units: sampled once per step in the reduce): its inclusion probability,
// whether U(unit) < pi selected it, and its gradient weight (0 if not selected). `dense_ratio`:
// a ratio of 1 read on the device (pi 1, weight 1: the base optimizer).
struct UnitDraw {
  float pi, weight;
  bool chosen;
};

FM_HD UnitDraw draw_unit(float s, uint64_t unit, const TensorScalars& sc, double level_x, float p0, float ratio,
                         float min_prob, bool poisson, int rescale, uint32_t k0, uint32_t k1, bool dense_ratio) {
  UnitDraw d;
  d.pi = dense_ratio ? 1.0f : inclusion_prob(s, level_x, p0, sc.degenerate, ratio, min_prob, poisson);
  d.chosen = uniform_at(unit, sc.step_word, sc.mask_hi, k0, k1) < d.pi;
  const float w = dense_ratio ? 1.0f : rescale_weight(rescale, d.pi, s, sc.total, sc.degenerate, sc.inv_n);
  d.weight = d.chosen ? w : 0.0f;
  return d;
}

// One base-optimizer update of one element (fp32), in the reference's operation order: returns
// the new param; m, v (Adam) or buf (SGD momentum) hold the old state and receive the new.
// Branch-free on the flags, so the CPU element loop vectorises with it inlined. L2: the config
// may have an L2 term (Adam's adam_l2, SGD's weight_decay); false compiles it out (a select
// less per element for the CPU loop, whose caller has checked that the term is off).
template <int KIND, bool L2 = true>
FM_HD float base_update(const UpdateScalars& k, float p, float g, float& m, float& v, float& buf) {
  if (KIND == kUpdateAdam) {
    // (AdamW with weight_decay 0 has decay 1: p * 1 is p exactly)
    const float pd = k.adamw != 0.0f ? p * k.decay : p;
    const float gd = L2 && k.adam_l2 != 0.0f ? g + k.weight_decay * p : g;
    m = m + (gd - m) * k.one_minus_beta1;
    v = v * k.beta2 + gd * gd * k.one_minus_beta2;
    return pd - k.step_size * (m / (sqrtf(v) / k.bc2_sqrt + k.eps));
  }
  float d = L2 && k.weight_decay != 0.0f ? g + k.weight_decay * p : g;
  if (KIND == kUpdateSgdMomentum) {
    buf = k.first_step != 0.0f ? d : buf * k.momentum + d * k.one_minus_dampening;
    d = k.nesterov != 0.0f ? d + k.momentum * buf : buf;
  }
  return p - k.lr * d;
}

// base_update of the tensor's kind, chosen at run time (the CUDA kernel).
FM_HD float base_update(const UpdateScalars& k, float p, float g, float& m, float& v, float& buf) {
  if (k.kind == kUpdateAdam) return base_update<kUpdateAdam>(k, p, g, m, v, buf);
  if (k.kind == kUpdateSgdMomentum) return base_update<kUpdateSgdMomentum>(k, p, g, m, v, buf);
  return base_update<kUpdateSgd>(k, p, g, m, v, buf);
}

}  // namespace fastmask
