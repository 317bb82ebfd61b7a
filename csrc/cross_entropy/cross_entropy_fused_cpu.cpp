// cross_entropy family, CPU: the loss and its gradients in one call ("grads in forward").
//
// tokenkernels::_cross_entropy_fused computes a scalar loss (mean or sum over the tokens) and
// dhidden / dweight / dbias of it in the forward; the autograd wrapper in
// python/tokenkernels/_ops/cross_entropy.py then only scales them by the incoming gradient. It is
// what linear_cross_entropy runs on the CPU for reduction "mean" / "sum" when gradients are wanted
// (reduction="none", a returned lse, return_aux and vocab_parallel keep the forward +
// recompute-backward ops of cross_entropy.cpp; so does a backward with create_graph=True).
//
// Why, and the routes chosen (measured on a 2-core AVX512-BF16 EPYC, torch 2.13, MKL + oneDNN):
//   * fp32 / fp64, engine "chunk" (Liger's and torch-chunked's scheme): tokens in chunks of
//     `rows` whose full (rows, V) logits fit the memory budget; per chunk one GEMM for the logits,
//     the softmax and dZ in place, then dhidden[rows] = dZ @ W and dweight += dZ^T @ H[rows]
//     straight into the fp32 output. 6·N·D·V flops instead of the 8·N·D·V of forward + recompute.
//     GEMMs: fp32 on oneDNN's fp32 brgemm micro-kernel where it runs (AVX-512): MKL's sgemm,
//     which ATen's fp32 mm calls, takes an AVX2 code path on AMD CPUs (~215 GFLOP/s on this
//     2-core Zen 5 against ~300-365 for the micro-kernel), and at the chunk's small row count
//     (~0.05 N) it loses another 30% (~150). The micro-kernel engine holds the logits transposed
//     (Z^T, V x rows) so that W is read as it lies by every GEMM (no pack of W per chunk).
//     fp64, CPUs without the micro-kernel, and engine "chunk_mkl": ATen -> MKL.
//   * bf16, engine "brgemm": bf16 x bf16 -> fp32 GEMMs through oneDNN's brgemm micro-kernel
//     (at::native::cpublas::brgemm, AVX512-BF16 / AMX; ~4.5x fp32 sgemm here). MKL's
//     cblas_gemm_bf16bf16f32 (exported by libtorch_cpu) upcasts to fp32 on this AMD CPU (200
//     GFLOP/s, no faster than sgemm), and ATen's bf16 mm rounds its output (the logits) to bf16,
//     so neither is used. The logits are fp32 tiles and never rounded; only the softmax weights
//     and dZ are rounded to bf16 as GEMM operands, as torch's own bf16 path rounds dZ (the
//     target's coefficient p_t - 1, where the cancellation is, stays in fp32).
//     A bf16 dweight needs an fp32 accumulator; a (V, D) one would exceed the memory budget, so
//     two passes over the logits (8·N·D·V flops at the bf16 rate):
//       pass 1 (token chunks of R rows outer, vocabulary blocks inner): online log-sum-exp and,
//         flash-attention style, dhidden = softmax-weighted sum of W rows with running rescales;
//       pass 2 (vocabulary blocks outer): recompute the logits with the final lse, dZ^T as bf16,
//         then dweight[block] = dZ^T @ H in one K = N GEMM per block (fp32 accumulation inside
//         the micro-kernel, rounded once), and dbias.
//   * fp16 (no fast fp16 GEMM on most CPUs: torch's own runs ~50 GFLOP/s here) and bf16 where
//     brgemm is unavailable: engine "composite": the forward op plus the recompute backward op.
// Memory: every buffer is sized from the budget max(5% of the N x V logits in the input dtype,
// 4 MiB); the gradients themselves are the outputs.
// Reproducible: the work is shared through segments of vocabulary blocks, each with its own
// partial state merged in a fixed order (for_each_segment), so results are bitwise the same run
// to run whatever thread ran what (a loss that changed between two identical forwards broke the
// HF patch's test under ASan's timing).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "cross_entropy/cross_entropy_args.h"
#include "cross_entropy/cross_entropy_cpu.h"

