// cross_entropy family, impl="tuned" backward: the private CPU ops that expose its host code
// for tests (no GPU needed):
//   _cross_entropy_bwd_plan     plan_bwd, the chunk planner the CUDA adapter runs;
//   _cross_entropy_bwd_emulate  the recompute kernel's epilogue (ce_bwd_dz_tc_kernel), chunk by
//                               chunk and 128 x 128 tile by tile, with the same TK_HD functions
//                               (dz_row, dz_value, filter_keeps, mask_index) on the fp32 logits.
// CPU only, no autograd, no fakes (names start with an underscore: not part of the API).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "check.h"
#include "cross_entropy/cross_entropy_args.h"
#include "tokenkernels/cross_entropy_bwd.h"

namespace tokenkernels {
namespace cross_entropy {
namespace bwd {
namespace {

constexpr const char* kPlanOp = "_cross_entropy_bwd_plan";
constexpr const char* kEmuOp = "_cross_entropy_bwd_emulate";

at::Tensor plan_op(int64_t N, int64_t V, int64_t elt, int64_t budget, int64_t vc_override) {
  TORCH_CHECK_VALUE(N >= 0 && V >= 1 && (elt == 2 || elt == 4), "tokenkernels.", kPlanOp,
                    ": need N >= 0, V >= 1 and elt_bytes 2 or 4, got N = ", N, ", V = ", V,
                    ", elt_bytes = ", elt);
  const int64_t b = budget < 0 ? default_budget_bytes(N, V) : budget;
  const Plan p = plan_bwd(N, V, elt, b, vc_override);
  const std::vector<int64_t> v = {p.vc,        p.chunks,    p.ld,       p.row_tiles, p.col_tiles,
                                  p.mask_rows, p.mask_cols, p.dz_bytes, b};
  return at::tensor(v, at::TensorOptions().dtype(at::kLong));
}

at::Tensor f32_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "tokenkernels.", kEmuOp, ": ", name,
                    " must have shape (", n, ",), got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> emulate_op(
    const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse, const at::Tensor& coef_p, const at::Tensor& coef_t,
    const std::optional<at::Tensor>& coef_1, int64_t ignore_index, std::optional<double> softcap,
    int64_t vocab_start, double filter_eps, double grad_scale, int64_t vc) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1 && logits.device().is_cpu(),
                    "tokenkernels.", kEmuOp, ": logits must be a CPU (N, V) tensor with V >= 1, got ",
                    logits.sizes());
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == N, "tokenkernels.", kEmuOp,
                    ": targets must have shape (", N, ",), got ", targets.sizes());
  check_softcap(softcap, kEmuOp);
  check_filter_eps(filter_eps, kEmuOp);
  check_vocab_start(vocab_start, V, kEmuOp);
  auto Z = logits.to(at::kFloat).contiguous();
  auto T = targets.to(at::kLong).contiguous();
  auto L = f32_vector(lse, N, "lse");
  auto CP = f32_vector(coef_p, N, "coef_p");
  auto CT = f32_vector(coef_t, N, "coef_t");
  auto C1 = coef_1.has_value() ? f32_vector(*coef_1, N, "coef_1") : at::Tensor();
  auto B = bias.has_value() ? f32_vector(*bias, V, "bias") : at::Tensor();

  const Plan p = plan_bwd(N, V, 2, default_budget_bytes(N, V), vc);
  auto dz = at::zeros({N, V}, at::kFloat);
  auto mask = at::zeros({p.mask_rows, p.mask_cols}, at::kByte);
  const float* zp = Z.data_ptr<float>();
  const int64_t* tp = T.data_ptr<int64_t>();
  const float *lp = L.data_ptr<float>(), *cpp = CP.data_ptr<float>(), *ctp = CT.data_ptr<float>();
  const float* c1p = C1.defined() ? C1.data_ptr<float>() : nullptr;
  const float* bp = B.defined() ? B.data_ptr<float>() : nullptr;
  float* dzp = dz.data_ptr<float>();
  uint8_t* mp = mask.data_ptr<uint8_t>();
  const float cap = static_cast<float>(softcap_value(softcap));
  const float feps = static_cast<float>(filter_eps), sc = static_cast<float>(grad_scale);

  // the kernel's grid, chunk by chunk: blockIdx.x = token tile, blockIdx.y = column tile
  std::vector<float> tile(size_t(kTileM) * kTileN);
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t v0 = chunk_v0(p, c), vend = v0 + chunk_cols(p, c, V);
    for (int64_t by = 0; by < chunk_col_tiles(p, c, V); ++by) {
      const int64_t vt0 = v0 + by * kTileN;
      for (int64_t bx = 0; bx < p.row_tiles; ++bx) {
        const int64_t row0 = bx * kTileM;
        int keep[kTileM / kSubM] = {};
        for (int m = 0; m < kTileM; ++m) {
          const int64_t r = row0 + m;
          DzRow dr;
          if (r < N)
            dr = dz_row(lp[r], cpp[r], ctp[r], c1p ? c1p[r] : 0.f, feps,
                        target_column(tp[r], ignore_index, vocab_start, V));
          for (int n = 0; n < kTileN; ++n) {
            const int64_t v = vt0 + n;
            float x = 0.f;
            if (v < vend) {
              const float acc = r < N ? zp[r * V + v] : 0.f;
              x = dz_value(dr, acc, bp ? bp[v] : 0.f, cap, v);
            }
            keep[m / kSubM] |= filter_keeps(x, dr.thr) ? 1 : 0;
            tile[size_t(m) * kTileN + n] = x * sc;
          }
        }
        for (int m = 0; m < kTileM; ++m) {
          const int64_t r = row0 + m;
          if (r >= N) break;
          for (int n = 0; n < kTileN && vt0 + n < vend; ++n)
            dzp[r * V + vt0 + n] = keep[m / kSubM] ? tile[size_t(m) * kTileN + n] : 0.f;
        }
        for (int sub = 0; sub < kTileM / kSubM; ++sub) {
          const int64_t r = row0 + sub * kSubM;
          if (r >= N) break;
          mp[mask_index(r, vt0, p.mask_cols)] = static_cast<uint8_t>(keep[sub]);
        }
      }
    }
  }
  return {dz, mask};
}

}  // namespace
}  // namespace bwd
}  // namespace cross_entropy
}  // namespace tokenkernels

// The planner takes no tensor (nothing to dispatch on): registered for every backend; it
// returns a CPU tensor.
TORCH_LIBRARY_IMPL(tokenkernels, CompositeExplicitAutograd, m) {
  m.impl("_cross_entropy_bwd_plan", &tokenkernels::cross_entropy::bwd::plan_op);
}
TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("_cross_entropy_bwd_emulate", &tokenkernels::cross_entropy::bwd::emulate_op);
}
