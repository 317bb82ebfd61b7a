// cross_entropy family: argument checks and block sizes shared by the CPU and CUDA adapters.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>

#include "check.h"

namespace tokenkernels {
namespace ce {

struct LceArgs {
  int64_t N, D, V;
};

// Shapes, dtypes, devices (no host sync). hidden (N, D), weight (V, D), targets (N,) int32/int64,
// bias (V,), all on one device, hidden/weight/bias of one float dtype.
inline LceArgs check_lce_args(const at::Tensor& hidden, const at::Tensor& weight,
                              const at::Tensor& targets, const std::optional<at::Tensor>& bias,
                              const char* op) {
  TORCH_CHECK(hidden.dim() == 2, "tokenkernels.", op, ": hidden must be (N, D), got shape ",
              hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "tokenkernels.", op, ": weight must be (V, D), got shape ",
              weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kHalf ||
                  hidden.scalar_type() == at::kBFloat16 ||
                  (hidden.scalar_type() == at::kDouble && hidden.device().is_cpu()),
              "tokenkernels.", op, ": hidden must be float32, float16 or bfloat16 (float64 on CPU), got ",
              hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "tokenkernels.", op,
              ": weight dtype ", weight.scalar_type(), " differs from hidden dtype ",
              hidden.scalar_type());
  TORCH_CHECK(weight.size(1) == hidden.size(1), "tokenkernels.", op, ": weight has D = ",
              weight.size(1), " columns but hidden has D = ", hidden.size(1));
  TORCH_CHECK(weight.size(0) >= 1, "tokenkernels.", op, ": weight must have at least one row (V >= 1)");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "tokenkernels.", op,
              ": targets must have shape (", hidden.size(0), ",), got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "tokenkernels.", op, ": targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), "tokenkernels.", op, ": weight is on ",
              weight.device(), " but hidden is on ", hidden.device());
  TORCH_CHECK(targets.device() == hidden.device(), "tokenkernels.", op, ": targets is on ",
              targets.device(), " but hidden is on ", hidden.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "tokenkernels.", op,
                ": bias must have shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "tokenkernels.", op,
                ": bias dtype ", bias->scalar_type(), " differs from hidden dtype ",
                hidden.scalar_type());
    TORCH_CHECK(bias->device() == hidden.device(), "tokenkernels.", op, ": bias is on ",
                bias->device(), " but hidden is on ", hidden.device());
  }
  return {hidden.size(0), hidden.size(1), weight.size(0)};
}

// The shard [vocab_start, vocab_start + V) of a vocabulary of vocab_total ids. Checked without
// forming vocab_start + V (which overflows int64 for a huge vocab_start).
inline void check_vocab_range(int64_t vocab_start, int64_t vocab_total, int64_t V, const char* op) {
  TORCH_CHECK(vocab_start >= 0 && V <= vocab_total && vocab_start <= vocab_total - V,
              "tokenkernels.", op, ": vocabulary shard [vocab_start = ", vocab_start,
              ", vocab_start + V) with V = ", V, " does not fit in [0, vocab_total = ",
              vocab_total, ")");
}

// Backward: no vocab_total, but the shard's ids must still be representable (no overflow in
// vocab_start + V or t - vocab_start).
inline void check_vocab_start(int64_t vocab_start, int64_t V, const char* op) {
  TORCH_CHECK(vocab_start >= 0 && vocab_start <= std::numeric_limits<int64_t>::max() - V,
              "tokenkernels.", op, ": vocab_start must be >= 0 and vocab_start + V (V = ", V,
              ") must fit in int64, got vocab_start = ", vocab_start);
}

// softcap: None, or > 0 (+inf = the limit, i.e. no capping). NaN / <= 0 raise.
inline void check_softcap(std::optional<double> softcap, const char* op) {
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, "tokenkernels.", op,
              ": softcap must be > 0 (inf = no softcap) or None, got ", *softcap);
}

