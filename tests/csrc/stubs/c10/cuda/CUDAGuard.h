// Stand-in for torch's c10/cuda/CUDAGuard.h, which a CPU build of torch does not ship:
// just enough declarations to type-check the cuda backend's binding (never linked).
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
