// Interface between the CUDA kernels (masked_step_kernels.cu, plain CUDA) and their
// torch binding (masked_step.cpp): the kernels need no torch headers, so CI can compile
// them with nvcc for sm_90 on a machine without a CUDA build of torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../fastmask_math.h"

namespace fastmask_cuda {

constexpr int kThreads = 256;
constexpr int kVec = 4;                       // elements per thread: one Philox call
constexpr int kBlockElems = kThreads * kVec;  // elements per pass-1 / pass-2 block

// kFullUnits .. kFirstElement: the full tensor's units and elements and the full-tensor
// index of the first local unit and element (= kUnits, kNumel, 0, 0 unless sharded)
enum MetaCol {
  kNumel = 0, kUnits, kRowSize, kSlot2, kPartStart, kNumParts, kUnitOffset, kBlockStart,
  kFullUnits, kFullNumel, kFirstUnit, kFirstElement, kMetaCols
};
enum PtrCol { kParam = 0, kGrad, kExpAvg, kExpAvgSq, kMomentum, kFisher, kStep, kPtrCols };
enum DType { kF32 = 0, kBF16 = 1, kF16 = 2 };
// The per-group settings the kernels read from device memory (the Python StepConfig.device_settings).
enum Setting { kRatio = 0, kGradCoefficient, kUpdateCoefficient };

using fastmask::TensorScalars;

// Device buffers of one step, all allocated by the caller.
struct LaunchArgs {
  int param_dtype, grad_dtype;
  int64_t n_tensors, n_blocks, n_units;
  const int64_t* meta;          // [n_tensors, kMetaCols]
  const int64_t* ptrs;          // [n_tensors, kPtrCols]
  const int32_t* block_tensor;  // [n_blocks]
  const int32_t* row_tensor;    // [n_units]
  double* partials;             // [max(n_blocks or n_units, 1), 4]
  float* row_importance;        // [n_units]
  float* unit_weight;           // [n_units] (exact mode: filled by the caller)
  TensorScalars* scalars;       // [n_tensors]
  double* tensor_stats;         // [n_tensors, 4]
  double* block_stats;          // [n_blocks, 2]
  const float* grad_scale;      // or nullptr
  const float* found_inf;       // or nullptr
  const float* lr;              // or nullptr (float lr in the config)
  const float* settings;        // [ratio, grad coefficient, update coefficient] (enum Setting)
  double* levels;               // [n_tensors, 2] water levels (x, p0), solved by the reduce; or nullptr
  const double* events_x;       // water-filling: sampling.level_events' breakpoints [n_events], or nullptr
  const int64_t* events_a;
  const int64_t* events_c;
  int64_t n_events;
  fastmask::KernelConfig config;  // the step's kernel config
};

// What masked_step launches. kWhole: pass 1, the reduce and pass 2, with `sums` a zeroed
// [n_tensors, sums_width] buffer for water-filling (pass 1 adds the importance histograms to its
// columns after the first 4, from which the reduce solves each tensor's water level into
// `levels`), else nullptr. kSums: pass 1 alone, its per-tensor sums into `sums` (zeroed, [n_tensors,
// sums_width]). kFinish: the reduce and pass 2 from `sums` (kSums's, all-reduced over the shards of
// larger tensors in between).
enum class Phase { kWhole, kSums, kFinish };

// Launches `phase` on `stream`; returns the launch error, if any (cudaErrorInvalidValue for a
// (param, grad) dtype pair it has no kernels for).
cudaError_t masked_step(const LaunchArgs& args, Phase phase, double* sums, cudaStream_t stream);

}  // namespace fastmask_cuda
