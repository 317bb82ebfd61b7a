// cross_entropy family: the contract layer of cross_entropy_forward / cross_entropy_backward.
// Every shape / dtype / device / value check and the parse of `impl` live here; the CPU kernels
// (cross_entropy.cpp) and the CUDA adapter (cross_entropy_cuda.cpp) both call check_forward /
// check_backward first, so the same bad input gives the same error (type and message) on every
// device. Shapes, devices and values raise ValueError (TORCH_CHECK_VALUE), dtypes TypeError
// (TORCH_CHECK_TYPE); target values under check=True raise RuntimeError, like the
// vocab_parallel wrapper's check after its all-reduce. Also the tile-size knobs both use.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>

#include "check.h"
#include "tokenkernels/cross_entropy.h"

namespace tokenkernels {
namespace cross_entropy {

// The public op named by the errors of each schema (the backward runs under its loss.backward()).
constexpr const char* kForwardOp = "linear_cross_entropy";
constexpr const char* kBackwardOp = "linear_cross_entropy_backward";

// impl: "auto", "plain" or "tuned" (see Impl in tokenkernels/cross_entropy.h).
inline Impl parse_impl(std::string_view impl, const char* op) {
  return parse_option<Impl>(impl, {{"auto", Impl::Auto}, {"plain", Impl::Plain}, {"wmma", Impl::Wmma}, {"tuned", Impl::Tuned}},
                            op, "impl");
}

struct Args {
  int64_t N, D, V;
  Impl impl;
};

// hidden (N, D), weight (V, D) with V >= 1, targets (N,) int32/int64, bias (V,) or none; all on
// one device; hidden/weight/bias of one float dtype (float64 too on the CPU, for gradcheck).
inline void check_tensors(const at::Tensor& hidden, const at::Tensor& weight,
                          const at::Tensor& targets, const std::optional<at::Tensor>& bias,
                          const char* op) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, "tokenkernels.", op, ": hidden must be (N, D), got shape ",
                    hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "tokenkernels.", op, ": weight must be (V, D), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), "tokenkernels.", op, ": weight is on ",
                    weight.device(), " but hidden is on ", hidden.device());
  TORCH_CHECK_VALUE(targets.device() == hidden.device(), "tokenkernels.", op, ": targets is on ",
                    targets.device(), " but hidden is on ", hidden.device());
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->device() == hidden.device(), "tokenkernels.", op, ": bias is on ",
                      bias->device(), " but hidden is on ", hidden.device());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                       (dt == at::kDouble && hidden.device().is_cpu()),
                   "tokenkernels.", op,
                   ": hidden must be float32, float16 or bfloat16 (float64 on CPU), got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, "tokenkernels.", op, ": weight dtype ",
                   weight.scalar_type(), " differs from hidden dtype ", dt);
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "tokenkernels.", op, ": weight has D = ",
                    weight.size(1), " columns but hidden has D = ", hidden.size(1));
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "tokenkernels.", op,
                    ": weight must have at least one row (V >= 1)");
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0), "tokenkernels.", op,
                    ": targets must have shape (", hidden.size(0), ",), got ", targets.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
                   "tokenkernels.", op, ": targets must be int64 or int32, got ",
                   targets.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "tokenkernels.", op,
                      ": bias must have shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, "tokenkernels.", op, ": bias dtype ",
                     bias->scalar_type(), " differs from hidden dtype ", dt);
  }
}

// The shard [vocab_start, vocab_start + V) of a vocabulary of vocab_total ids. Checked without
// forming vocab_start + V (which overflows int64 for a huge vocab_start).
inline void check_vocab_range(int64_t vocab_start, int64_t vocab_total, int64_t V, const char* op) {
  TORCH_CHECK_VALUE(vocab_start >= 0 && V <= vocab_total && vocab_start <= vocab_total - V,
                    "tokenkernels.", op, ": vocabulary shard [vocab_start = ", vocab_start,
                    ", vocab_start + V) with V = ", V, " does not fit in [0, vocab_total = ",
                    vocab_total, ")");
}

