// kv_select family: CUDA adapter (compiled by the host C++ compiler; kernels live in
// kv_select_kernels.cu). Allocations go through ATen (the caching allocator, so CUDA-graph
// capture works); the only host syncs are the optional value checks (`check=True`).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "cuda_glue.h"
#include "kv_select/kv_select_args.h"
#include "tokenkernels/attn_core.h"
#include "tokenkernels/kv_select.h"
#include "tokenkernels/radix_topk.h"

namespace tokenkernels {
namespace kv_select {
namespace {

int sm_count(const at::Device& dev) {
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev.index()),
             "kv_select: cudaDeviceGetAttribute(MultiProcessorCount)");
  return n;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

// ---------------------------------------------------------------------------------- score
at::Tensor score_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& seq_lens,
                      const std::optional<at::Tensor>& block_table, double scale,
                      const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& valid,
                      bool check, c10::string_view impl_name) {
  const Impl impl = parse_impl(impl_name, kScoreOp);
  c10::DeviceGuard guard(k_cache.device());
  ScoreArgs a = check_score(q, k_cache, seq_lens, block_table, skip, valid, check);
  check_cuda_limits(a.meta.layout, a.H_q, kScoreOp);
  const int64_t B = q.size(0);
  auto out = at::empty({B, a.meta.layout.N_max}, q.options().dtype(at::kFloat));
  if (B == 0 || a.meta.layout.N_max == 0) return out;
  if (q.dim() == 4 && q.size(1) == 0) return out.fill_(-std::numeric_limits<float>::infinity());
  auto qm = scaled_query(q, scale, q.dim() == 4);
  auto ws = workspace(score_workspace_bytes(B, a.H_q, a.meta.layout.N_max), k_cache);
  check_cuda(launch_score(a.meta.layout, k_cache.data_ptr(), strides_of(k_cache),
                          dtype_of(k_cache.scalar_type()), qm.data_ptr<float>(), a.H_q,
                          a.skip.defined() ? a.skip.data_ptr<bool>() : nullptr,
                          a.valid.defined() ? a.valid.data_ptr<bool>() : nullptr, out.data_ptr<float>(),
                          ws.data_ptr(), impl, current_cuda_stream(k_cache.device())),
             "kv_select score");
  return out;
}

// ---------------------------------------------------------------------------------- top-k
// impl: Tuned runs the radix top-k (tokenkernels/radix_topk.h: several CTAs per row, workspace
// from the caching allocator); every other impl the one-CTA-per-request kernel of launch_topk.
void topk_run(const at::Tensor& scores_in, int64_t k, const TopkArgs& a, int64_t n_sink,
              int64_t n_local, at::Tensor& out, Impl impl) {
  auto scores = scores_in.stride(1) == 1 ? scores_in : scores_in.contiguous();
  const int64_t B = scores.size(0), N = scores.size(1);
  const int32_t* reuse = a.reuse.defined() ? a.reuse.data_ptr<int32_t>() : nullptr;
  const bool* reuse_mask = a.reuse_mask.defined() ? a.reuse_mask.data_ptr<bool>() : nullptr;
  const cudaStream_t stream = current_cuda_stream(scores.device());
  if (impl == Impl::Tuned && N <= std::numeric_limits<int32_t>::max()) {
    if (B == 0 || a.width == 0) return;
    const RadixTopkPlan plan = radix_topk_plan(B, N, sm_count(scores.device()));
    auto ws = workspace(static_cast<size_t>(radix_workspace_bytes(plan, B)), scores);
    check_cuda(launch_topk_radix(scores.data_ptr<float>(), B, N, scores.stride(0), a.seq_lens.data_ptr<int32_t>(), k,
                                 n_sink, n_local, reuse, reuse_mask, out.data_ptr<int32_t>(), plan, ws.data_ptr(),
                                 stream),
               "kv_select topk (tuned)");
    return;
  }
  check_cuda(launch_topk(scores.data_ptr<float>(), B, N, scores.stride(0), a.seq_lens.data_ptr<int32_t>(), k, n_sink,
                         n_local, reuse, reuse_mask, out.data_ptr<int32_t>(), stream),
             "kv_select topk");
}

at::Tensor topk_cuda(const at::Tensor& scores, int64_t k, const at::Tensor& seq_lens, int64_t n_sink,
                     int64_t n_local, const std::optional<at::Tensor>& reuse,
                     const std::optional<at::Tensor>& reuse_mask, bool check, c10::string_view impl_name) {
  const Impl impl = parse_impl(impl_name, kTopkOp);
  c10::DeviceGuard guard(scores.device());
  TopkArgs a = check_topk(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, check);
  auto out = at::empty({scores.size(0), a.width}, scores.options().dtype(at::kInt));
  topk_run(scores, k, a, n_sink, n_local, out, impl);
  return out;
}

void topk_out_cuda(const at::Tensor& scores, int64_t k, const at::Tensor& seq_lens, int64_t n_sink,
                   int64_t n_local, const std::optional<at::Tensor>& reuse,
                   const std::optional<at::Tensor>& reuse_mask, bool check, at::Tensor out,
                   c10::string_view impl_name) {
  const Impl impl = parse_impl(impl_name, kTopkOp);
  c10::DeviceGuard guard(scores.device());
  TopkArgs a = check_topk(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, check);
  check_topk_out(scores, a, out);
  topk_run(scores, k, a, n_sink, n_local, out, impl);
}

// ---------------------------------------------------------------------------------- decode
AttnArgs check_attn_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& indices, const at::Tensor& seq_lens, const at::Tensor* chunk_start,
                         const std::optional<at::Tensor>& block_table, bool check) {
  AttnArgs a = check_attn(q, k_cache, v_cache, indices, seq_lens, chunk_start, block_table, check);
  check_cuda_limits(a.meta.layout, a.H_q, chunk_start ? kPrefillOp : kDecodeOp);
  return a;
}

