// Row kernels of the CPU cross-entropy epilogue: vectorised exp / max / sums over one row of a
// logit tile held in fp32. AVX2+FMA versions (selected at run time) beside portable scalar ones.
// The exp is Cephes' single-precision polynomial (max rel. error ~2 ulp over the range used
// here: arguments are z - max <= 0).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "tokenkernels/cpu_simd.h"
#if defined(TK_HAVE_X86_SIMD)
#define TK_CE_AVX2 1
#endif

namespace tokenkernels {
namespace cross_entropy {
namespace cpu {

inline bool cpu_has_avx2() {
#if defined(TK_CE_AVX2)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// ---------------------------------------------------------------- scalar versions
template <typename A>
inline A row_max_scalar(const A* z, int64_t n) {
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}
// sum_j exp(z_j - m); with t != nullptr also *t = sum_j exp(z_j - m) * z_j
template <typename A>
inline A exp_sum_scalar(const A* z, int64_t n, A m, A* t) {
  A s = 0, tz = 0;
  for (int64_t j = 0; j < n; ++j) {
    const A e = std::exp(z[j] - m);
    s += e;
    tz += e * z[j];
  }
  if (t) *t = tz;
  return s;
}
template <typename A>
inline A row_sum_scalar(const A* z, int64_t n) {
  A s = 0;
  for (int64_t j = 0; j < n; ++j) s += z[j];
  return s;
}
// max(a, b) that keeps a NaN of either argument (std::max / fmax drop it).
template <typename A>
inline A nan_max(A a, A b) {
  return (b > a || b != b) ? b : a;
}
// d_j = a * exp(z_j - lse) + c; with softcap: d_j *= 1 - (z_j / cap)^2. Returns max |d_j|, NaN
// when any d_j is NaN (gradient filtering must never drop a NaN).
template <typename A>
inline A dz_row_scalar(const A* z, int64_t n, A lse, A a, A c, A inv_cap, A* d) {
  A mx = 0;
  for (int64_t j = 0; j < n; ++j) {
    A v = a * std::exp(z[j] - lse) + c;
    if (inv_cap != 0) {
      const A u = z[j] * inv_cap;
      v *= 1 - u * u;
    }
    d[j] = v;
    mx = nan_max(mx, std::fabs(v));
  }
  return mx;
}
template <typename A>
inline void softcap_row_scalar(A* z, int64_t n, A cap) {
  const A inv = 1 / cap;
  for (int64_t j = 0; j < n; ++j) z[j] = cap * std::tanh(z[j] * inv);
}

#if defined(TK_CE_AVX2)
#define TK_AVX2 __attribute__((target("avx2,fma")))

using simd::hmax;
using simd::hsum;

// simd::exp256 clamps its argument, which turns a NaN into ~1e-38: pass NaN through instead, so
// NaN logits give NaN statistics and gradients as in the scalar path (never silently finite).
TK_AVX2 inline __m256 exp256(__m256 x) {
  return _mm256_blendv_ps(simd::exp256(x), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

TK_AVX2 inline float row_max_avx2(const float* z, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(z + j));
  float r = hmax(m);
  for (; j < n; ++j) r = z[j] > r ? z[j] : r;
  return r;
}
TK_AVX2 inline float exp_sum_avx2(const float* z, int64_t n, float m, float* t) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 s = _mm256_setzero_ps(), tz = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 zz = _mm256_loadu_ps(z + j);
    const __m256 e = exp256(_mm256_sub_ps(zz, vm));
    s = _mm256_add_ps(s, e);
    if (t) tz = _mm256_fmadd_ps(e, zz, tz);
  }
  float rs = hsum(s), rt = t ? hsum(tz) : 0.f;
  for (; j < n; ++j) {
    const float e = std::exp(z[j] - m);
    rs += e;
    rt += e * z[j];
  }
  if (t) *t = rt;
  return rs;
}
TK_AVX2 inline float row_sum_avx2(const float* z, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(z + j));
  float r = hsum(s);
  for (; j < n; ++j) r += z[j];
  return r;
}
TK_AVX2 inline float dz_row_avx2(const float* z, int64_t n, float lse, float a, float c,
                                 float inv_cap, float* d) {
  const __m256 vl = _mm256_set1_ps(lse), va = _mm256_set1_ps(a), vc = _mm256_set1_ps(c);
  const __m256 vi = _mm256_set1_ps(inv_cap), one = _mm256_set1_ps(1.f);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 zz = _mm256_loadu_ps(z + j);
    __m256 v = _mm256_fmadd_ps(va, exp256(_mm256_sub_ps(zz, vl)), vc);
    if (inv_cap != 0.f) {
      const __m256 u = _mm256_mul_ps(zz, vi);
      v = _mm256_mul_ps(v, _mm256_fnmadd_ps(u, u, one));
    }
    _mm256_storeu_ps(d + j, v);
    mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // max_ps drops NaN lanes
  }
  float r = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN() : hmax(mx);
  if (j < n) r = nan_max(r, dz_row_scalar(z + j, n - j, lse, a, c, inv_cap, d + j));
  return r;
}
// tanh(x) = 1 - 2 / (exp(2x) + 1), clamped so exp stays finite; z <- cap * tanh(z / cap)
TK_AVX2 inline void softcap_row_avx2(float* z, int64_t n, float cap) {
  const __m256 vcap = _mm256_set1_ps(cap), two_inv = _mm256_set1_ps(2.f / cap);
  const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 zz = _mm256_loadu_ps(z + j);
    __m256 x = _mm256_mul_ps(zz, two_inv);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-40.f)), _mm256_set1_ps(40.f));
    const __m256 e = exp256(x);
    const __m256 th = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
    // the clamp maps NaN to -40: keep NaN logits NaN
    _mm256_storeu_ps(z + j, _mm256_blendv_ps(_mm256_mul_ps(vcap, th), zz,
                                             _mm256_cmp_ps(zz, zz, _CMP_UNORD_Q)));
  }
  if (j < n) softcap_row_scalar(z + j, n - j, cap);
}
#undef TK_AVX2
#endif