namespace tokenkernels {
namespace cross_entropy {
namespace cpu {
namespace {

constexpr const char* kFusedOp = "linear_cross_entropy";

enum class Engine { Auto, Chunk, ChunkMkl, Brgemm, Composite };

Engine parse_engine(c10::string_view e) {
  return parse_option<Engine>(std::string_view(e.data(), e.size()),
                              {{"auto", Engine::Auto}, {"chunk", Engine::Chunk},
                               {"chunk_mkl", Engine::ChunkMkl},
                               {"brgemm", Engine::Brgemm}, {"composite", Engine::Composite}},
                              kFusedOp, "engine");
}

// Whether oneDNN's bf16 brgemm runs on this CPU (it needs AVX512-BF16 or AMX): probed once with
// a 2 x 16 x 2 product (the call raises where the micro-kernel is unavailable).
// One probe per operand type: a 2 x 16 x 2 product of ones (VNNI for bf16). Both probes honour
// TOKENKERNELS_CE_NO_BRGEMM.
template <typename In>
bool brgemm_probe(bool vnni) {
  if (env_or("TOKENKERNELS_CE_NO_BRGEMM", 0) > 0) return false;
  try {
    std::vector<In> a(2 * 2, In(1.f)), b(2 * 16, In(1.f));
    std::vector<float> c(2 * 16, 0.f);
    at::native::cpublas::brgemm(2, 16, 2, 2, 16, 16, false, a.data(), b.data(), c.data(), vnni);
    at::native::cpublas::brgemm_release(vnni);
    return c[0] == 2.f && c[31] == 2.f;
  } catch (const std::exception&) {
    return false;
  }
}

bool brgemm_bf16_available() {
  static const bool ok = brgemm_probe<at::BFloat16>(true);
  return ok;
}

// The same for oneDNN's fp32 brgemm (AVX-512): on AMD CPUs MKL's sgemm runs an AVX2 code path
// (~215 GFLOP/s on this 2-core Zen 5), the fp32 micro-kernel ~300-365.
bool brgemm_f32_available() {
  static const bool ok = brgemm_probe<float>(false);
  return ok;
}

int64_t budget_bytes(int64_t N, int64_t V, int64_t elt) {
  const int64_t b = static_cast<int64_t>(0.05 * static_cast<double>(N) * static_cast<double>(V) *
                                         static_cast<double>(elt));
  return std::max<int64_t>(b, env_or("TOKENKERNELS_CE_MIN_BUDGET", int64_t(4) << 20));
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-token loss weight: scale/n_valid (mean) or scale (sum) for tokens whose target is not ignored, 0
// otherwise; targets out of [0, V) (check=false) get a NaN target logit, hence a NaN loss.
struct Rows {
  std::vector<double> w;  // loss weight per token
  std::vector<int64_t> lt;  // local target index, -1 if ignored / out of range
  std::vector<uint8_t> bad;
};

Rows row_weights(const int64_t* tp, int64_t N, int64_t V, int64_t ignore_index, bool mean,
                 double scale) {
  Rows r;
  r.w.assign(N, 0.0);
  r.lt.assign(N, -1);
  r.bad.assign(N, 0);
  int64_t n = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = tp[i];
    if (t == ignore_index) continue;
    ++n;
    if (t < 0 || t >= V) r.bad[i] = 1;
    else r.lt[i] = t;
  }
  const double wv = scale * (mean ? (n > 0 ? 1.0 / static_cast<double>(n) : 0.0) : 1.0);
  for (int64_t i = 0; i < N; ++i)
    if (tp[i] != ignore_index) r.w[i] = wv;
  return r;
}

// The loss of one token from its statistics, and the coefficients of dZ = cp * softmax + c1 +
// ct * onehot(target) (times the softcap derivative):
//   loss = w [(1 - eps)(lse - zt) + eps (lse - sumz / V) + zl lse^2]
template <typename A>
inline A token_loss(A w, A lse, A zt, A sumz, A eps, A zl, int64_t V, A* cp, A* ct, A* c1) {
  *cp = w * (1 + 2 * zl * lse);
  *ct = -w * (1 - eps);
  *c1 = -w * eps / static_cast<A>(V);
  A l = (1 - eps) * (lse - zt);
  if (eps != 0) l += eps * (lse - sumz / static_cast<A>(V));
  if (zl != 0) l += zl * lse * lse;
  return w * l;
}

using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The op's outputs from an engine's per-token losses and lse and its dbias sums (in A, the
// dtype of options o): the loss summed in fp64.
template <typename A>
Out assemble(const std::vector<A>& loss_rows, const std::vector<A>& lse,
             const std::vector<A>& db_acc, bool need_db, const at::TensorOptions& o,
             at::Tensor dh, at::Tensor dw, at::Tensor db) {
  double total = 0;
  for (const A x : loss_rows) total += static_cast<double>(x);
  auto lse_t = at::empty({static_cast<int64_t>(lse.size())}, o);
  std::copy(lse.begin(), lse.end(), lse_t.data_ptr<A>());
  if (need_db) {
    auto dbt = at::empty({static_cast<int64_t>(db_acc.size())}, o);
    std::copy(db_acc.begin(), db_acc.end(), dbt.data_ptr<A>());
    db = dbt.to(db.scalar_type());
  }
  return {at::scalar_tensor(total, o), lse_t, dh, dw, db};
}

// z[j] <- exp(z[j] - m), returns the sum; and z[j] <- a * z[j] + b (the chunk engine's dZ from
// the stored exponentials: one exp per logit instead of two)
template <typename A>
inline A exp_store_sum_scalar(A* z, int64_t n, A m) {
  A s = 0;
  for (int64_t j = 0; j < n; ++j) {
    z[j] = std::exp(z[j] - m);
    s += z[j];
  }
  return s;
}
template <typename A>
inline void axpb_scalar(A* z, int64_t n, A a, A b) {
  for (int64_t j = 0; j < n; ++j) z[j] = a * z[j] + b;
}
#if defined(TK_CE_AVX2)
__attribute__((target("avx2,fma"))) inline float exp_store_sum_avx2(float* z, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 s = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(z + j), vm));
    _mm256_storeu_ps(z + j, e);
    s = _mm256_add_ps(s, e);
  }
  return simd::hsum(s) + exp_store_sum_scalar(z + j, n - j, m);
}
__attribute__((target("avx2,fma"))) inline void axpb_avx2(float* z, int64_t n, float a, float b) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(z + j, _mm256_fmadd_ps(va, _mm256_loadu_ps(z + j), vb));
  axpb_scalar(z + j, n - j, a, b);
}
#endif
inline float exp_store_sum(float* z, int64_t n, float m) {
#if defined(TK_CE_AVX2)
  if (cpu_has_avx2()) return exp_store_sum_avx2(z, n, m);
#endif
  return exp_store_sum_scalar(z, n, m);
}
inline double exp_store_sum(double* z, int64_t n, double m) { return exp_store_sum_scalar(z, n, m); }
inline void axpb(float* z, int64_t n, float a, float b) {
#if defined(TK_CE_AVX2)
  if (cpu_has_avx2()) return axpb_avx2(z, n, a, b);
#endif
  axpb_scalar(z, n, a, b);
}
inline void axpb(double* z, int64_t n, double a, double b) { axpb_scalar(z, n, a, b); }

// ---------------------------------------------------------------- engine "chunk" (fp32 / fp64)
template <typename T>
Out chunk_engine(const at::Tensor& H, const at::Tensor& W, const at::Tensor& Bias,
                 const Rows& rw, double cap_d, double eps_d, double zl_d, bool need_dh,
                 bool need_dw, bool need_db, at::Tensor dh, at::Tensor dw, at::Tensor db) {
  const int64_t N = H.size(0), D = H.size(1), V = W.size(0);
  const T cap = static_cast<T>(cap_d), inv_cap = cap > 0 ? 1 / cap : T(0);
  const T eps = static_cast<T>(eps_d), zl = static_cast<T>(zl_d);
  const int64_t budget = budget_bytes(N, V, sizeof(T));
  const int64_t rows_max = std::clamp<int64_t>(
      env_or("TOKENKERNELS_CE_FUSED_ROWS", budget / (V * static_cast<int64_t>(sizeof(T)))), 1, N);
  auto zbuf = at::empty({rows_max * V}, H.options());
  std::vector<T> loss_rows(N, T(0)), lse(N, T(0));
  std::vector<T> db_acc(need_db ? V : 0, T(0));
  const T* bp = Bias.defined() ? Bias.data_ptr<T>() : nullptr;
  bool dw_started = false;
  const bool prof = env_or("TOKENKERNELS_CE_PROFILE", 0) > 0;
  using clk = std::chrono::steady_clock;
  double tz = 0, te = 0, th = 0, tw = 0;
  for (int64_t r0 = 0; r0 < N; r0 += rows_max) {
    const int64_t rows = std::min(rows_max, N - r0);
    auto Z = zbuf.narrow(0, 0, rows * V).view({rows, V});
    auto Hc = H.narrow(0, r0, rows);
    auto c0 = clk::now();
    at::mm_out(Z, Hc, W.t());
    auto c1 = clk::now();
    T* zp = Z.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = r0 + i;
        T* z = zp + i * V;
        const T w = static_cast<T>(rw.w[r]);
        if (bp)
          for (int64_t j = 0; j < V; ++j) z[j] += bp[j];
        if (cap > 0) softcap_row(z, V, cap);
        const T m = row_max(z, V);
        const bool finite = m > -std::numeric_limits<T>::infinity();
        const int64_t lt = rw.lt[r];
        if (w == 0) {
          const T s = finite ? exp_sum(z, V, m, static_cast<T*>(nullptr)) : T(0);
          lse[r] = m + std::log(s);
          std::fill(z, z + V, T(0));
          continue;
        }
        const T zt = rw.bad[r] ? std::numeric_limits<T>::quiet_NaN() : z[lt];
        const T sumz = eps != 0 ? row_sum(z, V) : T(0);
        T cp, ct, c1, l;
        if (cap > 0 || !finite) {  // the softcap derivative needs the logits: two exp passes
          const T s = finite ? exp_sum(z, V, m, static_cast<T*>(nullptr)) : T(0);
          l = m + std::log(s);
          loss_rows[r] = token_loss<T>(w, l, zt, sumz, eps, zl, V, &cp, &ct, &c1);
          dz_row(z, V, l, cp, c1, inv_cap, z);  // in place: each element is read before written
        } else {  // z <- exp(z - m) once, then dZ = (cp / s) * z + c1
          const T s = exp_store_sum(z, V, m);
          l = m + std::log(s);
          loss_rows[r] = token_loss<T>(w, l, zt, sumz, eps, zl, V, &cp, &ct, &c1);
          axpb(z, V, cp / s, c1);
        }
        lse[r] = l;
        if (lt >= 0) {
          T v = cp * std::exp(zt - l) + c1 + ct;
          if (inv_cap != 0) v *= 1 - (zt * inv_cap) * (zt * inv_cap);
          z[lt] = v;
        }
      }
    });
    auto c2 = clk::now();
    if (need_dh) {
      auto out = dh.narrow(0, r0, rows);
      at::mm_out(out, Z, W);
    }
    auto c3 = clk::now();
    if (need_dw) {
      if (!dw_started) at::mm_out(dw, Z.t(), Hc);
      else dw.addmm_(Z.t(), Hc);
      dw_started = true;
    }
    auto c4 = clk::now();
    tz += std::chrono::duration<double>(c1 - c0).count();
    te += std::chrono::duration<double>(c2 - c1).count();
    th += std::chrono::duration<double>(c3 - c2).count();
    tw += std::chrono::duration<double>(c4 - c3).count();
    if (need_db) {
      at::parallel_for(0, V, 2048, [&](int64_t j0, int64_t j1) {
        for (int64_t i = 0; i < rows; ++i) {
          const T* d = zp + i * V;
          for (int64_t j = j0; j < j1; ++j) db_acc[j] += d[j];
        }
      });
    }
  }
  if (need_dw && !dw_started) dw.zero_();
  if (prof)
    std::fprintf(stderr, "tokenkernels ce chunk: rows %lld  Z %.3f s  epilogue %.3f s  dH %.3f s  dW %.3f s\n",
                 (long long)rows_max, tz, te, th, tw);
  return assemble(loss_rows, lse, db_acc, need_db, H.options(), dh, dw, db);
}

// Runs body(slot) once for each of T worker slots on the intra-op threads (one slot per thread
// when the pool has T threads; inline, one after the other, inside another parallel region).
template <typename F>
void for_each_worker(int64_t T, const F& body) {
  at::parallel_for(0, T, 1, [&](int64_t a, int64_t b) {
    for (int64_t w = a; w < b; ++w) body(w);
    at::native::cpublas::brgemm_release(true);
  });
}

