// The "cpp" backend: the fused masked step on CPU tensors, parallel over fixed chunks (split
// between threads by their elements: ops.h), and the module's bindings (the water levels:
// water_level.cpp; the ops on units: units.cpp; the vectorised Philox: philox_simd.h).
//
// Pass 1 (reads g, and F for "ema") writes fp64 partials per chunk; a per-tensor reduce
// sums them in chunk order (so results do not depend on the thread count), advances
// `step`, computes the scalars and samples rows; pass 2 is one read-modify-write per
// element with the mask in registers. Bit-identical to fastmask.reference in fp32.
// Shards of larger tensors (FSDP2): masked_step_sums runs pass 1 alone, the caller
// all-reduces its sums, and masked_step finishes from them; N, the GE element count and
// the RNG indices are the full tensor's.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../fastmask_math.h"
#include "../kernel_config.h"
#include "half_convert.h"
#include "ops.h"
#include "philox_simd.h"

namespace fastmask_cpu {

namespace {

using fastmask::UpdateScalars;

using Config = fastmask::KernelConfig;

struct Item {
  int64_t tensor, begin, end;  // elements [begin, end), or rows in row mode (pass 1)
};

struct Partial {
  double s = 0, g = 0, g2 = 0, bad = 0;
};

using fastmask::TensorScalars;

constexpr int kBins = fastmask::kHistBins;
static_assert(kBins - 1 == 2047, "chunk_partial clamps bins to 2047");
static_assert(kChunk <= (1 << 16), "bins and counts of one chunk fit in 16 and 32 bits");

// x += v on a double shared between threads (a compare-and-swap loop): the histogram's counts
// are integers, exact in a double, so the result does not depend on the order of the adds.
inline void atomic_add(double* x, double v) {
  uint64_t old_bits = __atomic_load_n(reinterpret_cast<uint64_t*>(x), __ATOMIC_RELAXED);
  for (;;) {
    double old_value;
    std::memcpy(&old_value, &old_bits, sizeof old_value);
    const double new_value = old_value + v;
    uint64_t new_bits;
    std::memcpy(&new_bits, &new_value, sizeof new_bits);
    if (__atomic_compare_exchange_n(reinterpret_cast<uint64_t*>(x), &old_bits, new_bits, true, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED))
      return;
  }
}

// A thread's importance-bin counts for the tensor whose chunks it is counting (pass 1, water-filling):
// its chunks add into them, and they go into the tensor's histogram (its kBins columns of the sums)
// when the thread moves on to another tensor or ends: an atomic add per occupied bin once per
// thread, where one per chunk took a tenth of pass 1 (one thread, AVX2). Two interleaved tables,
// so that equal neighbouring bins do not wait on each other's increment; on the stack (a
// thread_local table cost a __tls_get_addr call per increment: GCC recomputes its address inside
// the loop), zeroed only over the bins counted since the last flush.
struct BinCounts {
  uint32_t counts[2][kBins];
  uint32_t lo = kBins, hi = 0;  // the bins zeroed since the last flush: [lo, hi], none if lo > hi
  int64_t counted = 0;          // elements counted since the last flush (the counts are 32-bit)
  double* hist = nullptr;       // the histogram they go into
  bool sole = false;            // no other thread adds to `hist`

  // Counts into `tensor_hist` from now on (`tensor_sole`: no other thread adds to it), after the
  // counts so far have gone into theirs.
  void start(double* tensor_hist, bool tensor_sole) {
    if (tensor_hist != hist) flush();
    hist = tensor_hist;
    sole = tensor_sole;
  }

  // Makes [first, last] counted bins (zeroing those that are not yet) for `n` more elements.
  void cover(uint32_t first, uint32_t last, int64_t n) {
    if (counted + n > int64_t{UINT32_MAX}) flush();
    counted += n;
    if (lo > hi) {
      zero(first, last);
    } else {
      if (first < lo) zero(first, lo - 1);
      if (last > hi) zero(hi + 1, last);
    }
    lo = std::min(lo, first);
    hi = std::max(hi, last);
  }

  // Counts one element (a row) of bin `bin`.
  void add(uint32_t bin) {
    cover(bin, bin, 1);
    ++counts[0][bin];
  }

  void flush() {
    for (uint32_t b = lo; b <= hi; ++b) {
      const uint32_t c = counts[0][b] + counts[1][b];
      if (c && sole)
        hist[b] += static_cast<double>(c);
      else if (c)
        atomic_add(hist + b, static_cast<double>(c));
    }
    lo = kBins;
    hi = 0;
    counted = 0;
  }

