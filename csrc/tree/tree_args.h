// tree family: the contract layer. Every shape / dtype / device / value check and every option
// parse of the tree ops lives here; the CPU kernels (tree.cpp) and the CUDA adapter
// (tree_cuda.cpp) both call it, so the same bad input gives the same error (type and message)
// on every device. Messages: "tokenkernels.tree.<op>: <argument> <what is wrong>".
//
// Shape/dtype/device checks (check_*_args) never read tensor values (no host sync). The value
// checks (validate_*) read them: the CPU always runs them (cheap linear passes over data in
// cache; `check` only matters on CUDA), CUDA only with check=true, with one device-to-host copy
// per call. With check=false the CUDA kernels clamp or skip bad values instead (tree.h).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "check.h"
#include "tokenkernels/tree.h"

namespace tokenkernels {
namespace tree {

// ------------------------------------------------------------------------------ error helpers

// The Python exception a failed check raises: RuntimeError, ValueError, TypeError.
enum class Err { Runtime, Value, Type };

// Raise "tokenkernels.tree.<op>: <args...>" as `kind` unless ok.
template <typename... Args>
inline void require(bool ok, Err kind, const char* op, const Args&... args) {
  if (ok) return;
  const std::string msg = c10::str("tokenkernels.tree.", op, ": ", args...);
  switch (kind) {
    case Err::Value: TORCH_CHECK_VALUE(false, msg);
    case Err::Type: TORCH_CHECK_TYPE(false, msg);
    case Err::Runtime: break;
  }
  TORCH_CHECK(false, msg);
}

// "(a, b, c)": an expected shape written the way Python writes it.
inline std::string shape_str(std::initializer_list<int64_t> dims) {
  std::string s = "(";
  for (const int64_t d : dims) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// ------------------------------------------------------------------------------------ options

// The schema's `str impl` of tree_build / tree_attention(_out). `op` is the public op name
// ("tree.build", "tree.attention").
inline Impl parse_impl(std::string_view impl, const char* op) {
  return parse_option<Impl>(impl, {{"auto", Impl::Auto}, {"plain", Impl::Plain}, {"simt", Impl::Simt}, {"tuned", Impl::Tuned}}, op,
                            "impl");
}

// The schema's `str mode` of tree_verify_sampling: "specinfer" | "rsd" (tree.h, VerifyMode).
inline VerifyMode parse_verify_mode(std::string_view mode) {
  return parse_option<VerifyMode>(mode, {{"specinfer", VerifyMode::SpecInfer}, {"rsd", VerifyMode::Rsd}},
                                  "tree.verify_sampling", "mode");
}

// ------------------------------------------------------------------------- generic tensor checks

inline bool is_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

// A `dim`-D int32/int64 tensor: ValueError for the rank, TypeError for the dtype.
inline void check_index_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  require(is_index_dtype(t), Err::Type, op, name, " must be int32 or int64, got ", t.scalar_type());
  require(t.dim() == dim, Err::Value, op, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// t on ref's device (`kind`: the exception the public op has always raised for this argument).
inline void check_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_name,
                         const char* name, Err kind = Err::Runtime) {
  require(t.device() == ref.device(), kind, op, name, " is on ", t.device(), " but ", ref_name, " is on ",
          ref.device());
}

// (B,) int32/int64 tree_lens on ref's device, or none.
inline void check_lens(const std::optional<at::Tensor>& lens, const at::Tensor& ref, int64_t B, const char* op,
                       const char* ref_name) {
  if (!lens.has_value()) return;
  require(is_index_dtype(*lens), Err::Type, op, "tree_lens must be an integer tensor (int32 or int64), got ",
          lens->scalar_type());
  require(lens->dim() == 1 && lens->size(0) == B, Err::Value, op, "tree_lens must have shape ", shape_str({B}),
          ", got ", lens->sizes());
  check_device(ref, *lens, op, ref_name, "tree_lens", Err::Value);
}

// max_depth of the (B, max_depth + 1) outputs (verify_*, paths) of trees of n >= 1 nodes: in
// [0, n - 1], since no node of such a tree is deeper (a larger value only sized the outputs,
// up to a multi-GB allocation for a tiny tree).
inline void check_max_depth(int64_t max_depth, int64_t n, const char* op) {
  require(max_depth >= 0 && max_depth <= n - 1, Err::Runtime, op, "max_depth = ", max_depth,
          " must lie in [0, n - 1 = ", n - 1, "] (a tree of n nodes is at most n - 1 deep)");
}

// ------------------------------------------------------------------------------------ parents

// Values of tree_lens (1 <= len <= n) and parents (root -1, 0 <= p < i) on host int64 tensors
// (so an int64 parent beyond int32 is rejected, never wrapped).
inline void check_parent_values(const at::Tensor& parents_h, const at::Tensor& lens_h, const char* op) {
  const int64_t B = parents_h.size(0), n = parents_h.size(1);
  const int64_t* par = parents_h.data_ptr<int64_t>();
  const int64_t* len = lens_h.defined() ? lens_h.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = len ? len[b] : n;
    require(L >= 1 && L <= n, Err::Runtime, op, "tree_lens[", b, "] = ", L, " must lie in [1, n = ", n, "]");
    const int64_t* p = par + b * n;
    require(p[0] == -1, Err::Runtime, op, "parents[", b, ", 0] = ", p[0], ": the root's parent must be -1");
    for (int64_t i = 1; i < L; ++i)
      require(p[i] >= 0 && p[i] < i, Err::Runtime, op, "parents[", b, ", ", i, "] = ", p[i], " must lie in [0, ",
              i, ") (parents before children, no cycles; -1 only for the root)");
  }
}

// ---------------------------------------------------------------------------------------- build

struct BuildArgs {
  int64_t B, n;
  Impl impl;
};

inline BuildArgs check_build_args(const at::Tensor& parents, const std::optional<at::Tensor>& tree_lens,
                                  std::string_view impl) {
  const char* op = "build";
  const Impl im = parse_impl(impl, "tree.build");
  check_index_tensor(parents, op, "parents", 2);
  const int64_t B = parents.size(0), n = parents.size(1);
  require(n >= 1, Err::Runtime, op, "parents must have at least one node (the root)");
  check_lens(tree_lens, parents, B, op, "parents");
  return {B, n, im};
}

// parents / lens: the int64 contiguous tensors the kernels read (lens may be undefined).
// CPU: always; CUDA: with check, one device-to-host copy of both.
inline void validate_build_values(const at::Tensor& parents, const at::Tensor& lens, bool check) {
  if (parents.is_cpu()) return check_parent_values(parents, lens, "build");
  if (!check) return;
  if (!lens.defined()) return check_parent_values(parents.cpu(), lens, "build");
  const int64_t B = parents.size(0), n = parents.size(1);
  auto host = at::cat({parents.reshape({-1}), lens}).cpu();
  check_parent_values(host.narrow(0, 0, B * n).view({B, n}), host.narrow(0, B * n, B), "build");
}

// ---------------------------------------------------------------------------------------- paths

// parents / depth / first_child (B, n) index tensors on one device, n >= 1.
inline void check_paths_args(const at::Tensor& parents, const at::Tensor& depth, const at::Tensor& fc,
                             const std::optional<at::Tensor>& tree_lens, int64_t max_leaves, int64_t max_depth) {
  const char* op = "paths";
  check_index_tensor(parents, op, "parents", 2);
  check_index_tensor(depth, op, "depth", 2);
  check_index_tensor(fc, op, "first_child", 2);
  require(depth.sizes() == parents.sizes() && fc.sizes() == parents.sizes(), Err::Value, op,
          "depth and first_child must have parents' shape ", parents.sizes(), ", got ", depth.sizes(), " and ",
          fc.sizes());
  check_device(parents, depth, op, "parents", "depth");
  check_device(parents, fc, op, "parents", "first_child");
  require(parents.size(1) >= 1, Err::Runtime, op, "parents must have at least one node (the root)");
  check_lens(tree_lens, parents, parents.size(0), op, "parents");
  const int64_t n = parents.size(1);
  require(max_leaves >= 0 && max_leaves <= n, Err::Runtime, op, "max_leaves = ", max_leaves,
          " must lie in [0, n = ", n, "] (a tree of n nodes has at most n leaves)");
  check_max_depth(max_depth, n, op);
}

// The CPU's paths sizes (host int64 tensors): every leaf at depth <= max_depth, at most
// max_leaves leaves per tree. (tree_paths has no `check`: on CUDA deeper nodes and extra leaves
// are dropped instead, documented at tree.build.)
inline void check_paths_values(const at::Tensor& depth_h, const at::Tensor& fc_h, const at::Tensor& lens_h,
                               int64_t max_leaves, int64_t max_depth) {
  const int64_t B = fc_h.size(0), n = fc_h.size(1);
  const int64_t* dep = depth_h.data_ptr<int64_t>();
  const int64_t* fc = fc_h.data_ptr<int64_t>();
  const int64_t* len = lens_h.defined() ? lens_h.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = std::min(len ? clamp_len(len[b], n) : n, n);
    int64_t leaves = 0;
    for (int64_t i = 0; i < L; ++i) {
      if (fc[b * n + i] >= 0) continue;
      require(dep[b * n + i] <= max_depth, Err::Runtime, "paths", "node ", i, " of tree ", b, " has depth ",
              dep[b * n + i], " > max_depth = ", max_depth);
      ++leaves;
    }
    require(leaves <= max_leaves, Err::Runtime, "paths", "tree ", b, " has ", leaves, " leaves > max_leaves = ",
            max_leaves);
  }
}

// ------------------------------------------------------------------------------------ attention

// Attention dimensions after the shape checks, and the parsed impl.
struct AttnDims {
  int64_t B, n, Hq, Hkv, D, W;
  bool paged;
  int64_t N_max = 0, page_size = 0, num_pages = 0, max_pages = 0;
  Impl impl = Impl::Auto;
};

inline AttnDims check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& prefix_lens, const at::Tensor& mask,
                                     const std::optional<at::Tensor>& tree_lens,
                                     const std::optional<at::Tensor>& block_table, std::string_view impl) {
  const char* op = "attention";
  AttnDims d{};
  d.impl = parse_impl(impl, "tree.attention");
  require(q.dim() == 4, Err::Runtime, op, "q must be 4-D (B, n, H_q, D), got shape ", q.sizes());
  require(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
          Err::Runtime, op, "q must be float32, float16 or bfloat16, got ", q.scalar_type());
  require(k.dim() == 4 && v.dim() == 4, Err::Runtime, op,
          "k_cache and v_cache must be 4-D ((B, N, H_kv, D) or (pages, page_size, H_kv, D)), got ", k.sizes(),
          " and ", v.sizes());
  require(k.sizes() == v.sizes(), Err::Runtime, op, "k_cache ", k.sizes(), " and v_cache ", v.sizes(),
          " must have the same shape");
  require(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), Err::Runtime, op,
          "k_cache and v_cache must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ",
          v.scalar_type());
  check_device(q, k, op, "q", "k_cache");
  check_device(q, v, op, "q", "v_cache");
  d.B = q.size(0);
  d.n = q.size(1);
  d.Hq = q.size(2);
  d.D = q.size(3);
  d.Hkv = k.size(2);
  d.W = mask_words(d.n);
  require(k.size(3) == d.D, Err::Runtime, op, "k_cache head dim ", k.size(3), " != q head dim ", d.D);
  require(d.Hkv > 0 && d.Hq % d.Hkv == 0, Err::Runtime, op, "H_q = ", d.Hq,
          " must be a multiple of the cache's H_kv = ", d.Hkv);
  require(d.n >= 1, Err::Runtime, op, "q must hold at least one tree token");
  d.paged = block_table.has_value();
  if (d.paged) {
    require(is_index_dtype(*block_table), Err::Runtime, op, "block_table must be int32 or int64, got ",
            block_table->scalar_type());
    require(block_table->dim() == 2, Err::Runtime, op, "block_table must be 2-D, got shape ", block_table->sizes());
    require(block_table->size(0) == d.B, Err::Runtime, op, "block_table must have ", d.B, " rows, got ",
            block_table->sizes());
    check_device(q, *block_table, op, "q", "block_table");
    d.num_pages = k.size(0);
    d.page_size = k.size(1);
    d.max_pages = block_table->size(1);
    require(d.page_size >= 1, Err::Runtime, op, "page_size must be >= 1");
  } else {
    require(k.size(0) == d.B, Err::Runtime, op, "contiguous k_cache must have batch ", d.B, ", got ", k.sizes(),
            " (pass block_table for a paged cache)");
    d.N_max = k.size(1);
  }
  require(is_index_dtype(prefix_lens), Err::Runtime, op, "prefix_lens must be int32 or int64, got ",
          prefix_lens.scalar_type());
  require(prefix_lens.dim() == 1 && prefix_lens.size(0) == d.B, Err::Runtime, op, "prefix_lens must have shape ",
          shape_str({d.B}), ", got ", prefix_lens.sizes());
  check_device(q, prefix_lens, op, "q", "prefix_lens");
  require(mask.dim() == 3 && mask.size(0) == d.B && mask.size(1) == d.n && mask.size(2) == d.W, Err::Runtime, op,
          "mask must have shape ", shape_str({d.B, d.n, d.W}), " (bit-packed int32, from tree.build), got ",
          mask.sizes());
  require(mask.scalar_type() == at::kInt, Err::Runtime, op, "mask must be int32 (bit-packed), got ",
          mask.scalar_type());
  check_device(q, mask, op, "q", "mask");
  if (tree_lens.has_value()) {
    require(is_index_dtype(*tree_lens), Err::Runtime, op, "tree_lens must be int32 or int64, got ",
            tree_lens->scalar_type());
    require(tree_lens->dim() == 1 && tree_lens->size(0) == d.B, Err::Runtime, op, "tree_lens must have shape ",
            shape_str({d.B}), ", got ", tree_lens->sizes());
    check_device(q, *tree_lens, op, "q", "tree_lens");
  }
  return d;
}

