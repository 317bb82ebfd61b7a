// tree family, CPU kernels (speculative-decoding token trees).
//
// build: every mask row is independent (walk the node's ancestors, set their bits), so rows run
//   in parallel over (tree, node) with at::parallel_for; depth falls out of the same walk. Child
//   lists need, per tree, one backward linear pass (O(n), ~1 ns a node: cheaper than any thread
//   hand-off), run in parallel over the batch. paths: leaf ranks by one prefix count per tree,
//   then every leaf writes its own path in parallel.
// attention: work items over (request, KV head) pairs, each an online softmax over key blocks
//   (~32K scores a block, 512 .. 4096 keys) with the tree keys masked by the packed mask in the
//   block that holds them. All G = H_q / H_kv query heads of a KV head share the block (GQA: rows
//   i*G + g). One thread: one item per pair, written straight to the output. Several: unless the
//   pairs already spread evenly over the threads, long prefixes are split into chunks (split-KV,
//   >= 2 blocks each) merged afterwards by log-sum-exp. K/V are read through their strides: HF's
//   (B, H_kv, N, D) cache passed as a transpose(1, 2) view is not copied; fp32 rows are used in
//   place where a block's rows lie one stride apart (contiguous layouts; within one page when
//   paged), else gathered, and fp16/bf16 converted to fp32 once per block. Blocks of <= 8 query
//   rows use hand-vectorised AVX2 products (one dot per key row, a register-tiled P.V); larger
//   ones at::cpu::mm_out / addmm_ (BLAS) on from_blob views. Softmax passes are AVX2 (exp
//   arguments clamped at -80: no subnormals). Inside the parallel region no ATen op but those
//   GEMMs, and one scratch allocation per task.
// verify: one tree per task, in parallel over the batch (the walk itself is inherently serial);
//   the O(V) residual passes run on explicit 4-lane blocks (Lanes, below).
// select_frontier / select_tree: partial sorts per batch item, in parallel over the batch.
//
// Every argument check and option parse is in tree_args.h (shared with the CUDA adapter). Value
// checks (parents / tree_lens, prefix_lens / block_table, child links / draft tokens) are cheap
// linear passes here, so the CPU always runs them (`check` only adds verify_sampling's
// probability rows; on CUDA it costs a host sync); the walks are nevertheless guarded exactly
// as on CUDA (tree.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "tree/tree_args.h"
#include "tokenkernels/cpu_simd.h"
#include "tokenkernels/tree.h"

namespace tokenkernels {
namespace tree {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------- build

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> build(
    const at::Tensor& parents_in, const std::optional<at::Tensor>& tree_lens, bool check, c10::string_view impl) {
  const auto a = check_build_args(parents_in, tree_lens, impl);   // impl: one CPU kernel
  const int64_t B = a.B, n = a.n;
  auto parents = long_contig(parents_in);
  auto lens = opt_long_contig(tree_lens);
  validate_build_values(parents, lens, check);   // always on CPU

  const int64_t W = mask_words(n);
  auto opts = parents.options();
  auto mask = at::zeros({B, n, W}, opts.dtype(at::kInt));
  auto depth = at::zeros({B, n}, opts);
  auto first_child = at::full({B, n}, -1, opts);
  auto next_sibling = at::full({B, n}, -1, opts);
  const int64_t* par = parents.data_ptr<int64_t>();
  const int64_t* len = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  uint32_t* m = reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>());
  int64_t* dep = depth.data_ptr<int64_t>();
  int64_t* fc = first_child.data_ptr<int64_t>();
  int64_t* ns = next_sibling.data_ptr<int64_t>();

  // Mask rows and depths: one independent ancestor walk per node. A chunk gets about 64K
  // word-operations (W words to clear + the walk), so small batches stay on the calling thread:
  // waking the pool costs more than they do (n = 1024, B = 1 takes ~15 us on one core).
  const int64_t grain = std::max<int64_t>(256, (int64_t(1) << 16) / (W + 8));
  at::parallel_for(0, B * n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / n, i = r % n;
      if (i >= (len ? len[b] : n)) continue;   // padding: zero row, depth 0
      const int64_t* p = par + b * n;
      uint32_t* row = m + r * W;
      int64_t d = -1;
      for (int64_t j = i; j >= 0; j = p[j]) {
        row[j >> 5] |= 1u << (j & 31);
        ++d;
      }
      dep[r] = d;
    }
  });
  // Child lists: a backward pass per tree links children in increasing order.
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / n), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t L = len ? len[b] : n;
      const int64_t* p = par + b * n;
      int64_t* f = fc + b * n;
      int64_t* s = ns + b * n;
      for (int64_t i = L - 1; i >= 1; --i) {
        s[i] = f[p[i]];
        f[p[i]] = i;
      }
    }
  });
  return {mask, depth, first_child, next_sibling};
}

at::Tensor paths(const at::Tensor& parents_in, const at::Tensor& depth_in,
                 const at::Tensor& first_child_in, const std::optional<at::Tensor>& tree_lens,
                 int64_t max_leaves, int64_t max_depth) {
  check_paths_args(parents_in, depth_in, first_child_in, tree_lens, max_leaves, max_depth);
  const int64_t B = parents_in.size(0), n = parents_in.size(1);
  auto parents = long_contig(parents_in);
  auto depth = long_contig(depth_in);
  auto fcs = long_contig(first_child_in);
  auto lens = opt_long_contig(tree_lens);
  check_paths_values(depth, fcs, lens, max_leaves, max_depth);
  auto paths = at::full({B, max_leaves, max_depth + 1}, -1, parents.options());
  auto rank = at::full({B, n}, -1, parents.options());
  const int64_t* par = parents.data_ptr<int64_t>();
  const int64_t* dep = depth.data_ptr<int64_t>();
  const int64_t* fc = fcs.data_ptr<int64_t>();
  const int64_t* len = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  int64_t* rk = rank.data_ptr<int64_t>();
  int64_t* out = paths.data_ptr<int64_t>();
  // Leaf ranks: a prefix count per tree.
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / n), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t L = std::min(len ? len[b] : n, n);
      int64_t c = 0;
      for (int64_t i = 0; i < L; ++i)
        if (fc[b * n + i] < 0) rk[b * n + i] = c++;   // c <= max_leaves (check_paths_values)
    }
  });
  // Every leaf writes its own root-to-leaf path (chunks of 4096 nodes, as in build).
  const int64_t Dp = max_depth + 1;
  at::parallel_for(0, B * n, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (rk[r] < 0) continue;
      const int64_t b = r / n;
      int64_t* row = out + (b * max_leaves + rk[r]) * Dp;
      // effective parents (tree.h): a direct call with bad parents cannot loop or read past
      // the tree; depths outside [0, max_depth] (inconsistent inputs) are not written
      for (int64_t j = r % n; j >= 0; j = effective_parent(par[b * n + j], j)) {
        const int64_t d = dep[b * n + j];
        if (d >= 0 && d <= max_depth) row[d] = j;
      }
    }
  });
  return paths;
}

