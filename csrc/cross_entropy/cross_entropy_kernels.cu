// cross_entropy family: CUDA launchers (torch-free; compiled by nvcc for every arch in
// TOKENKERNELS_CUDA_ARCHS). Each returns the launch's cudaError_t; nothing here syncs the host.
#include <algorithm>
#include <cstdint>

#include "tokenkernels/cross_entropy.cuh"

namespace tokenkernels {
namespace cross_entropy {

namespace {
constexpr int kRowThreads = 256;   // plain tile kernels: one block per token row
constexpr int kFlatThreads = 256;  // one thread per token
size_t align_up(size_t v) { return (v + 255) / 256 * 256; }
unsigned blocks_for(int64_t n, int t) { return static_cast<unsigned>((n + t - 1) / t); }
}  // namespace

cudaError_t launch_fwd_tile(const float* Z, int64_t rows, int64_t cols, int64_t r0, int64_t v0,
                            const float* bias, float cap, const Targets& tg, const FwdState& st,
                            cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  device::fwd_tile_kernel<kRowThreads><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
      Z, cols, r0, v0, bias, cap, tg, st);
  return cudaGetLastError();
}

cudaError_t launch_finalize(int64_t N, const FwdState& st, const Targets& tg, float* lse,
                            float* ent, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  device::finalize_kernel<<<blocks_for(N, kFlatThreads), kFlatThreads, 0, stream>>>(N, st, tg,
                                                                                    lse, ent);
  return cudaGetLastError();
}

int64_t dz_keep_flags(int64_t rows, int64_t cols) {
  // sub-tile rows / columns any alignment of the tile can touch
  return ((rows + device::kBM - 1) / device::kBM + 1) * ((cols + device::kBN - 1) / device::kBN + 1);
}

cudaError_t launch_grad_scale(int64_t N, const float* cp, const float* ct, const float* c1,
                              float* scale, cudaStream_t stream) {
  device::grad_scale_kernel<kRowThreads><<<1, kRowThreads, 0, stream>>>(N, cp, ct, c1, scale);
  return cudaGetLastError();
}

namespace {
template <typename T>
cudaError_t dz_tile_typed(const float* Z, int64_t rows, int64_t cols, int64_t r0, int64_t v0,
                          const float* bias, float cap, const Targets& tg, const float* lse,
                          const float* cp, const float* ct, const float* c1, const float* gscale,
                          float filter_eps, unsigned* keep, T* dZ, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(rows);
  if (keep) {
    const int64_t nk = ((r0 + rows - 1) / device::kBM - r0 / device::kBM + 1) *
                       ((v0 + cols - 1) / device::kBN - v0 / device::kBN + 1);
    const cudaError_t e = cudaMemsetAsync(keep, 0, size_t(nk) * sizeof(unsigned), stream);
    if (e != cudaSuccess) return e;
  }
  device::dz_tile_kernel<T, kRowThreads><<<grid, kRowThreads, 0, stream>>>(
      Z, cols, r0, v0, bias, cap, tg, lse, cp, ct, c1, gscale, filter_eps, keep, dZ);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || !keep) return e;
  device::dz_filter_kernel<T, kRowThreads><<<grid, kRowThreads, 0, stream>>>(cols, r0, v0, keep, dZ);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_dz_tile(const float* Z, int64_t rows, int64_t cols, int64_t r0, int64_t v0,
                           const float* bias, float cap, const Targets& tg, const float* lse,
                           const float* cp, const float* ct, const float* c1, const float* gscale,
                           float filter_eps, unsigned* keep, void* dZ, DType out_dtype,
                           cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!(filter_eps > 0.f)) keep = nullptr;  // eps 0 drops only all-zero sub-tiles: exact anyway
  switch (out_dtype) {
    case DType::kFloat32:
      return dz_tile_typed(Z, rows, cols, r0, v0, bias, cap, tg, lse, cp, ct, c1, gscale,
                           filter_eps, keep, static_cast<float*>(dZ), stream);
    case DType::kFloat16:
      return dz_tile_typed(Z, rows, cols, r0, v0, bias, cap, tg, lse, cp, ct, c1, gscale,
                           filter_eps, keep, static_cast<__half*>(dZ), stream);
    case DType::kBFloat16:
      return dz_tile_typed(Z, rows, cols, r0, v0, bias, cap, tg, lse, cp, ct, c1, gscale,
                           filter_eps, keep, static_cast<__nv_bfloat16*>(dZ), stream);
  }
  return cudaErrorInvalidValue;
}

size_t fused_workspace_bytes(int64_t N, int splits) {
  return align_up(size_t(N) * splits * device::kPartFields * sizeof(float)) +
         align_up(size_t(N) * splits * sizeof(int64_t));
}

// Enough blocks for ~4 waves of the device's SMs, never more splits than vocabulary tiles.
cudaError_t fused_default_splits(int64_t N, int64_t V, int* splits) {
  int dev = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  sms = std::max(sms, 1);
  const int64_t row_tiles = std::max<int64_t>(1, (N + device::kBM - 1) / device::kBM);
  const int64_t vt = std::max<int64_t>(1, (V + device::kBN - 1) / device::kBN);
  const int64_t want = std::max<int64_t>(1, (4 * int64_t(sms) + row_tiles - 1) / row_tiles);
  *splits = static_cast<int>(std::min<int64_t>({want, vt, 4096}));
  return cudaSuccess;
}

bool fused_supported(const void* hidden, const void* weight, DType dtype, int64_t D) {
  return dtype != DType::kFloat32 && D > 0 && D % 8 == 0 && reinterpret_cast<uintptr_t>(hidden) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(weight) % 16 == 0;
}

cudaError_t launch_fwd_fused(const void* hidden, const void* weight, DType dtype, int64_t N,
                             int64_t D, const float* bias, float cap, const Targets& tg,
                             const FwdState& st, int splits, void* workspace,
                             cudaStream_t stream) {
  if (!fused_supported(hidden, weight, dtype, D)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const int64_t vt = (tg.V + device::kBN - 1) / device::kBN;
  splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(splits, vt)));
  const int64_t per = (vt + splits - 1) / splits;
  splits = static_cast<int>((vt + per - 1) / per);  // no empty splits
  float* part = static_cast<float*>(workspace);
  int64_t* part_idx = reinterpret_cast<int64_t*>(
      static_cast<char*>(workspace) + align_up(size_t(N) * splits * device::kPartFields * sizeof(float)));
  dim3 grid(blocks_for(N, device::kBM), static_cast<unsigned>(splits));
  if (dtype == DType::kFloat16) {
    device::fwd_fused_kernel<__half><<<grid, device::kFusedThreads, 0, stream>>>(
        static_cast<const __half*>(hidden), static_cast<const __half*>(weight), N, D, bias, cap,
        tg, per, splits, part, part_idx, st.zt);
  } else {
    device::fwd_fused_kernel<__nv_bfloat16><<<grid, device::kFusedThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(hidden), static_cast<const __nv_bfloat16*>(weight), N, D,
        bias, cap, tg, per, splits, part, part_idx, st.zt);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  device::fwd_merge_kernel<<<blocks_for(N, kFlatThreads), kFlatThreads, 0, stream>>>(
      N, splits, part, part_idx, st);
  return cudaGetLastError();
}