// The outputs of tree_attention_out: out like q (contiguous), lse (B, n, H_q) float32.
inline void check_attention_out_args(const at::Tensor& q, const AttnDims& d, const at::Tensor& out,
                                     const at::Tensor& lse) {
  const char* op = "attention";
  require(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(), Err::Runtime,
          op, "out must be a contiguous ", q.scalar_type(), " tensor of shape ", q.sizes(), ", got ",
          out.scalar_type(), " ", out.sizes());
  require(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.n && lse.size(2) == d.Hq &&
              lse.scalar_type() == at::kFloat && lse.is_contiguous(),
          Err::Runtime, op, "lse must be a contiguous float32 tensor of shape ", shape_str({d.B, d.n, d.Hq}),
          ", got ", lse.scalar_type(), " ", lse.sizes());
  check_device(q, out, op, "q", "out");
  check_device(q, lse, op, "q", "lse");
}

// Value checks (host int64 tensors): lengths fit the cache, pages in range.
inline void check_attention_values(const AttnDims& d, const at::Tensor& prefix_h, const at::Tensor& lens_h,
                                   const at::Tensor& table_h) {
  const char* op = "attention";
  const int64_t* P = prefix_h.data_ptr<int64_t>();
  const int64_t* L = lens_h.defined() ? lens_h.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < d.B; ++b) {
    const int64_t len = L ? L[b] : d.n;
    require(P[b] >= 0, Err::Runtime, op, "prefix_lens[", b, "] = ", P[b], " < 0");
    require(len >= 0 && len <= d.n, Err::Runtime, op, "tree_lens[", b, "] = ", len, " must lie in [0, n = ", d.n,
            "]");
    // P[b] + len may overflow int64 (prefix_lens near 2^63): compare and count without the sum
    if (!d.paged) {
      if (P[b] <= d.N_max - len) continue;
      require(false, Err::Runtime, op, "request ", b, " needs ",
              P[b] <= std::numeric_limits<int64_t>::max() - len
                  ? std::to_string(P[b] + len)
                  : std::to_string(P[b]) + " + " + std::to_string(len),
              " cache positions (prefix_lens + tree tokens) but k_cache holds ", d.N_max);
    } else {
      // ceil((P + len) / page_size) = P / page_size + ceil((P % page_size + len) / page_size)
      const int64_t pages = P[b] / d.page_size + (P[b] % d.page_size + len + d.page_size - 1) / d.page_size;
      require(pages <= d.max_pages, Err::Runtime, op, "request ", b, " needs ", pages, " pages but block_table has ",
              d.max_pages, " columns");
      const int64_t* row = table_h.data_ptr<int64_t>() + b * d.max_pages;
      for (int64_t j = 0; j < pages; ++j)
        require(row[j] >= 0 && row[j] < d.num_pages, Err::Runtime, op, "block_table[", b, ", ", j, "] = ", row[j],
                " is not a page index in [0, ", d.num_pages, ")");
    }
  }
}

