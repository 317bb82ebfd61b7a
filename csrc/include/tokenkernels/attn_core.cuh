// The tensor-core split-KV attention core: device code (torch-free). Host-visible arithmetic and
// the planner: attn_core.h; launchers: csrc/attention/attn_core_kernels.cu.
//
// attn_core_tc_kernel<T, D, kWN, Src>: grid (B * Hkv * row_blocks, parts), 128 threads.
//   * Q: the CTA's rows (<= 64) staged once in shared memory (16-bit, XOR-swizzled 16-byte
//     chunks), then held as mma A fragments in registers (ldmatrix x4, SM75_U32x4_LDSM_N);
//   * K/V: tiles of kKeyTile keys, double-buffered, gathered with 16-byte cp.async
//     (SM80_CP_ASYNC_CACHEGLOBAL_ZFILL: a key that is not there -- past the part, index -1, bad
//     page -- is zero-filled, never read). Each key row's element offsets (K and V) are computed
//     once per tile by one thread (page table / index list read once per key) into a 3-slot ring
//     in shared memory, so the copy loop is address arithmetic only; 2 barriers per tile;
//   * S = Q K^T and O += P V on tensor cores: mma.sync m16n8k16 (SM80_16x8x16_F32{BF16,F16}..._TN)
//     with fp32 accumulators; K fragments by ldmatrix (non-transposed), V fragments by
//     ldmatrix.trans (SM75_U16x8_LDSM_T); P re-packed from the S accumulators into A fragments
//     in registers (no shared-memory round trip);
//   * online softmax in the log2 domain: s2 = s * (scale * log2 e), exp2f, row max / sum over
//     the 4 lanes of a quad; the arithmetic is attn_core.h's (row_base, rescale, prob, ...);
//   * parts (splits of the key list, and the tree part) write (o / l, lse2) to the workspace; the
//     last CTA of a (b, h, row block) to finish (an atomic ticket, reset to 0 for the next
//     launch / CUDA-graph replay) merges them by log-sum-exp into out / lse. One part: the CTA
//     writes out / lse itself.
// The same code runs on sm_80 and sm_90a (mma.sync is native on both); on a compute-capability-9.0
// device with sm_90a code the launcher runs the 64-row launches (kWN = 1) on attn_core_wgmma_kernel
// instead (attn_core_sm90.cuh: the same pipeline, softmax and merge, the products on wgmma).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include <cmath>
#include <cstdint>

#include "tokenkernels/attn_core.h"
#include "tokenkernels/kv_select.h"
#include "tokenkernels/tree.h"

namespace tokenkernels {
namespace attn {
namespace device {

// ---------------------------------------------------------------------------- MMA / packing
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  using Atom = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Mma<__half> {
  using Atom = cute::SM80_16x8x16_F32F16F16F32_TN;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static __half cvt(float v) { return __float2half_rn(v); }
};

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Mma<T>::Atom::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2], d[3]);
}

__device__ __forceinline__ void ldsm_x4(const void* smem, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r0, r1, r2, r3);
}
__device__ __forceinline__ void ldsm_x4_t(const void* smem, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r0, r1, r2, r3);
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(gmem), *reinterpret_cast<cute::uint128_t*>(smem), pred);
}

// Element offset of 16-byte chunk c of row `row` in a (rows x D) 16-bit tile (attn_core.h).
template <int D>
__device__ __forceinline__ int swz(int row, int c) { return swz_off(row, c, D); }

// ---------------------------------------------------------------------------- key sources
// A source tells the kernel, per CTA: its key range and whether a mask applies (keys()), each
// logical key's element offsets in K and V (key(): false = not there), the mask (allowed()),
// which rows are real (row_valid()), where Q rows are and where out / lse rows go.
struct Keys {
  int64_t k0 = 0, k1 = 0;   // logical keys [k0, k1) of this part
  int64_t base = 0;         // tree part: cache position of tree key 0 (the prefix length)
  bool masked = false;
};

