// tree family: CUDA device code (torch-free). Launchers: csrc/tree/tree_kernels.cu.
//
// Indexing conventions:
//   * one-block-per-tree kernels (build, paths, verify_sampling, select_*): b = blockIdx.x;
//   * attention: the request (and KV head) and the row block share blockIdx.x (plus a launch
//     offset `block0`: the launcher splits grids past the x limit), so any B works; the prefix
//     split is blockIdx.y (<= 64). One warp per query row (b, i, hq); row r of the (n * Hq) rows of request b is
//     i = r / Hq, hq = r % Hq, and its KV head is h = hq / G (G = Hq / Hkv). Inside a warp, lane
//     l holds head-dim elements l, l + 32, ..., l + 32 * (DL - 1) (D = 32 * DL), so K/V rows
//     are read with coalesced 32-lane loads and a dot product is DL FMAs + a warp reduction.
//   * cache position pos of request b lives at slot (paged) table[b][pos / page_size] *
//     page_size + pos % page_size, (contiguous) b * N_max + pos; element (slot, h, d) at
//     ((slot * Hkv + h) * D + d).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "tokenkernels/reduce.cuh"
#include "tokenkernels/tree.h"
#include "tokenkernels/convert.cuh"

namespace tokenkernels {
namespace tree {
namespace device {
using namespace ::tokenkernels::device;   // shared device helpers: convert.cuh, reduce.cuh

using tokenkernels::device::from_f;
using tokenkernels::device::to_f;

// Prefix length of request b clamped to what the cache can hold in front of its L tree tokens
// (prefix_lens are not validated on CUDA, which would need a host sync; this keeps reads in
// bounds for a wrong value).
__device__ __forceinline__ int64_t prefix_len(const AttnProblem& p, int64_t b, int64_t L) {
  const int64_t P = p.prefix_lens[b], cap = p.max_prefix - L;
  return P < 0 ? 0 : (P > cap ? (cap < 0 ? 0 : cap) : P);
}

__device__ __forceinline__ int64_t tree_len(const int64_t* lens, int64_t b, int64_t n) {
  return lens ? clamp_len(lens[b], n) : n;
}

// Tree keys of request b that lie inside the cache: all L of them unless the tree alone is
// longer than the cache (unvalidated tree_lens); keys past it are skipped.
__device__ __forceinline__ int64_t tree_keys(const AttnProblem& p, int64_t P, int64_t L) {
  return L < p.max_prefix - P ? L : p.max_prefix - P;
}

// ------------------------------------------------------------------------------------ build
// grid = B, block = up to 1024 threads, dynamic shared memory:
//   int sh_par[n], int sh_fc[n] (+ int keys[npow2] for the sorted variant).
// Step 1: effective parents (tree.h: invalid ones -> -1, checked in int64 before the narrowing)
// -> shared, first_child <- -1, next_sibling <- -1 for the nodes no child list links (root,
// padding, detached nodes). Step 2: every node walks its ancestors in shared
// memory, writing its mask row word by word (ancestors come in decreasing index order, so the
// words are produced from high to low) and its depth. Step 3: child lists, either
//   plain : node i scans forward for the next node with the same parent (O(n) per thread), and
//           atomicMin gives each parent its first child; or
//   sorted: keys parent * n + i are bitonic-sorted block-wide; consecutive keys with the same
//           parent are consecutive siblings, the first key of each group is the first child.
template <bool kSorted>
__global__ void __launch_bounds__(1024) build_kernel(const int64_t* __restrict__ parents,
                                                     const int64_t* __restrict__ lens, int64_t n,
                                                     int npow2, uint32_t* __restrict__ mask,
                                                     int64_t* __restrict__ depth,
                                                     int64_t* __restrict__ first_child,
                                                     int64_t* __restrict__ next_sibling) {
  extern __shared__ int smem_i[];
  int* sh_par = smem_i;
  int* sh_fc = smem_i + n;
  int* keys = smem_i + 2 * n;   // sorted variant only
  const int64_t b = blockIdx.x;
  const int64_t L = tree_len(lens, b, n);
  const int64_t W = mask_words(n);
  const int64_t* par = parents + b * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int p = i < L ? static_cast<int>(effective_parent(par[i], i)) : -1;   // in [-1, i)
    sh_par[i] = p;
    sh_fc[i] = i < L ? 0x7fffffff : -1;   // "no child yet" for real nodes (atomicMin target)
    if (p < 0) next_sibling[b * n + i] = -1;   // the only write of this entry
  }
  __syncthreads();

