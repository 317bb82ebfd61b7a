// cross_entropy family: CUDA adapter (compiled by the host C++ compiler; kernels in
// cross_entropy_kernels.cu). No host sync unless `check` is set.
//
// Every check is cross_entropy_args.h's (check_forward / check_backward, as on the CPU); which
// path runs is use_fused(Impl, fused_supported) (tokenkernels/cross_entropy.h).
// Forward: "wmma" (and "auto", for fp16/bf16 where fused_supported: D % 8 == 0, 16-byte aligned
// rows) = the fused WMMA kernel, no logit buffer; "plain" (fp32, impl="plain", or shapes the fused
// kernels do not support) = fp32 logit tiles from cuBLAS (ATen mm with fp32 output) folded
// into the online log-sum-exp by fwd_tile_kernel; "tuned" = the sm_90a TMA + wgmma kernel
// (cross_entropy_sm90.cuh) on compute capability 9.0 where sm90::plan_forward accepts the
// inputs, else as "wmma" (fp32 -> plain).
// Backward: "plain" = logit tiles recomputed by cuBLAS, dZ by dz_tile_kernel, gradients by two
// more cuBLAS GEMMs per tile (fp32 accumulators for dhidden and dweight, rounded once);
// "wmma" (fp16/bf16, default for them) = one fused WMMA kernel per 64 x 128 logit tile that
// recomputes and accumulates dhidden / dweight in fp32 with atomics (no logit buffer at all).
// "tuned" (fp16/bf16 where fused_supported; fp32 and other shapes run the plain path) = the
// atomic-free chunked backward (tokenkernels/cross_entropy_bwd.h): per vocabulary chunk a
// tensor-core recompute kernel writes dZ (and zeroes filtered sub-tiles), then cuBLAS adds
// dZ @ W_chunk to dhidden and writes dweight / dbias of the chunk once (deterministic).
// All three filter gradients on the same 64 x 128 sub-tiles (filter_eps > 0), and all scale
// fp16 dZ by a power of two (launch_grad_scale) before rounding it, unscaled exactly at the end.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "cross_entropy/cross_entropy_args.h"
#include "cuda_glue.h"
#include "tokenkernels/cross_entropy.h"
#include "tokenkernels/cross_entropy_bwd.h"
#include "tokenkernels/cross_entropy_sm90.h"

