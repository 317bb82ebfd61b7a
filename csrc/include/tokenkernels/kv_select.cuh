// kv_select family: CUDA device code (torch-free). Launchers: csrc/kv_select/kv_select_kernels.cu.
//
// Conventions:
//   * a cache is (pages, slots, H_kv, D) with element strides CacheStrides; token n of request b
//     starts at token_offset(L, s, b, n) (kv_select.h), -1 when its page is out of range;
//   * q is fp32, already multiplied by the logit scale (the adapter does it with ATen);
//   * every kernel skips tokens that are out of range (n < 0, n >= seq_len, bad page) instead of
//     reading them, so unchecked bad inputs cannot cause out-of-bounds reads;
//   * no kernel synchronises with the host; workspaces come from the caller.
#pragma once
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "tokenkernels/kv_select.h"
#include "tokenkernels/convert.cuh"
#include "tokenkernels/reduce.cuh"

namespace tokenkernels {
namespace kv_select {
namespace device {
using namespace ::tokenkernels::device;   // shared device helpers: convert.cuh, reduce.cuh

constexpr int kMaxD = 256;                 // head_dim limit of the CUDA kernels
constexpr int kRegsPerLane = kMaxD / 32;   // key elements a lane holds
constexpr int kMaxG = 16;                  // q-heads per KV head limit (GQA group)

using tokenkernels::device::from_f;
using tokenkernels::device::to_f;

__device__ __forceinline__ float warp_max_f(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// A warp loads one key row: lane holds elements d = lane + 32 i (0 beyond D).
template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ p, int64_t sdim, int D,
                                         float (&r)[kRegsPerLane]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kRegsPerLane; ++i) {
    const int d = lane + 32 * i;
    r[i] = d < D ? to_f(p[d * sdim]) : 0.0f;
  }
}

// <q_row, key> over the warp; every lane gets the result. q_row in shared memory (D floats).
__device__ __forceinline__ float warp_dot(const float* q_row, const float (&r)[kRegsPerLane], int D) {
  const int lane = threadIdx.x & 31;
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kRegsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < D) s = fmaf(q_row[d], r[i], s);
  }
  return warp_sum_f(s);
}

// =============================================================================== score
// Pass 1 (score_logits_kernel): grid (ceil(N_max / kScoreTok), B), 256 threads = 8 warps; warp w
// scores tokens n0 + w*8 .. n0 + w*8 + 7, each against all H_q heads (the key row of KV head g
// is read once, by one warp, and dotted with the G q-heads of its group). The block's logits
// (kScoreTok x H_q) stay in shared memory for the block's per-head (max, sum exp) partials and
// are written to logits[b][h][n]. Dynamic shared memory: (H_q * D + kScoreTok * H_q) floats.
constexpr int kScoreTok = 64;
constexpr int kScoreThreads = 256;

// The end of both pass-1 kernels, after the block's logits lg (kScoreTok x H_q, shared memory)
// are complete and a barrier has passed: write them to logits[b][h][n] ((h, n) order, so
// consecutive threads write consecutive tokens) and the per-head partial (max, sum exp) of the
// block's tokens (warp per head) to pstat[b][h][blk].
__device__ __forceinline__ void score_block_tail(const float* lg, int H_q, int b, int blk, int nblk,
                                                 int64_t n0, int64_t N, float* __restrict__ logits,
                                                 float2* __restrict__ pstat) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int i = threadIdx.x; i < kScoreTok * H_q; i += blockDim.x) {
    const int h = i / kScoreTok, tl = i % kScoreTok;
    const int64_t n = n0 + tl;
    if (n < N) logits[(static_cast<int64_t>(b) * H_q + h) * N + n] = lg[tl * H_q + h];
  }
  for (int h = warp; h < H_q; h += nwarps) {
    float m = -INFINITY;
    for (int tl = lane; tl < kScoreTok; tl += 32) m = fmaxf(m, lg[tl * H_q + h]);
    m = warp_max_f(m);
    float s = 0.0f;
    if (m != -INFINITY)
      for (int tl = lane; tl < kScoreTok; tl += 32) s += __expf(lg[tl * H_q + h] - m);
    s = warp_sum_f(s);
    if (lane == 0) pstat[(static_cast<int64_t>(b) * H_q + h) * nblk + blk] = make_float2(m, s);
  }
}

