// tree family: argument checks shared by the CPU and CUDA adapters. Shape/dtype/device checks
// never read tensor values (no host sync); the value checks (check_*_values) read them and are
// used by the CPU kernels always and by the CUDA adapter only when asked (`check`).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "check.h"
#include "tokenkernels/tree.h"

namespace tokenkernels {
namespace tree {

inline bool is_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

inline void check_index_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "tokenkernels.tree.", op, ": ", name, " must be ", dim,
              "-D, got shape ", t.sizes());
  TORCH_CHECK(is_index_dtype(t), "tokenkernels.tree.", op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

inline void check_device(const at::Tensor& ref, const at::Tensor& t, const char* op,
                         const char* ref_name, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "tokenkernels.tree.", op, ": ", name, " is on ",
              t.device(), " but ", ref_name, " is on ", ref.device());
}

// (B,) tree_lens, shape/dtype/device only.
inline void check_lens_shape(const std::optional<at::Tensor>& lens, const at::Tensor& ref,
                             int64_t B, const char* op, const char* name) {
  if (!lens.has_value()) return;
  check_index_tensor(*lens, op, name, 1);
  TORCH_CHECK(lens->size(0) == B, "tokenkernels.tree.", op, ": ", name, " must have shape (", B,
              ",), got ", lens->sizes());
  check_device(ref, *lens, op, "parents", name);
}

// Values of tree_lens (1 <= len <= n) and parents (root -1, 0 <= p < i) on CPU int64 tensors (so
// an int64 parent beyond int32 is rejected, never wrapped). Always on CPU; on CUDA with check.
inline void check_parent_values(const at::Tensor& parents_cpu, const at::Tensor& lens_cpu,
                                const char* op, const char* name = "parents") {
  const int64_t B = parents_cpu.size(0), n = parents_cpu.size(1);
  const int64_t* par = parents_cpu.data_ptr<int64_t>();
  const int64_t* len = lens_cpu.defined() ? lens_cpu.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = len ? len[b] : n;
    TORCH_CHECK(L >= 1 && L <= n, "tokenkernels.tree.", op, ": tree_lens[", b, "] = ", L,
                " must lie in [1, n = ", n, "]");
    const int64_t* p = par + b * n;
    TORCH_CHECK(p[0] == -1, "tokenkernels.tree.", op, ": ", name, "[", b, ", 0] = ", p[0],
                ": the root's parent must be -1");
    for (int64_t i = 1; i < L; ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < i, "tokenkernels.tree.", op, ": ", name, "[", b, ", ", i,
                  "] = ", p[i], " must lie in [0, ", i,
                  ") (parents before children, no cycles; -1 only for the root)");
  }
}

// Attention dimensions after the shape checks.
struct AttnDims {
  int64_t B, n, Hq, Hkv, D, W;
  bool paged;
  int64_t N_max = 0, page_size = 0, num_pages = 0, max_pages = 0;
};

inline AttnDims check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& prefix_lens, const at::Tensor& mask,
                                     const std::optional<at::Tensor>& tree_lens,
                                     const std::optional<at::Tensor>& block_table) {
  const char* op = "attention";
  TORCH_CHECK(q.dim() == 4, "tokenkernels.tree.attention: q must be 4-D (B, n, H_q, D), got shape ",
              q.sizes());
  check_float_input(q, "q");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "tokenkernels.tree.attention: k_cache and v_cache must "
              "be 4-D ((B, N, H_kv, D) or (pages, page_size, H_kv, D)), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "tokenkernels.tree.attention: k_cache ", k.sizes(),
              " and v_cache ", v.sizes(), " must have the same shape");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "tokenkernels.tree.attention: k_cache and v_cache must have q's dtype ",
              q.scalar_type(), ", got ", k.scalar_type(), " and ", v.scalar_type());
  check_device(q, k, op, "q", "k_cache");
  check_device(q, v, op, "q", "v_cache");
  AttnDims d{};
  d.B = q.size(0);
  d.n = q.size(1);
  d.Hq = q.size(2);
  d.D = q.size(3);
  d.Hkv = k.size(2);
  d.W = mask_words(d.n);
  TORCH_CHECK(k.size(3) == d.D, "tokenkernels.tree.attention: k_cache head dim ", k.size(3),
              " != q head dim ", d.D);
  TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "tokenkernels.tree.attention: H_q = ", d.Hq,
              " must be a multiple of the cache's H_kv = ", d.Hkv);
  TORCH_CHECK(d.n >= 1, "tokenkernels.tree.attention: q must hold at least one tree token");
  d.paged = block_table.has_value();
  if (d.paged) {
    check_index_tensor(*block_table, op, "block_table", 2);
    TORCH_CHECK(block_table->size(0) == d.B, "tokenkernels.tree.attention: block_table must have ",
                d.B, " rows, got ", block_table->sizes());
    check_device(q, *block_table, op, "q", "block_table");
    d.num_pages = k.size(0);
    d.page_size = k.size(1);
    d.max_pages = block_table->size(1);
    TORCH_CHECK(d.page_size >= 1, "tokenkernels.tree.attention: page_size must be >= 1");
  } else {
    TORCH_CHECK(k.size(0) == d.B, "tokenkernels.tree.attention: contiguous k_cache must have batch ",
                d.B, ", got ", k.sizes(), " (pass block_table for a paged cache)");
    d.N_max = k.size(1);
  }
  check_index_tensor(prefix_lens, op, "prefix_lens", 1);
  TORCH_CHECK(prefix_lens.size(0) == d.B, "tokenkernels.tree.attention: prefix_lens must have shape (",
              d.B, ",), got ", prefix_lens.sizes());
  check_device(q, prefix_lens, op, "q", "prefix_lens");
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == d.B && mask.size(1) == d.n && mask.size(2) == d.W,
              "tokenkernels.tree.attention: mask must have shape (", d.B, ", ", d.n, ", ", d.W,
              ") (bit-packed int32, from tree.build), got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kInt, "tokenkernels.tree.attention: mask must be int32 "
              "(bit-packed), got ", mask.scalar_type());
  check_device(q, mask, op, "q", "mask");
  if (tree_lens.has_value()) {
    check_index_tensor(*tree_lens, op, "tree_lens", 1);
    TORCH_CHECK(tree_lens->size(0) == d.B, "tokenkernels.tree.attention: tree_lens must have shape (",
                d.B, ",), got ", tree_lens->sizes());
    check_device(q, *tree_lens, op, "q", "tree_lens");
  }
  return d;
}

