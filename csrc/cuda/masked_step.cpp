// Torch binding of the "cuda" backend: builds the pointer and metadata tables, allocates
// the step's buffers and launches the kernels of masked_step_kernels.cu on the current
// stream. Compiled only with a CUDA build of torch (fastmask.backends.cuda).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <list>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "../kernel_config.h"
#include "masked_step.h"

namespace {

using namespace fastmask_cuda;

at::Tensor device_table(const std::vector<int64_t>& values, const at::Device& device, at::ScalarType type) {
  auto host = at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(type).pin_memory();
  return host.to(device, /*non_blocking=*/true);
}

const float* optional_ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

int dtype_code(at::ScalarType t) {
  if (t == at::kFloat) return kF32;
  if (t == at::kBFloat16) return kBF16;
  TORCH_CHECK(t == at::kHalf, "cuda masked_step: unsupported dtype ", t);
  return kF16;
}

// Device copies of a batch's metadata and pointer tables, kept while its storages, shapes and
// slots stay the same (every step of a training loop): no upload per step, and a step captured
// in a CUDA graph reads tables that outlive the capture. The key is the tables' own content.
struct Tables {
  at::Tensor meta, ptrs, blocks, rows;
};

Tables cached_tables(const std::vector<int64_t>& meta, const std::vector<int64_t>& ptrs,
                     const std::vector<int64_t>& block_tensor, const std::vector<int64_t>& row_tensor,
                     const at::Device& device) {
  constexpr size_t kCacheSize = 64;
  static std::mutex mutex;
  static std::list<std::pair<std::vector<int64_t>, Tables>> cache;  // most recently used first
  std::vector<int64_t> key;
  key.reserve(meta.size() + ptrs.size() + 1);
  key.push_back(device.index());
  key.insert(key.end(), meta.begin(), meta.end());  // block_tensor and row_tensor follow from meta
  key.insert(key.end(), ptrs.begin(), ptrs.end());
  const std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->first == key) {
      cache.splice(cache.begin(), cache, it);
      return cache.front().second;
    }
  }
  Tables tables{device_table(meta, device, at::kLong), device_table(ptrs, device, at::kLong),
                device_table(block_tensor.empty() ? std::vector<int64_t>{0} : block_tensor, device, at::kInt),
                device_table(row_tensor.empty() ? std::vector<int64_t>{0} : row_tensor, device, at::kInt)};
  cache.emplace_front(std::move(key), tables);
  if (cache.size() > kCacheSize) cache.pop_back();
  return tables;
}

// The launch arguments of one phase of a step, and the device buffers they point into (held
// here until the launch). In row mode the finish reads pass 1's `unit_importance_in`.
struct Launch {
  LaunchArgs args;
  Tables tables;
  at::Tensor partials, row_importance, unit_weight, scalars, tensor_stats, block_stats, lr32, levels;
};

