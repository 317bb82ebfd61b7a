// tree family: CUDA launchers (torch-free; compiled by nvcc for every arch in
// TOKENKERNELS_CUDA_ARCHS). Each returns the launch's cudaError_t; nothing here syncs the host.
#include <algorithm>

#include "tokenkernels/attn_core.h"
#include "tokenkernels/tree.cuh"

namespace tokenkernels {
namespace tree {

namespace {
constexpr int kWarpsPerRowBlock = 4;   // plain prefix / tree-merge kernels: 128 threads
constexpr int kTunedRows = 32;         // prefix_tuned_kernel: rows per block
constexpr int64_t kMinChunk = 256;     // fewest prefix keys per split
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMaxGridX = 2147483647;   // gridDim.x limit (y and z stop at 65535)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

// Launch `blocks` blocks along x in chunks of at most kMaxGridX; launch(block0, count) issues
// one chunk whose kernel adds block0 to blockIdx.x.
template <typename F>
cudaError_t launch_x_chunks(int64_t blocks, F&& launch) {
  for (int64_t b0 = 0; b0 < blocks; b0 += kMaxGridX) {
    launch(b0, static_cast<unsigned>(std::min(kMaxGridX, blocks - b0)));
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 108;
  return sms > 0 ? sms : 108;
}
}  // namespace

cudaError_t launch_build(const int64_t* parents, const int64_t* lens, int64_t B, int64_t n, int32_t* mask,
                         int64_t* depth, int64_t* first_child, int64_t* next_sibling, Impl impl,
                         cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;
  if (n > kMaxCudaNodes || B > kMaxGridX) return cudaErrorInvalidValue;
  int npow2 = 2;
  while (npow2 < n) npow2 <<= 1;
  const bool sorted = resolve_impl(impl) == Impl::Simt;
  const size_t smem = sizeof(int) * (2 * n + (sorted ? npow2 : 0));
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, ceil_div(n, 32) * 32)));
  auto* m = reinterpret_cast<uint32_t*>(mask);
  if (sorted) {
    if (smem > 48 * 1024) {
      cudaError_t e = cudaFuncSetAttribute(device::build_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    device::build_kernel<true><<<static_cast<unsigned>(B), threads, smem, stream>>>(
        parents, lens, n, npow2, m, depth, first_child, next_sibling);
  } else {
    device::build_kernel<false><<<static_cast<unsigned>(B), threads, smem, stream>>>(
        parents, lens, n, npow2, m, depth, first_child, next_sibling);
  }
  return cudaGetLastError();
}

cudaError_t launch_paths(const int64_t* parents, const int64_t* depth, const int64_t* first_child,
                         const int64_t* lens, int64_t B, int64_t n, int64_t L_max, int64_t D_max, int64_t* paths,
                         cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (B > kMaxGridX) return cudaErrorInvalidValue;
  device::paths_kernel<<<static_cast<unsigned>(B), 256, 0, stream>>>(parents, depth, first_child, lens, n, L_max,
                                                                      D_max, paths);
  return cudaGetLastError();
}

int64_t attention_splits(const AttnProblem& p) {
  if (p.max_prefix <= 0) return 0;
  // enough blocks to fill the GPU about twice, each split at least kMinChunk keys
  const int64_t row_blocks = p.B * p.Hkv * ceil_div(p.n * (p.Hq / p.Hkv), kTunedRows);
  const int64_t want = std::max<int64_t>(1, ceil_div(2 * num_sms(), row_blocks));
  return std::max<int64_t>(1, std::min({want, ceil_div(p.max_prefix, kMinChunk), kMaxSplits}));
}

size_t attention_workspace_bytes(const AttnProblem& p, Impl impl) {
  if (impl == Impl::Tuned && attn::tree_supported(p)) return std::max<size_t>(attn::tree_plan(p).ws_total, 256);
  const int64_t S = attention_splits(p);
  const int64_t rows = S * p.B * p.n * p.Hq;
  return align_up(sizeof(float) * rows * p.D) + align_up(sizeof(float) * rows) + 256;
}

namespace {
template <typename T, int DL>
cudaError_t attention_typed(const AttnProblem& p, Impl impl, void* workspace, cudaStream_t stream) {
  const int64_t S = attention_splits(p);
  const int64_t rows = S * p.B * p.n * p.Hq;
  char* base = static_cast<char*>(workspace);
  float* part_o = reinterpret_cast<float*>(base);
  float* part_lse = reinterpret_cast<float*>(base + align_up(sizeof(float) * rows * p.D));
  const int64_t chunk = S > 0 ? ceil_div(p.max_prefix, S) : 0;
  // (request [, KV head], row block) flattened on x: any B (y = the split, <= kMaxSplits)
  const int64_t row_blocks = ceil_div(p.n * p.Hq, kWarpsPerRowBlock);   // plain prefix, merge
  if (S > 0) {
    cudaError_t e;
    if (resolve_impl(impl) == Impl::Plain) {
      e = launch_x_chunks(p.B * row_blocks, [&](int64_t b0, unsigned nx) {
        device::prefix_plain_kernel<T, DL><<<dim3(nx, static_cast<unsigned>(S)), 32 * kWarpsPerRowBlock, 0,
                                              stream>>>(p, chunk, b0, part_o, part_lse);
      });
    } else {
      const int64_t tuned_blocks = ceil_div(p.n * (p.Hq / p.Hkv), kTunedRows);
      e = launch_x_chunks(p.B * p.Hkv * tuned_blocks, [&](int64_t b0, unsigned nx) {
        device::prefix_tuned_kernel<T, DL><<<dim3(nx, static_cast<unsigned>(S)), 256, 0, stream>>>(
            p, chunk, b0, part_o, part_lse);
      });
    }
    if (e != cudaSuccess) return e;
  }
  return launch_x_chunks(p.B * row_blocks, [&](int64_t b0, unsigned nx) {
    device::tree_merge_kernel<T, DL><<<nx, 32 * kWarpsPerRowBlock, 0, stream>>>(p, S, b0, part_o, part_lse);
  });
}

template <typename T>
cudaError_t attention_dl(const AttnProblem& p, Impl impl, void* ws, cudaStream_t stream) {
  switch (p.D) {
    case 32: return attention_typed<T, 1>(p, impl, ws, stream);
    case 64: return attention_typed<T, 2>(p, impl, ws, stream);
    case 96: return attention_typed<T, 3>(p, impl, ws, stream);
    case 128: return attention_typed<T, 4>(p, impl, ws, stream);
    case 160: return attention_typed<T, 5>(p, impl, ws, stream);
    case 192: return attention_typed<T, 6>(p, impl, ws, stream);
    case 224: return attention_typed<T, 7>(p, impl, ws, stream);
    case 256: return attention_typed<T, 8>(p, impl, ws, stream);
    default: return cudaErrorInvalidValue;   // the adapter checks D % 32 == 0 && D <= 256
  }
}
}  // namespace

cudaError_t launch_attention(const AttnProblem& p, Impl impl, void* workspace, cudaStream_t stream) {
  if (p.B == 0 || p.n == 0 || p.Hq == 0) return cudaSuccess;
  // tuned: the tensor-core core where it applies (fp16 / bf16, D 64 / 128, aligned), else simt
  if (impl == Impl::Tuned && attn::tree_supported(p)) return attn::launch_tree(p, workspace, stream);
  switch (p.dtype) {
    case DType::kFloat32: return attention_dl<float>(p, impl, workspace, stream);
    case DType::kFloat16: return attention_dl<__half>(p, impl, workspace, stream);
    case DType::kBFloat16: return attention_dl<__nv_bfloat16>(p, impl, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_verify_greedy(const int64_t* first_child, const int64_t* next_sibling,
                                 const int64_t* draft_tokens, const int64_t* target_argmax, int64_t B, int64_t n,
                                 int64_t max_depth, int64_t* accepted, int64_t* accept_len, int64_t* bonus,
                                 cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  device::verify_greedy_kernel<<<static_cast<unsigned>(ceil_div(B, 128)), 128, 0, stream>>>(
      first_child, next_sibling, draft_tokens, target_argmax, B, n, max_depth, accepted, accept_len, bonus);
  return cudaGetLastError();
}

cudaError_t launch_verify_sampling(const int64_t* first_child, const int64_t* next_sibling,
                                   const int64_t* draft_tokens, const void* target_probs, const void* draft_probs,
                                   bool probs_fp64, const double* coins, const double* bonus_u, int64_t B, int64_t n,
                                   int64_t V, int64_t max_depth, VerifyMode mode, int64_t* accepted,
                                   int64_t* accept_len, int64_t* bonus, double* workspace, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (B > kMaxGridX) return cudaErrorInvalidValue;
  // RSD with draft_probs: the draft residuals in the second half of the workspace (tree.h)
  const bool rsd = mode == VerifyMode::Rsd && draft_probs != nullptr;
  double* qwork = rsd ? workspace + B * V : nullptr;
  if (probs_fp64)
    device::verify_sampling_kernel<double><<<static_cast<unsigned>(B), 256, 0, stream>>>(
        first_child, next_sibling, draft_tokens, static_cast<const double*>(target_probs),
        static_cast<const double*>(draft_probs), coins, bonus_u, n, V, max_depth, accepted, accept_len, bonus,
        workspace, qwork);
  else
    device::verify_sampling_kernel<float><<<static_cast<unsigned>(B), 256, 0, stream>>>(
        first_child, next_sibling, draft_tokens, static_cast<const float*>(target_probs),
        static_cast<const float*>(draft_probs), coins, bonus_u, n, V, max_depth, accepted, accept_len, bonus,
        workspace, qwork);
  return cudaGetLastError();
}

cudaError_t launch_select_frontier(const float* cum, const float* child, int64_t B, int64_t F, int64_t K, int64_t m,
                                   int64_t* parent, int64_t* rank, float* score, cudaStream_t stream) {
  if (B == 0 || m == 0) return cudaSuccess;
  if (F * K > kMaxCudaNodes || B > kMaxGridX) return cudaErrorInvalidValue;
  device::select_frontier_kernel<<<static_cast<unsigned>(B), 256, sizeof(float) * F * K, stream>>>(
      cum, child, F, K, m, parent, rank, score);
  return cudaGetLastError();
}

cudaError_t launch_select_tree(const float* cum, const int64_t* parents, int64_t B, int64_t T, int64_t n,
                               int64_t* idx, int64_t* new_parents, float* score, cudaStream_t stream) {
  if (B == 0 || n == 0) return cudaSuccess;
  if (T > kMaxCudaNodes || B > kMaxGridX) return cudaErrorInvalidValue;   // 16 nodes per thread of 256
  device::select_tree_kernel<<<static_cast<unsigned>(B), 256, (sizeof(float) + sizeof(int)) * T, stream>>>(
      cum, parents, T, n, idx, new_parents, score);
  return cudaGetLastError();
}

}  // namespace tree
}  // namespace tokenkernels