// Reproducible work sharing over the vocabulary blocks. The blocks are cut into S contiguous
// segments, each with its own partial state (softmax statistics, dhidden partials); the T
// threads claim whole segments from an atomic counter and run a segment's blocks in order, and
// the states are merged in segment order. So every float sum is taken in an order fixed by S
// alone, never by which thread ran what: the results are bitwise reproducible from run to run,
// and identical for every thread count with the same S. A thread descheduled by another process
// still delays only its own segment (no barrier inside a phase). S = 2 T by default (at most the
// number of blocks); TOKENKERNELS_CE_SEGMENTS sets it.
int64_t num_segments(int64_t nblk, int64_t T) {
  const int64_t s = env_or("TOKENKERNELS_CE_SEGMENTS", 2 * T);
  return std::clamp<int64_t>(s, 1, std::max<int64_t>(nblk, 1));
}
inline int64_t seg_begin(int64_t seg, int64_t S, int64_t nblk) { return seg * nblk / S; }

// body(thread, segment, first block, end block) for every segment, each exactly once
template <class F>
void for_each_segment(int64_t T, int64_t S, int64_t nblk, const F& body) {
  std::atomic<int64_t> next{0};
  for_each_worker(std::min(T, S), [&](int64_t th) {
    for (int64_t g; (g = next.fetch_add(1, std::memory_order_relaxed)) < S;)
      body(th, g, seg_begin(g, S, nblk), seg_begin(g + 1, S, nblk));
  });
}

// ---------------------------------------------------------------- engine "chunk", fp32 on brgemm
// The chunk scheme of chunk_engine with the logits held transposed, Z^T (V x R) for a token chunk
// of R rows, so that every GEMM reads W as it lies (no pack of W, which would be repeated per
// chunk): Z^T = W Hc^T (A = W's rows, B = Hc^T), dW += dZ^T Hc (A = dZ^T's rows, B = Hc), dh +=
// dZ_blk W_blk (A = a transposed 64-row block of dZ^T, B = W's rows). The threads claim
// segments of vocabulary blocks (for_each_segment) in two phases per chunk (logits and partial
// log-sum-exp per token; then dZ, dW, db and per-segment dh partials), with one merge between.
inline void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a, const float* B,
                     int64_t ld_b, float* C, int64_t ld_c, bool add) {
  constexpr int64_t NB = 128;
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int64_t nn = std::min(NB, N - n0);
    at::native::cpublas::brgemm(M, nn, K, ld_a, ld_b, ld_c, add, A, B + n0, C + n0, false);
  }
}

#if defined(TK_CE_AVX2)
#define TK_AVX2V __attribute__((target("avx2,fma")))
// column statistics of a block of rows z (rows x R, ld R): bm[i] = max_j z[j][i]
TK_AVX2V inline void col_max_avx2(const float* z, int64_t rows, int64_t R, float* bm) {
  int64_t i = 0;
  for (; i + 8 <= R; i += 8) {
    __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 nan = _mm256_setzero_ps();
    for (int64_t j = 0; j < rows; ++j) {
      const __m256 v = _mm256_loadu_ps(z + j * R + i);
      m = _mm256_max_ps(m, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    _mm256_storeu_ps(bm + i, _mm256_blendv_ps(m, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), nan));
  }
  for (; i < R; ++i) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < rows; ++j) m = nan_max(m, z[j * R + i]);
    bm[i] = m;
  }
}
// s[i] += sum_j exp(z[j][i] - mn[i]) (columns with mn = -inf or NaN skipped by the caller's mask)
TK_AVX2V inline void col_expsum_avx2(const float* z, int64_t rows, int64_t R, const float* mn, float* s) {
  int64_t i = 0;
  for (; i + 8 <= R; i += 8) {
    const __m256 vm = _mm256_loadu_ps(mn + i);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < rows; ++j) acc = _mm256_add_ps(acc, exp256(_mm256_sub_ps(_mm256_loadu_ps(z + j * R + i), vm)));
    _mm256_storeu_ps(s + i, _mm256_add_ps(_mm256_loadu_ps(s + i), acc));
  }
  for (; i < R; ++i) {
    float a = 0;
    for (int64_t j = 0; j < rows; ++j) a += std::exp(z[j * R + i] - mn[i]);
    s[i] += a;
  }
}
// one row of dZ^T: d[i] = (cp[i] exp(z[i] - lse[i]) + c1[i]) (1 - (z[i] / cap)^2 if cap), in place
TK_AVX2V inline float dz_col_row_avx2(float* z, int64_t R, const float* lse, const float* cp,
                                      const float* c1, float inv_cap) {
  const __m256 vi = _mm256_set1_ps(inv_cap), one = _mm256_set1_ps(1.f);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= R; i += 8) {
    const __m256 zz = _mm256_loadu_ps(z + i);
    __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(cp + i), exp256(_mm256_sub_ps(zz, _mm256_loadu_ps(lse + i))),
                               _mm256_loadu_ps(c1 + i));
    if (inv_cap != 0.f) {
      const __m256 u = _mm256_mul_ps(zz, vi);
      v = _mm256_mul_ps(v, _mm256_fnmadd_ps(u, u, one));
    }
    _mm256_storeu_ps(z + i, v);
    sum = _mm256_add_ps(sum, v);
  }
  float r = simd::hsum(sum);
  for (; i < R; ++i) {
    float v = cp[i] * std::exp(z[i] - lse[i]) + c1[i];
    if (inv_cap != 0.f) v *= 1 - (z[i] * inv_cap) * (z[i] * inv_cap);
    z[i] = v;
    r += v;
  }
  return r;
}
#undef TK_AVX2V
#endif

