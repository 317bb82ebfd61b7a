// Argument checks shared by the CPU and CUDA adapters: every message names the op and the argument
// ("tokenkernels.<public op>: <argument> ..."; the op is a parameter of every check).
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

}  // namespace tokenkernels

// ---- shared torch-level helpers (used by several families' adapters) ---------------------------
#include "tokenkernels/common.h"

namespace tokenkernels {

// An integer (int32 / int64, already checked) index tensor as a contiguous int64 tensor on its
// device (a no-op for a contiguous int64 tensor).
inline at::Tensor long_contig(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

// The same for an optional tensor; an undefined tensor when absent.
inline at::Tensor opt_long_contig(const std::optional<at::Tensor>& t) {
  return t.has_value() ? long_contig(*t) : at::Tensor();
}

// t made contiguous, or an undefined tensor for none (kernels take nullptr for it).
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// A host (CPU) view of t for value checks: t itself on CPU (no copy), else a device-to-host copy
// (one host sync); undefined stays undefined.
inline at::Tensor host_copy(const at::Tensor& t) {
  return !t.defined() || t.is_cpu() ? t : t.cpu();
}

// The kernels' element-type tag (tokenkernels/common.h) of a float32 / float16 / bfloat16
// tensor. Callers check their inputs first (with a message naming the op and the argument), so
// any other dtype here is a bug of the caller: an internal assert, not a user-facing error.
inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_INTERNAL_ASSERT(false, "to_dtype: no kernel element type for ", t,
                        " (the caller must check for float32, float16 or bfloat16 first)");
  return DType::kFloat32;   // unreachable
}

// t must be fp32, fp16 or bf16; the message names the op and the argument.
inline void check_float_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              "tokenkernels.", op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

// t must live on ref's device (ValueError).
inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                         const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "tokenkernels.", op, ": ", name, " is on ",
                    t.device(), " but ", ref_name, " is on ", ref.device());
}

// Integer metadata (int8/16/32/64, uint8) -> int32 contiguous on its own device, without a host
// sync. int64 is narrowed *saturating*: a value outside int32 becomes INT32_MIN / INT32_MAX,
// which the op's value checks then reject like any out-of-range value (a plain cast would wrap
// 2**32 + 1 to 1). Anything else is a TypeError.
inline at::Tensor narrow_int32(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kInt || st == at::kLong || st == at::kShort || st == at::kChar ||
                       st == at::kByte,
                   "tokenkernels.", op, ": ", name, " must be an integer tensor, got ", st);
  if (st == at::kInt) return t.contiguous();
  at::Tensor w = st == at::kLong ? t.clamp(-2147483648LL, 2147483647LL) : t;
  return w.to(at::kInt).contiguous();
}

}  // namespace tokenkernels