// Token n of request b takes part in the scores: no mask (valid == nullptr), or valid[b][n]
// ((B, N) bool, row stride N). Excluded tokens get the logit -inf (no softmax weight).
__device__ __forceinline__ bool token_valid(const bool* __restrict__ valid, int64_t N, int b, int64_t n) {
  return valid == nullptr || valid[static_cast<int64_t>(b) * N + n];
}

template <typename T>
__global__ void __launch_bounds__(kScoreThreads) score_logits_kernel(
    KVLayout L, const T* __restrict__ k, CacheStrides ks, const float* __restrict__ q, int H_q,
    const bool* __restrict__ skip, const bool* __restrict__ valid, float* __restrict__ logits,
    float2* __restrict__ pstat) {
  extern __shared__ float smem[];
  float* qs = smem;                       // (H_q, D)
  float* lg = smem + H_q * L.D;           // (kScoreTok, H_q)
  const int b = blockIdx.y, blk = blockIdx.x, nblk = gridDim.x;
  const int D = static_cast<int>(L.D), G = H_q / static_cast<int>(L.H_kv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t N = L.N_max, n0 = static_cast<int64_t>(blk) * kScoreTok;
  const int64_t len = (skip && skip[b]) ? 0 : seq_len(L, b);
  if (n0 >= len) {   // nothing valid in this block (uniform: all threads leave together)
    for (int h = threadIdx.x; h < H_q; h += blockDim.x)
      pstat[(static_cast<int64_t>(b) * H_q + h) * nblk + blk] = make_float2(-INFINITY, 0.0f);
    return;
  }
  for (int i = threadIdx.x; i < H_q * D; i += blockDim.x) qs[i] = q[static_cast<int64_t>(b) * H_q * D + i];
  __syncthreads();
  constexpr int per_warp = kScoreTok / (kScoreThreads / 32);
  for (int t = 0; t < per_warp; ++t) {
    const int tl = warp * per_warp + t;   // token slot within the block
    const int64_t n = n0 + tl;
    const int64_t off = n < len && token_valid(valid, N, b, n) ? token_offset(L, ks, b, n) : -1;
    for (int g = 0; g < L.H_kv; ++g) {
      float r[kRegsPerLane];
      if (off >= 0) load_row(k + off + g * ks.head, ks.dim, D, r);
      for (int j = 0; j < G; ++j) {
        const int h = g * G + j;
        const float s = off >= 0 ? warp_dot(qs + h * D, r, D) : -INFINITY;
        if (lane == 0) lg[tl * H_q + h] = s;
      }
    }
  }
  __syncthreads();
  score_block_tail(lg, H_q, b, blk, nblk, n0, N, logits, pstat);
}

// Simt pass 1 (same outputs as score_logits_kernel): 16-byte vector loads. A row (token n, KV
// head g) of D elements is read by a group of R = D / VEC lanes (VEC = 16 / sizeof(T)), each
// lane one 16-byte vector; a warp reads 32 / R rows at once, consecutive groups taking
// consecutive heads of a token (contiguous memory in both layouts), and each group keeps two
// rows in flight. Partial dots with the G q-heads of the row's group are reduced over the R lanes
// with xor shuffles. Requires (checked by the launcher): ks.dim == 1, D % VEC == 0, R a power of
// two <= 32, a 16-byte aligned cache and strides that are multiples of VEC.
template <typename T>
struct Vec16 {
  static constexpr int N = 16 / static_cast<int>(sizeof(T));
  __device__ __forceinline__ static void load(const T* p, float (&out)[16 / sizeof(T)]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f(e[i]);
  }
};

template <typename T>
__global__ void __launch_bounds__(kScoreThreads) score_logits_tuned_kernel(
    KVLayout L, const T* __restrict__ k, CacheStrides ks, const float* __restrict__ q, int H_q,
    const bool* __restrict__ skip, const bool* __restrict__ valid, float* __restrict__ logits,
    float2* __restrict__ pstat) {
  constexpr int VEC = Vec16<T>::N;
  extern __shared__ float smem[];
  float* qs = smem;                       // (H_q, D)
  float* lg = smem + H_q * L.D;           // (kScoreTok, H_q)
  const int b = blockIdx.y, blk = blockIdx.x, nblk = gridDim.x;
  const int D = static_cast<int>(L.D), H_kv = static_cast<int>(L.H_kv), G = H_q / H_kv;
  const int R = D / VEC;                  // lanes per row (power of two, <= 32)
  const int lane = threadIdx.x & 31;
  const int sub = lane & (R - 1);         // this lane's vector within the row
  const int group = threadIdx.x / R, ngroups = kScoreThreads / R;
  const int64_t N = L.N_max, n0 = static_cast<int64_t>(blk) * kScoreTok;
  const int64_t len = (skip && skip[b]) ? 0 : seq_len(L, b);
  if (n0 >= len) {
    for (int h = threadIdx.x; h < H_q; h += blockDim.x)
      pstat[(static_cast<int64_t>(b) * H_q + h) * nblk + blk] = make_float2(-INFINITY, 0.0f);
    return;
  }
  for (int i = threadIdx.x; i < H_q * D; i += blockDim.x) qs[i] = q[static_cast<int64_t>(b) * H_q * D + i];
  __syncthreads();
  const int total = kScoreTok * H_kv;     // rows (token, head) of the block
  // Uniform trip count for every thread (shuffles need whole warps); two rows per group per step.
  for (int base = 0; base < total; base += 2 * ngroups) {
    int row[2];
    int64_t off[2];
    float kv[2][VEC];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      row[u] = base + u * ngroups + group;
      off[u] = -1;
      if (row[u] < total) {
        const int64_t n = n0 + row[u] / H_kv;
        if (n < len && token_valid(valid, N, b, n)) {
          const int64_t o = token_offset(L, ks, b, n);
          if (o >= 0) off[u] = o + static_cast<int64_t>(row[u] % H_kv) * ks.head + sub * VEC;
        }
      }
      if (off[u] >= 0) Vec16<T>::load(k + off[u], kv[u]);
      else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) kv[u][e] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int g = row[u] < total ? row[u] % H_kv : 0;
      const int tl = row[u] < total ? row[u] / H_kv : 0;
      for (int j = 0; j < G; ++j) {
        const float* qr = qs + (g * G + j) * D + sub * VEC;
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) s = fmaf(qr[e], kv[u][e], s);
        for (int o = R >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (sub == 0 && row[u] < total) lg[tl * H_q + g * G + j] = off[u] >= 0 ? s : -INFINITY;
      }
    }
  }
  __syncthreads();
  score_block_tail(lg, H_q, b, blk, nblk, n0, N, logits, pstat);
}

