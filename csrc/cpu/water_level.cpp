// The cpp backend's water levels: fastmask::water_level (fastmask_math.h, shared with the CUDA
// reduce) over one tensor's histogram per task.
#include <vector>

#include "../fastmask_math.h"
#include "ops.h"

namespace fastmask_cpu {

namespace {

// Each tensor's water level (x, p0), float64 [T, 2], from the histogram columns of pass 1's
// sums: fastmask.reference.sampling.water_level by fastmask::water_level, with the prefix sums
// tabled over the occupied bins only (below them they are 0, above them the totals). `events`:
// sampling.level_events' breakpoints (x, a, c).
struct OccupiedPrefix {
  const double* counts;  // counts[i], masses[i]: below positive bin i, for i in (lo, hi]
  const fastmask::Mass* masses;
  int lo, hi;
  double count_total;
  fastmask::Mass mass_total;
  double count(int64_t i) const { return i <= lo ? 0.0 : (i > hi ? count_total : counts[i]); }
  const fastmask::Mass& mass(int64_t i) const { return i <= lo ? zero : (i > hi ? mass_total : masses[i]); }
  void range(int64_t a, int64_t c, double* count_a, double* count_c, fastmask::Mass* between) const {
    *count_a = count(a);
    *count_c = count(c);
    const fastmask::Mass &low = mass(a), &high = mass(c);
    for (int i = 0; i < fastmask::kMassLimbs; ++i) between->limb[i] = high.limb[i] - low.limb[i];
  }
  fastmask::Mass zero = fastmask::mass_zero();
};

}  // namespace

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
    std::vector<double> counts(kPositive + 1);
    std::vector<fastmask::Mass> masses(kPositive + 1);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tensors; ++t) {
      const double* hist = hist_all + width * t + fastmask::kSumCols;  // hist[p + 1]: positive bin p
      OccupiedPrefix prefix{counts.data(), masses.data(), 0, kPositive - 1, 0.0, fastmask::mass_zero()};
      while (prefix.lo < kPositive && hist[prefix.lo + 1] == 0) ++prefix.lo;
      while (prefix.hi > prefix.lo && hist[prefix.hi + 1] == 0) --prefix.hi;
      for (int p = prefix.lo; p <= prefix.hi && prefix.lo < kPositive; ++p) {
        prefix.count_total += hist[p + 1];
        fastmask::mass_add_bin(prefix.mass_total, static_cast<int64_t>(hist[p + 1]), p);
        counts[p + 1] = prefix.count_total;
        masses[p + 1] = prefix.mass_total;
      }
      fastmask::water_level(prefix, hist[0], prefix.count_total, ratio32, min_prob, ex.data_ptr<double>(),
                            ea.data_ptr<int64_t>(), ec.data_ptr<int64_t>(), ex.numel(), level + 2 * t,
                            level + 2 * t + 1);
    }
  }
  return out;
}

}  // namespace fastmask_cpu