// P, lens, table: the int64 contiguous tensors the kernels read (lens / table may be undefined).
// CPU: always; CUDA: with check, one device-to-host copy of all three.
inline void validate_attention_values(const AttnDims& d, const at::Tensor& P, const at::Tensor& lens,
                                      const at::Tensor& table, bool check) {
  if (P.is_cpu()) return check_attention_values(d, P, lens, table);
  if (!check) return;
  std::vector<at::Tensor> parts{P};
  if (lens.defined()) parts.push_back(lens);
  if (table.defined()) parts.push_back(table.reshape({-1}));
  auto host = at::cat(parts).cpu();
  int64_t off = d.B;
  at::Tensor lens_h, table_h;
  if (lens.defined()) {
    lens_h = host.narrow(0, off, d.B);
    off += d.B;
  }
  if (table.defined()) table_h = host.narrow(0, off, d.B * d.max_pages).view({d.B, d.max_pages});
  check_attention_values(d, host.narrow(0, 0, d.B), lens_h, table_h);
}

// --------------------------------------------------------------------------------------- verify

// first_child / next_sibling / draft_tokens / target_argmax (B, n) index tensors of one tree.
// The tree (first_child, next_sibling) comes from tree.build; the per-node inputs must match it.
inline void check_tree_links(const at::Tensor& fc, const at::Tensor& ns, const char* op) {
  check_index_tensor(fc, op, "first_child", 2);
  check_index_tensor(ns, op, "next_sibling", 2);
  require(ns.sizes() == fc.sizes(), Err::Value, op, "next_sibling ", ns.sizes(), " must match first_child ",
          fc.sizes());
  check_device(fc, ns, op, "first_child", "next_sibling");
  require(fc.size(1) >= 1, Err::Runtime, op, "the tree must have at least one node (the root), got first_child "
          "of shape ", fc.sizes());
}