// ---------------------------------------------------------------------------------- attention

// Strided view of a K or V cache whose last dim is contiguous: the D values of (request b,
// position pos, KV head h) start at base + b*s0 + pos*s1 + h*s2 (contiguous layout), or at
// base + page*s0 + (pos % page_size)*s1 + h*s2 with page = block_table[b, pos / page_size]
// (paged). HF's (B, H_kv, N, D) cache passed as a transpose(1, 2) view is read in place.
template <typename T>
struct CacheView {
  const T* base;
  int64_t s0, s1, s2;
  const int64_t* table;   // (B, max_pages) or nullptr
  int64_t max_pages, page_size;
  const T* row(int64_t b, int64_t pos, int64_t h) const {
    if (table) {
      const int64_t page = table[b * max_pages + pos / page_size];
      return base + page * s0 + (pos % page_size) * s1 + h * s2;
    }
    return base + b * s0 + pos * s1 + h * s2;
  }
  // Rows [pos0, pos0 + cnt) of one (b, h) lie s1 apart (no page boundary among them).
  bool one_run(int64_t pos0, int64_t cnt) const {
    return !table || pos0 / page_size == (pos0 + cnt - 1) / page_size;
  }
};

// ---- small blocks (few query rows): hand-vectorised products, no per-call cost of ATen / BLAS
// (a few us a call, which dominates blocks of a handful of rows). Larger blocks go to at::mm.

#ifdef TK_HAVE_X86_SIMD
TK_TARGET_AVX2 inline __m256i lanes_below(int64_t c) {   // lanes i < c set
  const int32_t cc = static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(8, c)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(cc), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One MR x 16 tile (FULL: all 16 columns; else the first nc < 16, masked): 2 * MR accumulators,
// per k two loads of B and MR broadcasts of A.
template <int MR, bool FULL>
TK_TARGET_AVX2 void gemm_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                              int64_t ldc, int64_t nc, bool acc) {
  __m256 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  const __m256i m0 = lanes_below(nc), m1 = lanes_below(nc - 8);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const __m256 b0 = FULL ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m0);
    const __m256 b1 = FULL ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, m1);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
    if (FULL) {
      if (acc) {
        c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(c));
        c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(c + 8));
      }
      _mm256_storeu_ps(c, c0[r]);
      _mm256_storeu_ps(c + 8, c1[r]);
    } else {
      if (acc) {
        c0[r] = _mm256_add_ps(c0[r], _mm256_maskload_ps(c, m0));
        c1[r] = _mm256_add_ps(c1[r], _mm256_maskload_ps(c + 8, m1));
      }
      _mm256_maskstore_ps(c, m0, c0[r]);
      _mm256_maskstore_ps(c + 8, m1, c1[r]);
    }
  }
}

template <bool FULL>
TK_TARGET_AVX2 void gemm_panel(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                               float* C, int64_t ldc, int64_t nc, bool acc) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) gemm_tile<6, FULL>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, nc, acc);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: gemm_tile<5, FULL>(K, a, lda, B, ldb, c, ldc, nc, acc); break;
    case 4: gemm_tile<4, FULL>(K, a, lda, B, ldb, c, ldc, nc, acc); break;
    case 3: gemm_tile<3, FULL>(K, a, lda, B, ldb, c, ldc, nc, acc); break;
    case 2: gemm_tile<2, FULL>(K, a, lda, B, ldb, c, ldc, nc, acc); break;
    case 1: gemm_tile<1, FULL>(K, a, lda, B, ldb, c, ldc, nc, acc); break;
    default: break;
  }
}

// C (M x N, row stride ldc) = A (M x K, lda) . B (K x N, ldb), row-major fp32; C += with acc (the
// P.V of small blocks: A = P, B = the V rows). Column panels of 16 outside, row tiles inside: the
// K x 16 panel of B stays in L1.
TK_TARGET_AVX2 void gemm_avx2(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                              int64_t ldb, float* C, int64_t ldc, bool acc) {
  for (int64_t j = 0; j < N; j += 16) {
    const int64_t nc = std::min<int64_t>(16, N - j);
    if (nc == 16)
      gemm_panel<true>(M, K, A, lda, B + j, ldb, C + j, ldc, nc, acc);
    else
      gemm_panel<false>(M, K, A, lda, B + j, ldb, C + j, ldc, nc, acc);
  }
}

// S (rows, kn; row stride lds) = Q (rows, D; contiguous) . K^T, key j's row at K + j * ldk: RN
// rows at a time, one accumulator per row, each key row loaded once per RN rows.
template <int RN>
TK_TARGET_AVX2 void qk_tile(int64_t kn, int64_t D, const float* Q, const float* K, int64_t ldk, float* S,
                            int64_t lds) {
  const int64_t D8 = D - D % 8;
  for (int64_t j = 0; j < kn; ++j) {
    const float* k = K + j * ldk;
    __m256 acc[RN];
    for (int r = 0; r < RN; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t x = 0; x < D8; x += 8) {
      const __m256 kv = _mm256_loadu_ps(k + x);
      for (int r = 0; r < RN; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + r * D + x), kv, acc[r]);
    }
    for (int r = 0; r < RN; ++r) {
      float v = simd::hsum(acc[r]);
      for (int64_t x = D8; x < D; ++x) v += Q[r * D + x] * k[x];
      S[r * lds + j] = v;
    }
  }
}

