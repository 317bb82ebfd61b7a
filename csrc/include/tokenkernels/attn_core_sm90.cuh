// The attention core's sm_90a variant (issue #13 item 1, "wgmma where it pays"): the 64-row
// layout of attn_core_tc_kernel (kWN = 1: tree and prefill row blocks) with both products on
// wgmma. Host arithmetic: attn_core.h (gmma_off, wg_acc_row / wg_acc_col, wg_a_row / wg_a_col,
// wg_pa_src, tested on the CPU through torch.ops.tokenkernels._attn_core_wgmma_map); launcher:
// csrc/attention/attn_core_kernels.cu (picks it for compute capability 9.0 with sm_90a code).
//
// attn_core_wgmma_kernel<T, D, Src>: grid (B * Hkv * row_blocks, parts), 128 threads = one warpgroup.
//   * Q (64 x D) staged once in shared memory, K / V tiles of kKeyTile keys double-buffered by the
//     same 16-byte cp.async gather as attn_core_tc_kernel (offset ring, zero-fill), all in CuTe's
//     SW128 layouts (gmma_off), 1024-byte aligned; a fence.proxy.async after each thread's copies
//     landed (and after the Q stores) makes them visible to wgmma (async proxy) before the barrier;
//   * S = Q K^T: per key tile one chain of D / 16 wgmma m64n64k16 (SS: Q and K descriptors, both
//     K-major), fp32 accumulators (32 per thread, the mma.sync m16n8 fragments per warp);
//   * scale / mask / online softmax exactly as attn_core_tc_kernel (attn_core.h's row_base,
//     rescale, prob; max / sum over the 4 lanes of a quad);
//   * O += P V: P converted to 16 bit in the A-fragment register layout (wg_pa_src) and 4 wgmma
//     m64nDk16 RS (A from registers, B = the V tile as MN-major operand: no transpose copy);
//   * epilogue, workspace and the last-CTA merge as attn_core_tc_kernel.
// Every wgmma batch is waited for (wait<0>) before its results are used or its buffers reused; the
// next tile's cp.async runs under the math, and 2 CTAs per SM overlap each other's phases.
// sm_80 (and any target without the sm_90a features) compiles the kernel to an empty body; the
// launcher never launches it there.
//
// sass: attn_core_wgmma_kernel sm_90a HGMMA LDGSTS !LDL !STL stack==0 regs<=224
// sass: attn_core_wgmma_kernel sm_80 !HGMMA !HMMA !LDL !STL stack==0
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "tokenkernels/attn_core.cuh"

namespace tokenkernels {
namespace attn {
namespace device {

template <typename T> struct WgType;
template <> struct WgType<__nv_bfloat16> { using type = cutlass::bfloat16_t; };
template <> struct WgType<__half> { using type = cutlass::half_t; };

template <typename T, int D>
struct WgCfg {
  using CT = typename WgType<T>::type;
  // Q (64 x D), K tiles (64 x D x kStages): K-major SW128
  using LayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<CT>{},
                                               cute::Shape<cute::_64, cute::Int<D>>{}));
  using LayoutK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<CT>{},
                                               cute::Shape<cute::_64, cute::Int<D>, cute::Int<kStages>>{}));
  // V tiles as (D, keys, kStages), MN-major SW128, keys tiled before D: the bytes of gmma_off(key, d / 8)
  using LayoutV = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<CT>{},
                                               cute::Shape<cute::Int<D>, cute::_64, cute::Int<kStages>>{},
                                               cute::Step<cute::_2, cute::_1, cute::_3>{}));
  using AtomS = decltype(cute::GMMA::ss_op_selector<CT, CT, float, cute::Shape<cute::_64, cute::_64, cute::_16>,
                                                    cute::GMMA::Major::K, cute::GMMA::Major::K>());
  using AtomO = decltype(cute::GMMA::rs_op_selector<CT, CT, float, cute::Shape<cute::_64, cute::Int<D>, cute::_16>,
                                                    cute::GMMA::Major::K, cute::GMMA::Major::MN>());
  using MmaS = decltype(cute::make_tiled_mma(AtomS{}));
  using MmaO = decltype(cute::make_tiled_mma(AtomO{}));
};