inline void check_node_tokens(const at::Tensor& fc, const at::Tensor& t, const char* op, const char* name) {
  require(is_index_dtype(t), Err::Type, op, name, " must be int32 or int64, got ", t.scalar_type());
  require(t.sizes() == fc.sizes(), Err::Value, op, name, " must have shape ", shape_str({fc.size(0), fc.size(1)}),
          ", got ", t.sizes());
  check_device(fc, t, op, "the tree", name, Err::Value);
}

inline void check_verify_greedy_args(const at::Tensor& fc, const at::Tensor& ns, const at::Tensor& draft,
                                     const at::Tensor& argmax, int64_t max_depth) {
  const char* op = "verify_greedy";
  check_tree_links(fc, ns, op);
  check_node_tokens(fc, draft, op, "draft_tokens");
  check_node_tokens(fc, argmax, op, "target_argmax");
  check_max_depth(max_depth, fc.size(1), op);
}

// Values of the child links (host int64 tensors): first_child[b, u] and next_sibling[b, u] are
// -1 or a node in (u, n) -- what build produces, and what makes every walk end (tree.h link_ok).
inline void check_link_values(const at::Tensor& fc_h, const at::Tensor& ns_h, const char* op) {
  const int64_t B = fc_h.size(0), n = fc_h.size(1);
  const int64_t* fc = fc_h.data_ptr<int64_t>();
  const int64_t* ns = ns_h.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t u = 0; u < n; ++u) {
      const int64_t f = fc[b * n + u], s = ns[b * n + u];
      require(f == -1 || link_ok(f, u, n), Err::Runtime, op, "first_child[", b, ", ", u, "] = ", f,
              " is not -1 or a node in (", u, ", n = ", n, ") (corrupt child link; use tree.build)");
      require(s == -1 || link_ok(s, u, n), Err::Runtime, op, "next_sibling[", b, ", ", u, "] = ", s,
              " is not -1 or a node in (", u, ", n = ", n, ") (corrupt child link; use tree.build)");
    }
}