// Value checks (CPU tensors, int64): lengths fit the cache, pages in range. Always on CPU; on
// CUDA with check=True (one host sync), else the kernels clamp (tree.h AttnProblem).
inline void check_attention_values(const AttnDims& d, const at::Tensor& prefix_cpu,
                                   const at::Tensor& lens_cpu, const at::Tensor& table_cpu) {
  const int64_t* P = prefix_cpu.data_ptr<int64_t>();
  const int64_t* L = lens_cpu.defined() ? lens_cpu.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < d.B; ++b) {
    const int64_t len = L ? L[b] : d.n;
    TORCH_CHECK(P[b] >= 0, "tokenkernels.tree.attention: prefix_lens[", b, "] = ", P[b], " < 0");
    TORCH_CHECK(len >= 0 && len <= d.n, "tokenkernels.tree.attention: tree_lens[", b, "] = ", len,
                " must lie in [0, n = ", d.n, "]");
    // P[b] + len may overflow int64 (prefix_lens near 2^63): compare and count without the sum
    if (!d.paged) {
      TORCH_CHECK(P[b] <= d.N_max - len, "tokenkernels.tree.attention: request ", b, " needs ",
                  P[b] <= std::numeric_limits<int64_t>::max() - len
                      ? std::to_string(P[b] + len)
                      : std::to_string(P[b]) + " + " + std::to_string(len),
                  " cache positions (prefix_lens + tree tokens) but k_cache holds ", d.N_max);
    } else {
      // ceil((P + len) / page_size) = P / page_size + ceil((P % page_size + len) / page_size)
      const int64_t pages =
          P[b] / d.page_size + (P[b] % d.page_size + len + d.page_size - 1) / d.page_size;
      TORCH_CHECK(pages <= d.max_pages, "tokenkernels.tree.attention: request ", b, " needs ", pages,
                  " pages but block_table has ", d.max_pages, " columns");
      const int64_t* row = table_cpu.data_ptr<int64_t>() + b * d.max_pages;
      for (int64_t j = 0; j < pages; ++j)
        TORCH_CHECK(row[j] >= 0 && row[j] < d.num_pages, "tokenkernels.tree.attention: block_table[",
                    b, ", ", j, "] = ", row[j], " is not a page index in [0, ", d.num_pages, ")");
    }
  }
}

inline void check_out_args(const at::Tensor& q, const AttnDims& d, const at::Tensor& out,
                           const at::Tensor& lse) {
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(),
              "tokenkernels.tree.attention: out must be a contiguous ", q.scalar_type(), " tensor of shape ",
              q.sizes(), ", got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.n && lse.size(2) == d.Hq &&
                  lse.scalar_type() == at::kFloat && lse.is_contiguous(),
              "tokenkernels.tree.attention: lse must be a contiguous float32 tensor of shape (", d.B,
              ", ", d.n, ", ", d.Hq, "), got ", lse.scalar_type(), " ", lse.sizes());
  check_device(q, out, "attention", "q", "out");
  check_device(q, lse, "attention", "q", "lse");
}