Out chunk_brgemm_f32(const at::Tensor& H, const at::Tensor& W, const at::Tensor& Bias,
                     const Rows& rw, double cap_d, double eps_d, double zl_d, bool need_dh,
                     bool need_dw, bool need_db, at::Tensor dh, at::Tensor dw, at::Tensor db) {
  const int64_t N = H.size(0), D = H.size(1), V = W.size(0);
  const int64_t T = std::max<int64_t>(at::get_num_threads(), 1);
  const float cap = static_cast<float>(cap_d), inv_cap = cap > 0 ? 1.f / cap : 0.f;
  const float eps = static_cast<float>(eps_d), zl = static_cast<float>(zl_d);
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const float* hp = H.data_ptr<float>();
  const float* wp = W.data_ptr<float>();
  const float* bp = Bias.defined() ? Bias.data_ptr<float>() : nullptr;
  const int64_t bv = std::min<int64_t>(V, env_or("TOKENKERNELS_CE_BVC", 64));
  const int64_t nblk = (V + bv - 1) / bv;
  const int64_t S = num_segments(nblk, T);
  // budget: Z^T (V x R) + Hc^T (D x R) + per-segment dh partials (R x D) and statistics (3 R)
  // + per-thread block tiles (bv x R). (R sets the chunks, hence the order of dW's sums over
  // them: the results are the same for every thread count with the same S and R.)
  const int64_t budget = budget_bytes(N, V, 4);
  int64_t R = budget / ((V + D + S * (D + 3) + T * bv) * 4);
  // whole 16-float vectors unless that drops more than 1/8 of the rows (fewer chunks matter
  // more: each adds a pass over dW). Measured at V = 128256: the logits GEMM 35% slower at 47
  // rows than at 48, the whole step 25% slower at 32 rows than at 47.
  if (R >= 16 && R - R / 16 * 16 <= R / 8) R = R / 16 * 16;
  R = std::clamp<int64_t>(env_or("TOKENKERNELS_CE_FUSED_ROWS", R), 1, N);
  const auto o32 = H.options();
  auto zt_buf = at::empty({V * R}, o32);
  auto hct = at::empty({D * R}, o32);
  auto dhp = need_dh ? at::empty({S * R * D}, o32) : at::Tensor();
  const int64_t tl_rows = std::max<int64_t>(bv, 2);  // a dZ block, or the phase-A scratch (2 R)
  auto tile = at::empty({T * tl_rows * R}, o32);
  auto st = at::empty({S * 3 * R}, o32);
  float* Z = zt_buf.data_ptr<float>();
  float* HcT = hct.data_ptr<float>();
  std::vector<float> loss_rows(N, 0.f), lse(N, 0.f), cpv(R), ctv(R), c1v(R), lsev(R), ztv(R);
  std::vector<float> db_acc(need_db ? V : 0, 0.f);
  const bool prof = env_or("TOKENKERNELS_CE_PROFILE", 0) > 0;
  using clk = std::chrono::steady_clock;
  double ta = 0, tb = 0;
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    const auto c0 = clk::now();
    // Hc^T (D x rows, ld rows)
    at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
      for (int64_t i = 0; i < rows; ++i) {
        const float* h = hp + (r0 + i) * D;
        for (int64_t d = d0; d < d1; ++d) HcT[d * rows + i] = h[d];
      }
    });
    // phase A: logits and per-segment partial statistics per token
    for_each_segment(T, S, nblk, [&](int64_t th, int64_t seg, int64_t b0, int64_t b1) {
      float* m = st.data_ptr<float>() + seg * 3 * R;
      float* sacc = m + R;
      float* sz = sacc + R;
      float* bm = tile.data_ptr<float>() + th * tl_rows * R;  // scratch: block max, new max
      float* mn = bm + R;
      std::fill(m, m + rows, kNegInf);
      std::fill(sacc, sacc + rows, 0.f);
      std::fill(sz, sz + rows, 0.f);
      for (int64_t v = b0; v < b1; ++v) {
        const int64_t j0 = v * bv, cols = std::min(bv, V - j0);
        float* zb = Z + j0 * rows;
        gemm_f32(cols, rows, D, wp + j0 * D, D, HcT, rows, zb, rows, false);
        for (int64_t j = 0; j < cols; ++j) {
          float* zr = zb + j * rows;
          if (bp) {
            const float b = bp[j0 + j];
            for (int64_t i = 0; i < rows; ++i) zr[i] += b;
          }
          if (cap > 0) softcap_row(zr, rows, cap);
          if (eps != 0)
            for (int64_t i = 0; i < rows; ++i) sz[i] += zr[i];
        }
#if defined(TK_CE_AVX2)
        if (cpu_has_avx2()) col_max_avx2(zb, cols, rows, bm);
        else
#endif
        {
          for (int64_t i = 0; i < rows; ++i) {
            float x = kNegInf;
            for (int64_t j = 0; j < cols; ++j) x = nan_max(x, zb[j * rows + i]);
            bm[i] = x;
          }
        }
        bool all_finite = true;
        for (int64_t i = 0; i < rows; ++i) {
          const float x = nan_max(m[i], bm[i]);
          if (x > kNegInf) {
            if (m[i] > kNegInf && m[i] != x) sacc[i] *= std::exp(m[i] - x);
            mn[i] = x;
          } else {
            all_finite = false;
            mn[i] = x;
          }
          m[i] = x;
        }
        if (all_finite) {
#if defined(TK_CE_AVX2)
          if (cpu_has_avx2()) col_expsum_avx2(zb, cols, rows, mn, sacc);
          else
#endif
            for (int64_t i = 0; i < rows; ++i)
              for (int64_t j = 0; j < cols; ++j) sacc[i] += std::exp(zb[j * rows + i] - mn[i]);
        } else {
          for (int64_t i = 0; i < rows; ++i)
            if (mn[i] > kNegInf)
              for (int64_t j = 0; j < cols; ++j) sacc[i] += std::exp(zb[j * rows + i] - mn[i]);
        }
      }
    });
    // merge: lse, the target logit, the loss and dZ's coefficients per token
    {
      const float* stp = st.data_ptr<float>();
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = r0 + i;
        float M = kNegInf, Ssum = 0.f, SZ = 0.f;
        for (int64_t t = 0; t < S; ++t) M = nan_max(M, stp[t * 3 * R + i]);
        for (int64_t t = 0; t < S; ++t) {
          const float mt = stp[t * 3 * R + i];
          if (M > kNegInf && mt > kNegInf) Ssum += std::exp(mt - M) * stp[t * 3 * R + R + i];
          SZ += stp[t * 3 * R + 2 * R + i];
        }
        const float l = M + std::log(Ssum);
        lse[r] = lsev[i] = l;
        const int64_t lt = rw.lt[r];
        const float zt = rw.bad[r] ? std::numeric_limits<float>::quiet_NaN() : (lt >= 0 ? Z[lt * rows + i] : 0.f);
        ztv[i] = zt;
        const float w = static_cast<float>(rw.w[r]);
        if (w != 0) loss_rows[r] = token_loss<float>(w, l, zt, SZ, eps, zl, V, &cpv[i], &ctv[i], &c1v[i]);
        else cpv[i] = ctv[i] = c1v[i] = 0.f;
        if (w == 0) lsev[i] = std::numeric_limits<float>::infinity();  // exp(z - inf) = 0: a zero column of dZ^T
      }
    }
    const auto c1t = clk::now();
    if (!need_dh && !need_dw && !need_db) continue;  // the loss alone
    // phase B: dZ^T, dW, db, per-segment dh partials
    const bool first = r0 == 0;
    for_each_segment(T, S, nblk, [&](int64_t th, int64_t seg, int64_t b0, int64_t b1) {
      float* dht = need_dh ? dhp.data_ptr<float>() + seg * R * D : nullptr;
      float* tl = tile.data_ptr<float>() + th * tl_rows * R;
      if (dht) std::fill(dht, dht + rows * D, 0.f);
      for (int64_t v = b0; v < b1; ++v) {
        const int64_t j0 = v * bv, cols = std::min(bv, V - j0);
        float* zb = Z + j0 * rows;
        for (int64_t j = 0; j < cols; ++j) {
          float* zr = zb + j * rows;
          float rs;
#if defined(TK_CE_AVX2)
          if (cpu_has_avx2()) rs = dz_col_row_avx2(zr, rows, lsev.data(), cpv.data(), c1v.data(), inv_cap);
          else
#endif
          {
            rs = 0;
            for (int64_t i = 0; i < rows; ++i) {
              float x = cpv[i] * std::exp(zr[i] - lsev[i]) + c1v[i];
              if (inv_cap != 0.f) x *= 1 - (zr[i] * inv_cap) * (zr[i] * inv_cap);
              zr[i] = x;
              rs += x;
            }
          }
          if (need_db) db_acc[j0 + j] += rs;
        }
        // the targets in this block: + ct (times the softcap derivative at the target logit)
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t lt = rw.lt[r0 + i];
          if (lt < j0 || lt >= j0 + cols || ctv[i] == 0.f) continue;
          float add = ctv[i];
          if (inv_cap != 0.f) add *= 1 - (ztv[i] * inv_cap) * (ztv[i] * inv_cap);
          zb[(lt - j0) * rows + i] += add;
          if (need_db) db_acc[lt] += add;
        }
        if (need_dw) gemm_f32(cols, D, rows, zb, rows, hp + r0 * D, D, dw.data_ptr<float>() + j0 * D, D, !first);
        if (dht) {
          for (int64_t j = 0; j < cols; ++j)  // dZ block (rows x cols) from dZ^T
            for (int64_t i = 0; i < rows; ++i) tl[i * cols + j] = zb[j * rows + i];
          gemm_f32(rows, D, cols, tl, cols, wp + j0 * D, D, dht, D, true);
        }
      }
    });
    if (need_dh) {
      at::parallel_for(0, rows, 8, [&](int64_t i0, int64_t i1) {
        const float* base = dhp.data_ptr<float>();
        for (int64_t i = i0; i < i1; ++i) {
          float* o = dh.data_ptr<float>() + (r0 + i) * D;
          std::copy(base + i * D, base + (i + 1) * D, o);
          for (int64_t t = 1; t < S; ++t) {
            const float* p = base + (t * R + i) * D;
            for (int64_t d = 0; d < D; ++d) o[d] += p[d];
          }
        }
      });
    }
    ta += std::chrono::duration<double>(c1t - c0).count();
    tb += std::chrono::duration<double>(clk::now() - c1t).count();
  }
  if (prof)
    std::fprintf(stderr, "tokenkernels ce chunk (fp32 brgemm): rows %lld  logits+lse %.3f s  dZ+dW+dh %.3f s\n",
                 (long long)R, ta, tb);
  return assemble(loss_rows, lse, db_acc, need_db, o32, dh, dw, db);
}

// ---------------------------------------------------------------- engine "brgemm" (bf16)
using bf16 = at::BFloat16;

inline uint32_t pair_u32(const bf16* a, const bf16* b, int64_t d) {
  uint16_t x, y;
  std::memcpy(&x, a + d, 2);
  y = 0;
  if (b) std::memcpy(&y, b + d, 2);
  return static_cast<uint32_t>(x) | (static_cast<uint32_t>(y) << 16);
}

