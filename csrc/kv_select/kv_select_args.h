// kv_select family: the contract layer. Every shape / dtype / device / value check and every
// option parse of the family's ops lives here; the CPU kernels (kv_select.cpp) and the CUDA
// adapter (kv_select_cuda.cpp) both call it, so the same bad input gives the same error on every
// device. Every message names the public op and the argument.
//
// Shape/dtype/device checks are free. Value checks (seq_lens within capacity, page numbers in
// range, indices < seq_len, chunk_start <= seq_len) read the values on the host: the CPU always
// runs them, CUDA only when `check` is set (one host sync). Unchecked bad values never cause an
// out-of-bounds access: the kernels skip tokens whose page or index is out of range.
//
// Integer metadata (seq_lens, block_table, indices, chunk_start, reuse) may be int8/16/32/64 or
// uint8; it is narrowed to int32 here (narrow_int32, check.h: saturating, no host sync), so a
// value beyond int32 is rejected by the value checks -- or skipped unchecked -- like any other
// out-of-range value, never wrapped.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>

#include "check.h"
#include "tokenkernels/kv_select.h"

namespace tokenkernels {
namespace kv_select {

// Public op names (messages: "tokenkernels.<op>: ...").
constexpr const char* kScoreOp = "kv_select.score";
constexpr const char* kTopkOp = "kv_select.topk";
constexpr const char* kDecodeOp = "kv_select.sparse_decode";
constexpr const char* kPrefillOp = "kv_select.sparse_prefill";

// The schema's `str impl`.
inline Impl parse_impl(std::string_view impl, const char* op) {
  return parse_option<Impl>(impl, {{"auto", Impl::Auto}, {"plain", Impl::Plain}, {"simt", Impl::Simt}, {"tuned", Impl::Tuned}},
                            op, "impl");
}

inline CacheStrides strides_of(const at::Tensor& c) {
  return CacheStrides{c.stride(0), c.stride(1), c.stride(2), c.stride(3)};
}

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kBFloat16;
  }
}

// The kernels' query: q in fp32 times `scale`, contiguous; a (B, C, H_q, D) chunk -> its mean
// query (B, H_q, D) when `chunk_mean` (score), else kept 4-D (prefill).
inline at::Tensor scaled_query(const at::Tensor& q, double scale, bool chunk_mean) {
  at::Tensor qf = q.to(at::kFloat);
  if (chunk_mean && qf.dim() == 4) qf = qf.mean(1);
  if (scale != 1.0) qf = qf * scale;
  return qf.contiguous();
}

// Checked int32 views of the per-request metadata, kept alive next to the KVLayout that points
// into them.
struct Meta {
  at::Tensor seq_lens;      // (B,) int32 contiguous
  at::Tensor block_table;   // (B, max_pages) int32 contiguous, or undefined
  KVLayout layout;
};

inline void check_cache(const at::Tensor& c, const char* name, const char* op) {
  TORCH_CHECK(c.dim() == 4, "tokenkernels.", op, ": ", name,
              " must be 4-D: (B, N_max, H_kv, D) contiguous or (num_pages, page_size, H_kv, D) "
              "paged, got shape ", c.sizes());
  check_float_input(c, op, name);
}

// `B` is the batch size given by the query (or the scores).
inline Meta make_meta(const at::Tensor& k_cache, const at::Tensor& seq_lens,
                      const std::optional<at::Tensor>& block_table, int64_t B, const char* op) {
  check_cache(k_cache, "k_cache", op);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, "tokenkernels.", op,
              ": seq_lens must have shape (", B, ",), got ", seq_lens.sizes());
  check_device(seq_lens, k_cache, op, "seq_lens", "k_cache");
  Meta m;
  m.seq_lens = narrow_int32(seq_lens, op, "seq_lens");
  KVLayout& L = m.layout;
  L.B = B;
  L.num_pages = k_cache.size(0);
  L.H_kv = k_cache.size(2);
  L.D = k_cache.size(3);
  if (block_table.has_value()) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.dim() == 2 && bt.size(0) == B, "tokenkernels.", op,
                ": block_table must have shape (", B, ", max_pages), got ", bt.sizes());
    check_device(bt, k_cache, op, "block_table", "k_cache");
    TORCH_CHECK(k_cache.size(1) > 0, "tokenkernels.", op, ": page_size (k_cache.size(1)) must be > 0");
    m.block_table = narrow_int32(bt, op, "block_table");
    L.page_size = k_cache.size(1);
    L.N_max = bt.size(1) * L.page_size;
    L.bt_stride = bt.size(1);
    L.block_table = m.block_table.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "tokenkernels.", op, ": contiguous k_cache must have ", B,
                " rows (one per request) in dim 0, got shape ", k_cache.sizes(),
                " (pass block_table for a paged cache)");
    L.N_max = k_cache.size(1);
  }
  L.seq_lens = m.seq_lens.data_ptr<int32_t>();
  return m;
}

