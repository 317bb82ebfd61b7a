// cross_entropy family: tokenkernels::cross_entropy_forward + cross_entropy_backward (the ops behind
// tokenkernels.linear_cross_entropy, mean reduction, gradients of hidden and weight) against an
// ATen port of the materialised computation torch runs (logits GEMM, log-softmax, dZ =
// softmax - onehot, two gradient GEMMs).
//
// Rows: tokenkernels = fused fwd+bwd; aten_materialised = materialised fwd+bwd; aten_logits_gemm =
// one N x V x D logits GEMM in the input dtype (fwd+bwd needs 3 of them, the recomputing backward
// 4); baselines aten_materialised and aten_logits_gemm; metric loss rel err = |op loss - ATen
// loss| / |ATen loss|. A "<case> fwd" row holds the fused forward alone. On CUDA a "<case> bwd"
// row times cross_entropy_backward alone (dhidden + dweight, no filtering) per CUDA variant
// plain / wmma / tuned (6*N*D*V flops: recompute + the two gradient GEMMs; baseline plain).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

#include "bench.h"

namespace {

using tkbench::Context;
using tkbench::Row;
using OptT = std::optional<at::Tensor>;
using T6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Schemas (csrc/registration.cpp).
using FwdSig = T6(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, int64_t,
                  std::optional<double>, int64_t, int64_t, bool, bool, bool, double, bool, c10::string_view);
using BwdSig = T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, int64_t,
                  std::optional<double>, int64_t, double, bool, bool, bool, bool, c10::string_view);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("tokenkernels::cross_entropy_forward", "").typed<FwdSig>();
  return op;
}
const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("tokenkernels::cross_entropy_backward", "").typed<BwdSig>();
  return op;
}

constexpr int64_t kIgnore = -100;

// Mean loss and its gradients through the fused ops (what linear_cross_entropy's autograd runs).
at::Tensor fused_fwd_bwd(const at::Tensor& h, const at::Tensor& w, const at::Tensor& t,
                         double filter_eps) {
  const int64_t V = w.size(0);
  auto st = fwd_op().call(h, w, t, std::nullopt, kIgnore, std::nullopt, 0, V, false, false, false,
                          filter_eps, false, "auto");
  auto& lse = std::get<0>(st);
  auto& zt = std::get<1>(st);
  auto valid = t.ne(kIgnore);
  auto cnt = valid.sum().clamp_min(1).to(at::kFloat);
  auto loss = at::where(valid, lse - zt, at::zeros_like(lse)).sum() / cnt;
  auto g = valid.to(at::kFloat) / cnt;
  auto gr = bwd_op().call(h, w, t, std::nullopt, lse, g, -g, std::nullopt, kIgnore, std::nullopt,
                          0, filter_eps, true, true, false, false, "auto");
  (void)gr;
  return loss;
}

at::Tensor fused_fwd(const at::Tensor& h, const at::Tensor& w, const at::Tensor& t) {
  auto st = fwd_op().call(h, w, t, std::nullopt, kIgnore, std::nullopt, 0, w.size(0), false,
                          false, false, 0.0, false, "auto");
  return std::get<0>(st);
}

// What F.linear + F.cross_entropy + backward compute, with the logits in memory.
at::Tensor aten_materialised(const at::Tensor& h, const at::Tensor& w, const at::Tensor& t) {
  auto z = at::mm(h, w.t());                              // (N, V), input dtype
  auto logp = at::log_softmax(z.to(at::kFloat), 1);
  auto valid = t.ne(kIgnore);
  auto tc = at::where(valid, t, at::zeros_like(t));
  auto cnt = valid.sum().clamp_min(1).to(at::kFloat);
  auto nll = -logp.gather(1, tc.unsqueeze(1)).squeeze(1);
  auto loss = at::where(valid, nll, at::zeros_like(nll)).sum() / cnt;
  auto dz = logp.exp_();                                  // softmax
  dz.scatter_add_(1, tc.unsqueeze(1), -at::ones({t.size(0), 1}, dz.options()));
  dz.mul_((valid.to(at::kFloat) / cnt).unsqueeze(1));
  auto dzl = dz.to(h.scalar_type());
  auto dh = at::mm(dzl, w);
  auto dw = at::mm(dzl.t(), h);
  return loss;
}