 private:
  void zero(uint32_t first, uint32_t last) {
    for (int t = 0; t < 2; ++t) std::fill(counts[t] + first, counts[t] + last + 1, 0u);
  }
};

// Pass 1 of one chunk [begin, end) of a tensor's elements (at most kChunk), x = g * inv_scale
// (an exact reciprocal: see scaled_grads): fp64 sums in kLanes fixed lanes (lane = offset mod
// kLanes), so the loop vectorises while the result depends only on the chunk, not on the thread
// count; the non-finite count in int32 lanes. Whole rounds of lanes (a fixed trip count)
// vectorise: 0.37 -> 0.26 ns per element for the sums; 16 lanes rather than 8, since each lane's
// fp64 add chain waits on its previous add: 0.76 -> 0.60 ns with the bins and their count (a
// standalone copy of the loops, one core, AVX2).
// bf16 / fp16 grads are widened kWidenBlock at a time (a multiple of kLanes: the lanes stay put).
// SUM_S, SUM_G: sum s, and g and g^2 (else left 0): the count of non-finite x is always taken.
// BINS (water-filling): also each element's importance bin (fastmask::importance_bin, NaN bits
// clamped to the last bin), counted into `bin_counts` (the calling thread's, started on the tensor).
template <typename G, bool BINS, bool SUM_S, bool SUM_G>
Partial chunk_partial(const G* __restrict g, const float* __restrict fisher, int64_t begin, int64_t end,
                      float inv_scale, float fisher_beta, float one_minus_fisher_beta, BinCounts* bin_counts) {
  constexpr int kLanes = 16;
  double s_acc[kLanes] = {}, g_acc[kLanes] = {}, g2_acc[kLanes] = {};
  int32_t bad_acc[kLanes] = {};
  uint16_t bins[BINS ? kChunk : 1];
  const int64_t n = end - begin;
  static_assert(kWidenBlock % kLanes == 0, "a widened block starts at lane 0");
  const int64_t sub_block = std::is_same_v<G, float> ? n : kWidenBlock;  // fp32: the chunk in place
  WidenBuffer<G> g_wide;
  const float* gx = nullptr;  // the sub-block's grads as fp32
  int64_t first = 0;          // the sub-block's offset in the chunk
  auto accumulate = [&](int64_t o, int l) {
    const int64_t i = begin + first + o + l;
    const float x = gx[o + l] * inv_scale;
    if (SUM_S || BINS) {
      const float s = fisher ? fastmask::importance_ema(fisher[i], x, fisher_beta, one_minus_fisher_beta) : x * x;
      if (BINS) bins[first + o + l] = static_cast<uint16_t>(std::min<uint32_t>(fastmask::importance_bin(s), 2047u));
      if (SUM_S) s_acc[l] += s;
    }
    if (SUM_G) {
      g_acc[l] += x;
      g2_acc[l] += static_cast<double>(x) * x;
    }
    bad_acc[l] += fastmask::is_nonfinite(x);
  };
  for (; first < n; first += sub_block) {
    const int64_t count = std::min(sub_block, n - first);
    gx = as_float(g + begin + first, g_wide, count);
    int64_t o = 0;
    for (; o + kLanes <= count; o += kLanes)  // whole rounds of lanes: a fixed trip count vectorises
      for (int l = 0; l < kLanes; ++l) accumulate(o, l);
    for (int l = 0; o + l < count; ++l) accumulate(o, l);
  }
  Partial out;
  for (int l = 0; l < kLanes; ++l) {
    out.s += s_acc[l];
    out.g += g_acc[l];
    out.g2 += g2_acc[l];
    out.bad += bad_acc[l];
  }
  if (!BINS || n == 0) return out;
  uint16_t lo = kBins - 1, hi = 0;
  for (int64_t i = 0; i < n; ++i) {  // a vectorised min / max
    lo = std::min(lo, bins[i]);
    hi = std::max(hi, bins[i]);
  }
  bin_counts->cover(lo, hi, n);
  uint32_t(&counts)[2][kBins] = bin_counts->counts;
  int64_t i = 0;
  for (; i + 1 < n; i += 2) {
    ++counts[0][bins[i]];
    ++counts[1][bins[i + 1]];
  }
  if (i < n) ++counts[0][bins[i]];
  return out;
}

template <typename G>
using ChunkPartial = Partial (*)(const G*, const float*, int64_t, int64_t, float, float, float, BinCounts*);

// The chunk_partial that sums what is asked for (a template each: the loop keeps no test).
template <typename G>
ChunkPartial<G> chunk_partial_for(bool bins, bool sum_s, bool sum_g) {
  if (bins) return sum_g ? &chunk_partial<G, true, true, true> : &chunk_partial<G, true, true, false>;
  if (sum_g) return sum_s ? &chunk_partial<G, false, true, true> : &chunk_partial<G, false, false, true>;
  return sum_s ? &chunk_partial<G, false, true, false> : &chunk_partial<G, false, false, false>;
}

enum Mode : int { kDense = 0, kSample = 1, kTable = 2 };

// Elements per pass-2 block: its uniforms (kBlock at a time), noise and stats sums are filled per
// block, and the element loop's constants are set up once per block.
constexpr int64_t kPass2Block = 4 * kBlock;
constexpr int kSgd = fastmask::kUpdateSgd, kSgdMomentum = fastmask::kUpdateSgdMomentum, kAdam = fastmask::kUpdateAdam;

template <typename P, typename G>
struct Pass2Tensor {
  P* p;
  const G* g;
  float *m, *v, *buf, *fisher;
  const float* table;  // per-unit weights (row / exact modes), 0 = not selected
  const double* level;  // the tensor's water level (x, p0), or null (no water-filling)
  int64_t row_size;
  int64_t first_element;  // the RNG index of the tensor's first local element
};

// One tensor's scalars as pass 2's element loop reads them: the loop-invariant flags as floats,
// each tested by one comparison in a select (GCC vectorises that, but not a select on a scalar
// bool, which is what a combination of invariant conditions, e.g. a && b, gets hoisted into).
struct ElementScalars {
  float unscale;  // sign / grad_scale (an exact reciprocal)
  float coefficient, ge, update_coefficient, modulate_update, freeze;
  float const_pi, degenerate, ratio, min_prob, p0, total, inv_n, fisher_beta, one_minus_fisher_beta;
  double level_x;  // the water level (fastmask::inclusion_prob)
  UpdateScalars update;
};

// update ? x : old in bit operations. Written as a select, GCC's phiopt turns the store of the
// kept value into a masked store (vmaskmovps) and the loads feeding x into masked loads:
// microcoded and slow on AMD's Zen cores; a blend and a plain store cost the same everywhere.
inline float new_or_kept(bool update, float x, float old) {
  const uint32_t take_new = 0u - static_cast<uint32_t>(update);
  return fastmask::bits_float((fastmask::float_bits(x) & take_new) | (fastmask::float_bits(old) & ~take_new));
}

// 1 / x is exact and finite (x is a power of two: 1 without AMP, GradScaler's scales), so
// g * (1 / x) is g / x, both rounded once from the same real number.
inline bool exact_reciprocal(float x) {
  int exponent;
  return std::isfinite(x) && x != 0.0f && std::fabs(std::frexp(x, &exponent)) == 0.5f && std::isfinite(1.0f / x);
}

// Pass 2 over elements [begin, end) of one tensor (skipped entirely when the tensor is not ok:
// its step changes nothing), specialised on the base optimizer, the masking mode and the EMA:
// per block of at most kPass2Block elements (of one row for MODE kTable) its uniforms (kSample)
// and OGM-GE noise, then one read-modify-write per element: importance, selection (uniforms,
// kSample; the row's unit weight, kTable), rescale and fastmask::base_update<KIND> (inlined; the
// CUDA kernel calls the same function; the bit-exact backend tests hold both to the reference).
// x / 1, x * 1 and an unselected select are exact, so terms that a configuration does not use
// cost no accuracy.
// PLAIN (kSample only; see plain_sampling): the selects of the terms that AMSS+'s usual
// configurations leave off are compiled out (each select is a blend: 0.96 -> 0.82 ms, one AVX2
// thread, one 2^18-element tensor).
template <typename P, typename G, int KIND, int MODE, int RESCALE, bool EMA, bool PLAIN>
void pass2_range(const Pass2Tensor<P, G>& pt, const TensorScalars& sc, const Config& cfg, float inv_scale,
                 int64_t begin, int64_t end, double& pi_sum, double& sel_sum) {
  if (!sc.ok) return;
  const double* level = pt.level;
  const uint32_t k0 = cfg.key0(), k1 = cfg.key1();
  auto flag = [](bool b) { return b ? 1.0f : 0.0f; };
  const float sign = cfg.maximize ? -1.0f : 1.0f;
  const ElementScalars c{sign * inv_scale, static_cast<float>(cfg.grad_coefficient), flag(cfg.ge_noise),
                         static_cast<float>(cfg.update_coefficient), flag(cfg.modulate_update), flag(cfg.freeze),
                         flag(!cfg.poisson || sc.degenerate), flag(sc.degenerate),
                         static_cast<float>(cfg.ratio), static_cast<float>(cfg.min_prob),
                         level ? static_cast<float>(level[1]) : 0.0f, sc.total, sc.inv_n, cfg.fisher_beta32(),
                         cfg.one_minus_fisher_beta32(), level ? level[0] : 0.0, sc.update};
  alignas(64) float uniforms[kPass2Block] = {};
  alignas(64) float noise[kPass2Block] = {};
  static_assert(kPass2Block <= kWidenBlock, "a block's bf16 / fp16 params and grads fit the fp32 buffers");
  alignas(64) WidenBuffer<P> p_wide;
  alignas(64) WidenBuffer<G> g_wide;
  for (int64_t b = begin, e; b < end; b = e) {
    e = std::min<int64_t>(end, b + kPass2Block);
    float unit_weight = 0.0f;
    if (MODE == kTable) {  // one unit weight per row segment: the element loop keeps it invariant
      const int64_t row = b / pt.row_size, row_end = std::min(end, (row + 1) * pt.row_size);
      e = std::min(e, row_end);
      unit_weight = pt.table[row];
      if (cfg.freeze && unit_weight == 0.0f) {
        // a frozen row keeps param and moments: it is not even read (only an EMA F moves), so a
        // step moves about ratio x the bytes of a dense one
        e = row_end;
        for (int64_t s = b; EMA && s < e; s += kWidenBlock) {
          const int64_t count = std::min(kWidenBlock, e - s);
          const float* gx = as_float(pt.g + s, g_wide, count);
          float* fisher = pt.fisher + s;
#pragma omp simd
          for (int64_t i = 0; i < count; ++i)
            fisher[i] = fastmask::importance_ema(fisher[i], gx[i] * inv_scale, c.fisher_beta, c.one_minus_fisher_beta);
        }
        continue;
      }
    }
    if (MODE == kSample)
      for (int64_t u = 0; u < e - b; u += kBlock)
        uniform_block(static_cast<uint64_t>(pt.first_element + b + u), sc.step_word, sc.mask_hi, k0, k1,
                      uniforms + u);
    if (cfg.ge_noise)  // OGM-GE noise std * z
      for (int64_t i = b; i < e; ++i)
        noise[i - b] = fastmask::normal_at(static_cast<uint64_t>(pt.first_element + i), sc.step_word, sc.noise_hi, k0,
                                           k1) * sc.std;
    // the block's arrays from its first element (bf16 / fp16 params and grads widened into the
    // fp32 buffers, the params rounded back after the loop); fp32 sums within the block (at most
    // kPass2Block terms), added to the fp64 totals once: fp64 lanes in the element loop cost
    // ~0.2 ns per element (measured); only stats read them
    float* __restrict p = as_float(pt.p + b, p_wide, e - b);
    const float* __restrict g = as_float(pt.g + b, g_wide, e - b);
    float* __restrict m = pt.m ? pt.m + b : nullptr;
    float* __restrict v = pt.v ? pt.v + b : nullptr;
    float* __restrict buf = pt.buf ? pt.buf + b : nullptr;
    float* __restrict fisher = pt.fisher ? pt.fisher + b : nullptr;
    float block_pi = 0, block_sel = 0;
    // omp simd: vectorise despite the selects; only the stats counters are reassociated
#pragma omp simd reduction(+ : block_pi, block_sel)
    for (int64_t l = 0; l < e - b; ++l) {
      // (g / grad_scale) * sign, in one multiply: both are g * sign / grad_scale rounded once
      const float x = g[l] * c.unscale;
      float gm = x * c.coefficient;
      if (!PLAIN) gm = c.ge != 0.0f ? gm + noise[l] : gm;
      const float f_old = EMA ? fisher[l] : 0.0f;
      const float f_new = EMA ? fastmask::importance_ema(f_old, x, c.fisher_beta, c.one_minus_fisher_beta) : 0.0f;
      bool selected = true;
      if (MODE == kSample) {
        const float s = EMA ? f_new : x * x;
        const float level_pi = fastmask::inclusion_prob(s, c.level_x, c.p0, false, 0.0f, c.min_prob, true);
        const float pi = !PLAIN && c.const_pi != 0.0f ? c.ratio : level_pi;
        selected = uniforms[l] < pi;
        if (RESCALE == fastmask::kHT) gm = gm * (1.0f / pi);
        if (RESCALE == fastmask::kLegacy)
          gm = gm * (1.0f / ((!PLAIN && c.degenerate != 0.0f ? c.inv_n : s / c.total) + c.inv_n));
        if (!PLAIN) gm = selected ? gm : 0.0f;  // (frozen when PLAIN: an unselected gm is never kept)
        block_pi += pi;
        block_sel += selected ? 1.0f : 0.0f;
      } else if (MODE == kTable) {
        // frozen rows were skipped above: every element here updates
        if (RESCALE != fastmask::kNoRescale) gm = gm * unit_weight;
        gm = unit_weight != 0.0f ? gm : 0.0f;
      }
      // (a select on a loop-invariant bool, as a frozen table row would give, is not vectorised)
      const bool update = MODE == kSample && (PLAIN || c.freeze != 0.0f) ? selected : true;
      const float p_old = p[l];
      const float m_old = KIND == kAdam ? m[l] : 0.0f, v_old = KIND == kAdam ? v[l] : 0.0f;
      const float b_old = KIND == kSgdMomentum ? buf[l] : 0.0f;
      float m_new = m_old, v_new = v_old, b_new = b_old;
      float p_new = fastmask::base_update<KIND, !PLAIN>(c.update, p_old, gm, m_new, v_new, b_new);
      if (KIND == kAdam) {
        m[l] = new_or_kept(update, m_new, m_old);
        v[l] = new_or_kept(update, v_new, v_old);
      }
      if (KIND == kSgdMomentum) buf[l] = new_or_kept(update, b_new, b_old);
      if (!PLAIN)
        p_new = c.modulate_update != 0.0f ? fastmask::modulated(p_old, p_new, c.update_coefficient) : p_new;
      p[l] = new_or_kept(update, p_new, p_old);
      if (EMA) fisher[l] = f_new;
    }
    store_from_float(p, pt.p + b, e - b);
    pi_sum += block_pi;
    sel_sum += block_sel;
  }
}

// Whether a sampled tensor's loop can be pass2_range's PLAIN one: no OGM terms (GE noise, update
// modulation), probabilities from the water level (poisson, the tensor not degenerate), masked
// elements frozen, and no L2 term in the base update.
bool plain_sampling(const Config& c, const TensorScalars& sc) {
  const fastmask::UpdateScalars& k = sc.update;
  const bool l2 = k.kind == kAdam ? k.adam_l2 != 0.0f : k.weight_decay != 0.0f;
  return !c.ge_noise && !c.modulate_update && c.poisson && !sc.degenerate && c.freeze && !l2;
}

// The compiled element loops, one pass2_range per (base kind, mask mode, rescale, EMA, plain), in a
// table indexed by those five: a work item looks its loop up once. A table row needs no rescale
// variants beyond none and a weight (kHT reads the row's weight, whatever the rule), a dense
// range none; only sampling has a plain loop.
template <typename P, typename G>
using Pass2Loop = void (*)(const Pass2Tensor<P, G>&, const TensorScalars&, const Config&, float, int64_t,
                           int64_t, double&, double&);

constexpr int compiled_rescale(int mode, int rescale) {
  if (mode == kDense) return fastmask::kNoRescale;
  return mode == kTable && rescale != fastmask::kNoRescale ? fastmask::kHT : rescale;
}

template <typename P, typename G, size_t... I>
constexpr std::array<Pass2Loop<P, G>, sizeof...(I)> pass2_loops(std::index_sequence<I...>) {
  // entry (((kind * 3 + mode) * 3 + rescale) * 2 + ema) * 2 + plain
  return {&pass2_range<P, G, static_cast<int>(I / 36), static_cast<int>(I / 12 % 3),
                       compiled_rescale(static_cast<int>(I / 12 % 3), static_cast<int>(I / 4 % 3)), I / 2 % 2 == 1,
                       I % 2 == 1 && I / 12 % 3 == kSample>...};
}

static_assert(kSgd == 0 && kSgdMomentum == 1 && kAdam == 2 && kDense == 0 && kSample == 1 && kTable == 2 &&
                  fastmask::kNoRescale == 0 && fastmask::kHT == 1 && fastmask::kLegacy == 2,
              "pass2_loop indexes its table by these values");

template <typename P, typename G>
Pass2Loop<P, G> pass2_loop(int kind, int mode, int rescale, bool ema, bool plain) {
  static constexpr auto loops = pass2_loops<P, G>(std::make_index_sequence<3 * 3 * 3 * 2 * 2>{});
  return loops[(((kind * 3 + mode) * 3 + rescale) * 2 + (ema ? 1 : 0)) * 2 + (plain ? 1 : 0)];
}

// The work items of one batch: per tensor its elements, units, row size and first unit in the
// batch's unit table; pass-1 items (whole rows, or elements) and pass-2 items (elements).
struct Layout {
  int64_t n_tensors = 0, n_units = 0;
  std::vector<int64_t> numel, units, row_size, unit_offset, first_item1;
  // Row units of one element (1-D tensors) are element units under another name: they take
  // the element path (sampled in pass 2, vectorised), not the per-row table.
  std::vector<char> by_rows;
  std::vector<Item> items1, items2;
  std::vector<int64_t> starts1, starts2;  // the items' elements as the parallel loops weigh them (ops.h)
};

Layout layout_of(const std::vector<at::Tensor>& params, const Config& c) {
  Layout L;
  const int64_t n_tensors = L.n_tensors = static_cast<int64_t>(params.size());
  L.numel.resize(n_tensors);
  L.units.resize(n_tensors);
  L.row_size.resize(n_tensors);
  L.unit_offset.resize(n_tensors);
  L.by_rows.resize(n_tensors);
  L.first_item1.resize(n_tensors + 1);
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t numel = L.numel[t] = params[t].numel();
    const int64_t units = L.units[t] = c.row ? (params[t].dim() ? params[t].size(0) : 1) : numel;
    const int64_t row_size = L.row_size[t] = units ? numel / units : 1;
    L.by_rows[t] = c.row && row_size != 1;
    L.unit_offset[t] = L.n_units;
    if (c.row) L.n_units += units;
    L.first_item1[t] = static_cast<int64_t>(L.items1.size());
    // pass-1 work items of about kChunk elements: whole rows, or elements
    const int64_t n1 = L.by_rows[t] ? units : numel;
    const int64_t per_item = L.by_rows[t] ? std::max<int64_t>(1, kChunk / std::max<int64_t>(row_size, 1)) : kChunk;
    for (int64_t b = 0; b < n1; b += per_item) L.items1.push_back({t, b, std::min(n1, b + per_item)});
    // pass-2 items: as few as chunks of kChunk, of one size (whole blocks of uniforms): a tensor of
    // 3 chunks and a bit splits between two threads as 2 : 2 items, not 2 : 1 and a bit
    const int64_t n2 = std::max<int64_t>(1, (numel + kChunk - 1) / kChunk);
    const int64_t per_item2 = ((numel + n2 - 1) / n2 + kBlock - 1) / kBlock * kBlock;
    for (int64_t b = 0; b < numel; b += per_item2) L.items2.push_back({t, b, std::min(numel, b + per_item2)});
  }
  L.first_item1[n_tensors] = static_cast<int64_t>(L.items1.size());
  L.starts1.assign(1, 0);  // a pass-1 item of whole rows holds rows x row_size elements
  for (const Item& it : L.items1)
    L.starts1.push_back(L.starts1.back() + (it.end - it.begin) * (L.by_rows[it.tensor] ? L.row_size[it.tensor] : 1));
  L.starts2.assign(1, 0);
  for (const Item& it : L.items2) L.starts2.push_back(L.starts2.back() + (it.end - it.begin));
  return L;
}

// Pass 1: the per-tensor sums [T, 4] float64 (sum of s_u, sum g, sum g^2, non-finite count),
// from fp64 partials per chunk summed in chunk order (so they do not depend on the thread
// count), followed for water-filling (masked, poisson) by the histogram of the units'
// importance (kBins exact counts; [T, 4 + kBins]), and in row mode each row's importance s_u
// (fp32, [n_units]). `handed_out`: the caller reads the result (the op's); else only this
// extension's finish does, which reads sum s only when it samples (masked) and sum g, g^2 only
// for GE's std: the columns it does not read are left 0, and a dense step's pass 1 is its
// non-finite count alone. Rows of one element take the element path and have no entry of their
// own: handed out, theirs are set to 0, else they stay unwritten (a 1-D tensor's rows are as many
// as its elements: writing them would cost a pass).
template <typename G>
std::tuple<at::Tensor, at::Tensor> pass1(const Layout& L, const std::vector<at::Tensor>& grads,
                                         const std::vector<at::Tensor>& fishers, const Config& c, float inv_scale,
                                         bool handed_out) {
  const float fb = c.fisher_beta32(), omfb = c.one_minus_fisher_beta32();
  std::vector<Partial> partials(L.items1.size());
  const bool hist = c.water_filling;
  const int64_t width = c.sums_width;
  at::Tensor sums = at::zeros({L.n_tensors, width}, at::TensorOptions().dtype(at::kDouble));
  double* out = sums.data_ptr<double>();
  at::Tensor unit_importance = at::empty({L.n_units}, at::TensorOptions().dtype(at::kFloat));
  if (handed_out)
    for (int64_t t = 0; t < L.n_tensors; ++t)
      if (c.row && !L.by_rows[t]) unit_importance.narrow(0, L.unit_offset[t], L.units[t]).zero_();
  float* row_importance = unit_importance.data_ptr<float>();
  const bool sum_s = handed_out || c.is_masked, sum_g = handed_out || c.ge_noise;
  const ChunkPartial<G> element_partial = chunk_partial_for<G>(hist, sum_s, sum_g);
  const ChunkPartial<G> row_partial = chunk_partial_for<G>(false, true, sum_g);
#pragma omp parallel if (in_parallel(L.starts1))
  {
    BinCounts bin_counts;  // this thread's
    const auto [first, last] = thread_items(L.starts1);
    for (int64_t k = first; k < last; ++k) {
      const Item& it = L.items1[k];
      const int64_t t = it.tensor;
      const G* g = grads[t].data_ptr<G>();
      const float* f = c.ema ? fishers[t].data_ptr<float>() : nullptr;
      // (sole: this thread has all of the tensor's items)
      if (hist)
        bin_counts.start(out + width * t + fastmask::kSumCols, first <= L.first_item1[t] && L.first_item1[t + 1] <= last);
      if (!L.by_rows[t]) {
        partials[k] = element_partial(g, f, it.begin, it.end, inv_scale, fb, omfb, &bin_counts);
        continue;
      }
      Partial acc;
      const int64_t rs = L.row_size[t];
      for (int64_t r = it.begin; r < it.end; ++r) {
        const Partial row = row_partial(g, f, r * rs, (r + 1) * rs, inv_scale, fb, omfb, nullptr);
        const float row_s = static_cast<float>(row.s);  // s_u is fp32; S sums the rounded s_u
        row_importance[L.unit_offset[t] + r] = row_s;
        if (hist) bin_counts.add(std::min<uint32_t>(fastmask::importance_bin(row_s), kBins - 1));
        acc.s += row_s;
        acc.g += row.g;
        acc.g2 += row.g2;
        acc.bad += row.bad;
      }
      partials[k] = acc;
    }
    if (hist) bin_counts.flush();
  }
  for (int64_t t = 0; t < L.n_tensors; ++t) {
    double* row = out + width * t;
    for (int64_t k = L.first_item1[t]; k < L.first_item1[t + 1]; ++k) {
      row[0] += partials[k].s;
      row[1] += partials[k].g;
      row[2] += partials[k].g2;
      row[3] += partials[k].bad;
    }
  }
  return {sums, unit_importance};
}

// The inputs of a step beside the config (the binding's arguments, checked).
struct StepInputs {
  const std::vector<at::Tensor>&params, &grads, &steps, &exp_avgs, &exp_avg_sqs, &momentum_buffers, &fishers;
  const std::vector<int64_t>& slots;
  const c10::optional<at::Tensor>&lr_tensor, &found_inf, &unit_weight, &stats;
  const std::vector<int64_t>& unit_offsets;
  const fastmask::ShardSpaces& shards;
  float inv_scale;  // 1 / grad_scale, exact
};

// The per-tensor reduce and pass 2, from pass 1's `sums` (for shards: their totals over the
// shards), `row_importance` (pass 1's unit_importance) and, for water-filling, the `levels`.
template <typename P, typename G>
void finish(const Layout& L, const StepInputs& in, const Config& c, const double* sums, const float* row_importance,
            const double* levels) {
  const int64_t n_tensors = L.n_tensors, sums_width = c.sums_width;
  const bool inf_flag = in.found_inf.has_value() && in.found_inf->item<float>() != 0.0f;
  const uint32_t k0 = c.key0(), k1 = c.key1();
  const std::vector<int64_t>&units = L.units, &numel = L.numel, &row_size = L.row_size;
  const std::vector<char>& by_rows = L.by_rows;
  const fastmask::ShardSpaces& shards = in.shards;
  const bool sharded = shards.sharded();

  // ---- reduce: per tensor
  std::vector<TensorScalars> scalars(n_tensors);
  std::vector<int64_t> first_elements(n_tensors);
  std::vector<std::vector<float>> row_weight(n_tensors);
  double stat_pi = 0, stat_sel = 0, stat_units = 0, stat_skipped = 0;
  const float* exact_weight = in.unit_weight.has_value() ? in.unit_weight->data_ptr<float>() : nullptr;
  const bool lr_is_tensor = in.lr_tensor.has_value();
  const float lr_value = lr_is_tensor ? in.lr_tensor->item<float>() : 0.0f;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t full_units = sharded ? shards.full_units[t] : units[t];
    const int64_t full_numel = sharded ? shards.full_numels[t] : numel[t];
    const int64_t first_unit = sharded ? shards.first_units[t] : 0;
    first_elements[t] = sharded ? shards.first_elements[t] : 0;
    float* step_ptr = in.steps[t].data_ptr<float>();
    const double* tensor_sums = sums + sums_width * t;
    TensorScalars& sc = scalars[t] =
        fastmask::tensor_scalars(c, lr_is_tensor, tensor_sums, *step_ptr, inf_flag, full_units, full_numel,
                                 static_cast<uint32_t>(2 * in.slots[t]), lr_value);
    if (sc.ok) *step_ptr = sc.new_step;
    stat_skipped += (tensor_sums[3] != 0.0 && !inf_flag) ? 1.0 : 0.0;

    if (sc.ok) stat_units += static_cast<double>(units[t]);
    if (!c.is_masked) {
      if (sc.ok) {
        stat_pi += static_cast<double>(units[t]);
        stat_sel += static_cast<double>(units[t]);
      }
    } else if (by_rows[t] && !c.exact) {
      // rows are few: sample them here, once
      std::vector<float>& w = row_weight[t];
      w.resize(units[t]);
      double pi_sum = 0, sel = 0;
      for (int64_t r = 0; r < units[t]; ++r) {
        const float s = row_importance[L.unit_offset[t] + r];
        const fastmask::UnitDraw d = fastmask::draw_unit(
            s, static_cast<uint64_t>(first_unit + r), sc, levels ? levels[2 * t] : 0.0,
            levels ? static_cast<float>(levels[2 * t + 1]) : 0.0f, static_cast<float>(c.ratio),
            static_cast<float>(c.min_prob), c.poisson, c.rescale_id, k0, k1, false);
        w[r] = d.weight;
        pi_sum += d.pi;
        sel += d.chosen ? 1.0 : 0.0;
      }
      if (sc.ok) {
        stat_pi += pi_sum;
        stat_sel += sel;
      }
    } else if (c.exact && sc.ok) {
      double sel = 0;
      for (int64_t r = 0; r < units[t]; ++r) sel += exact_weight[in.unit_offsets[t] + r] != 0.0f ? 1.0 : 0.0;
      stat_pi += sel;
      stat_sel += sel;
    }
  }

