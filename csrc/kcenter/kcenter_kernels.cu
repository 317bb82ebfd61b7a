// kcenter family: CUDA launchers (torch-free; compiled by nvcc for every arch in
// TOKENKERNELS_CUDA_ARCHS). Each returns the launch's cudaError_t; nothing here syncs the host.
#include <algorithm>

#include "tokenkernels/kcenter.cuh"

namespace tokenkernels {
namespace kcenter {

namespace {
constexpr int kRowThreads = 256;          // nn_keys: 8 warps = 8 rows per block
constexpr int kGreedyThreads = 1024;      // one block per item
constexpr int kStreamThreads = 256;       // 8 warps
constexpr int kStreamTokensPerBlock = 64; // 8 tokens per warp per step
constexpr int kCoverageThreads = 512;
// gridDim.y (and z) is limited to 65535: kernels that put items on y are launched once per
// chunk of at most this many items (with the chunk's first item b0), so any B works.
constexpr int64_t kMaxGridY = 65535;

int64_t stream_blocks(int64_t N) { return (N + kStreamTokensPerBlock - 1) / kStreamTokensPerBlock; }
size_t align_up(size_t v) { return (v + 255) / 256 * 256; }
}  // namespace

cudaError_t launch_nn_keys(const Problem& p, const float* gram, int64_t row0, int64_t rows,
                           int64_t ld, int64_t batch_stride, float* nn_key, cudaStream_t stream) {
  if (p.B == 0 || rows == 0) return cudaSuccess;
  const int warps = kRowThreads / 32;
  for (int64_t b0 = 0; b0 < p.B; b0 += kMaxGridY) {
    dim3 grid(static_cast<unsigned>((rows + warps - 1) / warps),
              static_cast<unsigned>(std::min(kMaxGridY, p.B - b0)));
    device::nn_keys_kernel<<<grid, kRowThreads, 0, stream>>>(p, gram, row0, rows, ld,
                                                              batch_stride, nn_key, b0);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t launch_greedy_gram(const Problem& p, const float* gram, const float* nn_key,
                               const int64_t* start, int64_t k, const int64_t* k_per_item,
                               int64_t* idx, float* radii, float* scratch, Impl impl,
                               cudaStream_t stream) {
  if (impl == Impl::Stream) return cudaErrorInvalidValue;   // not a Gram variant
  if (p.B == 0 || k == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(p.B);
  // Plain: global-memory running minimum. Simt, Auto and Tuned (whose own kernels, kcenter_tuned.cuh,
  // take fp16 / bf16 with N <= 8192; fp32 and larger N come here): registers while N <= 8192 tokens
  // (16 tokens per thread spills), Plain beyond.
  const bool tuned = (impl == Impl::Simt || impl == Impl::Tuned || impl == Impl::Auto) && p.N <= 8 * kGreedyThreads;
  if (!tuned) {
    device::greedy_gram_plain_kernel<<<grid, kGreedyThreads, 0, stream>>>(
        p, gram, nn_key, start, k, k_per_item, idx, radii, scratch);
    return cudaGetLastError();
  }
  // Tokens per thread: the smallest power of two with N <= ITEMS * 1024. With one token per
  // thread, launch only as many warps as there are tokens.
  const int threads1 = static_cast<int>(std::max<int64_t>(32, (p.N + 31) / 32 * 32));
  if (p.N <= kGreedyThreads)
    device::greedy_gram_reg_kernel<1><<<grid, threads1, 0, stream>>>(p, gram, nn_key, start, k, k_per_item, idx, radii);
  else if (p.N <= 2 * kGreedyThreads)
    device::greedy_gram_reg_kernel<2><<<grid, kGreedyThreads, 0, stream>>>(p, gram, nn_key, start, k, k_per_item, idx, radii);
  else if (p.N <= 4 * kGreedyThreads)
    device::greedy_gram_reg_kernel<4><<<grid, kGreedyThreads, 0, stream>>>(p, gram, nn_key, start, k, k_per_item, idx, radii);
  else
    device::greedy_gram_reg_kernel<8><<<grid, kGreedyThreads, 0, stream>>>(p, gram, nn_key, start, k, k_per_item, idx, radii);
  return cudaGetLastError();
}

size_t streaming_workspace_bytes(int64_t B, int64_t N) {
  const int64_t nblk = stream_blocks(N);
  return align_up(sizeof(float) * B * N) + align_up(sizeof(unsigned long long) * B * nblk) +
         align_up(sizeof(unsigned int) * B) + align_up(sizeof(int64_t) * B);
}

cudaError_t launch_greedy_streaming(const Problem& p, const void* x, DType dtype, int64_t D,
                                    const float* nn_key, const int64_t* start, int64_t k,
                                    const int64_t* k_per_item, int64_t* idx, float* radii,
                                    void* workspace, cudaStream_t stream) {
  if (p.B == 0 || k == 0) return cudaSuccess;
  device::StreamState ws;
  ws.nblk = stream_blocks(p.N);
  char* base = static_cast<char*>(workspace);
  ws.mind = reinterpret_cast<float*>(base);
  base += align_up(sizeof(float) * p.B * p.N);
  ws.partial = reinterpret_cast<unsigned long long*>(base);
  base += align_up(sizeof(unsigned long long) * p.B * ws.nblk);
  ws.counter = reinterpret_cast<unsigned int*>(base);
  base += align_up(sizeof(unsigned int) * p.B);
  ws.pick = reinterpret_cast<int64_t*>(base);

  device::stream_init_kernel<<<static_cast<unsigned>(p.B), kGreedyThreads, 0, stream>>>(
      p, nn_key, start, k, k_per_item, idx, radii, ws);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  // N = 0: the init padded every output and there is nothing to pick (and no block to launch).
  if (ws.nblk == 0) return cudaSuccess;
  for (int64_t s = 1; s < k; ++s) {   // one launch per pick; the picks stay on the device
    for (int64_t b0 = 0; b0 < p.B; b0 += kMaxGridY) {
      dim3 grid(static_cast<unsigned>(ws.nblk),
                static_cast<unsigned>(std::min(kMaxGridY, p.B - b0)));
      switch (dtype) {
        case DType::kFloat32:
          device::stream_step_kernel<float><<<grid, kStreamThreads, 0, stream>>>(
              p, static_cast<const float*>(x), D, s, k, k_per_item, idx, radii, ws,
              kStreamTokensPerBlock, b0);
          break;
        case DType::kFloat16:
          device::stream_step_kernel<__half><<<grid, kStreamThreads, 0, stream>>>(
              p, static_cast<const __half*>(x), D, s, k, k_per_item, idx, radii, ws,
              kStreamTokensPerBlock, b0);
          break;
        case DType::kBFloat16:
          device::stream_step_kernel<__nv_bfloat16><<<grid, kStreamThreads, 0, stream>>>(
              p, static_cast<const __nv_bfloat16*>(x), D, s, k, k_per_item, idx, radii, ws,
              kStreamTokensPerBlock, b0);
          break;
      }
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
  }
  return cudaSuccess;
}

cudaError_t launch_coverage(const float* sim, int64_t B, int64_t M, int64_t N,
                            const int64_t* row_lengths, const int64_t* lengths,
                            const bool* exclude, int64_t k, const int64_t* k_per_item,
                            int64_t* idx, float* gains, float* scratch, cudaStream_t stream) {
  if (B == 0 || k == 0) return cudaSuccess;
  device::coverage_kernel<<<static_cast<unsigned>(B), kCoverageThreads, 0, stream>>>(
      sim, M, N, row_lengths, lengths, exclude, k, k_per_item, idx, gains, scratch);
  return cudaGetLastError();
}

}  // namespace kcenter
}  // namespace tokenkernels