// fc / ns: the int64 contiguous links the kernels read. CPU: always; CUDA: with check (one
// device-to-host copy).
inline void validate_greedy_values(const at::Tensor& fc, const at::Tensor& ns, bool check) {
  if (fc.is_cpu()) return check_link_values(fc, ns, "verify_greedy");
  if (!check) return;
  auto host = at::stack({fc, ns}).cpu();
  check_link_values(host[0], host[1], "verify_greedy");
}

// The nodes verification can visit (host int64 links, already validated or guarded): the root
// and every first_child / next_sibling target. For trees from tree.build these are exactly the
// real (non-padding) nodes.
inline std::vector<char> visited_nodes(const int64_t* fc, const int64_t* ns, int64_t n) {
  std::vector<char> seen(static_cast<size_t>(n), 0);
  seen[0] = 1;
  for (int64_t u = 0; u < n; ++u) {
    if (link_ok(fc[u], u, n)) seen[fc[u]] = 1;
    if (link_ok(ns[u], u, n)) seen[ns[u]] = 1;
  }
  return seen;
}

// Draft tokens (host int64) of every linked node (the root's token is never used) must lie in
// [0, V). After check_link_values. Reports the lowest such node of the first offending tree.
inline void check_draft_values(const at::Tensor& fc_h, const at::Tensor& ns_h, const at::Tensor& draft_h, int64_t V,
                               const char* op) {
  const int64_t B = fc_h.size(0), n = fc_h.size(1);
  const int64_t* fc = fc_h.data_ptr<int64_t>();
  const int64_t* ns = ns_h.data_ptr<int64_t>();
  const int64_t* dt = draft_h.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const auto seen = visited_nodes(fc + b * n, ns + b * n, n);
    for (int64_t c = 1; c < n; ++c) {
      const int64_t t = dt[b * n + c];
      require(!seen[c] || (t >= 0 && t < V), Err::Runtime, op, "draft_tokens[", b, ", ", c, "] = ", t,
              " is not in [0, V = ", V, ")");
    }
  }
}