// Pass 2: one block (256 threads) per (b, h): the head's softmax statistics (m, s) -- the max
// logit and sum_n exp(logit_n - m) -- from the block partials. They are kept apart (not folded
// into lse = m + log s): TokenSelect's unscaled logits are 30-60, where rounding m + log s to
// fp32 alone costs up to ulp(m) / 2 ~ 2e-6 relative in every probability.
// An empty head (no valid token) gets (+inf, 1), so that its terms exp(l - m) / s are 0.
__global__ void __launch_bounds__(256) score_stats_kernel(const float2* __restrict__ pstat, int nblk,
                                                          float2* __restrict__ stat) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const float2* p = pstat + row * nblk;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < nblk; i += blockDim.x) m = fmaxf(m, p[i].x);
  m = warp_max_f(m);
  if (lane == 0) red[warp] = m;
  __syncthreads();
  m = lane < nwarps ? red[lane] : -INFINITY;
  m = warp_max_f(m);
  __syncthreads();
  float s = 0.0f;
  if (m != -INFINITY)
    for (int i = threadIdx.x; i < nblk; i += blockDim.x)
      if (p[i].x != -INFINITY) s += p[i].y * __expf(p[i].x - m);
  s = warp_sum_f(s);
  if (lane == 0) red[warp] = s;
  __syncthreads();
  s = lane < nwarps ? red[lane] : 0.0f;
  s = warp_sum_f(s);
  if (threadIdx.x == 0)
    stat[row] = (m == -INFINITY || s == 0.0f) ? make_float2(INFINITY, 1.0f) : make_float2(m, s);
}