  // mask rows and depths
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    uint32_t* row = mask + (b * n + i) * W;
    if (i >= L) {
      for (int64_t w = 0; w < W; ++w) row[w] = 0u;
      depth[b * n + i] = 0;
      continue;
    }
    const int64_t top = i >> 5;
    for (int64_t w = top + 1; w < W; ++w) row[w] = 0u;   // words past the node itself
    int64_t cur_w = top;
    uint32_t acc = 0u;
    int64_t d = -1;
    // effective parents strictly decrease: the walk ends, and stays inside the tree
    for (int j = static_cast<int>(i); j >= 0; j = sh_par[j]) {
      const int64_t w = j >> 5;
      while (cur_w > w) {   // flush finished words (possibly empty ones in between)
        row[cur_w--] = acc;
        acc = 0u;
      }
      acc |= 1u << (j & 31);
      ++d;
    }
    while (cur_w >= 0) {
      row[cur_w--] = acc;
      acc = 0u;
    }
    depth[b * n + i] = d;
  }

  // child lists
  if (!kSorted) {
    for (int64_t i = 1 + threadIdx.x; i < L; i += blockDim.x) {
      const int p = sh_par[i];
      if (p < 0) continue;   // detached node: not linked (next_sibling written in step 1)
      atomicMin(&sh_fc[p], static_cast<int>(i));
      int64_t nxt = -1;
      for (int64_t j = i + 1; j < L; ++j)
        if (sh_par[j] == p) {
          nxt = j;
          break;
        }
      next_sibling[b * n + i] = nxt;
    }
  } else {
    const int kNone = 0x7fffffff;
    for (int k = threadIdx.x; k < npow2; k += blockDim.x)
      keys[k] = (k >= 1 && k < L && sh_par[k] >= 0) ? sh_par[k] * static_cast<int>(n) + k : kNone;
    __syncthreads();
    // bitonic sort, ascending; thread t handles the pair (pos, pos + stride) with pos having the
    // `stride` bit clear: pos = 2t - (t mod stride).
    for (int size = 2; size <= npow2; size <<= 1)
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        for (int t = threadIdx.x; t < npow2 / 2; t += blockDim.x) {
          const int pos = 2 * t - (t & (stride - 1));
          const int a = keys[pos], c = keys[pos + stride];
          const bool asc = (pos & size) == 0;
          if ((a > c) == asc) {
            keys[pos] = c;
            keys[pos + stride] = a;
          }
        }
        __syncthreads();
      }
    for (int k = threadIdx.x; k < npow2; k += blockDim.x) {
      const int key = keys[k];
      if (key == kNone) continue;
      const int node = key % static_cast<int>(n), p = key / static_cast<int>(n);
      const int nk = k + 1 < npow2 ? keys[k + 1] : kNone;
      next_sibling[b * n + node] = (nk != kNone && nk / static_cast<int>(n) == p) ? nk % static_cast<int>(n) : -1;
      if (k == 0 || keys[k - 1] / static_cast<int>(n) != p) sh_fc[p] = node;   // one writer per parent
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int f = sh_fc[i];
    first_child[b * n + i] = (f == 0x7fffffff || f < 0) ? -1 : f;
  }
}

// ------------------------------------------------------------------------------------ paths
// grid = B, block = 256. Every thread owns a contiguous chunk of nodes; leaf counts per chunk
// are scanned block-wide (Hillis-Steele in shared memory) to give each leaf its rank, then each
// leaf walks up its ancestors writing its path. The output of the tree is pre-filled with -1.
// The walk follows effective parents (tree.h), so unvalidated parents (build check=False, or a
// direct call) end it instead of looping or reading past the tree; depths outside [0, D_max]
// are not written.
__global__ void __launch_bounds__(256) paths_kernel(const int64_t* __restrict__ parents,
                                                    const int64_t* __restrict__ depth,
                                                    const int64_t* __restrict__ first_child,
                                                    const int64_t* __restrict__ lens, int64_t n,
                                                    int64_t L_max, int64_t D_max,
                                                    int64_t* __restrict__ paths) {
  __shared__ int64_t scan[256];
  const int64_t b = blockIdx.x;
  const int64_t L = tree_len(lens, b, n);
  const int64_t Dp = D_max + 1;
  int64_t* out = paths + b * L_max * Dp;
  for (int64_t e = threadIdx.x; e < L_max * Dp; e += blockDim.x) out[e] = -1;
  const int64_t per = (L + blockDim.x - 1) / blockDim.x;
  const int64_t i0 = threadIdx.x * per, i1 = i0 + per < L ? i0 + per : L;
  int64_t cnt = 0;
  for (int64_t i = i0; i < i1; ++i) cnt += first_child[b * n + i] < 0;
  scan[threadIdx.x] = cnt;
  __syncthreads();
  for (int off = 1; off < static_cast<int>(blockDim.x); off <<= 1) {   // inclusive scan
    const int64_t v = threadIdx.x >= static_cast<unsigned>(off) ? scan[threadIdx.x - off] : 0;
    __syncthreads();
    scan[threadIdx.x] += v;
    __syncthreads();
  }
  int64_t rank = scan[threadIdx.x] - cnt;   // exclusive
  for (int64_t i = i0; i < i1; ++i) {
    if (first_child[b * n + i] >= 0) continue;
    if (rank < L_max)
      for (int64_t j = i; j >= 0; j = effective_parent(parents[b * n + j], j)) {
        const int64_t d = depth[b * n + j];
        if (d >= 0 && d <= D_max) out[rank * Dp + d] = j;
      }
    ++rank;
  }
}

// -------------------------------------------------------------------------------- attention
// pos < max_prefix always (callers clamp), so the table column is < max_pages; the page index
// itself is clamped into [0, num_pages) (validated on the host only with check=True).
template <typename T>
struct Cache {
  const T* base;
  const int64_t* table;
  int64_t N_max, page_size, max_pages, num_pages, Hkv, D;
  __device__ __forceinline__ const T* row(int64_t b, int64_t pos, int64_t h) const {
    int64_t slot;
    if (table) {
      int64_t page = table[b * max_pages + pos / page_size];
      page = page < 0 ? 0 : (page >= num_pages ? num_pages - 1 : page);
      slot = page * page_size + pos % page_size;
    } else {
      slot = b * N_max + pos;
    }
    return base + (slot * Hkv + h) * D;
  }
};

template <typename T>
__device__ __forceinline__ Cache<T> make_cache(const AttnProblem& p, const void* base) {
  return Cache<T>{static_cast<const T*>(base), p.block_table, p.N_max, p.page_size, p.max_pages,
                  p.num_pages, p.Hkv, p.D};
}

// Online-softmax state of one query row, distributed over a warp (DL dims per lane).
template <int DL>
struct RowState {
  float q[DL], o[DL];
  float m, l;
  __device__ __forceinline__ void init() {
    m = -INFINITY;
    l = 0.f;
#pragma unroll
    for (int t = 0; t < DL; ++t) o[t] = 0.f;
  }
  // Add one key whose K/V elements for this lane are kf[t], vf[t]; all lanes get the same s.
  __device__ __forceinline__ void add(const float (&kf)[DL], const float (&vf)[DL]) {
    float s = 0.f;
#pragma unroll
    for (int t = 0; t < DL; ++t) s += q[t] * kf[t];
    s = warp_sum_f(s);
    const float m_new = fmaxf(m, s);
    const float corr = __expf(m - m_new);   // 0 on the first key (m = -inf)
    const float pr = __expf(s - m_new);
    l = l * corr + pr;
#pragma unroll
    for (int t = 0; t < DL; ++t) o[t] = o[t] * corr + pr * vf[t];
    m = m_new;
  }
  __device__ __forceinline__ float lse() const { return l > 0.f ? m + __logf(l) : -INFINITY; }
};

template <typename T, int DL>
__device__ __forceinline__ void load_q(const AttnProblem& p, int64_t b, int64_t i, int64_t hq,
                                       RowState<DL>& st) {
  const T* qr = static_cast<const T*>(p.q) + ((b * p.n + i) * p.Hq + hq) * p.D;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < DL; ++t) st.q[t] = to_f(qr[lane + 32 * t]) * p.scale;
}

