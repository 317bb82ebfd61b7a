// cross_entropy family, CPU: fused linear cross-entropy that never holds the (N, V) logits.
//
// Both ops walk the logits in tiles of (block_n tokens) x (block_v vocabulary rows):
//   Z_tile = hidden[rows] @ weight[cols]^T          (ATen GEMM = the CPU BLAS, input dtype)
// and consume each tile at once in an epilogue that runs over the tile's rows in parallel:
//   forward : per-token online log-sum-exp (running max m, sum-exp s), the target logit,
//             sum of logits (label smoothing), arg-max and sum p*z (entropy);
//   backward: dZ = coef_p * softmax + coef_t * onehot(target) + coef_1 (times the softcap
//             derivative), then dhidden[rows] += dZ @ weight[cols] and
//             dweight[cols] += dZ^T @ hidden[rows] (two more GEMMs), tiles whose |dZ| is below
//             the row's filter threshold skipped (gradient filtering).
// Extra memory: two tiles, one (block_n, D) fp32 accumulator, and O(N + V) vectors.
// Rows are processed chunk by chunk so the running state of a chunk stays in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cross_entropy/cross_entropy_args.h"
#include "cross_entropy/cross_entropy_cpu.h"

namespace tokenkernels {
namespace cross_entropy {
namespace cpu {
namespace {


int64_t block_n_cpu(int64_t N) { return std::min<int64_t>(std::max<int64_t>(N, 1), env_or("TOKENKERNELS_CE_BLOCK_N", 256)); }
int64_t block_v_cpu(int64_t V) { return std::min<int64_t>(V, env_or("TOKENKERNELS_CE_BLOCK_V", 2048)); }
// fp16/bf16 tiles are computed in fp32 from upcast operands: keep the upcast (block_v, D) weight
// block near 2 MB.
int64_t block_v_lowp_cpu(int64_t V, int64_t D) {
  const int64_t dflt = std::clamp<int64_t>((int64_t(1) << 19) / std::max<int64_t>(D, 1), 128, 2048);
  return std::min<int64_t>(V, env_or("TOKENKERNELS_CE_BLOCK_V", dflt));
}

// Load row i of a (rows, cols) tile of type T into fp32, add bias, apply the softcap.
template <typename T, typename A>
inline void load_row(const T* tile, int64_t cols, int64_t i, const A* bias, A cap, A* out) {
  to_float_row(tile + i * cols, cols, bias, out);
  if (cap > 0) softcap_row(out, cols, cap);
}

// Local vocabulary index of token r's target, or -1 when ignored / owned by another shard /
// out of range. `bad` is set when the target is neither ignored nor inside [0, vocab_total).
inline int64_t local_target(int64_t t, int64_t ignore_index, int64_t vocab_start, int64_t V,
                            int64_t vocab_total, bool* bad) {
  *bad = false;
  if (t == ignore_index) return -1;
  if (t < 0 || t >= vocab_total) {
    *bad = true;
    return -1;
  }
  return shard_local(t, vocab_start, V);
}

// impl: the CPU has one engine for every Impl (parsed and validated all the same).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, std::optional<double> softcap,
    int64_t vocab_start, int64_t vocab_total, bool want_sumz, bool aux, bool check,
    double filter_eps, bool /*accum_fp32*/, c10::string_view impl) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // internal ATen calls are not recorded
  const auto a = check_forward(hidden, weight, targets, bias, ignore_index, softcap, vocab_start,
                               vocab_total, check, filter_eps, impl);
  const int64_t N = a.N, V = a.V;