// tree.attention: rows r = i * G + g of request b, KV head h (q-head h * G + g, node i). Parts
// 0 .. splits-1: the prefix [0, P) in splits (no mask); part `splits`: the tree keys [0, Lk) at
// cache positions P + j, mask = the node's ancestor bits.
template <typename T>
struct TreeSrc {
  tree::AttnProblem p;
  int64_t splits;
  using QT = T;
  __device__ __forceinline__ int64_t G() const { return p.Hq / p.Hkv; }
  __device__ __forceinline__ int64_t rows() const { return p.n * G(); }
  __device__ __forceinline__ int64_t L(int64_t b) const { return p.tree_lens ? tree::clamp_len(p.tree_lens[b], p.n) : p.n; }
  __device__ __forceinline__ int64_t P(int64_t b, int64_t Lb) const {
    const int64_t v = p.prefix_lens[b], cap = p.max_prefix - Lb;
    return v < 0 ? 0 : (v > cap ? (cap < 0 ? 0 : cap) : v);
  }
  __device__ __forceinline__ Keys keys(int64_t b, int64_t part, int64_t, int64_t) const {
    const int64_t Lb = L(b), Pb = P(b, Lb);
    Keys k;
    if (part < splits) {
      const Range r = split_range(Pb, splits, part);
      k.k0 = r.k0;
      k.k1 = r.k1;
    } else {
      k.k1 = Lb < p.max_prefix - Pb ? Lb : p.max_prefix - Pb;   // tree keys inside the cache
      if (k.k1 < 0) k.k1 = 0;
      k.base = Pb;
      k.masked = true;
    }
    return k;
  }
  __device__ __forceinline__ bool key(int64_t b, int64_t h, const Keys& ks, int64_t j, int64_t& ko, int64_t& vo) const {
    const int64_t pos = ks.base + j;
    int64_t slot;
    if (p.block_table) {
      int64_t page = p.block_table[b * p.max_pages + pos / p.page_size];
      page = page < 0 ? 0 : (page >= p.num_pages ? p.num_pages - 1 : page);
      slot = page * p.page_size + pos % p.page_size;
    } else {
      slot = b * p.N_max + pos;
    }
    ko = vo = (slot * p.Hkv + h) * p.D;
    return true;
  }
  __device__ __forceinline__ bool allowed(int64_t b, int64_t r, int64_t j) const {
    if (r >= rows()) return false;
    const int64_t W = tree::mask_words(p.n);
    return tree_bit(p.mask + (b * p.n + r / G()) * W, j);
  }
  __device__ __forceinline__ bool row_valid(int64_t b, int64_t r) const { return r < rows() && r / G() < L(b); }
  __device__ __forceinline__ int64_t qrow(int64_t b, int64_t h, int64_t r) const {   // also out's row
    return (b * p.n + r / G()) * p.Hq + h * G() + r % G();
  }
  __device__ __forceinline__ const QT* q() const { return static_cast<const QT*>(p.q); }
  __device__ __forceinline__ T* out() const { return static_cast<T*>(p.out); }
  __device__ __forceinline__ float* lse() const { return p.lse; }
};

// kv_select.sparse_decode: q (B, H_q, D) contiguous in the cache dtype; rows r = g (the G q-heads of KV head h), keys = indices[b][0 .. K)
// (valid when 0 <= n < seq_len and the page is in range), no mask, split over K.
template <typename T>
struct DecodeSrc {
  kv_select::KVLayout L;
  kv_select::CacheStrides ks, vs;
  const T* qp;
  void* outp;
  float* lsep;
  const int32_t* indices;
  int64_t K, Hq, splits;
  using QT = T;
  __device__ __forceinline__ int64_t G() const { return Hq / L.H_kv; }
  __device__ __forceinline__ int64_t rows() const { return G(); }
  __device__ __forceinline__ Keys keys(int64_t, int64_t part, int64_t, int64_t) const {
    const Range r = split_range(K, splits, part);
    Keys k;
    k.k0 = r.k0;
    k.k1 = r.k1;
    return k;
  }
  __device__ __forceinline__ bool key(int64_t b, int64_t h, const Keys&, int64_t j, int64_t& ko, int64_t& vo) const {
    const int64_t n = indices[b * K + j];
    if (n < 0 || n >= kv_select::seq_len(L, b)) return false;
    const int64_t k0 = kv_select::token_offset(L, ks, b, n), v0 = kv_select::token_offset(L, vs, b, n);
    if (k0 < 0 || v0 < 0) return false;
    ko = k0 + h * ks.head;
    vo = v0 + h * vs.head;
    return true;
  }
  __device__ __forceinline__ bool allowed(int64_t, int64_t, int64_t) const { return true; }
  __device__ __forceinline__ bool row_valid(int64_t, int64_t r) const { return r < rows(); }
  __device__ __forceinline__ int64_t qrow(int64_t b, int64_t h, int64_t r) const { return b * Hq + h * G() + r; }
  __device__ __forceinline__ const QT* q() const { return qp; }
  __device__ __forceinline__ T* out() const { return static_cast<T*>(outp); }
  __device__ __forceinline__ float* lse() const { return lsep; }
};