// Split-KV prefix pass, plain: grid (B * RB, splits) with RB = ceil(n*Hq / 4) row blocks per
// request, 128 threads, one warp per row, K/V straight from global memory. Writes the split's
// normalised partial output and its lse.
template <typename T, int DL>
__global__ void __launch_bounds__(128) prefix_plain_kernel(AttnProblem p, int64_t chunk, int64_t block0,
                                                           float* __restrict__ part_o,
                                                           float* __restrict__ part_lse) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t RB = (p.n * p.Hq + 3) / 4, blk = block0 + blockIdx.x;
  const int64_t s = blockIdx.y, b = blk / RB;
  const int64_t r = (blk % RB) * 4 + warp;
  if (r >= p.n * p.Hq) return;
  const int64_t i = r / p.Hq, hq = r % p.Hq, h = hq / (p.Hq / p.Hkv);
  const int64_t L = tree_len(p.tree_lens, b, p.n);
  if (i >= L) return;   // padding rows: the merge writes zeros
  const int64_t P = prefix_len(p, b, L);
  const int64_t k0 = s * chunk, k1 = (s + 1) * chunk < P ? (s + 1) * chunk : P;
  RowState<DL> st;
  st.init();
  load_q<T, DL>(p, b, i, hq, st);
  const Cache<T> K = make_cache<T>(p, p.k), V = make_cache<T>(p, p.v);
  for (int64_t pos = k0; pos < k1; ++pos) {
    const T* kr = K.row(b, pos, h);
    const T* vr = V.row(b, pos, h);
    float kf[DL], vf[DL];
#pragma unroll
    for (int t = 0; t < DL; ++t) {
      kf[t] = to_f(kr[lane + 32 * t]);
      vf[t] = to_f(vr[lane + 32 * t]);
    }
    st.add(kf, vf);
  }
  const int64_t row = (s * p.B + b) * p.n * p.Hq + r;
  const float inv = st.l > 0.f ? 1.f / st.l : 0.f;
