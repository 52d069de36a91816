// The "cuda" backend's kernels: the fused masked step over all tensors of a batch.
//
// Same pipeline and math as the CPU backend (../fastmask_math.h): pass 1 over g writes
// fixed-order fp64 partials per block (or per row), a per-tensor reduce sums them in a
// fixed tree, advances `step` on device and samples rows, and pass 2 updates every
// element with the mask in registers. One launch per pass covers all tensors through
// int64 pointer and metadata tables. Each thread owns 4 consecutive elements: one
// Philox call, and one 16-byte load and store of the fp32 states when aligned.
// Build with --fmad=false (no contraction: every op rounds as the reference's).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "masked_step.h"

namespace fastmask_cuda {
namespace {

using fastmask::UpdateScalars;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename P>
__device__ __forceinline__ P from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Deterministic block sum of per-thread doubles (a fixed tree); the result is in thread 0.
__device__ double block_sum(double value, double* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// Sums of N per-thread doubles over the block, returned in every thread's `v`. For the water
// level's counts and mass limbs, exact integers (every partial sum below 2^53): any order of
// adding them gives the same sums. `shared`: at least (blockDim.x / 32) * N doubles.
template <int N>
__device__ void block_sum_exact(double (&v)[N], double* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int i = 0; i < N; ++i)
    for (int offset = 16; offset > 0; offset >>= 1) v[i] += __shfl_down_sync(0xffffffffu, v[i], offset);
  if (lane == 0)
    for (int i = 0; i < N; ++i) shared[warp * N + i] = v[i];
  __syncthreads();
  for (int i = 0; i < N; ++i) {
    double total = 0;
    for (int w = 0; w < warps; ++w) total += shared[w * N + i];
    v[i] = total;
  }
  __syncthreads();
}

// fastmask::water_level's bins for one block: a tensor's positive bins (`row[p]`: the count of
// positive bin p, in shared memory), each range's counts and exact mass summed over the block.
struct BlockBins {
  const double* row;
  double* shared;
  __device__ void range(int64_t a, int64_t c, double* count_a, double* count_c, fastmask::Mass* between) const {
    constexpr int kLimbs = fastmask::kMassLimbs;
    fastmask::Mass local = fastmask::mass_zero();
    double v[kLimbs + 2] = {};
    for (int p = threadIdx.x; p < fastmask::kPositiveBins; p += blockDim.x) {
      const double n = row[p];
      v[0] += p < a ? n : 0.0;
      v[1] += p < c ? n : 0.0;
      if (n != 0.0 && p >= a && p < c) fastmask::mass_add_bin(local, static_cast<int64_t>(n), p);
    }
    for (int i = 0; i < kLimbs; ++i) v[i + 2] = static_cast<double>(local.limb[i]);  // below 2^28 per thread
    block_sum_exact(v, shared);
    *count_a = v[0];
    *count_c = v[1];
    for (int i = 0; i < kLimbs; ++i) between->limb[i] = static_cast<int64_t>(v[i + 2]);
  }
};

// Tensor t's water level (x, p0) from its histogram row (`hist_row`: 4 sums, then
// fastmask::kHistBins counts), solved by the whole block; every thread gets it.
__device__ void block_water_level(const double* hist_row, float ratio, const LaunchArgs& a, double* row,
                                 double* shared, double* x, double* p0) {
  for (int p = threadIdx.x; p < fastmask::kPositiveBins; p += blockDim.x) row[p] = hist_row[4 + 1 + p];
  __syncthreads();
  double n_pos[1] = {0.0};
  for (int p = threadIdx.x; p < fastmask::kPositiveBins; p += blockDim.x) n_pos[0] += row[p];
  block_sum_exact(n_pos, shared);
  const BlockBins bins{row, shared};
  fastmask::water_level(bins, hist_row[4], n_pos[0], ratio, a.config.min_prob, a.events_x, a.events_a,
                        a.events_c, a.n_events, x, p0);
}

constexpr uint32_t kLastBin = fastmask::kHistBins - 1;

// `bins`: the block's shared importance histogram, or nullptr (no water-filling).
template <typename G>
__device__ void accumulate(const G* g, const float* fisher, int64_t i, float grad_scale, const fastmask::KernelConfig& c,
                           double acc[4], unsigned int* bins) {
  const float x = to_float(g[i]) / grad_scale;
  const float s = c.ema ? fastmask::importance_ema(fisher[i], x, c.fisher_beta32(), c.one_minus_fisher_beta32()) : x * x;
  if (bins) atomicAdd(bins + min(fastmask::importance_bin(s), kLastBin), 1u);  // NaN bits: the last bin
  acc[0] += s;
  acc[1] += x;
  acc[2] += static_cast<double>(x) * x;
  acc[3] += fastmask::nonfinite(x);
}

// Water-filling: the block's histogram in shared memory, added to its tensor's row of `hist`
// (integer counts in fp64: exact in any order of the atomic adds). Else nothing.
__device__ unsigned int* clear_bins(unsigned int* bins, bool water) {
  if (!water) return nullptr;
  for (int j = threadIdx.x; j < fastmask::kHistBins; j += blockDim.x) bins[j] = 0;
  __syncthreads();
  return bins;
}

__device__ void flush_bins(const unsigned int* bins, double* hist_row) {
  if (!bins) return;
  __syncthreads();
  for (int j = threadIdx.x; j < fastmask::kHistBins; j += blockDim.x)
    if (bins[j]) atomicAdd(hist_row + j, static_cast<double>(bins[j]));
}

template <typename G>
__global__ void pass1_blocks(const int64_t* ptrs, const int64_t* meta, const int32_t* block_tensor, double* partials,
                             double* hist, int64_t sums_width, const float* grad_scale, fastmask::KernelConfig c) {
  __shared__ double shared[kThreads];
  __shared__ unsigned int bin_counts[fastmask::kHistBins];
  const int64_t t = block_tensor[blockIdx.x];
  const int64_t* mrow = meta + t * kMetaCols;
  const int64_t n = mrow[kNumel];
  const int64_t first = (static_cast<int64_t>(blockIdx.x) - mrow[kBlockStart]) * kBlockElems;
  const G* g = reinterpret_cast<const G*>(ptrs[t * kPtrCols + kGrad]);
  const float* fisher = reinterpret_cast<const float*>(ptrs[t * kPtrCols + kFisher]);
  const float gs = grad_scale ? *grad_scale : 1.0f;
  unsigned int* bins = clear_bins(bin_counts, c.water_filling);
  double acc[4] = {0, 0, 0, 0};
  for (int j = 0; j < kVec; ++j) {
    const int64_t i = first + threadIdx.x * kVec + j;
    if (i < n) accumulate(g, fisher, i, gs, c, acc, bins);
  }
  flush_bins(bins, hist + t * sums_width);
  for (int k = 0; k < 4; ++k) {
    const double total = block_sum(acc[k], shared);
    if (threadIdx.x == 0) partials[static_cast<int64_t>(blockIdx.x) * 4 + k] = total;
  }
}

// One block per row (global unit index): the row's importance s_u (fp32) and its partials.
template <typename G>
__global__ void pass1_rows(const int64_t* ptrs, const int64_t* meta, const int32_t* row_tensor, double* partials,
                           float* row_importance, double* hist, int64_t sums_width, const float* grad_scale,
                           fastmask::KernelConfig c) {
  __shared__ double shared[kThreads];
  const int64_t t = row_tensor[blockIdx.x];
  const int64_t* mrow = meta + t * kMetaCols;
  const int64_t row_size = mrow[kRowSize];
  const int64_t r = static_cast<int64_t>(blockIdx.x) - mrow[kUnitOffset];
  const G* g = reinterpret_cast<const G*>(ptrs[t * kPtrCols + kGrad]);
  const float* fisher = reinterpret_cast<const float*>(ptrs[t * kPtrCols + kFisher]);
  const float gs = grad_scale ? *grad_scale : 1.0f;
  double acc[4] = {0, 0, 0, 0};
  for (int64_t k = threadIdx.x; k < row_size; k += blockDim.x)
    accumulate(g, fisher, r * row_size + k, gs, c, acc, nullptr);
  double sums[4];
  for (int k = 0; k < 4; ++k) sums[k] = block_sum(acc[k], shared);
  if (threadIdx.x == 0) {
    const float row_s = static_cast<float>(sums[0]);  // s_u is fp32; S sums the rounded s_u
    row_importance[blockIdx.x] = row_s;
    if (c.water_filling) atomicAdd(hist + t * sums_width + min(fastmask::importance_bin(row_s), kLastBin), 1.0);
    double* out = partials + static_cast<int64_t>(blockIdx.x) * 4;
    out[0] = row_s;
    out[1] = sums[1];
    out[2] = sums[2];
    out[3] = sums[3];
  }
}

// A tensor's partials summed in a fixed tree: [sum s, sum g, sum g^2, non-finite count].
__device__ void tensor_sums(const int64_t* mrow, const double* partials, double* shared, double sums[4]) {
  double acc[4] = {0, 0, 0, 0};
  for (int64_t k = threadIdx.x; k < mrow[kNumParts]; k += blockDim.x)
    for (int j = 0; j < 4; ++j) acc[j] += partials[(mrow[kPartStart] + k) * 4 + j];
  for (int j = 0; j < 4; ++j) sums[j] = block_sum(acc[j], shared);
}

// One block per tensor: the first 4 columns of its row of the sums [n_tensors, sums_width].
__global__ void sum_partials(const int64_t* meta, const double* partials, double* out, int64_t sums_width) {
  __shared__ double shared[kThreads];
  double sums[4];
  tensor_sums(meta + static_cast<int64_t>(blockIdx.x) * kMetaCols, partials, shared, sums);
  if (threadIdx.x == 0)
    for (int j = 0; j < 4; ++j) out[static_cast<int64_t>(blockIdx.x) * sums_width + j] = sums[j];
}

// One block per tensor: totals in a fixed order (or `pre_summed`, [n_tensors, sums_width]),
// ok, step, scalars, the water level (water-filling: from the histogram columns of
// `hist` [n_tensors, sums_width], into a.levels), row sampling, stats.
__global__ void reduce_tensors(const int64_t* ptrs, const int64_t* meta, const double* partials,
                               const double* pre_summed, const double* hist, LaunchArgs a,
                               const float* row_importance, float* unit_weight,
                               TensorScalars* scalars, double* tensor_stats, const float* found_inf,
                               const float* lr_ptr, const float* settings, fastmask::KernelConfig c) {
  __shared__ double shared[kThreads];
  __shared__ double level_row[fastmask::kPositiveBins];
  __shared__ TensorScalars sc_shared;
  const int64_t t = blockIdx.x;
  const int64_t sums_width = a.config.sums_width;
  const int64_t* mrow = meta + t * kMetaCols;
  double sums[4];
  if (pre_summed)
    for (int j = 0; j < 4; ++j) sums[j] = pre_summed[t * sums_width + j];
  else
    tensor_sums(mrow, partials, shared, sums);
  const int64_t n = mrow[kFullNumel], units = mrow[kUnits], full_units = mrow[kFullUnits];
  const bool inf_flag = found_inf && *found_inf != 0.0f;
  const float ratio = settings[kRatio];
  const bool dense_ratio = ratio >= 1.0f;  // a ratio of 1 (read here, on the device): the base optimizer
  if (threadIdx.x == 0) {
    float* step_ptr = reinterpret_cast<float*>(ptrs[t * kPtrCols + kStep]);
    const TensorScalars sc = fastmask::tensor_scalars(c, lr_ptr != nullptr, sums, *step_ptr, inf_flag, full_units, n,
                                                      static_cast<uint32_t>(mrow[kSlot2]), lr_ptr ? *lr_ptr : 0.0f);
    if (sc.ok) *step_ptr = sc.new_step;
    sc_shared = sc;
    scalars[t] = sc;
  }
  __syncthreads();
  const TensorScalars sc = sc_shared;
  double level_x = 0.0, level_p0 = 0.0;
  if (hist) {
    block_water_level(hist + t * sums_width, ratio, a, level_row, shared, &level_x, &level_p0);
    if (threadIdx.x == 0) {
      a.levels[2 * t] = level_x;
      a.levels[2 * t + 1] = level_p0;
    }
  }
  double pi_sum = 0, sel = 0;
  if (c.is_masked && c.row && !c.exact) {
    const float p0 = static_cast<float>(level_p0);
    for (int64_t r = threadIdx.x; r < units; r += blockDim.x) {
      const fastmask::UnitDraw d =
          fastmask::draw_unit(row_importance[mrow[kUnitOffset] + r], static_cast<uint64_t>(mrow[kFirstUnit] + r), sc,
                              level_x, p0, ratio, static_cast<float>(c.min_prob), c.poisson, c.rescale_id, c.key0(), c.key1(), dense_ratio);
      unit_weight[mrow[kUnitOffset] + r] = d.weight;
      pi_sum += d.pi;
      sel += d.chosen ? 1.0 : 0.0;
    }
  } else if (c.is_masked && c.exact) {
    for (int64_t r = threadIdx.x; r < units; r += blockDim.x) sel += unit_weight[mrow[kUnitOffset] + r] != 0.0f;
    pi_sum = sel;
  }
  pi_sum = block_sum(pi_sum, shared);
  sel = block_sum(sel, shared);
  if (threadIdx.x == 0) {
    double* out = tensor_stats + t * 4;
    const bool dense = !c.is_masked;
    out[0] = sc.ok ? (dense ? static_cast<double>(units) : pi_sum) : 0.0;
    out[1] = sc.ok ? (dense ? static_cast<double>(units) : sel) : 0.0;
    out[2] = sc.ok ? static_cast<double>(units) : 0.0;
    out[3] = (sums[3] != 0.0 && !inf_flag) ? 1.0 : 0.0;
  }
}

template <typename P, typename G>
__global__ void pass2(const int64_t* ptrs, const int64_t* meta, const int32_t* block_tensor,
                      const TensorScalars* scalars, const double* levels, const float* unit_weight,
                      double* block_stats, const float* grad_scale, const float* settings, fastmask::KernelConfig c) {
  __shared__ double shared[kThreads];
  const int64_t t = block_tensor[blockIdx.x];
  const int64_t* mrow = meta + t * kMetaCols;
  const TensorScalars sc = scalars[t];
  const int64_t n = mrow[kNumel];
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) - mrow[kBlockStart]) * kBlockElems + threadIdx.x * kVec;
  const int64_t first = mrow[kFirstElement];  // RNG index = first + local index
  const int64_t* prow = ptrs + t * kPtrCols;
  P* p = reinterpret_cast<P*>(prow[kParam]);
  const G* g = reinterpret_cast<const G*>(prow[kGrad]);
  float* m = reinterpret_cast<float*>(prow[kExpAvg]);
  float* v = reinterpret_cast<float*>(prow[kExpAvgSq]);
  float* buf = reinterpret_cast<float*>(prow[kMomentum]);
  float* fisher = reinterpret_cast<float*>(prow[kFisher]);
  const float gs = grad_scale ? *grad_scale : 1.0f;
  const float ratio = settings[kRatio], grad_coefficient = settings[kGradCoefficient];
  const float update_coefficient = settings[kUpdateCoefficient];
  const bool dense_ratio = ratio >= 1.0f;  // a ratio of 1 (read here, on the device): the base optimizer
  const double level_x = levels ? levels[2 * t] : 0.0;
  const float p0 = levels ? static_cast<float>(levels[2 * t + 1]) : 0.0f;
  double pi_sum = 0, sel_sum = 0;
  if (sc.ok && i0 < n) {
    const bool sample_here = c.is_masked && !c.row && !c.exact;
    // one Philox call serves the thread's 4 elements when they start at a multiple of 4 of
    // the full tensor (always, unless a shard starts elsewhere: then one call per element)
    const bool aligned = (first & 3) == 0;
    uint32_t words[4] = {0, 0, 0, 0};
    if (sample_here && aligned)
      fastmask::philox_call(static_cast<uint64_t>(first + i0) >> 2, sc.step_word, sc.mask_hi, c.key0(), c.key1(), words);
    // With a unit table (rows, exact) and "freeze", the thread's units are known before any
    // element is read: one with no selected element reads and writes nothing but its Fisher EMA.
    const bool from_table = c.is_masked && (c.row || c.exact);
    float table_w[kVec] = {1.0f, 1.0f, 1.0f, 1.0f};
    bool any_selected = true;
    if (from_table) {
      any_selected = false;
      for (int j = 0; j < kVec && i0 + j < n; ++j) {
        table_w[j] = unit_weight[mrow[kUnitOffset] + (i0 + j) / mrow[kRowSize]];
        any_selected = any_selected || table_w[j] != 0.0f;
      }
    }
    const bool skip_frozen = from_table && c.freeze;  // unselected elements: no p, m, v, buffer traffic
    // 16-byte loads and stores of the fp32 arrays when all four elements are in bounds and aligned
    const bool vec = i0 + kVec <= n && (!m || reinterpret_cast<uintptr_t>(m + i0) % 16 == 0) &&
                     (any_selected || !skip_frozen);
    float mv[kVec], vv[kVec];
    if (vec && m) {
      *reinterpret_cast<float4*>(mv) = *reinterpret_cast<const float4*>(m + i0);
      *reinterpret_cast<float4*>(vv) = *reinterpret_cast<const float4*>(v + i0);
    }
    for (int j = 0; j < kVec; ++j) {
      const int64_t i = i0 + j;
      if (i >= n) break;
      if (skip_frozen && table_w[j] == 0.0f) {
        if (c.ema) {
          const float x = to_float(g[i]) / gs;  // the sign does not reach x * x
          fisher[i] = fastmask::importance_ema(fisher[i], x, c.fisher_beta32(), c.one_minus_fisher_beta32());
        }
        continue;
      }
      const float x = (to_float(g[i]) / gs) * (c.maximize ? -1.0f : 1.0f);
      float gm = x * grad_coefficient;  // x * 1 is x exactly
      if (c.ge_noise)
        gm = gm + fastmask::normal_at(static_cast<uint64_t>(first + i), sc.step_word, sc.noise_hi, c.key0(), c.key1()) * sc.std;
      const float f_new = c.ema ? fastmask::importance_ema(fisher[i], x, c.fisher_beta32(), c.one_minus_fisher_beta32()) : 0.0f;
      bool selected = true;
      if (sample_here) {
        const float s = c.ema ? f_new : x * x;
        const float pi =
            dense_ratio ? 1.0f
                        : fastmask::inclusion_prob(s, level_x, p0, sc.degenerate, ratio, static_cast<float>(c.min_prob), c.poisson);
        const float u = aligned ? fastmask::uniform_from_word(words[j])
                                : fastmask::uniform_at(static_cast<uint64_t>(first + i), sc.step_word, sc.mask_hi,
                                                       c.key0(), c.key1());
        selected = u < pi;
        if (c.rescale_id != fastmask::kNoRescale && !dense_ratio)
          gm = gm * fastmask::rescale_weight(c.rescale_id, pi, s, sc.total, sc.degenerate, sc.inv_n);
        gm = selected ? gm : 0.0f;
        pi_sum += pi;
        sel_sum += selected ? 1.0 : 0.0;
      } else if (c.is_masked) {
        const float w = table_w[j];
        selected = w != 0.0f;
        if (c.rescale_id != fastmask::kNoRescale) gm = gm * w;
        gm = selected ? gm : 0.0f;
      }
      const float p_old = to_float(p[i]);
      float m_i = m ? (vec ? mv[j] : m[i]) : 0.0f, v_i = v ? (vec ? vv[j] : v[i]) : 0.0f;
      float b_i = buf ? buf[i] : 0.0f;
      const float m_old = m_i, v_old = v_i;
      float p_new = fastmask::base_update(sc.update, p_old, gm, m_i, v_i, b_i);
      if (c.modulate_update && update_coefficient != 1.0f) p_new = fastmask::modulated(p_old, p_new, update_coefficient);
      const bool update = !c.is_masked || !c.freeze || selected;
      if (update) p[i] = from_float<P>(p_new);
      if (m) {
        mv[j] = update ? m_i : m_old;
        vv[j] = update ? v_i : v_old;
        if (!vec) {
          m[i] = mv[j];
          v[i] = vv[j];
        }
      }
      if (buf && update) buf[i] = b_i;
      if (c.ema) fisher[i] = f_new;
    }
    if (vec && m) {
      *reinterpret_cast<float4*>(m + i0) = *reinterpret_cast<const float4*>(mv);
      *reinterpret_cast<float4*>(v + i0) = *reinterpret_cast<const float4*>(vv);
    }
  }
  pi_sum = block_sum(pi_sum, shared);
  sel_sum = block_sum(sel_sum, shared);
  if (threadIdx.x == 0) {
    block_stats[static_cast<int64_t>(blockIdx.x) * 2] = pi_sum;
    block_stats[static_cast<int64_t>(blockIdx.x) * 2 + 1] = sel_sum;
  }
}

