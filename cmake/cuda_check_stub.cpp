// Only for the GPU-less CUDA compile-and-link check (target tokenkernels_cuda_check).
// A CPU torch has no libtorch_cuda, which is where this C shim lives in a CUDA torch; the stub
// lets the check link with --no-undefined so every *other* symbol is proven to resolve.
// It is never part of the _C module.
#include <cstdint>
extern "C" __attribute__((visibility("default"))) int32_t
aoti_torch_get_current_cuda_stream(int32_t /*device_index*/, void** ret_stream) {
  *ret_stream = nullptr;
  return 1;  // AOTI_TORCH_FAILURE: the check library is never loaded into a process anyway.
}