void decode_run(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k_cache,
                const at::Tensor& v_cache, double scale, Impl impl, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0);
  if (B == 0 || a.H_q == 0) return;
  const DType dt = dtype_of(k_cache.scalar_type());
  if (impl == Impl::Tuned && attn::kv_supported(a.meta.layout, k_cache.data_ptr(), strides_of(k_cache),
                                                v_cache.data_ptr(), strides_of(v_cache), dt)) {
    // the tensor-core attention core (attn_core.h): q in its dtype, the scale on the fp32 products;
    // fp32, other D, odd strides: simt below
    auto qc = q.contiguous();
    if (attn::aligned16(qc.data_ptr()) && attn::aligned16(out.data_ptr())) {
      auto ws = workspace(attn::decode_plan(a.meta.layout, a.H_q, a.K).ws_total, k_cache);
      check_cuda(attn::launch_decode(a.meta.layout, k_cache.data_ptr(), strides_of(k_cache), v_cache.data_ptr(),
                                     strides_of(v_cache), dt, qc.data_ptr(), static_cast<float>(scale), a.H_q,
                                     a.indices.data_ptr<int32_t>(), a.K, out.data_ptr(), lse.data_ptr<float>(),
                                     ws.data_ptr(), current_cuda_stream(q.device())),
                 "kv_select sparse_decode");
      return;
    }
  }
  auto qs = scaled_query(q, scale, false);
  const int64_t splits = decode_num_splits(impl, B, a.meta.layout.H_kv, a.K, sm_count(q.device()));
  auto ws = workspace(decode_workspace_bytes(B, a.H_q, a.meta.layout.D, splits), k_cache);
  check_cuda(launch_sparse_decode(a.meta.layout, k_cache.data_ptr(), strides_of(k_cache), v_cache.data_ptr(),
                                  strides_of(v_cache), dtype_of(k_cache.scalar_type()), qs.data_ptr<float>(),
                                  a.H_q, a.indices.data_ptr<int32_t>(), a.K, out.data_ptr(),
                                  lse.data_ptr<float>(), splits, ws.data_ptr(), current_cuda_stream(q.device())),
             "kv_select sparse_decode");
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& indices,
                                                      const at::Tensor& seq_lens,
                                                      const std::optional<at::Tensor>& block_table,
                                                      double scale, bool check, c10::string_view impl_name) {
  const Impl impl = parse_impl(impl_name, kDecodeOp);
  c10::DeviceGuard guard(k_cache.device());
  auto a = check_attn_cuda(q, k_cache, v_cache, indices, seq_lens, nullptr, block_table, check);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), a.H_q}, q.options().dtype(at::kFloat));
  decode_run(a, q, k_cache, v_cache, scale, impl, out, lse);
  return {out, lse};
}

void sparse_decode_out_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& indices, const at::Tensor& seq_lens,
                            const std::optional<at::Tensor>& block_table, double scale, bool check,
                            c10::string_view impl_name, at::Tensor out, at::Tensor lse) {
  const Impl impl = parse_impl(impl_name, kDecodeOp);
  c10::DeviceGuard guard(k_cache.device());
  auto a = check_attn_cuda(q, k_cache, v_cache, indices, seq_lens, nullptr, block_table, check);
  check_attn_out(q, k_cache, a, out, lse);
  decode_run(a, q, k_cache, v_cache, scale, impl, out, lse);
}

