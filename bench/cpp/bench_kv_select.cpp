// kv_select family: a TokenSelect decode step against dense ATen attention, plus its parts
// (score, top-k) against their ATen reference paths.
//
// Shape (issue #4): Llama-3-8B heads (H_q 32, H_kv 8, D 128), one request with N tokens in a
// contiguous cache (B, N, H_kv, D), budget 128 sink + 2048 top-k + 512 local; fp32 and bf16.
// N = 32768 (8192 with --quick). The baseline of each row:
//   select+decode, cache-hit decode : sdpa_grouped, at::scaled_dot_product_attention over the
//                                     whole cache (the dense decode step the sparse one replaces;
//                                     sdpa_enable_gqa beside it in the select+decode row);
//   score                           : aten_reference, the reference's einsum + softmax + sum;
//   topk                            : aten_topk_sort, at::topk over the middle region + sort + cat.
// Metrics say whether the op agrees with the reference (topk: indices equal; score: max abs
// error; decode outputs differ from dense attention by design, the tests check them).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

#include "bench.h"

namespace {

using tkbench::Context;
using tkbench::Row;
using OptT = std::optional<at::Tensor>;

using ScoreSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                            double, const OptT&, const OptT&, bool, c10::string_view);
using TopkSig = at::Tensor(const at::Tensor&, int64_t, const at::Tensor&, int64_t, int64_t,
                           const OptT&, const OptT&, bool, c10::string_view);
using DecodeSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const OptT&, double, bool,
                                                     c10::string_view);

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& op(const char* name) {
  // One handle per (name, signature); the three names below have distinct signatures.
  static auto h = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return h;
}
const c10::TypedOperatorHandle<ScoreSig>& score_op() { return op<ScoreSig>("tokenkernels::kv_select_score"); }
const c10::TypedOperatorHandle<TopkSig>& topk_op() { return op<TopkSig>("tokenkernels::kv_select_topk"); }
const c10::TypedOperatorHandle<DecodeSig>& decode_op() {
  return op<DecodeSig>("tokenkernels::kv_select_sparse_decode");
}

constexpr int64_t kHq = 32, kHkv = 8, kD = 128, kSink = 128, kTop = 2048, kLocal = 512;

// reference.kv_select.score, vectorised: (1, N) fp32.
at::Tensor ref_score(const at::Tensor& q, const at::Tensor& k) {
  auto qf = q.to(at::kFloat);                                                   // (1, Hq, D)
  auto kf = k.to(at::kFloat).repeat_interleave(kHq / kHkv, 2);                  // (1, N, Hq, D)
  auto logits = at::einsum("bhd,bnhd->bhn", {qf, kf});
  return at::softmax(logits, -1).sum(1);
}

// reference.kv_select.topk for one full-length request, with at::topk.
at::Tensor ref_topk(const at::Tensor& s, int64_t N) {
  auto mid = s.select(0, 0).narrow(0, kSink, N - kSink - kLocal);
  auto top = std::get<1>(at::topk(mid, kTop)).add(kSink);
  auto sel = std::get<0>(at::sort(top));
  auto opts = s.options().dtype(at::kLong);
  return at::cat({at::arange(kSink, opts), sel, at::arange(N - kLocal, N, opts)}).to(at::kInt).unsqueeze(0);
}

// Dense decode, the strongest ATen form found: the G = H_q / H_kv queries of a KV head as G
// query rows of one SDPA "head" -- q (1, H_kv, G, D) against the HF-layout (1, H_kv, N, D)
// contiguous cache, so K and V are read once and never expanded.
at::Tensor dense_decode(const at::Tensor& q, const at::Tensor& kh, const at::Tensor& vh) {
  return at::scaled_dot_product_attention(q.view({1, kHkv, kHq / kHkv, kD}), kh, vh);
}

// SDPA with enable_gqa on (1, H_q, 1, D) queries (expands K/V to H_q heads on the CPU).
at::Tensor dense_decode_gqa(const at::Tensor& q, const at::Tensor& kh, const at::Tensor& vh) {
  return at::scaled_dot_product_attention(q.unsqueeze(2), kh, vh, std::nullopt, 0.0, false,
                                          std::nullopt, true);
}