void run_cross_entropy(Context& ctx) {
  struct Shape { int64_t N, D, V; };
  std::vector<Shape> shapes;
  if (ctx.cuda()) shapes = ctx.opt.quick ? std::vector<Shape>{{2048, 2304, 65536}}
                                         : std::vector<Shape>{{8192, 2304, 256000}};
  else shapes = ctx.opt.quick ? std::vector<Shape>{{512, 512, 32000}}
                              : std::vector<Shape>{{2048, 1024, 32000}, {1024, 2048, 128256}};
  for (const auto& s : shapes) {
    for (auto dt : {at::kFloat, at::kBFloat16}) {
      if (ctx.cuda() && dt == at::kFloat) continue;
      at::manual_seed(0);
      auto o = at::TensorOptions().dtype(dt).device(ctx.opt.device);
      auto h = at::randn({s.N, s.D}, o);
      auto w = at::randn({s.V, s.D}, o).div_(std::sqrt(double(s.D)));
      auto t = at::randint(s.V, {s.N}, at::TensorOptions().dtype(at::kLong).device(ctx.opt.device));
      t.slice(0, 0, s.N, 17).fill_(kIgnore);
      const double feps = dt == at::kBFloat16 ? std::ldexp(1.0, -12) : 0.0;
      char name[96];
      std::snprintf(name, sizeof name, "lce N%lld D%lld V%lld %s", (long long)s.N, (long long)s.D,
                    (long long)s.V, dt == at::kFloat ? "fp32" : "bf16");
      Row r(name, {"aten_materialised", "aten_logits_gemm"});
      Row f(std::string(name) + " fwd");
      const double work = 6.0 * s.N * s.D * s.V;
      at::Tensor lo, lr;
      const tkbench::Timing t_op = ctx.time([&] { lo = fused_fwd_bwd(h, w, t, feps); });
      const tkbench::Timing t_mat = ctx.time([&] { lr = aten_materialised(h, w, t); }, /*slow=*/true);
      f.add("tokenkernels", ctx.time([&] { fused_fwd(h, w, t); }), work / 3);
      const tkbench::Timing t_gemm = ctx.time([&] { at::mm(h, w.t()); });
      const double a = lo.item<double>(), b = lr.item<double>();
      r.add("tokenkernels", t_op, work).metric("loss rel err", std::fabs(a - b) / std::max(1e-30, std::fabs(b)));
      r.add("aten_materialised", t_mat, work);
      r.add("aten_logits_gemm", t_gemm, work / 3);
      ctx.add(r);
      ctx.add(f);
      if (ctx.cuda()) {  // the backward alone, per CUDA variant (statistics of one plain forward)
        auto st = fwd_op().call(h, w, t, std::nullopt, kIgnore, std::nullopt, 0, s.V, false, false,
                                false, 0.0, false, "plain");
        auto lse = std::get<0>(st);
        auto valid = t.ne(kIgnore);
        auto g = valid.to(at::kFloat) / valid.sum().clamp_min(1).to(at::kFloat);
        auto mg = -g;
        Row bw(std::string(name) + " bwd", {"plain"});
        for (const char* impl : {"plain", "wmma", "tuned"}) {
          bw.add(impl, ctx.time([&] {
            bwd_op().call(h, w, t, std::nullopt, lse, g, mg, std::nullopt, kIgnore, std::nullopt,
                          0, 0.0, true, true, false, false, impl);
          }), work);
        }
        ctx.add(bw);
      }
    }
  }
  ctx.note("tokenkernels = fused fwd+bwd (mean loss, dhidden + dweight; bf16 with gradient filtering "
           "eps 2^-12); its rate counts 6*N*D*V flops (the recomputing backward does 8*N*D*V), the "
           "fwd row's 2*N*D*V, aten_logits_gemm's 2*N*D*V.");
}

}  // namespace

void register_cross_entropy_benches() {
  tkbench::register_family("cross_entropy",
                           "fused linear cross-entropy fwd+bwd vs ATen materialised logits",
                           &run_cross_entropy);
}