// VNNI along the rows: out[p][d][2] = (src[2p][d], src[2p + 1][d]) for p < ceil(rows / 2), the
// missing odd row as zeros. As the B operand of C += A @ src (K = rows, N = D), ld_b = D.
void pack_rows_vnni(const bf16* src, int64_t rows, int64_t D, int64_t p0, int64_t p1, bf16* out) {
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t p = p0; p < p1; ++p) {
    const bf16* a = src + (2 * p) * D;
    const bf16* b = (2 * p + 1 < rows) ? src + (2 * p + 1) * D : nullptr;
    uint32_t* op = o + p * D;
    if (b) {
      const uint16_t* a16 = reinterpret_cast<const uint16_t*>(a);
      const uint16_t* b16 = reinterpret_cast<const uint16_t*>(b);
      for (int64_t d = 0; d < D; ++d)
        op[d] = static_cast<uint32_t>(a16[d]) | (static_cast<uint32_t>(b16[d]) << 16);
    } else {
      for (int64_t d = 0; d < D; ++d) op[d] = pair_u32(a, nullptr, d);
    }
  }
}

// VNNI of src^T along D (D even): out[q][j][2] = (src[j][2q], src[j][2q + 1]) for j < cols:
// the B operand of Z = A @ src^T (K = D, N = cols), ld_b = cols. A 32-bit transpose, blocked.
#if defined(TK_CE_AVX2)
// o[q * ldo + j] = s[j * lds + q] for an 8 x 8 block of 32-bit words
__attribute__((target("avx2"))) inline void transpose8x8_u32(const uint32_t* s, int64_t lds,
                                                             uint32_t* o, int64_t ldo) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k * lds)));
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    r[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  __m256 out[8];
  out[0] = _mm256_permute2f128_ps(r[0], r[4], 0x20);
  out[1] = _mm256_permute2f128_ps(r[1], r[5], 0x20);
  out[2] = _mm256_permute2f128_ps(r[2], r[6], 0x20);
  out[3] = _mm256_permute2f128_ps(r[3], r[7], 0x20);
  out[4] = _mm256_permute2f128_ps(r[0], r[4], 0x31);
  out[5] = _mm256_permute2f128_ps(r[1], r[5], 0x31);
  out[6] = _mm256_permute2f128_ps(r[2], r[6], 0x31);
  out[7] = _mm256_permute2f128_ps(r[3], r[7], 0x31);
  for (int k = 0; k < 8; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k * ldo), _mm256_castps_si256(out[k]));
}
#endif

void pack_cols_vnni(const bf16* src, int64_t cols, int64_t D, int64_t j0, int64_t j1, bf16* out) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  const int64_t Q = D / 2;
  constexpr int64_t Bk = 16;
#if defined(TK_CE_AVX2)
  if (cpu_has_avx2()) {  // 8 x 8 blocks in registers, the edges below
    const int64_t je8 = j0 + (j1 - j0) / 8 * 8, q8 = Q / 8 * 8;
    for (int64_t j = j0; j < je8; j += 8)
      for (int64_t q = 0; q < q8; q += 8) transpose8x8_u32(s + j * Q + q, Q, o + q * cols + j, cols);
    for (int64_t j = j0; j < je8; ++j)
      for (int64_t q = q8; q < Q; ++q) o[q * cols + j] = s[j * Q + q];
    for (int64_t j = je8; j < j1; ++j)
      for (int64_t q = 0; q < Q; ++q) o[q * cols + j] = s[j * Q + q];
    return;
  }
#endif
  for (int64_t jb = j0; jb < j1; jb += Bk) {
    const int64_t je = std::min(j1, jb + Bk);
    for (int64_t qb = 0; qb < Q; qb += Bk) {
      const int64_t qe = std::min(Q, qb + Bk);
      for (int64_t j = jb; j < je; ++j)
        for (int64_t q = qb; q < qe; ++q) o[q * cols + j] = s[j * Q + q];
    }
  }
}

// C (M x N fp32, ld_c) (+)= A (M x K bf16 row-major, ld_a) @ B (K x N, VNNI, ld_b), split into
// column blocks of <= 256 (the micro-kernel's efficient range).
inline void gemm_bf16(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t ld_a, const bf16* B,
                      int64_t ld_b, float* C, int64_t ld_c, bool add, int64_t NB = 256) {
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int64_t nn = std::min(NB, N - n0);
    at::native::cpublas::brgemm(M, nn, K, ld_a, ld_b, ld_c, add, A, B + n0 * 2, C + n0, true);
  }
}

#if defined(TK_CE_AVX2)
#define TK_AVX2F __attribute__((target("avx2,fma,f16c")))
// out[j] = bf16(exp(z[j] - m) * (1 - (z[j] / cap)^2 if cap)) ; returns sum_j exp(z[j] - m)
TK_AVX2F inline float exp_row_bf16_avx2(const float* z, int64_t n, float m, float inv_cap, bf16* out) {
  const __m256 vm = _mm256_set1_ps(m), vi = _mm256_set1_ps(inv_cap), one = _mm256_set1_ps(1.f);
  __m256 s = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 zz = _mm256_loadu_ps(z + j);
    const __m256 e = exp256(_mm256_sub_ps(zz, vm));
    s = _mm256_add_ps(s, e);
    __m256 p = e;
    if (inv_cap != 0.f) {
      const __m256 u = _mm256_mul_ps(zz, vi);
      p = _mm256_mul_ps(p, _mm256_fnmadd_ps(u, u, one));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), bf16_round8(p));
  }
  float r = simd::hsum(s);
  for (; j < n; ++j) {
    const float e = std::exp(z[j] - m);
    r += e;
    float p = e;
    if (inv_cap != 0.f) p *= 1 - (z[j] * inv_cap) * (z[j] * inv_cap);
    out[j] = bf16(p);
  }
  return r;
}
#undef TK_AVX2F
#endif

inline float exp_row_bf16(const float* z, int64_t n, float m, float inv_cap, bf16* out) {
#if defined(TK_CE_AVX2)
  if (cpu_has_f16c()) return exp_row_bf16_avx2(z, n, m, inv_cap, out);
#endif
  float r = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float e = std::exp(z[j] - m);
    r += e;
    float p = e;
    if (inv_cap != 0.f) p *= 1 - (z[j] * inv_cap) * (z[j] * inv_cap);
    out[j] = bf16(p);
  }
  return r;
}

struct BrgemmPlan {
  int64_t bv1, R1, mb1;  // pass 1: vocabulary block, token chunk, rows per micro-kernel call
  int64_t S1;            // pass 1: segments (partial softmax states, see for_each_segment)
  int64_t bv2, R2, mb2;  // pass 2
  bool split2;           // pass 2 without barriers (H packed once, R2 = N)
};

// Block sizes within the budget (bytes of every buffer a pass allocates), T threads.
// Both passes hand out vocabulary blocks to the threads through an atomic counter, so the
// threads never wait for each other inside a pass (a thread descheduled by another process
// delays only its own blocks): each thread keeps its own packs; in pass 1 each segment of
// blocks (for_each_segment) keeps its own online softmax state and dhidden accumulator for the
// token chunk, merged in segment order once per chunk; in pass 2 a block is one thread's alone.
BrgemmPlan plan_brgemm(int64_t N, int64_t D, int64_t V, int64_t T, int64_t budget) {
  BrgemmPlan p{};
  p.mb1 = p.mb2 = 64;
  p.bv1 = std::min<int64_t>(round_up(V, 2), env_or("TOKENKERNELS_CE_BV1", 256));
  // pass 1, per segment: acc (R x D fp32) + m, s, sum z (3 R fp32); per thread: two W packs
  // (bv x D bf16 each) + Z and P tiles (mb x bv x (4 + 2) bytes)
  p.S1 = num_segments((V + p.bv1 - 1) / p.bv1, T);
  const int64_t fixed1 = 2 * p.bv1 * D * 2 + p.mb1 * p.bv1 * 6;
  // (the rows of pass 1 are independent of each other: R1 may depend on T without changing a bit)
  int64_t R1 = (budget - std::min(T, p.S1) * fixed1) / (p.S1 * (D * 4 + 12));
  R1 = std::max<int64_t>(R1 / p.mb1 * p.mb1, p.mb1);
  p.R1 = std::min<int64_t>(env_or("TOKENKERNELS_CE_R1", R1), N);
  // pass 2: H packed by token pairs (R x D bf16, shared) + per thread: W^T pack (bv x D bf16),
  // dZ^T (bv x R bf16), the dW block (bv x D fp32), a Z tile (mb x bv fp32)
  p.bv2 = std::min<int64_t>(round_up(V, 2), env_or("TOKENKERNELS_CE_BV2", 64));
  const int64_t fixed2 = T * (p.bv2 * D * 6 + p.mb2 * p.bv2 * 4);
  int64_t R2 = (budget - fixed2) / std::max<int64_t>(D * 2 + T * p.bv2 * 2, 1);
  R2 = std::max<int64_t>(R2 / p.mb2 * p.mb2, p.mb2);
  p.R2 = std::min<int64_t>(env_or("TOKENKERNELS_CE_R2", R2), N);
  p.split2 = p.R2 >= N;
  return p;
}

