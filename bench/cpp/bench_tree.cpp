// tree family: tokenkernels::tree_* ops against ATen baselines.
//   build     vs an ATen port of the reference's vectorised ancestor walk (dense (n, n) matrix,
//             one gather per tree level, then packed to bits);
//   attention vs the dense-mask SDPA baseline (at::scaled_dot_product_attention with a
//             (B, 1, n, prefix + n) bool mask, GQA) and, as the floor, an unmasked SDPA of the
//             same n queries over the same keys (a plain n-query decode);
//   verify_greedy: op only (the reference is a Python loop; see python -m tokenkernels.bench).
// Trees: Medusa's default 63-node tree (64 nodes with the root) for attention and verify -- its
// parents come from tokenkernels.testing.MEDUSA_63 through --medusa63 (the runner passes them),
// not from a copy here -- and random trees (uniform attachment, fixed seed) for build. Heads:
// Llama-3-8B (32 q, 8 kv, D 128).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bench.h"

namespace {

using tkbench::Context;
using tkbench::Row;
using OptT = std::optional<at::Tensor>;

// Schemas (csrc/registration.cpp), tree block.
using BuildSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptT&, bool,
                                                                            c10::string_view);
using AttnSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                                                   double, bool, c10::string_view);
using GreedySig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, int64_t, bool);

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& op(const char* name) {
  static auto h = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return h;
}

// (B, n) parents of the Medusa tree given by --medusa63 (n = 64 with the root).
at::Tensor medusa_parents(const Context& ctx, int64_t B) {
  const auto& p = ctx.opt.medusa63;
  return at::tensor(p, at::kLong).unsqueeze(0).expand({B, (int64_t)p.size()}).contiguous();
}

at::Tensor random_parents(int64_t B, int64_t n, uint64_t seed) {
  at::manual_seed(seed);
  auto p = (at::rand({B, n}) * at::arange(n, at::kFloat)).to(at::kLong);
  p.select(1, 0).fill_(-1);
  return p;
}

// ATen port of the reference build's mask/depth part (python/tokenkernels/reference/tree.py).
std::tuple<at::Tensor, at::Tensor> ref_build(const at::Tensor& parents) {
  const int64_t B = parents.size(0), n = parents.size(1);
  auto dense = at::zeros({B, n, n}, at::kBool);
  auto cur = at::arange(n, at::kLong).expand({B, n}).contiguous();
  auto depth = at::zeros({B, n}, at::kLong);
  auto bi = at::arange(B, at::kLong).unsqueeze(1).expand({B, n});
  auto ii = at::arange(n, at::kLong).unsqueeze(0).expand({B, n});
  while (cur.ge(0).any().item<bool>()) {
    auto on = cur.ge(0);
    dense.index_put_({bi.masked_select(on), ii.masked_select(on), cur.masked_select(on)}, at::ones({}, at::kBool));
    auto nxt = at::gather(parents, 1, cur.clamp_min(0));
    cur = at::where(on, nxt, cur);
    depth += cur.ge(0).to(at::kLong);
  }
  const int64_t W = (n + 31) / 32;
  auto padded = at::zeros({B, n, W * 32}, at::kLong);
  padded.narrow(2, 0, n).copy_(dense);
  auto weights = at::ones({32}, at::kLong).bitwise_left_shift(at::arange(32, at::kLong));
  auto words = (padded.view({B, n, W, 32}) * weights).sum(-1).to(at::kInt);
  return {words, depth};
}

