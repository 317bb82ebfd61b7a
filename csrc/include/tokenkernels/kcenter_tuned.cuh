// kcenter family, impl="tuned": CUDA device code (torch-free). Design and the shared host /
// device helpers: kcenter_tuned.h. Launcher: csrc/kcenter/kcenter_tuned_kernels.cu.
//
// Tensor-core and async-copy instructions come from CuTe's arch atoms (CUTLASS headers):
//   SM80_CP_ASYNC_CACHEGLOBAL_ZFILL (cp.async.cg 16 B, zero-fill out of range -> LDGSTS),
//   SM75_U32x4_LDSM_N (ldmatrix.x4 -> LDSM), SM80_16x8x16_F32{BF16,F16}..._TN (mma.sync -> HMMA).
// Both archs of the build (sm_80, sm_90a) run this mma.sync path: it has no sm_90a-only code.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include <cmath>
#include <cstdint>

#include "tokenkernels/kcenter.h"
#include "tokenkernels/kcenter_tuned.h"

namespace tokenkernels {
namespace kcenter {
namespace device {
namespace tuned_impl {

using namespace ::tokenkernels::kcenter::tuned;

template <typename T>
struct MmaAtom;
template <>
struct MmaAtom<__nv_bfloat16> {
  using type = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct MmaAtom<__half> {
  using type = cute::SM80_16x8x16_F32F16F16F32_TN;
};

__device__ __forceinline__ int64_t tuned_item_length(const Problem& p, int64_t b) {
  if (!p.lengths) return p.N;
  const int64_t L = p.lengths[b];
  return L < 0 ? 0 : (L > p.N ? p.N : L);
}
__device__ __forceinline__ bool tuned_valid(const Problem& p, int64_t b, int64_t j, int64_t L) {
  return j < L && !(p.exclude && p.exclude[b * p.N + j]);
}

// ---------------------------------------------------------------- symmetric Gram + epilogue
// grid = (tiles_per_item, items b0 .. b0 + gridDim.y - 1); block = GramGeom<BT>::kThreads;
// dynamic shared memory GramGeom<BT>::kSmemBytes. x: (B, N, Dp) with Dp % 8 == 0.
// keys: (B, N, ld) fp32; nn: (B, N) ordered uints (kNnInit before the launch) or nullptr (no
// fold: a given start needs no nearest neighbours).
// sass: kc_gram_tc_kernel sm_80 HMMA LDGSTS LDSM !LDL !STL stack==0 regs<=128 smem<=4096
// sass: kc_gram_tc_kernel sm_90a HMMA LDGSTS LDSM !LDL !STL stack==0 regs<=128 smem<=4096
template <int BT, typename T>
__global__ void __launch_bounds__(GramGeom<BT>::kThreads, GramGeom<BT>::kMinBlocks)
    kc_gram_tc_kernel(Problem p, const T* __restrict__ x, int64_t Dp, int64_t T1d,
                      float* __restrict__ keys, int64_t ld, uint32_t* __restrict__ nn, int64_t b0) {
  using G = GramGeom<BT>;
  using Mma = typename MmaAtom<T>::type;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ float s_aux_r[BT], s_aux_c[BT];
  __shared__ bool s_val_r[BT], s_val_c[BT];
  __shared__ uint32_t s_min_r[BT], s_min_c[BT];

  const int64_t b = b0 + blockIdx.y, N = p.N;
  const TileIJ tij = triangle_tile(blockIdx.x, T1d);
  const int64_t r0 = int64_t(tij.i) * BT, c0 = int64_t(tij.j) * BT;
  const bool diag = tij.i == tij.j;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / G::kWN, wn = warp % G::kWN;

  // token metadata of the tile's rows and columns (read by the epilogue after the main loop's
  // barriers)
  const int64_t L = tuned_item_length(p, b);
  for (int t = tid; t < BT; t += G::kThreads) {
    const int64_t gi = r0 + t, gj = c0 + t;
    s_aux_r[t] = gi < N ? p.aux[b * N + gi] : 0.0f;
    s_aux_c[t] = gj < N ? p.aux[b * N + gj] : 0.0f;
    s_val_r[t] = tuned_valid(p, b, gi, L);
    s_val_c[t] = tuned_valid(p, b, gj, L);
    s_min_r[t] = kNnInit;
    s_min_c[t] = kNnInit;
  }

  T* sA0 = reinterpret_cast<T*>(smem_raw);
  const T* xa = x + (b * N + r0) * Dp;
  const T* xb = x + (b * N + c0) * Dp;
  const int64_t KT = (Dp + G::kBK - 1) / G::kBK;

  // Stage s: A panel at sA0 + s * 2*BT*64, B panel right after it (unused on diagonal tiles,
  // whose B operand is the A panel).
  auto load_stage = [&](int stage, int64_t kt) {
    T* sa = sA0 + stage * (2 * BT * G::kBK);
    T* sb = sa + BT * G::kBK;
    const int64_t k0 = kt * G::kBK;
#pragma unroll
    for (int c = 0; c < G::kChunksPerThread; ++c) {
      const int q = tid + c * G::kThreads;   // 0 .. BT*8-1
      const int row = loader_row(q), ch = loader_chunk(q);
      const int64_t kk = k0 + ch * 8;
      const bool kin = kk < Dp;
      {
        const bool ok = kin && r0 + row < N;
        const T* src = ok ? xa + int64_t(row) * Dp + kk : x;
        cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
            *reinterpret_cast<const cute::uint128_t*>(src),
            *reinterpret_cast<cute::uint128_t*>(sa + smem_offset(row, ch)), ok);
      }
      if (!diag) {
        const bool ok = kin && c0 + row < N;
        const T* src = ok ? xb + int64_t(row) * Dp + kk : x;
        cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
            *reinterpret_cast<const cute::uint128_t*>(src),
            *reinterpret_cast<cute::uint128_t*>(sb + smem_offset(row, ch)), ok);
      }
    }
  };

