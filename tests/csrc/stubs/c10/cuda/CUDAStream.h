// Stand-in for torch's c10/cuda/CUDAStream.h (see CUDAGuard.h beside it).
#pragma once
#include <cuda_runtime.h>

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
