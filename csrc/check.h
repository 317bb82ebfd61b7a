// Argument checks shared by the CPU and CUDA adapters: every message names the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace tokenkernels {

// A schema option given as a string (impl, metric, ...) -> its enum value, in one place per
// family (csrc/<family>/<family>_args.h). An unknown name is a ValueError naming the op, the
// argument and the accepted names, e.g.
//   parse_option<Impl>(impl, {{"auto", Impl::Auto}, {"plain", Impl::Plain}}, "tree.attention", "impl")
template <typename E>
E parse_option(std::string_view value, std::initializer_list<std::pair<const char*, E>> names,
               const char* op, const char* arg) {
  std::string accepted;
  for (const auto& [name, e] : names) {
    if (value == name) return e;
    accepted += (accepted.empty() ? "'" : ", '") + std::string(name) + "'";
  }
  TORCH_CHECK_VALUE(false, "tokenkernels.", op, ": ", arg, " must be one of ", accepted, ", got '",
                    std::string(value), "'");
  return names.begin()->second;  // unreachable
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              "tokenkernels: ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& ref, const std::optional<at::Tensor>& t,
                              const char* ref_name, const char* name) {
  if (t.has_value())
    TORCH_CHECK(t->device() == ref.device(), "tokenkernels: ", name, " is on ", t->device(),
                " but ", ref_name, " is on ", ref.device());
}

// (B,) int64 tensor of per-item counts, or none.
inline void check_per_item(const std::optional<at::Tensor>& t, int64_t B, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "tokenkernels: ", name, " must have shape (",
              B, ",), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kLong, "tokenkernels: ", name, " must be int64, got ",
              t->scalar_type());
}

inline void check_mask(const std::optional<at::Tensor>& t, int64_t B, int64_t N,
                       const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == N, "tokenkernels: ", name,
              " must have shape (", B, ", ", N, "), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kBool, "tokenkernels: ", name, " must be bool, got ",
              t->scalar_type());
}

}  // namespace tokenkernels

// ---- kcenter family: shared torch-level helpers ----------------------------------------------
#include "tokenkernels/common.h"

namespace tokenkernels {

// The kernels' element-type tag of a float32 / float16 / bfloat16 tensor (checked before).
inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kBFloat16;
  }
}

// t made contiguous, or an undefined tensor for none (kernels take nullptr for it).
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace tokenkernels