void run_kv_select(Context& ctx) {
  const int64_t N = ctx.opt.quick ? 8192 : 32768;
  const double scale = 1.0 / std::sqrt(double(kD));
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    const char* dn = dt == at::kFloat ? "fp32" : "bf16";
    at::manual_seed(7);
    auto opts = at::TensorOptions().dtype(dt).device(ctx.opt.device);
    auto k = at::randn({1, N, kHkv, kD}, opts);
    auto v = at::randn({1, N, kHkv, kD}, opts);
    auto q = at::randn({1, kHq, kD}, opts);
    auto sl = at::full({1}, N, opts.dtype(at::kInt));
    auto kh = k.transpose(1, 2).contiguous(), vh = v.transpose(1, 2).contiguous();   // SDPA's layout
    const double elt = dt == at::kFloat ? 4.0 : 2.0;
    const double kv_bytes = 2.0 * N * kHkv * kD * elt;
    const int64_t W = kSink + kTop + kLocal;

    auto select = [&] {
      auto s = score_op().call(q, k, sl, std::nullopt, 1.0, std::nullopt, std::nullopt, false, "auto");
      return topk_op().call(s, kTop, sl, kSink, kLocal, std::nullopt, std::nullopt, false, "auto");
    };
    auto idx = select();
    char name[160];

    const double dense_bytes = kv_bytes;   // the whole cache's K and V, read once
    {   // select + sparse decode vs dense attention
      std::snprintf(name, sizeof name, "select+decode %s N%lld H32/8 D128 k2688", dn, (long long)N);
      Row r(name, {"sdpa_grouped"});
      const double work = kv_bytes / 2 + 2.0 * W * kHkv * kD * elt;   // K once + the selected K/V
      r.add("tokenkernels", ctx.time([&] {
        auto i = select();
        decode_op().call(q, k, v, i, sl, std::nullopt, scale, false, "auto");
      }), work, /*bytes=*/true);
      r.add("sdpa_grouped", ctx.time([&] { dense_decode(q, kh, vh); }, true), dense_bytes, true);
      r.add("sdpa_enable_gqa", ctx.time([&] { dense_decode_gqa(q, kh, vh); }, true), dense_bytes, true);
      ctx.add(r);
    }
    {   // Selection Cache hit: sparse decode only
      std::snprintf(name, sizeof name, "cache-hit decode %s N%lld k2688", dn, (long long)N);
      Row r(name, {"sdpa_grouped"});
      r.add("tokenkernels", ctx.time([&] { decode_op().call(q, k, v, idx, sl, std::nullopt, scale, false, "auto"); }),
            2.0 * W * kHkv * kD * elt, true);
      r.add("sdpa_grouped", ctx.time([&] { dense_decode(q, kh, vh); }, true), dense_bytes, true);
      ctx.add(r);
    }
    {   // scoring alone
      std::snprintf(name, sizeof name, "score %s N%lld", dn, (long long)N);
      Row r(name, {"aten_reference"});
      auto s = score_op().call(q, k, sl, std::nullopt, 1.0, std::nullopt, std::nullopt, false, "auto");
      const double err = (s - ref_score(q, k)).abs().max().item<double>();
      r.add("tokenkernels", ctx.time([&] { score_op().call(q, k, sl, std::nullopt, 1.0, std::nullopt, std::nullopt, false, "auto"); }),
            kv_bytes / 2, true).metric("maxerr vs ref", err);
      r.add("aten_reference", ctx.time([&] { ref_score(q, k); }, true), kv_bytes / 2, true);
      ctx.add(r);
    }
    if (dt == at::kFloat) {   // top-k alone (scores are fp32 whatever the cache dtype)
      std::snprintf(name, sizeof name, "topk k2048 of N%lld (+128+512)", (long long)N);
      Row r(name, {"aten_topk_sort"});
      auto s = score_op().call(q, k, sl, std::nullopt, 1.0, std::nullopt, std::nullopt, false, "auto");
      auto mine = topk_op().call(s, kTop, sl, kSink, kLocal, std::nullopt, std::nullopt, false, "auto");
      const char* match = at::equal(mine, ref_topk(s, N)) ? "equal" : "DIFFER";
      r.add("tokenkernels", ctx.time([&] { topk_op().call(s, kTop, sl, kSink, kLocal, std::nullopt, std::nullopt, false, "auto"); }),
            N * 4.0, true).metric("picks=ref", match);
      r.add("aten_topk_sort", ctx.time([&] { ref_topk(s, N); }), N * 4.0, true);
      ctx.add(r);
    }
  }
  ctx.note("kv_select: sdpa_grouped = dense at::scaled_dot_product_attention over the whole cache (grouped "
           "queries (1, H_kv, G, D), HF-layout contiguous K/V, the faster dense form); sdpa_enable_gqa = "
           "(1, H_q, 1, D) queries with enable_gqa. Targets (issue #4, CPU): select+decode >= 2x, "
           "cache-hit decode >= 10x vs sdpa_grouped.");
}

}  // namespace

void register_kv_select_benches() {
  tkbench::register_family(
      "kv_select",
      "TokenSelect decode step (score + top-k + sparse decode, cache hit) vs dense ATen SDPA, "
      "Llama-3-8B heads",
      &run_kv_select);
}
