// tree family: CUDA adapter (compiled by the host C++ compiler; kernels in tree_kernels.cu).
// No host syncs, except the value validations of check=true (build: parents and tree_lens;
// attention: prefix_lens, tree_lens, block_table; verify_sampling: child links and draft tokens --
// the same checks and messages as the CPU path, on host copies) and select_tree (parents are
// always validated there, like the CPU path). With check=false bad values give the documented,
// in-bounds results of the kernels (tree.h) instead of an error.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cuda_glue.h"
#include "tree/tree_args.h"
#include "tokenkernels/tree.h"

namespace tokenkernels {
namespace tree {
namespace {

at::Tensor long_contig(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }
at::Tensor opt_long(const std::optional<at::Tensor>& t) { return t.has_value() ? long_contig(*t) : at::Tensor(); }

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kBFloat16;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_cuda(const at::Tensor& parents_in,
                                                                       const std::optional<at::Tensor>& tree_lens,
                                                                       bool check, int64_t impl) {
  check_index_tensor(parents_in, "build", "parents", 2);
  const int64_t B = parents_in.size(0), n = parents_in.size(1);
  TORCH_CHECK(n >= 1, "tokenkernels.tree.build: parents must have at least one node (the root)");
  TORCH_CHECK(n <= kMaxCudaNodes, "tokenkernels.tree.build: n = ", n, " > ", kMaxCudaNodes,
              " nodes is not supported on CUDA");
  check_lens_shape(tree_lens, parents_in, B, "build", "tree_lens");
  c10::DeviceGuard guard(parents_in.device());
  auto parents = long_contig(parents_in);
  auto lens = opt_long(tree_lens);
  if (check) check_parent_values(parents.cpu(), lens.defined() ? lens.cpu() : at::Tensor(), "build");
  auto opts = parents.options();
  auto mask = at::empty({B, n, mask_words(n)}, opts.dtype(at::kInt));
  auto depth = at::empty({B, n}, opts), fc = at::empty({B, n}, opts), ns = at::empty({B, n}, opts);
  check_cuda(launch_build(parents.data_ptr<int64_t>(), opt_ptr<int64_t>(lens), B, n, mask.data_ptr<int32_t>(),
                          depth.data_ptr<int64_t>(), fc.data_ptr<int64_t>(), ns.data_ptr<int64_t>(),
                          static_cast<int>(impl), current_cuda_stream(parents_in.device())),
             "tree build");
  return {mask, depth, fc, ns};
}

at::Tensor paths_cuda(const at::Tensor& parents_in, const at::Tensor& depth_in, const at::Tensor& fc_in,
                      const std::optional<at::Tensor>& tree_lens, int64_t max_leaves, int64_t max_depth) {
  check_paths_args(parents_in, depth_in, fc_in, tree_lens, max_leaves, max_depth);
  const int64_t B = parents_in.size(0), n = parents_in.size(1);
  c10::DeviceGuard guard(parents_in.device());
  auto parents = long_contig(parents_in), depth = long_contig(depth_in), fc = long_contig(fc_in);
  auto lens = opt_long(tree_lens);
  auto paths = at::empty({B, max_leaves, max_depth + 1}, parents.options());
  check_cuda(launch_paths(parents.data_ptr<int64_t>(), depth.data_ptr<int64_t>(), fc.data_ptr<int64_t>(),
                          opt_ptr<int64_t>(lens), B, n, max_leaves, max_depth, paths.data_ptr<int64_t>(),
                          current_cuda_stream(parents_in.device())),
             "tree paths");
  return paths;
}

void attention_out_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const at::Tensor& prefix_lens, const at::Tensor& mask_in,
                        const std::optional<at::Tensor>& tree_lens, const std::optional<at::Tensor>& block_table,
                        double scale, bool check, int64_t impl, const at::Tensor& out, const at::Tensor& lse) {
  auto d = check_attention_args(q_in, k_in, v_in, prefix_lens, mask_in, tree_lens, block_table);
  check_out_args(q_in, d, out, lse);
  TORCH_CHECK(d.D % 32 == 0 && d.D <= 256, "tokenkernels.tree.attention: head dim D = ", d.D,
              " is not supported on CUDA (needs a multiple of 32, at most 256)");
  c10::DeviceGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), mask = mask_in.contiguous();
  auto P = long_contig(prefix_lens);
  auto lens = opt_long(tree_lens);
  auto table = opt_long(block_table);
  if (check) {   // one D2H copy of (prefix_lens, tree_lens, block_table)
    std::vector<at::Tensor> parts{P};
    if (lens.defined()) parts.push_back(lens);
    if (table.defined()) parts.push_back(table.reshape({-1}));
    auto host = at::cat(parts).cpu();
    int64_t off = d.B;
    at::Tensor P_h = host.narrow(0, 0, d.B), lens_h, table_h;
    if (lens.defined()) {
      lens_h = host.narrow(0, off, d.B);
      off += d.B;
    }
    if (table.defined()) table_h = host.narrow(0, off, d.B * d.max_pages).view({d.B, d.max_pages});
    check_attention_values(d, P_h, lens_h, table_h);
  }
  AttnProblem p;
  p.B = d.B;
  p.n = d.n;
  p.Hq = d.Hq;
  p.Hkv = d.Hkv;
  p.D = d.D;
  p.dtype = to_dtype(q.scalar_type());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.prefix_lens = P.data_ptr<int64_t>();
  p.mask = mask.data_ptr<int32_t>();
  p.tree_lens = opt_ptr<int64_t>(lens);
  p.block_table = opt_ptr<int64_t>(table);
  p.N_max = d.N_max;
  p.page_size = d.paged ? d.page_size : 1;
  p.max_pages = d.max_pages;
  p.num_pages = d.num_pages;
  // Positions per request from the shapes alone (no sync): the cache capacity (0 without pages).
  p.max_prefix = d.paged ? (d.num_pages > 0 ? d.max_pages * d.page_size : 0) : d.N_max;
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  auto ws = at::empty({static_cast<int64_t>(attention_workspace_bytes(p))}, q.options().dtype(at::kByte));
  check_cuda(launch_attention(p, static_cast<int>(impl), ws.data_ptr(), current_cuda_stream(q_in.device())),
             "tree attention");
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& prefix_lens, const at::Tensor& mask,
                                                  const std::optional<at::Tensor>& tree_lens,
                                                  const std::optional<at::Tensor>& block_table, double scale,
                                                  bool check, int64_t impl) {
  TORCH_CHECK(q.dim() == 4, "tokenkernels.tree.attention: q must be 4-D (B, n, H_q, D), got shape ", q.sizes());
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  attention_out_cuda(q, k, v, prefix_lens, mask, tree_lens, block_table, scale, check, impl, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_outputs(const at::Tensor& fc, int64_t max_depth) {
  const int64_t B = fc.size(0);
  auto opts = fc.options().dtype(at::kLong);
  return {at::empty({B, max_depth + 1}, opts), at::empty({B}, opts), at::empty({B}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& fc_in, const at::Tensor& ns_in,
                                                                   const at::Tensor& draft_in,
                                                                   const at::Tensor& argmax_in, int64_t max_depth) {
  check_verify_args(fc_in, ns_in, draft_in, "verify_greedy");
  check_index_tensor(argmax_in, "verify_greedy", "target_argmax", 2);
  TORCH_CHECK(argmax_in.sizes() == fc_in.sizes(), "tokenkernels.tree.verify_greedy: target_argmax ", argmax_in.sizes(),
              " must match the tree's (B, n) = ", fc_in.sizes());
  check_device(fc_in, argmax_in, "verify_greedy", "tree", "target_argmax");
  check_max_depth(max_depth, "verify_greedy");
  c10::DeviceGuard guard(fc_in.device());
  auto fc = long_contig(fc_in), ns = long_contig(ns_in), draft = long_contig(draft_in), am = long_contig(argmax_in);
  auto [acc, alen, bonus] = verify_outputs(fc, max_depth);
  check_cuda(launch_verify_greedy(fc.data_ptr<int64_t>(), ns.data_ptr<int64_t>(), draft.data_ptr<int64_t>(),
                                  am.data_ptr<int64_t>(), fc.size(0), fc.size(1), max_depth, acc.data_ptr<int64_t>(),
                                  alen.data_ptr<int64_t>(), bonus.data_ptr<int64_t>(),
                                  current_cuda_stream(fc_in.device())),
             "tree verify_greedy");
  return {acc, alen, bonus};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sampling_cuda(
    const at::Tensor& fc_in, const at::Tensor& ns_in, const at::Tensor& draft_in, const at::Tensor& tp_in,
    const std::optional<at::Tensor>& dp_in, const at::Tensor& coins_in, const at::Tensor& bu_in, int64_t max_depth,
    bool check) {
  const char* op = "verify_sampling";
  check_verify_args(fc_in, ns_in, draft_in, op);
  const int64_t B = fc_in.size(0), n = fc_in.size(1);
  TORCH_CHECK(tp_in.dim() == 3 && tp_in.size(0) == B && tp_in.size(1) == n && tp_in.is_floating_point(),
              "tokenkernels.tree.verify_sampling: target_probs must be floating point of shape (", B, ", ", n,
              ", V), got ", tp_in.sizes());
  check_device(fc_in, tp_in, op, "tree", "target_probs");
  const int64_t V = tp_in.size(2);
  TORCH_CHECK(V >= 1, "tokenkernels.tree.verify_sampling: the vocabulary must not be empty");
  if (dp_in.has_value()) {
    TORCH_CHECK(dp_in->sizes() == tp_in.sizes() && dp_in->is_floating_point(),
                "tokenkernels.tree.verify_sampling: draft_probs must be floating point with target_probs' shape ",
                tp_in.sizes(), ", got ", dp_in->sizes());
    check_device(fc_in, *dp_in, op, "tree", "draft_probs");
  }
  TORCH_CHECK(coins_in.dim() == 2 && coins_in.size(0) == B && coins_in.size(1) == n && coins_in.is_floating_point(),
              "tokenkernels.tree.verify_sampling: coins must be floating point of shape (", B, ", ", n, "), got ",
              coins_in.sizes());
  TORCH_CHECK(bu_in.dim() == 1 && bu_in.size(0) == B && bu_in.is_floating_point(),
              "tokenkernels.tree.verify_sampling: bonus_u must be floating point of shape (", B, ",), got ",
              bu_in.sizes());
  check_device(fc_in, coins_in, op, "tree", "coins");
  check_device(fc_in, bu_in, op, "tree", "bonus_u");
  check_max_depth(max_depth, "verify_sampling");
  c10::DeviceGuard guard(fc_in.device());
  auto fc = long_contig(fc_in), ns = long_contig(ns_in), draft = long_contig(draft_in);
  if (check) {   // one D2H copy of (first_child, next_sibling, draft_tokens)
    auto host = at::stack({fc, ns, draft}).cpu();
    check_link_values(host[0], host[1], op);
    check_draft_values(host[0], host[1], host[2], V, op);
  }
  // Probabilities in fp32 (exact for fp32/fp16/bf16), or fp64 if either is fp64; the residual,
  // coins and every decision in fp64, as on CPU.
  const bool f64 = tp_in.scalar_type() == at::kDouble || (dp_in.has_value() && dp_in->scalar_type() == at::kDouble);
  const auto pt = f64 ? at::kDouble : at::kFloat;
  auto tp = tp_in.to(pt).contiguous();
  auto dp = dp_in.has_value() ? dp_in->to(pt).contiguous() : at::Tensor();
  auto coins = coins_in.to(at::kDouble).contiguous(), bu = bu_in.to(at::kDouble).contiguous();
  auto [acc, alen, bonus] = verify_outputs(fc, max_depth);
  auto work = at::empty({B, V}, tp.options().dtype(at::kDouble));
  check_cuda(launch_verify_sampling(fc.data_ptr<int64_t>(), ns.data_ptr<int64_t>(), draft.data_ptr<int64_t>(),
                                    tp.data_ptr(), dp.defined() ? dp.data_ptr() : nullptr, f64,
                                    coins.data_ptr<double>(), bu.data_ptr<double>(), B, n, V, max_depth,
                                    acc.data_ptr<int64_t>(), alen.data_ptr<int64_t>(), bonus.data_ptr<int64_t>(),
                                    work.data_ptr<double>(), current_cuda_stream(fc_in.device())),
             "tree verify_sampling");
  return {acc, alen, bonus};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_frontier_cuda(const at::Tensor& cum_in,
                                                                     const at::Tensor& child_in, int64_t m) {
  TORCH_CHECK(cum_in.dim() == 2 && cum_in.is_floating_point(), "tokenkernels.tree.select_frontier: cum_logp must be "
              "a floating (B, F) tensor, got ", cum_in.scalar_type(), " ", cum_in.sizes());
  TORCH_CHECK(child_in.dim() == 3 && child_in.is_floating_point() && child_in.size(0) == cum_in.size(0) &&
                  child_in.size(1) == cum_in.size(1),
              "tokenkernels.tree.select_frontier: child_logp must be a floating (B, F, K) tensor with B, F of "
              "cum_logp ", cum_in.sizes(), ", got ", child_in.sizes());
  check_device(cum_in, child_in, "select_frontier", "cum_logp", "child_logp");
  const int64_t B = cum_in.size(0), F = cum_in.size(1), K = child_in.size(2);
  TORCH_CHECK(m >= 0 && m <= F * K, "tokenkernels.tree.select_frontier: m = ", m, " must lie in [0, F*K = ", F * K, "]");
  TORCH_CHECK(F * K <= kMaxCudaNodes, "tokenkernels.tree.select_frontier: F*K = ", F * K, " > ", kMaxCudaNodes,
              " is not supported on CUDA");
  c10::DeviceGuard guard(cum_in.device());
  auto cum = cum_in.to(at::kFloat).contiguous(), child = child_in.to(at::kFloat).contiguous();
  auto lopt = cum.options().dtype(at::kLong);
  auto parent = at::empty({B, m}, lopt), rank = at::empty({B, m}, lopt), score = at::empty({B, m}, cum.options());
  check_cuda(launch_select_frontier(cum.data_ptr<float>(), child.data_ptr<float>(), B, F, K, m,
                                    parent.data_ptr<int64_t>(), rank.data_ptr<int64_t>(), score.data_ptr<float>(),
                                    current_cuda_stream(cum_in.device())),
             "tree select_frontier");
  return {parent, rank, score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_tree_cuda(const at::Tensor& cum_in, const at::Tensor& par_in,
                                                                 int64_t n) {
  TORCH_CHECK(cum_in.dim() == 2 && cum_in.is_floating_point(), "tokenkernels.tree.select_tree: cum_logp must be a "
              "floating (B, T) tensor, got ", cum_in.scalar_type(), " ", cum_in.sizes());
  check_index_tensor(par_in, "select_tree", "parents", 2);
  TORCH_CHECK(par_in.sizes() == cum_in.sizes(), "tokenkernels.tree.select_tree: parents ", par_in.sizes(),
              " must match cum_logp ", cum_in.sizes());
  check_device(cum_in, par_in, "select_tree", "cum_logp", "parents");
  const int64_t B = cum_in.size(0), T = cum_in.size(1);
  TORCH_CHECK(n >= 1 && n <= T, "tokenkernels.tree.select_tree: n = ", n, " must lie in [1, T = ", T, "]");
  TORCH_CHECK(T <= kMaxCudaNodes, "tokenkernels.tree.select_tree: T = ", T, " > ", kMaxCudaNodes,
              " is not supported on CUDA");
  c10::DeviceGuard guard(cum_in.device());
  auto cum = cum_in.to(at::kFloat).contiguous();
  auto parents = long_contig(par_in);
  check_parent_values(parents.cpu(), at::Tensor(), "select_tree");   // walks below rely on valid parents
  auto lopt = parents.options();
  auto idx = at::empty({B, n}, lopt), newp = at::empty({B, n}, lopt), score = at::empty({B, n}, cum.options());
  check_cuda(launch_select_tree(cum.data_ptr<float>(), parents.data_ptr<int64_t>(), B, T, n, idx.data_ptr<int64_t>(),
                                newp.data_ptr<int64_t>(), score.data_ptr<float>(), current_cuda_stream(cum_in.device())),
             "tree select_tree");
  return {idx, newp, score};
}

}  // namespace
}  // namespace tree
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CUDA, m) {
  m.impl("tree_build", &tokenkernels::tree::build_cuda);
  m.impl("tree_paths", &tokenkernels::tree::paths_cuda);
  m.impl("tree_attention", &tokenkernels::tree::attention_cuda);
  m.impl("tree_attention_out", &tokenkernels::tree::attention_out_cuda);
  m.impl("tree_verify_greedy", &tokenkernels::tree::verify_greedy_cuda);
  m.impl("tree_verify_sampling", &tokenkernels::tree::verify_sampling_cuda);
  m.impl("tree_select_frontier", &tokenkernels::tree::select_frontier_cuda);
  m.impl("tree_select_tree", &tokenkernels::tree::select_tree_cuda);
}
