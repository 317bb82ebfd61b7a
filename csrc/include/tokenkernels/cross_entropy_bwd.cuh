// cross_entropy family, impl="tuned" backward: the recompute GEMM whose epilogue writes dZ and
// the skip mask (torch-free device code; launcher in csrc/cross_entropy/cross_entropy_bwd_kernels.cu,
// host API, planner and the epilogue arithmetic in cross_entropy_bwd.h).
//
// ce_bwd_dz_tc_kernel: one CTA per 128 x 128 tile of the chunk's logits (blockIdx.x = token
// tile, the fast index, so consecutive CTAs share one weight tile and hidden stays in L2).
//   prologue  thread t (of 128) stages token row t of the tile (lse, coefficients, filter
//             threshold, target column: dz_row) and its bias value t in shared memory;
//   mainloop  kStages-deep cp.async pipeline (16-byte cp.async.cg, zero-filled past N / V / D)
//             of 128 x 32 hidden and weight tiles in a swizzled K-major shared layout
//             (Swizzle<2,3,3>: conflict-free 16-byte stores and ldmatrix); CuTe's
//             SM75_U32x4_LDSM_N ldmatrix into registers and SM80 m16n8k16 mma.sync
//             (bf16/fp16 in, fp32 accumulators), 2 x 2 warps of 64 x 64 (32 x 32 atom tile);
//   epilogue  each accumulator -> dz_value (cross_entropy_bwd.h, the code the CPU emulation
//             runs) -> times gscale, rounded to T, staged in shared memory (padded pitch); the
//             keep flags of the two 64 x 128 filter sub-tiles are OR-reduced by two barriers;
//             then 16-byte coalesced stores of the tile (zeros for a dropped sub-tile) and the
//             mask bytes.
// No atomics on floating-point data; each dZ entry has exactly one writer. The CuTe index
// arithmetic (stage layout bijective with contiguous 16-byte cp.async chunks, accumulator
// coverage, ldmatrix sources) is checked on the CPU by tests/cross_entropy/test_bwd_layout.py
// (tests/cross_entropy/cuda_host/ce_bwd_layout_check.cu, built by nvcc as host code).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>

#include "tokenkernels/common.h"
#include "tokenkernels/cross_entropy.h"
#include "tokenkernels/cross_entropy_bwd.h"

namespace tokenkernels {
namespace cross_entropy {
namespace bwd {
namespace device {

template <typename T> struct MmaOp;
template <> struct MmaOp<cute::bfloat16_t> { using type = cute::SM80_16x8x16_F32BF16BF16F32_TN; };
template <> struct MmaOp<cute::half_t> { using type = cute::SM80_16x8x16_F32F16F16F32_TN; };

// Compile-time configuration of the recompute kernel for element type T (cute::bfloat16_t or
// cute::half_t).
template <typename T>
struct Cfg {
  // K-major 8 x 32 atom (64-byte rows), swizzled so that the 8 rows of an ldmatrix 8x8 matrix
  // and the 16-byte cp.async stores of a warp hit distinct banks.
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<2, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kTileK>>, cute::Stride<cute::Int<kTileK>, cute::_1>>{}));
  using SmemA = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kTileM>, cute::Int<kTileK>, cute::Int<kStages>>{}));
  using SmemB = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kTileN>, cute::Int<kTileK>, cute::Int<kStages>>{}));
  // 2 x 2 warps; the 32 x 32 x 16 permutation tile gives each warp two adjacent n8 atoms
  // (ldmatrix .x4 for B); repeated 4 x 4 over the CTA tile, every warp holds a 64 x 64 share
  // (32 mma per 16-feature step for 8 ldmatrix.x4)
  using TiledMma = decltype(cute::make_tiled_mma(
      typename MmaOp<T>::type{}, cute::Layout<cute::Shape<cute::_2, cute::_2, cute::_1>>{},
      cute::Tile<cute::_32, cute::_32, cute::_16>{}));
  using S2RAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, T>;

  static constexpr int kStageElems = kTileM * kTileK;   // per operand and stage (kTileM == kTileN)
  static constexpr int kPipeBytes = 2 * kStages * kStageElems * int(sizeof(T));
  static constexpr int kLdStage = kTileN + 8;           // dZ staging pitch (elements)
  static constexpr int kStageBytes = kTileM * kLdStage * int(sizeof(T));
  static constexpr int kMainBytes = kPipeBytes > kStageBytes ? kPipeBytes : kStageBytes;
  static constexpr int kRowBytes = kTileM * int(sizeof(DzRow));
  static constexpr int kBiasBytes = kTileN * int(sizeof(float));
  static constexpr int kSmemBytes = kMainBytes + kRowBytes + kBiasBytes;
  static_assert(kTileM == kTileN, "one stage size for both operands");
  static_assert(kThreads == cute::size(TiledMma{}), "one thread per tiled-MMA thread");
  static_assert(kThreads == kTileM && kThreads == kTileN, "prologue: one row and one column per thread");
  static_assert(kStageBytes <= kPipeBytes, "the dZ staging tile fits in the pipeline buffers");
  static_assert(kMainBytes % 16 == 0, "row table 16-byte aligned");
};