inline void check_v_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  check_cache(v_cache, "v_cache", op);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "tokenkernels.", op,
              ": v_cache must have the shape of k_cache ", k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "tokenkernels.", op,
              ": v_cache dtype ", v_cache.scalar_type(), " differs from k_cache dtype ",
              k_cache.scalar_type());
  check_device(v_cache, k_cache, op, "v_cache", "k_cache");
}

// q: (B, H_q, D) (dims == 3) or (B, C, H_q, D) (dims == 4). Returns H_q.
inline int64_t check_query(const at::Tensor& q, const at::Tensor& k_cache, int64_t dims,
                           const char* op) {
  check_cache(k_cache, "k_cache", op);
  check_float_input(q, op, "q");
  check_device(q, k_cache, op, "q", "k_cache");
  const int64_t H_q = q.size(-2), D = q.size(-1), H_kv = k_cache.size(2);
  // (H_q = 0 would pass the GQA check below and mean a zero-sized CUDA grid; D = 0 is outside
  // the CUDA kernels' limits. Both are rejected here, the same on every device.)
  TORCH_CHECK(H_q > 0, "tokenkernels.", op, ": q must have at least one head (H_q = q.size(",
              dims - 2, ") > 0), got shape ", q.sizes());
  TORCH_CHECK(D > 0, "tokenkernels.", op, ": head_dim (q.size(", dims - 1,
              ")) must be > 0, got shape ", q.sizes());
  TORCH_CHECK(D == k_cache.size(3), "tokenkernels.", op, ": q head_dim ", D,
              " differs from k_cache head_dim ", k_cache.size(3));
  TORCH_CHECK(H_kv > 0 && H_q % H_kv == 0, "tokenkernels.", op, ": H_q (", H_q,
              ") must be a multiple of H_kv (", H_kv, ")");
  return H_q;
}

// (B,) bool per-request flags (score's skip, topk's reuse_mask), contiguous; undefined if none.
inline at::Tensor check_row_flags(const std::optional<at::Tensor>& t, int64_t B, const at::Tensor& ref,
                                  const char* ref_name, const char* name, const char* op) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kBool, "tokenkernels.", op,
              ": ", name, " must be a (", B, ",) bool tensor, got ", t->sizes(), " ", t->scalar_type());
  check_device(*t, ref, op, name, ref_name);
  return t->contiguous();
}

// ---------------------------------------------------------------------------------- score
struct ScoreArgs {
  Meta meta;
  int64_t H_q = 0;
  at::Tensor skip;    // (B,) bool contiguous or undefined
  at::Tensor valid;   // (B, N_max) bool contiguous or undefined
};

// check: run the value checks (the CPU passes true).
inline ScoreArgs check_score(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& seq_lens,
                             const std::optional<at::Tensor>& block_table,
                             const std::optional<at::Tensor>& skip,
                             const std::optional<at::Tensor>& valid, bool check);

