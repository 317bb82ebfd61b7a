// kv_select family: argument checks shared by the CPU and CUDA adapters. Every message names the
// argument. Shape/dtype/device checks are free; value checks (seq_lens within capacity, page
// numbers in range, indices < seq_len) read the values on the host -- always on the CPU, and on
// CUDA only when `check` is set (one host sync). Unchecked bad values never cause an
// out-of-bounds access: the kernels skip tokens whose page or index is out of range.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "check.h"
#include "tokenkernels/kv_select.h"

namespace tokenkernels {
namespace kv_select {

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

// Checked views of the per-request metadata, kept alive next to the KVLayout that points into
// them.
struct Meta {
  at::Tensor seq_lens;      // (B,) int32 contiguous
  at::Tensor block_table;   // (B, max_pages) int32 contiguous, or undefined
  KVLayout layout;
};

inline void check_cache(const at::Tensor& c, const char* name, const char* op) {
  TORCH_CHECK(c.dim() == 4, "tokenkernels.", op, ": ", name,
              " must be 4-D: (B, N_max, H_kv, D) contiguous or (num_pages, page_size, H_kv, D) "
              "paged, got shape ", c.sizes());
  check_float_input(c, name);
}

// `op` names the op in messages. `B` is the batch size given by the query.
inline Meta make_meta(const at::Tensor& k_cache, const at::Tensor& seq_lens,
                      const std::optional<at::Tensor>& block_table, int64_t B, const char* op) {
  check_cache(k_cache, "k_cache", op);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, "tokenkernels.", op,
              ": seq_lens must have shape (", B, ",), got ", seq_lens.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, "tokenkernels.", op,
              ": seq_lens must be int32, got ", seq_lens.scalar_type());
  TORCH_CHECK(seq_lens.device() == k_cache.device(), "tokenkernels.", op, ": seq_lens is on ",
              seq_lens.device(), " but k_cache is on ", k_cache.device());
  Meta m;
  m.seq_lens = seq_lens.contiguous();
  KVLayout& L = m.layout;
  L.B = B;
  L.num_pages = k_cache.size(0);
  L.H_kv = k_cache.size(2);
  L.D = k_cache.size(3);
  if (block_table.has_value()) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.dim() == 2 && bt.size(0) == B, "tokenkernels.", op,
                ": block_table must have shape (", B, ", max_pages), got ", bt.sizes());
    TORCH_CHECK(bt.scalar_type() == at::kInt, "tokenkernels.", op,
                ": block_table must be int32, got ", bt.scalar_type());
    TORCH_CHECK(bt.device() == k_cache.device(), "tokenkernels.", op, ": block_table is on ",
                bt.device(), " but k_cache is on ", k_cache.device());
    TORCH_CHECK(k_cache.size(1) > 0, "tokenkernels.", op, ": page_size (k_cache.size(1)) must be > 0");
    m.block_table = bt.contiguous();
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
  TORCH_CHECK(v_cache.device() == k_cache.device(), "tokenkernels.", op, ": v_cache is on ",
              v_cache.device(), " but k_cache is on ", k_cache.device());
}

// q: (B, H_q, D) (dims == 3) or (B, C, H_q, D) (dims == 4). Returns H_q.
inline int64_t check_query(const at::Tensor& q, const at::Tensor& k_cache, int64_t dims,
                           const char* op) {
  check_cache(k_cache, "k_cache", op);
  check_float_input(q, "q");
  TORCH_CHECK(q.device() == k_cache.device(), "tokenkernels.", op, ": q is on ", q.device(),
              " but k_cache is on ", k_cache.device());
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

inline void check_indices(const at::Tensor& indices, int64_t B, const at::Tensor& ref,
                          const char* op) {
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == B, "tokenkernels.", op,
              ": indices must have shape (", B, ", K), got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt, "tokenkernels.", op,
              ": indices must be int32, got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == ref.device(), "tokenkernels.", op, ": indices is on ",
              indices.device(), " but k_cache is on ", ref.device());
}

// Value checks on host copies. `indices` (B, K) and `chunk_start` (B,) optional.
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

inline void check_out(const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dt,
                      const at::Tensor& ref, const char* name, const char* op) {
  TORCH_CHECK(out.sizes() == shape, "tokenkernels.", op, ": ", name, " must have shape ", shape,
              ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dt, "tokenkernels.", op, ": ", name, " must be ", dt, ", got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == ref.device(), "tokenkernels.", op, ": ", name, " is on ",
              out.device(), " but k_cache is on ", ref.device());
  TORCH_CHECK(out.is_contiguous(), "tokenkernels.", op, ": ", name, " must be contiguous");
}

inline void check_topk_args(const at::Tensor& scores, int64_t k, const at::Tensor& seq_lens,
                            int64_t n_sink, int64_t n_local,
                            const std::optional<at::Tensor>& reuse,
                            const std::optional<at::Tensor>& reuse_mask) {
  TORCH_CHECK(scores.dim() == 2, "tokenkernels.kv_select.topk: scores must be 2-D (B, N_max), got shape ",
              scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat,
              "tokenkernels.kv_select.topk: scores must be float32, got ", scores.scalar_type());
  TORCH_CHECK(k >= 0, "tokenkernels.kv_select.topk: k must be >= 0, got ", k);
  TORCH_CHECK(n_sink >= 0, "tokenkernels.kv_select.topk: n_sink must be >= 0, got ", n_sink);
  TORCH_CHECK(n_local >= 0, "tokenkernels.kv_select.topk: n_local must be >= 0, got ", n_local);
  // the output width n_sink + k + n_local (each already >= 0) must not overflow int64
  TORCH_CHECK(k <= INT64_MAX - n_sink && n_local <= INT64_MAX - n_sink - k,
              "tokenkernels.kv_select.topk: n_sink + k + n_local (", n_sink, " + ", k, " + ", n_local,
              ") overflows int64");
  const int64_t B = scores.size(0);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B,
              "tokenkernels.kv_select.topk: seq_lens must have shape (", B, ",), got ", seq_lens.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt,
              "tokenkernels.kv_select.topk: seq_lens must be int32, got ", seq_lens.scalar_type());
  TORCH_CHECK(seq_lens.device() == scores.device(), "tokenkernels.kv_select.topk: seq_lens is on ",
              seq_lens.device(), " but scores is on ", scores.device());
  TORCH_CHECK(reuse.has_value() == reuse_mask.has_value(),
              "tokenkernels.kv_select.topk: reuse and reuse_mask go together");
  if (reuse.has_value()) {
    TORCH_CHECK(reuse->dim() == 2 && reuse->size(0) == B && reuse->size(1) == k,
                "tokenkernels.kv_select.topk: reuse must have shape (", B, ", ", k, "), got ",
                reuse->sizes());
    TORCH_CHECK(reuse->scalar_type() == at::kInt,
                "tokenkernels.kv_select.topk: reuse must be int32, got ", reuse->scalar_type());
    TORCH_CHECK(reuse_mask->dim() == 1 && reuse_mask->size(0) == B &&
                    reuse_mask->scalar_type() == at::kBool,
                "tokenkernels.kv_select.topk: reuse_mask must be a (", B, ",) bool tensor, got ",
                reuse_mask->sizes(), " ", reuse_mask->scalar_type());
    TORCH_CHECK(reuse->device() == scores.device() && reuse_mask->device() == scores.device(),
                "tokenkernels.kv_select.topk: reuse/reuse_mask must be on ", scores.device());
  }
}

}  // namespace kv_select
}  // namespace tokenkernels
