// kcenter family: argument checking shared by the CPU and CUDA adapters.
#pragma once
#include <ATen/ATen.h>

#include "check.h"

namespace tokenkernels {
namespace kcenter {

struct KcenterArgs {
  at::Tensor x;   // (B, N, D)
  int64_t B, N, D, k;
};

// Shape/dtype/device checks (no host sync). Returns x viewed as (B, N, D).
inline KcenterArgs check_kcenter_args(const at::Tensor& x_in, int64_t k,
                                      const std::optional<at::Tensor>& k_per_item,
                                      const std::optional<at::Tensor>& lengths,
                                      const std::optional<at::Tensor>& exclude,
                                      const std::optional<at::Tensor>& start_index,
                                      int64_t metric) {
  TORCH_CHECK(x_in.dim() == 3, "tokenkernels.kcenter: x must be (B, N, D), got shape ",
              x_in.sizes());
  check_float_input(x_in, "x");
  TORCH_CHECK(k >= 0, "tokenkernels.kcenter: k must be >= 0, got ", k);
  TORCH_CHECK(metric == 0 || metric == 1, "tokenkernels.kcenter: metric must be 0 (cosine) or 1 (l2), got ", metric);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  TORCH_CHECK(D >= 1 || N == 0, "tokenkernels.kcenter: x must have D >= 1 features, got D = ", D);
  check_per_item(k_per_item, B, "k");
  check_per_item(lengths, B, "lengths");
  check_per_item(start_index, B, "start_index");
  check_mask(exclude, B, N, "exclude");
  check_same_device(x_in, k_per_item, "x", "k");
  check_same_device(x_in, lengths, "x", "lengths");
  check_same_device(x_in, exclude, "x", "exclude");
  check_same_device(x_in, start_index, "x", "start_index");
  return {x_in, B, N, D, k};
}

// Value checks: lengths in [0, N], k (per item) in [0, valid tokens], start index valid.
// One device->host copy of a few (B,) tensors when x is on CUDA.
inline void check_kcenter_values(const KcenterArgs& a, const std::optional<at::Tensor>& k_per_item,
                                 const std::optional<at::Tensor>& lengths,
                                 const std::optional<at::Tensor>& exclude,
                                 const std::optional<at::Tensor>& start_index) {
  const auto dev = a.x.device();
  auto lens = lengths.has_value() ? *lengths
                                  : at::full({a.B}, a.N, at::TensorOptions().dtype(at::kLong).device(dev));
  if (lengths.has_value()) {
    auto bad = at::logical_or(lens.lt(0), lens.gt(a.N)).any().item<bool>();
    TORCH_CHECK(!bad, "tokenkernels.kcenter: lengths must lie in [0, N=", a.N, "], got ",
                lens.cpu());
  }
  // valid[b, j] = j < lengths[b] and not exclude[b, j]
  auto pos = at::arange(a.N, at::TensorOptions().dtype(at::kLong).device(dev));
  auto valid = pos.unsqueeze(0).lt(lens.unsqueeze(1));
  if (exclude.has_value()) valid = valid.logical_and(exclude->logical_not());
  auto counts = valid.sum(1).cpu();
  auto kk = k_per_item.has_value() ? k_per_item->cpu() : at::full({a.B}, a.k, at::kLong);
  auto kacc = kk.accessor<int64_t, 1>();
  auto cacc = counts.accessor<int64_t, 1>();
  for (int64_t b = 0; b < a.B; ++b) {
    TORCH_CHECK(kacc[b] >= 0, "tokenkernels.kcenter: k must be >= 0, got k[", b, "] = ", kacc[b]);
    TORCH_CHECK(kacc[b] <= a.k, "tokenkernels.kcenter: k[", b, "] = ", kacc[b],
                " exceeds k_max = ", a.k);
    TORCH_CHECK(kacc[b] <= cacc[b], "tokenkernels.kcenter: k = ", kacc[b],
                " exceeds the number of valid tokens (", cacc[b], ") of item ", b,
                " (after lengths/exclude)");
  }
  if (start_index.has_value()) {
    auto s = start_index->cpu();
    auto sacc = s.accessor<int64_t, 1>();
    auto vcpu = valid.cpu();
    auto vacc = vcpu.accessor<bool, 2>();
    for (int64_t b = 0; b < a.B; ++b) {
      if (kacc[b] == 0) continue;
      TORCH_CHECK(sacc[b] >= 0 && sacc[b] < a.N && vacc[b][sacc[b]],
                  "tokenkernels.kcenter: start index ", sacc[b], " of item ", b,
                  " is not a valid token (out of range, beyond lengths, or excluded)");
    }
  }
}

}  // namespace kcenter
}  // namespace tokenkernels