// kv_select.sparse_prefill: rows r = c * G + g (chunk query c); key list = indices[b][0 .. K)
// (valid when 0 <= n < chunk_start) then the chunk positions chunk_start + (j - K); row c attends
// the gathered keys and chunk keys j - K <= c (chunk_causal). A row block's list ends at the
// block's last row (later chunk keys are masked for all its rows), split over that length.
template <typename T>
struct PrefillSrc {
  kv_select::KVLayout L;
  kv_select::CacheStrides ks, vs;
  const T* qp;
  void* outp;
  float* lsep;
  const int32_t* indices;
  const int32_t* chunk_start;
  int64_t K, C, Hq, splits;
  using QT = T;
  __device__ __forceinline__ int64_t G() const { return Hq / L.H_kv; }
  __device__ __forceinline__ int64_t rows() const { return C * G(); }
  // chunk rows of request b that exist (0 for a bad chunk_start)
  __device__ __forceinline__ int64_t clen(int64_t b) const {
    const int64_t s0 = chunk_start[b], len = kv_select::seq_len(L, b);
    if (s0 < 0 || s0 >= len) return 0;
    return len - s0 < C ? len - s0 : C;
  }
  __device__ __forceinline__ Keys keys(int64_t b, int64_t part, int64_t row0, int64_t nrows) const {
    const int64_t len = prefill_key_len(K, clen(b), C, G(), row0, nrows);
    const Range r = split_range(len, splits, part);
    Keys k;
    k.k0 = r.k0;
    k.k1 = r.k1;
    k.masked = r.k1 > K;
    return k;
  }
  __device__ __forceinline__ bool key(int64_t b, int64_t h, const Keys&, int64_t j, int64_t& ko, int64_t& vo) const {
    const int64_t s0 = chunk_start[b];
    int64_t n;
    if (j < K) {
      n = indices[b * K + j];
      if (n < 0 || n >= s0) return false;
    } else {
      n = s0 + (j - K);
    }
    const int64_t k0 = kv_select::token_offset(L, ks, b, n), v0 = kv_select::token_offset(L, vs, b, n);
    if (k0 < 0 || v0 < 0) return false;
    ko = k0 + h * ks.head;
    vo = v0 + h * vs.head;
    return true;
  }
  __device__ __forceinline__ bool allowed(int64_t, int64_t r, int64_t j) const { return chunk_causal(j, K, r / G()); }
  __device__ __forceinline__ bool row_valid(int64_t b, int64_t r) const { return r < rows() && r / G() < clen(b); }
  __device__ __forceinline__ int64_t qrow(int64_t b, int64_t h, int64_t r) const {
    return (b * C + r / G()) * Hq + h * G() + r % G();
  }
  __device__ __forceinline__ const QT* q() const { return qp; }
  __device__ __forceinline__ T* out() const { return static_cast<T*>(outp); }
  __device__ __forceinline__ float* lse() const { return lsep; }
};

// 8 consecutive Q elements (16 bytes). Q stays in the input dtype: the scale is applied to the
// fp32 products (s2 = (q . k) * scale * log2 e), so no rounding of q * scale.
template <typename T>
__device__ __forceinline__ uint4 q_chunk(const T* src) { return *reinterpret_cast<const uint4*>(src); }

