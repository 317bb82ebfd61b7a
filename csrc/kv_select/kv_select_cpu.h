// kv_select CPU building blocks: row conversion to fp32 (strided / fp16 / bf16), dot products of
// one key against the G query heads of its group, exp-and-sum of a logit row, axpy. AVX2+FMA
// (+F16C) versions selected at run time via target attributes (the library itself stays baseline
// x86-64); portable scalar versions otherwise. fp32 arithmetic throughout.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "tokenkernels/cpu_simd.h"
#if defined(TK_HAVE_X86_SIMD)
#define TK_KV_AVX2 1
#define TK_KV_TARGET __attribute__((target("avx2,fma,f16c")))
#endif

namespace tokenkernels {
namespace kv_select {
namespace cpu {

inline bool has_avx2() {
#if defined(TK_KV_AVX2)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

#if defined(TK_KV_AVX2)
using simd::exp256;
using simd::hsum;

TK_KV_TARGET inline void dots_avx2(const float* q, int64_t G, const float* k, int64_t D,
                                   float* out) {
  const int64_t D8 = D & ~int64_t(7);
  int64_t h = 0;
  for (; h + 4 <= G; h += 4) {
    const float* q0 = q + h * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 kv = _mm256_loadu_ps(k + d);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), kv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + d), kv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + d), kv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + d), kv, a3);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (int64_t d = D8; d < D; ++d) {
      s0 += q0[d] * k[d]; s1 += q0[D + d] * k[d]; s2 += q0[2 * D + d] * k[d]; s3 += q0[3 * D + d] * k[d];
    }
    out[h] = s0; out[h + 1] = s1; out[h + 2] = s2; out[h + 3] = s3;
  }
  for (; h < G; ++h) {
    const float* q0 = q + h * D;
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8)
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), _mm256_loadu_ps(k + d), a0);
    float s0 = hsum(a0);
    for (int64_t d = D8; d < D; ++d) s0 += q0[d] * k[d];
    out[h] = s0;
  }
}

// [sum(a0), sum(a1), sum(a2), sum(a3)] in one horizontal-add tree.
TK_KV_TARGET inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// 8 consecutive elements as fp32, converted in registers (no staging buffer).
TK_KV_TARGET inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TK_KV_TARGET inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
TK_KV_TARGET inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// out[h] = <q_h, k> for a unit-stride key row of any element type, D % 8 == 0: the key is
// converted in registers and shared by a block of 4 heads (one horizontal-add tree per block).
template <typename T>
TK_KV_TARGET inline void dots_row_avx2(const float* q, int64_t G, const T* k, int64_t D, float* out) {
  int64_t h = 0;
  for (; h + 4 <= G; h += 4) {
    const float* q0 = q + h * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kv = load8(k + d);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), kv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + d), kv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + d), kv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + d), kv, a3);
    }
    _mm_storeu_ps(out + h, hsum4(a0, a1, a2, a3));
  }
  for (; h < G; ++h) {
    const float* q0 = q + h * D;
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), load8(k + d), a0);
    out[h] = hsum(a0);
  }
}

// acc_h += w[h] * v for h < G (acc_h = acc + h * ld), v a unit-stride row of type T converted
// in registers; D % 8 == 0.
template <typename T>
TK_KV_TARGET inline void axpy_row_avx2(const float* w, int64_t G, const T* v, int64_t D, float* acc,
                                       int64_t ld) {
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 x = load8(v + d);
    for (int64_t h = 0; h < G; ++h) {
      float* a = acc + h * ld + d;
      _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(w[h]), x, _mm256_loadu_ps(a)));
    }
  }
}

// Four value rows at once: acc_h += sum_r w[r * G + h] * v_r for h < G, so each accumulator
// chunk is loaded and stored once per four rows. Unit-stride rows, D % 8 == 0.
template <typename T>
TK_KV_TARGET inline void axpy4_rows_avx2(const float* w, int64_t G, const T* const* v, int64_t D,
                                         float* acc, int64_t ld) {
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 x0 = load8(v[0] + d), x1 = load8(v[1] + d), x2 = load8(v[2] + d), x3 = load8(v[3] + d);
    for (int64_t h = 0; h < G; ++h) {
      float* a = acc + h * ld + d;
      __m256 s = _mm256_loadu_ps(a);
      s = _mm256_fmadd_ps(_mm256_set1_ps(w[h]), x0, s);
      s = _mm256_fmadd_ps(_mm256_set1_ps(w[G + h]), x1, s);
      s = _mm256_fmadd_ps(_mm256_set1_ps(w[2 * G + h]), x2, s);
      s = _mm256_fmadd_ps(_mm256_set1_ps(w[3 * G + h]), x3, s);
      _mm256_storeu_ps(a, s);
    }
  }
}

TK_KV_TARGET inline float exp_sub_sum_avx2(float* x, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float s = hsum(acc);
  for (; i < n; ++i) { x[i] = std::exp(x[i] - m); s += x[i]; }
  return s;
}