struct SamplingDims {
  int64_t B, n, V;
  VerifyMode mode;
};

inline SamplingDims check_verify_sampling_args(const at::Tensor& fc, const at::Tensor& ns, const at::Tensor& draft,
                                               const at::Tensor& tp, const std::optional<at::Tensor>& dp,
                                               const at::Tensor& coins, const at::Tensor& bonus_u,
                                               int64_t max_depth, std::string_view mode) {
  const char* op = "verify_sampling";
  check_tree_links(fc, ns, op);
  check_node_tokens(fc, draft, op, "draft_tokens");
  const int64_t B = fc.size(0), n = fc.size(1);
  require(tp.is_floating_point(), Err::Type, op, "target_probs must be a floating-point tensor, got ",
          tp.scalar_type());
  require(tp.dim() == 3 && tp.size(0) == B && tp.size(1) == n, Err::Value, op, "target_probs must have shape (", B,
          ", ", n, ", V), got ", tp.sizes());
  check_device(fc, tp, op, "the tree", "target_probs", Err::Value);
  const int64_t V = tp.size(2);
  require(V >= 1, Err::Value, op, "the vocabulary must not be empty (target_probs of shape ", tp.sizes(), ")");
  if (dp.has_value()) {
    require(dp->is_floating_point(), Err::Type, op, "draft_probs must be a floating-point tensor, got ",
            dp->scalar_type());
    require(dp->sizes() == tp.sizes(), Err::Value, op, "draft_probs ", dp->sizes(), " must match target_probs ",
            tp.sizes());
    check_device(fc, *dp, op, "the tree", "draft_probs", Err::Value);
  }
  require(coins.is_floating_point(), Err::Type, op, "coins must be a floating-point tensor, got ",
          coins.scalar_type());
  require(coins.sizes() == fc.sizes(), Err::Value, op, "coins must have shape ", shape_str({B, n}), ", got ",
          coins.sizes());
  check_device(fc, coins, op, "the tree", "coins", Err::Value);
  require(bonus_u.is_floating_point(), Err::Type, op, "bonus_u must be a floating-point tensor, got ",
          bonus_u.scalar_type());
  require(bonus_u.dim() == 1 && bonus_u.size(0) == B, Err::Value, op, "bonus_u must have shape ", shape_str({B}),
          ", got ", bonus_u.sizes());
  check_device(fc, bonus_u, op, "the tree", "bonus_u", Err::Value);
  check_max_depth(max_depth, n, op);
  return {B, n, V, parse_verify_mode(mode)};
}