  // statistics in fp32 (fp64 for fp64 inputs, which the CPU accepts for gradcheck)
  const auto f32 = hidden.options().dtype(hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto lse = at::empty({N}, f32);
  auto zt = at::zeros({N}, f32);
  auto sumz = at::zeros({want_sumz ? N : 0}, f32);
  auto amax = at::zeros({aux ? N : 0}, hidden.options().dtype(at::kLong));
  auto maxz = at::full({aux ? N : 0}, -std::numeric_limits<double>::infinity(), f32);
  auto ent = at::empty({aux ? N : 0}, f32);
  if (N == 0) return {lse, zt, sumz, amax, maxz, ent};

  auto H = hidden.contiguous();
  auto W = weight.contiguous();
  auto T = long_contig(targets);
  auto B = bias.has_value() ? bias->to(f32.dtype()).contiguous() : at::Tensor();
  // fp16/bf16: the logit tiles are fp32 GEMMs of upcast operands (exact products, fp32 sums),
  // so no logit is rounded to the input dtype (torch's materialised path rounds every one).
  const bool lowp = H.scalar_type() == at::kHalf || H.scalar_type() == at::kBFloat16;
  const int64_t bn = block_n_cpu(N), bv = lowp ? block_v_lowp_cpu(V, a.D) : block_v_cpu(V);
  auto zbuf = at::empty({bn * bv}, lowp ? f32 : hidden.options());
  auto hbuf = lowp ? at::empty({bn * a.D}, f32) : at::Tensor();
  auto wbuf = lowp ? at::empty({bv * a.D}, f32) : at::Tensor();
  const int64_t* tp = T.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, H.scalar_type(), "cross_entropy_forward_cpu", [&] {
    using tile_t = std::conditional_t<std::is_same_v<scalar_t, double>, double,
                   std::conditional_t<std::is_same_v<scalar_t, float>, float, float>>;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr acc_t kNegInfA = -std::numeric_limits<acc_t>::infinity();
    std::vector<acc_t> m(N, kNegInfA), s(N, 0), tz(N, 0);
    const acc_t cap = static_cast<acc_t>(softcap_value(softcap));
    acc_t* lsep = lse.data_ptr<acc_t>();
    acc_t* ztp = zt.data_ptr<acc_t>();
    acc_t* sump = want_sumz ? sumz.data_ptr<acc_t>() : nullptr;
    int64_t* amp = aux ? amax.data_ptr<int64_t>() : nullptr;
    acc_t* mzp = aux ? maxz.data_ptr<acc_t>() : nullptr;
    acc_t* ep = aux ? ent.data_ptr<acc_t>() : nullptr;
    for (int64_t r0 = 0; r0 < N; r0 += bn) {
      const int64_t rows = std::min(bn, N - r0);
      at::Tensor Hc = H.narrow(0, r0, rows);
      if (lowp) Hc = hbuf.narrow(0, 0, rows * a.D).view({rows, a.D}).copy_(Hc);
      for (int64_t v0 = 0; v0 < V; v0 += bv) {
        const int64_t cols = std::min(bv, V - v0);
        auto Z = zbuf.narrow(0, 0, rows * cols).view({rows, cols});
        at::Tensor Wb = W.narrow(0, v0, cols);
        if (lowp) Wb = wbuf.narrow(0, 0, cols * a.D).view({cols, a.D}).copy_(Wb);
        at::mm_out(Z, Hc, Wb.t());
        const tile_t* zp = Z.data_ptr<tile_t>();
        const acc_t* bp = B.defined() ? B.data_ptr<acc_t>() + v0 : nullptr;
        at::parallel_for(0, rows, 8, [&](int64_t i0, int64_t i1) {
          std::vector<acc_t> row(cols);
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t r = r0 + i;
            load_row(zp, cols, i, bp, cap, row.data());
            const acc_t bm = row_max(row.data(), cols);
            bool bad;
            const int64_t lt = local_target(tp[r], ignore_index, vocab_start, V, vocab_total, &bad);
            if (bad) ztp[r] = std::numeric_limits<acc_t>::quiet_NaN();
            else if (lt >= v0 && lt < v0 + cols) ztp[r] = row[lt - v0];
            if (sump) sump[r] += row_sum(row.data(), cols);
            if (aux && bm > mzp[r]) {  // strict: the earliest block keeps ties
              int64_t j = 0;
              while (j < cols && !(row[j] == bm)) ++j;
              mzp[r] = bm;
              amp[r] = v0 + j;
            }
            const acc_t mn = std::max(m[r], bm);
            if (!(mn > kNegInfA)) continue;  // all -inf / NaN row: left to finalisation
            acc_t t_blk = 0;
            const acc_t s_blk = exp_sum(row.data(), cols, mn, aux ? &t_blk : nullptr);
            const acc_t scale = m[r] > kNegInfA ? std::exp(m[r] - mn) : acc_t(0);
            s[r] = s[r] * scale + s_blk;
            if (aux) tz[r] = tz[r] * scale + t_blk;
            m[r] = mn;
          }
        });
      }
    }
    at::parallel_for(0, N, 1024, [&](int64_t i0, int64_t i1) {
      for (int64_t r = i0; r < i1; ++r) {
        lsep[r] = m[r] + std::log(s[r]);
        if (ep) ep[r] = lsep[r] - tz[r] / s[r];
      }
    });
  });
  return {lse, zt, sumz, amax, maxz, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& coef_p,
    const at::Tensor& coef_t, const std::optional<at::Tensor>& coef_1, int64_t ignore_index,
    std::optional<double> softcap, int64_t vocab_start, double filter_eps, bool need_dh,
    bool need_dw, bool need_db, bool accum_fp32, c10::string_view impl) {
  const auto a = check_backward(hidden, weight, targets, bias, lse, coef_p, coef_t, coef_1,
                                softcap, vocab_start, filter_eps, need_db, impl);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // internal ATen calls are not recorded
  const int64_t N = a.N, D = a.D, V = a.V;

  // Precision: every gradient element is accumulated in fp32 (fp64 for fp64) and rounded to its
  // dtype once. fp32/fp64: one pass over the tiles, accumulating straight into the outputs.
  // fp16/bf16: logits, dZ and the gradient GEMMs are all fp32 on upcast tiles (nothing rounded
  // to the input dtype before the final gradients), in two passes that each keep
  // only a tile-sized fp32 accumulator: pass A (token chunks outer) finishes dhidden rows, pass B
  // (vocabulary blocks outer) finishes dweight rows. accum_fp32 trades pass B's recompute for a
  // (V, D) fp32 buffer.
  const auto dt = hidden.scalar_type();
  const bool lowp = dt == at::kHalf || dt == at::kBFloat16;
  const auto sdt = dt == at::kDouble ? at::kDouble : at::kFloat;  // accumulation dtype
  const auto so = hidden.options().dtype(sdt);
  auto dh = need_dh ? at::empty({N, D}, hidden.options()) : at::empty({0}, hidden.options());
  const bool single_pass = !lowp || accum_fp32;
  auto dw = need_dw ? (lowp ? at::empty({V, D}, weight.options()) : at::zeros({V, D}, weight.options()))
                    : at::empty({0}, weight.options());
  auto dw_acc = (need_dw && lowp && accum_fp32) ? at::zeros({V, D}, so) : at::Tensor();
  auto db32 = at::zeros({need_db ? V : 0}, so);
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    if (dw_acc.defined()) dw.copy_(dw_acc);
    return {dh, dw, need_db ? db32.to(bias->scalar_type()) : db32};
  };
  if (N == 0 || (!need_dh && !need_dw && !need_db)) {
    if (need_dh) dh.zero_();
    if (need_dw && lowp) dw.zero_();
    return finish();
  }