// Pass 3: thread per token: score = sum_h exp(logit - m_h) / s_h; -inf past seq_len, for
// tokens with valid[b][n] false and in skipped rows. grid (ceil(N_max / 256), B).
__global__ void __launch_bounds__(256) score_out_kernel(KVLayout L, int H_q, const bool* __restrict__ skip,
                                                        const bool* __restrict__ valid,
                                                        const float* __restrict__ logits,
                                                        const float2* __restrict__ stat, float* __restrict__ out) {
  const int b = blockIdx.y;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, N = L.N_max;
  if (n >= N) return;
  const int64_t len = (skip && skip[b]) ? 0 : seq_len(L, b);
  float acc = -INFINITY;
  if (n < len && token_valid(valid, N, b, n)) {
    acc = 0.0f;
    for (int h = 0; h < H_q; ++h) {
      const int64_t row = static_cast<int64_t>(b) * H_q + h;
      const float2 ms = stat[row];
      acc += __expf(logits[row * N + n] - ms.x) / ms.y;
    }
  }
  out[static_cast<int64_t>(b) * N + n] = acc;
}

// =============================================================================== top-k
// One block (kTopkThreads) per request. Keys: ordered(score) (monotone uint32). A 4-pass MSB
// radix select (8 bits per pass, shared histogram) finds the k-th largest key T among the middle
// tokens [n_sink, L - n_local) and how many tokens equal to T to take (k_eq, lowest indices
// first). One ordered pass then writes: sink tokens, the middle tokens with key > T or (key == T
// and among the first k_eq such), and the local tokens -- ascending, via block prefix sums, so
// no sort is needed. Rows with reuse_mask take the middle from reuse: its in-range entries
// that exceed the last one kept (the ascending input's entries, duplicates dropped).
constexpr int kTopkThreads = 512;   // (1024 caps registers at 64 and spills the scan state)

struct MaxOp {
  __device__ __forceinline__ unsigned long long operator()(unsigned long long a,
                                                           unsigned long long b) const {
    return a > b ? a : b;
  }
};

