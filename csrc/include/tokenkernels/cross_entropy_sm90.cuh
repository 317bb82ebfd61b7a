// cross_entropy family, impl="tuned" forward on sm_90a: a warp-specialised, persistent
// TMA + wgmma GEMM  Z = H (N x D) . W^T (D x V)  written at CuTe level, whose epilogue folds every
// 128 x 256 logit tile, in registers, into per-token running states (max, sum-exp, sum exp*z,
// sum z, arg-max, the target logit). The logits never reach global memory. Host plan, schedule
// and the fold / merge arithmetic: cross_entropy_sm90.h (shared with the CPU emulation).
//
// CTA = 3 warpgroups (384 threads, one CTA per SM: 4 stages x 48 KB of shared memory):
//   warpgroup 0  producer: one elected thread issues the TMA loads (SM90_TMA_LOAD, SW128
//                K-major tiles: A 128 x 64 of hidden, B 256 x 64 of weight per stage) into a
//                kStages-deep ring guarded by mbarriers: full[s] (transaction count: the TMA
//                bytes) and empty[s] (256 consumer arrivals); it runs up to kStages k-blocks
//                ahead, across tile and unit boundaries, so the loads of the next tile overlap
//                the epilogue of this one. Registers released to 40 (setmaxnreg).
//   warpgroups 1, 2  consumers: each owns 64 of the 128 token rows, issues
//                SM90_64x256x16 wgmma (4 per k-block, fp32 accumulators: 128 registers per
//                thread; setmaxnreg 232), keeps one wgmma batch in flight (wait<1>) and
//                releases a stage as soon as the batch that read it retired.
// Epilogue per tile and thread: 2 token rows x 64 columns: bias + softcap in place, the tile's
// max (and arg-max with aux), then sum-exp against the new running max (MUFU ex2), the target
// logit where the target column falls in the tile (written straight to zt: one tile holds it).
// At the end of a unit the 4 lanes of a row merge by shuffles and write one partial per
// (token, split); ce_fwd_sm90_merge_kernel merges the splits.
//
// sm_80 (and any target without the sm_90a features) compiles the kernel to an empty body; the
// host plan (forward_plan: compute capability 9.0 and sm_90a binary) never launches it there.
//
// sass: ce_fwd_sm90_tma_wgmma_kernel sm_90a HGMMA UTMALDG SYNCS !LDL !STL stack==0 regs<=168
// sass: ce_fwd_sm90_tma_wgmma_kernel sm_80 !HGMMA !UTMALDG !HMMA !LDL !STL stack==0
// sass: ce_fwd_sm90_merge_kernel sm_90a !LDL !STL stack==0
// sass: ce_fwd_sm90_merge_kernel sm_80 !LDL !STL stack==0
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/arch/cluster_sm90.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "tokenkernels/cross_entropy_sm90.h"

namespace tokenkernels {
namespace cross_entropy {
namespace sm90 {
namespace device {

// The wgmma atom per element type (both operands K-major in shared memory: rows of H and W).
template <class T> struct GmmaAtom;
template <> struct GmmaAtom<cutlass::bfloat16_t> {
  using type = cute::SM90_64x256x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>;
};
template <> struct GmmaAtom<cutlass::half_t> {
  using type = cute::SM90_64x256x16_F32F16F16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>;
};

template <class T>
struct Config {
  using SmemLayoutA = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::make_shape(cute::Int<kBM>{}, cute::Int<kBK>{}, cute::Int<kStages>{})));
  using SmemLayoutB = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<T>{},
      cute::make_shape(cute::Int<kBN>{}, cute::Int<kBK>{}, cute::Int<kStages>{})));
  // 2 consumer warpgroups stacked along M: warpgroup w computes rows [64 w, 64 w + 64)
  using TiledMma = decltype(cute::make_tiled_mma(
      typename GmmaAtom<T>::type{},
      cute::Layout<cute::Shape<cute::Int<kConsumerWarpgroups>, cute::_1, cute::_1>>{}));
  static constexpr int kTxBytes = (kBM + kBN) * kBK * int(sizeof(T));  // TMA bytes per stage
  static_assert(kTxBytes == kStageBytes, "stage bytes");
};

template <class T>
struct alignas(1024) SharedStorage {
  alignas(1024) T A[cute::cosize_v<typename Config<T>::SmemLayoutA>];
  alignas(1024) T B[cute::cosize_v<typename Config<T>::SmemLayoutB>];
  alignas(8) uint64_t full[kStages];
  alignas(8) uint64_t empty[kStages];
};
static_assert(sizeof(SharedStorage<cutlass::bfloat16_t>) + 1024 <= kSmemBytes, "smem budget");