  auto H = hidden.contiguous();
  auto W = weight.contiguous();
  auto T = long_contig(targets);
  auto B = bias.has_value() ? bias->to(sdt).contiguous() : at::Tensor();
  auto L = lse.to(sdt).contiguous();
  auto CP = coef_p.to(sdt).contiguous();
  auto CT = coef_t.to(sdt).contiguous();
  auto C1 = coef_1.has_value() ? coef_1->to(sdt).contiguous() : at::Tensor();
  const int64_t* tp = T.data_ptr<int64_t>();

  const int64_t bn = block_n_cpu(N);
  const int64_t bv = lowp ? block_v_lowp_cpu(V, D) : block_v_cpu(V);
  auto zbuf = at::empty({bn * bv}, so);                           // logits tile, fp32/fp64
  auto dzbuf = at::empty({bn * bv}, so);                          // dZ tile, fp32/fp64
  auto hbuf = lowp ? at::empty({bn * D}, so) : at::Tensor();      // upcast hidden chunk
  auto wbuf = lowp ? at::empty({bv * D}, so) : at::Tensor();      // upcast weight block
  auto acc_h = (need_dh && lowp) ? at::empty({bn * D}, so) : at::Tensor();
  auto acc_w = (need_dw && lowp && !accum_fp32) ? at::empty({bv * D}, so) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "cross_entropy_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* lp = L.data_ptr<acc_t>();
    const acc_t* cpp = CP.data_ptr<acc_t>();
    const acc_t* ctp = CT.data_ptr<acc_t>();
    const acc_t* c1p = C1.defined() ? C1.data_ptr<acc_t>() : nullptr;
    const acc_t cap = static_cast<acc_t>(softcap_value(softcap));
    const acc_t inv_cap = cap > 0 ? 1 / cap : acc_t(0);
    const acc_t feps = static_cast<acc_t>(filter_eps);

