#include "cuda_glue.h"

#include <c10/util/Exception.h>

#include <cstdint>

// From torch/csrc/inductor/aoti_torch/c/shim.h (declared there only under USE_CUDA, which the
// CPU wheel's headers cannot satisfy). Returns 0 on success.
extern "C" int32_t aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);

namespace tokenkernels {

cudaStream_t current_cuda_stream(const at::Device& device) {
  TORCH_CHECK(device.is_cuda(), "tokenkernels: expected a CUDA device, got ", device);
  void* stream = nullptr;
  const int32_t err = aoti_torch_get_current_cuda_stream(device.index(), &stream);
  TORCH_CHECK(err == 0, "tokenkernels: could not get the current CUDA stream of ", device);
  return static_cast<cudaStream_t>(stream);
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "tokenkernels: CUDA error in ", what, ": ",
              cudaGetErrorString(err));
}

}  // namespace tokenkernels