// Token-major rows x[t * H + h], t < T: x = exp(x - m[h]); sums[h] = sum over t.
TK_KV_TARGET inline void exp_sub_rows_avx2(float* x, int64_t T, int64_t H, const float* m, float* sums) {
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) {
    const __m256 mv = _mm256_loadu_ps(m + h);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
      float* p = x + t * H + h;
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p), mv));
      _mm256_storeu_ps(p, e);
      acc = _mm256_add_ps(acc, e);
    }
    _mm256_storeu_ps(sums + h, acc);
  }
  for (; h < H; ++h) {
    float s = 0.0f;
    for (int64_t t = 0; t < T; ++t) { float& v = x[t * H + h]; v = std::exp(v - m[h]); s += v; }
    sums[h] = s;
  }
}

TK_KV_TARGET inline void axpy_avx2(float a, const float* x, float* y, int64_t D) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(y + d, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
  for (; d < D; ++d) y[d] += a * x[d];
}

TK_KV_TARGET inline void half_to_float_avx2(const c10::Half* src, float* dst, int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
  for (; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

TK_KV_TARGET inline void bf16_to_float_avx2(const c10::BFloat16* src, float* dst, int64_t D) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)));
    _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}
#endif  // TK_KV_AVX2

// out[h] = <q[h*D .. h*D+D), k> for h < G (q rows contiguous, k contiguous fp32).
inline void dots(const float* q, int64_t G, const float* k, int64_t D, float* out) {
#if defined(TK_KV_AVX2)
  if (has_avx2()) return dots_avx2(q, G, k, D, out);
#endif
  for (int64_t h = 0; h < G; ++h) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};   // 8 lanes so the compiler can vectorise
    const float* qh = q + h * D;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int l = 0; l < 8; ++l) acc[l] += qh[d + l] * k[d + l];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; d < D; ++d) s += qh[d] * k[d];
    out[h] = s;
  }
}

template <typename T>
inline const float* row_as_float(const T* src, int64_t stride, int64_t D, float* buf);

// out[h] = <q_h, key row> for a cache row of element type T with element stride `stride`; `buf`
// (D floats) stages the row when it cannot be read in place.
template <typename T>
inline void dots_row(const float* q, int64_t G, const T* k, int64_t stride, int64_t D, float* buf,
                     float* out) {
#if defined(TK_KV_AVX2)
  if (stride == 1 && D % 8 == 0 && has_avx2()) return dots_row_avx2<T>(q, G, k, D, out);
#endif
  dots(q, G, row_as_float(k, stride, D, buf), D, out);
}

// Token-major rows x[t * H + h]: x = exp(x - m[h]) and sums[h] = its column sum (m finite).
inline void exp_sub_rows(float* x, int64_t T, int64_t H, const float* m, float* sums) {
#if defined(TK_KV_AVX2)
  if (has_avx2()) return exp_sub_rows_avx2(x, T, H, m, sums);
#endif
  for (int64_t h = 0; h < H; ++h) {
    float s = 0.0f;
    for (int64_t t = 0; t < T; ++t) { float& v = x[t * H + h]; v = std::exp(v - m[h]); s += v; }
    sums[h] = s;
  }
}

// Four unit-stride rows at once when possible (w holds 4 x G weights, row-major); false when the
// caller must fall back to axpy_row per row.
template <typename T>
inline bool axpy4_rows(const float* w, int64_t G, const T* const* v, int64_t D, float* acc, int64_t ld) {
#if defined(TK_KV_AVX2)
  if (D % 8 == 0 && has_avx2()) { axpy4_rows_avx2<T>(w, G, v, D, acc, ld); return true; }
#endif
  (void)w; (void)G; (void)v; (void)D; (void)acc; (void)ld;
  return false;
}

// x[i] = exp(x[i] - m); returns the sum.
inline float exp_sub_sum(float* x, int64_t n, float m) {
#if defined(TK_KV_AVX2)
  if (has_avx2()) return exp_sub_sum_avx2(x, n, m);
#endif
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) { x[i] = std::exp(x[i] - m); s += x[i]; }
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t D) {
#if defined(TK_KV_AVX2)
  if (has_avx2()) return axpy_avx2(a, x, y, D);
#endif
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

// acc + h * ld += w[h] * (value row) for h < G; `buf` stages rows that cannot be read in place.
template <typename T>
inline const float* row_as_float(const T* src, int64_t stride, int64_t D, float* buf);

template <typename T>
inline void axpy_row(const float* w, int64_t G, const T* v, int64_t stride, int64_t D, float* buf,
                     float* acc, int64_t ld) {
#if defined(TK_KV_AVX2)
  if (stride == 1 && D % 8 == 0 && has_avx2()) return axpy_row_avx2<T>(w, G, v, D, acc, ld);
#endif
  const float* vr = row_as_float(v, stride, D, buf);
  for (int64_t h = 0; h < G; ++h) axpy(w[h], vr, acc + h * ld, D);
}

// A cache row (D elements, element stride `stride`) as fp32: returns `src` itself when it is
// already contiguous fp32, otherwise converts into `buf` and returns it.
template <typename T>
inline const float* row_as_float(const T* src, int64_t stride, int64_t D, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return src;
  } else if (stride == 1) {
#if defined(TK_KV_AVX2)
    if (has_avx2()) {
      if constexpr (std::is_same_v<T, c10::Half>) half_to_float_avx2(src, buf, D);
      else bf16_to_float_avx2(src, buf, D);
      return buf;
    }
#endif
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(src[d]);
    return buf;
  }
  for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(src[d * stride]);
  return buf;
}

}  // namespace cpu
}  // namespace kv_select
}  // namespace tokenkernels