TK_TARGET_AVX2 void qk_avx2(int64_t rows, int64_t kn, int64_t D, const float* Q, const float* K, int64_t ldk,
                            float* S, int64_t lds) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) qk_tile<8>(kn, D, Q + r * D, K, ldk, S + r * lds, lds);
  const float* q = Q + r * D;
  float* s = S + r * lds;
  switch (rows - r) {
    case 7: qk_tile<7>(kn, D, q, K, ldk, s, lds); break;
    case 6: qk_tile<6>(kn, D, q, K, ldk, s, lds); break;
    case 5: qk_tile<5>(kn, D, q, K, ldk, s, lds); break;
    case 4: qk_tile<4>(kn, D, q, K, ldk, s, lds); break;
    case 3: qk_tile<3>(kn, D, q, K, ldk, s, lds); break;
    case 2: qk_tile<2>(kn, D, q, K, ldk, s, lds); break;
    case 1: qk_tile<1>(kn, D, q, K, ldk, s, lds); break;
    default: break;
  }
}
#endif

// ---- row passes of the online softmax (AVX2 where the CPU has it)

#ifdef TK_HAVE_X86_SIMD
// s[j] <- exp(s[j] - mx) (0 where s[j] = -inf, a masked key); returns their sum. Arguments are
// clamped at -80 first: exp of less would be subnormal (slow on many CPUs) and is < 2e-35, nothing
// next to the row's largest term, 1.
TK_TARGET_AVX2 float exp_sum_avx2(float* s, int64_t cnt, float mx) {
  const __m256 vm = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(kNegInf), lo = _mm256_set1_ps(-80.0f);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= cnt; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ),
                                      simd::exp256(_mm256_max_ps(_mm256_sub_ps(x, vm), lo)));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = simd::hsum(acc);
  for (; j < cnt; ++j) sum += (s[j] = s[j] == kNegInf ? 0.0f : std::exp(std::max(s[j] - mx, -80.0f)));
  return sum;
}

TK_TARGET_AVX2 float max_avx2(const float* s, int64_t cnt) {
  __m256 m = _mm256_set1_ps(kNegInf);
  int64_t j = 0;
  for (; j + 8 <= cnt; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  float r = simd::hmax(m);
  for (; j < cnt; ++j) r = std::max(r, s[j]);
  return r;
}
#endif

inline bool have_avx2() {
#ifdef TK_HAVE_X86_SIMD
  return simd::has_avx2_fma();
#else
  return false;
#endif
}

// S = Q K^T and O += P V on small blocks (scalar loops without AVX2).
void qk_small(int64_t rows, int64_t kn, int64_t D, const float* Q, const float* K, int64_t ldk, float* S,
              int64_t lds) {
#ifdef TK_HAVE_X86_SIMD
  if (have_avx2()) return qk_avx2(rows, kn, D, Q, K, ldk, S, lds);
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < kn; ++j) {
      float v = 0;
      for (int64_t x = 0; x < D; ++x) v += Q[r * D + x] * K[j * ldk + x];
      S[r * lds + j] = v;
    }
}

void pv_small(int64_t rows, int64_t kn, int64_t D, const float* Pm, int64_t lds, const float* V, int64_t ldv,
              float* O) {
#ifdef TK_HAVE_X86_SIMD
  if (have_avx2()) return gemm_avx2(rows, D, kn, Pm, lds, V, ldv, O, D, true);
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < kn; ++j) {
      const float p = Pm[r * lds + j];
      for (int64_t x = 0; x < D; ++x) O[r * D + x] += p * V[j * ldv + x];
    }
}

float row_max(const float* s, int64_t cnt) {
#ifdef TK_HAVE_X86_SIMD
  if (have_avx2()) return max_avx2(s, cnt);
#endif
  float r = kNegInf;
  for (int64_t j = 0; j < cnt; ++j) r = std::max(r, s[j]);
  return r;
}

float exp_sum(float* s, int64_t cnt, float mx) {
#ifdef TK_HAVE_X86_SIMD
  if (have_avx2()) return exp_sum_avx2(s, cnt, mx);
#endif
  float sum = 0;
  for (int64_t j = 0; j < cnt; ++j) sum += (s[j] = s[j] == kNegInf ? 0.0f : std::exp(std::max(s[j] - mx, -80.0f)));
  return sum;
}

// A work item: the keys [k0, k1) of (request b, KV head h), positions in the cache; with_tree:
// it also takes the request's tree keys (the last item of (b, h)). whole: the only item of
// (b, h), which writes the output directly.
struct Item {
  int64_t b, h, k0, k1;
  bool with_tree, whole;
};

// Keys per block of the online softmax: about 32K scores (128 KB, in L2) per block, at least 512
// keys and at most 4096 (few query rows: fewer, larger GEMMs, each call has a fixed cost).
inline int64_t key_block(int64_t rows) {
  const int64_t kb = ((int64_t(1) << 15) / std::max<int64_t>(1, rows) + 63) / 64 * 64;
  return std::min<int64_t>(4096, std::max<int64_t>(512, kb));
}

// Blocks of at most this many query rows use qk_small / pv_small, larger ones at::mm.
inline bool small_block(int64_t rows) {
  return rows <= 8;
}

