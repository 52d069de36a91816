// The cpp backend's water levels: fastmask::water_level (fastmask_math.h, shared with the CUDA
// reduce) over one tensor's histogram per task.
#include <cstdint>
#include <cstring>
#include <vector>

#include "../fastmask_math.h"
#include "ops.h"

namespace fastmask_cpu {

namespace {

constexpr int64_t kPrefixes = fastmask::kPositiveBins + 1;  // entries of a prefix table: 0 .. kPositiveBins

// The prefix sums of one tensor's histogram over its occupied range [lo, hi] of positive bins
// (below it they are 0, above it the totals), one entry per occupied bin: `rank[i]` is the number
// of occupied bins below positive bin i, and entry k the prefix of the first k of them (entry 0,
// the empty prefix, is the tables' zeros: never written).
// An empty bin costs one store (a tensor's range spans about 8 bins per binade of its gradients,
// mostly empty for a small tensor), an occupied one a row of the tables. The masses are kept one
// limb per column: a bin's add changes three limbs of the running mass with scalar stores, and a
// table of rows (one Mass each) re-read them at once with one wide load, which the CPU cannot
// forward from those stores (a stall of about 20 cycles per bin: 40 % of the solve).
struct OccupiedPrefix {
  const int32_t* rank;   // rank[i] for i in (lo, hi]
  const double* counts;  // counts[k], limbs[l * kPrefixes + k]: the first k occupied bins
  const int64_t* limbs;
  int lo, hi;
  double count_total;
  fastmask::Mass mass_total;
  double count(int64_t i) const { return i <= lo ? 0.0 : (i > hi ? count_total : counts[rank[i]]); }
  int64_t limb(int l, int64_t i) const {
    return i <= lo ? 0 : (i > hi ? mass_total.limb[l] : limbs[l * kPrefixes + rank[i]]);
  }
  void range(int64_t a, int64_t c, double* count_a, double* count_c, fastmask::Mass* between) const {
    *count_a = count(a);
    *count_c = count(c);
    for (int l = 0; l < fastmask::kMassLimbs; ++l) between->limb[l] = limb(l, c) - limb(l, a);
  }
};

// Whether any of hist[i .. i + 8) is not 0: the counts are non-negative, so a count is 0
// exactly when its bits are (8 at a time, the scans below vectorise).
bool any_of_8(const double* hist, int64_t i) {
  uint64_t any = 0;
  for (int j = 0; j < 8; ++j) {
    uint64_t bits;
    std::memcpy(&bits, hist + i + j, sizeof bits);
    any |= bits;
  }
  return any != 0;
}

// The first i in [begin, end) with hist[i] != 0, else end.
int64_t first_occupied(const double* hist, int64_t begin, int64_t end) {
  while (begin + 8 <= end && !any_of_8(hist, begin)) begin += 8;
  while (begin < end && hist[begin] == 0) ++begin;
  return begin;
}

// The last i in [begin, end) with hist[i] != 0, else begin (hist[begin] != 0: first_occupied's).
int64_t last_occupied(const double* hist, int64_t begin, int64_t end) {
  while (end - 8 > begin && !any_of_8(hist, end - 8)) end -= 8;
  while (end - 1 > begin && hist[end - 1] == 0) --end;
  return end - 1;
}

}  // namespace

// Each tensor's water level (x, p0), float64 [T, 2], from the histogram columns of pass 1's
// sums: fastmask.reference.sampling.water_level by fastmask::water_level over its
// OccupiedPrefix. `events`: sampling.level_events' breakpoints (x, a, c).
at::Tensor water_levels(at::Tensor sums, double ratio, double min_prob, at::Tensor events_x, at::Tensor events_a,
                        at::Tensor events_c) {
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.dim() == 2 &&
                  sums.size(1) == fastmask::kSumCols + fastmask::kHistBins,
              "cpp water_levels: sums must be float64 [T, ", fastmask::kSumCols + fastmask::kHistBins, "]");
  TORCH_CHECK(events_x.scalar_type() == at::kDouble && events_a.scalar_type() == at::kLong &&
                  events_c.scalar_type() == at::kLong && events_x.numel() == events_a.numel() &&
                  events_x.numel() == events_c.numel() && events_x.numel() > 0,
              "cpp water_levels: events must be sampling.level_events' (x float64, a and c int64, one length)");
  constexpr int kPositive = fastmask::kPositiveBins;
  const at::Tensor in = sums.contiguous(), ex = events_x.contiguous(), ea = events_a.contiguous(),
                   ec = events_c.contiguous();
  const int64_t n_tensors = in.size(0), width = in.size(1);
  at::Tensor out = at::empty({n_tensors, 2}, in.options());
  const double* hist_all = in.data_ptr<double>();
  double* level = out.data_ptr<double>();
  const float ratio32 = static_cast<float>(ratio);
#pragma omp parallel if (in_parallel(n_tensors / 16))
  {
    // the prefix tables, allocated (zeroed) once per thread: entries are written for the occupied
    // range before they are read
    thread_local std::vector<int32_t> rank(kPrefixes);
    thread_local std::vector<double> counts(kPrefixes);
    thread_local std::vector<int64_t> limbs(fastmask::kMassLimbs * kPrefixes);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tensors; ++t) {
      const double* hist = hist_all + width * t + fastmask::kSumCols;  // hist[p + 1]: positive bin p
      const int lo = static_cast<int>(first_occupied(hist + 1, 0, kPositive));
      OccupiedPrefix prefix{rank.data(), counts.data(), limbs.data(), lo,
                            static_cast<int>(last_occupied(hist + 1, lo, kPositive)), 0.0, fastmask::mass_zero()};
      int32_t occupied = 0;
      for (int p = prefix.lo; p <= prefix.hi && prefix.lo < kPositive; ++p) {
        const double n = hist[p + 1];
        if (n != 0.0) {
          ++occupied;
          prefix.count_total += n;
          fastmask::mass_add_bin(prefix.mass_total, static_cast<int64_t>(n), p);
          counts[occupied] = prefix.count_total;
          for (int l = 0; l < fastmask::kMassLimbs; ++l) limbs[l * kPrefixes + occupied] = prefix.mass_total.limb[l];
        }
        rank[p + 1] = occupied;
      }
      fastmask::water_level(prefix, hist[0], prefix.count_total, ratio32, min_prob, ex.data_ptr<double>(),
                            ea.data_ptr<int64_t>(), ec.data_ptr<int64_t>(), ex.numel(), level + 2 * t,
                            level + 2 * t + 1);
    }
  }
  return out;
}

}  // namespace fastmask_cpu