#pragma unroll
  for (int t = 0; t < DL; ++t) part_o[row * p.D + lane + 32 * t] = st.o[t] * inv;
  if (lane == 0) part_lse[row] = st.lse();
}

// Split-KV prefix pass, tuned: grid (B * Hkv * RB, splits) with RB = ceil(n*G / kRows) row
// blocks per (request, KV head), 256 threads (8 warps).
// The block serves kRows = 32 query rows of one KV head (4 per warp); K/V tiles of KT keys are
// staged once in shared memory (fp32, converted once) and reused by all 32 rows, so the cache is
// read from global memory once per 32 rows instead of once per row.
template <typename T, int DL>
__global__ void __launch_bounds__(256) prefix_tuned_kernel(AttnProblem p, int64_t chunk, int64_t block0,
                                                           float* __restrict__ part_o,
                                                           float* __restrict__ part_lse) {
  constexpr int kRowsPerWarp = 4, kRows = 8 * kRowsPerWarp;
  constexpr int D = 32 * DL, KT = 128 / DL;   // KT * D = 4096 floats per tile (16 KiB)
  __shared__ float sk[KT * D], sv[KT * D];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t G = p.Hq / p.Hkv;
  const int64_t RB = (p.n * G + kRows - 1) / kRows, blk = block0 + blockIdx.x;
  const int64_t rb = blk % RB, bh = blk / RB;
  const int64_t s = blockIdx.y;
  const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
  const int64_t L = tree_len(p.tree_lens, b, p.n);
  const int64_t P = prefix_len(p, b, L);
  const int64_t k0 = s * chunk, k1 = (s + 1) * chunk < P ? (s + 1) * chunk : P;
  // rows of this KV head: rr = i * G + g  ->  query token i, head h * G + g
  RowState<DL> st[kRowsPerWarp];
  bool live[kRowsPerWarp];
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w) {
    const int64_t rr = rb * kRows + warp * kRowsPerWarp + w;
    const int64_t i = rr / G;
    live[w] = i < L;
    st[w].init();
    if (live[w]) load_q<T, DL>(p, b, i, h * G + rr % G, st[w]);
  }
  const Cache<T> K = make_cache<T>(p, p.k), V = make_cache<T>(p, p.v);
  for (int64_t t0 = k0; t0 < k1; t0 += KT) {
    const int kn = static_cast<int>(k1 - t0 < KT ? k1 - t0 : KT);
    __syncthreads();   // previous tile fully consumed
    for (int e = threadIdx.x; e < kn * D; e += blockDim.x) {
      const int key = e / D, d = e % D;
      sk[e] = to_f(K.row(b, t0 + key, h)[d]);
      sv[e] = to_f(V.row(b, t0 + key, h)[d]);
    }
    __syncthreads();
    for (int key = 0; key < kn; ++key) {
      float kf[DL], vf[DL];
#pragma unroll
      for (int t = 0; t < DL; ++t) {
        kf[t] = sk[key * D + lane + 32 * t];
        vf[t] = sv[key * D + lane + 32 * t];
      }
#pragma unroll
      for (int w = 0; w < kRowsPerWarp; ++w)
        if (live[w]) st[w].add(kf, vf);
    }
  }
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w) {
    if (!live[w]) continue;
    const int64_t rr = rb * kRows + warp * kRowsPerWarp + w;
    const int64_t i = rr / G, hq = h * G + rr % G;
    const int64_t row = (s * p.B + b) * p.n * p.Hq + i * p.Hq + hq;
    const float inv = st[w].l > 0.f ? 1.f / st[w].l : 0.f;
#pragma unroll
    for (int t = 0; t < DL; ++t) part_o[row * p.D + lane + 32 * t] = st[w].o[t] * inv;
    if (lane == 0) part_lse[row] = st[w].lse();
  }
}