template <typename T>
void attention_cpu_impl(const T* qp, const int64_t* qs, const CacheView<T>& K, const CacheView<T>& V,
                        const AttnDims& d, const int64_t* P, const int64_t* Lens, const int32_t* mask, float scale,
                        T* op, float* lp) {
  const int64_t G = d.Hq / d.Hkv, D = d.D, n = d.n, W = d.W, Hq = d.Hq;
  auto len_of = [&](int64_t b) { return Lens ? Lens[b] : n; };

  // padding query rows: zeros, lse = -inf
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t i = len_of(b); i < n; ++i) {
      std::fill(op + (b * n + i) * Hq * D, op + (b * n + i + 1) * Hq * D, static_cast<T>(0.0f));
      std::fill(lp + (b * n + i) * Hq, lp + (b * n + i + 1) * Hq, kNegInf);
    }

  // Plan the work items. One thread: one item per (b, h). Several: split the prefix (split-KV,
  // chunks of >= 2 blocks) unless the (b, h) pairs already spread evenly over the threads.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t pairs = 0, total = 0;
  for (int64_t b = 0; b < d.B; ++b)
    if (len_of(b) > 0) {
      pairs += d.Hkv;
      total += d.Hkv * P[b];
    }
  const int64_t R = n * G;   // most query rows of a (request, KV head) pair; row i*G + g
  const int64_t KB = key_block(R);
  int64_t chunk = std::numeric_limits<int64_t>::max();
  if (threads > 1 && pairs < 4 * threads && pairs % threads != 0) {
    chunk = std::max<int64_t>(2 * KB, (total + 4 * threads - 1) / (4 * threads));
    chunk = (chunk + KB - 1) / KB * KB;
  }
  std::vector<Item> items;
  struct Split {
    int64_t b, h, c0, c1;   // a pair with several items: items [c0, c1)
  };
  std::vector<Split> split_pairs;
  for (int64_t b = 0; b < d.B; ++b) {
    if (len_of(b) == 0) continue;
    for (int64_t h = 0; h < d.Hkv; ++h) {
      const int64_t c0 = static_cast<int64_t>(items.size());
      int64_t s = 0;
      do {
        const int64_t e = P[b] - s > chunk ? s + chunk : P[b];
        items.push_back({b, h, s, e, e == P[b], false});
        s = e;
      } while (s < P[b]);
      const int64_t c1 = static_cast<int64_t>(items.size());
      if (c1 - c0 == 1) {
        items.back().whole = true;
      } else {
        split_pairs.push_back({b, h, c0, c1});
      }
    }
  }
  const int64_t C = static_cast<int64_t>(items.size());
  // partial results of the split pairs' items: unnormalised O (R, D), running max, sum
  const bool any_split = !split_pairs.empty();
  std::vector<float> part(any_split ? C * R * (D + 2) : 0);

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    // one scratch block per task: Q (R, D), S (R, KB), O (R, D), m, l (R), Kf, Vf (KB, D)
    const int64_t need = 2 * R * D + R * KB + 2 * R + 2 * KB * D;
    std::unique_ptr<float[]> buf(new float[need]);
    float* Q = buf.get();
    float* S = Q + R * D;
    float* O = S + R * KB;
    float* m = O + R * D;
    float* l = m + R;
    float* Kf = l + R;
    float* Vf = Kf + KB * D;
    for (int64_t c = c0; c < c1; ++c) {
      const Item& it = items[c];
      const int64_t b = it.b, h = it.h, L = len_of(b), rows = L * G, Pb = P[b];
      // queries of this KV head, fp32, pre-scaled
      for (int64_t i = 0; i < L; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const T* src = qp + b * qs[0] + i * qs[1] + (h * G + g) * qs[2];
          float* dst = Q + (i * G + g) * D;
          for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<float>(src[x]) * scale;
        }
      std::fill(m, m + rows, kNegInf);
      std::fill(l, l + rows, 0.0f);
      std::fill(O, O + rows * D, 0.0f);
      const bool small = small_block(rows);
      const auto Qt = small ? at::Tensor() : at::from_blob(Q, {rows, D}, {D, 1}, f32);
      auto Ot = small ? at::Tensor() : at::from_blob(O, {rows, D}, {D, 1}, f32);
      const int64_t kend = it.with_tree ? Pb + L : it.k1;
      for (int64_t j0 = it.k0; j0 < kend; j0 += KB) {
        // columns t0 .. kn - 1 of the block are tree keys (the mask applies)
        const int64_t kn = std::min(KB, kend - j0), t0 = std::max<int64_t>(0, Pb - j0);
        // K and V rows of the block as fp32 (kn, D) with a row stride: fp32 caches in place where
        // the rows are one strided run, else converted / gathered into Kf, Vf
        auto block = [&](const CacheView<T>& X, float* dst) -> std::pair<const float*, int64_t> {
          if constexpr (std::is_same_v<T, float>) {
            if (X.one_run(j0, kn)) return {X.row(b, j0, h), X.s1};
          }
          for (int64_t j = 0; j < kn; ++j) {
            const T* src = X.row(b, j0 + j, h);
            float* o = dst + j * D;
            for (int64_t x = 0; x < D; ++x) o[x] = static_cast<float>(src[x]);
          }
          return {dst, D};
        };
        auto as_tensor = [&](std::pair<const float*, int64_t> x) {
          return at::from_blob(const_cast<float*>(x.first), {kn, D}, {x.second, 1}, f32);
        };
        // ---- S = Q K^T (rows, kn)
        const auto kb = block(K, Kf);
        if (small) {
          qk_small(rows, kn, D, Q, kb.first, kb.second, S, KB);
        } else {
          auto St = at::from_blob(S, {rows, kn}, {KB, 1}, f32);
          at::cpu::mm_out(St, Qt, as_tensor(kb).t());
        }
        // ---- mask (tree blocks), online softmax update
        for (int64_t r = 0; r < rows; ++r) {
          float* s = S + r * KB;
          if (t0 < kn) {
            const int32_t* mrow = mask + (b * n + r / G) * W;
            for (int64_t j = t0; j < kn; ++j)
              if (!mask_bit(mrow, j0 - Pb + j)) s[j] = kNegInf;
          }
          const float m_new = std::max(m[r], row_max(s, kn));
          if (m_new == kNegInf) {   // nothing visible yet: p = 0, O and l stay 0
            std::fill(s, s + kn, 0.0f);
            continue;
          }
          const float alpha = std::exp(m[r] - m_new);   // 0 on the first visible block
          const float sum = exp_sum(s, kn, m_new);
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != 1.0f) {
            float* o = O + r * D;
            for (int64_t x = 0; x < D; ++x) o[x] *= alpha;
          }
        }
        // ---- O += P V
        const auto vb = block(V, Vf);
        if (small)
          pv_small(rows, kn, D, S, KB, vb.first, vb.second, O);
        else
          at::cpu::addmm_(Ot, at::from_blob(S, {rows, kn}, {KB, 1}, f32), as_tensor(vb));
      }
      if (it.whole) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = r / G, hq = h * G + r % G;
          T* dst = op + ((b * n + i) * Hq + hq) * D;
          const float* o = O + r * D;
          if (l[r] > 0) {
            const float inv = 1.0f / l[r];
            for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(o[x] * inv);
            lp[(b * n + i) * Hq + hq] = m[r] + std::log(l[r]);
          } else {   // no visible key (a hand-made mask row without its own bit, empty prefix)
            for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(0.0f);
            lp[(b * n + i) * Hq + hq] = kNegInf;
          }
        }
      } else {
        float* po = part.data() + c * R * (D + 2);
        std::memcpy(po, O, rows * D * sizeof(float));
        std::memcpy(po + R * D, m, rows * sizeof(float));
        std::memcpy(po + R * D + R, l, rows * sizeof(float));
      }
    }
  });
  if (!any_split) return;

  // log-sum-exp merge of the split pairs' items
  const int64_t S_ = static_cast<int64_t>(split_pairs.size());
  at::parallel_for(0, S_, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      const Split& sp = split_pairs[t];
      const int64_t b = sp.b, h = sp.h, rows = len_of(b) * G, i0 = sp.c0, i1 = sp.c1;
      for (int64_t r = 0; r < rows; ++r) {
        float M = kNegInf;
        for (int64_t c = i0; c < i1; ++c) M = std::max(M, part[c * R * (D + 2) + R * D + r]);
        const int64_t i = r / G, hq = h * G + r % G;
        T* dst = op + ((b * n + i) * Hq + hq) * D;
        if (M == kNegInf) {
          for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(0.0f);
          lp[(b * n + i) * Hq + hq] = kNegInf;
          continue;
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        float lsum = 0;
        for (int64_t c = i0; c < i1; ++c) {
          const float* pc = part.data() + c * R * (D + 2);
          const float mc = pc[R * D + r];
          if (mc == kNegInf) continue;
          const float w = std::exp(mc - M);
          lsum += w * pc[R * D + R + r];
          const float* o = pc + r * D;
          for (int64_t x = 0; x < D; ++x) acc[x] += w * o[x];
        }
        const float inv = 1.0f / lsum;
        for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(acc[x] * inv);
        lp[(b * n + i) * Hq + hq] = M + std::log(lsum);
      }
    }
  });
}