Out brgemm_engine(const at::Tensor& H, const at::Tensor& W, const at::Tensor& Bias32,
                  const Rows& rw, double cap_d, double eps_d, double zl_d, bool need_dh,
                  bool need_dw, bool need_db, at::Tensor dh, at::Tensor dw, at::Tensor db) {
  const int64_t N = H.size(0), D = H.size(1), V = W.size(0);
  const int64_t T = std::max<int64_t>(at::get_num_threads(), 1);
  const BrgemmPlan pl = plan_brgemm(N, D, V, T, budget_bytes(N, V, 2));
  const float cap = static_cast<float>(cap_d), inv_cap = cap > 0 ? 1.f / cap : 0.f;
  const float eps = static_cast<float>(eps_d), zl = static_cast<float>(zl_d);
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const bf16* hp = H.data_ptr<bf16>();
  const bf16* wp = W.data_ptr<bf16>();
  const float* bp = Bias32.defined() ? Bias32.data_ptr<float>() : nullptr;
  const auto f32 = H.options().dtype(at::kFloat);
  const bool prof = env_or("TOKENKERNELS_CE_PROFILE", 0) > 0;
  auto now = [] { return std::chrono::steady_clock::now(); };
  const auto t_start = now();

  std::vector<float> zt(N, 0.f), lse(N, 0.f), cp(N), ct(N), c1(N), loss_rows(N, 0.f);
  for (int64_t i = 0; i < N; ++i)
    if (rw.bad[i]) zt[i] = std::numeric_limits<float>::quiet_NaN();

  // colsum(W) for the label-smoothing term of dhidden (c1 * sum_j W_j)
  std::vector<float> colsum;
  if (need_dh && eps != 0) {
    colsum.assign(D, 0.f);
    at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
      for (int64_t j = 0; j < V; ++j)
        for (int64_t d = d0; d < d1; ++d) colsum[d] += static_cast<float>(wp[j * D + d]);
    });
  }

  // ---------------- pass 1: lse (+ dhidden); token chunks of R rows, vocabulary blocks claimed
  {
    const int64_t bv = pl.bv1, R = pl.R1, mb = pl.mb1;
    const int64_t nblk = (V + bv - 1) / bv;
    const int64_t dh_nb = env_or("TOKENKERNELS_CE_DH_NB", 1024);
    auto wk = at::empty({T * bv * D}, H.options());   // per thread: W block ^T, VNNI along D
    auto wv = at::empty({T * bv * D}, H.options());   // per thread: W block, VNNI along its rows
    const int64_t S = pl.S1;
    auto acc = need_dh ? at::empty({S * R * D}, f32) : at::Tensor();
    auto st = at::empty({S * 3 * R}, f32);             // per segment: running max, sum, sum z
    auto ztile = at::empty({T * mb * bv}, f32);
    auto ptile = at::empty({T * mb * bv}, H.options());
    for (int64_t r0 = 0; r0 < N; r0 += R) {
      const int64_t rows = std::min(R, N - r0);
      for_each_segment(T, S, nblk, [&](int64_t th, int64_t seg, int64_t b0, int64_t b1) {
        bf16* wkp = wk.data_ptr<bf16>() + th * bv * D;
        bf16* wvp = wv.data_ptr<bf16>() + th * bv * D;
        float* accp = need_dh ? acc.data_ptr<float>() + seg * R * D : nullptr;
        float* m = st.data_ptr<float>() + seg * 3 * R;
        float* s = m + R;
        float* sz = s + R;
        float* zb = ztile.data_ptr<float>() + th * mb * bv;
        bf16* pb = ptile.data_ptr<bf16>() + th * mb * bv;
        std::fill(m, m + rows, kNegInf);
        std::fill(s, s + rows, 0.f);
        std::fill(sz, sz + rows, 0.f);
        if (accp) std::fill(accp, accp + rows * D, 0.f);
        for (int64_t v = b0; v < b1; ++v) {
          const int64_t v0 = v * bv, cols = std::min(bv, V - v0);
          const int64_t kc = round_up(cols, 2);  // K of the dhidden GEMM (padded to pairs)
          const bf16* wb = wp + v0 * D;
          pack_cols_vnni(wb, cols, D, 0, cols, wkp);
          if (need_dh) pack_rows_vnni(wb, cols, D, 0, kc / 2, wvp);
          for (int64_t i0 = 0; i0 < rows; i0 += mb) {
            const int64_t nr = std::min(mb, rows - i0);
            gemm_bf16(nr, cols, D, hp + (r0 + i0) * D, D, wkp, cols, zb, cols, false);
            for (int64_t i = 0; i < nr; ++i) {
              const int64_t li = i0 + i, r = r0 + li;
              float* z = zb + i * cols;
              if (bp)
                for (int64_t j = 0; j < cols; ++j) z[j] += bp[v0 + j];
              if (cap > 0) softcap_row(z, cols, cap);
              const int64_t lt = rw.lt[r];
              const bool tin = lt >= v0 && lt < v0 + cols;
              if (tin) zt[r] = z[lt - v0];  // one block holds the target: one writer
              if (eps != 0) sz[li] += row_sum(z, cols);
              const float bm = row_max(z, cols);
              const float mn = nan_max(m[li], bm);
              bf16* prow = pb + i * kc;
              if (!(mn > kNegInf)) {  // every logit so far -inf, or a NaN: nothing to add
                if (need_dh) std::fill(prow, prow + kc, bf16(0.f));
                m[li] = mn;
                continue;
              }
              const float scale = m[li] > kNegInf ? std::exp(m[li] - mn) : 0.f;
              float sb;
              if (need_dh) {
                sb = exp_row_bf16(z, cols, mn, inv_cap, prow);
                if (kc > cols) prow[cols] = bf16(0.f);
                if (tin) prow[lt - v0] = bf16(0.f);  // the target's term is added exactly at the end
                if (scale != 1.f) {
                  float* a = accp + li * D;
                  for (int64_t d = 0; d < D; ++d) a[d] *= scale;
                }
              } else {
                sb = exp_sum(z, cols, mn, static_cast<float*>(nullptr));
              }
              s[li] = s[li] * scale + sb;
              m[li] = mn;
            }
            // the accumulating GEMM (K = one block) in wide column slices: fewer passes over
            // the accumulator rows (measured: 1024 columns ~15% faster than 256 at D = 2048)
            if (need_dh) gemm_bf16(nr, D, kc, pb, kc, wvp, D, accp + i0 * D, D, true, dh_nb);
          }
        }
      });
      // merge the segments' states in order (a log-sum-exp merge) and finish the chunk's rows
      at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
        std::vector<float> f(S), a(need_dh ? D : 0);
        const float* stp = st.data_ptr<float>();
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = r0 + i;
          float M = kNegInf, Ssum = 0.f, SZ = 0.f;
          for (int64_t t = 0; t < S; ++t) M = nan_max(M, stp[t * 3 * R + i]);
          for (int64_t t = 0; t < S; ++t) {
            const float mt = stp[t * 3 * R + i];
            f[t] = (M > kNegInf && mt > kNegInf) ? std::exp(mt - M) : 0.f;
            Ssum += f[t] * stp[t * 3 * R + R + i];
            SZ += stp[t * 3 * R + 2 * R + i];
          }
          const float l = M + std::log(Ssum);  // -inf for a row without a finite logit
          lse[r] = l;
          const float w = static_cast<float>(rw.w[r]);
          if (w != 0) loss_rows[r] = token_loss<float>(w, l, zt[r], SZ, eps, zl, V, &cp[r], &ct[r], &c1[r]);
          else cp[r] = ct[r] = c1[r] = 0.f;
          if (!need_dh) continue;
          bf16* o = dh.data_ptr<bf16>() + r * D;
          if (w == 0) {
            std::fill(o, o + D, bf16(0.f));
            continue;
          }
          std::fill(a.begin(), a.end(), 0.f);
          for (int64_t t = 0; t < S; ++t) {
            if (f[t] == 0.f) continue;
            const float* at_ = acc.data_ptr<float>() + (t * R + i) * D;
            for (int64_t d = 0; d < D; ++d) a[d] += f[t] * at_[d];
          }
          const float ca = cp[r] / Ssum;
          const int64_t lt = rw.lt[r];
          float cwt = 0.f;
          if (lt >= 0) {
            cwt = cp[r] * std::exp(zt[r] - l) + ct[r];
            if (inv_cap != 0) cwt *= 1 - (zt[r] * inv_cap) * (zt[r] * inv_cap);
          }
          const bf16* wt = lt >= 0 ? wp + lt * D : nullptr;
          for (int64_t d = 0; d < D; ++d) {
            float v = ca * a[d];
            if (wt) v += cwt * static_cast<float>(wt[d]);
            if (!colsum.empty()) v += c1[r] * colsum[d];
            o[d] = bf16(v);
          }
        }
      });
    }
  }
  const auto t_p1 = now();

  // ---------------- pass 2: dweight, dbias
  std::vector<float> db_acc(need_db ? V : 0, 0.f);
  // dZ of rows [i0, i0 + nr) of the tile z (nr x cols fp32, in place) for vocabulary columns
  // [v0, v0 + cols); adds its column sums to dbp
  auto dz_tile = [&](float* zb, int64_t r_first, int64_t nr, int64_t v0, int64_t cols, float* dbp) {
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = r_first + i;
      float* z = zb + i * cols;
      if (cp[r] == 0.f && ct[r] == 0.f && c1[r] == 0.f) {
        std::fill(z, z + cols, 0.f);
        continue;
      }
      if (bp)
        for (int64_t j = 0; j < cols; ++j) z[j] += bp[v0 + j];
      if (cap > 0) softcap_row(z, cols, cap);
      const int64_t lt = rw.lt[r];
      float ztv = 0.f;
      const bool tin = lt >= v0 && lt < v0 + cols;
      if (tin) ztv = z[lt - v0];
      dz_row(z, cols, lse[r], cp[r], c1[r], inv_cap, z);
      if (tin) {
        float v = cp[r] * std::exp(ztv - lse[r]) + c1[r] + ct[r];
        if (inv_cap != 0) v *= 1 - (ztv * inv_cap) * (ztv * inv_cap);
        z[lt - v0] = v;
      }
      if (dbp)
        for (int64_t j = 0; j < cols; ++j) dbp[j] += z[j];
    }
  };
  // dZ^T (cols x ld bf16) columns [c0, c0 + nr) from the tile: contiguous stores
  auto store_t = [](const float* zb, int64_t nr, int64_t cols, bf16* dzp, int64_t ld, int64_t c0) {
    for (int64_t j = 0; j < cols; ++j) {
      bf16* dst = dzp + j * ld + c0;
      const float* src = zb + j;
      for (int64_t i = 0; i < nr; ++i) dst[i] = bf16(src[i * cols]);
    }
  };
  if ((need_dw || need_db) && pl.split2) {
    // H packed once (shared, read-only); each thread claims vocabulary blocks and finishes
    // their dweight rows (one K = N micro-kernel GEMM per block) and dbias entries alone
    const int64_t bv = pl.bv2, mb = pl.mb2, kr = round_up(N, 2);
    const int64_t nblk = (V + bv - 1) / bv;
    auto hr = need_dw ? at::empty({kr * D}, H.options()) : at::Tensor();
    auto wk = at::empty({T * bv * D}, H.options());
    auto dzt = need_dw ? at::empty({T * bv * kr}, H.options()) : at::Tensor();
    auto ztile = at::empty({T * mb * bv}, f32);
    auto dwacc = need_dw ? at::empty({T * bv * D}, f32) : at::Tensor();
    auto dbt = at::empty({T * bv}, f32);
    if (need_dw) {
      bf16* hrp = hr.data_ptr<bf16>();
      at::parallel_for(0, kr / 2, 8, [&](int64_t p0, int64_t p1) {
        pack_rows_vnni(hp, N, D, p0, p1, hrp);
      });
    }
    std::atomic<int64_t> next{0};
    for_each_worker(T, [&](int64_t th) {
      bf16* wkp = wk.data_ptr<bf16>() + th * bv * D;
      bf16* dzp = need_dw ? dzt.data_ptr<bf16>() + th * bv * kr : nullptr;
      float* zb = ztile.data_ptr<float>() + th * mb * bv;
      float* dwa = need_dw ? dwacc.data_ptr<float>() + th * bv * D : nullptr;
      float* dbp = need_db ? dbt.data_ptr<float>() + th * bv : nullptr;
      for (int64_t v; (v = next.fetch_add(1, std::memory_order_relaxed)) < nblk;) {
        const int64_t v0 = v * bv, cols = std::min(bv, V - v0);
        pack_cols_vnni(wp + v0 * D, cols, D, 0, cols, wkp);
        if (dbp) std::fill(dbp, dbp + cols, 0.f);
        for (int64_t i0 = 0; i0 < N; i0 += mb) {
          const int64_t nr = std::min(mb, N - i0);
          gemm_bf16(nr, cols, D, hp + i0 * D, D, wkp, cols, zb, cols, false);
          dz_tile(zb, i0, nr, v0, cols, dbp);
          if (dzp) store_t(zb, nr, cols, dzp, kr, i0);
        }
        if (dzp) {
          if (kr > N)
            for (int64_t j = 0; j < cols; ++j) dzp[j * kr + N] = bf16(0.f);
          gemm_bf16(cols, D, kr, dzp, kr, hr.data_ptr<bf16>(), D, dwa, D, false);
          bf16* o = dw.data_ptr<bf16>() + v0 * D;
          for (int64_t j = 0; j < cols; ++j) from_float_row(dwa + j * D, D, o + j * D);
        }
        if (dbp) std::copy(dbp, dbp + cols, db_acc.begin() + v0);
      }
    });
  } else if (need_dw || need_db) {
    // H does not fit the budget packed whole: token chunks inside each vocabulary block, the
    // chunk's pack shared by the threads (a barrier per chunk)
    const int64_t bv = pl.bv2, R = pl.R2, mb = pl.mb2;
    const int64_t Rp = round_up(R, 2);
    auto hr = at::empty({Rp * D}, H.options());
    auto wk = at::empty({bv * D}, H.options());
    auto dzt = at::empty({bv * Rp}, H.options());
    auto ztile = at::empty({T * mb * bv}, f32);
    auto dwacc = need_dw ? at::empty({bv * D}, f32) : at::Tensor();
    auto dbpart = at::zeros({T * bv}, f32);
    bf16* hrp = hr.data_ptr<bf16>();
    bf16* wkp = wk.data_ptr<bf16>();
    bf16* dzp = dzt.data_ptr<bf16>();
    float* dwa = need_dw ? dwacc.data_ptr<float>() : nullptr;
    for (int64_t v0 = 0; v0 < V; v0 += bv) {
      const int64_t cols = std::min(bv, V - v0);
      at::parallel_for(0, cols, 16, [&](int64_t j0, int64_t j1) {
        pack_cols_vnni(wp + v0 * D, cols, D, j0, j1, wkp);
      });
      if (need_db) dbpart.zero_();
      for (int64_t r0 = 0; r0 < N; r0 += R) {
        const int64_t rows = std::min(R, N - r0);
        const int64_t kr = round_up(rows, 2);
        if (need_dw)
          at::parallel_for(0, kr / 2, 8, [&](int64_t p0, int64_t p1) {
            pack_rows_vnni(hp + r0 * D, rows, D, p0, p1, hrp);
          });
        const int64_t tasks = (rows + mb - 1) / mb;
        at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
          const int64_t th = at::get_thread_num();
          float* zb = ztile.data_ptr<float>() + th * mb * bv;
          float* dbp = need_db ? dbpart.data_ptr<float>() + th * bv : nullptr;
          for (int64_t tk = t0; tk < t1; ++tk) {
            const int64_t i0 = tk * mb, nr = std::min(mb, rows - i0);
            gemm_bf16(nr, cols, D, hp + (r0 + i0) * D, D, wkp, cols, zb, cols, false);
            dz_tile(zb, r0 + i0, nr, v0, cols, dbp);
            if (need_dw) store_t(zb, nr, cols, dzp, kr, i0);
          }
          at::native::cpublas::brgemm_release(true);
        });
        if (need_dw) {
          if (kr > rows)
            for (int64_t j = 0; j < cols; ++j) dzp[j * kr + rows] = bf16(0.f);
          const bool add = r0 > 0;
          at::parallel_for(0, cols, 16, [&](int64_t j0, int64_t j1) {
            gemm_bf16(j1 - j0, D, kr, dzp + j0 * kr, kr, hrp, D, dwa + j0 * D, D, add);
            at::native::cpublas::brgemm_release(true);
          });
        }
      }
      if (need_dw) {
        bf16* o = dw.data_ptr<bf16>() + v0 * D;
        at::parallel_for(0, cols, 16, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) from_float_row(dwa + j * D, D, o + j * D);
        });
      }
      if (need_db) {
        const float* dbp = dbpart.data_ptr<float>();
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < cols; ++j) db_acc[v0 + j] += dbp[t * bv + j];
      }
    }
  }
  if (prof)
    std::fprintf(stderr, "tokenkernels ce brgemm: pass1 %.3f s pass2 %.3f s (T %lld bv1 %lld R1 %lld bv2 %lld R2 %lld split2 %d)\n",
                 std::chrono::duration<double>(t_p1 - t_start).count(),
                 std::chrono::duration<double>(now() - t_p1).count(), (long long)T,
                 (long long)pl.bv1, (long long)pl.R1, (long long)pl.bv2, (long long)pl.R2,
                 int(pl.split2));
  return assemble(loss_rows, lse, db_acc, need_db, f32, dh, dw, db);
}