  // ---- pass 2: one read-modify-write per element
  const std::vector<Item>& items2 = L.items2;
  std::vector<double> item_pi(items2.size(), 0.0), item_sel(items2.size(), 0.0);
  auto mode_of = [&](int64_t t) { return !c.is_masked ? kDense : ((by_rows[t] || c.exact) ? kTable : kSample); };
#pragma omp parallel if (in_parallel(L.starts2))
  for (auto [k, last] = thread_items(L.starts2); k < last; ++k) {
    const Item& it = items2[k];
    const int64_t t = it.tensor;
    const int kind = scalars[t].update.kind;  // the base update's form (tensor_scalars)
    Pass2Tensor pt{in.params[t].data_ptr<P>(),
                   in.grads[t].data_ptr<G>(),
                   kind == kAdam ? in.exp_avgs[t].data_ptr<float>() : nullptr,
                   kind == kAdam ? in.exp_avg_sqs[t].data_ptr<float>() : nullptr,
                   kind == kSgdMomentum ? in.momentum_buffers[t].data_ptr<float>() : nullptr,
                   c.ema ? in.fishers[t].data_ptr<float>() : nullptr,
                   c.exact ? exact_weight + in.unit_offsets[t] : (by_rows[t] ? row_weight[t].data() : nullptr),
                   levels ? levels + 2 * t : nullptr, row_size[t], first_elements[t]};
    double pi_sum = 0, sel_sum = 0;
    const int mode = mode_of(t);
    pass2_loop<P, G>(kind, mode, c.rescale_id, c.ema, mode == kSample && plain_sampling(c, scalars[t]))(
        pt, scalars[t], c, in.inv_scale, it.begin, it.end, pi_sum, sel_sum);
    if (scalars[t].ok) {
      item_pi[k] = pi_sum;
      item_sel[k] = sel_sum;
    }
  }