// After check_attention_args / check_attention_out_args (impl: one CPU kernel).
void run_attention(const AttnDims& d, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                   const at::Tensor& prefix_lens, const at::Tensor& mask_in,
                   const std::optional<at::Tensor>& tree_lens, const std::optional<at::Tensor>& block_table,
                   double scale, bool check, const at::Tensor& out, const at::Tensor& lse) {
  auto P = long_contig(prefix_lens);
  auto Lens = opt_long_contig(tree_lens);
  auto table = opt_long_contig(block_table);
  validate_attention_values(d, P, Lens, table, check);   // always on CPU
  // q, k_cache, v_cache are read through their strides (HF's (B, H_kv, N, D) cache as a
  // transpose(1, 2) view is not copied); only a non-contiguous last dim is copied.
  auto last_dense = [](const at::Tensor& t) { return t.size(3) == 1 || t.stride(3) == 1 ? t : t.contiguous(); };
  auto q = last_dense(q_in), k = last_dense(k_in), v = last_dense(v_in), mask = mask_in.contiguous();
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t* tb = table.defined() ? table.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_cpu", [&] {
    const CacheView<scalar_t> K{k.data_ptr<scalar_t>(), k.stride(0), k.stride(1), k.stride(2), tb, d.max_pages,
                                d.page_size};
    const CacheView<scalar_t> V{v.data_ptr<scalar_t>(), v.stride(0), v.stride(1), v.stride(2), tb, d.max_pages,
                                d.page_size};
    attention_cpu_impl<scalar_t>(q.data_ptr<scalar_t>(), qs, K, V, d, P.data_ptr<int64_t>(),
                                 Lens.defined() ? Lens.data_ptr<int64_t>() : nullptr, mask.data_ptr<int32_t>(),
                                 static_cast<float>(scale), out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
}

void attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_lens,
                   const at::Tensor& mask, const std::optional<at::Tensor>& tree_lens,
                   const std::optional<at::Tensor>& block_table, double scale, bool check, c10::string_view impl,
                   const at::Tensor& out, const at::Tensor& lse) {
  const auto d = check_attention_args(q, k, v, prefix_lens, mask, tree_lens, block_table, impl);
  check_attention_out_args(q, d, out, lse);
  run_attention(d, q, k, v, prefix_lens, mask, tree_lens, block_table, scale, check, out, lse);
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& prefix_lens, const at::Tensor& mask,
                                             const std::optional<at::Tensor>& tree_lens,
                                             const std::optional<at::Tensor>& block_table, double scale, bool check,
                                             c10::string_view impl) {
  const auto d = check_attention_args(q, k, v, prefix_lens, mask, tree_lens, block_table, impl);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({d.B, d.n, d.Hq}, q.options().dtype(at::kFloat));
  run_attention(d, q, k, v, prefix_lens, mask, tree_lens, block_table, scale, check, out, lse);
  return {out, lse};
}

// ------------------------------------------------------------------------------------- verify

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy(
    const at::Tensor& first_child_in, const at::Tensor& next_sibling_in, const at::Tensor& draft_in,
    const at::Tensor& argmax_in, int64_t max_depth, bool check) {
  check_verify_greedy_args(first_child_in, next_sibling_in, draft_in, argmax_in, max_depth);
  const int64_t B = first_child_in.size(0), n = first_child_in.size(1);
  auto fcs = long_contig(first_child_in), nss = long_contig(next_sibling_in);
  auto draft = long_contig(draft_in), am = long_contig(argmax_in);
  validate_greedy_values(fcs, nss, check);   // always on CPU
  auto opts = fcs.options();
  auto accepted = at::full({B, max_depth + 1}, -1, opts);
  auto accept_len = at::empty({B}, opts);
  auto bonus = at::empty({B}, opts);
  const int64_t *fc = fcs.data_ptr<int64_t>(), *ns = nss.data_ptr<int64_t>();
  const int64_t *dt = draft.data_ptr<int64_t>(), *ta = am.data_ptr<int64_t>();
  int64_t *acc = accepted.data_ptr<int64_t>(), *al = accept_len.data_ptr<int64_t>(), *bo = bonus.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * n;
      int64_t* row = acc + b * (max_depth + 1);
      int64_t u = 0, k = 0;
      row[0] = 0;
      while (k < max_depth) {
        const int64_t want = ta[o + u];
        int64_t c = fc[o + u], prev = u;
        while (link_ok(c, prev, n) && dt[o + c] != want) {
          prev = c;
          c = ns[o + c];
        }
        if (!link_ok(c, prev, n)) break;
        row[++k] = c;
        u = c;
      }
      al[b] = k;
      bo[b] = ta[o + u];
    }
  });
  return {accepted, accept_len, bonus};
}

