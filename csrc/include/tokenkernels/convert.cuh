// Element conversions shared by the CUDA kernels of every family: to_f(x) reads fp32/fp16/bf16
// as fp32, from_f<T>(v) rounds fp32 to T (round to nearest even).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tokenkernels {
namespace device {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace device
}  // namespace tokenkernels
