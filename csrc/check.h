// Argument checks shared by the CPU and CUDA adapters: every message names the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace tokenkernels {

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