// Compile-time proofs that attn_core.h's maps are CuTe's: the shared-memory layouts are gmma_off,
// the S accumulator is (wg_acc_row, wg_acc_col), the A fragment is (wg_a_row, wg_a_col). The SW128
// layouts are ComposedLayout<Swizzle<3,4,3>, smem_ptr_flag, L>: CuTe applies the swizzle to the
// BYTE address (swizzle_ptr), so the element is at Swizzle(2 * L(coord)) / 2 from a 1024-aligned base.
// kMode 0: L (rows, D); 1: L (rows, D, stage); 2: L (D, rows, stage) -- stage 0, and stage 1 at 64 D.
template <class L, int D, int kMode>
constexpr bool layout_is_gmma_off() {
  constexpr auto sw = L{}.layout_a();
  constexpr auto lb = L{}.layout_b();
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < D / 8; ++c)
      for (int e = 0; e < 8; e += 7) {
        const int want = gmma_off(r, c) + e;
        int pos = 0;
        if constexpr (kMode == 0) pos = int(lb(r, c * 8 + e));
        if constexpr (kMode == 1) pos = int(lb(r, c * 8 + e, 0));
        if constexpr (kMode == 2) pos = int(lb(c * 8 + e, r, 0));
        if (int(sw(2 * pos)) / 2 != want) return false;
      }
  if constexpr (kMode == 1 || kMode == 2) return int(lb(0, 0, 1)) == 64 * D;
  return true;
}
template <class Atom, int N>
constexpr bool c_layout_is_wg_acc() {
  using CL = typename cute::MMA_Traits<Atom>::CLayout;   // (thread, value) -> m + 64 n
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < N / 2; i += (i == 15 ? N / 2 - 24 : 1))   // values 0..15 and the last 8
      if (int(CL{}(t, i)) != wg_acc_row(t, i) + 64 * wg_acc_col(t, i)) return false;
  return true;
}
template <class Atom>
constexpr bool a_layout_is_wg_a() {
  using AL = typename cute::MMA_Traits<Atom>::ALayout;   // (thread, value) -> m + 64 k
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < 8; ++v)
      if (int(AL{}(t, v)) != wg_a_row(t, v) + 64 * wg_a_col(t, v)) return false;
  return true;
}

