// kcenter family: tokenkernels::kcenter_select and tokenkernels::kcenter_coverage_select against
// C++ ATen ports of python/tokenkernels/reference/kcenter.py (the reference greedy and
// `divprune_style`). Rows: tokenkernels, aten_reference, aten_divprune_style, aten_gemm (one fp32
// x @ x^T, the floor of the isolated start); baselines aten_divprune_style and aten_gemm; metric
// picks=ref.
//
// Inputs are synthetic "token-like" features: a shared mean direction plus one of N/18 cluster
// centres plus noise (fixed seed), fp32. The same recipe is used by the Python bench.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bench.h"

namespace {

using tkbench::Context;
using tkbench::Row;
using tkbench::Timing;
using OptT = std::optional<at::Tensor>;

constexpr float kInf = std::numeric_limits<float>::infinity();

// Schemas (csrc/registration.cpp):
//   kcenter_select(Tensor x, int k, Tensor? k_per_item, Tensor? lengths, Tensor? exclude,
//                  Tensor? start_index, str metric, bool sorted, bool check, str impl)
//       -> (Tensor, Tensor)
//   kcenter_coverage_select(Tensor sim, int k, Tensor? k_per_item, Tensor? lengths,
//                           Tensor? row_lengths, Tensor? exclude, bool check) -> (Tensor, Tensor)
using KcenterSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, const OptT&,
                                                      const OptT&, const OptT&, const OptT&,
                                                      c10::string_view, bool, bool,
                                                      c10::string_view);
using CoverageSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, const OptT&,
                                                       const OptT&, const OptT&, const OptT&, bool);

const c10::TypedOperatorHandle<KcenterSig>& kcenter_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tokenkernels::kcenter_select", "")
                       .typed<KcenterSig>();
  return op;
}

const c10::TypedOperatorHandle<CoverageSig>& coverage_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tokenkernels::kcenter_coverage_select", "")
                       .typed<CoverageSig>();
  return op;
}

// (B, N, D) fp32 token-like features on the CPU, deterministic.
at::Tensor make_tokens(int64_t B, int64_t N, int64_t D, uint64_t seed) {
  at::manual_seed(seed);
  const int64_t C = std::max<int64_t>(8, N / 18);
  auto common = at::randn({1, 1, D});
  auto centres = at::randn({B, C, D});
  auto assign = at::randint(C, {B, N}, at::kLong);
  auto xc = at::gather(centres, 1, assign.unsqueeze(-1).expand({B, N, D}));
  return 0.5 * common + xc + 0.7 * at::randn({B, N, D});
}

// ---------------------------------------------------------------------- ATen baselines
// reference.kcenter._pairwise_distance, cosine, fp32.
at::Tensor ref_distance(const at::Tensor& x) {
  auto xf = x.to(at::kFloat);
  auto g = at::mm(xf, xf.t());
  auto inv = at::linalg_vector_norm(xf, 2, {1}).clamp_min(1e-8).reciprocal();
  return 1.0 - g * inv.unsqueeze(1) * inv.unsqueeze(0);
}

// reference.kcenter._greedy_kcenter on one item (all tokens valid): the O(k*N) loop, one ATen
// min/arg-max per step. Returns (k,) int64 picks on the CPU.
at::Tensor ref_greedy(const at::Tensor& x, int64_t k, bool isolated) {
  auto d = ref_distance(x);
  const int64_t N = d.size(0);
  auto idx = at::full({k}, -1, at::kLong);
  auto* pi = idx.data_ptr<int64_t>();
  int64_t p = 0;
  if (isolated) {
    auto dd = d.clone();
    dd.fill_diagonal_(kInf);
    auto nn = std::get<0>(dd.min(1));
    p = nn.argmax().item<int64_t>();
  }
  auto mind = at::full({N}, kInf, d.options());
  for (int64_t s = 0; s < k; ++s) {
    pi[s] = p;
    mind.select(0, p).fill_(-kInf);
    mind = at::minimum(mind, d.select(0, p));
    p = mind.argmax().item<int64_t>();
    if (mind.select(0, p).item<float>() == -kInf) break;
  }
  return idx;
}

