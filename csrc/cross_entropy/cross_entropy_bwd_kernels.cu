// cross_entropy family, impl="tuned" backward: launcher of the recompute kernel
// (cross_entropy_bwd.cuh; torch-free, compiled by nvcc for every arch in
// TOKENKERNELS_CUDA_ARCHS). Returns the launch's cudaError_t; nothing here syncs the host or
// allocates (the dZ chunk buffer and the mask come from the adapter).
#include <cstdint>

#include "tokenkernels/cross_entropy_bwd.cuh"

namespace tokenkernels {
namespace cross_entropy {
namespace bwd {

namespace {
template <typename T>
cudaError_t launch_typed(const ChunkArgs& a, cudaStream_t stream) {
  using C = device::Cfg<T>;
  auto kernel = device::ce_bwd_dz_tc_kernel<T>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       C::kSmemBytes);
  if (e != cudaSuccess) return e;
  const int64_t row_tiles = ceil_div(a.N, kTileM);
  const int64_t col_tiles = ceil_div(a.cols, kTileN);
  if (row_tiles > 0x7fffffff || col_tiles > kMaxColTiles) return cudaErrorInvalidValue;
  dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  kernel<<<grid, kThreads, C::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}
}  // namespace

size_t chunk_smem_bytes() { return device::Cfg<cute::bfloat16_t>::kSmemBytes; }

cudaError_t launch_bwd_chunk(const ChunkArgs& a, DType dtype, cudaStream_t stream) {
  if (!fused_supported(a.hidden, a.weight, dtype, a.D)) return cudaErrorInvalidValue;
  if (a.N == 0 || a.cols <= 0) return cudaSuccess;
  // the kernel's 16-byte dZ stores cover whole tiles: the row pitch must hold them
  if (a.ld % 8 != 0 || a.ld < ceil_div(a.cols, kTileN) * kTileN ||
      reinterpret_cast<uintptr_t>(a.dZ) % 16 != 0 || a.v0 < 0 || a.v0 + a.cols > a.tg.V)
    return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16) return launch_typed<cute::half_t>(a, stream);
  return launch_typed<cute::bfloat16_t>(a, stream);
}

}  // namespace bwd
}  // namespace cross_entropy
}  // namespace tokenkernels