// Tree part + merge: grid B * RB (RB = ceil(n*Hq / 4)), 128 threads, one warp per row (i, hq).
// The row's tree keys are the set bits j < tree_keys of its mask row (visited word by word with __ffs, so only
// ancestors are read); the result is merged with the `splits` prefix partials by log-sum-exp and
// written in the output dtype together with the row's lse.
template <typename T, int DL>
__global__ void __launch_bounds__(128) tree_merge_kernel(AttnProblem p, int64_t splits, int64_t block0,
                                                         const float* __restrict__ part_o,
                                                         const float* __restrict__ part_lse) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t RB = (p.n * p.Hq + 3) / 4, blk = block0 + blockIdx.x;
  const int64_t b = blk / RB;
  const int64_t r = (blk % RB) * 4 + warp;
  if (r >= p.n * p.Hq) return;
  const int64_t i = r / p.Hq, hq = r % p.Hq, h = hq / (p.Hq / p.Hkv);
  const int64_t L = tree_len(p.tree_lens, b, p.n);
  T* out = static_cast<T*>(p.out) + ((b * p.n + i) * p.Hq + hq) * p.D;
  float* lse_out = p.lse + (b * p.n + i) * p.Hq + hq;
  if (i >= L) {
#pragma unroll
    for (int t = 0; t < DL; ++t) out[lane + 32 * t] = from_f<T>(0.f);
    if (lane == 0) *lse_out = -INFINITY;
    return;
  }
  const int64_t P = prefix_len(p, b, L), Lk = tree_keys(p, P, L);
  RowState<DL> st;
  st.init();
  load_q<T, DL>(p, b, i, hq, st);
  const Cache<T> K = make_cache<T>(p, p.k), V = make_cache<T>(p, p.v);
  const int64_t W = mask_words(p.n);
  const int32_t* mrow = p.mask + (b * p.n + i) * W;
  for (int64_t w = 0; w * 32 < Lk; ++w) {
    uint32_t bits = static_cast<uint32_t>(mrow[w]);
    if ((w + 1) * 32 > Lk) bits &= (1u << (Lk - w * 32)) - 1u;   // keys past the tree length
    while (bits) {
      const int64_t j = w * 32 + __ffs(bits) - 1;
      bits &= bits - 1u;
      const T* kr = K.row(b, P + j, h);
      const T* vr = V.row(b, P + j, h);
      float kf[DL], vf[DL];
#pragma unroll
      for (int t = 0; t < DL; ++t) {
        kf[t] = to_f(kr[lane + 32 * t]);
        vf[t] = to_f(vr[lane + 32 * t]);
      }
      st.add(kf, vf);
    }
  }
  // merge: parts = tree part (normalised) + every split
  const float lse_t = st.lse();
  float M = lse_t;
  for (int64_t s = 0; s < splits; ++s) M = fmaxf(M, part_lse[(s * p.B + b) * p.n * p.Hq + r]);
  const float Ms = M == -INFINITY ? 0.f : M;
  float den = 0.f, acc[DL];
  {
    const float wt = __expf(lse_t - Ms);
    const float inv = st.l > 0.f ? 1.f / st.l : 0.f;
    den += wt;
#pragma unroll
    for (int t = 0; t < DL; ++t) acc[t] = wt * st.o[t] * inv;
  }
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t row = (s * p.B + b) * p.n * p.Hq + r;
    const float ws = __expf(part_lse[row] - Ms);   // 0 for empty splits (lse = -inf)
    if (ws == 0.f) continue;
    den += ws;
