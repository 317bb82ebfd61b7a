// The only CUDA-specific torch glue in tokenkernels. It compiles against both the CPU torch
// wheel's headers (which lack c10/cuda/impl/cuda_cmake_macros.h and the cuBLAS/cuSPARSE
// headers, so ATen/cuda/CUDAContext.h and c10/cuda/* are off limits) and a CUDA torch:
//   * the current stream comes from the stable C shim aoti_torch_get_current_cuda_stream
//     (defined in libtorch_cuda), declared here ourselves;
//   * device selection uses c10's generic DeviceGuard (CUDA's impl is registered at runtime).
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <cuda_runtime_api.h>

namespace tokenkernels {

// The current CUDA stream of `device` (what torch would launch on).
cudaStream_t current_cuda_stream(const at::Device& device);

// Raise a torch error naming the kernel when a launch (or launcher) failed.
void check_cuda(cudaError_t err, const char* what);

template <typename T>
inline const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace tokenkernels