// Flat index of value j (< kValsPerRow) of row half h (0, 1) in the ((2, 2, kBN / 8), 1, 1)
// accumulator fragment: mode (v0, v1, v2) = (j % 2, h, j / 2), colexicographic.
__device__ __forceinline__ constexpr int acc_index(int h, int j) {
  return (j & 1) + 2 * h + 4 * (j >> 1);
}

// kCluster = 1: one CTA per work unit. kCluster = 2 (opt-in): a cluster of 2 CTAs runs the two
// row tiles 2 p, 2 p + 1 of a unit pair p against the same vocabulary tiles; each CTA loads half
// of every 256 x 64 weight stage and multicasts it to both (SM90_TMA_LOAD_MULTICAST), halving the
// L2 -> SM weight traffic; a stage is free for a producer once the consumers of BOTH CTAs released
// it (each consumer thread arrives on its own and on the peer's empty barrier), and each producer
// ends with a wait on every stage so that no CTA exits while its peer may still signal it.
template <class T, bool kAux, int kCluster, class TmaA, class TmaB>
__global__ void __launch_bounds__(kThreads, 1)
ce_fwd_sm90_tma_wgmma_kernel(CUTE_GRID_CONSTANT TmaA const tma_a,
                             CUTE_GRID_CONSTANT TmaB const tma_b, int N, int D, int V,
                             const float* __restrict__ bias, float cap, Targets tg,
                             int row_units, int vocab_tiles, int k_blocks, int per, int splits,
                             int units, float* __restrict__ part, int32_t* __restrict__ part_idx,
                             float* __restrict__ zt) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL) && \
    defined(CUTLASS_ARCH_MMA_SM90A_ENABLED)
  using namespace cute;
  using Cfg = Config<T>;
  using FullBar = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBar = cutlass::arch::ClusterBarrier;

  extern __shared__ unsigned char smem_raw[];
  // SW128 tiles need 1024-byte aligned stages (kSmemBytes has the slack)
  const uintptr_t base = (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023);
  SharedStorage<T>& ss = *reinterpret_cast<SharedStorage<T>*>(base);
  Tensor sA = make_tensor(make_smem_ptr(ss.A), typename Cfg::SmemLayoutA{});  // (BM, BK, PIPE)
  Tensor sB = make_tensor(make_smem_ptr(ss.B), typename Cfg::SmemLayoutB{});  // (BN, BK, PIPE)

  static_assert(kCluster == 1 || kCluster == 2, "cluster of 1 or 2 CTAs");
  const int wg = threadIdx.x / 128;
  const int warp = threadIdx.x / 32;
  if (threadIdx.x == 0) {
    CUTE_UNROLL
    for (int s = 0; s < kStages; ++s) {
      FullBar::init(&ss.full[s], 1);
      EmptyBar::init(&ss.empty[s], kCluster * kConsumerWarpgroups * 128);
    }
    cutlass::arch::fence_barrier_init();
  }
  int rank = 0;  // CTA rank in the cluster
  if constexpr (kCluster > 1) {
    cute::cluster_sync();  // the barriers' init is visible to the peer before any signal
    rank = int(cute::block_rank_in_cluster());
  } else {
    __syncthreads();
  }
  const int cluster_id = int(blockIdx.x) / kCluster;
  const int num_clusters = int(gridDim.x) / kCluster;
  const int n_row_tiles = (N + kBM - 1) / kBM;

  // (rows, D) TMA coordinate tensors, tiled: (BM, BK, row tile, k block), (BN, BK, vt, kb)
  Tensor mA = tma_a.get_tma_tensor(make_shape(N, D));
  Tensor mB = tma_b.get_tma_tensor(make_shape(V, D));
  Tensor gA = local_tile(mA, Shape<Int<kBM>, Int<kBK>>{}, make_coord(_, _));
  Tensor gB = local_tile(mB, Shape<Int<kBN>, Int<kBK>>{}, make_coord(_, _));

  if (wg == 0) {
    // ---------------------------------------------------------------------- producer
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (warp == 0 && elect_one_sync()) {
      prefetch_tma_descriptor(tma_a.get_tma_descriptor());
      prefetch_tma_descriptor(tma_b.get_tma_descriptor());
      auto [tAgA, tAsA] = tma_partition(tma_a, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sA),
                                        group_modes<0, 2>(gA));  // (TMA, RT, KB), (TMA, PIPE)
      // kCluster = 2: this CTA's half of each weight stage, multicast to both CTAs
      auto [tBgB, tBsB] = tma_partition(tma_b, rank, Layout<Int<kCluster>>{},
                                        group_modes<0, 2>(sB),
                                        group_modes<0, 2>(gB));  // (TMA, VT, KB), (TMA, PIPE)
      int stage = 0;
      uint32_t phase = 0;
      for (int u = cluster_id; u < units; u += num_clusters) {
        int rtu, sp, vb, ve;
        unit_tiles(u, row_units, vocab_tiles, per, &rtu, &sp, &vb, &ve);
        // the pair's second row tile past the last one (odd row tile count) loads the last
        // row tile again (no fully out-of-bounds box); its consumers write nothing
        const int rt_all = rtu * kCluster + rank;
        const int rt = rt_all < n_row_tiles ? rt_all : n_row_tiles - 1;
        for (int vt = vb; vt < ve; ++vt) {
          for (int kb = 0; kb < k_blocks; ++kb) {
            EmptyBar::wait(&ss.empty[stage], phase ^ 1);  // a fresh barrier passes parity 1
            FullBar::arrive_and_expect_tx(&ss.full[stage], Cfg::kTxBytes);
            copy(tma_a.with(ss.full[stage]), tAgA(_, rt, kb), tAsA(_, stage));
            if constexpr (kCluster == 1)
              copy(tma_b.with(ss.full[stage]), tBgB(_, vt, kb), tBsB(_, stage));
            else
              copy(tma_b.with(ss.full[stage], uint16_t((1u << kCluster) - 1)), tBgB(_, vt, kb),
                   tBsB(_, stage));
            if (++stage == kStages) {
              stage = 0;
              phase ^= 1;
            }
          }
        }
      }
      if constexpr (kCluster > 1) {
        // every stage released by the consumers of both CTAs: no signal into this CTA pends
        for (int s = 0; s < kStages; ++s) {
          EmptyBar::wait(&ss.empty[stage], phase ^ 1);
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    // ---------------------------------------------------------------------- consumers
    cutlass::arch::warpgroup_reg_alloc<232>();
    const int ct = threadIdx.x - 128;  // 0..255 over the two consumer warpgroups
    typename Cfg::TiledMma mma;
    auto thr = mma.get_thread_slice(ct);
    Tensor tCsA = thr.partition_A(sA);  // (MMA, MMA_M, MMA_K, PIPE)
    Tensor tCsB = thr.partition_B(sB);  // (MMA, MMA_N, MMA_K, PIPE)
    Tensor tCrA = thr.make_fragment_A(tCsA);  // smem descriptors
    Tensor tCrB = thr.make_fragment_B(tCsB);
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // ((2,2,32),1,1) fp32
    static_assert(decltype(size(acc))::value == 2 * kValsPerRow, "accumulator fragment");
    static_assert(decltype(size<0, 0>(acc))::value == 2 && decltype(size<0, 1>(acc))::value == 2 &&
                      decltype(size<0, 2>(acc))::value == kBN / 8 &&
                      decltype(size<1>(acc))::value == 1 && decltype(size<2>(acc))::value == 1,
                  "the SM90 64xN fp32 C layout ((2, 2, N/8), 1, 1)");
    // tile coordinates (row, column) of every accumulator element of this thread
    Tensor tCcC = thr.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    const int row_in_tile[2] = {int(get<0>(tCcC(acc_index(0, 0)))),
                                int(get<0>(tCcC(acc_index(1, 0))))};
    // columns: c0 + acc_col(0, j) (the layout the header documents and the CPU emulation
    // uses); checked once against CuTe's own coordinates, which fold to constants (no code
    // unless they disagree)
    const int c0 = int(get<1>(tCcC(acc_index(0, 0))));
    CUTE_UNROLL
    for (int j = 0; j < kValsPerRow; ++j) {
      if (int(get<1>(tCcC(acc_index(0, j)))) != c0 + acc_col(0, j) ||
          int(get<1>(tCcC(acc_index(1, j)))) != c0 + acc_col(0, j) ||
          int(get<0>(tCcC(acc_index(1, j)))) != row_in_tile[1] ||
          int(get<0>(tCcC(acc_index(0, j)))) != row_in_tile[0])
        __trap();
    }
    // the 4 lanes xor 1 / xor 2 of a row share its rows (the partial merge's shuffles)
    if (__shfl_xor_sync(0xffffffffu, row_in_tile[0], 1) != row_in_tile[0] ||
        __shfl_xor_sync(0xffffffffu, row_in_tile[0], 2) != row_in_tile[0] ||
        c0 != acc_col(ct & (kLanesPerRow - 1), 0))
      __trap();
    auto off = [](int j) { return acc_col(0, j); };

    int stage = 0;
    uint32_t phase = 0;
    const float inv_cap = cap > 0.f ? 1.f / cap : 0.f;
    auto release = [&](int s) {
      EmptyBar::arrive(&ss.empty[s]);
      if constexpr (kCluster > 1) EmptyBar::arrive(&ss.empty[s], uint32_t(rank ^ 1), 1u);
    };
    for (int u = cluster_id; u < units; u += num_clusters) {
      int rtu, sp, vb, ve;
      unit_tiles(u, row_units, vocab_tiles, per, &rtu, &sp, &vb, &ve);
      const int rt = rtu * kCluster + rank;  // rows >= N (a padded pair tile) write nothing
      int64_t row[2], lt[2];
      RowFold f[2];
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        row[h] = int64_t(rt) * kBM + row_in_tile[h];
        lt[h] = row[h] < N ? shard_target(tg.t[row[h]], tg.ignore_index, tg.vocab_start, tg.V,
                                          tg.vocab_total)
                           : -1;
        fold_init(f[h]);
      }

      for (int vt = vb; vt < ve; ++vt) {
        // ------------------------------------------------------------ mainloop over D
        mma.accumulate_ = GMMA::ScaleOut::Zero;
        int prev = 0;
        for (int kb = 0; kb < k_blocks; ++kb) {
          FullBar::wait(&ss.full[stage], phase);
          warpgroup_fence_operand(acc);
          warpgroup_arrive();
          CUTE_UNROLL
          for (int k = 0; k < size<2>(tCrA); ++k) {
            cute::gemm(mma, tCrA(_, _, k, stage), tCrB(_, _, k, stage), acc);
            mma.accumulate_ = GMMA::ScaleOut::One;
          }
          warpgroup_commit_batch();
          warpgroup_wait<1>();  // the batch of k-block kb - 1 retired: its stage is free
          warpgroup_fence_operand(acc);
          if (kb > 0) release(prev);
          prev = stage;
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc);
        release(prev);

        // ------------------------------------------------------------ epilogue: fold
        const int v0 = vt * kBN;
        const int ncols = V - v0 < kBN ? V - v0 : kBN;
        if (bias != nullptr || cap > 0.f) {
          CUTE_UNROLL
          for (int j = 0; j < kValsPerRow; ++j) {
            const int c = c0 + off(j);
            const float b = (bias != nullptr && c < ncols) ? __ldg(bias + v0 + c) : 0.f;
            acc(acc_index(0, j)) = logit_of(acc(acc_index(0, j)), b, cap, inv_cap);
            acc(acc_index(1, j)) = logit_of(acc(acc_index(1, j)), b, cap, inv_cap);
          }
        }
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          auto z = [&](int j) { return acc(acc_index(h, j)); };
          if (ncols == kBN)
            fold_tile<kValsPerRow, false, kAux>(f[h], z, off, c0, v0, ncols);
          else
            fold_tile<kValsPerRow, true, kAux>(f[h], z, off, c0, v0, ncols);
          const int64_t d = lt[h] - v0 - c0;  // the target's offset from c0, if it is here
          if (d >= 0 && d < kBN) {
            CUTE_UNROLL
            for (int j = 0; j < kValsPerRow; ++j)
              if (off(j) == int(d)) zt[row[h]] = z(j);
          }
        }
      }

      // ---------------------------------------------------------------- unit done: partials
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        CUTE_UNROLL
        for (int o = 1; o < kLanesPerRow; o <<= 1) {
          RowFold b;
          b.m = __shfl_xor_sync(0xffffffffu, f[h].m, o);
          b.s = __shfl_xor_sync(0xffffffffu, f[h].s, o);
          b.tz = __shfl_xor_sync(0xffffffffu, f[h].tz, o);
          b.sz = __shfl_xor_sync(0xffffffffu, f[h].sz, o);
          b.mx = __shfl_xor_sync(0xffffffffu, f[h].mx, o);
          b.am = __shfl_xor_sync(0xffffffffu, f[h].am, o);
          merge_fold(f[h], b);
        }
        if ((ct & (kLanesPerRow - 1)) == 0 && row[h] < N)
          store_partial(f[h], part, part_idx, row[h] * splits + sp);  // int64 slot
      }
    }
  }
#endif
}

// One thread per token: merge the token's split partials (in split order) into st.
template <int kMergeThreads>
__global__ void __launch_bounds__(kMergeThreads)
ce_fwd_sm90_merge_kernel(int64_t N, int64_t splits, const float* __restrict__ part,
                         const int32_t* __restrict__ part_idx, FwdState st) {
  const int64_t r = blockIdx.x * int64_t(kMergeThreads) + threadIdx.x;
  if (r >= N) return;
  const RowFold f = merge_splits(part, part_idx, r, splits);
  st.m[r] = f.m;
  st.s[r] = f.s;
  if (st.tz) st.tz[r] = f.tz;
  if (st.sumz) st.sumz[r] = f.sz;
  if (st.amax) {
    st.maxz[r] = f.mx;
    st.amax[r] = f.mx > -INFINITY ? int64_t(f.am) : 0;  // no logit > -inf: 0, as every path
  }
}

}  // namespace device
}  // namespace sm90
}  // namespace cross_entropy
}  // namespace tokenkernels