namespace {
template <typename T>
cudaError_t bwd_fused_typed(const T* h, const T* w, int64_t N, int64_t D, const float* bias,
                            float cap, const Targets& tg, const float* lse, const float* cp,
                            const float* ct, const float* c1, const float* gscale, float feps,
                            float* dH32,
                            float* dW32, float* db32, unsigned long long* skipped,
                            cudaStream_t stream) {
  auto kernel = device::bwd_fused_kernel<T>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       device::kSmemBwd);
  if (e != cudaSuccess) return e;
  dim3 grid(blocks_for(N, device::kBM), static_cast<unsigned>((tg.V + device::kBN - 1) / device::kBN));
  kernel<<<grid, device::kFusedThreads, device::kSmemBwd, stream>>>(
      h, w, N, D, bias, cap, tg, lse, cp, ct, c1, gscale, feps, dH32, dW32, db32, skipped);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_bwd_fused(const void* hidden, const void* weight, DType dtype, int64_t N,
                             int64_t D, const float* bias, float cap, const Targets& tg,
                             const float* lse, const float* cp, const float* ct, const float* c1,
                             const float* gscale, float filter_eps, float* dH32, float* dW32,
                             float* db32, unsigned long long* skipped, cudaStream_t stream) {
  if (!fused_supported(hidden, weight, dtype, D)) return cudaErrorInvalidValue;
  if (N == 0 || tg.V == 0) return cudaSuccess;
  if (dtype == DType::kFloat16)
    return bwd_fused_typed(static_cast<const __half*>(hidden), static_cast<const __half*>(weight),
                           N, D, bias, cap, tg, lse, cp, ct, c1, gscale, filter_eps, dH32, dW32,
                           db32, skipped, stream);
  return bwd_fused_typed(static_cast<const __nv_bfloat16*>(hidden),
                         static_cast<const __nv_bfloat16*>(weight), N, D, bias, cap, tg, lse, cp,
                         ct, c1, gscale, filter_eps, dH32, dW32, db32, skipped, stream);
}

}  // namespace cross_entropy
}  // namespace tokenkernels