// Allowed |row sum - 1| of a probability tensor of `dtype`: rounding each entry of a normalised
// row to the dtype moves the sum by <= eps/2 (bf16: 2^-9), so 1e-3 or the dtype's eps, whichever
// is larger.
inline double prob_sum_tolerance(at::ScalarType dtype) {
  double eps = std::numeric_limits<double>::epsilon();
  switch (dtype) {
    case at::kFloat: eps = std::numeric_limits<float>::epsilon(); break;
    case at::kHalf: eps = 0.0009765625; break;        // 2^-10
    case at::kBFloat16: eps = 0.0078125; break;       // 2^-7
    default: break;
  }
  return std::max(1e-3, eps);
}

// Per-row (B, n) fp64 sums and minima of a (B, n, V) probability tensor, on its device (no sync).
inline std::pair<at::Tensor, at::Tensor> prob_row_stats(const at::Tensor& p) {
  return {at::sum(p, {-1}, false, at::kDouble), std::get<0>(p.min(-1)).to(at::kDouble)};
}

// The rows verification reads (the root's and the linked nodes') of a probability tensor are
// distributions: entries >= 0, finite, summing to 1 within prob_sum_tolerance. Host fp64 stats.
inline void check_prob_values(const at::Tensor& fc_h, const at::Tensor& ns_h, const at::Tensor& sum_h,
                              const at::Tensor& min_h, double tol, const char* name) {
  const int64_t B = fc_h.size(0), n = fc_h.size(1);
  const int64_t* fc = fc_h.data_ptr<int64_t>();
  const int64_t* ns = ns_h.data_ptr<int64_t>();
  const double* s = sum_h.data_ptr<double>();
  const double* m = min_h.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    const auto seen = visited_nodes(fc + b * n, ns + b * n, n);
    for (int64_t i = 0; i < n; ++i) {
      const double sum = s[b * n + i];
      if (!seen[i] || (std::isfinite(sum) && std::abs(sum - 1.0) <= tol && !(m[b * n + i] < 0))) continue;
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.6g", sum);
      require(false, Err::Value, "verify_sampling", name, "[", b, ", ", i,
              "] is not a probability distribution (sum ", buf, ", entries must be >= 0 and sum to 1)");
    }
  }
}