// The kernels of a batch's (param, grad) dtype pair.
struct Kernels {
  decltype(&pass1_rows<float>) pass1_rows;
  decltype(&pass1_blocks<float>) pass1_blocks;
  decltype(&pass2<float, float>) pass2;
};

template <typename P, typename G>
constexpr Kernels kernels_of() {
  return {&pass1_rows<G>, &pass1_blocks<G>, &pass2<P, G>};
}

// The pairs that training produces (fastmask.backends.native converts other grads to fp32); a
// Kernels of null pointers for any other pair.
Kernels kernels_for(int param_dtype, int grad_dtype) {
  if (param_dtype == kF32 && grad_dtype == kF32) return kernels_of<float, float>();
  if (param_dtype == kBF16 && grad_dtype == kBF16) return kernels_of<__nv_bfloat16, __nv_bfloat16>();
  if (param_dtype == kF16 && grad_dtype == kF16) return kernels_of<__half, __half>();
  if (param_dtype == kBF16 && grad_dtype == kF32) return kernels_of<__nv_bfloat16, float>();
  if (param_dtype == kF16 && grad_dtype == kF32) return kernels_of<__half, float>();
  return {};
}

}  // namespace

cudaError_t masked_step(const LaunchArgs& a, Phase phase, double* sums, cudaStream_t stream) {
  const Kernels k = kernels_for(a.param_dtype, a.grad_dtype);
  if (!k.pass2) return cudaErrorInvalidValue;
  const fastmask::KernelConfig& c = a.config;
  // pass 1 adds its histograms to the sums' columns after the first 4; the reduce reads them
  double* hist = c.water_filling ? sums : nullptr;
  if (phase != Phase::kFinish) {
    const auto pass1_rows = k.pass1_rows;
    const auto pass1_blocks = k.pass1_blocks;
    if (c.row && a.n_units)
      pass1_rows<<<a.n_units, kThreads, 0, stream>>>(a.ptrs, a.meta, a.row_tensor, a.partials, a.row_importance,
                                                     hist ? hist + 4 : nullptr, c.sums_width, a.grad_scale, c);
    else if (!c.row && a.n_blocks)
      pass1_blocks<<<a.n_blocks, kThreads, 0, stream>>>(a.ptrs, a.meta, a.block_tensor, a.partials,
                                                         hist ? hist + 4 : nullptr, c.sums_width, a.grad_scale, c);
  }
  if (phase == Phase::kSums) {
    sum_partials<<<a.n_tensors, kThreads, 0, stream>>>(a.meta, a.partials, sums, c.sums_width);
    return cudaGetLastError();
  }
  // the finish reads the all-reduced sums whole; the whole step sums pass 1's partials itself
  const double* pre_summed = phase == Phase::kFinish ? sums : nullptr;
  reduce_tensors<<<a.n_tensors, kThreads, 0, stream>>>(a.ptrs, a.meta, a.partials, pre_summed, hist, a,
                                                       a.row_importance, a.unit_weight, a.scalars, a.tensor_stats,
                                                       a.found_inf, a.lr, a.settings, c);
  const auto pass2 = k.pass2;
  if (a.n_blocks)
    pass2<<<a.n_blocks, kThreads, 0, stream>>>(a.ptrs, a.meta, a.block_tensor, a.scalars, a.levels, a.unit_weight,
                                               a.block_stats, a.grad_scale, a.settings, c);
  return cudaGetLastError();
}

}  // namespace fastmask_cuda