__device__ __forceinline__ uint32_t ordered_key(float v) {
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kTopkThreads) topk_kernel(
    const float* __restrict__ scores, int64_t N, int64_t ld, const int32_t* __restrict__ seq_lens,
    int64_t k, int64_t n_sink, int64_t n_local, const int32_t* __restrict__ reuse,
    const bool* __restrict__ reuse_mask, int32_t* __restrict__ out) {
  using Scan = cub::BlockScan<unsigned long long, kTopkThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ unsigned int hist[256];
  __shared__ uint32_t sh_prefix;
  __shared__ long long sh_krem;
  const int64_t b = blockIdx.x;
  const int64_t W = n_sink + k + n_local;
  int32_t* o = out + b * W;
  int64_t L = seq_lens[b];
  L = L < 0 ? 0 : (L > N ? N : L);
  if (L <= W) {   // everything fits: 0 .. L-1, then -1
    for (int64_t i = threadIdx.x; i < W; i += blockDim.x) o[i] = i < L ? static_cast<int32_t>(i) : -1;
    return;
  }
  const int64_t lo = n_sink, hi = L - n_local;
  for (int64_t i = threadIdx.x; i < n_sink; i += blockDim.x) o[i] = static_cast<int32_t>(i);
  const float* row = scores + b * ld;
  int64_t written = 0;   // middle tokens written (uniform across the block)
  if (reuse_mask && reuse_mask[b]) {
    // Compaction of the reuse entries, as on the CPU: an entry is kept when it lies in
    // [lo, hi) and exceeds the last kept one (so the output stays strictly ascending whatever
    // the input). The last kept entry before j is the largest in-range entry before j (an
    // in-range entry that is not kept is <= it), so one block max-scan over the keys
    // in-range ? v + 1 : 0, carried across tiles, decides every entry of a tile at once.
    const int32_t* r = reuse + b * k;
    unsigned long long run_max = 0;   // (largest in-range entry so far) + 1; 0: none yet
    for (int64_t j0 = 0; j0 < k; j0 += blockDim.x) {
      const int64_t j = j0 + threadIdx.x;
      const int32_t v = j < k ? r[j] : -1;
      const bool in = j < k && v >= lo && v < hi;
      const unsigned long long key = in ? static_cast<unsigned long long>(v) + 1ull : 0ull;
      unsigned long long before, tile_max;
      Scan(scan_tmp).ExclusiveScan(key, before, run_max, MaxOp{}, tile_max);
      const bool keep = in && key > before;
      __syncthreads();   // scan_tmp reuse
      unsigned long long pos, total;
      Scan(scan_tmp).ExclusiveSum(keep ? 1ull : 0ull, pos, total);
      if (keep) o[n_sink + written + static_cast<int64_t>(pos)] = v;
      written += static_cast<int64_t>(total);
      run_max = tile_max > run_max ? tile_max : run_max;
      __syncthreads();   // scan_tmp reuse
    }
  } else if (k > 0) {
    // ---- radix select of the k-th largest key
    uint32_t prefix = 0, mask = 0;
    long long krem = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (int64_t n = lo + threadIdx.x; n < hi; n += blockDim.x) {
        const uint32_t u = ordered_key(row[n]);
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        long long above = 0;
        int bin = 255;
        for (; bin > 0; --bin) {
          if (above + hist[bin] >= krem) break;
          above += hist[bin];
        }
        sh_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
        sh_krem = krem - above;
      }
      __syncthreads();
      prefix = sh_prefix;
      krem = sh_krem;
      mask |= 255u << shift;
      __syncthreads();
    }
    const uint32_t T = prefix;   // the k-th largest key; take krem of the keys equal to T
    // ---- ordered emission. Per tile, one block scan of packed counts (high 32 bits: keys > T,
    // low 32 bits: keys == T); selected tokens before n = (keys > T before n) + min(keys == T
    // before n, krem), which is n's output slot. The scan's total reaches every thread, so the
    // running counts stay in registers.
    unsigned long long gt_run = 0, eq_run = 0;
    for (int64_t n0 = lo; n0 < hi; n0 += blockDim.x) {
      const int64_t n = n0 + threadIdx.x;
      const bool in = n < hi;
      const uint32_t u = in ? ordered_key(row[n]) : 0u;
      const bool gt = in && u > T, eq = in && u == T;
      const unsigned long long packed = (gt ? (1ull << 32) : 0ull) | (eq ? 1ull : 0ull);
      unsigned long long pre, total;
      Scan(scan_tmp).ExclusiveSum(packed, pre, total);
      const unsigned long long kr = static_cast<unsigned long long>(krem);
      const unsigned long long eq_rank = eq_run + (pre & 0xffffffffull);
      if (gt || (eq && eq_rank < kr)) {
        const unsigned long long slot = gt_run + (pre >> 32) + (eq_rank < kr ? eq_rank : kr);
        o[n_sink + static_cast<int64_t>(slot)] = static_cast<int32_t>(n);
      }
      gt_run += total >> 32;
      eq_run += total & 0xffffffffull;
      __syncthreads();   // scan_tmp reuse
    }
    written = k;
  }
  // Local window right after the middle tokens, then -1 padding.
  for (int64_t i = threadIdx.x; i < n_local; i += blockDim.x) o[n_sink + written + i] = static_cast<int32_t>(hi + i);
  for (int64_t i = n_sink + written + n_local + threadIdx.x; i < W; i += blockDim.x) o[i] = -1;
}

// =============================================================================== attention
// attend_kernel: one block per (row, KV head g, split); grid (rows, H_kv, splits). A "row" is one query position: a decode
// request (row = b) or one query of a prefill chunk (row = b * C + c). The block attends the
// row's key list slice [j0, j1) with the G q-heads of group g and writes the partial softmax
// state (max m, sum l, unnormalised acc[D]) per head to the workspace; merge_kernel combines the
// splits by log-sum-exp and normalises. 128 threads = 4 warps.
//   Phase A (per tile of kAttnTile keys): warp w computes the logits of keys w, w+4, ... for the
//     G heads (key row read once into registers) into shared memory;
//   Phase B: online-softmax update per head (running max / rescale);
//   Phase C: thread t accumulates acc[h][d] for d = t, t + 128 (D <= 256) over the tile's keys,
//     each V row read once for all G heads.
constexpr int kAttnThreads = 128;
constexpr int kAttnTile = 64;