#pragma unroll
    for (int t = 0; t < DL; ++t) acc[t] += ws * part_o[row * p.D + lane + 32 * t];
  }
  const float inv_den = den > 0.f ? 1.f / den : 0.f;
#pragma unroll
  for (int t = 0; t < DL; ++t) out[lane + 32 * t] = from_f<T>(acc[t] * inv_den);
  if (lane == 0) *lse_out = den > 0.f ? Ms + __logf(den) : -INFINITY;
}

// ----------------------------------------------------------------------------------- verify
// One thread per tree: the greedy walk (first child whose token equals the target arg-max).
// Links are followed only while they point forward (link_ok), so corrupt ones end the walk.
__global__ void __launch_bounds__(128) verify_greedy_kernel(const int64_t* __restrict__ fc,
                                                            const int64_t* __restrict__ ns,
                                                            const int64_t* __restrict__ draft,
                                                            const int64_t* __restrict__ argmax,
                                                            int64_t B, int64_t n, int64_t max_depth,
                                                            int64_t* __restrict__ accepted,
                                                            int64_t* __restrict__ accept_len,
                                                            int64_t* __restrict__ bonus) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * n;
  int64_t* row = accepted + b * (max_depth + 1);
  for (int64_t k = 0; k <= max_depth; ++k) row[k] = -1;
  row[0] = 0;
  int64_t u = 0, k = 0;
  while (k < max_depth) {
    const int64_t want = argmax[o + u];
    int64_t c = fc[o + u], prev = u;
    while (link_ok(c, prev, n) && draft[o + c] != want) {
      prev = c;
      c = ns[o + c];
    }
    if (!link_ok(c, prev, n)) break;
    row[++k] = c;
    u = c;
  }
  accept_len[b] = k;
  bonus[b] = argmax[o + u];
}

// Block-wide double sum, every thread gets the result (contains barriers).
__device__ __forceinline__ double block_sum_d(double v, double* sh) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double t = 0;
  for (int w = 0; w < nw; ++w) t += sh[w];   // same order in every thread: identical results
  return t;
}

