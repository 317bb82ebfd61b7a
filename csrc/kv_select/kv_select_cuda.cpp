// kv_select family: CUDA adapter (compiled by the host C++ compiler; kernels live in
// kv_select_kernels.cu). Allocations go through ATen (the caching allocator, so CUDA-graph
// capture works); the only host syncs are the optional value checks (`check=True`).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "cuda_glue.h"
#include "kv_select/kv_select_args.h"
#include "tokenkernels/kv_select.h"

namespace tokenkernels {
namespace kv_select {
namespace {

int sm_count(const at::Device& dev) {
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev.index()),
             "kv_select: cudaDeviceGetAttribute(MultiProcessorCount)");
  return n;
}

void check_cuda_limits(const KVLayout& L, int64_t H_q, const char* op) {
  TORCH_CHECK(L.D <= kCudaMaxHeadDim, "tokenkernels.", op, ": head_dim ", L.D,
              " exceeds the CUDA kernels' limit of ", kCudaMaxHeadDim);
  TORCH_CHECK(H_q / L.H_kv <= kCudaMaxGroup, "tokenkernels.", op, ": H_q / H_kv = ", H_q / L.H_kv,
              " exceeds the CUDA kernels' limit of ", kCudaMaxGroup);
}

at::Tensor scaled_query(const at::Tensor& q, double scale, bool mean_over_chunk) {
  at::Tensor qf = q.to(at::kFloat);
  if (mean_over_chunk) qf = qf.mean(1);
  if (scale != 1.0) qf = qf * scale;
  return qf.contiguous();
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

// ---------------------------------------------------------------------------------- score
at::Tensor score_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& seq_lens,
                      const std::optional<at::Tensor>& block_table, double scale,
                      const std::optional<at::Tensor>& skip, bool check, int64_t impl) {
  constexpr const char* op = "kv_select.score";
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, "tokenkernels.", op,
              ": q must be (B, H_q, D) or (B, C, H_q, D), got shape ", q.sizes());
  const int64_t B = q.size(0);
  const int64_t H_q = check_query(q, k_cache, q.dim(), op);
  c10::DeviceGuard guard(k_cache.device());
  Meta meta = make_meta(k_cache, seq_lens, block_table, B, op);
  check_cuda_limits(meta.layout, H_q, op);
  if (check) check_values(meta, nullptr, nullptr, op);
  at::Tensor sk;
  if (skip.has_value()) {
    TORCH_CHECK(skip->dim() == 1 && skip->size(0) == B && skip->scalar_type() == at::kBool &&
                    skip->device() == k_cache.device(),
                "tokenkernels.", op, ": skip must be a (", B, ",) bool tensor on ", k_cache.device());
    sk = skip->contiguous();
  }
  auto out = at::empty({B, meta.layout.N_max}, q.options().dtype(at::kFloat));
  if (B == 0 || meta.layout.N_max == 0) return out;
  if (q.dim() == 4 && q.size(1) == 0) return out.fill_(-std::numeric_limits<float>::infinity());
  auto qm = scaled_query(q, scale, q.dim() == 4);
  auto ws = workspace(score_workspace_bytes(B, H_q, meta.layout.N_max), k_cache);
  check_cuda(launch_score(meta.layout, k_cache.data_ptr(), strides_of(k_cache),
                          dtype_of(k_cache.scalar_type()), qm.data_ptr<float>(), H_q,
                          sk.defined() ? sk.data_ptr<bool>() : nullptr, out.data_ptr<float>(),
                          ws.data_ptr(), static_cast<int>(impl), current_cuda_stream(k_cache.device())),
             "kv_select score");
  return out;
}

// ---------------------------------------------------------------------------------- top-k
void topk_run(const at::Tensor& scores_in, int64_t k, const at::Tensor& seq_lens, int64_t n_sink,
              int64_t n_local, const std::optional<at::Tensor>& reuse,
              const std::optional<at::Tensor>& reuse_mask, at::Tensor& out) {
  auto scores = scores_in.stride(1) == 1 ? scores_in : scores_in.contiguous();
  auto sl = seq_lens.contiguous();
  at::Tensor ru, rm;
  if (reuse.has_value()) { ru = reuse->contiguous(); rm = reuse_mask->contiguous(); }
  check_cuda(launch_topk(scores.data_ptr<float>(), scores.size(0), scores.size(1), scores.stride(0),
                         sl.data_ptr<int32_t>(), k, n_sink, n_local,
                         ru.defined() ? ru.data_ptr<int32_t>() : nullptr,
                         rm.defined() ? rm.data_ptr<bool>() : nullptr, out.data_ptr<int32_t>(),
                         current_cuda_stream(scores.device())),
             "kv_select topk");
}

