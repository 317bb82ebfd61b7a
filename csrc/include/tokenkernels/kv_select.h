// kv_select family: torch-free definitions shared by the CPU kernels, the CUDA kernels and their
// launchers (TokenSelect-style token-level KV selection and sparse attention).
//
// One addressing scheme covers both KV layouts. A cache is viewed as 4-D
// (pages, slots, H_kv, D) with arbitrary element strides:
//   contiguous: (B, N_max, H_kv, D)             page = b,                   slot = n
//   paged:      (num_pages, page_size, H_kv, D) page = block_table[b][n/P], slot = n % P
// so HF's (B, H_kv, N, D) cache viewed as (B, N, H_kv, D) through transpose(1, 2) is read in
// place, without a copy.
#pragma once
#include <cstdint>

#include "tokenkernels/common.h"

namespace tokenkernels {
namespace kv_select {

// The `str impl` option of the family's ops (parsed once in csrc/kv_select/kv_select_args.h):
// which CUDA variant runs; the CPU has one implementation of each op and ignores it.
//   Auto  "auto":  the kernels' own choice (score: Simt where eligible; decode: split-KV);
//   Plain "plain": score one warp per token row with scalar loads; decode one block per
//                  (request, KV head), no split;
//   Simt  "simt":  score with 16-byte vector loads (Plain where the layout does not allow them);
//                  decode split-KV with the split count of decode_num_splits;
//   Tuned "tuned": the fast-by-design kernels (issue #13: bandwidth-bound scoring, radix top-k,
//                  the tensor-core attention core); opt-in until proven on a GPU.
enum class Impl { Auto, Plain, Simt, Tuned };

// Element strides of a (pages, slots, H_kv, D) cache.
struct CacheStrides {
  int64_t page = 0, slot = 0, head = 0, dim = 1;
};

// How token n of request b is found. All pointers are host pointers on the CPU and device
// pointers on CUDA.
struct KVLayout {
  int64_t B = 0;            // requests
  int64_t N_max = 0;        // token capacity per request (contiguous: N_max; paged: max_pages*P)
  int64_t H_kv = 0, D = 0;
  int64_t page_size = 0;    // paged only
  int64_t num_pages = 0;    // first dim of the cache
  const int32_t* block_table = nullptr;   // (B, bt_stride) or nullptr = contiguous
  int64_t bt_stride = 0;
  const int32_t* seq_lens = nullptr;      // (B,)
};

// Offset (elements) of head 0, dim 0 of token n of request b, or -1 when the token's page is
// out of range (only possible with unchecked inputs; kernels then skip the token).
TK_HD int64_t token_offset(const KVLayout& L, const CacheStrides& s, int64_t b, int64_t n) {
  if (!L.block_table) return b * s.page + n * s.slot;
  const int32_t page = L.block_table[b * L.bt_stride + n / L.page_size];
  if (page < 0 || page >= L.num_pages) return -1;
  return static_cast<int64_t>(page) * s.page + (n % L.page_size) * s.slot;
}

// Valid length of request b, clamped into [0, N_max].
TK_HD int64_t seq_len(const KVLayout& L, int64_t b) {
  const int64_t n = L.seq_lens[b];
  return n < 0 ? 0 : (n > L.N_max ? L.N_max : n);
}

// Selection budget: how many tokens topk emits for a request of length n.
TK_HD int64_t selected_count(int64_t n, int64_t k, int64_t n_sink, int64_t n_local) {
  const int64_t W = n_sink + k + n_local;
  return n <= W ? n : W;
}

// Limits of the CUDA kernels (kv_select_args.h checks them for CUDA tensors): head_dim <= 256,
// H_q / H_kv <= 16.
constexpr int64_t kCudaMaxHeadDim = 256;
constexpr int64_t kCudaMaxGroup = 16;

}  // namespace kv_select
}  // namespace tokenkernels