// ---------------------------------------------------------------- dispatch
inline float row_max(const float* z, int64_t n) {
#if defined(TK_CE_AVX2)
  if (cpu_has_avx2()) return row_max_avx2(z, n);
#endif
  return row_max_scalar(z, n);
}
inline float exp_sum(const float* z, int64_t n, float m, float* t) {
#if defined(TK_CE_AVX2)
  if (cpu_has_avx2()) return exp_sum_avx2(z, n, m, t);
#endif
  return exp_sum_scalar(z, n, m, t);
}
inline float row_sum(const float* z, int64_t n) {
#if defined(TK_CE_AVX2)
  if (cpu_has_avx2()) return row_sum_avx2(z, n);
#endif
  return row_sum_scalar(z, n);
}
inline float dz_row(const float* z, int64_t n, float lse, float a, float c, float inv_cap,
                    float* d) {
#if defined(TK_CE_AVX2)
  if (cpu_has_avx2()) return dz_row_avx2(z, n, lse, a, c, inv_cap, d);
#endif
  return dz_row_scalar(z, n, lse, a, c, inv_cap, d);
}
inline void softcap_row(float* z, int64_t n, float cap) {
#if defined(TK_CE_AVX2)
  if (cpu_has_avx2()) return softcap_row_avx2(z, n, cap);
#endif
  softcap_row_scalar(z, n, cap);
}


// ---------------------------------------------------------------- dtype conversion of rows
// out[j] = float(src[j]) (+ bias[j]); dst[j] = T(src[j]) (round to nearest even).
#if defined(TK_CE_AVX2)
#define TK_AVX2C __attribute__((target("avx2,fma,f16c")))
TK_AVX2C inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TK_AVX2C inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
TK_AVX2C inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
TK_AVX2C inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
TK_AVX2C inline __m128i bf16_round8(__m256 v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i packed = _mm256_packus_epi32(b, b);  // per 128-bit lane: [b0..3, b0..3]
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
TK_AVX2C inline void store8(c10::BFloat16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_round8(v));
}
TK_AVX2C inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
template <typename T>
TK_AVX2C inline void to_float_row_avx2(const T* src, int64_t n, const float* bias, float* out) {
  int64_t j = 0;
  if (bias) {
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, _mm256_add_ps(load8(src + j), _mm256_loadu_ps(bias + j)));
    for (; j < n; ++j) out[j] = static_cast<float>(src[j]) + bias[j];
  } else {
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, load8(src + j));
    for (; j < n; ++j) out[j] = static_cast<float>(src[j]);
  }
}
template <typename T>
TK_AVX2C inline void from_float_row_avx2(const float* src, int64_t n, T* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8(dst + j, _mm256_loadu_ps(src + j));
  for (; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}
#undef TK_AVX2C
#endif

inline bool cpu_has_f16c() {
#if defined(TK_CE_AVX2)
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

inline double row_max(const double* z, int64_t n) { return row_max_scalar(z, n); }
inline double exp_sum(const double* z, int64_t n, double m, double* t) { return exp_sum_scalar(z, n, m, t); }
inline double row_sum(const double* z, int64_t n) { return row_sum_scalar(z, n); }
inline double dz_row(const double* z, int64_t n, double lse, double a, double c, double inv_cap, double* d) {
  return dz_row_scalar(z, n, lse, a, c, inv_cap, d);
}
inline void softcap_row(double* z, int64_t n, double cap) { softcap_row_scalar(z, n, cap); }
inline void to_float_row(const double* src, int64_t n, const double* bias, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = src[j] + (bias ? bias[j] : 0.0);
}
inline void from_float_row(const double* src, int64_t n, double* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
}

template <typename T>
inline void to_float_row(const T* src, int64_t n, const float* bias, float* out) {
#if defined(TK_CE_AVX2)
  if (cpu_has_f16c()) return to_float_row_avx2(src, n, bias, out);
#endif
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(src[j]) + (bias ? bias[j] : 0.f);
}
template <typename T>
inline void from_float_row(const float* src, int64_t n, T* dst) {
#if defined(TK_CE_AVX2)
  if (cpu_has_f16c()) return from_float_row_avx2(src, n, dst);
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

}  // namespace cpu
}  // namespace cross_entropy
}  // namespace tokenkernels