// verify_*: first_child / next_sibling / draft_tokens (B, n) index tensors.
inline void check_verify_args(const at::Tensor& fc, const at::Tensor& ns, const at::Tensor& draft,
                              const char* op) {
  check_index_tensor(fc, op, "first_child", 2);
  check_index_tensor(ns, op, "next_sibling", 2);
  check_index_tensor(draft, op, "draft_tokens", 2);
  TORCH_CHECK(ns.sizes() == fc.sizes() && draft.sizes() == fc.sizes(), "tokenkernels.tree.", op,
              ": draft_tokens ", draft.sizes(), " must match the tree's (B, n) = ", fc.sizes());
  check_device(fc, ns, op, "first_child", "next_sibling");
  check_device(fc, draft, op, "tree", "draft_tokens");
  TORCH_CHECK(fc.size(1) >= 1, "tokenkernels.tree.", op, ": the tree must have at least one node (the root), "
              "got first_child of shape ", fc.sizes());
}

// max_depth of the (B, max_depth + 1) outputs (verify_*, paths): >= 0, and max_depth + 1 must not
// overflow.
inline void check_max_depth(int64_t max_depth, const char* op) {
  TORCH_CHECK(max_depth >= 0 && max_depth < std::numeric_limits<int64_t>::max(), "tokenkernels.tree.", op,
              ": max_depth = ", max_depth, " must lie in [0, 2^63 - 1)");
}

// paths: parents / depth / first_child (B, n) index tensors on one device, n >= 1.
inline void check_paths_args(const at::Tensor& parents, const at::Tensor& depth, const at::Tensor& fc,
                             const std::optional<at::Tensor>& tree_lens, int64_t max_leaves, int64_t max_depth) {
  const char* op = "paths";
  check_index_tensor(parents, op, "parents", 2);
  check_index_tensor(depth, op, "depth", 2);
  check_index_tensor(fc, op, "first_child", 2);
  TORCH_CHECK(depth.sizes() == parents.sizes() && fc.sizes() == parents.sizes(),
              "tokenkernels.tree.paths: depth and first_child must have parents' shape ", parents.sizes(),
              ", got ", depth.sizes(), " and ", fc.sizes());
  check_device(parents, depth, op, "parents", "depth");
  check_device(parents, fc, op, "parents", "first_child");
  TORCH_CHECK(parents.size(1) >= 1, "tokenkernels.tree.paths: parents must have at least one node (the root)");
  check_lens_shape(tree_lens, parents, parents.size(0), op, "tree_lens");
  TORCH_CHECK(max_leaves >= 0, "tokenkernels.tree.paths: max_leaves = ", max_leaves, " must be >= 0");
  check_max_depth(max_depth, op);
}

// Values of the child links (CPU int64 tensors): first_child[b, u] and next_sibling[b, u] are -1
// or a node in (u, n) -- what build produces, and what makes every walk end (tree.h link_ok).
inline void check_link_values(const at::Tensor& fc_cpu, const at::Tensor& ns_cpu, const char* op) {
  const int64_t B = fc_cpu.size(0), n = fc_cpu.size(1);
  const int64_t* fc = fc_cpu.data_ptr<int64_t>();
  const int64_t* ns = ns_cpu.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t u = 0; u < n; ++u) {
      const int64_t f = fc[b * n + u], s = ns[b * n + u];
      TORCH_CHECK(f == -1 || link_ok(f, u, n), "tokenkernels.tree.", op, ": first_child[", b, ", ", u, "] = ", f,
                  " is not -1 or a node in (", u, ", n = ", n, ") (corrupt child link; use tree.build)");
      TORCH_CHECK(s == -1 || link_ok(s, u, n), "tokenkernels.tree.", op, ": next_sibling[", b, ", ", u, "] = ", s,
                  " is not -1 or a node in (", u, ", n = ", n, ") (corrupt child link; use tree.build)");
    }
}

// Draft tokens (CPU int64) of every linked node (a first_child / next_sibling target: the nodes
// verification can visit; the root and padding are ignored) must lie in [0, V). After
// check_link_values. Reports the lowest such node of the first offending tree.
inline void check_draft_values(const at::Tensor& fc_cpu, const at::Tensor& ns_cpu, const at::Tensor& draft_cpu,
                               int64_t V, const char* op) {
  const int64_t B = fc_cpu.size(0), n = fc_cpu.size(1);
  const int64_t* fc = fc_cpu.data_ptr<int64_t>();
  const int64_t* ns = ns_cpu.data_ptr<int64_t>();
  const int64_t* dt = draft_cpu.data_ptr<int64_t>();
  std::vector<char> linked(static_cast<size_t>(n));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(linked.begin(), linked.end(), 0);
    for (int64_t u = 0; u < n; ++u) {
      if (link_ok(fc[b * n + u], u, n)) linked[fc[b * n + u]] = 1;
      if (link_ok(ns[b * n + u], u, n)) linked[ns[b * n + u]] = 1;
    }
    for (int64_t c = 0; c < n; ++c) {
      const int64_t t = dt[b * n + c];
      TORCH_CHECK(!linked[c] || (t >= 0 && t < V), "tokenkernels.tree.", op, ": draft_tokens[", b, ", ", c,
                  "] = ", t, " is not in [0, V = ", V, ")");
    }
  }
}

}  // namespace tree
}  // namespace tokenkernels
