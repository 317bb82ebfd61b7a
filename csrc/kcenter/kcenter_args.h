// kcenter family: every shape / dtype / device / value check and option parse of its ops
// (kcenter_select, kcenter_coverage_select). The CPU kernels (kcenter.cpp) and the CUDA
// adapter (kcenter_cuda.cpp) both call these, so the same bad input gives the same error, type
// and message, on every device. Messages name the public op and its argument
// ("tokenkernels.kcenter: lengths must have shape (2,), got [3]").
//
// Exception types (what Python sees): shapes and option names ValueError; x / sim dtype, index
// tensor dtypes, devices and value checks (check=True) RuntimeError.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "check.h"
#include "tokenkernels/kcenter.h"

namespace tokenkernels {
namespace kcenter {

// Public op names (the Python API) used in every message.
inline constexpr const char* kSelectOp = "kcenter";
inline constexpr const char* kCoverageOp = "coverage_select";

// ------------------------------------------------------------------------------ options
inline Metric parse_metric(std::string_view metric) {
  return parse_option<Metric>(metric, {{"cosine", Metric::Cosine}, {"l2", Metric::L2}}, kSelectOp,
                              "metric");
}

inline Impl parse_impl(std::string_view impl) {
  return parse_option<Impl>(impl,
                            {{"auto", Impl::Auto},
                             {"plain", Impl::Plain},
                             {"simt", Impl::Simt},
                             {"tuned", Impl::Tuned},
                             {"stream", Impl::Stream}},
                            kSelectOp, "impl");
}

// ------------------------------------------------------------------------------ pieces
namespace detail {

inline void check_features(const at::Tensor& t, const char* op, const char* name,
                           const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == 3, "tokenkernels.", op, ": ", name, " must be ", shape,
                    ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              "tokenkernels.", op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

// (B,) int64 tensor of per-item values on ref's device, or none. `shape_what` is how the
// message describes the accepted shapes ("have shape" / "be an int or have shape").
inline void check_per_item(const std::optional<at::Tensor>& t, const at::Tensor& ref, int64_t B,
                           const char* op, const char* name, const char* ref_name,
                           const char* shape_what = "have shape") {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B, "tokenkernels.", op, ": ", name, " must ",
                    shape_what, " (", B, ",), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kLong, "tokenkernels.", op, ": ", name,
              " must be int64, got ", t->scalar_type());
  TORCH_CHECK(t->device() == ref.device(), "tokenkernels.", op, ": ", name, " is on ",
              t->device(), " but ", ref_name, " is on ", ref.device());
}

// (B, N) bool mask on ref's device, or none.
inline void check_mask(const std::optional<at::Tensor>& t, const at::Tensor& ref, int64_t B,
                       int64_t N, const char* op, const char* name, const char* ref_name) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) == N, "tokenkernels.", op,
                    ": ", name, " must have shape (", B, ", ", N, "), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kBool, "tokenkernels.", op, ": ", name,
              " must be bool, got ", t->scalar_type());
  TORCH_CHECK(t->device() == ref.device(), "tokenkernels.", op, ": ", name, " is on ",
              t->device(), " but ", ref_name, " is on ", ref.device());
}

// valid[b, j] = j < lengths[b] and not exclude[b, j], on ref's device; lengths must lie in
// [0, N] (checked here: one host sync).
inline at::Tensor checked_valid(const at::Tensor& ref, int64_t B, int64_t N,
                                const std::optional<at::Tensor>& lengths,
                                const std::optional<at::Tensor>& exclude, const char* op) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(ref.device());
  auto lens = lengths.has_value() ? *lengths : at::full({B}, N, opts);
  if (lengths.has_value())
    TORCH_CHECK(!at::logical_or(lens.lt(0), lens.gt(N)).any().item<bool>(), "tokenkernels.", op,
                ": lengths must lie in [0, N=", N, "], got ", lens.cpu());
  auto valid = at::arange(N, opts).unsqueeze(0).lt(lens.unsqueeze(1));
  if (exclude.has_value()) valid = valid.logical_and(exclude->logical_not());
  return valid;
}

}  // namespace detail

// ------------------------------------------------------------------------------ kcenter_select
struct SelectArgs {
  int64_t B, N, D, k;
  Metric metric;
  Impl impl;
};

// Shapes, dtypes, devices and options (no host sync).
inline SelectArgs check_select_args(const at::Tensor& x, int64_t k,
                                    const std::optional<at::Tensor>& k_per_item,
                                    const std::optional<at::Tensor>& lengths,
                                    const std::optional<at::Tensor>& exclude,
                                    const std::optional<at::Tensor>& start_index,
                                    std::string_view metric, std::string_view impl) {
  const char* op = kSelectOp;
  detail::check_features(x, op, "x", "(B, N, D)");
  TORCH_CHECK(k >= 0, "tokenkernels.", op, ": k must be >= 0, got ", k);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(D >= 1 || N == 0, "tokenkernels.", op, ": x must have D >= 1 features, got D = ", D);
  detail::check_per_item(k_per_item, x, B, op, "k", "x", "be an int or have shape");
  detail::check_per_item(lengths, x, B, op, "lengths", "x");
  detail::check_per_item(start_index, x, B, op, "start", "x");
  detail::check_mask(exclude, x, B, N, op, "exclude", "x");
  return {B, N, D, k, parse_metric(metric), parse_impl(impl)};
}

