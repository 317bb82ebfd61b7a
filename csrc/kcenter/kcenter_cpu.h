// kcenter family, CPU-kernel internals: small-batch dot products out[r][j] = <A_r, X_j> for a
// few rows A_r (m <= ~16) against all N rows of X, reading X once. BLAS is tuned for large GEMMs; with m this small
// (the speculative row batches of the kcenter greedy) it loses much of its speed. Here an AVX2
// micro-kernel keeps a 4 x 3 block of accumulators (4 A rows x 3 X rows, 8 lanes each) in
// registers and streams D. Exact fp32 products, fp32 accumulation (8 partial sums per pair).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "tokenkernels/cpu_simd.h"
#define TK_HAVE_AVX2_PATH 1
#endif

namespace tokenkernels {
namespace kcenter {
namespace cpu {

namespace detail {

// Portable block: NR x NJ dot products over D.
// All blocks work on the D range [d0, d1) and either store (add = false) or accumulate.
template <int NR, int NJ>
inline void dots_block_scalar(const float* const* a, const float* const* x, int64_t d0,
                              int64_t d1, bool add, float* out, int64_t ldo) {
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NJ; ++j) {
      float acc = 0.0f;
      for (int64_t d = d0; d < d1; ++d) acc += a[r][d] * x[j][d];
      out[r * ldo + j] = add ? out[r * ldo + j] + acc : acc;
    }
}

#if defined(TK_HAVE_AVX2_PATH)
using simd::hsum;

template <int NR, int NJ>
__attribute__((target("avx2,fma"))) inline void dots_block_avx2(const float* const* a,
                                                               const float* const* x, int64_t d0,
                                                               int64_t d1, bool add, float* out,
                                                               int64_t ldo) {
  __m256 acc[NR][NJ];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < NJ; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t D8 = d0 + ((d1 - d0) & ~int64_t(7));
  for (int64_t d = d0; d < D8; d += 8) {
    __m256 xv[NJ];
#pragma GCC unroll 3
    for (int j = 0; j < NJ; ++j) xv[j] = _mm256_loadu_ps(x[j] + d);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m256 av = _mm256_loadu_ps(a[r] + d);
#pragma GCC unroll 3
      for (int j = 0; j < NJ; ++j) acc[r][j] = _mm256_fmadd_ps(av, xv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NJ; ++j) {
      float s = hsum(acc[r][j]);
      for (int64_t d = D8; d < d1; ++d) s += a[r][d] * x[j][d];
      out[r * ldo + j] = add ? out[r * ldo + j] + s : s;
    }
}
#endif

template <int NR, int NJ>
inline void dots_block(bool avx2, const float* const* a, const float* const* x, int64_t d0,
                       int64_t d1, bool add, float* out, int64_t ldo) {
#if defined(TK_HAVE_AVX2_PATH)
  if (avx2) return dots_block_avx2<NR, NJ>(a, x, d0, d1, add, out, ldo);
#endif
  (void)avx2;
  dots_block_scalar<NR, NJ>(a, x, d0, d1, add, out, ldo);
}

template <int NR>
inline void dots_rows(bool avx2, int nj, const float* const* a, const float* const* x, int64_t d0,
                      int64_t d1, bool add, float* out, int64_t ldo) {
  switch (nj) {
    case 3: return dots_block<NR, 3>(avx2, a, x, d0, d1, add, out, ldo);
    case 2: return dots_block<NR, 2>(avx2, a, x, d0, d1, add, out, ldo);
    default: return dots_block<NR, 1>(avx2, a, x, d0, d1, add, out, ldo);
  }
}

}  // namespace detail

inline bool cpu_has_avx2_fma() {
#if defined(TK_HAVE_AVX2_PATH)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// out (m x N, row stride ldo): out[r*ldo + j] = <arows[r], X[j*D ...]>. Parallel over N.
// Loop nest per thread: blocks of kJB tokens > D chunks sized so the m A-row chunks stay in L1
// (~16 KB) > token triples > groups of 4 A rows; the 4 x 3 accumulator block lives in registers.
inline void small_batch_dots(const float* const* arows, int m, const float* X, int64_t N,
                             int64_t D, float* out, int64_t ldo) {
  const bool avx2 = cpu_has_avx2_fma();
  constexpr int64_t kJB = 96;   // tokens per block (a multiple of 3)
  const int64_t dc = std::max<int64_t>(128, (4096 / std::max(m, 1)) / 8 * 8);
  at::parallel_for(0, (N + kJB - 1) / kJB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t jb = b0 * kJB; jb < std::min(N, b1 * kJB); jb += kJB) {
      const int64_t je = std::min(N, jb + kJB);
      for (int64_t d0 = 0; d0 < D; d0 += dc) {
        const int64_t d1 = std::min(D, d0 + dc);
        const bool add = d0 > 0;
        for (int64_t j = jb; j < je; j += 3) {
          const int nj = static_cast<int>(std::min<int64_t>(3, je - j));
          const float* xr[3] = {X + j * D, X + std::min(j + 1, N - 1) * D,
                                X + std::min(j + 2, N - 1) * D};
          for (int r0 = 0; r0 < m; r0 += 4) {
            const int nr = std::min(4, m - r0);
            float* o = out + r0 * ldo + j;
            switch (nr) {
              case 4: detail::dots_rows<4>(avx2, nj, arows + r0, xr, d0, d1, add, o, ldo); break;
              case 3: detail::dots_rows<3>(avx2, nj, arows + r0, xr, d0, d1, add, o, ldo); break;
              case 2: detail::dots_rows<2>(avx2, nj, arows + r0, xr, d0, d1, add, o, ldo); break;
              default: detail::dots_rows<1>(avx2, nj, arows + r0, xr, d0, d1, add, o, ldo); break;
            }
          }
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace kcenter
}  // namespace tokenkernels