    // dZ (rows, cols) in acc_t for the tile hidden[r0 : r0+rows] x weight[v0 : v0+cols].
    // Returns false when every |dZ| is below its row's threshold (the tile can be skipped);
    // a NaN entry always keeps the tile.
    // Hc / Wb: the chunk and block in the accumulation dtype (upcast for fp16/bf16).
    auto tile_dz = [&](const at::Tensor& Hc, int64_t r0, int64_t rows, const at::Tensor& Wb,
                       int64_t v0, int64_t cols, at::Tensor& dZ) {
      auto Z = zbuf.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(Z, Hc, Wb.t());
      dZ = dzbuf.narrow(0, 0, rows * cols).view({rows, cols});
      const acc_t* zp = Z.data_ptr<acc_t>();
      acc_t* dzp = dZ.data_ptr<acc_t>();
      const acc_t* bp = B.defined() ? B.data_ptr<acc_t>() + v0 : nullptr;
      std::atomic<bool> keep{feps <= 0};
      at::parallel_for(0, rows, 8, [&](int64_t i0, int64_t i1) {
        std::vector<acc_t> row(cols);
        bool k = false;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = r0 + i;
          const acc_t cp = cpp[r], ct = ctp[r], c1 = c1p ? c1p[r] : acc_t(0);
          acc_t* d = dzp + i * cols;
          if (cp == 0 && ct == 0 && c1 == 0) {  // no gradient from this token
            std::fill(d, d + cols, acc_t(0));
            continue;
          }
          load_row(zp, cols, i, bp, cap, row.data());
          acc_t mx = dz_row(row.data(), cols, lp[r], cp, c1, inv_cap, d);
          bool bad;
          const int64_t lt = local_target(tp[r], ignore_index, vocab_start, V,
                                          std::numeric_limits<int64_t>::max(), &bad);
          if (lt >= v0 && lt < v0 + cols && ct != 0) {
            const int64_t j = lt - v0;
            acc_t v = cp * std::exp(row[j] - lp[r]) + c1 + ct;
            if (inv_cap != 0) v *= 1 - (row[j] * inv_cap) * (row[j] * inv_cap);
            d[j] = v;
            mx = nan_max(mx, std::fabs(v));
          }
          if (!(mx < feps * std::max(std::fabs(cp), std::fabs(ct)))) k = true;  // NaN: keep
        }
        if (k) keep.store(true, std::memory_order_relaxed);
      });
      return keep.load();
    };
    auto add_db = [&](const at::Tensor& dZ, int64_t v0, int64_t cols) {
      db32.narrow(0, v0, cols).add_(dZ.sum(0));
    };