// ---------------------------------------------------------------- engine "composite"
Out composite_engine(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                     const std::optional<at::Tensor>& bias, int64_t ignore_index,
                     std::optional<double> softcap, double eps, double zl, bool mean,
                     double scale, bool check, bool need_dh, bool need_dw, bool need_db) {
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("tokenkernels::cross_entropy_forward", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t, std::optional<double>, int64_t,
                            int64_t, bool, bool, bool, double, bool, c10::string_view)>();
  static auto bwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("tokenkernels::cross_entropy_backward", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                            std::optional<double>, int64_t, double, bool, bool, bool, bool,
                            c10::string_view)>();
  const int64_t V = weight.size(0);
  auto [lse, zt, sumz, am, mz, ent] =
      fwd.call(hidden, weight, targets, bias, ignore_index, softcap, 0, V, eps > 0, false, check,
               0.0, false, "plain");
  auto t = targets.to(at::kLong);
  auto valid = t.ne(ignore_index);
  auto nv = valid.sum().clamp_min(1).to(lse.scalar_type());
  auto w = valid.to(lse.scalar_type());
  if (mean) w = w / nv;
  w = w * scale;
  auto l = (lse - zt) * (1.0 - eps);
  if (eps > 0) l = l + (lse - sumz / static_cast<double>(V)) * eps;
  if (zl > 0) l = l + lse * lse * zl;
  auto loss = at::where(valid, l, at::zeros_like(l)).mul(w).sum();
  auto cp = (w * (lse * (2.0 * zl) + 1.0)).contiguous();
  auto ct = (w * -(1.0 - eps)).contiguous();
  std::optional<at::Tensor> c1;
  if (eps > 0) c1 = (w * (-eps / static_cast<double>(V))).contiguous();
  auto [dh, dw, db] = bwd.call(hidden, weight, targets, bias, lse, cp, ct, c1, ignore_index,
                               softcap, 0, 0.0, need_dh, need_dw, need_db, true, "plain");
  return {loss, lse, dh, dw, db};
}