// reference.kcenter.divprune_style: full 1 - cos matrix; first pick = arg-max over columns of
// the second-smallest entry; then every step gathers ALL picked rows and takes a column min.
at::Tensor divprune_style(const at::Tensor& x, int64_t k) {
  auto xf = x.to(at::kFloat);
  auto xn = xf / at::linalg_vector_norm(xf, 2, {1}, /*keepdim=*/true);
  auto dist = 1.0 - at::mm(xn, xn.t());
  auto picks = at::empty({k}, x.options().dtype(at::kLong));
  for (int64_t i = 0; i < k; ++i) {
    at::Tensor scores;
    if (i == 0) {
      scores = std::get<0>(at::topk(dist, 2, 0, /*largest=*/false)).select(0, 1);
    } else {
      scores = std::get<0>(at::min(at::index_select(dist, 0, picks.narrow(0, 0, i)), 0));
    }
    picks.select(0, i).copy_(scores.argmax());
  }
  return picks;
}

// reference.kcenter._coverage (coverage_select's reference) on one item: the plain greedy, every gain recomputed.
at::Tensor ref_coverage(const at::Tensor& S, int64_t k) {
  const int64_t M = S.size(0), N = S.size(1);
  auto cur = at::zeros({M}, S.options());
  auto avail = at::ones({N}, S.options().dtype(at::kBool));
  auto idx = at::full({k}, -1, at::kLong);
  auto* pi = idx.data_ptr<int64_t>();
  for (int64_t s = 0; s < k; ++s) {
    auto g = (S - cur.unsqueeze(1)).clamp_min(0).sum(0);
    g.masked_fill_(avail.logical_not(), -kInf);
    const int64_t p = g.argmax().item<int64_t>();
    pi[s] = p;
    avail.select(0, p).fill_(false);
    cur = at::maximum(cur, S.select(1, p));
  }
  return idx;
}

// MMTok's coverage matrix (tokenkernels.mmtok_similarity, alpha 0.5, tau 0.02): rows = text then
// vision tokens, columns = vision candidates.
at::Tensor mmtok_sim(const at::Tensor& text, const at::Tensor& vision) {
  auto t = text / at::linalg_vector_norm(text, 2, {-1}, true).clamp_min(1e-12);
  auto v = vision / at::linalg_vector_norm(vision, 2, {-1}, true).clamp_min(1e-12);
  auto s_tv = at::softmax(at::matmul(t, v.transpose(-1, -2)) / 0.02, -1);
  auto s_vv = at::softmax(at::matmul(v, v.transpose(-1, -2)) / 0.02, -1);
  return at::cat({0.5 * s_tv, 0.5 * s_vv}, -2).contiguous();
}

// "a/k": the smallest number, over items, of leading picks that agree.
std::string prefix_match(const at::Tensor& a_in, const at::Tensor& b_in) {
  auto a = a_in.cpu().reshape({-1, a_in.size(-1)});
  auto b = b_in.cpu().reshape({-1, b_in.size(-1)});
  const int64_t B = a.size(0), k = a.size(1);
  int64_t worst = k;
  for (int64_t i = 0; i < B; ++i) {
    int64_t s = 0;
    while (s < k && a[i][s].item<int64_t>() == b[i][s].item<int64_t>()) ++s;
    worst = std::min(worst, s);
  }
  return std::to_string(worst) + "/" + std::to_string(k);
}

std::string label(const char* what, int64_t B, int64_t N, int64_t D, int64_t k) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "%s B%lld N%lld D%lld k%lld", what, (long long)B, (long long)N,
                (long long)D, (long long)k);
  return buf;
}

struct KcenterCase {
  int64_t B, N, D, k;
  bool isolated;
};