  if (in.stats.has_value()) {
    for (size_t k = 0; k < items2.size(); ++k) {
      stat_pi += item_pi[k];
      stat_sel += item_sel[k];
    }
    double* s = in.stats->data_ptr<double>();
    s[0] += stat_pi;
    s[1] += stat_sel;
    s[2] += stat_units;
    s[3] += stat_skipped;
  }
}

// pass1 and finish for a batch's (param, grad) dtypes, the pairs that training produces
// (fastmask.backends.native converts other grads to fp32); check_batch has checked the pair.
using Pass1Fn = std::tuple<at::Tensor, at::Tensor> (*)(const Layout&, const std::vector<at::Tensor>&,
                                                       const std::vector<at::Tensor>&, const Config&, float, bool);
using FinishFn = void (*)(const Layout&, const StepInputs&, const Config&, const double*, const float*,
                          const double*);

Pass1Fn pass1_for(at::ScalarType g) {
  if (g == at::kBFloat16) return &pass1<c10::BFloat16>;
  if (g == at::kHalf) return &pass1<c10::Half>;
  return &pass1<float>;
}

FinishFn finish_for(at::ScalarType p, at::ScalarType g) {
  if (p == at::kBFloat16)
    return g == at::kFloat ? &finish<c10::BFloat16, float> : &finish<c10::BFloat16, c10::BFloat16>;
  if (p == at::kHalf) return g == at::kFloat ? &finish<c10::Half, float> : &finish<c10::Half, c10::Half>;
  return &finish<float, float>;
}