// Stochastic verification, one block (256 threads) per tree; the residual r (V doubles) lives in
// the workspace row of the tree. Every decision is computed identically by all threads from
// block-reduced values, so the control flow stays uniform. The arithmetic is the CPU kernel's
// (fp64 residual, r * (1 / S) updates, the new S = the sum of the stored values), so CPU and CUDA
// decisions agree up to the summation order of S (and Q). P: the probabilities' type (float or
// double). qwork: nullptr for SpecInfer's rule; for RSD (VerifyMode::Rsd with draft_probs, tree.h)
// B*V doubles, the draft residual qr of each tree (Q its sum).
template <typename P>
__global__ void __launch_bounds__(256) verify_sampling_kernel(
    const int64_t* __restrict__ fc, const int64_t* __restrict__ ns, const int64_t* __restrict__ draft,
    const P* __restrict__ tp, const P* __restrict__ dp, const double* __restrict__ coins,
    const double* __restrict__ bonus_u, int64_t n, int64_t V, int64_t max_depth,
    int64_t* __restrict__ accepted, int64_t* __restrict__ accept_len, int64_t* __restrict__ bonus,
    double* __restrict__ work, double* __restrict__ qwork) {
  __shared__ double sh[32];
  __shared__ long long sh_pick;
  const int64_t b = blockIdx.x, o = b * n;
  double* r = work + b * V;
  const bool rsd = qwork != nullptr && dp != nullptr;
  double* qr = rsd ? qwork + b * V : nullptr;
  int64_t* row = accepted + b * (max_depth + 1);
  for (int64_t k = threadIdx.x; k <= max_depth; k += blockDim.x) row[k] = k == 0 ? 0 : -1;
  auto load = [&](int64_t node) {   // r <- target_probs[b, node]; returns the sum
    __syncthreads();   // every thread is done reading the previous residual
    const P* src = tp + (o + node) * V;
    double s = 0;
    for (int64_t x = threadIdx.x; x < V; x += blockDim.x) s += (r[x] = static_cast<double>(src[x]));
    return block_sum_d(s, sh);   // its barriers also publish r
  };
  auto load_q = [&](int64_t node) {   // RSD: qr <- draft_probs[b, node]; returns the sum
    if (!rsd) return 0.0;             // (uniform: every thread returns here or none)
    __syncthreads();   // every thread is done reading the previous draft residual
    const P* src = dp + (o + node) * V;
    double s = 0;
    for (int64_t x = threadIdx.x; x < V; x += blockDim.x) s += (qr[x] = static_cast<double>(src[x]));
    return block_sum_d(s, sh);   // its barriers also publish qr
  };
  double S = load(0), Q = load_q(0);
  int64_t u = 0, k = 0;
  while (true) {
    int64_t c = fc[o + u], prev = u, got = -1;
    while (residual_usable(S) && link_ok(c, prev, n)) {
      const int64_t t = draft[o + c];
      const double coin = coins[o + c];
      // RSD: q_{i-1}(t) = qr[t] / Q; a token without draft-residual mass is a deterministic
      // candidate (the one-hot branch below, q unchanged). The same values in every thread.
      const bool in_vocab = t >= 0 && t < V;
      const double qinv = rsd && residual_usable(Q) ? 1.0 / Q : 0.0;
      const double q_t = rsd && in_vocab ? qr[t] * qinv : 0.0;
      if (in_vocab && rsd && q_t > 0) {
        if (accept_with_q(coin, q_t, r[t], S)) { got = c; break; }
        // p <- max(p - q_{i-1}, 0) (kept only if it has mass) and the sum of q without t; the
        // same element split (x strided by thread) for the sums and the writes, so each thread
        // writes only what it read itself
        const double inv = 1.0 / S;
        double s2 = 0, qs = 0;
        for (int64_t x = threadIdx.x; x < V; x += blockDim.x) {
          s2 += pos_part(r[x] * inv - qr[x] * qinv);
          qs += x == t ? 0.0 : qr[x];
        }
        s2 = block_sum_d(s2, sh);   // its barriers: every thread has read r[t] and qr[t]
        qs = block_sum_d(qs, sh);
        for (int64_t x = threadIdx.x; x < V; x += blockDim.x) {
          if (s2 > 0) r[x] = pos_part(r[x] * inv - qr[x] * qinv);   // the values summed above
          if (x == t) qr[x] = 0.0;
        }
        if (s2 > 0) S = s2;
        Q = qs;
        __syncthreads();   // publish r and qr
      } else if (in_vocab) {   // out-of-range tokens (check=False): never accepted, r unchanged
        if (dp && !rsd) {
          const P* q = dp + (o + u) * V;
          if (accept_with_q(coin, static_cast<double>(q[t]), r[t], S)) { got = c; break; }
          const double inv = 1.0 / S;
          double s2 = 0;
          for (int64_t x = threadIdx.x; x < V; x += blockDim.x)
            s2 += pos_part(r[x] * inv - static_cast<double>(q[x]));
          s2 = block_sum_d(s2, sh);   // its barriers: every thread has read r[t]
          if (s2 > 0) {               // kept only if it has mass (rounding can empty it)
            for (int64_t x = threadIdx.x; x < V; x += blockDim.x)
              r[x] = pos_part(r[x] * inv - static_cast<double>(q[x]));   // the values summed above
            S = s2;
            __syncthreads();   // publish r
          }
        } else {
          const double rt = r[t];
          if (accept_one_hot(coin, rt, S)) { got = c; break; }
          if (S - rt > 0) {
            S -= rt;
            __syncthreads();   // every thread has read r[t]
            if (threadIdx.x == 0) r[t] = 0.0;
            __syncthreads();
          }
        }
      }
      prev = c;
      c = ns[o + c];
    }
    if (got < 0 || k >= max_depth) break;
    ++k;
    if (threadIdx.x == 0) row[k] = got;
    u = got;
    S = load(u);
    Q = load_q(u);
  }
  // bonus ~ r by inverse CDF: thread chunks, block exclusive scan of chunk sums, then the first
  // crossing index (block minimum); if none (rounding, or a residual without usable mass), the
  // last positive entry (0 if none).
  const int64_t per = (V + blockDim.x - 1) / blockDim.x;
  const int64_t x0 = threadIdx.x * per, x1 = x0 + per < V ? x0 + per : V;
  const bool usable = residual_usable(S);
  double local = 0;
  for (int64_t x = x0; x < x1; ++x) local += r[x];
  __shared__ double pre[256];
  pre[threadIdx.x] = local;
  if (threadIdx.x == 0) sh_pick = 0x7fffffffffffffffll;
  __syncthreads();
  if (threadIdx.x == 0) {   // serial exclusive scan over <= 256 chunk sums (cheap, deterministic)
    double run = 0;
    for (unsigned t = 0; t < blockDim.x; ++t) {
      const double v = pre[t];
      pre[t] = run;
      run += v;
    }
  }
  __syncthreads();
  if (usable) {
    const double thr = bonus_u[b] * S;
    double run = pre[threadIdx.x];
    for (int64_t x = x0; x < x1; ++x) {
      run += r[x];
      if (run > thr) {
        atomicMin(&sh_pick, static_cast<long long>(x));
        break;
      }
    }
  }
  __syncthreads();
  if (sh_pick == 0x7fffffffffffffffll) {
    long long last = 0;
    for (int64_t x = x0; x < x1; ++x)
      if (r[x] > 0) last = x;
    __syncthreads();
    if (threadIdx.x == 0) sh_pick = 0;
    __syncthreads();
    atomicMax(&sh_pick, last);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    accept_len[b] = k;
    bonus[b] = sh_pick;
  }
}