Launch prepare(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& exp_avgs,
               const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& momentum_buffers,
               const std::vector<at::Tensor>& fishers, const std::vector<int64_t>& slots,
               const fastmask::KernelConfig& h, const fastmask::ShardSpaces& shards,
               const c10::optional<at::Tensor>& lr_tensor,
               const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
               const c10::optional<at::Tensor>& unit_weight_in, const at::Tensor& settings, Phase phase,
               const c10::optional<at::Tensor>& unit_importance_in, const std::vector<at::Tensor>& level_events) {
  const auto device = params[0].device();
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  std::vector<int64_t> meta, ptrs, block_tensor, row_tensor;
  int64_t blocks = 0, units_total = 0;
  const bool sharded = shards.sharded();  // shards of larger tensors (FSDP2)
  auto ptr = [](const std::vector<at::Tensor>& values, int64_t t) -> int64_t {
    return values.empty() ? 0 : reinterpret_cast<int64_t>(values[t].data_ptr());
  };
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t n = params[t].numel();
    const int64_t units = h.row ? (params[t].dim() ? params[t].size(0) : 1) : n;
    const int64_t nb = (n + kBlockElems - 1) / kBlockElems;
    // each column written by its name in masked_step.h's MetaCol / PtrCol: the one layout
    int64_t mrow[kMetaCols], prow[kPtrCols];
    mrow[kNumel] = n;
    mrow[kUnits] = units;
    mrow[kRowSize] = units ? std::max<int64_t>(n / units, 1) : 1;
    mrow[kSlot2] = 2 * slots[t];
    mrow[kPartStart] = h.row ? units_total : blocks;
    mrow[kNumParts] = h.row ? units : nb;
    mrow[kUnitOffset] = units_total;
    mrow[kBlockStart] = blocks;
    mrow[kFullUnits] = sharded ? shards.full_units[t] : units;
    mrow[kFullNumel] = sharded ? shards.full_numels[t] : n;
    mrow[kFirstUnit] = sharded ? shards.first_units[t] : 0;
    mrow[kFirstElement] = sharded ? shards.first_elements[t] : 0;
    prow[kParam] = ptr(params, t);
    prow[kGrad] = ptr(grads, t);
    prow[kExpAvg] = ptr(exp_avgs, t);
    prow[kExpAvgSq] = ptr(exp_avg_sqs, t);
    prow[kMomentum] = ptr(momentum_buffers, t);
    prow[kFisher] = ptr(fishers, t);
    prow[kStep] = ptr(steps, t);
    meta.insert(meta.end(), mrow, mrow + kMetaCols);
    ptrs.insert(ptrs.end(), prow, prow + kPtrCols);
    block_tensor.insert(block_tensor.end(), nb, t);
    row_tensor.insert(row_tensor.end(), units, t);
    blocks += nb;
    units_total += units;
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  Launch l;
  l.tables = cached_tables(meta, ptrs, block_tensor, row_tensor, device);
  l.partials = at::empty({std::max<int64_t>(h.row ? units_total : blocks, 1), 4}, f64);
  l.row_importance = phase == Phase::kFinish && h.row ? unit_importance_in->contiguous()
                                                      : at::empty({std::max<int64_t>(units_total, 1)}, f32);
  l.unit_weight = unit_weight_in.has_value() ? *unit_weight_in : at::zeros({std::max<int64_t>(units_total, 1)}, f32);
  l.scalars = at::empty({n_tensors * static_cast<int64_t>(sizeof(TensorScalars))}, f32.dtype(at::kByte));
  l.tensor_stats = at::zeros({n_tensors, 4}, f64);
  l.block_stats = at::zeros({std::max<int64_t>(blocks, 1), 2}, f64);
  l.lr32 = lr_tensor.has_value() ? lr_tensor->to(device, at::kFloat) : at::Tensor();
  if (h.water_filling && phase != Phase::kSums) {
    TORCH_CHECK(level_events.size() == 3 && level_events[0].scalar_type() == at::kDouble &&
                    level_events[1].scalar_type() == at::kLong && level_events[2].scalar_type() == at::kLong &&
                    level_events[0].numel() > 0 && level_events[1].numel() == level_events[0].numel() &&
                    level_events[2].numel() == level_events[0].numel(),
                "cuda masked_step: water-filling needs sampling.level_events' (x float64, a and c int64, one length)");
    for (const at::Tensor& e : level_events)
      TORCH_CHECK(e.device() == device && e.is_contiguous(), "cuda masked_step: level events must be contiguous on ",
                  device);
    l.levels = at::empty({n_tensors, 2}, f64);
  }

  LaunchArgs& a = l.args;
  a.param_dtype = dtype_code(params[0].scalar_type());
  a.grad_dtype = dtype_code(grads[0].scalar_type());
  a.n_tensors = n_tensors;
  a.n_blocks = blocks;
  a.n_units = units_total;
  a.meta = l.tables.meta.data_ptr<int64_t>();
  a.ptrs = l.tables.ptrs.data_ptr<int64_t>();
  a.block_tensor = l.tables.blocks.data_ptr<int32_t>();
  a.row_tensor = l.tables.rows.data_ptr<int32_t>();
  a.partials = l.partials.data_ptr<double>();
  a.row_importance = l.row_importance.data_ptr<float>();
  a.unit_weight = l.unit_weight.data_ptr<float>();
  a.scalars = reinterpret_cast<TensorScalars*>(l.scalars.data_ptr());
  a.tensor_stats = l.tensor_stats.data_ptr<double>();
  a.block_stats = l.block_stats.data_ptr<double>();
  a.grad_scale = optional_ptr(grad_scale);
  a.found_inf = optional_ptr(found_inf);
  a.lr = l.lr32.defined() ? l.lr32.data_ptr<float>() : nullptr;
  a.settings = settings.data_ptr<float>();
  const bool levels = l.levels.defined();
  a.levels = levels ? l.levels.data_ptr<double>() : nullptr;
  a.events_x = levels ? level_events[0].data_ptr<double>() : nullptr;
  a.events_a = levels ? level_events[1].data_ptr<int64_t>() : nullptr;
  a.events_c = levels ? level_events[2].data_ptr<int64_t>() : nullptr;
  a.n_events = levels ? level_events[0].numel() : 0;
  a.config = h;
  return l;
}

void check_batch(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const at::Tensor& settings) {
  TORCH_CHECK(!params.empty(), "cuda masked_step: no params");
  TORCH_CHECK(settings.is_cuda() && settings.scalar_type() == at::kFloat && settings.numel() == 3 &&
                  settings.is_contiguous() && settings.device() == params[0].device(),
              "cuda masked_step: settings must be the 3 fp32 values [ratio, grad coefficient, update coefficient] "
              "on the params' device");
  const auto p_type = params[0].scalar_type(), g_type = grads[0].scalar_type();
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].is_cuda() && params[t].is_contiguous() && grads[t].is_contiguous(),
                "cuda masked_step: params and grads must be contiguous CUDA tensors");
    TORCH_CHECK(params[t].scalar_type() == p_type && grads[t].scalar_type() == g_type,
                "cuda masked_step: one param dtype and one grad dtype per batch");
  }
}