// Raises unless params and grads are contiguous CPU tensors of one supported (param, grad)
// dtype pair: (fp32, fp32), (bf16, bf16), (fp16, fp16), (bf16, fp32), (fp16, fp32).
void check_batch(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, const char* op) {
  TORCH_CHECK(!params.empty(), op, ": no params");
  TORCH_CHECK(grads.size() == params.size(), op, ": one grad per param");
  const auto p_type = params[0].scalar_type(), g_type = grads[0].scalar_type();
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].device().is_cpu() && params[t].is_contiguous() && grads[t].is_contiguous(), op,
                ": params and grads must be contiguous CPU tensors");
    TORCH_CHECK(params[t].scalar_type() == p_type && grads[t].scalar_type() == g_type, op,
                ": one param dtype and one grad dtype per batch");
  }
  const bool half_param = p_type == at::kBFloat16 || p_type == at::kHalf;
  const bool supported = (p_type == g_type && (p_type == at::kFloat || half_param)) || (half_param && g_type == at::kFloat);
  TORCH_CHECK(supported, op, ": unsupported (param, grad) dtypes ", p_type, ", ", g_type);
}

// The grads as the passes read them, and 1 / grad_scale: a scale whose reciprocal is exact (1
// without AMP; GradScaler's powers of two) is multiplied out in the passes, g * (1 / scale)
// being g / scale; any other scale is divided out here, into fp32 copies (g / scale as the
// reference rounds it), so that the passes never divide.
std::pair<std::vector<at::Tensor>, float> scaled_grads(const std::vector<at::Tensor>& grads,
                                                       const c10::optional<at::Tensor>& grad_scale) {
  const float scale = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  if (exact_reciprocal(scale)) return {grads, 1.0f / scale};
  std::vector<at::Tensor> divided;
  for (const at::Tensor& g : grads) {
    at::Tensor x = g.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    float* d = x.data_ptr<float>();
    const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static) if (in_parallel(n / kChunk))
    for (int64_t i = 0; i < n; ++i) d[i] = d[i] / scale;
    divided.push_back(x);
  }
  return {divided, 1.0f};
}

}  // namespace