// ---------------------------------------------------------------------------------- values
// Value checks on host copies. `indices` (B, K) and `chunk_start` (B,) int32, optional.
// Decode: indices must lie in [-1, seq_len). Prefill (chunk_start given): entries at or past
// chunk_start are ignored by definition, so only negative values other than -1 are errors.
inline void check_values(const Meta& m, const at::Tensor* indices, const at::Tensor* chunk_start,
                         const char* op) {
  const KVLayout& L = m.layout;
  auto sl = m.seq_lens.cpu();
  const int32_t* s = sl.data_ptr<int32_t>();
  at::Tensor bt = m.block_table.defined() ? m.block_table.cpu() : at::Tensor();
  for (int64_t b = 0; b < L.B; ++b) {
    TORCH_CHECK(s[b] >= 0 && s[b] <= L.N_max, "tokenkernels.", op, ": seq_lens[", b, "] = ",
                s[b], " is outside [0, ", L.N_max, "] (the cache capacity",
                bt.defined() ? ": max_pages * page_size)" : ": k_cache.size(1))");
    if (bt.defined()) {
      const int32_t* row = bt.data_ptr<int32_t>() + b * L.bt_stride;
      const int64_t used = (s[b] + L.page_size - 1) / L.page_size;
      for (int64_t p = 0; p < used; ++p)
        TORCH_CHECK(row[p] >= 0 && row[p] < L.num_pages, "tokenkernels.", op, ": block_table[",
                    b, ", ", p, "] = ", row[p], " is outside [0, ", L.num_pages,
                    ") (the number of pages in k_cache)");
    }
  }
  if (indices) {
    auto ix = indices->to(at::kCPU).contiguous();
    const int64_t K = ix.size(1);
    const int32_t* p = ix.data_ptr<int32_t>();
    for (int64_t b = 0; b < L.B; ++b)
      for (int64_t j = 0; j < K; ++j) {
        const int32_t v = p[b * K + j];
        if (chunk_start) {
          TORCH_CHECK(v >= -1, "tokenkernels.", op, ": indices[", b, ", ", j, "] = ", v,
                      " is negative (only -1 marks an empty slot)");
        } else {
          TORCH_CHECK(v >= -1 && v < s[b], "tokenkernels.", op, ": indices[", b, ", ", j, "] = ", v,
                      " is outside [-1, seq_lens[", b, "] = ", s[b], ")");
        }
      }
  }
  if (chunk_start) {
    auto cs = chunk_start->to(at::kCPU).contiguous();
    const int32_t* p = cs.data_ptr<int32_t>();
    for (int64_t b = 0; b < L.B; ++b)
      TORCH_CHECK(p[b] >= 0 && p[b] <= s[b], "tokenkernels.", op, ": chunk_start[", b, "] = ",
                  p[b], " is outside [0, seq_lens[", b, "] = ", s[b], "]");
  }
}

inline ScoreArgs check_score(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& seq_lens,
                             const std::optional<at::Tensor>& block_table,
                             const std::optional<at::Tensor>& skip,
                             const std::optional<at::Tensor>& valid, bool check) {
  const char* op = kScoreOp;
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, "tokenkernels.", op,
              ": q must be (B, H_q, D) or (B, C, H_q, D), got shape ", q.sizes());
  const int64_t B = q.size(0);
  ScoreArgs a;
  a.H_q = check_query(q, k_cache, q.dim(), op);
  a.meta = make_meta(k_cache, seq_lens, block_table, B, op);
  a.skip = check_row_flags(skip, B, k_cache, "k_cache", "skip", op);
  if (valid.has_value()) {
    const int64_t N = a.meta.layout.N_max;
    TORCH_CHECK(valid->dim() == 2 && valid->size(0) == B && valid->size(1) == N &&
                    valid->scalar_type() == at::kBool,
                "tokenkernels.", op, ": valid must be a (", B, ", ", N, ") bool tensor (B, N_max), got ",
                valid->sizes(), " ", valid->scalar_type());
    check_device(*valid, k_cache, op, "valid", "k_cache");
    a.valid = valid->contiguous();
  }
  if (check) check_values(a.meta, nullptr, nullptr, op);
  return a;
}

// ---------------------------------------------------------------------------------- topk
// The output width W = n_sink + k + n_local (>= 0, no int64 overflow: checked by the caller).
// The indices are int32, so W must fit int32; and a row holds at most N_max = scores.size(1)
// real entries, the rest of a wider row being -1 padding: a fixed budget may exceed a short
// cache's capacity, up to kMaxPaddedWidth, but a tiny input is never sized into gigabytes
// (n_sink = 2**31 - 1 would be 8.6 GB per request). python/tokenkernels/_ops/kv_select.py
// (_budget) raises the same errors before anything is allocated (the Selection Cache's state).
constexpr int64_t kMaxPaddedWidth = int64_t{1} << 20;