// ---------------------------------------------------------------------------- dynamic trees
// select_frontier: grid B, 256 threads; scores in shared memory; each candidate's rank is the
// number of candidates that rank before it (O((F*K)^2 / threads), fine for F*K in the hundreds).
__global__ void __launch_bounds__(256) select_frontier_kernel(const float* __restrict__ cum,
                                                              const float* __restrict__ child, int64_t F,
                                                              int64_t K, int64_t m, int64_t* __restrict__ parent,
                                                              int64_t* __restrict__ rank_out,
                                                              float* __restrict__ score) {
  extern __shared__ float sc[];
  const int64_t b = blockIdx.x, E = F * K;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) sc[e] = cum[b * F + e / K] + child[b * E + e];
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t rk = 0;
    for (int64_t f = 0; f < E && rk < m; ++f) rk += rank_before(sc[f], f, sc[e], e);
    if (rk < m) {
      parent[b * m + rk] = e / K;
      rank_out[b * m + rk] = e % K;
      score[b * m + rk] = sc[e];
    }
  }
}

// select_tree: grid B, 256 threads; shared: scores (T floats), kept position (T ints). Rank by
// score (root forced first), keep rank < n, position = kept nodes before it, then each kept node
// walks up to its nearest kept ancestor.
__global__ void __launch_bounds__(256) select_tree_kernel(const float* __restrict__ cum,
                                                          const int64_t* __restrict__ parents, int64_t T,
                                                          int64_t n, int64_t* __restrict__ idx,
                                                          int64_t* __restrict__ new_parents,
                                                          float* __restrict__ score) {
  extern __shared__ float smem_f[];
  float* sc = smem_f;
  int* pos = reinterpret_cast<int*>(smem_f + T);
  const int64_t b = blockIdx.x;
  for (int64_t e = threadIdx.x; e < T; e += blockDim.x) sc[e] = e == 0 ? INFINITY : cum[b * T + e];
  __syncthreads();
  for (int64_t e = threadIdx.x; e < T; e += blockDim.x) {
    int64_t rk = 0;
    for (int64_t f = 0; f < T && rk < n; ++f) rk += rank_before(sc[f], f, sc[e], e);
    pos[e] = rk < n ? 1 : 0;
  }
  __syncthreads();
  // position among kept nodes (O(T) per node; T is at most a few thousand)
  int mypos[16];
  int cntl = 0;
  for (int64_t e = threadIdx.x; e < T; e += blockDim.x) {
    int c = 0;
    if (pos[e])
      for (int64_t f = 0; f < e; ++f) c += pos[f];
    if (cntl < 16) mypos[cntl] = pos[e] ? c : -1;
    ++cntl;
  }
  __syncthreads();
  cntl = 0;
  for (int64_t e = threadIdx.x; e < T; e += blockDim.x) {
    pos[e] = mypos[cntl < 16 ? cntl : 15];
    ++cntl;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < T; e += blockDim.x) {
    const int r = pos[e];
    if (r < 0) continue;
    int64_t a = e > 0 ? parents[b * T + e] : -1;
    while (a >= 0 && pos[a] < 0) a = parents[b * T + a];
    idx[b * n + r] = e;
    new_parents[b * n + r] = a >= 0 ? pos[a] : -1;
    score[b * n + r] = cum[b * T + e];
  }
}

}  // namespace device
}  // namespace tree
}  // namespace tokenkernels