namespace tokenkernels {
namespace cross_entropy {
namespace {

// Where each token's target lives, for the kernels. T: targets as contiguous int64.
Targets make_targets(const at::Tensor& T, int64_t ignore_index, int64_t vocab_start, int64_t V,
                     int64_t vocab_total) {
  Targets tg;
  tg.t = T.data_ptr<int64_t>();
  tg.ignore_index = ignore_index;
  tg.vocab_start = vocab_start;
  tg.V = V;
  tg.vocab_total = vocab_total;
  return tg;
}

// torch releases that still demand CUBLAS_WORKSPACE_CONFIG for cuBLAS under
// torch.use_deterministic_algorithms(True) (without warn_only) raise from inside the GEMM with a
// message naming neither this op nor why it runs cuBLAS. Re-raise that error with both. (The
// variable is read when the process' first cuBLAS call happens: setting it later from Python
// has no effect, so it cannot be fixed here.) Newer torch releases do not raise at all.
template <typename F>
void with_cublas_determinism_hint(const char* op, F&& body) {
  try {
    body();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find("CUBLAS_WORKSPACE_CONFIG") == std::string::npos) throw;
    TORCH_CHECK(false, "tokenkernels.", op,
                ": torch.use_deterministic_algorithms(True) runs this op's CUDA path as "
                "impl='plain' (cuBLAS GEMMs), and this torch requires the environment variable "
                "CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) for deterministic cuBLAS: set it "
                "before the process starts (e.g. `CUBLAS_WORKSPACE_CONFIG=:4096:8 python "
                "train.py`), or use torch.use_deterministic_algorithms(True, warn_only=True). "
                "torch said: ", msg);
  }
}

// fp32 logits tile Z = a @ b^T (fp16/bf16 inputs on tensor cores, fp32 output).
void logits_tile(at::Tensor& Z, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) at::mm_out(Z, a, b.t());
  else at::mm_out(Z, a, b.t(), at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, std::optional<double> softcap,
    int64_t vocab_start, int64_t vocab_total, bool want_sumz, bool aux, bool check,
    double filter_eps, bool /*accum_fp32*/, c10::string_view impl) {
  const char* op = kForwardOp;
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // internal ATen calls are not recorded
  const auto a = check_forward(hidden, weight, targets, bias, ignore_index, softcap, vocab_start,
                               vocab_total, check, filter_eps, impl);
  const int64_t N = a.N, D = a.D, V = a.V;
  c10::DeviceGuard guard(hidden.device());

  const auto f32 = hidden.options().dtype(at::kFloat);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  auto lse = at::empty({N}, f32);
  auto zt = at::zeros({N}, f32);
  auto sumz = at::zeros({want_sumz ? N : 0}, f32);
  auto amax = at::zeros({aux ? N : 0}, hidden.options().dtype(at::kLong));
  auto maxz = at::full({aux ? N : 0}, kNegInf, f32);
  auto ent = at::empty({aux ? N : 0}, f32);
  if (N == 0) return {lse, zt, sumz, amax, maxz, ent};

  auto m = at::full({N}, kNegInf, f32);
  auto s = at::zeros({N}, f32);
  auto tz = at::zeros({aux ? N : 0}, f32);
  auto H = hidden.contiguous();
  auto W = weight.contiguous();
  auto T = long_contig(targets);
  auto B = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float cap = static_cast<float>(softcap_value(softcap));
  const cudaStream_t stream = current_cuda_stream(hidden.device());

  const Targets tg = make_targets(T, ignore_index, vocab_start, V, vocab_total);
  FwdState st;
  st.m = m.data_ptr<float>();
  st.s = s.data_ptr<float>();
  st.tz = aux ? tz.data_ptr<float>() : nullptr;
  st.zt = zt.data_ptr<float>();
  st.sumz = want_sumz ? sumz.data_ptr<float>() : nullptr;
  st.amax = aux ? amax.data_ptr<int64_t>() : nullptr;
  st.maxz = aux ? maxz.data_ptr<float>() : nullptr;
  const float* bp = B.defined() ? B.data_ptr<float>() : nullptr;

  const auto dtype = to_dtype(H.scalar_type());
  // impl="tuned": the sm_90a TMA + wgmma forward where sm90::plan_forward says it runs
  // (fp16/bf16, D % 8 == 0, 16-byte aligned rows, N / V / D within int32, compute capability
  // 9.0 and sm_90a code in this build); every other case falls through to the WMMA / plain
  // choice below, which gives the same results.
  bool tuned_done = false;
  if (a.impl == Impl::Tuned) {
    sm90::FwdPlan plan;
    // TOKENKERNELS_CE_SM90_CLUSTER=2: 2-CTA clusters multicasting the weight tiles (opt-in
    // until measured against the default single-CTA schedule)
    const int cluster = env_or("TOKENKERNELS_CE_SM90_CLUSTER", 1) == 2 ? 2 : 1;
    check_cuda(sm90::forward_plan(H.data_ptr(), W.data_ptr(), dtype, N, D, V, a.impl, cluster,
                                  &plan),
               "linear_cross_entropy tuned forward (device query)");
    if (plan.path == sm90::FwdPath::Sm90) {
      auto ws = at::empty({plan.workspace_bytes}, hidden.options().dtype(at::kByte));
      check_cuda(sm90::launch_fwd_sm90(plan, H.data_ptr(), W.data_ptr(), dtype, N, D, bp, cap, tg,
                                       st, ws.data_ptr(), stream),
                 "linear_cross_entropy tuned forward (sm_90a)");
      tuned_done = true;
    }
  }
  // D = 0 (all logits = bias): the plain path (cuBLAS/ATen handle K = 0); the fused kernels
  // are never launched for it.
  if (tuned_done) {
    // zt written by the kernel; m, s, tz, sumz, amax, maxz by its split merge
  } else if (use_fused(a.impl, D > 0 && fused_supported(H.data_ptr(), W.data_ptr(), dtype, D))) {  // fused kernel
    int splits = 1;
    check_cuda(fused_default_splits(N, V, &splits), "linear_cross_entropy fused forward (SM count)");
    auto ws = at::empty({static_cast<int64_t>(fused_workspace_bytes(N, splits))},
                        hidden.options().dtype(at::kByte));
    check_cuda(launch_fwd_fused(H.data_ptr(), W.data_ptr(), dtype, N, D, bp, cap, tg, st, splits,
                                ws.data_ptr(), stream),
               "linear_cross_entropy fused forward");
  } else {
    with_cublas_determinism_hint(op, [&] {
      const int64_t bn = std::min(N, env_or("TOKENKERNELS_CE_CUDA_BLOCK_N", 4096));
      const int64_t bv = std::min(V, env_or("TOKENKERNELS_CE_CUDA_BLOCK_V", 8192));
      auto zbuf = at::empty({bn * bv}, f32);
      for (int64_t r0 = 0; r0 < N; r0 += bn) {
        const int64_t rows = std::min(bn, N - r0);
        auto Hc = H.narrow(0, r0, rows);
        for (int64_t v0 = 0; v0 < V; v0 += bv) {
          const int64_t cols = std::min(bv, V - v0);
          auto Z = zbuf.narrow(0, 0, rows * cols).view({rows, cols});
          logits_tile(Z, Hc, W.narrow(0, v0, cols));
          check_cuda(launch_fwd_tile(Z.data_ptr<float>(), rows, cols, r0, v0, bp, cap, tg, st,
                                     stream),
                     "linear_cross_entropy forward tile");
        }
      }
    });
  }
  check_cuda(launch_finalize(N, st, tg, lse.data_ptr<float>(), aux ? ent.data_ptr<float>() : nullptr,
                             stream),
             "linear_cross_entropy finalize");
  return {lse, zt, sumz, amax, maxz, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& coef_p,
    const at::Tensor& coef_t, const std::optional<at::Tensor>& coef_1, int64_t ignore_index,
    std::optional<double> softcap, int64_t vocab_start, double filter_eps, bool need_dh,
    bool need_dw, bool need_db, bool accum_fp32, c10::string_view impl) {
  const auto a = check_backward(hidden, weight, targets, bias, lse, coef_p, coef_t, coef_1,
                                softcap, vocab_start, filter_eps, need_db, impl);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // internal ATen calls are not recorded
  const int64_t N = a.N, D = a.D, V = a.V;
  c10::DeviceGuard guard(hidden.device());

  const char* op = kBackwardOp;
  const auto dt = hidden.scalar_type();
  const bool lowp = dt != at::kFloat;
  const auto f32 = hidden.options().dtype(at::kFloat);
  // fp16/bf16: dhidden, dweight and dbias accumulate in fp32 and are rounded once (the
  // precision rule: never worse than torch's single-GEMM gradients); accum_fp32 is therefore
  // implied on CUDA. fp32: dhidden / dweight accumulate straight in the outputs.
  (void)accum_fp32;
  auto dh = need_dh ? at::zeros({N, D}, lowp ? f32 : hidden.options()) : at::empty({0}, hidden.options());
  // tuned writes every dweight row once (no zero fill needed); the other paths accumulate
  const bool dw_unset = need_dw && lowp && a.impl == Impl::Tuned;
  auto dw = need_dw ? (dw_unset ? at::empty({V, D}, f32) : at::zeros({V, D}, lowp ? f32 : weight.options()))
                    : at::empty({0}, weight.options());
  auto db32 = at::zeros({need_db ? V : 0}, f32);
  at::Tensor gscale;  // fp16: (2,) fp32 [2^e, 2^-e], dZ scaled by 2^e (see launch_grad_scale)
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    if (gscale.defined()) {  // unscale (exact) before the one rounding to fp16
      const auto inv = gscale.narrow(0, 1, 1);
      if (need_dh) dh.mul_(inv);
      if (need_dw) dw.mul_(inv);
      if (need_db) db32.mul_(inv);
    }
    return {need_dh && lowp ? dh.to(dt) : dh, need_dw && lowp ? dw.to(dt) : dw,
            need_db ? db32.to(bias->scalar_type()) : db32};
  };
  if (N == 0 || (!need_dh && !need_dw && !need_db)) {
    if (dw_unset) dw.zero_();
    return finish();
  }

  auto H = hidden.contiguous();
  auto W = weight.contiguous();
  auto T = long_contig(targets);
  auto B = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto L = lse.contiguous();
  auto CP = coef_p.contiguous();
  auto CT = coef_t.contiguous();
  auto C1 = coef_1.has_value() ? coef_1->contiguous() : at::Tensor();
  const float* c1p = C1.defined() ? C1.data_ptr<float>() : nullptr;
  const float cap = static_cast<float>(softcap_value(softcap));
  const float feps = static_cast<float>(filter_eps);
  const cudaStream_t stream = current_cuda_stream(hidden.device());
  // the range of the targets was checked (or NaN-marked) by the forward
  const Targets tg = make_targets(T, ignore_index, vocab_start, V,
                                  std::numeric_limits<int64_t>::max());
  const float* bp = B.defined() ? B.data_ptr<float>() : nullptr;
  if (dt == at::kHalf) {
    gscale = at::empty({2}, f32);
    check_cuda(launch_grad_scale(N, CP.data_ptr<float>(), CT.data_ptr<float>(), c1p,
                                 gscale.data_ptr<float>(), stream),
               "linear_cross_entropy backward (fp16 gradient scale)");
  }
  const float* gsp = gscale.defined() ? gscale.data_ptr<float>() : nullptr;
  const auto dtype = to_dtype(dt);
  const bool fused_ok = D > 0 && fused_supported(H.data_ptr(), W.data_ptr(), dtype, D);

  if (a.impl == Impl::Tuned && fused_ok) {
    // tuned: vocabulary chunks; per chunk the recompute kernel writes dZ (input dtype, zeroed
    // filter sub-tiles), then cuBLAS (via ATen, fp32 output) adds dZ @ W_chunk to dH32 (in
    // chunk order) and writes dW32[chunk] = dZ^T @ H and db32[chunk] = column sums of dZ, each
    // exactly once per chunk: no atomics, deterministic.
    with_cublas_determinism_hint(op, [&] {
      const bwd::Plan plan = bwd::plan_bwd(N, V, H.element_size(), bwd::default_budget_bytes(N, V),
                                           env_or("TOKENKERNELS_CE_TUNED_VC", 0));
      auto dzbuf = at::empty({N, plan.ld}, H.options());
      at::Tensor dh_part;  // fp32 dZ @ W_chunk of the chunks after the first
      bwd::ChunkArgs ca;
      ca.hidden = H.data_ptr();
      ca.weight = W.data_ptr();
      ca.N = N;
      ca.D = D;
      ca.bias = bp;
      ca.cap = cap;
      ca.tg = tg;
      ca.lse = L.data_ptr<float>();
      ca.cp = CP.data_ptr<float>();
      ca.ct = CT.data_ptr<float>();
      ca.c1 = c1p;
      ca.gscale = gsp;
      ca.feps = feps;
      ca.ld = plan.ld;
      ca.dZ = dzbuf.data_ptr();
      for (int64_t c = 0; c < plan.chunks; ++c) {
        ca.v0 = bwd::chunk_v0(plan, c);
        ca.cols = bwd::chunk_cols(plan, c, V);
        check_cuda(bwd::launch_bwd_chunk(ca, dtype, stream),
                   "linear_cross_entropy tuned backward (dZ chunk)");
        auto dZ = dzbuf.narrow(1, 0, ca.cols);  // (N, cols), row pitch ld
        auto Wc = W.narrow(0, ca.v0, ca.cols);
        if (need_db) {
          auto dbc = db32.narrow(0, ca.v0, ca.cols);
          at::sum_out(dbc, dZ, at::IntArrayRef{0}, /*keepdim=*/false, at::kFloat);
        }
        if (need_dh) {  // (addmm with out_dtype: older torch releases want self in the inputs' dtype)
          if (c == 0) {
            at::mm_out(dh, dZ, Wc, at::kFloat);
          } else {
            if (!dh_part.defined()) dh_part = at::empty({N, D}, f32);
            at::mm_out(dh_part, dZ, Wc, at::kFloat);
            dh.add_(dh_part);
          }
        }
        if (need_dw) {
          auto dwc = dw.narrow(0, ca.v0, ca.cols);
          at::mm_out(dwc, dZ.t(), H, at::kFloat);
        }
      }
    });
    return finish();
  }
  if (dw_unset) dw.zero_();  // tuned fell back (shape / alignment): the accumulating paths

  if (use_fused(a.impl, fused_ok)) {
    // wmma / auto: fused WMMA recompute + gradient filtering + atomics into the fp32 accumulators
    check_cuda(launch_bwd_fused(H.data_ptr(), W.data_ptr(), dtype, N, D, bp, cap, tg,
                                L.data_ptr<float>(), CP.data_ptr<float>(), CT.data_ptr<float>(),
                                c1p, gsp, feps, need_dh ? dh.data_ptr<float>() : nullptr,
                                need_dw ? dw.data_ptr<float>() : nullptr,
                                need_db ? db32.data_ptr<float>() : nullptr, nullptr, stream),
               "linear_cross_entropy fused backward");
    return finish();
  }

  with_cublas_determinism_hint(op, [&] {
    const int64_t bn = std::min(N, env_or("TOKENKERNELS_CE_CUDA_BLOCK_N", 4096));
    const int64_t bv = std::min(V, env_or("TOKENKERNELS_CE_CUDA_BLOCK_V", 4096));
    auto zbuf = at::empty({bn * bv}, f32);
    auto dzbuf = at::empty({bn * bv}, H.options());
    auto keep = at::empty({feps > 0.f ? dz_keep_flags(bn, bv) : 0}, hidden.options().dtype(at::kInt));
    auto tmp_dh = at::empty({(need_dh && lowp) ? bn * D : 0}, f32);
    auto tmp_dw = at::empty({(need_dw && lowp) ? bv * D : 0}, f32);
    for (int64_t r0 = 0; r0 < N; r0 += bn) {
      const int64_t rows = std::min(bn, N - r0);
      auto Hc = H.narrow(0, r0, rows);
      for (int64_t v0 = 0; v0 < V; v0 += bv) {
        const int64_t cols = std::min(bv, V - v0);
        auto Wb = W.narrow(0, v0, cols);
        auto Z = zbuf.narrow(0, 0, rows * cols).view({rows, cols});
        auto dZ = dzbuf.narrow(0, 0, rows * cols).view({rows, cols});
        logits_tile(Z, Hc, Wb);
        check_cuda(launch_dz_tile(Z.data_ptr<float>(), rows, cols, r0, v0, bp, cap, tg,
                                  L.data_ptr<float>(), CP.data_ptr<float>(), CT.data_ptr<float>(),
                                  c1p, gsp, feps,
                                  keep.numel() ? reinterpret_cast<unsigned*>(keep.data_ptr<int>())
                                               : nullptr,
                                  dZ.data_ptr(), dtype, stream),
                   "linear_cross_entropy backward tile");
        if (need_db) db32.narrow(0, v0, cols).add_(dZ.sum(0, /*keepdim=*/false, at::kFloat));
        if (need_dh) {
          auto dhc = dh.narrow(0, r0, rows);
          if (lowp) {
            auto tmp = tmp_dh.narrow(0, 0, rows * D).view({rows, D});
            at::mm_out(tmp, dZ, Wb, at::kFloat);
            dhc.add_(tmp);
          } else {
            dhc.addmm_(dZ, Wb);
          }
        }
        if (need_dw) {
          auto dwb = dw.narrow(0, v0, cols);
          if (lowp) {
            auto tmp = tmp_dw.narrow(0, 0, cols * D).view({cols, D});
            at::mm_out(tmp, dZ.t(), Hc, at::kFloat);
            dwb.add_(tmp);
          } else {
            dwb.addmm_(dZ.t(), Hc);
          }
        }
      }
    }
  });
  return finish();
}

}  // namespace
}  // namespace cross_entropy
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CUDA, m) {
  m.impl("cross_entropy_forward", &tokenkernels::cross_entropy::forward_cuda);
  m.impl("cross_entropy_backward", &tokenkernels::cross_entropy::backward_cuda);
}