// ---------------------------------------------------------------------------------- prefill
void prefill_run(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, double scale, Impl impl, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0);
  if (B == 0 || a.C == 0 || a.H_q == 0) return;
  const DType dt = dtype_of(k_cache.scalar_type());
  if (impl == Impl::Tuned && attn::kv_supported(a.meta.layout, k_cache.data_ptr(), strides_of(k_cache),
                                                v_cache.data_ptr(), strides_of(v_cache), dt)) {
    // the tensor-core attention core (attn_core.h): q in its dtype, the scale on the fp32 products;
    // fp32, other D, odd strides: the kernel below
    auto qc = q.contiguous();
    if (attn::aligned16(qc.data_ptr()) && attn::aligned16(out.data_ptr())) {
      auto ws = workspace(attn::prefill_plan(a.meta.layout, a.C, a.H_q, a.K).ws_total, k_cache);
      check_cuda(attn::launch_prefill(a.meta.layout, k_cache.data_ptr(), strides_of(k_cache), v_cache.data_ptr(),
                                      strides_of(v_cache), dt, qc.data_ptr(), static_cast<float>(scale), a.C, a.H_q,
                                      a.indices.data_ptr<int32_t>(), a.K, a.chunk_start.data_ptr<int32_t>(),
                                      out.data_ptr(), lse.data_ptr<float>(), ws.data_ptr(),
                                      current_cuda_stream(q.device())),
                 "kv_select sparse_prefill");
      return;
    }
  }
  auto qs = scaled_query(q, scale, false);
  auto ws = workspace(prefill_workspace_bytes(B, a.C, a.H_q, a.meta.layout.D), k_cache);
  check_cuda(launch_sparse_prefill(a.meta.layout, k_cache.data_ptr(), strides_of(k_cache), v_cache.data_ptr(),
                                   strides_of(v_cache), dtype_of(k_cache.scalar_type()), qs.data_ptr<float>(),
                                   a.C, a.H_q, a.indices.data_ptr<int32_t>(), a.K,
                                   a.chunk_start.data_ptr<int32_t>(), out.data_ptr(), lse.data_ptr<float>(),
                                   ws.data_ptr(), current_cuda_stream(q.device())),
             "kv_select sparse_prefill");
}

std::tuple<at::Tensor, at::Tensor> sparse_prefill_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                       const at::Tensor& v_cache, const at::Tensor& indices,
                                                       const at::Tensor& seq_lens, const at::Tensor& chunk_start,
                                                       const std::optional<at::Tensor>& block_table,
                                                       double scale, bool check, c10::string_view impl_name) {
  const Impl impl = parse_impl(impl_name, kPrefillOp);
  c10::DeviceGuard guard(k_cache.device());
  auto a = check_attn_cuda(q, k_cache, v_cache, indices, seq_lens, &chunk_start, block_table, check);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), a.C, a.H_q}, q.options().dtype(at::kFloat));
  prefill_run(a, q, k_cache, v_cache, scale, impl, out, lse);
  return {out, lse};
}

void sparse_prefill_out_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& indices, const at::Tensor& seq_lens,
                             const at::Tensor& chunk_start, const std::optional<at::Tensor>& block_table,
                             double scale, bool check, at::Tensor out, at::Tensor lse,
                             c10::string_view impl_name) {
  const Impl impl = parse_impl(impl_name, kPrefillOp);
  c10::DeviceGuard guard(k_cache.device());
  auto a = check_attn_cuda(q, k_cache, v_cache, indices, seq_lens, &chunk_start, block_table, check);
  check_attn_out(q, k_cache, a, out, lse);
  prefill_run(a, q, k_cache, v_cache, scale, impl, out, lse);
}

}  // namespace
}  // namespace kv_select
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CUDA, m) {
  m.impl("kv_select_score", &tokenkernels::kv_select::score_cuda);
  m.impl("kv_select_topk", &tokenkernels::kv_select::topk_cuda);
  m.impl("kv_select_topk_out", &tokenkernels::kv_select::topk_out_cuda);
  m.impl("kv_select_sparse_decode", &tokenkernels::kv_select::sparse_decode_cuda);
  m.impl("kv_select_sparse_decode_out", &tokenkernels::kv_select::sparse_decode_out_cuda);
  m.impl("kv_select_sparse_prefill", &tokenkernels::kv_select::sparse_prefill_cuda);
  m.impl("kv_select_sparse_prefill_out", &tokenkernels::kv_select::sparse_prefill_out_cuda);
}