template <typename T, int D, typename Src>
__global__ void __launch_bounds__(kThreads, 2)
    attn_core_wgmma_kernel(Src src, const T* __restrict__ Kc, const T* __restrict__ Vc, float scale_log2,
                           int64_t row_blocks, int64_t Hkv, float* __restrict__ ws_o, float* __restrict__ ws_lse,
                           int* __restrict__ tickets) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL) && defined(CUTLASS_ARCH_MMA_SM90A_ENABLED)
  using namespace cute;
  using Cfg = WgCfg<T, D>;
  using CT = typename Cfg::CT;
  constexpr int ROWS = 64;
  constexpr int KT = kKeyTile;
  constexpr int NB = KT / 8;     // S n-blocks (of 8 keys) per thread's rows
  constexpr int DN = D / 8;      // O n-blocks
  constexpr int CH = D / 8;      // 16-byte chunks per row
  static_assert(KT == 64 && (D == 64 || D == 128), "64 x 64 S tiles, D 64 / 128");
  static_assert(layout_is_gmma_off<typename Cfg::LayoutQ, D, 0>(), "Q layout = gmma_off");
  static_assert(layout_is_gmma_off<typename Cfg::LayoutK, D, 1>(), "K layout = gmma_off");
  static_assert(layout_is_gmma_off<typename Cfg::LayoutV, D, 2>(), "V layout = gmma_off");
  static_assert(c_layout_is_wg_acc<typename Cfg::AtomS, 64>(), "S accumulator = wg_acc_row / col");
  static_assert(c_layout_is_wg_acc<typename Cfg::AtomO, D>(), "O accumulator = wg_acc_row / col");
  static_assert(a_layout_is_wg_a<typename Cfg::AtomO>(), "P fragment = wg_a_row / col");

  extern __shared__ unsigned char smem_raw[];
  const uintptr_t base_addr = (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023);
  T* sQ = reinterpret_cast<T*>(base_addr);
  T* sK = sQ + ROWS * D;
  T* sV = sK + kStages * KT * D;
  int64_t* sKo = reinterpret_cast<int64_t*>(sV + kStages * KT * D);   // [3][KT]
  int64_t* sVo = sKo + kOffSlots * KT;                                 // [3][KT]
  static_assert(kOffSlots == 3, "fill / issue use t % 3");

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
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
    *reinterpret_cast<uint4*>(sQ + gmma_off(r, cc)) = val;
  }

  typename Cfg::MmaS mma_s;
  typename Cfg::MmaO mma_o;
  Tensor tQ = make_tensor(make_smem_ptr(reinterpret_cast<CT*>(sQ)), typename Cfg::LayoutQ{});   // (64, D)
  Tensor tK = make_tensor(make_smem_ptr(reinterpret_cast<CT*>(sK)), typename Cfg::LayoutK{});   // (64, D, 2)
  Tensor tV = make_tensor(make_smem_ptr(reinterpret_cast<CT*>(sV)), typename Cfg::LayoutV{});   // (D, 64, 2)
  auto ts = mma_s.get_thread_slice(tid);
  auto to = mma_o.get_thread_slice(tid);
  Tensor tSrQ = ts.make_fragment_A(ts.partition_A(tQ));   // descriptors (MMA, 1, D / 16)
  Tensor tSrK = ts.make_fragment_B(ts.partition_B(tK));   // (MMA, 1, D / 16, 2)
  Tensor tOrV = to.make_fragment_B(to.partition_B(tV));   // (MMA, 1, KT / 16, 2)
  Tensor accS = partition_fragment_C(mma_s, Shape<_64, _64>{});        // ((2, 2, 8), 1, 1)
  Tensor accO = partition_fragment_C(mma_o, Shape<_64, Int<D>>{});     // ((2, 2, D / 8), 1, 1)
  Tensor tOrP = make_tensor<CT>(partition_shape_A(mma_o, Shape<_64, Int<KT>>{}));   // ((2, 2, 2), 1, 4)
  Tensor tOrP32 = recast<uint32_t>(tOrP);
  static_assert(decltype(size(accS))::value == NB * 4 && decltype(size(accO))::value == DN * 4, "accumulators");
  static_assert(decltype(size<1>(accS))::value == 1 && decltype(size<2>(accS))::value == 1 &&
                    decltype(size<1>(accO))::value == 1 && decltype(size<2>(accO))::value == 1,
                "one atom per CTA tile");
  static_assert(decltype(size<0>(tOrP))::value == 8 && decltype(size<2>(tOrP))::value == KT / 16 &&
                    decltype(size(tOrP32))::value == KT / 4,
                "P fragment: 8 values per k-step");
  static_assert(decltype(size<2>(tSrQ))::value == D / 16 && decltype(size<2>(tOrV))::value == KT / 16, "k-steps");

