// kv_select family: CUDA launchers (torch-free; compiled by nvcc for every arch in
// TOKENKERNELS_CUDA_ARCHS). Each returns the first launch error; nothing here syncs the host.
#include <algorithm>
#include <cstdint>

#include "tokenkernels/kv_select.cuh"
#include "tokenkernels/kv_select_score.h"

namespace tokenkernels {
namespace kv_select {

namespace {
size_t align_up(size_t v) { return (v + 255) / 256 * 256; }
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(T{}) with the CUDA element type of `dtype`.
template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// The tuned scoring kernel's requirements: unit stride on D, 16-byte vectors that tile a row
// with a power-of-two number (<= 32) of lanes, and every row start 16-byte aligned.
bool score_tuned_ok(const KVLayout& L, const void* k, const CacheStrides& ks, size_t elt) {
  const int64_t vec = 16 / static_cast<int64_t>(elt);
  if (ks.dim != 1 || L.D % vec != 0) return false;
  const int64_t r = L.D / vec;
  if (r < 1 || r > 32 || (r & (r - 1)) != 0) return false;
  if (reinterpret_cast<uintptr_t>(k) % 16 != 0) return false;
  return ks.head % vec == 0 && ks.slot % vec == 0 && ks.page % vec == 0;
}

bool limits_ok(const KVLayout& L, int64_t H_q) {
  return L.D > 0 && L.D <= kCudaMaxHeadDim && L.H_kv > 0 && H_q % L.H_kv == 0 &&
         H_q / L.H_kv <= kCudaMaxGroup;
}
}  // namespace

// ---------------------------------------------------------------------------------- score
size_t score_workspace_bytes(int64_t B, int64_t H_q, int64_t N_max) {
  const int64_t nblk = std::max<int64_t>(1, cdiv(N_max, device::kScoreTok));
  return align_up(sizeof(float) * B * H_q * N_max) + align_up(sizeof(float2) * B * H_q * nblk) +
         align_up(sizeof(float2) * B * H_q);
}

cudaError_t launch_score(const KVLayout& L, const void* k, CacheStrides ks, DType dtype,
                         const float* q, int64_t H_q, const bool* skip, const bool* valid,
                         float* out, void* workspace, Impl impl, cudaStream_t stream) {
  if (L.B == 0 || L.N_max == 0) return cudaSuccess;
  if (!limits_ok(L, H_q) || L.B > 65535) return cudaErrorInvalidValue;   // B is grid.y
  if (impl == Impl::Tuned) {   // the bandwidth-bound kernels (kv_select_score_kernels.cu) ...
    const cudaError_t t = launch_score_tuned(L, k, ks, dtype, q, H_q, skip, valid, out, workspace,
                                             score_workspace_bytes(L.B, H_q, L.N_max), stream);
    if (t != cudaErrorNotSupported) return t;   // ... else (fp32 K, unsupported shape) the simt path
  }
  const int64_t nblk = cdiv(L.N_max, device::kScoreTok);
  char* base = static_cast<char*>(workspace);
  float* logits = reinterpret_cast<float*>(base);
  base += align_up(sizeof(float) * L.B * H_q * L.N_max);
  float2* pstat = reinterpret_cast<float2*>(base);
  base += align_up(sizeof(float2) * L.B * H_q * nblk);
  float2* stat = reinterpret_cast<float2*>(base);   // per (b, h): softmax max and sum

  const size_t smem = sizeof(float) * static_cast<size_t>(H_q * L.D + device::kScoreTok * H_q);
  const dim3 grid1(static_cast<unsigned>(nblk), static_cast<unsigned>(L.B));
  cudaError_t e = with_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    auto kernel = device::score_logits_kernel<T>;
    bool tuned = false;
    switch (impl) {
      case Impl::Plain: tuned = false; break;
      case Impl::Auto:
      case Impl::Simt:
      case Impl::Tuned: tuned = score_tuned_ok(L, k, ks, sizeof(T)); break;   // else Plain
    }
    if (tuned) kernel = device::score_logits_tuned_kernel<T>;
    if (smem > 48 * 1024) {   // opt in to large dynamic shared memory (many heads x wide heads)
      cudaError_t a = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
      if (a != cudaSuccess) return a;
    }
    kernel<<<grid1, device::kScoreThreads, smem, stream>>>(L, static_cast<const T*>(k), ks, q,
                                                          static_cast<int>(H_q), skip, valid, logits, pstat);
    return cudaGetLastError();
  });
  if (e != cudaSuccess) return e;
  device::score_stats_kernel<<<static_cast<unsigned>(L.B * H_q), 256, 0, stream>>>(
      pstat, static_cast<int>(nblk), stat);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const dim3 grid3(static_cast<unsigned>(cdiv(L.N_max, 256)), static_cast<unsigned>(L.B));
  device::score_out_kernel<<<grid3, 256, 0, stream>>>(L, static_cast<int>(H_q), skip, valid, logits, stat,
                                                      out);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------- top-k
cudaError_t launch_topk(const float* scores, int64_t B, int64_t N_max, int64_t ld,
                        const int32_t* seq_lens, int64_t k, int64_t n_sink, int64_t n_local,
                        const int32_t* reuse, const bool* reuse_mask, int32_t* out,
                        cudaStream_t stream) {
  if (B == 0 || n_sink + k + n_local == 0) return cudaSuccess;
  device::topk_kernel<<<static_cast<unsigned>(B), device::kTopkThreads, 0, stream>>>(
      scores, N_max, ld, seq_lens, k, n_sink, n_local, reuse, reuse_mask, out);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------- attention
int64_t decode_num_splits(Impl impl, int64_t B, int64_t H_kv, int64_t K, int sm_count) {
  switch (impl) {
    case Impl::Plain: return 1;
    case Impl::Auto:
    case Impl::Simt:
    case Impl::Tuned: break;
  }
  const int64_t blocks = std::max<int64_t>(1, B * H_kv);
  int64_t s = cdiv(2 * std::max(sm_count, 1), blocks);                 // ~2 waves
  s = std::min<int64_t>(s, std::max<int64_t>(1, cdiv(K, device::kAttnTile)));   // >= one tile each
  return std::clamp<int64_t>(s, 1, 64);
}

size_t decode_workspace_bytes(int64_t B, int64_t H_q, int64_t D, int64_t splits) {
  const int64_t n = B * H_q * splits;
  return align_up(sizeof(float) * n) * 2 + align_up(sizeof(float) * n * D);
}

size_t prefill_workspace_bytes(int64_t B, int64_t C, int64_t H_q, int64_t D) {
  return decode_workspace_bytes(B * C, H_q, D, 1);
}

namespace {
template <typename Keys>
cudaError_t launch_attend(const KVLayout& L, const void* k, CacheStrides ks, const void* v,
                          CacheStrides vs, DType dtype, const float* q, int64_t rows, int64_t H_q,
                          Keys keys, void* out, float* lse, int64_t splits, void* workspace,
                          cudaStream_t stream) {
  if (rows == 0 || H_q == 0) return cudaSuccess;
  if (!limits_ok(L, H_q) || splits < 1) return cudaErrorInvalidValue;
  const int64_t n = rows * H_q * splits;
  char* base = static_cast<char*>(workspace);
  float* pm = reinterpret_cast<float*>(base);
  base += align_up(sizeof(float) * n);
  float* pl = reinterpret_cast<float*>(base);
  base += align_up(sizeof(float) * n);
  float* pacc = reinterpret_cast<float*>(base);
  if (L.H_kv > 65535 || splits > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(L.H_kv), static_cast<unsigned>(splits));
  return with_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    device::attend_kernel<T, Keys><<<grid, device::kAttnThreads, 0, stream>>>(
        L, static_cast<const T*>(k), ks, static_cast<const T*>(v), vs, q, static_cast<int>(H_q), keys,
        static_cast<int>(splits), pm, pl, pacc);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    device::merge_kernel<T><<<static_cast<unsigned>(rows * H_q), 128, 0, stream>>>(
        pm, pl, pacc, static_cast<int>(splits), static_cast<int>(L.D), static_cast<T*>(out), lse);
    return cudaGetLastError();
  });
}
}  // namespace

cudaError_t launch_sparse_decode(const KVLayout& L, const void* k, CacheStrides ks, const void* v,
                                 CacheStrides vs, DType dtype, const float* q, int64_t H_q,
                                 const int32_t* indices, int64_t K, void* out, float* lse,
                                 int64_t splits, void* workspace, cudaStream_t stream) {
  device::DecodeKeys keys{indices, K};
  return launch_attend(L, k, ks, v, vs, dtype, q, L.B, H_q, keys, out, lse, splits, workspace, stream);
}

cudaError_t launch_sparse_prefill(const KVLayout& L, const void* k, CacheStrides ks,
                                  const void* v, CacheStrides vs, DType dtype, const float* q,
                                  int64_t C, int64_t H_q, const int32_t* indices, int64_t K,
                                  const int32_t* chunk_start, void* out, float* lse,
                                  void* workspace, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  device::PrefillKeys keys{indices, K, C, chunk_start};
  return launch_attend(L, k, ks, v, vs, dtype, q, L.B * C, H_q, keys, out, lse, 1, workspace, stream);
}

}  // namespace kv_select
}  // namespace tokenkernels