at::Tensor topk_cuda(const at::Tensor& scores, int64_t k, const at::Tensor& seq_lens, int64_t n_sink,
                     int64_t n_local, const std::optional<at::Tensor>& reuse,
                     const std::optional<at::Tensor>& reuse_mask) {
  check_topk_args(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask);
  c10::DeviceGuard guard(scores.device());
  auto out = at::empty({scores.size(0), n_sink + k + n_local}, scores.options().dtype(at::kInt));
  topk_run(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, out);
  return out;
}

void topk_out_cuda(const at::Tensor& scores, int64_t k, const at::Tensor& seq_lens, int64_t n_sink,
                   int64_t n_local, const std::optional<at::Tensor>& reuse,
                   const std::optional<at::Tensor>& reuse_mask, at::Tensor out) {
  check_topk_args(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask);
  check_out(out, {scores.size(0), n_sink + k + n_local}, at::kInt, scores, "out", "kv_select.topk");
  c10::DeviceGuard guard(scores.device());
  topk_run(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, out);
}

// ---------------------------------------------------------------------------------- decode
struct AttnArgs {
  Meta meta;
  int64_t H_q = 0, K = 0, C = 0;
};

AttnArgs check_attn(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& indices, const at::Tensor& seq_lens,
                    const at::Tensor* chunk_start, const std::optional<at::Tensor>& block_table,
                    bool check, const char* op) {
  const int64_t dims = chunk_start ? 4 : 3;
  TORCH_CHECK(q.dim() == dims, "tokenkernels.", op, ": q must be ",
              dims == 3 ? "(B, H_q, D)" : "(B, C, H_q, D)", ", got shape ", q.sizes());
  AttnArgs a;
  a.H_q = check_query(q, k_cache, dims, op);
  a.C = dims == 4 ? q.size(1) : 1;
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "tokenkernels.", op, ": q dtype ",
              q.scalar_type(), " differs from k_cache dtype ", k_cache.scalar_type());
  check_v_cache(k_cache, v_cache, op);
  a.meta = make_meta(k_cache, seq_lens, block_table, q.size(0), op);
  check_indices(indices, q.size(0), k_cache, op);
  a.K = indices.size(1);
  if (chunk_start) {
    TORCH_CHECK(chunk_start->dim() == 1 && chunk_start->size(0) == q.size(0) &&
                    chunk_start->scalar_type() == at::kInt && chunk_start->device() == k_cache.device(),
                "tokenkernels.", op, ": chunk_start must be a (", q.size(0), ",) int32 tensor on ",
                k_cache.device());
  }
  check_cuda_limits(a.meta.layout, a.H_q, op);
  if (check) check_values(a.meta, &indices, chunk_start, op);
  return a;
}

void decode_run(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k_cache,
                const at::Tensor& v_cache, const at::Tensor& indices, double scale, int64_t impl,
                at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0);
  if (B == 0 || a.H_q == 0) return;
  auto qs = scaled_query(q, scale, false);
  auto ix = indices.contiguous();
  const int64_t splits = impl == 1 ? 1 : decode_num_splits(B, a.meta.layout.H_kv, a.K, sm_count(q.device()));
  auto ws = workspace(decode_workspace_bytes(B, a.H_q, a.meta.layout.D, splits), k_cache);
  check_cuda(launch_sparse_decode(a.meta.layout, k_cache.data_ptr(), strides_of(k_cache), v_cache.data_ptr(),
                                  strides_of(v_cache), dtype_of(k_cache.scalar_type()), qs.data_ptr<float>(),
                                  a.H_q, ix.data_ptr<int32_t>(), a.K, out.data_ptr(), lse.data_ptr<float>(),
                                  splits, ws.data_ptr(), current_cuda_stream(q.device())),
             "kv_select sparse_decode");
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& indices,
                                                      const at::Tensor& seq_lens,
                                                      const std::optional<at::Tensor>& block_table,
                                                      double scale, bool check, int64_t impl) {
  c10::DeviceGuard guard(k_cache.device());
  auto a = check_attn(q, k_cache, v_cache, indices, seq_lens, nullptr, block_table, check,
                      "kv_select.sparse_decode");
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), a.H_q}, q.options().dtype(at::kFloat));
  decode_run(a, q, k_cache, v_cache, indices, scale, impl, out, lse);
  return {out, lse};
}