// The O(V) passes of verify_sampling work on 4-blocks of a row (Lanes: entries x .. x + 3, as two
// SSE2 pairs of doubles on x86-64, four plain doubles elsewhere: the same lane-wise arithmetic;
// on x86-64 both forms give the same bits, NaN / inf / subnormal / -0 entries included). Every
// sum keeps four lane sums, lane j taking entries j, j + 4, j + 8, ... in increasing order, the
// tail (V % 4 entries) going into lane 0, and ends as (s0 + s1) + (s2 + s3). The lanes are
// explicit because the compiler may not reassociate the scalar form of these sums, and its own
// vectorisation of that form (or none, with a conditional load or a pos_part branch per entry)
// made RSD's update pass ~10x slower than SpecInfer's.
#if defined(__SSE2__)
struct Lanes {
  __m128d lo, hi;   // entries x, x + 1 and x + 2, x + 3
};
inline Lanes lanes_zero() { return {_mm_setzero_pd(), _mm_setzero_pd()}; }
inline Lanes lanes_load(const double* p) { return {_mm_loadu_pd(p), _mm_loadu_pd(p + 2)}; }
inline Lanes lanes_load(const float* p) {
  const __m128 f = _mm_loadu_ps(p);
  return {_mm_cvtps_pd(f), _mm_cvtps_pd(_mm_movehl_ps(f, f))};
}
inline Lanes lanes_set(double a, double b, double c, double d) { return {_mm_set_pd(b, a), _mm_set_pd(d, c)}; }
inline void lanes_store(double* p, Lanes v) {
  _mm_storeu_pd(p, v.lo);
  _mm_storeu_pd(p + 2, v.hi);
}
inline Lanes operator+(Lanes a, Lanes b) { return {_mm_add_pd(a.lo, b.lo), _mm_add_pd(a.hi, b.hi)}; }
inline Lanes operator-(Lanes a, Lanes b) { return {_mm_sub_pd(a.lo, b.lo), _mm_sub_pd(a.hi, b.hi)}; }
inline Lanes operator*(Lanes a, double c) {
  const __m128d m = _mm_set1_pd(c);
  return {_mm_mul_pd(a.lo, m), _mm_mul_pd(a.hi, m)};
}
// pos_part lane-wise (NaN -> 0, -0 -> +0): keep the lanes that are > 0
inline __m128d pos_part2(__m128d v) { return _mm_and_pd(v, _mm_cmpgt_pd(v, _mm_setzero_pd())); }
inline Lanes lanes_pos_part(Lanes a) { return {pos_part2(a.lo), pos_part2(a.hi)}; }
inline void lanes_get(Lanes a, double* out) {
  _mm_storeu_pd(out, a.lo);
  _mm_storeu_pd(out + 2, a.hi);
}
inline Lanes lanes_add0(Lanes a, double v) { return {_mm_add_sd(a.lo, _mm_set_sd(v)), a.hi}; }   // lane 0 += v
#else
struct Lanes {
  double v[4];
};
inline Lanes lanes_zero() { return {{0, 0, 0, 0}}; }
template <typename F>
inline Lanes lanes_load(const F* p) { return {{double(p[0]), double(p[1]), double(p[2]), double(p[3])}}; }
inline Lanes lanes_set(double a, double b, double c, double d) { return {{a, b, c, d}}; }
inline void lanes_store(double* p, Lanes a) { std::memcpy(p, a.v, sizeof a.v); }
inline Lanes operator+(Lanes a, Lanes b) { return {{a.v[0] + b.v[0], a.v[1] + b.v[1], a.v[2] + b.v[2], a.v[3] + b.v[3]}}; }
inline Lanes operator-(Lanes a, Lanes b) { return {{a.v[0] - b.v[0], a.v[1] - b.v[1], a.v[2] - b.v[2], a.v[3] - b.v[3]}}; }
inline Lanes operator*(Lanes a, double c) { return {{a.v[0] * c, a.v[1] * c, a.v[2] * c, a.v[3] * c}}; }
inline Lanes lanes_pos_part(Lanes a) {
  return {{pos_part(a.v[0]), pos_part(a.v[1]), pos_part(a.v[2]), pos_part(a.v[3])}};
}
inline void lanes_get(Lanes a, double* out) { std::memcpy(out, a.v, sizeof a.v); }
inline Lanes lanes_add0(Lanes a, double v) {   // lane 0 += v
  a.v[0] += v;
  return a;
}
#endif
inline double lanes_total(Lanes a) {
  double s[4];
  lanes_get(a, s);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Probability entry -> double, exact (Half / BFloat16 through c10's conversions).
template <typename T>
inline double prob_to_double(const T* src, int64_t x) { return static_cast<double>(src[x]); }

// entries x .. x + 3 of src in double
template <typename T>
inline Lanes lanes_at(const T* src, int64_t x) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>)
    return lanes_load(src + x);
  else
    return lanes_set(prob_to_double(src, x), prob_to_double(src, x + 1), prob_to_double(src, x + 2),
                     prob_to_double(src, x + 3));
}

// dst <- src (V entries) in double; returns their sum
template <typename T>
double load_row(const T* src, double* dst, int64_t V) {
  Lanes s = lanes_zero();
  int64_t x = 0;
  for (; x + 4 <= V; x += 4) {
    const Lanes v = lanes_at(src, x);
    lanes_store(dst + x, v);
    s = s + v;
  }
  for (; x < V; ++x) s = lanes_add0(s, dst[x] = prob_to_double(src, x));
  return lanes_total(s);
}

// SpecInfer's residual update: tmp <- max(r * inv - q, 0) (inv = 1 / S); returns its sum. Q: the
// draft row's element type, float or double (Half / BFloat16 rows are converted to double once
// per node first, not once per rejection).
template <typename Q>
double specinfer_residual(const double* __restrict__ r, const Q* __restrict__ q, double inv,
                          double* __restrict__ tmp, int64_t V) {
  Lanes s = lanes_zero();
  int64_t x = 0;
  for (; x + 4 <= V; x += 4) {
    const Lanes v = lanes_pos_part(lanes_at(r, x) * inv - lanes_at(q, x));
    lanes_store(tmp + x, v);
    s = s + v;
  }
  for (; x < V; ++x) s = lanes_add0(s, tmp[x] = pos_part(r[x] * inv - static_cast<double>(q[x])));
  return lanes_total(s);
}