// Backward: no vocab_total, but the shard's ids must still be representable (no overflow in
// vocab_start + V or t - vocab_start).
inline void check_vocab_start(int64_t vocab_start, int64_t V, const char* op) {
  TORCH_CHECK_VALUE(vocab_start >= 0 && vocab_start <= std::numeric_limits<int64_t>::max() - V,
                    "tokenkernels.", op, ": vocab_start must be >= 0 and vocab_start + V (V = ", V,
                    ") must fit in int64, got vocab_start = ", vocab_start);
}

// softcap: None, or > 0 (+inf = the limit, i.e. no capping). NaN / <= 0 raise.
inline void check_softcap(std::optional<double> softcap, const char* op) {
  TORCH_CHECK_VALUE(!softcap.has_value() || *softcap > 0.0, "tokenkernels.", op,
                    ": softcap must be > 0 (inf = no softcap) or None, got ", *softcap);
}

// filter_eps >= 0 (NaN raises).
inline void check_filter_eps(double filter_eps, const char* op) {
  TORCH_CHECK_VALUE(filter_eps >= 0.0, "tokenkernels.", op, ": filter_eps must be >= 0, got ",
                    filter_eps);
}

// Per-token (N,) fp32 tensor (fp64 for fp64 inputs) on hidden's device.
inline void check_row_vector(const at::Tensor& t, int64_t N, const at::Tensor& hidden,
                             const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, "tokenkernels.", op, ": ", name,
                    " must have shape (", N, ",), got ", t.sizes());
  const auto want = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(t.scalar_type() == want, "tokenkernels.", op, ": ", name,
                   " must be float32 (float64 for float64 inputs), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == hidden.device(), "tokenkernels.", op, ": ", name, " is on ",
                    t.device(), " but hidden is on ", hidden.device());
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

// Everything cross_entropy_forward checks; the target values only when `check` (the one host
// sync on CUDA).
inline Args check_forward(const at::Tensor& hidden, const at::Tensor& weight,
                          const at::Tensor& targets, const std::optional<at::Tensor>& bias,
                          int64_t ignore_index, std::optional<double> softcap, int64_t vocab_start,
                          int64_t vocab_total, bool check, double filter_eps,
                          std::string_view impl) {
  const char* op = kForwardOp;
  const Impl im = parse_impl(impl, op);
  check_tensors(hidden, weight, targets, bias, op);
  const int64_t V = weight.size(0);
  check_vocab_range(vocab_start, vocab_total, V, op);
  check_softcap(softcap, op);
  check_filter_eps(filter_eps, op);
  if (check) check_target_values(targets, ignore_index, vocab_total, op);
  return {hidden.size(0), hidden.size(1), V, im};
}

// Everything cross_entropy_backward checks (no host sync).
inline Args check_backward(const at::Tensor& hidden, const at::Tensor& weight,
                           const at::Tensor& targets, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lse, const at::Tensor& coef_p,
                           const at::Tensor& coef_t, const std::optional<at::Tensor>& coef_1,
                           std::optional<double> softcap, int64_t vocab_start, double filter_eps,
                           bool need_db, std::string_view impl) {
  const char* op = kBackwardOp;
  const Impl im = parse_impl(impl, op);
  check_tensors(hidden, weight, targets, bias, op);
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_row_vector(lse, N, hidden, "lse", op);
  check_row_vector(coef_p, N, hidden, "coef_p", op);
  check_row_vector(coef_t, N, hidden, "coef_t", op);
  if (coef_1.has_value()) check_row_vector(*coef_1, N, hidden, "coef_1", op);
  TORCH_CHECK_VALUE(!need_db || bias.has_value(), "tokenkernels.", op,
                    ": need_dbias without a bias");
  check_filter_eps(filter_eps, op);
  check_softcap(softcap, op);
  check_vocab_start(vocab_start, V, op);
  return {N, hidden.size(1), V, im};
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

// Block sizes: env overrides (for tuning) else the given defaults.
inline int64_t env_or(const char* name, int64_t dflt) {
  if (const char* s = std::getenv(name)) {
    const long long v = std::atoll(s);
    if (v > 0) return v;
  }
  return dflt;
}

}  // namespace cross_entropy
}  // namespace tokenkernels
