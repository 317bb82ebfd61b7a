// tree family: CUDA adapter (compiled by the host C++ compiler; kernels in tree_kernels.cu).
// Every argument check and option parse is in tree_args.h, shared with the CPU kernels, so the
// errors are the CPU's. No host syncs, except the value validations of check=true (one
// device-to-host copy each -- build: parents and tree_lens; attention: prefix_lens, tree_lens,
// block_table; verify_greedy: child links; verify_sampling: child links, draft tokens and the
// probability rows' sums) and select_tree (parents are always validated there, like the CPU
// path). With check=false bad values give the documented, in-bounds results of the kernels
// (tree.h) instead of an error.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cuda_glue.h"
#include "tree/tree_args.h"
#include "tokenkernels/tree.h"

namespace tokenkernels {
namespace tree {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_cuda(const at::Tensor& parents_in,
                                                                       const std::optional<at::Tensor>& tree_lens,
                                                                       bool check, c10::string_view impl) {
  const auto a = check_build_args(parents_in, tree_lens, impl);
  const int64_t B = a.B, n = a.n;
  check_cuda_nodes(n, "build", "n");
  c10::DeviceGuard guard(parents_in.device());
  auto parents = long_contig(parents_in);
  auto lens = opt_long_contig(tree_lens);
  validate_build_values(parents, lens, check);
  auto opts = parents.options();
  auto mask = at::empty({B, n, mask_words(n)}, opts.dtype(at::kInt));
  auto depth = at::empty({B, n}, opts), fc = at::empty({B, n}, opts), ns = at::empty({B, n}, opts);
  check_cuda(launch_build(parents.data_ptr<int64_t>(), opt_ptr<int64_t>(lens), B, n, mask.data_ptr<int32_t>(),
                          depth.data_ptr<int64_t>(), fc.data_ptr<int64_t>(), ns.data_ptr<int64_t>(),
                          a.impl, current_cuda_stream(parents_in.device())),
             "tree build");
  return {mask, depth, fc, ns};
}

at::Tensor paths_cuda(const at::Tensor& parents_in, const at::Tensor& depth_in, const at::Tensor& fc_in,
                      const std::optional<at::Tensor>& tree_lens, int64_t max_leaves, int64_t max_depth) {
  check_paths_args(parents_in, depth_in, fc_in, tree_lens, max_leaves, max_depth);
  const int64_t B = parents_in.size(0), n = parents_in.size(1);
  c10::DeviceGuard guard(parents_in.device());
  auto parents = long_contig(parents_in), depth = long_contig(depth_in), fc = long_contig(fc_in);
  auto lens = opt_long_contig(tree_lens);
  auto paths = at::empty({B, max_leaves, max_depth + 1}, parents.options());
  check_cuda(launch_paths(parents.data_ptr<int64_t>(), depth.data_ptr<int64_t>(), fc.data_ptr<int64_t>(),
                          opt_ptr<int64_t>(lens), B, n, max_leaves, max_depth, paths.data_ptr<int64_t>(),
                          current_cuda_stream(parents_in.device())),
             "tree paths");
  return paths;
}

// After check_attention_args / check_attention_out_args.
void run_attention(const AttnDims& d, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                   const at::Tensor& prefix_lens, const at::Tensor& mask_in,
                   const std::optional<at::Tensor>& tree_lens, const std::optional<at::Tensor>& block_table,
                   double scale, bool check, const at::Tensor& out, const at::Tensor& lse) {
  check_cuda_head_dim(d);
  c10::DeviceGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), mask = mask_in.contiguous();
  auto P = long_contig(prefix_lens);
  auto lens = opt_long_contig(tree_lens);
  auto table = opt_long_contig(block_table);
  validate_attention_values(d, P, lens, table, check);   // with check: one host sync
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
  auto ws = at::empty({static_cast<int64_t>(attention_workspace_bytes(p, d.impl))}, q.options().dtype(at::kByte));
  check_cuda(launch_attention(p, d.impl, ws.data_ptr(), current_cuda_stream(q_in.device())), "tree attention");
}

void attention_out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_lens,
                        const at::Tensor& mask, const std::optional<at::Tensor>& tree_lens,
                        const std::optional<at::Tensor>& block_table, double scale, bool check, c10::string_view impl,
                        const at::Tensor& out, const at::Tensor& lse) {
  const auto d = check_attention_args(q, k, v, prefix_lens, mask, tree_lens, block_table, impl);
  check_attention_out_args(q, d, out, lse);
  run_attention(d, q, k, v, prefix_lens, mask, tree_lens, block_table, scale, check, out, lse);
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& prefix_lens, const at::Tensor& mask,
                                                  const std::optional<at::Tensor>& tree_lens,
                                                  const std::optional<at::Tensor>& block_table, double scale,
                                                  bool check, c10::string_view impl) {
  const auto d = check_attention_args(q, k, v, prefix_lens, mask, tree_lens, block_table, impl);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({d.B, d.n, d.Hq}, q.options().dtype(at::kFloat));
  run_attention(d, q, k, v, prefix_lens, mask, tree_lens, block_table, scale, check, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_outputs(const at::Tensor& fc, int64_t max_depth) {
  const int64_t B = fc.size(0);
  auto opts = fc.options().dtype(at::kLong);
  return {at::empty({B, max_depth + 1}, opts), at::empty({B}, opts), at::empty({B}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& fc_in, const at::Tensor& ns_in,
                                                                   const at::Tensor& draft_in,
                                                                   const at::Tensor& argmax_in, int64_t max_depth,
                                                                   bool check) {
  check_verify_greedy_args(fc_in, ns_in, draft_in, argmax_in, max_depth);
  c10::DeviceGuard guard(fc_in.device());
  auto fc = long_contig(fc_in), ns = long_contig(ns_in), draft = long_contig(draft_in), am = long_contig(argmax_in);
  validate_greedy_values(fc, ns, check);   // with check: one host sync; else corrupt links end the walk
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
    bool check, c10::string_view mode) {
  const auto dims =
      check_verify_sampling_args(fc_in, ns_in, draft_in, tp_in, dp_in, coins_in, bu_in, max_depth, mode);
  const int64_t B = dims.B, n = dims.n, V = dims.V;
  c10::DeviceGuard guard(fc_in.device());
  auto fc = long_contig(fc_in), ns = long_contig(ns_in), draft = long_contig(draft_in);
  validate_sampling_values(fc, ns, draft, tp_in, dp_in, V, check);   // with check: one host sync
  // Probabilities in fp32 (exact for fp32/fp16/bf16), or fp64 if either is fp64; the residual,
  // coins and every decision in fp64, as on CPU.
  const bool f64 = tp_in.scalar_type() == at::kDouble || (dp_in.has_value() && dp_in->scalar_type() == at::kDouble);
  const auto pt = f64 ? at::kDouble : at::kFloat;
  auto tp = tp_in.to(pt).contiguous();
  auto dp = dp_in.has_value() ? dp_in->to(pt).contiguous() : at::Tensor();
  auto coins = coins_in.to(at::kDouble).contiguous(), bu = bu_in.to(at::kDouble).contiguous();
  auto [acc, alen, bonus] = verify_outputs(fc, max_depth);
  auto work = at::empty({verify_sampling_workspace(B, V, dims.mode, dp.defined())}, tp.options().dtype(at::kDouble));
  check_cuda(launch_verify_sampling(fc.data_ptr<int64_t>(), ns.data_ptr<int64_t>(), draft.data_ptr<int64_t>(),
                                    tp.data_ptr(), dp.defined() ? dp.data_ptr() : nullptr, f64,
                                    coins.data_ptr<double>(), bu.data_ptr<double>(), B, n, V, max_depth, dims.mode,
                                    acc.data_ptr<int64_t>(), alen.data_ptr<int64_t>(), bonus.data_ptr<int64_t>(),
                                    work.data_ptr<double>(), current_cuda_stream(fc_in.device())),
             "tree verify_sampling");
  return {acc, alen, bonus};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_frontier_cuda(const at::Tensor& cum_in,
                                                                     const at::Tensor& child_in, int64_t m) {
  const auto dims = check_select_frontier_args(cum_in, child_in, m);
  const int64_t B = dims.B, F = dims.F, K = dims.K;
  check_cuda_nodes(F * K, "select_frontier", "F*K");
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
  const auto dims = check_select_tree_args(cum_in, par_in, n);
  const int64_t B = dims.B, T = dims.T;
  check_cuda_nodes(T, "select_tree", "T");
  c10::DeviceGuard guard(cum_in.device());
  auto cum = cum_in.to(at::kFloat).contiguous();
  auto parents = long_contig(par_in);
  validate_select_tree_values(parents);   // the walks below rely on valid parents (one host sync)
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
