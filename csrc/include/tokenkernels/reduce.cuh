// Block-wide arg-max as a max over packed 64-bit keys: high 32 bits = the float value mapped to
// an order-preserving unsigned integer, low 32 bits = ~index, so the maximum key is the
// largest value and, among equal values, the lowest index (the project's tie rule).
#pragma once
#include <cstdint>

namespace tokenkernels {
namespace device {

__device__ __forceinline__ uint32_t float_to_ordered(float v) {
  uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float ordered_to_float(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}
__device__ __forceinline__ unsigned long long pack_argmax(float v, int64_t i) {
  return (static_cast<unsigned long long>(float_to_ordered(v)) << 32) |
         static_cast<unsigned long long>(~static_cast<uint32_t>(i));
}
__device__ __forceinline__ float packed_value(unsigned long long key) {
  return ordered_to_float(static_cast<uint32_t>(key >> 32));
}
__device__ __forceinline__ int64_t packed_index(unsigned long long key) {
  return static_cast<int64_t>(~static_cast<uint32_t>(key & 0xffffffffull));
}
// Smallest key: -inf at the largest index; used as the identity of the max.
constexpr unsigned long long kPackedMin = 0ull;

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    unsigned long long o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Max over the block; every thread gets the result. `smem` holds >= 32 entries. Contains
// __syncthreads(): call from all threads of the block.
__device__ __forceinline__ unsigned long long block_max_u64(unsigned long long v,
                                                            unsigned long long* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_max_u64(v);
  __syncthreads();                 // smem may still be read from a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : kPackedMin;
  v = warp_max_u64(v);             // every warp reduces the partials itself: no third barrier
  return v;
}

// Same, with a single barrier: the caller alternates between two `smem` buffers on
// consecutive calls (a warp can only overwrite a buffer after every warp has passed the
// barrier of the call in between, hence after they all finished reading it).
__device__ __forceinline__ unsigned long long block_max_u64_db(unsigned long long v,
                                                               unsigned long long* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_max_u64(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : kPackedMin;
  return warp_max_u64(v);
}

__device__ __forceinline__ float warp_min_f(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum_f(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace device
}  // namespace tokenkernels
