// The cpp backend's functions, one declaration each for the module's bindings (masked_step.cpp):
// the fused step (masked_step.cpp), the water levels (water_level.cpp) and the low-level ops on
// units (units.cpp). Host code (torch).
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../kernel_config.h"

namespace fastmask_cpu {

constexpr int64_t kChunk = 1 << 14;  // elements (or rows) per work item; a multiple of 4

// Whether a loop over n work items runs in parallel, as at::parallel_for decides: more than one
// item and thread, not inside another parallel region. The loops are `omp parallel for` with a
// static schedule (contiguous runs of items per thread, at::parallel_for's split), and no
// num_threads clause (torch avoids it: GOMP's thread pool, pytorch#32008).
inline bool in_parallel(int64_t n) { return n > 1 && at::get_num_threads() > 1 && !at::in_parallel_region(); }

// Work items weighed by their elements: `starts[k]` is item k's first element among all the
// items', and starts.back() their total. A batch whose elements are more than one chunk runs in
// parallel, each thread taking a contiguous run of items that holds about an equal share of the
// elements: a static schedule over items splits their count, which gives a batch of small
// tensors (biases) and one large tensor's chunks to threads with up to twice the other's work,
// and runs a batch of a few small items in parallel for less work than a fork costs.
inline bool in_parallel(const std::vector<int64_t>& starts) {
  return starts.back() > kChunk && in_parallel(static_cast<int64_t>(starts.size()) - 1);
}

struct ItemRange {
  int64_t first, last;
};

// The calling thread's items [first, last) of `starts` (see above), inside `omp parallel` (all of
// them outside one): the items whose first element falls in its equal share of the elements (the
// last thread also takes any empty items at the end).
inline ItemRange thread_items(const std::vector<int64_t>& starts) {
  const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num(), total = starts.back();
  const int64_t n_items = static_cast<int64_t>(starts.size()) - 1;
  auto first_item_from = [&](int64_t t) {
    return std::lower_bound(starts.begin(), starts.end() - 1, total * t / threads) - starts.begin();
  };
  return {first_item_from(thread), thread + 1 == threads ? n_items : first_item_from(thread + 1)};
}

std::tuple<at::Tensor, at::Tensor> masked_step_sums(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                                                    std::vector<at::Tensor> fishers,
                                                    const fastmask::KernelConfig& c,
                                                    c10::optional<at::Tensor> grad_scale, bool handed_out);
void masked_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> steps,
                 std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                 std::vector<at::Tensor> momentum_buffers, std::vector<at::Tensor> fishers,
                 std::vector<int64_t> slots, const fastmask::KernelConfig& c, const fastmask::ShardSpaces& shards,
                 c10::optional<at::Tensor> lr_tensor,
                 c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf,
                 c10::optional<at::Tensor> unit_weight, std::vector<int64_t> unit_offsets,
                 c10::optional<at::Tensor> stats, c10::optional<at::Tensor> sums_in,
                 c10::optional<at::Tensor> unit_importance_in, std::vector<at::Tensor> level_events);

at::Tensor water_levels(at::Tensor sums, double ratio, double min_prob, at::Tensor events_x, at::Tensor events_a,
                        at::Tensor events_c);

void fisher_update(at::Tensor fisher, at::Tensor grad, double beta);
at::Tensor inclusion_probs(at::Tensor s_units, double ratio, bool poisson, double min_prob, double level_x, double p0,
                           bool degenerate);
at::Tensor bernoulli_select(at::Tensor probs, uint64_t seed, int64_t stream);
at::Tensor unbiased_rescale(at::Tensor grad, at::Tensor mask, at::Tensor probs);

}  // namespace fastmask_cpu