// The whole step; with `sums` (and, in row mode, `unit_importance`) from masked_step_sums,
// only its reduce and pass 2: the finish of a sharded step whose sums were all-reduced.
// Water-filling needs `level_events` (sampling.level_events' x, a, c on the device; else empty).
// The unit table (exact mode) is laid out in tensor order, as the metadata's offsets:
// `unit_offsets` is the cpp binding's argument, unused here.
void masked_step_binding(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> steps,
                         std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                         std::vector<at::Tensor> momentum_buffers, std::vector<at::Tensor> fishers,
                         std::vector<int64_t> slots, const fastmask::KernelConfig& h,
                         const fastmask::ShardSpaces& shards, c10::optional<at::Tensor> lr_tensor,
                         c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf,
                         c10::optional<at::Tensor> unit_weight, std::vector<int64_t> /*unit_offsets*/,
                         c10::optional<at::Tensor> stats, at::Tensor settings, c10::optional<at::Tensor> sums,
                         c10::optional<at::Tensor> unit_importance, std::vector<at::Tensor> level_events) {
  check_batch(params, grads, settings);
  TORCH_CHECK(!sums.has_value() || !h.row || unit_importance.has_value(),
              "cuda masked_step: row units need pass 1's unit_importance");
  const auto device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  const Phase phase = sums.has_value() ? Phase::kFinish : Phase::kWhole;
  const Launch l = prepare(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, slots, h, shards,
                           lr_tensor, grad_scale, found_inf, unit_weight, settings, phase, unit_importance,
                           level_events);
  // the finish's all-reduced sums, or the whole step's histogram buffer (water-filling)
  at::Tensor sums_d;
  if (phase == Phase::kFinish) {
    sums_d = sums->to(device, at::kDouble).contiguous();
    TORCH_CHECK(sums_d.numel() == h.sums_width * n_tensors, "cuda masked_step: sums must be float64 [", n_tensors,
                ", ", h.sums_width, "]");
  } else if (h.water_filling) {
    sums_d = at::zeros({n_tensors, h.sums_width}, at::TensorOptions().dtype(at::kDouble).device(device));
  }
  double* sums_ptr = sums_d.defined() ? sums_d.data_ptr<double>() : nullptr;
  const cudaError_t err = fastmask_cuda::masked_step(l.args, phase, sums_ptr, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "cuda masked_step: ", cudaGetErrorString(err));
  if (stats.has_value()) {
    at::Tensor per_tensor = l.tensor_stats.sum(0);
    if (h.is_masked && !h.row && !h.exact) {
      stats->slice(0, 0, 2).add_(l.block_stats.sum(0));
      stats->slice(0, 2, 4).add_(per_tensor.slice(0, 2, 4));
    } else {
      stats->add_(per_tensor);
    }
  }
}

// Pass 1 of a batch: (sums [T, 4] or [T, 4 + kHistBins] float64, unit_importance fp32 [units] in
// row mode, else empty).
std::tuple<at::Tensor, at::Tensor> masked_step_sums_binding(
    std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> steps,
    std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> momentum_buffers,
    std::vector<at::Tensor> fishers, std::vector<int64_t> slots, const fastmask::KernelConfig& h,
    const fastmask::ShardSpaces& shards, c10::optional<at::Tensor> grad_scale, at::Tensor settings) {
  check_batch(params, grads, settings);
  const auto device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t n_tensors = static_cast<int64_t>(params.size());
  const Launch l = prepare(params, grads, steps, exp_avgs, exp_avg_sqs, momentum_buffers, fishers, slots, h, shards,
                           c10::nullopt, grad_scale, c10::nullopt, c10::nullopt, settings, Phase::kSums, c10::nullopt,
                           {});
  at::Tensor sums = at::zeros({n_tensors, h.sums_width}, at::TensorOptions().dtype(at::kDouble).device(device));
  const cudaError_t err =
      fastmask_cuda::masked_step(l.args, Phase::kSums, sums.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "cuda masked_step_sums: ", cudaGetErrorString(err));
  const int64_t units = l.args.n_units;
  return {sums, h.row ? l.row_importance.narrow(0, 0, units) : at::empty({0}, l.row_importance.options())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmask cuda backend: the fused masked step as multi-tensor CUDA kernels";
  fastmask::bind_kernel_config(m);
  m.def("masked_step", &masked_step_binding);
  m.def("masked_step_sums", &masked_step_sums_binding);
}
