// Torch-free helpers shared by CPU (.cpp) and CUDA (.cu) code.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TK_HD __host__ __device__ __forceinline__
#else
#define TK_HD inline
#endif

namespace tokenkernels {

// Element types the kernels accept. The launcher declarations use this tag with `const void*`
// so that code compiled by the host compiler never needs cuda_fp16.h / cuda_bf16.h.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// "a beats b" for arg-max with ties broken towards the lowest index.
TK_HD bool argmax_better(float va, int64_t ia, float vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

}  // namespace tokenkernels