void run_tree(Context& ctx) {
  TORCH_CHECK(ctx.opt.medusa63.size() == 64, "tokenkernels-bench: --medusa63 wants the 64 parents of "
              "tokenkernels.testing.MEDUSA_63 (the root first), got ", ctx.opt.medusa63.size());
  const auto dev = ctx.opt.device;
  char name[160];
  // ---- build
  for (auto [B, n] : std::vector<std::pair<int64_t, int64_t>>{{1, 64}, {1, 256}, {1, 1024}, {16, 256}}) {
    if (ctx.opt.quick && n > 256) continue;
    auto par = random_parents(B, n, 7 + n).to(dev);
    std::snprintf(name, sizeof name, "tree build B%lld n%lld", (long long)B, (long long)n);
    Row r(name, {"aten_reference"});
    auto call = [&] { return op<BuildSig>("tokenkernels::tree_build").call(par, std::nullopt, true, "auto"); };
    auto [m, d, fc, ns] = call();
    auto [rm, rd] = ref_build(par.cpu());
    const char* match = (m.cpu().equal(rm) && d.cpu().equal(rd)) ? "mask+depth" : "MISMATCH";
    r.add("tokenkernels", ctx.time([&] { call(); })).metric("check", match);
    r.add("aten_reference", ctx.time([&] { ref_build(par.cpu()); }, /*slow=*/true));
    ctx.add(r);
  }
  // ---- verify_greedy
  for (int64_t B : {1, 16}) {
    auto par = medusa_parents(ctx, B).to(dev);
    auto [m, d, fc, ns] = op<BuildSig>("tokenkernels::tree_build").call(par, std::nullopt, true, "auto");
    at::manual_seed(B);
    auto draft = at::randint(4, {B, 64}, at::kLong).to(dev);
    auto am = at::randint(4, {B, 64}, at::kLong).to(dev);
    const int64_t max_depth = d.max().item<int64_t>();
    std::snprintf(name, sizeof name, "tree verify_greedy medusa63 B%lld", (long long)B);
    Row r(name);
    r.add("tokenkernels", ctx.time([&] { op<GreedySig>("tokenkernels::tree_verify_greedy").call(fc, ns, draft, am, max_depth, true); }));
    ctx.add(r);
  }
  // ---- attention
  const int64_t Hq = 32, Hkv = 8, D = 128, n = 64;
  std::vector<int64_t> prefixes = ctx.opt.quick ? std::vector<int64_t>{1024} : std::vector<int64_t>{4096};
  for (int64_t prefix : prefixes)
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      const int64_t B = 1, N = prefix + n;
      auto par = medusa_parents(ctx, B).to(dev);
      auto [mask, d, fc, ns] = op<BuildSig>("tokenkernels::tree_build").call(par, std::nullopt, true, "auto");
      at::manual_seed(prefix);
      auto o = at::TensorOptions().dtype(dtype).device(dev);
      auto q = at::randn({B, n, Hq, D}).to(o), k = at::randn({B, N, Hkv, D}).to(o), v = at::randn({B, N, Hkv, D}).to(o);
      auto P = at::full({B}, prefix, at::TensorOptions().dtype(at::kLong).device(dev));
      const double scale = 1.0 / std::sqrt(double(D));
      // dense bool mask over prefix + tree, (B, 1, n, N)
      auto dense_tree = at::zeros({B, n, n}, at::kBool);
      {
        auto mc = mask.cpu();
        auto acc = dense_tree.accessor<bool, 3>();
        auto mw = mc.accessor<int32_t, 3>();
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) acc[0][i][j] = (uint32_t(mw[0][i][j >> 5]) >> (j & 31)) & 1u;
      }
      auto allowed = at::cat({at::ones({B, n, prefix}, at::kBool), dense_tree}, 2).unsqueeze(1).to(dev);
      auto qt = q.transpose(1, 2), kt = k.transpose(1, 2), vt = v.transpose(1, 2);
      auto call = [&] {
        return op<AttnSig>("tokenkernels::tree_attention").call(q, k, v, P, mask, std::nullopt, std::nullopt, scale, false, "auto");
      };
      auto sdpa_dense = [&] {
        return at::scaled_dot_product_attention(qt, kt, vt, allowed, 0.0, false, scale, /*enable_gqa=*/true);
      };
      auto out = std::get<0>(call());
      auto want = sdpa_dense().transpose(1, 2);
      const double err = (out.to(at::kFloat) - want.to(at::kFloat)).abs().max().item<double>();
      std::snprintf(name, sizeof name, "tree attention medusa63 prefix%lld Hq32 Hkv8 D128 %s", (long long)prefix,
                    dtype == at::kFloat ? "fp32" : "bf16");
      Row r(name, {"sdpa_dense_mask", "sdpa_no_mask_decode"});
      const double work = 2.0 * N * Hkv * D * q.element_size();   // K and V bytes, read once
      r.add("tokenkernels", ctx.time([&] { call(); }), work, /*bytes=*/true).metric("maxerr vs dense", err);
      r.add("sdpa_dense_mask", ctx.time([&] { sdpa_dense(); }), work, true);
      // the floor: an unmasked SDPA of the same n queries over the same keys (a plain n-query decode)
      r.add("sdpa_no_mask_decode",
            ctx.time([&] { at::scaled_dot_product_attention(qt, kt, vt, std::nullopt, 0.0, false, scale, true); }),
            work, true);
      ctx.add(r);
    }
}

}  // namespace

void register_tree_benches() {
  tkbench::register_family(
      "tree",
      "token trees: build vs ATen reference walk, verify_greedy, tree attention vs dense-mask SDPA "
      "and unmasked n-query SDPA (the floor)",
      &run_tree);
}