// Key list of a decode row: indices[b][j], valid when 0 <= n < seq_len.
struct DecodeKeys {
  const int32_t* indices;
  int64_t K;
  __device__ __forceinline__ int64_t count(const KVLayout&, int64_t) const { return K; }
  __device__ __forceinline__ int64_t batch(int64_t row) const { return row; }
  __device__ __forceinline__ int64_t token(const KVLayout& L, int64_t row, int64_t j) const {
    const int64_t n = indices[row * K + j];
    return (n >= 0 && n < seq_len(L, row)) ? n : -1;
  }
};

// Key list of prefill query (b, c): the K listed past tokens (valid when 0 <= n < chunk_start),
// then the chunk positions chunk_start .. chunk_start + c; rows past the chunk length have none.
struct PrefillKeys {
  const int32_t* indices;
  int64_t K, C;
  const int32_t* chunk_start;
  __device__ __forceinline__ int64_t batch(int64_t row) const { return row / C; }
  __device__ __forceinline__ int64_t count(const KVLayout& L, int64_t row) const {
    const int64_t b = row / C, c = row % C, s0 = chunk_start[b], len = seq_len(L, b);
    if (s0 < 0 || s0 + c >= len) return 0;   // padding row (or bad chunk_start)
    return K + c + 1;
  }
  __device__ __forceinline__ int64_t token(const KVLayout&, int64_t row, int64_t j) const {
    const int64_t b = row / C, s0 = chunk_start[b];
    if (j < K) {
      const int64_t n = indices[b * K + j];
      return (n >= 0 && n < s0) ? n : -1;
    }
    return s0 + (j - K);
  }
};