// Times one kcenter case; returns the op's median (for the batch-scaling notes).
Timing run_kcenter_case(Context& ctx, const KcenterCase& c) {
  const auto x = make_tokens(c.B, c.N, c.D, 1234 + c.N + c.B).to(ctx.opt.device);
  OptT start;
  if (!c.isolated) start = at::zeros({c.B}, x.options().dtype(at::kLong));   // "first"
  const auto& op = kcenter_op();
  auto call_op = [&] {
    return std::get<0>(op.call(x, c.k, std::nullopt, std::nullopt, std::nullopt, start,
                               /*metric*/ "cosine", /*sorted*/ false, /*check*/ true, /*impl*/ "auto"));
  };
  auto call_ref = [&] {
    std::vector<at::Tensor> out;
    for (int64_t b = 0; b < c.B; ++b) out.push_back(ref_greedy(x[b], c.k, c.isolated));
    return at::stack(out);
  };
  auto call_divprune = [&] {
    std::vector<at::Tensor> out;
    for (int64_t b = 0; b < c.B; ++b) out.push_back(divprune_style(x[b], c.k));
    return at::stack(out);
  };

  Row r(label(c.isolated ? "kcenter isolated" : "kcenter first", c.B, c.N, c.D, c.k),
        {"aten_divprune_style", "aten_gemm"});
  const double work = c.isolated ? 2.0 * c.B * c.N * c.N * c.D : 2.0 * c.B * c.k * c.N * c.D;
  const std::string match = prefix_match(call_op(), call_ref());
  const Timing t = ctx.time([&] { call_op(); });
  r.add("tokenkernels", t, work).metric("picks=ref", match);
  r.add("aten_reference", ctx.time([&] { call_ref(); }, /*slow=*/true), work);
  r.add("aten_divprune_style", ctx.time([&] { call_divprune(); }, /*slow=*/true), work);
  r.add("aten_gemm", ctx.time([&] {
    if (c.B == 1) at::mm(x[0], x[0].t());
    else at::bmm(x, x.transpose(1, 2));
  }), 2.0 * c.B * c.N * c.N * c.D);
  ctx.add(r);
  return t;
}

void run_kcenter(Context& ctx) {
  constexpr int64_t D = 4096;
  Timing b1[2], b8[2];
  for (bool isolated : {true, false}) {
    b1[isolated] = run_kcenter_case(ctx, {1, 576, D, 56, isolated});
    run_kcenter_case(ctx, {1, 2880, D, 288, isolated});
    b8[isolated] = run_kcenter_case(ctx, {8, 576, D, 56, isolated});
  }

  // Coverage (MMTok): 50 text + 576 vision rows, 576 candidates.
  {
    const int64_t T = 50, V = 576, k = 56;
    auto emb = make_tokens(1, T + V, D, 99);
    const auto sim = mmtok_sim(emb.narrow(1, 0, T), emb.narrow(1, T, V)).to(ctx.opt.device);
    const int64_t M = sim.size(1), N = sim.size(2);
    const auto& op = coverage_op();
    auto call_op = [&] {
      return std::get<0>(op.call(sim, k, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true));
    };
    char name[96];
    std::snprintf(name, sizeof name, "coverage_select B1 M%lld N%lld k%lld", (long long)M,
                  (long long)N, (long long)k);
    Row r(name, {"aten_reference"});
    const double work = double(M) * N * 4.0;   // bytes of sim, read once
    const std::string match = prefix_match(call_op(), ref_coverage(sim[0], k).unsqueeze(0));
    r.add("tokenkernels", ctx.time([&] { call_op(); }), work, /*bytes=*/true).metric("picks=ref", match);
    r.add("aten_reference", ctx.time([&] { ref_coverage(sim[0], k); }, /*slow=*/true), work, true);
    ctx.add(r);
  }

  // Batch scaling: batch 8 against 8 x batch 1, and (CPU) against itself on one thread.
  for (bool isolated : {true, false}) {
    char buf[320];
    const double eight = 8.0 * b1[isolated].ms;
    std::string extra;
    if (!ctx.cuda()) {
      const int threads = at::get_num_threads();
      KcenterCase c{8, 576, D, 56, isolated};
      const auto x = make_tokens(c.B, c.N, c.D, 1234 + c.N + c.B);
      OptT start;
      if (!isolated) start = at::zeros({c.B}, at::kLong);
      at::set_num_threads(1);
      const Timing one = ctx.time([&] {
        kcenter_op().call(x, c.k, std::nullopt, std::nullopt, std::nullopt, start, "cosine", false,
                          true, "auto");
      });
      at::set_num_threads(threads);
      char e[160];
      std::snprintf(e, sizeof e, "; batch 8 on 1 thread %.2f ms -> %.2fx from %d threads", one.ms,
                    one.ms / b8[isolated].ms, threads);
      extra = e;
    }
    std::snprintf(buf, sizeof buf,
                  "batch scaling (%s, N576 D4096 k56): batch 8 %.2f ms vs 8 x batch 1 %.2f ms "
                  "-> %.2fx%s",
                  isolated ? "isolated" : "first", b8[isolated].ms, eight, eight / b8[isolated].ms,
                  extra.c_str());
    ctx.note(buf);
  }
}

}  // namespace

void register_kcenter_benches() {
  tkbench::register_family(
      "kcenter", "greedy k-center (isolated / first start) and coverage_select, fp32 cosine",
      &run_kcenter);
}