// Pass 1 of a batch: (sums [T, 4] or [T, 4 + kBins] float64, unit_importance fp32); see pass1.
// `handed_out`: the caller reads the result (the op's), whole; a backend that passes it straight
// to masked_step asks only for what the finish reads (see pass1).
std::tuple<at::Tensor, at::Tensor> masked_step_sums(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                                                    std::vector<at::Tensor> fishers, const Config& c,
                                                    c10::optional<at::Tensor> grad_scale, bool handed_out) {
  check_batch(params, grads, "cpp masked_step_sums");
  const auto [passed_grads, inv_scale] = scaled_grads(grads, grad_scale);
  return pass1_for(passed_grads[0].scalar_type())(layout_of(params, c), passed_grads, fishers, c, inv_scale,
                                                  handed_out);
}

// The whole step: pass 1 (unless `sums`, and in row mode `unit_importance`, come from
// masked_step_sums: the finish of a sharded step whose sums were all-reduced), for
// water-filling each tensor's water level (`level_events`: sampling.level_events' breakpoints
// (x, a, c); none without water-filling), the reduce and pass 2.
void masked_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> steps,
                 std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                 std::vector<at::Tensor> momentum_buffers, std::vector<at::Tensor> fishers,
                 std::vector<int64_t> slots, const Config& c, const fastmask::ShardSpaces& shards,
                 c10::optional<at::Tensor> lr_tensor,
                 c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf,
                 c10::optional<at::Tensor> unit_weight, std::vector<int64_t> unit_offsets,
                 c10::optional<at::Tensor> stats, c10::optional<at::Tensor> sums_in,
                 c10::optional<at::Tensor> unit_importance_in, std::vector<at::Tensor> level_events) {
  check_batch(params, grads, "cpp masked_step");
  TORCH_CHECK(level_events.size() == (c.water_filling ? 3u : 0u),
              "cpp masked_step: water-filling takes sampling.level_events' (x, a, c), else none");
  const auto [passed_grads, inv_scale] = scaled_grads(grads, grad_scale);
  const Layout L = layout_of(params, c);
  at::Tensor sums, unit_importance, levels;
  if (sums_in.has_value()) {
    sums = sums_in->contiguous();
    unit_importance = unit_importance_in.has_value() ? unit_importance_in->contiguous() : at::Tensor();
    TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.dim() == 2 && sums.size(0) == L.n_tensors &&
                    sums.size(1) == c.sums_width,
                "cpp masked_step: sums must be float64 [", L.n_tensors, ", ", c.sums_width, "]");
    TORCH_CHECK(!c.row || (unit_importance.defined() && unit_importance.scalar_type() == at::kFloat &&
                           unit_importance.numel() == L.n_units),
                "cpp masked_step: row units need pass 1's unit_importance, fp32 [", L.n_units, "]");
  } else {
    std::tie(sums, unit_importance) =
        pass1_for(passed_grads[0].scalar_type())(L, passed_grads, fishers, c, inv_scale, false);
  }
  if (c.water_filling)
    levels = water_levels(sums, c.ratio, c.min_prob, level_events[0], level_events[1], level_events[2]);
  const StepInputs in{params, passed_grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, slots,
                      lr_tensor, found_inf, unit_weight, stats, unit_offsets, shards, inv_scale};
  finish_for(params[0].scalar_type(), passed_grads[0].scalar_type())(
      L, in, c, sums.data_ptr<double>(), c.row ? unit_importance.data_ptr<float>() : nullptr,
      c.water_filling ? levels.data_ptr<double>() : nullptr);
}

}  // namespace fastmask_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmask cpp backend: fused masked step and ops on CPU tensors";
  fastmask::bind_kernel_config(m);
  m.def("masked_step", &fastmask_cpu::masked_step);
  m.def("masked_step_sums", &fastmask_cpu::masked_step_sums);
  m.def("water_levels", &fastmask_cpu::water_levels);
  m.def("fisher_update", &fastmask_cpu::fisher_update);
  m.def("inclusion_probs", &fastmask_cpu::inclusion_probs);
  m.def("bernoulli_select", &fastmask_cpu::bernoulli_select);
  m.def("unbiased_rescale", &fastmask_cpu::unbiased_rescale);
  // which Philox loop this build compiled, so that a test can tell the variants apart
#if defined(FASTMASK_AVX512_RNG)
  m.def("rng_path", [] { return std::string("avx512"); });
#elif defined(FASTMASK_AVX2_RNG)
  m.def("rng_path", [] { return std::string("avx2"); });
#else
  m.def("rng_path", [] { return std::string("portable"); });
#endif
}