inline void check_topk_width(int64_t W, int64_t N, const char* op) {
  TORCH_CHECK_VALUE(W <= INT32_MAX, "tokenkernels.", op, ": n_sink + k + n_local = ", W,
                    " must fit in int32 (the indices are int32)");
  TORCH_CHECK_VALUE(W <= std::max(N, kMaxPaddedWidth), "tokenkernels.", op, ": n_sink + k + n_local = ", W,
                    " exceeds both the capacity N_max = ", N, " (scores.size(1)) and ", kMaxPaddedWidth,
                    " (the widest row of -1 padding accepted beyond it)");
}

struct TopkArgs {
  at::Tensor seq_lens;     // (B,) int32 contiguous
  at::Tensor reuse;        // (B, k) int32 contiguous or undefined
  at::Tensor reuse_mask;   // (B,) bool contiguous or undefined
  int64_t width = 0;       // n_sink + k + n_local
};

// check: validate seq_lens values within [0, scores.size(1)] (the CPU passes true).
inline TopkArgs check_topk(const at::Tensor& scores, int64_t k, const at::Tensor& seq_lens,
                           int64_t n_sink, int64_t n_local, const std::optional<at::Tensor>& reuse,
                           const std::optional<at::Tensor>& reuse_mask, bool check) {
  const char* op = kTopkOp;
  TORCH_CHECK(scores.dim() == 2, "tokenkernels.", op, ": scores must be 2-D (B, N_max), got shape ",
              scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "tokenkernels.", op,
              ": scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(k >= 0, "tokenkernels.", op, ": k must be >= 0, got ", k);
  TORCH_CHECK(n_sink >= 0, "tokenkernels.", op, ": n_sink must be >= 0, got ", n_sink);
  TORCH_CHECK(n_local >= 0, "tokenkernels.", op, ": n_local must be >= 0, got ", n_local);
  // the output width n_sink + k + n_local (each already >= 0) must not overflow int64
  TORCH_CHECK(k <= INT64_MAX - n_sink && n_local <= INT64_MAX - n_sink - k, "tokenkernels.", op,
              ": n_sink + k + n_local (", n_sink, " + ", k, " + ", n_local, ") overflows int64");
  const int64_t B = scores.size(0), N = scores.size(1);
  check_topk_width(n_sink + k + n_local, N, op);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, "tokenkernels.", op,
              ": seq_lens must have shape (", B, ",), got ", seq_lens.sizes());
  check_device(seq_lens, scores, op, "seq_lens", "scores");
  TORCH_CHECK(reuse.has_value() == reuse_mask.has_value(), "tokenkernels.", op,
              ": reuse and reuse_mask go together");
  TopkArgs a;
  a.width = n_sink + k + n_local;
  a.seq_lens = narrow_int32(seq_lens, op, "seq_lens");
  if (reuse.has_value()) {
    TORCH_CHECK(reuse->dim() == 2 && reuse->size(0) == B && reuse->size(1) == k, "tokenkernels.", op,
                ": reuse must have shape (", B, ", ", k, "), got ", reuse->sizes());
    check_device(*reuse, scores, op, "reuse", "scores");
    a.reuse = narrow_int32(*reuse, op, "reuse");
    a.reuse_mask = check_row_flags(reuse_mask, B, scores, "scores", "reuse_mask", op);
  }
  if (check && B > 0) {
    auto sl = a.seq_lens.cpu();
    const int32_t* s = sl.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(s[b] >= 0 && s[b] <= N, "tokenkernels.", op, ": seq_lens[", b, "] = ", s[b],
                  " is outside [0, ", N, "] (scores.size(1))");
  }
  return a;
}

// ---------------------------------------------------------------------------------- attention
struct AttnArgs {
  Meta meta;
  int64_t H_q = 0, K = 0, C = 1;
  at::Tensor indices;       // (B, K) int32 contiguous
  at::Tensor chunk_start;   // (B,) int32 contiguous (prefill) or undefined
};