// ------------------------------------------------------------------ CUDA launchers (host API)
#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace tokenkernels {
namespace kv_select {

// score: q (B, H_q, D) fp32 contiguous, pre-scaled (the mean query for a prefill chunk); k cache
// in `dtype`. Three passes: logits + per-block softmax partials, per-head softmax (max, sum),
// sum over heads of exp(logit - max) / sum.
// impl: Plain (one warp per token row, scalar loads); Simt (16-byte vector loads, two rows in
// flight per lane group; needs unit stride on D, D / (16 / sizeof(dtype)) a power of two <= 32,
// 16-byte aligned rows -- otherwise Plain runs); Auto = Simt; Tuned: the bandwidth-bound scoring kernels
// (issue #13; launch_score_tuned, kv_select_score.h: fp16 / bf16, D 64 / 128 / 256, G <= 8 --
// otherwise Simt).
// out (B, N_max) fp32: sum over q-heads of softmax_n(scale * q_h . k_n) over the valid tokens,
// -inf for the others (past seq_len, or valid[b][n] false).
// skip (B,) bool or nullptr: rows to leave unscored, all -inf (Selection Cache hits).
// valid (B, N_max) bool (row stride N_max) or nullptr: tokens that take part (false: never
// counted in the softmax, score -inf).
// workspace: score_workspace_bytes(...) bytes (per-head logits and partial softmax stats).
size_t score_workspace_bytes(int64_t B, int64_t H_q, int64_t N_max);
cudaError_t launch_score(const KVLayout& L, const void* k, CacheStrides ks, DType dtype,
                         const float* q, int64_t H_q, const bool* skip, const bool* valid,
                         float* out, void* workspace, Impl impl, cudaStream_t stream);

// topk: scores (B, N_max) fp32 (row stride ld). out (B, n_sink + k + n_local) int32, ascending,
// -1 padded. reuse (B, k) int32 ascending middle picks and reuse_mask (B,) bool, or nullptr.
// One block per request: radix select of the k-th largest key over [n_sink, L - n_local) fused
// with the sink/local insertion and an ordered (prefix-sum) write.
cudaError_t launch_topk(const float* scores, int64_t B, int64_t N_max, int64_t ld,
                        const int32_t* seq_lens, int64_t k, int64_t n_sink, int64_t n_local,
                        const int32_t* reuse, const bool* reuse_mask, int32_t* out,
                        cudaStream_t stream);

// sparse decode: q (B, H_q, D) fp32 contiguous, pre-scaled; indices (B, K) int32 (-1 skipped),
// out (B, H_q, D) in dtype, lse (B, H_q) fp32 or nullptr. Split-KV: each (request, KV head,
// split) block handles K / splits indices for all H_q / H_kv heads of the group, then a merge
// kernel combines the partial (max, sum, acc) by log-sum-exp. workspace: decode_workspace_bytes.
// decode_num_splits: the split count of `impl` -- 1 for Plain (one block per request and KV
// head); for Simt, Tuned and Auto enough blocks for ~2 waves on `sm_count` SMs.
int64_t decode_num_splits(Impl impl, int64_t B, int64_t H_kv, int64_t K, int sm_count);
size_t decode_workspace_bytes(int64_t B, int64_t H_q, int64_t D, int64_t splits);
cudaError_t launch_sparse_decode(const KVLayout& L, const void* k, CacheStrides ks, const void* v,
                                 CacheStrides vs, DType dtype, const float* q, int64_t H_q,
                                 const int32_t* indices, int64_t K, void* out, float* lse,
                                 int64_t splits, void* workspace, cudaStream_t stream);

// sparse prefill: q (B, C, H_q, D) fp32 contiguous, pre-scaled; chunk_start (B,) int32. Query c of
// request b attends the entries of indices[b] in [0, chunk_start[b]) and the chunk positions
// chunk_start[b] .. chunk_start[b] + c; rows past the chunk length min(C, seq_len - start) get
// out 0 and lse -inf. out (B, C, H_q, D) in dtype, lse (B, C, H_q) fp32 or nullptr.
size_t prefill_workspace_bytes(int64_t B, int64_t C, int64_t H_q, int64_t D);
cudaError_t launch_sparse_prefill(const KVLayout& L, const void* k, CacheStrides ks,
                                  const void* v, CacheStrides vs, DType dtype, const float* q,
                                  int64_t C, int64_t H_q, const int32_t* indices, int64_t K,
                                  const int32_t* chunk_start, void* out, float* lse,
                                  void* workspace, cudaStream_t stream);

}  // namespace kv_select
}  // namespace tokenkernels
#endif