// fc / ns / draft: the int64 contiguous tensors the kernels read; tp / dp the probabilities as
// given. CPU: links and tokens always, probability rows with check; CUDA: all of it with check,
// in one device-to-host copy.
inline void validate_sampling_values(const at::Tensor& fc, const at::Tensor& ns, const at::Tensor& draft,
                                     const at::Tensor& tp, const std::optional<at::Tensor>& dp, int64_t V,
                                     bool check) {
  const char* op = "verify_sampling";
  if (!fc.is_cpu() && !check) return;
  std::vector<at::Tensor> parts{fc, ns, draft};
  if (check) {   // fp64 row statistics, bit-cast to int64 so that one copy carries everything
    for (const at::Tensor* p : {&tp, dp.has_value() ? &*dp : nullptr}) {
      if (!p) continue;
      auto [sum, mn] = prob_row_stats(*p);
      parts.push_back(sum.view(at::kLong));
      parts.push_back(mn.view(at::kLong));
    }
  }
  auto host = host_copy(at::stack(parts));
  check_link_values(host[0], host[1], op);
  check_draft_values(host[0], host[1], host[2], V, op);
  if (!check) return;
  check_prob_values(host[0], host[1], host[3].view(at::kDouble), host[4].view(at::kDouble),
                    prob_sum_tolerance(tp.scalar_type()), "target_probs");
  if (dp.has_value())
    check_prob_values(host[0], host[1], host[5].view(at::kDouble), host[6].view(at::kDouble),
                      prob_sum_tolerance(dp->scalar_type()), "draft_probs");
}

// ---------------------------------------------------------------------------------- dynamic trees

struct FrontierDims {
  int64_t B, F, K;
};

inline FrontierDims check_select_frontier_args(const at::Tensor& cum, const at::Tensor& child, int64_t m) {
  const char* op = "select_frontier";
  require(cum.dim() == 2 && cum.is_floating_point(), Err::Runtime, op,
          "cum_logp must be a floating (B, F) tensor, got ", cum.scalar_type(), " ", cum.sizes());
  require(child.dim() == 3 && child.is_floating_point() && child.size(0) == cum.size(0) &&
              child.size(1) == cum.size(1),
          Err::Runtime, op, "child_logp must be a floating (B, F, K) tensor with B, F of cum_logp ", cum.sizes(),
          ", got ", child.scalar_type(), " ", child.sizes());
  check_device(cum, child, op, "cum_logp", "child_logp");
  const int64_t B = cum.size(0), F = cum.size(1), K = child.size(2);
  require(m >= 0 && m <= F * K, Err::Runtime, op, "m = ", m, " must lie in [0, F*K = ", F * K, "]");
  return {B, F, K};
}

struct SelectTreeDims {
  int64_t B, T;
};

inline SelectTreeDims check_select_tree_args(const at::Tensor& cum, const at::Tensor& parents, int64_t n) {
  const char* op = "select_tree";
  require(cum.dim() == 2 && cum.is_floating_point(), Err::Runtime, op,
          "cum_logp must be a floating (B, T) tensor, got ", cum.scalar_type(), " ", cum.sizes());
  check_index_tensor(parents, op, "parents", 2);
  require(parents.sizes() == cum.sizes(), Err::Runtime, op, "parents ", parents.sizes(), " must match cum_logp ",
          cum.sizes());
  check_device(cum, parents, op, "cum_logp", "parents");
  const int64_t B = cum.size(0), T = cum.size(1);
  require(n >= 1 && n <= T, Err::Runtime, op, "n = ", n, " must lie in [1, T = ", T, "]");
  return {B, T};
}

// parents (int64 contiguous): always validated, on both devices (the selection walks rely on
// them; one host sync on CUDA).
inline void validate_select_tree_values(const at::Tensor& parents) {
  check_parent_values(host_copy(parents), at::Tensor(), "select_tree");
}

// ------------------------------------------------------------------------ CUDA kernels' limits
// What the CUDA kernels support beyond the contract (one block per tree, node data in shared
// memory; head dims in warp-sized slices). Called by the CUDA adapter only.

inline void check_cuda_nodes(int64_t count, const char* op, const char* what) {
  require(count <= kMaxCudaNodes, Err::Runtime, op, what, " = ", count, " > ", kMaxCudaNodes,
          " is not supported on CUDA");
}

inline void check_cuda_head_dim(const AttnDims& d) {
  require(d.D % 32 == 0 && d.D <= 256, Err::Runtime, "attention", "head dim D = ", d.D,
          " is not supported on CUDA (needs a multiple of 32, at most 256)");
}

}  // namespace tree
}  // namespace tokenkernels