// RSD's update after rejecting token t (0 <= t < V), one pass: tmp <- max(r * inv - qr * qinv, 0)
// (inv = 1 / S, qinv = 1 / Q; returns its sum) and *qsum <- the sum of qr without entry t. Only
// the 4-block holding t masks it out (no index compare per entry).
inline double rsd_residual(const double* __restrict__ r, const double* __restrict__ qr, double inv, double qinv,
                           int64_t t, double* __restrict__ tmp, int64_t V, double* qsum) {
  Lanes s = lanes_zero(), qs = lanes_zero();
  const int64_t V4 = V - V % 4, tb = t < V4 ? t - t % 4 : V4;   // tb: the 4-block holding t
  int64_t x = 0;
  auto blocks = [&](int64_t x1) {   // the update of the 4-blocks [x, x1)
    for (; x < x1; x += 4) {
      const Lanes qv = lanes_at(qr, x);
      const Lanes v = lanes_pos_part(lanes_at(r, x) * inv - qv * qinv);
      lanes_store(tmp + x, v);
      s = s + v;
      qs = qs + qv;
    }
  };
  blocks(tb);
  if (tb < V4) {   // t's block: its qr entry counts as 0 in qs
    double qv[4] = {qr[tb], qr[tb + 1], qr[tb + 2], qr[tb + 3]};
    const Lanes v = lanes_pos_part(lanes_at(r, tb) * inv - lanes_load(qv) * qinv);
    lanes_store(tmp + tb, v);
    s = s + v;
    qv[t - tb] = 0.0;
    qs = qs + lanes_load(qv);
    x = tb + 4;
    blocks(V4);
  }
  for (x = V4; x < V; ++x) {
    const double qv = qr[x];
    s = lanes_add0(s, tmp[x] = pos_part(r[x] * inv - qv * qinv));
    qs = lanes_add0(qs, x == t ? 0.0 : qv);
  }
  *qsum = lanes_total(qs);
  return lanes_total(s);
}

// TP / TQ: the element types of target_probs / draft_probs (TQ = TP without draft_probs).
template <typename TP, typename TQ>
void verify_sampling_impl(const int64_t* fc, const int64_t* ns, const int64_t* dt, const TP* pt, const TQ* pq,
                          const double* cn, const double* bv, int64_t B, int64_t n, int64_t V, int64_t max_depth,
                          VerifyMode mode, int64_t* acc, int64_t* al, int64_t* bo) {
  const bool rsd = mode == VerifyMode::Rsd && pq;   // (without draft_probs the two rules coincide)
  // SpecInfer reads float / double draft rows in place; Half / BFloat16 ones are converted into
  // qbuf at the node's first rejection (exact, so the results are those of reading in place)
  constexpr bool q_in_place = std::is_same_v<TQ, float> || std::is_same_v<TQ, double>;
  const bool need_qbuf = pq && (rsd || !q_in_place);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> rbuf(V), tbuf(V), qbuf(need_qbuf ? V : 0);
    double* r = rbuf.data();
    double* tmp = tbuf.data();
    // RSD: the draft residual (unnormalised; Q its sum), see tree.h. SpecInfer on Half /
    // BFloat16: the current node's draft row in double (q_node: the node it holds, -1 none).
    double* qr = qbuf.data();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * n;
      int64_t* row = acc + b * (max_depth + 1);
      int64_t u = 0, k = 0, q_node = -1;
      row[0] = 0;
      // residual <- target_probs[b, node]; returns its sum
      auto load = [&](int64_t node) { return load_row(pt + (o + node) * V, r, V); };
      // RSD: qr <- draft_probs[b, node]; returns its sum
      auto load_q = [&](int64_t node) { return rsd ? load_row(pq + (o + node) * V, qr, V) : 0.0; };
      double S = load(0), Q = load_q(0);
      while (true) {
        int64_t c = fc[o + u], prev = u, got = -1;
        // (links and tokens are validated up front; the guards mirror the CUDA kernel)
        while (residual_usable(S) && link_ok(c, prev, n)) {
          const int64_t t = dt[o + c];
          const double coin = cn[o + c];
          const bool in_vocab = t >= 0 && t < V;   // else: never accepted, residuals unchanged
          // RSD: q_{i-1}(t) = qr[t] / Q; a token without draft-residual mass is a deterministic
          // candidate (the one-hot rule below, q unchanged)
          const double qinv = rsd && residual_usable(Q) ? 1.0 / Q : 0.0;
          const double q_t = rsd && in_vocab ? qr[t] * qinv : 0.0;
          if (in_vocab && rsd && q_t > 0) {
            if (accept_with_q(coin, q_t, r[t], S)) { got = c; break; }
            // p <- max(p - q_{i-1}, 0) (kept only if it has mass), and in the same pass the sum
            // of q without t: q_i = q_{i-1} with t removed
            double qsum;
            const double s2 = rsd_residual(r, qr, 1.0 / S, qinv, t, tmp, V, &qsum);
            if (s2 > 0) {
              std::swap(r, tmp);
              S = s2;
            }
            qr[t] = 0;
            Q = qsum;
          } else if (in_vocab && pq && !rsd) {
            const TQ* q = pq + (o + u) * V;
            if (accept_with_q(coin, prob_to_double(q, t), r[t], S)) { got = c; break; }
            // residual <- max(p - q, 0) with p = r / S (kept unnormalised; S is its sum), one
            // pass into the spare buffer, kept only if it has mass (rounding can empty it)
            double s2;
            if constexpr (q_in_place) {
              s2 = specinfer_residual(r, q, 1.0 / S, tmp, V);
            } else {
              if (q_node != u) {
                load_row(q, qr, V);
                q_node = u;
              }
              s2 = specinfer_residual(r, static_cast<const double*>(qr), 1.0 / S, tmp, V);
            }
            if (s2 > 0) {
              std::swap(r, tmp);
              S = s2;
            }
          } else if (in_vocab) {
            if (accept_one_hot(coin, r[t], S)) { got = c; break; }
            if (S - r[t] > 0) {
              S = S - r[t];
              r[t] = 0;
            }
          }
          prev = c;
          c = ns[o + c];
        }
        if (got < 0 || k >= max_depth) break;
        row[++k] = got;
        u = got;
        S = load(u);
        Q = load_q(u);
      }
      al[b] = k;
      // bonus ~ residual, by inverse CDF: first x with running sum > u * S; if none (rounding,
      // or a residual without usable mass), the last positive entry (0 if none)
      int64_t pick = -1, last_pos = 0;
      if (residual_usable(S)) {
        const double thr = bv[b] * S;
        double run = 0;
        for (int64_t x = 0; x < V; ++x) {
          run += r[x];
          if (run > thr) { pick = x; break; }
        }
      }
      if (pick < 0)
        for (int64_t x = 0; x < V; ++x)
          if (r[x] > 0) last_pos = x;
      bo[b] = pick >= 0 ? pick : last_pos;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sampling(
    const at::Tensor& first_child_in, const at::Tensor& next_sibling_in, const at::Tensor& draft_in,
    const at::Tensor& target_probs_in, const std::optional<at::Tensor>& draft_probs_in,
    const at::Tensor& coins_in, const at::Tensor& bonus_u_in, int64_t max_depth, bool check,
    c10::string_view mode) {
  const auto dims = check_verify_sampling_args(first_child_in, next_sibling_in, draft_in, target_probs_in,
                                               draft_probs_in, coins_in, bonus_u_in, max_depth, mode);
  const int64_t B = dims.B, n = dims.n, V = dims.V;
  auto fcs = long_contig(first_child_in), nss = long_contig(next_sibling_in), draft = long_contig(draft_in);
  // links and tokens always on CPU, probability rows with check
  validate_sampling_values(fcs, nss, draft, target_probs_in, draft_probs_in, V, check);
  // Probabilities are read in their own dtypes, each row when it is visited (converting the whole
  // (B, n, V) tensors would cost more than the verification); arithmetic is in double.
  auto tp = target_probs_in.contiguous();
  auto dp = draft_probs_in.has_value() ? draft_probs_in->contiguous() : at::Tensor();
  auto coins = coins_in.to(at::kDouble).contiguous(), bu = bonus_u_in.to(at::kDouble).contiguous();
  auto opts = fcs.options();
  auto accepted = at::full({B, max_depth + 1}, -1, opts);
  auto accept_len = at::empty({B}, opts);
  auto bonus = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tp.scalar_type(), "tree_verify_sampling_cpu", [&] {
    using TP = scalar_t;
    const auto q_type = dp.defined() ? dp.scalar_type() : tp.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_type, "tree_verify_sampling_cpu", [&] {
      verify_sampling_impl<TP, scalar_t>(fcs.data_ptr<int64_t>(), nss.data_ptr<int64_t>(),
                                         draft.data_ptr<int64_t>(), tp.data_ptr<TP>(),
                                         dp.defined() ? dp.data_ptr<scalar_t>() : nullptr, coins.data_ptr<double>(),
                                         bu.data_ptr<double>(), B, n, V, max_depth, dims.mode,
                                         accepted.data_ptr<int64_t>(), accept_len.data_ptr<int64_t>(),
                                         bonus.data_ptr<int64_t>());
    });
  });
  return {accepted, accept_len, bonus};
}