// The cap the kernels use: 0 = no capping (None or +inf: cap * tanh(z / cap) -> z).
inline double softcap_value(std::optional<double> softcap) {
  return (softcap.has_value() && std::isfinite(*softcap)) ? *softcap : 0.0;
}

// Shard-local index of a target t >= 0, or -1 when another shard holds it (no overflow:
// t >= vocab_start >= 0 before the subtraction).
inline int64_t shard_local(int64_t t, int64_t vocab_start, int64_t V) {
  if (t < vocab_start) return -1;
  const int64_t l = t - vocab_start;
  return l < V ? l : -1;
}

// Per-token (N,) fp32 tensor on hidden's device.
inline void check_row_vector(const at::Tensor& t, int64_t N, const at::Tensor& hidden,
                             const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "tokenkernels.", op, ": ", name,
              " must have shape (", N, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "tokenkernels.", op,
              ": ", name, " must be float32 (float64 for float64 inputs), got ", t.scalar_type());
  TORCH_CHECK(t.device() == hidden.device(), "tokenkernels.", op, ": ", name, " is on ",
              t.device(), " but hidden is on ", hidden.device());
}

// Everything lce_forward checks before touching values (no host sync).
inline LceArgs check_lce_forward_args(const at::Tensor& hidden, const at::Tensor& weight,
                                      const at::Tensor& targets,
                                      const std::optional<at::Tensor>& bias,
                                      std::optional<double> softcap, int64_t vocab_start,
                                      int64_t vocab_total) {
  const char* op = "linear_cross_entropy";
  const auto a = check_lce_args(hidden, weight, targets, bias, op);
  check_vocab_range(vocab_start, vocab_total, a.V, op);
  check_softcap(softcap, op);
  return a;
}

// Everything lce_backward checks (no host sync).
inline LceArgs check_lce_backward_args(const at::Tensor& hidden, const at::Tensor& weight,
                                       const at::Tensor& targets,
                                       const std::optional<at::Tensor>& bias,
                                       const at::Tensor& lse, const at::Tensor& coef_p,
                                       const at::Tensor& coef_t,
                                       const std::optional<at::Tensor>& coef_1, double filter_eps,
                                       bool need_db, std::optional<double> softcap,
                                       int64_t vocab_start) {
  const char* op = "linear_cross_entropy_backward";
  const auto a = check_lce_args(hidden, weight, targets, bias, op);
  check_row_vector(lse, a.N, hidden, "lse", op);
  check_row_vector(coef_p, a.N, hidden, "coef_p", op);
  check_row_vector(coef_t, a.N, hidden, "coef_t", op);
  if (coef_1.has_value()) check_row_vector(*coef_1, a.N, hidden, "coef_1", op);
  TORCH_CHECK(!need_db || bias.has_value(), "tokenkernels.", op, ": need_dbias without a bias");
  TORCH_CHECK(filter_eps >= 0.0, "tokenkernels.", op, ": filter_eps must be >= 0, got ", filter_eps);
  check_softcap(softcap, op);
  check_vocab_start(vocab_start, a.V, op);
  return a;
}

// Value check (host sync on CUDA): every target is ignore_index or in [0, vocab_total).
inline void check_target_values(const at::Tensor& targets, int64_t ignore_index,
                                int64_t vocab_total, const char* op) {
  if (targets.numel() == 0) return;
  auto t = targets.to(at::kLong);
  auto bad = t.ne(ignore_index).logical_and(t.lt(0).logical_or(t.ge(vocab_total)));
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero().select(1, 0)[0].item<int64_t>();
    TORCH_CHECK(false, "tokenkernels.", op, ": targets[", i, "] = ", t[i].item<int64_t>(),
                " is outside [0, V=", vocab_total, ") and is not ignore_index (", ignore_index,
                ")");
  }
}

// Block sizes: env overrides (for tuning) else the given defaults.
inline int64_t env_or(const char* name, int64_t dflt) {
  if (const char* s = std::getenv(name)) {
    const long long v = std::atoll(s);
    if (v > 0) return v;
  }
  return dflt;
}

}  // namespace ce
}  // namespace tokenkernels