// sparse_decode (chunk_start == nullptr, q (B, H_q, D)) and sparse_prefill (q (B, C, H_q, D)).
// check: run the value checks (the CPU passes true).
inline AttnArgs check_attn(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& indices, const at::Tensor& seq_lens,
                           const at::Tensor* chunk_start, const std::optional<at::Tensor>& block_table,
                           bool check) {
  const char* op = chunk_start ? kPrefillOp : kDecodeOp;
  const int64_t dims = chunk_start ? 4 : 3;
  TORCH_CHECK(q.dim() == dims, "tokenkernels.", op, ": q must be ",
              dims == 3 ? "(B, H_q, D)" : "(B, C, H_q, D)", ", got shape ", q.sizes());
  AttnArgs a;
  const int64_t B = q.size(0);
  a.H_q = check_query(q, k_cache, dims, op);
  a.C = dims == 4 ? q.size(1) : 1;
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "tokenkernels.", op, ": q dtype ",
              q.scalar_type(), " differs from k_cache dtype ", k_cache.scalar_type());
  check_v_cache(k_cache, v_cache, op);
  a.meta = make_meta(k_cache, seq_lens, block_table, B, op);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == B, "tokenkernels.", op,
              ": indices must have shape (", B, ", K), got ", indices.sizes());
  check_device(indices, k_cache, op, "indices", "k_cache");
  a.indices = narrow_int32(indices, op, "indices");
  a.K = indices.size(1);
  if (chunk_start) {
    TORCH_CHECK(chunk_start->dim() == 1 && chunk_start->size(0) == B, "tokenkernels.", op,
                ": chunk_start must be a (", B, ",) integer tensor, got shape ", chunk_start->sizes());
    check_device(*chunk_start, k_cache, op, "chunk_start", "k_cache");
    a.chunk_start = narrow_int32(*chunk_start, op, "chunk_start");
  }
  if (check) check_values(a.meta, &a.indices, chunk_start ? &a.chunk_start : nullptr, op);
  return a;
}

// The CUDA kernels' limits (kv_select.h); the CUDA adapter calls this after the checks above.
inline void check_cuda_limits(const KVLayout& L, int64_t H_q, const char* op) {
  TORCH_CHECK(L.D <= kCudaMaxHeadDim, "tokenkernels.", op, ": head_dim ", L.D,
              " exceeds the CUDA kernels' limit of ", kCudaMaxHeadDim);
  TORCH_CHECK(H_q / L.H_kv <= kCudaMaxGroup, "tokenkernels.", op, ": H_q / H_kv = ", H_q / L.H_kv,
              " exceeds the CUDA kernels' limit of ", kCudaMaxGroup);
}

// ---------------------------------------------------------------------------------- out=
inline void check_out(const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dt,
                      const at::Tensor& ref, const char* ref_name, const char* name, const char* op) {
  TORCH_CHECK(out.sizes() == shape, "tokenkernels.", op, ": ", name, " must have shape ", shape,
              ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dt, "tokenkernels.", op, ": ", name, " must be ", dt, ", got ",
              out.scalar_type());
  check_device(out, ref, op, name, ref_name);
  TORCH_CHECK(out.is_contiguous(), "tokenkernels.", op, ": ", name, " must be contiguous");
}

inline void check_topk_out(const at::Tensor& scores, const TopkArgs& a, const at::Tensor& out) {
  check_out(out, {scores.size(0), a.width}, at::kInt, scores, "scores", "out", kTopkOp);
}

// out like q, lse (B, H_q) (decode) or (B, C, H_q) (prefill) fp32.
inline void check_attn_out(const at::Tensor& q, const at::Tensor& k_cache, const AttnArgs& a,
                           const at::Tensor& out, const at::Tensor& lse) {
  const char* op = a.chunk_start.defined() ? kPrefillOp : kDecodeOp;
  check_out(out, q.sizes(), q.scalar_type(), k_cache, "k_cache", "out", op);
  if (a.chunk_start.defined())
    check_out(lse, {q.size(0), a.C, a.H_q}, at::kFloat, k_cache, "k_cache", "lse", op);
  else
    check_out(lse, {q.size(0), a.H_q}, at::kFloat, k_cache, "k_cache", "lse", op);
}

}  // namespace kv_select
}  // namespace tokenkernels