#pragma unroll
  for (int i = 0; i < DN * 4; ++i) accO(i) = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  const int64_t nk = ck.k1 - ck.k0;
  const int ntiles = nk > 0 ? static_cast<int>((nk + KT - 1) / KT) : 0;

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
      cp_async16(dk + gmma_off(r, cc), Kc + (a >= 0 ? a : 0) + cc * 8, a >= 0);
      cp_async16(dv + gmma_off(r, cc), Vc + (v >= 0 ? v : 0) + cc * 8, v >= 0);
    }
    cute::cp_async_fence();
  };

  if (ntiles > 0) {
    fill(0);
    cutlass::arch::fence_view_async_shared();   // Q's stores -> the async proxy (wgmma)
    __syncthreads();                            // offsets of tile 0 and Q visible
    issue(0);
    const int64_t ra = row0 + wg_acc_row(tid, 0), rbw = row0 + wg_acc_row(tid, 2);   // my 2 rows

    for (int t = 0; t < ntiles; ++t) {
      const bool more = t + 1 < ntiles;
      if (more) fill(t + 1);
      __syncthreads();   // offsets of t+1 visible; the wgmma of tile t-1 retired in every thread
      if (more) {
        issue(t + 1);
        cute::cp_async_wait<1>();
      } else {
        cute::cp_async_wait<0>();
      }
      cutlass::arch::fence_view_async_shared();   // this thread's landed copies -> async proxy
      __syncthreads();                            // tile t landed for every thread's copies
      const int st = t & 1;
      const int64_t* tko = sKo + (t % 3) * KT;
      const int64_t kb = ck.k0 + static_cast<int64_t>(t) * KT;

      // S = Q K^T: one wgmma chain over D
      warpgroup_fence_operand(accS);
      warpgroup_arrive();
      mma_s.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        cute::gemm(mma_s, tSrQ(_, _, kk), tSrK(_, _, kk, st), accS);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(accS);

      // scale, mask, row max (value 4 i + e: n-block i, element e -- acc_row / acc_col per warp)
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < NB; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int jl = wg_acc_col(tid, 4 * i + e);
          bool ok = tko[jl] >= 0;
          if (ck.masked && ok) ok = src.allowed(b, e < 2 ? ra : rbw, kb + jl);
          const float v = ok ? accS(4 * i + e) * scale_log2 : -INFINITY;
          accS(4 * i + e) = v;
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
      // P = exp2(s2 - m) into the A fragment (16 bit), l over the unrounded p
#pragma unroll
      for (int ks = 0; ks < KT / 16; ++ks) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int v0 = 2 * r;
          const int i0 = wg_pa_src(ks, v0), i1 = wg_pa_src(ks, v0 + 1);
          const float p0 = prob(accS(i0), m[(i0 >> 1) & 1]);
          const float p1 = prob(accS(i1), m[(i1 >> 1) & 1]);
          l[(i0 >> 1) & 1] += p0 + p1;
          tOrP32(4 * ks + r) = Mma<T>::pack(p0, p1);
        }
      }
      warpgroup_fence_operand(accO);
#pragma unroll
      for (int i = 0; i < DN * 4; ++i) accO(i) *= c[(i >> 1) & 1];
      // O += P V
      warpgroup_fence_operand(tOrP);
      warpgroup_fence_operand(accO);
      warpgroup_arrive();
      mma_o.accumulate_ = GMMA::ScaleOut::One;
#pragma unroll
      for (int ks = 0; ks < KT / 16; ++ks) cute::gemm(mma_o, tOrP(_, _, ks), tOrV(_, _, ks, st), accO);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(accO);
      warpgroup_fence_operand(tOrP);
    }
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 1);
    l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 2);
  }

  // ---- epilogue: every thread owns 2 rows x D / 4 columns
  const int64_t ra = row0 + wg_acc_row(tid, 0);   // and ra + 8 = wg_acc_row(tid, 2)
  const int cb = wg_acc_col(tid, 0);
  T* outp = src.out();
  float* lsep = src.lse();
  if (parts == 1) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int64_t r = ra + 8 * hr;
      if (r >= nrows) continue;
      const bool valid = src.row_valid(b, r);
      const float inv = valid ? part_inv(l[hr]) : 0.f;
      T* orow = outp + src.qrow(b, h, r) * D;
#pragma unroll
      for (int i = 0; i < DN; ++i) {   // columns 8 i + cb + {0, 1}
        const uint32_t v = Mma<T>::pack(accO(4 * i + 2 * hr) * inv, accO(4 * i + 2 * hr + 1) * inv);
        *reinterpret_cast<uint32_t*>(orow + i * 8 + cb) = v;
      }
      if (cb == 0 && lsep) lsep[src.qrow(b, h, r)] = valid ? part_lse2(m[hr], l[hr]) * kLn2 : -INFINITY;
    }
    return;
  }
  const int64_t base = gridDim.x;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t rl = wg_acc_row(tid, 2 * hr);
    const int64_t prow = (part * base + cta) * ROWS + rl;
    const float inv = part_inv(l[hr]);
    float* w = ws_o + prow * D;
#pragma unroll
    for (int i = 0; i < DN; ++i)
      *reinterpret_cast<float2*>(w + i * 8 + cb) =
          make_float2(accO(4 * i + 2 * hr) * inv, accO(4 * i + 2 * hr + 1) * inv);
    if (cb == 0) ws_lse[prow] = part_lse2(m[hr], l[hr]);
  }
  merge_parts_last<T, D, ROWS>(src, b, h, row0, nrows, parts, base, cta, ws_o, ws_lse, tickets, outp, lsep,
                               tid, warp, lane);
#endif
}

}  // namespace device
}  // namespace attn
}  // namespace tokenkernels