template <typename T, typename Keys>
__global__ void __launch_bounds__(kAttnThreads) attend_kernel(
    KVLayout L, const T* __restrict__ k, CacheStrides ks, const T* __restrict__ v, CacheStrides vs,
    const float* __restrict__ q, int H_q, Keys keys, int splits, float* __restrict__ pm,
    float* __restrict__ pl, float* __restrict__ pacc) {
  __shared__ float qs[kMaxG * kMaxD];
  __shared__ float p[kMaxG * kAttnTile];        // logits, then probabilities, of the tile
  __shared__ int64_t voff[kAttnTile];           // V offsets of the tile's keys (-1: skip)
  __shared__ float m_run[kMaxG], l_run[kMaxG], alpha[kMaxG];
  const int64_t row = blockIdx.x;   // rows in x: B * C can exceed the 65535 limit of y / z
  const int g = blockIdx.y, sp = blockIdx.z;
  const int D = static_cast<int>(L.D), G = H_q / static_cast<int>(L.H_kv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = kAttnThreads / 32;
  const int64_t b = keys.batch(row);
  const int64_t cnt = keys.count(L, row);
  const int64_t per = (cnt + splits - 1) / splits;
  const int64_t j0 = sp * per, j1 = j0 + per < cnt ? j0 + per : cnt;

  for (int i = threadIdx.x; i < G * D; i += blockDim.x)
    qs[i] = q[(row * H_q + static_cast<int64_t>(g) * G) * D + i];
  if (threadIdx.x < G) { m_run[threadIdx.x] = -INFINITY; l_run[threadIdx.x] = 0.0f; }
  float acc[kMaxG][2];
#pragma unroll
  for (int h = 0; h < kMaxG; ++h) { acc[h][0] = 0.0f; acc[h][1] = 0.0f; }
  __syncthreads();

  for (int64_t t0 = j0; t0 < j1; t0 += kAttnTile) {
    const int tn = static_cast<int>(j1 - t0 < kAttnTile ? j1 - t0 : kAttnTile);
    // Phase A: logits.
    for (int t = warp; t < tn; t += nwarps) {
      const int64_t n = keys.token(L, row, t0 + t);
      const int64_t off = n >= 0 ? token_offset(L, ks, b, n) : -1;
      const int64_t offv = n >= 0 ? token_offset(L, vs, b, n) : -1;
      if (off >= 0 && offv >= 0) {
        float r[kRegsPerLane];
        load_row(k + off + static_cast<int64_t>(g) * ks.head, ks.dim, D, r);
        for (int h = 0; h < G; ++h) {
          const float s = warp_dot(qs + h * D, r, D);
          if (lane == 0) p[h * kAttnTile + t] = s;
        }
        if (lane == 0) voff[t] = offv + static_cast<int64_t>(g) * vs.head;
      } else {
        if (lane < G) p[lane * kAttnTile + t] = -INFINITY;
        if (lane == 0) voff[t] = -1;
      }
    }
    __syncthreads();
    // Phase B: online softmax per head (warp per head).
    for (int h = warp; h < G; h += nwarps) {
      float m = -INFINITY;
      for (int t = lane; t < tn; t += 32) m = fmaxf(m, p[h * kAttnTile + t]);
      m = warp_max_f(m);
      const float m_old = m_run[h];
      const float m_new = fmaxf(m_old, m);
      float s = 0.0f;
      for (int t = lane; t < tn; t += 32) {
        const float e = m_new == -INFINITY ? 0.0f : __expf(p[h * kAttnTile + t] - m_new);
        p[h * kAttnTile + t] = e;
        s += e;
      }
      s = warp_sum_f(s);
      __syncwarp();
      if (lane == 0) {
        const float a = m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
        alpha[h] = a;
        l_run[h] = l_run[h] * a + s;
        m_run[h] = m_new;
      }
    }
    __syncthreads();
    // Phase C: acc = acc * alpha + sum_t p[h][t] * v_t.
#pragma unroll
    for (int h = 0; h < kMaxG; ++h)
      if (h < G) { acc[h][0] *= alpha[h]; acc[h][1] *= alpha[h]; }
    for (int t = 0; t < tn; ++t) {
      const int64_t vo = voff[t];
      if (vo < 0) continue;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int d = threadIdx.x + i * kAttnThreads;
        if (d >= D) continue;
        const float vv = to_f(v[vo + d * vs.dim]);
#pragma unroll
        for (int h = 0; h < kMaxG; ++h)
          if (h < G) acc[h][i] = fmaf(p[h * kAttnTile + t], vv, acc[h][i]);
      }
    }
    __syncthreads();   // p / voff reuse by the next tile
  }
  // Partial state out: index ((row * H_q + h) * splits + sp).
#pragma unroll
  for (int h = 0; h < kMaxG; ++h) {   // (static indices keep acc in registers)
    if (h >= G) break;
    const int64_t s_idx = (row * H_q + static_cast<int64_t>(g) * G + h) * splits + sp;
    if (threadIdx.x == 0) { pm[s_idx] = m_run[h]; pl[s_idx] = l_run[h]; }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int d = threadIdx.x + i * kAttnThreads;
      if (d < D) pacc[s_idx * D + d] = acc[h][i];
    }
  }
}

// merge_kernel: one block (128 threads) per (row, h): out = sum_s acc_s e^(m_s - M) / sum_s l_s
// e^(m_s - M); lse = M + log(sum). Rows with nothing attended: out 0, lse -inf.
template <typename T>
__global__ void __launch_bounds__(128) merge_kernel(const float* __restrict__ pm, const float* __restrict__ pl,
                                                    const float* __restrict__ pacc, int splits, int D,
                                                    T* __restrict__ out, float* __restrict__ lse) {
  const int64_t r = blockIdx.x;   // row * H_q + h
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, pm[r * splits + s]);
  float S = 0.0f;
  if (M != -INFINITY)
    for (int s = 0; s < splits; ++s) {
      const float m = pm[r * splits + s];
      if (m != -INFINITY) S += pl[r * splits + s] * __expf(m - M);
    }
  const bool empty = M == -INFINITY || S == 0.0f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.0f;
    if (!empty) {
      for (int s = 0; s < splits; ++s) {
        const float m = pm[r * splits + s];
        if (m != -INFINITY) a += pacc[(r * splits + s) * D + d] * __expf(m - M);
      }
      a /= S;
    }
    out[r * D + d] = from_f<T>(a);
  }
  if (threadIdx.x == 0 && lse) lse[r] = empty ? -INFINITY : M + logf(S);
}

}  // namespace device
}  // namespace kv_select
}  // namespace tokenkernels