// sass: ce_bwd_dz_tc_kernel sm_80 HMMA LDGSTS LDSM !LDL !STL stack==0 regs<=255
// sass: ce_bwd_dz_tc_kernel sm_90a HMMA LDGSTS LDSM !LDL !STL stack==0 regs<=255
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
ce_bwd_dz_tc_kernel(ChunkArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using C = Cfg<T>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smA = reinterpret_cast<T*>(smem_raw);
  T* smB = smA + kStages * C::kStageElems;
  T* stage = reinterpret_cast<T*>(smem_raw);  // dZ staging, after the mainloop
  DzRow* rows = reinterpret_cast<DzRow*>(smem_raw + C::kMainBytes);
  float* bias_s = reinterpret_cast<float*>(smem_raw + C::kMainBytes + C::kRowBytes);

  const int tid = threadIdx.x;
  const int64_t N = a.N, D = a.D;
  const int64_t row0 = int64_t(blockIdx.x) * kTileM;
  const int64_t n0 = int64_t(blockIdx.y) * kTileN;  // first column of the tile inside the chunk
  const int64_t vt0 = a.v0 + n0;                    // ... as a shard column
  const int64_t vend = a.v0 + a.cols;               // first shard column past the chunk

  // ---- prologue: per-row and per-column epilogue constants (thread tid: row tid, column tid)
  {
    const int64_t r = row0 + tid;
    DzRow dr;  // rows past N: not live (zeros)
    if (r < N) {
      const int64_t lt = target_column(a.tg.t[r], a.tg.ignore_index, a.tg.vocab_start, a.tg.V);
      dr = dz_row(a.lse[r], a.cp[r], a.ct[r], a.c1 ? a.c1[r] : 0.f, a.feps, lt);
    }
    rows[tid] = dr;
    const int64_t v = vt0 + tid;
    bias_s[tid] = (a.bias && v < vend) ? a.bias[v] : 0.f;
  }

  // ---- mainloop
  const T* H = static_cast<const T*>(a.hidden);
  const T* W = static_cast<const T*>(a.weight);
  Tensor sA = make_tensor(make_smem_ptr(smA), typename C::SmemA{});  // (128, 32, P)
  Tensor sB = make_tensor(make_smem_ptr(smB), typename C::SmemB{});  // (128, 32, P)
  const int64_t k_tiles = (D + kTileK - 1) / kTileK;

  // cp.async of k-tile kt into pipeline stage s: 128 rows x 4 16-byte chunks per operand,
  // kCopies chunks per thread and operand. Rows past N (hidden) / the chunk (weight) and features
  // past D are zero-filled (D % 8 == 0: a 16-byte chunk is wholly in or out).
  constexpr int kChunksPerRow = kTileK / 8;
  constexpr int kCopies = kTileM * kChunksPerRow / kThreads;
  auto load_tile = [&](int s, int64_t kt) {
    const int64_t k0 = kt * kTileK;
    CUTE_UNROLL
    for (int i = 0; i < kCopies; ++i) {
      const int c = tid + i * kThreads;
      const int rr = c / kChunksPerRow, kc = (c % kChunksPerRow) * 8;
      const bool kin = k0 + kc < D;
      {
        const int64_t gr = row0 + rr;
        const bool ok = kin && gr < N;
        const T* src = ok ? H + gr * D + k0 + kc : H;
        SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(
            *reinterpret_cast<const uint128_t*>(src),
            *reinterpret_cast<uint128_t*>(&sA(rr, kc, s)), ok);
      }
      {
        const int64_t gv = vt0 + rr;
        const bool ok = kin && gv < vend;
        const T* src = ok ? W + gv * D + k0 + kc : W;
        SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(
            *reinterpret_cast<const uint128_t*>(src),
            *reinterpret_cast<uint128_t*>(&sB(rr, kc, s)), ok);
      }
    }
  };

  typename C::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));  // (MMA, MMA_N, MMA_K)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kTileM>, Int<kTileN>>{});  // (MMA, MMA_M, MMA_N)
  clear(acc);

  auto s2r_a = make_tiled_copy_A(typename C::S2RAtom{}, mma);
  auto s2r_thr_a = s2r_a.get_slice(tid);
  Tensor tXsA = s2r_thr_a.partition_S(sA);  // (CPY, MMA_M, MMA_K, P)
  Tensor tXrA = s2r_thr_a.retile_D(tCrA);
  auto s2r_b = make_tiled_copy_B(typename C::S2RAtom{}, mma);
  auto s2r_thr_b = s2r_b.get_slice(tid);
  Tensor tXsB = s2r_thr_b.partition_S(sB);  // (CPY, MMA_N, MMA_K, P)
  Tensor tXrB = s2r_thr_b.retile_D(tCrB);
  constexpr int kBlocks = decltype(size<2>(tCrA))::value;  // k16 steps per k-tile

  CUTE_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_fence();
  }
  CUTE_NO_UNROLL
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    // k-tile kt has landed (at most kStages - 2 younger groups pending) and every thread is
    // done with the stage read in iteration kt - 1, which the next load overwrites
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int64_t nt = kt + kStages - 1;
    if (nt < k_tiles) load_tile(int(nt % kStages), nt);
    cp_async_fence();
    const int s = int(kt % kStages);
    CUTE_UNROLL
    for (int kb = 0; kb < kBlocks; ++kb) {
      copy(s2r_a, tXsA(_, _, kb, s), tXrA(_, _, kb));
      copy(s2r_b, tXsB(_, _, kb, s), tXrB(_, _, kb));
      gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline buffers free for the staging tile; rows / bias_s visible

  // ---- epilogue: dZ, keep flags, staging
  const float sc = a.gscale ? a.gscale[0] : 1.f;
  const float cap = a.cap;
  Tensor cC = make_identity_tensor(Shape<Int<kTileM>, Int<kTileN>>{});
  Tensor tCcC = thr_mma.partition_C(cC);  // (m, n) of every accumulator
  int keep0 = 0, keep1 = 0;
  // dZ in place of the accumulators first, the staging stores after: no shared-memory store
  // between the reads of one row's constants, so each is read once per thread and row
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int m = get<0>(tCcC(i)), n = get<1>(tCcC(i));
    const DzRow& dr = rows[m];
    const int64_t v = vt0 + n;
    float x = 0.f;
    if (v < vend) x = dz_value(dr, acc(i), bias_s[n], cap, v);
    const int k = filter_keeps(x, dr.thr) ? 1 : 0;
    if (m < kSubM) keep0 |= k; else keep1 |= k;
    acc(i) = x * sc;
  }
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int m = get<0>(tCcC(i)), n = get<1>(tCcC(i));
    stage[m * C::kLdStage + n] = T(acc(i));
  }
  keep0 = __syncthreads_or(keep0);  // also: the staging tile is complete
  keep1 = __syncthreads_or(keep1);

  // ---- 16-byte stores of the tile's rows < N (a dropped sub-tile as zeros)
  T* dZ = static_cast<T*>(a.dZ);
  constexpr int kVecPerRow = kTileN / 8;
  CUTE_UNROLL
  for (int i = 0; i < kTileM * kVecPerRow / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int rr = c / kVecPerRow, vc = (c % kVecPerRow) * 8;
    const int64_t r = row0 + rr;
    if (r < N) {
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (rr < kSubM ? keep0 : keep1)
        val = *reinterpret_cast<const uint4*>(stage + rr * C::kLdStage + vc);
      *reinterpret_cast<uint4*>(dZ + r * a.ld + n0 + vc) = val;
    }
  }
  if (tid == 0) {
    unsigned long long dropped = 0;
    CUTE_UNROLL
    for (int sub = 0; sub < kTileM / kSubM; ++sub) {
      const int64_t r = row0 + sub * kSubM;
      if (r >= N) break;
      const int kept = sub == 0 ? keep0 : keep1;
      if (a.mask) a.mask[mask_index(r, vt0, a.mask_cols)] = static_cast<unsigned char>(kept);
      dropped += kept ? 0u : 1u;
    }
    if (a.skipped && dropped) atomicAdd(a.skipped, dropped);  // an integer count: exact
  }
#endif
}

}  // namespace device
}  // namespace bwd
}  // namespace cross_entropy
}  // namespace tokenkernels