Out fused(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
          const std::optional<at::Tensor>& bias, int64_t ignore_index,
          std::optional<double> softcap, double label_smoothing, double z_loss, bool mean,
          double scale, bool check, double filter_eps, bool need_dh, bool need_dw, bool need_db,
          c10::string_view engine) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const char* op = kFusedOp;
  Engine eng = parse_engine(engine);
  check_tensors(hidden, weight, targets, bias, op);
  check_softcap(softcap, op);
  check_filter_eps(filter_eps, op);  // accepted as on the other path, not applied: exact
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, "tokenkernels.", op,
                    ": label_smoothing must lie in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0 && std::isfinite(z_loss), "tokenkernels.", op,
                    ": z_loss must be finite and >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(!need_db || bias.has_value(), "tokenkernels.", op, ": need_dbias without a bias");
  TORCH_CHECK_VALUE(std::isfinite(scale), "tokenkernels.", op, ": scale must be finite, got ", scale);
  const int64_t V = weight.size(0);
  if (check) check_target_values(targets, ignore_index, V, op);
  const auto dt = hidden.scalar_type();
  const bool lowp = dt == at::kHalf || dt == at::kBFloat16;
  const double cap = softcap_value(softcap);
  if (eng == Engine::Auto) {
    if (!lowp) eng = Engine::Chunk;
    else if (dt == at::kBFloat16 && hidden.size(1) % 2 == 0 && hidden.size(1) > 0 &&
             brgemm_bf16_available() &&
             !(cap > 0 && label_smoothing > 0))
      eng = Engine::Brgemm;
    else eng = Engine::Composite;
  }
  TORCH_CHECK_VALUE((eng != Engine::Chunk && eng != Engine::ChunkMkl) || !lowp, "tokenkernels.", op,
                    ": engine '", (eng == Engine::Chunk ? "chunk" : "chunk_mkl"),
                    "' takes float32 / float64 inputs, got ", dt);
  if (eng == Engine::Brgemm) {
    TORCH_CHECK_VALUE(dt == at::kBFloat16, "tokenkernels.", op,
                      ": engine 'brgemm' takes bfloat16 inputs, got ", dt);
    TORCH_CHECK_VALUE(hidden.size(1) % 2 == 0 && hidden.size(1) > 0, "tokenkernels.", op,
                      ": engine 'brgemm' needs an even D > 0, got D = ", hidden.size(1));
    TORCH_CHECK_VALUE(!(cap > 0 && label_smoothing > 0), "tokenkernels.", op,
                      ": engine 'brgemm' does not combine softcap with label_smoothing");
    TORCH_CHECK(brgemm_bf16_available(), "tokenkernels.", op,
                ": engine 'brgemm' needs oneDNN's bf16 micro-kernel (AVX512-BF16 or AMX), "
                "unavailable on this CPU");
  }
  if (eng == Engine::Composite)
    return composite_engine(hidden, weight, targets, bias, ignore_index, softcap, label_smoothing,
                            z_loss, mean, scale, check, need_dh, need_dw, need_db);

  const int64_t N = hidden.size(0), D = hidden.size(1);
  auto H = hidden.contiguous();
  auto W = weight.contiguous();
  auto T = long_contig(targets);
  const auto Rw = row_weights(T.data_ptr<int64_t>(), N, V, ignore_index, mean, scale);
  auto dh = need_dh ? at::empty({N, D}, hidden.options()) : at::empty({0}, hidden.options());
  auto dw = need_dw ? at::empty({V, D}, weight.options()) : at::empty({0}, weight.options());
  const auto sdt = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto db = need_db ? at::empty({V}, bias->options()) : at::empty({0}, hidden.options().dtype(sdt));
  if (N == 0) {
    if (need_dh) dh.zero_();
    if (need_dw) dw.zero_();
    if (need_db) db.zero_();
    return {at::zeros({}, hidden.options().dtype(sdt)), at::empty({0}, hidden.options().dtype(sdt)),
            dh, dw, db};
  }
  if (eng == Engine::Brgemm) {
    auto B32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    return brgemm_engine(H, W, B32, Rw, cap, label_smoothing, z_loss, need_dh, need_dw, need_db,
                         dh, dw, db);
  }
  auto Bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (eng == Engine::Chunk && dt == at::kFloat && D > 0 && brgemm_f32_available())
    return chunk_brgemm_f32(H, W, Bc, Rw, cap, label_smoothing, z_loss, need_dh, need_dw, need_db,
                            dh, dw, db);
  if (dt == at::kDouble)
    return chunk_engine<double>(H, W, Bc, Rw, cap, label_smoothing, z_loss, need_dh, need_dw,
                                need_db, dh, dw, db);
  return chunk_engine<float>(H, W, Bc, Rw, cap, label_smoothing, z_loss, need_dh, need_dw, need_db,
                             dh, dw, db);
}

bool fused_brgemm_available() { return brgemm_bf16_available(); }

}  // namespace
}  // namespace cpu
}  // namespace cross_entropy
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("_cross_entropy_fused", &tokenkernels::cross_entropy::cpu::fused);
}
TORCH_LIBRARY_IMPL(tokenkernels, CompositeExplicitAutograd, m) {
  m.impl("_cross_entropy_cpu_brgemm", &tokenkernels::cross_entropy::cpu::fused_brgemm_available);
}
