// cross_entropy family: private CPU ops that run the host-visible code of the impl="tuned"
// sm_90a forward (tokenkernels/cross_entropy_sm90.h) for the tests, without a GPU:
//   _cross_entropy_fwd_plan     sm90::plan_forward (which path runs for which inputs and device,
//                               splits, grid, workspace) and the persistent schedule the kernel
//                               walks (sm90::unit_tiles, CTA c running units c, c + grid, ...);
//   _cross_entropy_fwd_emulate  the kernel's fold of fp32 logits: per (token, split) the 4 lanes
//                               of a row each fold their accumulator columns (sm90::acc_col) of
//                               every vocabulary tile with sm90::fold_tile, merge by the xor-1 /
//                               xor-2 shuffle order with sm90::merge_fold, store_partial; then
//                               sm90::merge_splits and the adapter's finalize (lse = m + log s,
//                               entropy = lse - tz / s, NaN target logit for a bad target).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "check.h"
#include "cross_entropy/cross_entropy_args.h"
#include "tokenkernels/cross_entropy_sm90.h"

namespace tokenkernels {
namespace cross_entropy {
namespace {

constexpr const char* kPlanOp = "_cross_entropy_fwd_plan";
constexpr const char* kEmulateOp = "_cross_entropy_fwd_emulate";

// (plan fields (15,) int64, schedule (T, 5) int64: cta, unit, row tile, split, vocab tile in the
// order each CTA runs them, CTA-major (cta = cluster * cluster_id + rank; a row tile equal to
// row_tiles is the padding of an odd pair); empty unless `schedule` and the sm_90a path).
std::tuple<at::Tensor, at::Tensor> fwd_plan(int64_t N, int64_t D, int64_t V, at::ScalarType dtype,
                                            bool aligned16, int64_t cc_major, int64_t cc_minor,
                                            int64_t sm_count, bool sm90a_code,
                                            c10::string_view impl, int64_t cluster,
                                            bool schedule) {
  TORCH_CHECK_VALUE(N >= 0 && D >= 0 && V >= 1, "tokenkernels.", kPlanOp,
                    ": N, D must be >= 0 and V >= 1, got N = ", N, ", D = ", D, ", V = ", V);
  TORCH_CHECK_VALUE(sm_count >= 1, "tokenkernels.", kPlanOp, ": sm_count must be >= 1, got ",
                    sm_count);
  TORCH_CHECK_VALUE(cluster == 1 || cluster == 2, "tokenkernels.", kPlanOp,
                    ": cluster must be 1 or 2, got ", cluster);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "tokenkernels.", kPlanOp, ": dtype must be float32, float16 or bfloat16, got ",
                   dtype);
  sm90::FwdPlanInput in;
  in.N = N;
  in.D = D;
  in.V = V;
  in.dtype = dtype == at::kFloat ? DType::kFloat32
                                 : (dtype == at::kHalf ? DType::kFloat16 : DType::kBFloat16);
  in.aligned16 = aligned16;
  in.cc_major = static_cast<int>(cc_major);
  in.cc_minor = static_cast<int>(cc_minor);
  in.sm_count = static_cast<int>(std::min<int64_t>(sm_count, 1 << 20));
  in.sm90a_code = sm90a_code;
  in.impl = parse_impl(impl, kPlanOp);
  in.cluster = static_cast<int>(cluster);
  const sm90::FwdPlan p = sm90::plan_forward(in);
  constexpr int kFields = 15;
  auto fields = at::empty({kFields}, at::kLong);
  int64_t* f = fields.data_ptr<int64_t>();
  const int64_t vals[kFields] = {static_cast<int64_t>(p.path), static_cast<int64_t>(p.reason),
                                 p.row_tiles, p.vocab_tiles, p.k_blocks, p.splits,
                                 p.tiles_per_split, p.units, p.grid, p.part_bytes,
                                 p.workspace_bytes, p.smem_bytes, p.makespan_tiles, p.cluster,
                                 p.row_units};
  for (int i = 0; i < kFields; ++i) f[i] = vals[i];
  std::vector<int64_t> sched;
  if (schedule && p.path == sm90::FwdPath::Sm90) {
    TORCH_CHECK_VALUE(p.row_tiles * p.vocab_tiles <= (int64_t(1) << 24), "tokenkernels.", kPlanOp,
                      ": schedule of ", p.row_tiles * p.vocab_tiles, " tiles is too long to list");
    const int64_t clusters = p.grid / p.cluster;
    for (int64_t c = 0; c < clusters; ++c)
      for (int64_t rank = 0; rank < p.cluster; ++rank)
        for (int64_t u = c; u < p.units; u += clusters) {  // the kernel's persistent loop
          int64_t ru, sp, vb, ve;
          sm90::unit_tiles(u, p.row_units, p.vocab_tiles, p.tiles_per_split, &ru, &sp, &vb, &ve);
          const int64_t rt = ru * p.cluster + rank;  // == row_tiles: the padded pair tile
          for (int64_t vt = vb; vt < ve; ++vt)
            sched.insert(sched.end(), {c * p.cluster + rank, u, rt, sp, vt});
        }
  }
  auto s = at::empty({static_cast<int64_t>(sched.size() / 5), 5}, at::kLong);
  std::copy(sched.begin(), sched.end(), s.data_ptr<int64_t>());
  return {fields, s};
}

template <bool kAux>
void fold_row_split(const float* z, const float* bias, float cap, float inv_cap, int64_t V, int64_t vb,
                    int64_t ve, sm90::RowFold* lanes) {
  float vals[sm90::kValsPerRow];
  for (int q = 0; q < sm90::kLanesPerRow; ++q) {
    sm90::fold_init(lanes[q]);
    const int c0 = sm90::acc_col(q, 0);
    auto off = [](int j) { return sm90::acc_col(0, j); };
    auto col = [q](int j) { return sm90::acc_col(q, j); };
    auto zf = [&vals](int j) { return vals[j]; };
    for (int64_t vt = vb; vt < ve; ++vt) {
      const int v0 = static_cast<int>(vt * sm90::kBN);
      const int ncols = static_cast<int>(std::min<int64_t>(sm90::kBN, V - v0));
      for (int j = 0; j < sm90::kValsPerRow; ++j) {
        const int c = col(j);
        // the kernel's accumulator past the shard is 0 (TMA zero fill); it is masked anyway
        const float acc = c < ncols ? z[v0 + c] : 0.f;
        vals[j] = sm90::logit_of(acc, (bias && c < ncols) ? bias[v0 + c] : 0.f, cap, inv_cap);
      }
      if (ncols == sm90::kBN)
        sm90::fold_tile<sm90::kValsPerRow, false, kAux>(lanes[q], zf, off, c0, v0, ncols);
      else
        sm90::fold_tile<sm90::kValsPerRow, true, kAux>(lanes[q], zf, off, c0, v0, ncols);
    }
  }
  // shuffle xor 1, then xor 2: lane 0 ends with (l0 + l1) + (l2 + l3)
  for (int o = 1; o < sm90::kLanesPerRow; o <<= 1) {
    sm90::RowFold next[sm90::kLanesPerRow];
    for (int q = 0; q < sm90::kLanesPerRow; ++q) {
      next[q] = lanes[q];
      sm90::merge_fold(next[q], lanes[q ^ o]);
    }
    for (int q = 0; q < sm90::kLanesPerRow; ++q) lanes[q] = next[q];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_emulate(
    const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, int64_t ignore_index, int64_t vocab_start,
    int64_t vocab_total, int64_t splits, bool sum_z, bool aux) {
  const char* op = kEmulateOp;
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, "tokenkernels.", op,
                    ": logits must be (N, V) with V >= 1, got shape ", logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat, "tokenkernels.", op,
                   ": logits must be float32, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "tokenkernels.", op, ": logits must be on the CPU");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V <= sm90::kMaxDim, "tokenkernels.", op, ": V must fit in int32, got ", V);
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == N, "tokenkernels.", op,
                    ": targets must have shape (", N, ",), got ", targets.sizes());
  TORCH_CHECK_VALUE(splits >= 1, "tokenkernels.", op, ": splits must be >= 1, got ", splits);
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == V, "tokenkernels.", op,
                      ": bias must have shape (", V, ",), got ", bias->sizes());
  check_vocab_range(vocab_start, vocab_total, V, op);
  check_softcap(softcap, op);
  const float cap = static_cast<float>(softcap_value(softcap));
  const float inv_cap = cap > 0.f ? 1.f / cap : 0.f;  // as the kernel
  auto Z = logits.contiguous();
  auto T = targets.to(at::kLong).contiguous();
  auto B = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* z = Z.data_ptr<float>();
  const int64_t* t = T.data_ptr<int64_t>();
  const float* bp = B.defined() ? B.data_ptr<float>() : nullptr;

  const int64_t vocab_tiles = (V + sm90::kBN - 1) / sm90::kBN;
  int64_t per = 0, S = 0;
  sm90::normalise_splits(vocab_tiles, splits, &per, &S);
  std::vector<float> part(static_cast<size_t>(std::max<int64_t>(N, 1) * S * sm90::kPartFields));
  std::vector<int32_t> idx(static_cast<size_t>(std::max<int64_t>(N, 1) * S));

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto lse = at::empty({N}, f32);
  auto zt = at::zeros({N}, f32);
  auto sumz = at::zeros({sum_z ? N : 0}, f32);
  auto amax = at::zeros({aux ? N : 0}, at::TensorOptions().dtype(at::kLong));
  auto maxz = at::full({aux ? N : 0}, -std::numeric_limits<float>::infinity(), f32);
  auto ent = at::empty({aux ? N : 0}, f32);
  for (int64_t r = 0; r < N; ++r) {
    const float* zr = z + r * V;
    for (int64_t sp = 0; sp < S; ++sp) {
      const int64_t vb = sp * per, ve = std::min(vb + per, vocab_tiles);
      sm90::RowFold lanes[sm90::kLanesPerRow];
      if (aux)
        fold_row_split<true>(zr, bp, cap, inv_cap, V, vb, ve, lanes);
      else
        fold_row_split<false>(zr, bp, cap, inv_cap, V, vb, ve, lanes);
      sm90::store_partial(lanes[0], part.data(), idx.data(), r * S + sp);
    }
    // the target logit, as the epilogue writes it (one tile holds the column)
    const int64_t lt = sm90::shard_target(t[r], ignore_index, vocab_start, V, vocab_total);
    if (lt >= 0) zt.data_ptr<float>()[r] = sm90::logit_of(zr[lt], bp ? bp[lt] : 0.f, cap, inv_cap);
    // ce_fwd_sm90_merge_kernel, then the adapter's finalize
    const sm90::RowFold f = sm90::merge_splits(part.data(), idx.data(), r, S);
    const float l = f.m + std::log(f.s);
    lse.data_ptr<float>()[r] = l;
    if (sum_z) sumz.data_ptr<float>()[r] = f.sz;
    if (aux) {
      maxz.data_ptr<float>()[r] = f.mx;
      amax.data_ptr<int64_t>()[r] = f.mx > -std::numeric_limits<float>::infinity() ? f.am : 0;
      ent.data_ptr<float>()[r] = l - f.tz / f.s;
    }
    if (t[r] != ignore_index && (t[r] < 0 || t[r] >= vocab_total))
      zt.data_ptr<float>()[r] = std::numeric_limits<float>::quiet_NaN();
  }
  return {lse, zt, sumz, amax, maxz, ent};
}

}  // namespace
}  // namespace cross_entropy
}  // namespace tokenkernels

// The plan op has no tensor argument (no dispatch key to compute): registered for every backend.
TORCH_LIBRARY_IMPL(tokenkernels, CompositeExplicitAutograd, m) {
  m.impl("_cross_entropy_fwd_plan", &tokenkernels::cross_entropy::fwd_plan);
}
TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("_cross_entropy_fwd_emulate", &tokenkernels::cross_entropy::fwd_emulate);
}