  float acc[G::kMT][G::kNT][4];
#pragma unroll
  for (int mt = 0; mt < G::kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < G::kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < G::kStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cute::cp_async_fence();
  }
  for (int64_t kt = 0; kt < KT; ++kt) {
    cute::cp_async_wait<G::kStages - 2>();   // stage kt landed (this thread's copies) ...
    __syncthreads();                          // ... and everyone's; stage kt-1 is free again
    {
      const int64_t nk = kt + G::kStages - 1;
      if (nk < KT) load_stage(static_cast<int>(nk % G::kStages), nk);
      cute::cp_async_fence();
    }
    const T* sa = sA0 + static_cast<int>(kt % G::kStages) * (2 * BT * G::kBK);
    const T* sb = diag ? sa : sa + BT * G::kBK;
#pragma unroll
    for (int ks = 0; ks < G::kBK / 16; ++ks) {
      uint32_t af[G::kMT][4], bfr[G::kNT][2];
#pragma unroll
      for (int mt = 0; mt < G::kMT; ++mt) {
        // lanes 0-15: rows 0-15 of k half 0; lanes 16-31: rows 0-15 of k half 1
        const int row = ldsm_a_row<BT>(wm, mt, lane);
        const int ch = ldsm_a_chunk(ks, lane);
        cute::SM75_U32x4_LDSM_N::copy(
            *reinterpret_cast<const cute::uint128_t*>(sa + smem_offset(row, ch)), af[mt][0],
            af[mt][1], af[mt][2], af[mt][3]);
      }
#pragma unroll
      for (int np = 0; np < G::kNT / 2; ++np) {
        // matrices: (n 0-7, k lo), (n 0-7, k hi), (n 8-15, k lo), (n 8-15, k hi)
        const int row = ldsm_b_row<BT>(wn, np, lane);
        const int ch = ldsm_b_chunk(ks, lane);
        cute::SM75_U32x4_LDSM_N::copy(
            *reinterpret_cast<const cute::uint128_t*>(sb + smem_offset(row, ch)),
            bfr[2 * np][0], bfr[2 * np][1], bfr[2 * np + 1][0], bfr[2 * np + 1][1]);
      }
#pragma unroll
      for (int mt = 0; mt < G::kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < G::kNT; ++nt)
          Mma::fma(acc[mt][nt][0], acc[mt][nt][1], acc[mt][nt][2], acc[mt][nt][3], af[mt][0],
                   af[mt][1], af[mt][2], af[mt][3], bfr[nt][0], bfr[nt][1], acc[mt][nt][0],
                   acc[mt][nt][1], acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
  cute::cp_async_wait<0>();
  __syncthreads();   // metadata visible (also orders it for KT == 0)

  // ---- epilogue: key, store + mirror, row / column minima
  float* kb = keys + b * N * ld;
  uint32_t rmin[G::kMT][2], cmin[G::kNT][2];
#pragma unroll
  for (int mt = 0; mt < G::kMT; ++mt) rmin[mt][0] = rmin[mt][1] = kNnInit;
#pragma unroll
  for (int nt = 0; nt < G::kNT; ++nt) cmin[nt][0] = cmin[nt][1] = kNnInit;
#pragma unroll
  for (int mt = 0; mt < G::kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = frag_row<BT>(wm, mt, lane, h);
      const int64_t gi = r0 + r;
      const float ai = s_aux_r[r];
      const bool vi = s_val_r[r];
#pragma unroll
      for (int nt = 0; nt < G::kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = frag_col<BT>(wn, nt, lane, e);
          const int64_t gj = c0 + c;
          const float key = key_from_gram(p.metric, acc[mt][nt][2 * h + e], ai, s_aux_c[c]);
          if (stores_element(gi, gj, N)) {
            kb[gi * ld + gj] = key;
            if (stores_mirror(gi, gj)) kb[gj * ld + gi] = key;
          }
          if (folds_element(gi, gj, vi, s_val_c[c])) {
            const uint32_t o = ordered_key(key);
            rmin[mt][h] = min_ordered(rmin[mt][h], o);
            cmin[nt][e] = min_ordered(cmin[nt][e], o);
          }
        }
    }
  if (nn != nullptr) {   // uniform over the grid
    // rows: reduce over the 4 lanes of a quad (same row, other columns)
#pragma unroll
    for (int mt = 0; mt < G::kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t v = rmin[mt][h];
        v = min_ordered(v, __shfl_xor_sync(0xffffffffu, v, 1));
        v = min_ordered(v, __shfl_xor_sync(0xffffffffu, v, 2));
        if ((lane & 3) == 0 && v != kNnInit) atomicMin(&s_min_r[frag_row<BT>(wm, mt, lane, h)], v);
      }
    // columns: reduce over the 8 quads (same column, other rows)
#pragma unroll
    for (int nt = 0; nt < G::kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        uint32_t v = cmin[nt][e];
        v = min_ordered(v, __shfl_xor_sync(0xffffffffu, v, 4));
        v = min_ordered(v, __shfl_xor_sync(0xffffffffu, v, 8));
        v = min_ordered(v, __shfl_xor_sync(0xffffffffu, v, 16));
        if ((lane >> 2) == 0 && v != kNnInit) atomicMin(&s_min_c[frag_col<BT>(wn, nt, lane, e)], v);
      }
    __syncthreads();
    uint32_t* nb = nn + b * N;
    for (int t = tid; t < BT; t += G::kThreads) {
      if (s_min_r[t] != kNnInit) atomicMin(&nb[r0 + t], s_min_r[t]);
      if (s_min_c[t] != kNnInit) atomicMin(&nb[c0 + t], s_min_c[t]);
    }
  }
}

// ---------------------------------------------------------------- greedy over the key matrix
// One CTA per item (blockIdx.x + b0), blockDim.x = ceil(N / ITEMS) rounded up to warps
// (<= 1024). Thread t owns tokens t*ITEMS .. t*ITEMS + ITEMS - 1: running minimum in registers,
// key row read as ITEMS/4 16-byte loads (ld % 4 == 0, keys 16-byte aligned).
// nn: ordered-uint nearest-neighbour keys (isolated start) or nullptr with start != nullptr.
// sass: kc_greedy_tuned_kernel sm_80 REDUX VOTE LDG.E.128 !LDL !STL stack==0 regs<=64 smem<=2048
// sass: kc_greedy_tuned_kernel sm_90a REDUX VOTE LDG.E.128 !LDL !STL stack==0 regs<=64 smem<=2048
template <int ITEMS>
__global__ void __launch_bounds__(1024)
    kc_greedy_tuned_kernel(Problem p, const float* __restrict__ keys, int64_t ld,
                           const uint32_t* __restrict__ nn, const int64_t* __restrict__ start,
                           int64_t k, const int64_t* __restrict__ k_per_item,
                           int64_t* __restrict__ idx, float* __restrict__ radii, int64_t b0) {
  static_assert(ITEMS % 4 == 0, "16-byte row loads");
  __shared__ uint32_t s_val[2][32];
  __shared__ int32_t s_idx[2][32];
  const int64_t b = b0 + blockIdx.x, N = p.N;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  const int64_t L = tuned_item_length(p, b);
  int64_t kb = k;
  if (k_per_item) {
    kb = k_per_item[b];
    kb = kb < 0 ? 0 : (kb > k ? k : kb);
  }
  int64_t* out_idx = idx + b * k;
  float* out_rad = radii + b * k;
  for (int64_t s = tid; s < k; s += blockDim.x) {
    out_idx[s] = -1;
    out_rad[s] = NAN;
  }
  const int64_t st = start ? start[b] : -1;
  const bool start_ok = st >= 0 && st < N && tuned_valid(p, b, st, L);
  const bool isolated = start == nullptr;
  const int32_t base = tid * ITEMS;
  float mind[ITEMS];
  uint32_t best = kOrdNone;
  int32_t best_j = 0;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int32_t j = base + it;
    const bool v = j < N && tuned_valid(p, b, j, L);
    mind[it] = v ? INFINITY : -INFINITY;
    if (j < N) {
      const float nnj = (isolated && v) ? decode_nn(nn[b * N + j]) : 0.0f;
      fold_argmax(best, best_j, ordered_key(first_score(v, isolated, nnj, start_ok, st, j)), j);
    }
  }
  // block arg-max: warp REDUX + ballot, then the warps' partials (double-buffered smem)
  int buf = 0;
  auto block_argmax = [&](uint32_t v, int32_t j, int32_t& out_j) -> uint32_t {
    uint32_t m = __reduce_max_sync(0xffffffffu, v);
    int32_t wj = __shfl_sync(0xffffffffu, j, first_lane(__ballot_sync(0xffffffffu, v == m)));
    if (lane == 0) {
      s_val[buf][warp] = m;
      s_idx[buf][warp] = wj;
    }
    __syncthreads();
    const uint32_t pv = lane < nwarps ? s_val[buf][lane] : kOrdNone;
    const int32_t pj = lane < nwarps ? s_idx[buf][lane] : 0;
    buf ^= 1;
    m = __reduce_max_sync(0xffffffffu, pv);
    out_j = __shfl_sync(0xffffffffu, pj, first_lane(__ballot_sync(0xffffffffu, pv == m)));
    return m;
  };
  int32_t pick = 0;
  uint32_t top = block_argmax(best, best_j, pick);
  if (kb == 0 || nothing_left(top)) return;
  float rad = INFINITY;
  if (isolated && ordered_value(top) != INFINITY) rad = dist_from_key(p.metric, ordered_value(top));
  const float* kbase = keys + b * N * ld;
  for (int64_t s = 0; s < kb; ++s) {
    if (tid == 0) {
      out_idx[s] = pick;
      out_rad[s] = rad;
    }
#pragma unroll
    for (int it = 0; it < ITEMS; ++it)
      if (base + it == pick) mind[it] = -INFINITY;   // the owner marks it selected
    if (s + 1 == kb) break;
    const float* row = kbase + int64_t(pick) * ld;
    best = kOrdNone;
    best_j = 0;
    if (base < N) {   // whole 4-float groups below ld; tokens >= N hold -inf and stay there
      float kr[ITEMS];
#pragma unroll
      for (int q = 0; q < ITEMS / 4; ++q) {
        if (base + 4 * q < ld) {
          const float4 v4 = __ldcg(reinterpret_cast<const float4*>(row + base + 4 * q));
          kr[4 * q] = v4.x;
          kr[4 * q + 1] = v4.y;
          kr[4 * q + 2] = v4.z;
          kr[4 * q + 3] = v4.w;
        } else {
          kr[4 * q] = kr[4 * q + 1] = kr[4 * q + 2] = kr[4 * q + 3] = -INFINITY;
        }
      }
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const float v = base + it < N ? fminf(mind[it], kr[it]) : -INFINITY;
        mind[it] = v;
        fold_argmax(best, best_j, ordered_key(v), base + it);
      }
    }
    top = block_argmax(best, best_j, pick);
    if (nothing_left(top)) break;   // nothing left (only without `check`)
    rad = dist_from_key(p.metric, ordered_value(top));
  }
}

}  // namespace tuned_impl
}  // namespace device
}  // namespace kcenter
}  // namespace tokenkernels