// ------------------------------------------------------------------------------- the kernel
// Resources (check build, cuobjdump -res-usage; bench/roofline/attn_core_sass.md): 119-221
// registers, 0 stack, 0 local, no spills; 2 CTAs per SM need <= 224 registers at 128 threads.
// sass: attn_core_tc_kernel sm_80 HMMA LDGSTS LDSM !LDL !STL !HGMMA stack==0 regs<=224 smem<=2048
// sass: attn_core_tc_kernel sm_90a HMMA LDGSTS LDSM !LDL !STL stack==0 regs<=224 smem<=2048
// The tail of every multi-part launch of both core kernels: after a part has stored its
// (o / l, lse2) rows to the workspace, the last part of the CTA slot to arrive (atomic ticket,
// reset for CUDA-graph replay) merges all parts by log-sum-exp into out / lse.
template <typename T, int D, int ROWS, typename Src>
__device__ __forceinline__ void merge_parts_last(const Src& src, int64_t b, int64_t h, int64_t row0,
                                                 int64_t nrows, int64_t parts, int64_t base, int64_t cta,
                                                 const float* ws_o, const float* ws_lse, int* tickets,
                                                 T* outp, float* lsep, int tid, int warp, int lane) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int done = atomicAdd(tickets + cta, 1);
    s_last = done == parts - 1;
    if (s_last) tickets[cta] = 0;   // ready for the next launch (CUDA-graph replay)
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int rl = warp; rl < ROWS; rl += kWarps) {
    const int64_t r = row0 + rl;
    if (r >= nrows) break;
    T* orow = outp + src.qrow(b, h, r) * D;
    if (!src.row_valid(b, r)) {
      for (int d = lane; d < D; d += 32) orow[d] = Mma<T>::cvt(0.f);
      if (lane == 0 && lsep) lsep[src.qrow(b, h, r)] = -INFINITY;
      continue;
    }
    float M = -INFINITY;
    for (int64_t s2 = 0; s2 < parts; ++s2) M = fmaxf(M, __ldcg(ws_lse + (s2 * base + cta) * ROWS + rl));
    float den = 0.f;
    float acc[D / 32];
#pragma unroll
    for (int t = 0; t < D / 32; ++t) acc[t] = 0.f;
    for (int64_t s2 = 0; s2 < parts; ++s2) {
      const int64_t prow = (s2 * base + cta) * ROWS + rl;
      const float w = merge_weight(__ldcg(ws_lse + prow), M);
      if (w == 0.f) continue;
      den += w;
#pragma unroll
      for (int t = 0; t < D / 32; ++t) acc[t] += w * __ldcg(ws_o + prow * D + lane + 32 * t);
    }
    const float inv = merged_inv(den);
#pragma unroll
    for (int t = 0; t < D / 32; ++t) orow[lane + 32 * t] = Mma<T>::cvt(acc[t] * inv);
    if (lane == 0 && lsep) lsep[src.qrow(b, h, r)] = merged_lse(M, den);
  }
}