    if (single_pass) {
      // token chunks outer, vocabulary blocks inner; dW accumulates in dw (fp32/fp64) or dw_acc
      at::Tensor dwt = dw_acc.defined() ? dw_acc : dw;
      for (int64_t r0 = 0; r0 < N; r0 += bn) {
        const int64_t rows = std::min(bn, N - r0);
        at::Tensor Hc = H.narrow(0, r0, rows);
        if (lowp) Hc = hbuf.narrow(0, 0, rows * D).view({rows, D}).copy_(Hc);
        at::Tensor acc;
        if (need_dh) {
          acc = lowp ? acc_h.narrow(0, 0, rows * D).view({rows, D}) : dh.narrow(0, r0, rows);
          acc.zero_();
        }
        for (int64_t v0 = 0; v0 < V; v0 += bv) {
          const int64_t cols = std::min(bv, V - v0);
          at::Tensor Wb = W.narrow(0, v0, cols);
          if (lowp) Wb = wbuf.narrow(0, 0, cols * D).view({cols, D}).copy_(Wb);
          at::Tensor dZ;
          if (!tile_dz(Hc, r0, rows, Wb, v0, cols, dZ)) continue;
          if (need_db) add_db(dZ, v0, cols);
          if (need_dh) acc.addmm_(dZ, Wb);
          if (need_dw) dwt.narrow(0, v0, cols).addmm_(dZ.t(), Hc);
        }
        if (need_dh && lowp) dh.narrow(0, r0, rows).copy_(acc);
      }
      return;
    }
    // fp16/bf16, two passes
    if (need_dh) {  // pass A: dhidden (and dbias)
      for (int64_t r0 = 0; r0 < N; r0 += bn) {
        const int64_t rows = std::min(bn, N - r0);
        auto acc = acc_h.narrow(0, 0, rows * D).view({rows, D});
        acc.zero_();
        auto Hc = hbuf.narrow(0, 0, rows * D).view({rows, D}).copy_(H.narrow(0, r0, rows));
        for (int64_t v0 = 0; v0 < V; v0 += bv) {
          const int64_t cols = std::min(bv, V - v0);
          auto Wb = wbuf.narrow(0, 0, cols * D).view({cols, D}).copy_(W.narrow(0, v0, cols));
          at::Tensor dZ;
          if (!tile_dz(Hc, r0, rows, Wb, v0, cols, dZ)) continue;
          if (need_db) add_db(dZ, v0, cols);
          acc.addmm_(dZ, Wb);
        }
        dh.narrow(0, r0, rows).copy_(acc);
      }
    }
    if (need_dw || (need_db && !need_dh)) {  // pass B: dweight (and dbias if pass A did not run)
      for (int64_t v0 = 0; v0 < V; v0 += bv) {
        const int64_t cols = std::min(bv, V - v0);
        at::Tensor acc;
        if (need_dw) {
          acc = acc_w.narrow(0, 0, cols * D).view({cols, D});
          acc.zero_();
        }
        auto Wb = wbuf.narrow(0, 0, cols * D).view({cols, D}).copy_(W.narrow(0, v0, cols));
        for (int64_t r0 = 0; r0 < N; r0 += bn) {
          const int64_t rows = std::min(bn, N - r0);
          auto Hc = hbuf.narrow(0, 0, rows * D).view({rows, D}).copy_(H.narrow(0, r0, rows));
          at::Tensor dZ;
          if (!tile_dz(Hc, r0, rows, Wb, v0, cols, dZ)) continue;
          if (need_db && !need_dh) add_db(dZ, v0, cols);
          if (need_dw) acc.addmm_(dZ.t(), Hc);
        }
        if (need_dw) dw.narrow(0, v0, cols).copy_(acc);
      }
    }
  });
  return finish();
}

}  // namespace
}  // namespace cpu
}  // namespace cross_entropy
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("cross_entropy_forward", &tokenkernels::cross_entropy::cpu::forward);
  m.impl("cross_entropy_backward", &tokenkernels::cross_entropy::cpu::backward);
}