// Value checks (check=True): lengths in [0, N], k (per item) in [0, valid tokens], start a
// valid token. One device->host copy of a few (B,) / (B, N) tensors when x is on CUDA.
inline void check_select_values(const at::Tensor& x, const SelectArgs& a,
                                const std::optional<at::Tensor>& k_per_item,
                                const std::optional<at::Tensor>& lengths,
                                const std::optional<at::Tensor>& exclude,
                                const std::optional<at::Tensor>& start_index) {
  const char* op = kSelectOp;
  auto valid = detail::checked_valid(x, a.B, a.N, lengths, exclude, op);
  auto counts = valid.sum(1).cpu();
  auto kk = k_per_item.has_value() ? k_per_item->cpu() : at::full({a.B}, a.k, at::kLong);
  auto kacc = kk.accessor<int64_t, 1>();
  auto cacc = counts.accessor<int64_t, 1>();
  for (int64_t b = 0; b < a.B; ++b) {
    TORCH_CHECK(kacc[b] >= 0, "tokenkernels.", op, ": k must be >= 0, got k[", b, "] = ", kacc[b]);
    TORCH_CHECK(kacc[b] <= a.k, "tokenkernels.", op, ": k[", b, "] = ", kacc[b],
                " exceeds k_max = ", a.k);
    TORCH_CHECK(kacc[b] <= cacc[b], "tokenkernels.", op, ": k = ", kacc[b],
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
      TORCH_CHECK(sacc[b] >= 0 && sacc[b] < a.N && vacc[b][sacc[b]], "tokenkernels.", op,
                  ": start index ", sacc[b], " of item ", b,
                  " is not a valid token (out of range, beyond lengths, or excluded)");
    }
  }
}

// ------------------------------------------------------------------------------ kcenter_coverage_select
struct CoverageArgs {
  int64_t B, M, N, k;
};

inline CoverageArgs check_coverage_args(const at::Tensor& sim, int64_t k,
                                        const std::optional<at::Tensor>& k_per_item,
                                        const std::optional<at::Tensor>& lengths,
                                        const std::optional<at::Tensor>& row_lengths,
                                        const std::optional<at::Tensor>& exclude) {
  const char* op = kCoverageOp;
  detail::check_features(sim, op, "sim", "(B, M, N)");
  TORCH_CHECK(k >= 0, "tokenkernels.", op, ": k must be >= 0, got ", k);
  const int64_t B = sim.size(0), M = sim.size(1), N = sim.size(2);
  detail::check_per_item(k_per_item, sim, B, op, "k", "sim", "be an int or have shape");
  detail::check_per_item(lengths, sim, B, op, "lengths", "sim");
  detail::check_per_item(row_lengths, sim, B, op, "row_lengths", "sim");
  detail::check_mask(exclude, sim, B, N, op, "exclude", "sim");
  return {B, M, N, k};
}

// Value checks (check=True): sim >= 0, row_lengths in [0, M], lengths in [0, N], k (per item)
// in [0, valid candidates]. One host sync on CUDA.
inline void check_coverage_values(const at::Tensor& sim, const CoverageArgs& a,
                                  const std::optional<at::Tensor>& k_per_item,
                                  const std::optional<at::Tensor>& lengths,
                                  const std::optional<at::Tensor>& row_lengths,
                                  const std::optional<at::Tensor>& exclude) {
  const char* op = kCoverageOp;
  TORCH_CHECK(!sim.lt(0).any().item<bool>(), "tokenkernels.", op,
              ": sim must be non-negative (coverage of a row is the max similarity of its "
              "selected candidates)");
  if (row_lengths.has_value())
    TORCH_CHECK(!at::logical_or(row_lengths->lt(0), row_lengths->gt(a.M)).any().item<bool>(),
                "tokenkernels.", op, ": row_lengths must lie in [0, M=", a.M, "], got ",
                row_lengths->cpu());
  auto valid = detail::checked_valid(sim, a.B, a.N, lengths, exclude, op);
  auto counts = valid.sum(1).cpu();
  auto kk = k_per_item.has_value() ? k_per_item->cpu() : at::full({a.B}, a.k, at::kLong);
  auto kacc = kk.accessor<int64_t, 1>();
  auto cacc = counts.accessor<int64_t, 1>();
  for (int64_t b = 0; b < a.B; ++b) {
    TORCH_CHECK(kacc[b] >= 0 && kacc[b] <= a.k, "tokenkernels.", op, ": k[", b, "] = ", kacc[b],
                " must lie in [0, k_max = ", a.k, "]");
    TORCH_CHECK(kacc[b] <= cacc[b], "tokenkernels.", op, ": k = ", kacc[b],
                " exceeds the number of valid candidates (", cacc[b], ") of item ", b);
  }
}

}  // namespace kcenter
}  // namespace tokenkernels