template <typename T, int D, int kWN, typename Src>
__global__ void __launch_bounds__(kThreads, 2)
    attn_core_tc_kernel(Src src, const T* __restrict__ Kc, const T* __restrict__ Vc, float scale_log2,
                        int64_t row_blocks, int64_t Hkv, float* __restrict__ ws_o, float* __restrict__ ws_lse,
                        int* __restrict__ tickets) {
  constexpr int kWM = kWarps / kWN;
  constexpr int ROWS = 16 * kWM;               // rows per CTA
  constexpr int KT = kKeyTile;
  constexpr int KPW = KT / kWN;                // keys per warp per tile
  constexpr int NB = KPW / 8;                  // S n-blocks per warp
  constexpr int DK = D / 16;                   // k-steps over D
  constexpr int DN = D / 8;                    // O n-blocks
  constexpr int CH = D / 8;                    // 16-byte chunks per row
  static_assert(NB % 2 == 0 && DN % 2 == 0 && KPW % 16 == 0, "tile shape");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + ROWS * D;
  T* sV = sK + kStages * KT * D;
  int64_t* sKo = reinterpret_cast<int64_t*>(sV + kStages * KT * D);   // [3][KT]
  int64_t* sVo = sKo + kOffSlots * KT;                                 // [3][KT]
  static_assert(kOffSlots == 3, "fill / issue use t % 3");

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp / kWN, wn = warp % kWN;
  const int64_t cta = blockIdx.x, part = blockIdx.y, parts = gridDim.y;
  const int64_t bh = cta / row_blocks, rb = cta % row_blocks;
  const int64_t b = bh / Hkv, h = bh % Hkv;
  const int64_t row0 = rb * ROWS, nrows = src.rows();
  const Keys ck = src.keys(b, part, row0, ROWS);

  // ---- Q -> shared memory (zeros for rows that are not there)
  for (int c = tid; c < ROWS * CH; c += kThreads) {
    const int r = c / CH, cc = c % CH;
    const int64_t gr = row0 + r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (gr < nrows) val = q_chunk(src.q() + src.qrow(b, h, gr) * D + cc * 8);
    *reinterpret_cast<uint4*>(sQ + swz<D>(r, cc)) = val;
  }

  float o[DN][4];
#pragma unroll
  for (int i = 0; i < DN; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  const int64_t nk = ck.k1 - ck.k0;
  const int ntiles = nk > 0 ? static_cast<int>((nk + KT - 1) / KT) : 0;   // 32-bit tile counter

  // offsets of tile t into ring slot t % 3 (threads 0..KT-1, one key each)
  auto fill = [&](int t) {
    if (tid < KT) {
      const int64_t j = ck.k0 + static_cast<int64_t>(t) * KT + tid;
      int64_t ko = -1, vo = -1;
      if (j < ck.k1 && !src.key(b, h, ck, j, ko, vo)) ko = vo = -1;
      sKo[(t % 3) * KT + tid] = ko;
      sVo[(t % 3) * KT + tid] = vo;
    }
  };
  auto issue = [&](int t) {
    const int st = t & 1;
    const int64_t* ko = sKo + (t % 3) * KT;
    const int64_t* vo = sVo + (t % 3) * KT;
    T* dk = sK + st * KT * D;
    T* dv = sV + st * KT * D;
#pragma unroll 4
    for (int c = tid; c < KT * CH; c += kThreads) {
      const int r = c / CH, cc = c % CH;
      const int64_t a = ko[r], v = vo[r];
      cp_async16(dk + swz<D>(r, cc), Kc + (a >= 0 ? a : 0) + cc * 8, a >= 0);
      cp_async16(dv + swz<D>(r, cc), Vc + (v >= 0 ? v : 0) + cc * 8, v >= 0);
    }
    cute::cp_async_fence();
  };

  if (ntiles > 0) {
    fill(0);
    __syncthreads();   // offsets of tile 0 and Q visible
    issue(0);
    uint32_t qf[DK][4];
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) {
      ldsm_x4(sQ + swz<D>(q_lds_row(wm, lane), q_lds_chunk(kk, lane)), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
    }
    const int64_t ra = row0 + wm * 16 + acc_row(lane, 0), rbw = row0 + wm * 16 + acc_row(lane, 2);   // my 2 rows

    for (int t = 0; t < ntiles; ++t) {
      const bool more = t + 1 < ntiles;
      if (more) fill(t + 1);
      __syncthreads();   // offsets of t+1 visible; every warp is done with tile t-1's buffers
      if (more) {
        issue(t + 1);
        cute::cp_async_wait<1>();
      } else {
        cute::cp_async_wait<0>();
      }
      __syncthreads();   // tile t landed for every thread's copies
      const int st = t & 1;
      const T* tk = sK + st * KT * D;
      const T* tv = sV + st * KT * D;
      const int64_t* tko = sKo + (t % 3) * KT;
      const int64_t kb = ck.k0 + static_cast<int64_t>(t) * KT;
      const int key0 = wn * KPW;

      // S = Q K^T (16 rows x KPW keys per warp)
      float s[NB][4];
#pragma unroll
      for (int i = 0; i < NB; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < DK; ++kk) {
#pragma unroll
        for (int n2 = 0; n2 < NB / 2; ++n2) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4(tk + swz<D>(k_lds_row(key0, n2, lane), k_lds_chunk(kk, lane)), b0, b1, b2, b3);
          mma<T>(s[2 * n2], qf[kk], b0, b1);
          mma<T>(s[2 * n2 + 1], qf[kk], b2, b3);
        }
      }
      // scale, mask, row max
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < NB; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int jl = key0 + i * 8 + acc_col(lane, e);
          bool ok = tko[jl] >= 0;
          if (ck.masked && ok) ok = src.allowed(b, e < 2 ? ra : rbw, kb + jl);   // rows acc_row(lane, e)
          const float v = ok ? s[i][e] * scale_log2 : -INFINITY;
          s[i][e] = v;
          mx[e >> 1] = fmaxf(mx[e >> 1], v);
        }
      }
      float c[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
        mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
        const float mn = fmaxf(m[hr], mx[hr]);
        c[hr] = rescale(m[hr], mn);
        m[hr] = mn;
        l[hr] *= c[hr];
      }
#pragma unroll
      for (int i = 0; i < DN; ++i) {
        o[i][0] *= c[0];
        o[i][1] *= c[0];
        o[i][2] *= c[1];
        o[i][3] *= c[1];
      }
      // P = exp2(s2 - m), packed into A fragments; O += P V
#pragma unroll
      for (int ks = 0; ks < NB / 2; ++ks) {
        uint32_t a[4];
        float p[2][4];
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            p[u][e] = prob(s[2 * ks + u][e], m[e >> 1]);
            l[e >> 1] += p[u][e];
          }
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = Mma<T>::pack(p[pa_block(r)][pa_elem(r, 0)], p[pa_block(r)][pa_elem(r, 1)]);
        const int vr = v_lds_row(key0, ks, lane);
#pragma unroll
        for (int d2 = 0; d2 < DN / 2; ++d2) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4_t(tv + swz<D>(vr, v_lds_chunk(d2, lane)), b0, b1, b2, b3);
          mma<T>(o[2 * d2], a, b0, b1);
          mma<T>(o[2 * d2 + 1], a, b2, b3);
        }
      }
    }
  }
  // l over the quad (m is quad-uniform already)
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 1);
    l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 2);
  }

  // ---- key groups of the CTA (kWN = 4): warps 1..3 hand (m, l, o) to warp 0 through the K/V
  // buffers (every copy has landed: wait<0> ran on the last tile)
  if (kWN > 1) {
    float* red = reinterpret_cast<float*>(sK);   // [kWN][2 + 2 + DN*4][32]
    constexpr int PER = 4 + DN * 4;
    __syncthreads();
    if (wn > 0) {
      float* w = red + (wn * PER) * 32 + lane;
      w[0] = m[0];
      w[32] = m[1];
      w[64] = l[0];
      w[96] = l[1];
#pragma unroll
      for (int i = 0; i < DN; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) w[(4 + i * 4 + e) * 32] = o[i][e];
    }
    __syncthreads();
    if (wn == 0) {
      for (int w2 = 1; w2 < kWN; ++w2) {
        const float* w = red + (w2 * PER) * 32 + lane;
        float cm[2], cw[2];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) merge_into(m[hr], l[hr], w[hr * 32], w[(2 + hr) * 32], cm[hr], cw[hr]);
#pragma unroll
        for (int i = 0; i < DN; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[i][e] = o[i][e] * cm[e >> 1] + w[(4 + i * 4 + e) * 32] * cw[e >> 1];
      }
    }
  }

  // ---- epilogue: warps of key group 0 own the rows
  const bool owner = wn == 0;
  const int64_t ra = row0 + wm * 16 + acc_row(lane, 0);   // and ra + 8 = acc_row(lane, 2)
  const int cb = acc_col(lane, 0);
  T* outp = src.out();
  float* lsep = src.lse();
  if (parts == 1) {
    if (owner) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int64_t r = ra + 8 * hr;
        if (r >= nrows) continue;
        const bool valid = src.row_valid(b, r);
        const float inv = valid ? part_inv(l[hr]) : 0.f;
        T* orow = outp + src.qrow(b, h, r) * D;
#pragma unroll
        for (int i = 0; i < DN; ++i) {   // columns i * 8 + acc_col(lane, 2 hr + {0, 1}) = i * 8 + cb + {0, 1}
          const uint32_t v = Mma<T>::pack(o[i][2 * hr] * inv, o[i][2 * hr + 1] * inv);
          *reinterpret_cast<uint32_t*>(orow + i * 8 + cb) = v;
        }
        if (cb == 0 && lsep) lsep[src.qrow(b, h, r)] = valid ? part_lse2(m[hr], l[hr]) * kLn2 : -INFINITY;
      }
    }
    return;
  }
  // several parts: this part's (o / l, lse2) to the workspace ...
  const int64_t base = gridDim.x;
  if (owner) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int64_t rl = wm * 16 + acc_row(lane, 2 * hr);
      const int64_t prow = (part * base + cta) * ROWS + rl;
      const float inv = part_inv(l[hr]);
      float* w = ws_o + prow * D;
#pragma unroll
      for (int i = 0; i < DN; ++i)
        *reinterpret_cast<float2*>(w + i * 8 + cb) = make_float2(o[i][2 * hr] * inv, o[i][2 * hr + 1] * inv);
      if (cb == 0) ws_lse[prow] = part_lse2(m[hr], l[hr]);
    }
  }
  // ... and the last part to finish merges
  merge_parts_last<T, D, ROWS>(src, b, h, row0, nrows, parts, base, cta, ws_o, ws_lse, tickets, outp, lsep,
                               tid, warp, lane);
}

}  // namespace device
}  // namespace attn
}  // namespace tokenkernels
