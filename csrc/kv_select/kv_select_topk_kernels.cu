// kv_select radix top-k (impl="tuned"): the launcher (torch-free; nvcc, every arch of
// TOKENKERNELS_CUDA_ARCHS). Device code: tokenkernels/radix_topk.cuh; the plan and workspace
// layout: tokenkernels/radix_topk.h. Nothing here syncs the host.
#include <atomic>
#include <cstdint>

#include "tokenkernels/radix_topk.cuh"

namespace tokenkernels {
namespace kv_select {
namespace {

// The emit kernel's dynamic shared memory may exceed the 48 KiB default: raise its limit to the
// largest plan's (8 * kRadixSmemCap bytes) once per device (a host-side attribute, no sync; once,
// so that later launches -- e.g. under CUDA-graph capture -- make no such call).
cudaError_t allow_emit_smem() {
  static std::atomic<unsigned long long> done{0};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const unsigned long long bit = dev < 64 ? 1ull << dev : 0ull;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  e = cudaFuncSetAttribute(radix_device::radix_topk_emit_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(8 * kRadixSmemCap));
  if (e == cudaSuccess && bit) done.fetch_or(bit, std::memory_order_acq_rel);
  return e;
}

}  // namespace

cudaError_t launch_topk_radix(const float* scores, int64_t B, int64_t N_max, int64_t ld,
                              const int32_t* seq_lens, int64_t k, int64_t n_sink, int64_t n_local,
                              const int32_t* reuse, const bool* reuse_mask, int32_t* out,
                              const RadixTopkPlan& plan, void* workspace, cudaStream_t stream) {
  if (B == 0 || n_sink + k + n_local == 0) return cudaSuccess;
  if (N_max > INT32_MAX || B > INT32_MAX || plan.splits < 1 || plan.splits > kRadixMaxSplits ||
      plan.splits > 65535 || plan.chunk < 4 || plan.chunk % 4 != 0 || plan.splits * plan.chunk < N_max ||
      plan.cap < 1 || plan.cap > kRadixSmemCap)
    return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  unsigned* ghist = reinterpret_cast<unsigned*>(base);
  unsigned* arrive = reinterpret_cast<unsigned*>(base + radix_align(8 * B * kRadixBins));
  int* seg_count = reinterpret_cast<int*>(base + radix_zeroed_bytes(B));
  uint2* segs = reinterpret_cast<uint2*>(base + radix_zeroed_bytes(B) + radix_align(4 * B * plan.splits));
  // 16-byte loads need a 16-byte aligned row start for every row
  const bool vec = reinterpret_cast<uintptr_t>(scores) % 16 == 0 && ld % 4 == 0;
  cudaError_t e = cudaMemsetAsync(workspace, 0, static_cast<size_t>(radix_zeroed_bytes(B)), stream);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(plan.splits));
  radix_device::radix_topk_hist_kernel<<<grid, kRadixThreads, 0, stream>>>(
      scores, N_max, ld, seq_lens, k, n_sink, n_local, reuse_mask, plan, vec, ghist);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int smem = static_cast<int>(radix_dynamic_smem_bytes(plan));
  if (smem > 48 * 1024) {
    e = allow_emit_smem();
    if (e != cudaSuccess) return e;
  }
  radix_device::radix_topk_emit_kernel<<<grid, kRadixThreads, smem, stream>>>(
      scores, N_max, ld, seq_lens, k, n_sink, n_local, reuse, reuse_mask, plan, vec, ghist, arrive, seg_count,
      segs, out);
  return cudaGetLastError();
}

}  // namespace kv_select
}  // namespace tokenkernels