namespace tokenkernels {
namespace kcenter {

struct CoverageArgs {
  int64_t B, M, N, k;
};

inline CoverageArgs check_coverage_args(const at::Tensor& sim, int64_t k,
                                        const std::optional<at::Tensor>& k_per_item,
                                        const std::optional<at::Tensor>& lengths,
                                        const std::optional<at::Tensor>& row_lengths,
                                        const std::optional<at::Tensor>& exclude) {
  TORCH_CHECK(sim.dim() == 3, "tokenkernels.coverage_select: sim must be (B, M, N), got shape ",
              sim.sizes());
  check_float_input(sim, "sim");
  TORCH_CHECK(k >= 0, "tokenkernels.coverage_select: k must be >= 0, got ", k);
  const int64_t B = sim.size(0), M = sim.size(1), N = sim.size(2);
  check_per_item(k_per_item, B, "k");
  check_per_item(lengths, B, "lengths");
  check_per_item(row_lengths, B, "row_lengths");
  check_mask(exclude, B, N, "exclude");
  check_same_device(sim, k_per_item, "sim", "k");
  check_same_device(sim, lengths, "sim", "lengths");
  check_same_device(sim, row_lengths, "sim", "row_lengths");
  check_same_device(sim, exclude, "sim", "exclude");
  return {B, M, N, k};
}

inline void check_coverage_values(const at::Tensor& sim, const CoverageArgs& a,
                                  const std::optional<at::Tensor>& k_per_item,
                                  const std::optional<at::Tensor>& lengths,
                                  const std::optional<at::Tensor>& row_lengths,
                                  const std::optional<at::Tensor>& exclude) {
  const auto dev = sim.device();
  TORCH_CHECK(!sim.lt(0).any().item<bool>(),
              "tokenkernels.coverage_select: sim must be non-negative (coverage of a row is the "
              "max similarity of its selected candidates)");
  if (row_lengths.has_value())
    TORCH_CHECK(!at::logical_or(row_lengths->lt(0), row_lengths->gt(a.M)).any().item<bool>(),
                "tokenkernels.coverage_select: row_lengths must lie in [0, M=", a.M, "]");
  auto lens = lengths.has_value() ? *lengths
                                  : at::full({a.B}, a.N, at::TensorOptions().dtype(at::kLong).device(dev));
  if (lengths.has_value())
    TORCH_CHECK(!at::logical_or(lens.lt(0), lens.gt(a.N)).any().item<bool>(),
                "tokenkernels.coverage_select: lengths must lie in [0, N=", a.N, "], got ",
                lens.cpu());
  auto pos = at::arange(a.N, at::TensorOptions().dtype(at::kLong).device(dev));
  auto valid = pos.unsqueeze(0).lt(lens.unsqueeze(1));
  if (exclude.has_value()) valid = valid.logical_and(exclude->logical_not());
  auto counts = valid.sum(1).cpu();
  auto kk = k_per_item.has_value() ? k_per_item->cpu() : at::full({a.B}, a.k, at::kLong);
  auto kacc = kk.accessor<int64_t, 1>();
  auto cacc = counts.accessor<int64_t, 1>();
  for (int64_t b = 0; b < a.B; ++b) {
    TORCH_CHECK(kacc[b] >= 0 && kacc[b] <= a.k, "tokenkernels.coverage_select: k[", b, "] = ",
                kacc[b], " must lie in [0, k_max = ", a.k, "]");
    TORCH_CHECK(kacc[b] <= cacc[b], "tokenkernels.coverage_select: k = ", kacc[b],
                " exceeds the number of valid candidates (", cacc[b], ") of item ", b);
  }
}

}  // namespace kcenter
}  // namespace tokenkernels
