// kcenter family, impl="tuned": launcher of the symmetric tensor-core Gram and the register
// greedy (device code: tokenkernels/kcenter_tuned.cuh; plan: tokenkernels/kcenter_tuned.h).
// Torch-free; returns the first failing launch's cudaError_t; never syncs the host.
#include <algorithm>
#include <atomic>

#include "tokenkernels/kcenter_tuned.cuh"

namespace tokenkernels {
namespace kcenter {

namespace {
constexpr int64_t kMaxGridY = 65535;   // gridDim.y limit: items go in chunks
constexpr int kMaxDevices = 64;

template <int BT, typename T>
cudaError_t launch_gram(const Problem& p, const T* x, const tuned::Plan& plan, float* keys,
                        uint32_t* nn, cudaStream_t stream) {
  using G = tuned::GramGeom<BT>;
  auto kern = device::tuned_impl::kc_gram_tc_kernel<BT, T>;
  // The dynamic shared-memory opt-in, once per device and instantiation (idempotent, so racing
  // threads may both set it).
  static std::atomic<bool> opted_in[kMaxDevices];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= kMaxDevices || !opted_in[dev].load(std::memory_order_acquire)) {
    e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, G::kSmemBytes);
    if (e != cudaSuccess) return e;
    if (dev >= 0 && dev < kMaxDevices) opted_in[dev].store(true, std::memory_order_release);
  }
  for (int64_t b0 = 0; b0 < p.B; b0 += kMaxGridY) {
    const dim3 grid(static_cast<unsigned>(plan.tiles_per_item),
                    static_cast<unsigned>(std::min(kMaxGridY, p.B - b0)));
    kern<<<grid, G::kThreads, G::kSmemBytes, stream>>>(p, x, plan.d_pad, plan.tiles_1d, keys, plan.ld,
                                                       nn, b0);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_gram_t(const Problem& p, const void* x, const tuned::Plan& plan, float* keys,
                          uint32_t* nn, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  return plan.tile == 128 ? launch_gram<128, T>(p, xt, plan, keys, nn, stream)
                          : launch_gram<64, T>(p, xt, plan, keys, nn, stream);
}
}  // namespace

cudaError_t launch_kcenter_tuned(const Problem& p, const void* x, DType dtype,
                                 const tuned::Plan& plan, const int64_t* start, int64_t k,
                                 const int64_t* k_per_item, int64_t* idx, float* radii,
                                 void* workspace, cudaStream_t stream) {
  if (!plan.ok || dtype == DType::kFloat32 || (plan.tile != 64 && plan.tile != 128) ||
      (reinterpret_cast<uintptr_t>(x) & 15) || (reinterpret_cast<uintptr_t>(workspace) & 255))
    return cudaErrorInvalidValue;
  if (p.B == 0 || k == 0) return cudaSuccess;
  char* ws = static_cast<char*>(workspace);
  float* keys = reinterpret_cast<float*>(ws + plan.key_offset);
  uint32_t* nn = start ? nullptr : reinterpret_cast<uint32_t*>(ws + plan.nn_offset);
  cudaError_t e;
  if (nn) {   // every nearest-neighbour accumulator at kNnInit (0xffffffff)
    e = cudaMemsetAsync(nn, 0xff, sizeof(uint32_t) * p.B * p.N, stream);
    if (e != cudaSuccess) return e;
  }
  e = dtype == DType::kBFloat16 ? launch_gram_t<__nv_bfloat16>(p, x, plan, keys, nn, stream)
                                : launch_gram_t<__half>(p, x, plan, keys, nn, stream);
  if (e != cudaSuccess) return e;
  for (int64_t b0 = 0; b0 < p.B; b0 += int64_t(1) << 30) {   // gridDim.x: 2^31 - 1
    const unsigned items = static_cast<unsigned>(std::min<int64_t>(int64_t(1) << 30, p.B - b0));
    if (plan.greedy_items == 4)
      device::tuned_impl::kc_greedy_tuned_kernel<4><<<items, plan.greedy_threads, 0, stream>>>(
          p, keys, plan.ld, nn, start, k, k_per_item, idx, radii, b0);
    else
      device::tuned_impl::kc_greedy_tuned_kernel<8><<<items, plan.greedy_threads, 0, stream>>>(
          p, keys, plan.ld, nn, start, k, k_per_item, idx, radii, b0);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace kcenter
}  // namespace tokenkernels