// ------------------------------------------------------------------------------ dynamic trees

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_frontier(const at::Tensor& cum_in, const at::Tensor& child_in,
                                                               int64_t m) {
  const auto dims = check_select_frontier_args(cum_in, child_in, m);
  const int64_t B = dims.B, F = dims.F, K = dims.K;
  auto cum = cum_in.to(at::kFloat).contiguous(), child = child_in.to(at::kFloat).contiguous();
  auto lopt = cum.options().dtype(at::kLong);
  auto parent = at::empty({B, m}, lopt), rank = at::empty({B, m}, lopt), score = at::empty({B, m}, cum.options());
  const float *cp = cum.data_ptr<float>(), *kp = child.data_ptr<float>();
  int64_t *po = parent.data_ptr<int64_t>(), *ro = rank.data_ptr<int64_t>();
  float* so = score.data_ptr<float>();
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(F * K);
    std::vector<int64_t> idx(F * K);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t f = 0; f < F; ++f)
        for (int64_t k = 0; k < K; ++k) s[f * K + k] = cp[b * F + f] + kp[(b * F + f) * K + k];
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + m, idx.end(),
                        [&](int64_t a, int64_t c) { return rank_before(s[a], a, s[c], c); });
      for (int64_t j = 0; j < m; ++j) {
        po[b * m + j] = idx[j] / K;
        ro[b * m + j] = idx[j] % K;
        so[b * m + j] = s[idx[j]];
      }
    }
  });
  return {parent, rank, score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_tree(const at::Tensor& cum_in, const at::Tensor& parents_in,
                                                           int64_t n) {
  const auto dims = check_select_tree_args(cum_in, parents_in, n);
  const int64_t B = dims.B, T = dims.T;
  auto cum = cum_in.to(at::kFloat).contiguous();
  auto parents = long_contig(parents_in);
  validate_select_tree_values(parents);
  auto lopt = parents.options();
  auto idx = at::empty({B, n}, lopt), newp = at::empty({B, n}, lopt), score = at::empty({B, n}, cum.options());
  const float* cp = cum.data_ptr<float>();
  const int64_t* pp = parents.data_ptr<int64_t>();
  int64_t *io = idx.data_ptr<int64_t>(), *npo = newp.data_ptr<int64_t>();
  float* so = score.data_ptr<float>();
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(T), pos(T);
    for (int64_t b = b0; b < b1; ++b) {
      const float* s = cp + b * T;
      const int64_t* p = pp + b * T;
      std::iota(order.begin(), order.end(), 0);
      // the root first, then by score (ties: lower index)
      std::partial_sort(order.begin(), order.begin() + n, order.end(), [&](int64_t a, int64_t c) {
        if (a == 0 || c == 0) return a == 0 && c != 0;
        return rank_before(s[a], a, s[c], c);
      });
      std::sort(order.begin(), order.begin() + n);
      std::fill(pos.begin(), pos.end(), -1);
      for (int64_t r = 0; r < n; ++r) pos[order[r]] = r;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t j = order[r];
        int64_t a = j > 0 ? p[j] : -1;
        while (a >= 0 && pos[a] < 0) a = p[a];   // nearest kept ancestor
        io[b * n + r] = j;
        npo[b * n + r] = a >= 0 ? pos[a] : -1;
        so[b * n + r] = s[j];
      }
    }
  });
  return {idx, newp, score};
}

}  // namespace
}  // namespace cpu
}  // namespace tree
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("tree_build", &tokenkernels::tree::cpu::build);
  m.impl("tree_paths", &tokenkernels::tree::cpu::paths);
  m.impl("tree_attention", &tokenkernels::tree::cpu::attention);
  m.impl("tree_attention_out", &tokenkernels::tree::cpu::attention_out);
  m.impl("tree_verify_greedy", &tokenkernels::tree::cpu::verify_greedy);
  m.impl("tree_verify_sampling", &tokenkernels::tree::cpu::verify_sampling);
  m.impl("tree_select_frontier", &tokenkernels::tree::cpu::select_frontier);
  m.impl("tree_select_tree", &tokenkernels::tree::cpu::select_tree);
}