void sparse_decode_out_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& indices, const at::Tensor& seq_lens,
                            const std::optional<at::Tensor>& block_table, double scale, bool check,
                            int64_t impl, at::Tensor out, at::Tensor lse) {
  c10::DeviceGuard guard(k_cache.device());
  auto a = check_attn(q, k_cache, v_cache, indices, seq_lens, nullptr, block_table, check,
                      "kv_select.sparse_decode");
  check_out(out, q.sizes(), q.scalar_type(), k_cache, "out", "kv_select.sparse_decode");
  check_out(lse, {q.size(0), a.H_q}, at::kFloat, k_cache, "lse", "kv_select.sparse_decode");
  decode_run(a, q, k_cache, v_cache, indices, scale, impl, out, lse);
}

// ---------------------------------------------------------------------------------- prefill
void prefill_run(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& indices, const at::Tensor& chunk_start,
                 double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0);
  if (B == 0 || a.C == 0 || a.H_q == 0) return;
  auto qs = scaled_query(q, scale, false);
  auto ix = indices.contiguous();
  auto cs = chunk_start.contiguous();
  auto ws = workspace(prefill_workspace_bytes(B, a.C, a.H_q, a.meta.layout.D), k_cache);
  check_cuda(launch_sparse_prefill(a.meta.layout, k_cache.data_ptr(), strides_of(k_cache), v_cache.data_ptr(),
                                   strides_of(v_cache), dtype_of(k_cache.scalar_type()), qs.data_ptr<float>(),
                                   a.C, a.H_q, ix.data_ptr<int32_t>(), a.K, cs.data_ptr<int32_t>(),
                                   out.data_ptr(), lse.data_ptr<float>(), ws.data_ptr(),
                                   current_cuda_stream(q.device())),
             "kv_select sparse_prefill");
}

std::tuple<at::Tensor, at::Tensor> sparse_prefill_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                       const at::Tensor& v_cache, const at::Tensor& indices,
                                                       const at::Tensor& seq_lens, const at::Tensor& chunk_start,
                                                       const std::optional<at::Tensor>& block_table,
                                                       double scale, bool check) {
  c10::DeviceGuard guard(k_cache.device());
  auto a = check_attn(q, k_cache, v_cache, indices, seq_lens, &chunk_start, block_table, check,
                      "kv_select.sparse_prefill");
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), a.C, a.H_q}, q.options().dtype(at::kFloat));
  prefill_run(a, q, k_cache, v_cache, indices, chunk_start, scale, out, lse);
  return {out, lse};
}

void sparse_prefill_out_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& indices, const at::Tensor& seq_lens,
                             const at::Tensor& chunk_start, const std::optional<at::Tensor>& block_table,
                             double scale, bool check, at::Tensor out, at::Tensor lse) {
  c10::DeviceGuard guard(k_cache.device());
  auto a = check_attn(q, k_cache, v_cache, indices, seq_lens, &chunk_start, block_table, check,
                      "kv_select.sparse_prefill");
  check_out(out, q.sizes(), q.scalar_type(), k_cache, "out", "kv_select.sparse_prefill");
  check_out(lse, {q.size(0), a.C, a.H_q}, at::kFloat, k_cache, "lse", "kv_select.sparse_prefill");
  prefill_run(a, q, k_cache, v_cache, indices, chunk_start, scale, out, lse);
}

}  // namespace
}  // namespace kv_select
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CUDA, m) {
  m.impl("kv_score", &tokenkernels::kv_select::score_cuda);
  m.impl("kv_topk", &tokenkernels::kv_select::topk_cuda);
  m.impl("kv_topk_out", &tokenkernels::kv_select::topk_out_cuda);
  m.impl("kv_sparse_decode", &tokenkernels::kv_select::sparse_decode_cuda);
  m.impl("kv_sparse_decode_out", &tokenkernels::kv_select::sparse_decode_out_cuda);
  m.impl("kv_sparse_prefill", &tokenkernels::kv_select::sparse_prefill_cuda);
  m.impl("kv_sparse_prefill_out", &tokenkernels::kv_select::sparse_prefill_out_cuda);
}
