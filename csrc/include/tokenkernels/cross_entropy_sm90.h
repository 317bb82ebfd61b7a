// cross_entropy family, impl="tuned" forward: the sm_90a TMA + wgmma GEMM whose epilogue folds
// the logits into per-token partial states (csrc/include/tokenkernels/cross_entropy_sm90.cuh,
// launchers in csrc/cross_entropy/cross_entropy_sm90_kernels.cu). This header is torch-free and
// compiles with the host compiler alone: the tile constants, the host plan (which path runs,
// splits, persistent schedule, workspace) and the TK_HD fold / merge arithmetic that the kernel
// runs and that the private CPU ops _cross_entropy_fwd_plan / _cross_entropy_fwd_emulate
// (csrc/cross_entropy/cross_entropy_sm90_host.cpp) run on the same inputs for the tests.
//
// Work decomposition. Logit tiles are kBM tokens x kBN vocabulary rows (K loop over D in kBK
// steps, zero-filled by TMA past N / V / D). The vocabulary tiles of the shard are cut into
// `splits` contiguous runs of tiles_per_split tiles; a work unit is (row unit, split sp),
// numbered u = sp * row_units + row unit (row units fastest, so the CTAs running at the same
// time read the same weight tiles: one HBM pass over the weight, hidden stays in L2); a row
// unit is one row tile (cluster 1) or the pair of row tiles 2 p, 2 p + 1 (cluster 2, one per
// CTA of the cluster, sharing the weight tiles by TMA multicast). The kernel is persistent:
// cluster c runs units c, c + clusters, c + 2 clusters, ... and walks each unit's vocabulary
// tiles in order, its consumer threads folding every logit tile into per-thread running states
// held in registers. At the end of a unit the 4 lanes that share a token row merge their
// states (shuffles) and lane 0 writes one partial state (m, s, tz, sum z, max z, arg-max) of
// (token, split) to the workspace; a second kernel merges the `splits` partials of each token.
//
// Accumulator layout (CuTe's SM90 64xN fp32 GMMA C layout, per consumer warpgroup): thread t
// of the warpgroup holds rows 16 (t / 32) + (t % 32) / 4 + {0, 8} and, for each of them, the
// kBN / 4 columns acc_col(t % 4, j) = 2 (t % 4) + (j % 2) + 8 (j / 2), j < kBN / 4. The 4
// lanes t % 4 = 0..3 of a row are adjacent (xor 1, xor 2 shuffles merge them).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "tokenkernels/common.h"
#include "tokenkernels/cross_entropy.h"

#if defined(__CUDACC__)
#define TK_CE_UNROLL _Pragma("unroll")
#else
#define TK_CE_UNROLL
#endif

namespace tokenkernels {
namespace cross_entropy {
namespace sm90 {

// ------------------------------------------------------------------------- tile configuration
constexpr int kBM = 128;                 // tokens per logit tile (2 consumer warpgroups x 64)
constexpr int kBN = 256;                 // vocabulary rows per logit tile (wgmma N = 256)
constexpr int kBK = 64;                  // features per pipeline stage (128 bytes: SW128 rows)
constexpr int kStages = 4;               // smem pipeline depth: 4 x 48 KB
constexpr int kConsumerWarpgroups = 2;
constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);  // producer warpgroup + consumers
constexpr int kLanesPerRow = 4;          // lanes sharing a token row in the accumulator layout
constexpr int kValsPerRow = kBN / kLanesPerRow;            // 64 logits per row per thread per tile
constexpr int kPartFields = 5;           // m, s, tz, sum z, max z (fp32) + arg-max (int32)
constexpr int64_t kStageBytes = int64_t(kBM + kBN) * kBK * 2;  // fp16/bf16 A + B per stage
// Dynamic shared memory of the kernel: the stages plus one 1 KB slot for the barriers (and the
// 1 KB alignment the SW128 layouts need).
constexpr int64_t kSmemBytes = kStages * kStageBytes + 2048;
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();  // TMA coordinates are int32

// Column of value j (< kValsPerRow) of lane q (< 4) of a token row inside the kBN tile.
TK_HD int acc_col(int q, int j) { return 2 * q + (j & 1) + 8 * (j >> 1); }

// ------------------------------------------------------------------------------- host plan
// Which forward runs for impl="tuned" (and why), and its schedule. Reasons are reported by the
// private op and tested; the WMMA / plain fallbacks give the same results as those impls.
enum class FwdPath : int32_t { Sm90 = 0, Wmma = 1, Plain = 2 };
enum class FwdReason : int32_t {
  Sm90 = 0,         // runs the sm_90a kernel
  NotTuned = 1,     // impl is not "tuned": the adapter's own choice (use_fused) applies
  Fp32 = 2,         // fp32 inputs: no fp32 wgmma path; the plain path (as impl="wmma")
  NoFeatures = 3,   // D == 0: the plain path (all logits = bias)
  Unaligned = 4,    // D % 8 != 0 or a 16-byte misaligned base: TMA cannot describe it
  TooLarge = 5,     // N, V or D beyond int32 (TMA coordinates): the WMMA kernels
  NotSm90 = 6,      // compute capability other than 9.0: the WMMA kernels (sm_80 fallback)
  NoSm90aCode = 7,  // this build has no sm_90a code for the kernel: the WMMA kernels
};

struct FwdPlanInput {
  int64_t N = 0, D = 0, V = 0;
  DType dtype = DType::kBFloat16;
  bool aligned16 = true;      // hidden and weight base addresses 16-byte aligned
  int cc_major = 0, cc_minor = 0;
  int sm_count = 1;
  bool sm90a_code = false;    // the kernel's binary for this device was built from sm_90a
  Impl impl = Impl::Tuned;
  int cluster = 1;            // CTAs per cluster asked for: 1, or 2 (weight-tile multicast)
};

struct FwdPlan {
  FwdPath path = FwdPath::Plain;
  FwdReason reason = FwdReason::NotTuned;
  int64_t row_tiles = 0, vocab_tiles = 0, k_blocks = 0;
  int64_t cluster = 1;        // CTAs per cluster (2: the pair shares each weight tile)
  int64_t row_units = 0;      // ceil(row_tiles / cluster): row tiles (pairs) per split
  int64_t splits = 0, tiles_per_split = 0;
  int64_t units = 0;          // row_units * splits work units (one per cluster at a time)
  int64_t grid = 0;           // persistent CTAs, cluster * clusters (one CTA per SM: the stages
                              // fill shared memory); the launcher may lower it to the clusters
                              // that fit at once (cudaOccupancyMaxActiveClusters)
  int64_t part_bytes = 0;     // fp32 partials, N * splits * kPartFields, 256-byte padded
  int64_t workspace_bytes = 0;  // part_bytes + int32 arg-max partials (N * splits), padded
  int64_t smem_bytes = 0;
  int64_t makespan_tiles = 0; // the cost the split choice minimised: tiles of the busiest CTA
};

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t pad256(int64_t v) { return (v + 255) / 256 * 256; }

// Vocabulary tiles per split for a requested split count (>= 1), and the split count that
// leaves no split empty.
TK_HD void normalise_splits(int64_t vocab_tiles, int64_t want, int64_t* per, int64_t* splits) {
  if (want < 1) want = 1;
  if (want > vocab_tiles) want = vocab_tiles;
  *per = (vocab_tiles + want - 1) / want;
  *splits = (vocab_tiles + *per - 1) / *per;
}

// Unit u of the schedule: row tile, split and its vocabulary tile range [vt_begin, vt_end).
// I: int64_t on the host, int in the kernel (units, tiles < 2^31: no 64-bit division call).
template <class I>
TK_HD void unit_tiles(I u, I row_tiles, I vocab_tiles, I per, I* rt, I* sp, I* vt_begin,
                      I* vt_end) {
  *rt = u % row_tiles;
  *sp = u / row_tiles;
  *vt_begin = *sp * per;
  const I e = *vt_begin + per;
  *vt_end = e < vocab_tiles ? e : vocab_tiles;
}

// The split count. Cost of a choice: the busiest CTA's tiles, ceil(units / sms) waves of
// tiles_per_split tiles (the units of a wave run in parallel, a CTA's units in series; the
// shorter last split is not credited). Among the choices within 1% of the least cost, the
// fewest splits (less workspace, fewer partial writes and merges). O(min(vocab_tiles, 4 sms)):
// more splits than 4 waves' worth of units per row tile only add partials.
inline void choose_splits(int64_t row_tiles, int64_t vocab_tiles, int64_t sms, int64_t* per,
                          int64_t* splits, int64_t* makespan) {
  if (sms < 1) sms = 1;
  const int64_t max_s = std::min<int64_t>(vocab_tiles, std::max<int64_t>(1, 4 * sms));
  auto cost = [&](int64_t want, int64_t* p, int64_t* s) {
    normalise_splits(vocab_tiles, want, p, s);
    return ceil_div64(row_tiles * *s, sms) * *p;
  };
  int64_t best = -1;
  for (int64_t want = 1; want <= max_s; ++want) {
    int64_t p = 0, s = 0;
    const int64_t c = cost(want, &p, &s);
    if (best < 0 || c < best) best = c;
  }
  for (int64_t want = 1; want <= max_s; ++want) {  // the first (fewest splits) within 1%
    int64_t p = 0, s = 0;
    const int64_t c = cost(want, &p, &s);
    if (c * 100 <= best * 101) {
      *per = p;
      *splits = s;
      *makespan = c;
      return;
    }
  }
}

inline FwdPlan plan_forward(const FwdPlanInput& in) {
  FwdPlan p;
  const bool lowp = in.dtype != DType::kFloat32;
  // the WMMA kernels' own condition (fused_supported), for the fallbacks
  const bool wmma_ok = lowp && in.D > 0 && in.D % 8 == 0 && in.aligned16;
  const FwdPath fallback = wmma_ok ? FwdPath::Wmma : FwdPath::Plain;
  auto fall = [&](FwdReason r) {
    p.path = fallback;
    p.reason = r;
    return p;
  };
  if (in.impl != Impl::Tuned) return fall(FwdReason::NotTuned);
  if (!lowp) return fall(FwdReason::Fp32);
  if (in.D <= 0) return fall(FwdReason::NoFeatures);
  if (!wmma_ok) return fall(FwdReason::Unaligned);
  if (in.N > kMaxDim || in.V > kMaxDim || in.D > kMaxDim) return fall(FwdReason::TooLarge);
  if (in.cc_major != 9 || in.cc_minor != 0) return fall(FwdReason::NotSm90);
  if (!in.sm90a_code) return fall(FwdReason::NoSm90aCode);
  p.path = FwdPath::Sm90;
  p.reason = FwdReason::Sm90;
  p.row_tiles = ceil_div64(std::max<int64_t>(in.N, 1), kBM);
  p.vocab_tiles = ceil_div64(std::max<int64_t>(in.V, 1), kBN);
  p.k_blocks = ceil_div64(in.D, kBK);
  p.cluster = in.cluster == 2 ? 2 : 1;
  p.row_units = ceil_div64(p.row_tiles, p.cluster);
  const int64_t slots = std::max<int64_t>(1, std::max(in.sm_count, 1) / p.cluster);
  choose_splits(p.row_units, p.vocab_tiles, slots, &p.tiles_per_split, &p.splits,
                &p.makespan_tiles);
  p.units = p.row_units * p.splits;
  p.grid = p.cluster * std::min<int64_t>(p.units, slots);
  p.part_bytes = pad256(in.N * p.splits * kPartFields * int64_t(sizeof(float)));
  p.workspace_bytes = p.part_bytes + pad256(in.N * p.splits * int64_t(sizeof(int32_t)));
  p.smem_bytes = kSmemBytes;
  return p;
}

// ------------------------------------------------------------- fold / merge arithmetic (TK_HD)
constexpr float kLog2e = 1.4426950408889634f;

// 2^x: the MUFU ex2 on the device (as __expf uses), exp2f on the host.
TK_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// z = softcap(acc + bias) = cap * tanh((acc + bias) * inv_cap), inv_cap = 1 / cap (a multiply,
// not an IEEE division: no slow-path call in the epilogue); cap <= 0: no softcap.
TK_HD float logit_of(float acc, float bias, float cap, float inv_cap) {
  const float z = acc + bias;
  return cap > 0.f ? cap * tanhf(z * inv_cap) : z;
}

// Shard-local index of target t, or -1 (ignored, another shard's, or outside [0, vocab_total)).
TK_HD int64_t shard_target(int64_t t, int64_t ignore_index, int64_t vocab_start, int64_t V,
                           int64_t vocab_total) {
  if (t == ignore_index || t < 0 || t >= vocab_total || t < vocab_start) return -1;
  const int64_t l = t - vocab_start;  // t >= vocab_start >= 0: no overflow
  return l < V ? l : -1;
}

// Running state of one token row (of one thread, one unit, one split, or all of it).
struct RowFold {
  float m;    // max z so far (-inf: none finite)
  float s;    // sum exp(z - m)
  float tz;   // sum exp(z - m) * z (entropy; aux only)
  float sz;   // sum z (label smoothing)
  float mx;   // max z for the arg-max (aux only)
  int32_t am; // shard-local arg-max, ties to the lower index; INT32_MAX = none yet
};

TK_HD void fold_init(RowFold& f) {
  f.m = -INFINITY;
  f.s = 0.f;
  f.tz = 0.f;
  f.sz = 0.f;
  f.mx = -INFINITY;
  f.am = 2147483647;
}

// Folds one tile's values of one row, NV of them: value j is z(j), at tile column c0 + off(j)
// (off: compile-time offsets after unrolling, c0: the thread's first column; global shard index
// v0 + c0 + off(j)); with kMasked only the columns < ncols exist (the shard's last tile).
// Two passes, as the kernel runs them on registers: the tile's max (and arg-max, the values
// visited in increasing column order, strict >, so ties keep the lower column), then the
// sum-exp against the new running max. sum exp * z is not guarded: a -inf logit gives NaN,
// like the reference's sum(p * z).
template <int NV, bool kMasked, bool kAux, class ZF, class OF>
TK_HD void fold_tile(RowFold& f, const ZF& z, const OF& off, int c0, int v0, int ncols) {
  const int lim = ncols - c0;  // value j exists when off(j) < lim
  float tmax = -INFINITY;
  int toff = 0;
  float sz = 0.f;
  TK_CE_UNROLL
  for (int j = 0; j < NV; ++j) {
    if (!kMasked || off(j) < lim) {
      const float zj = z(j);
      if (kAux) {
        if (zj > tmax) {
          tmax = zj;
          toff = off(j);
        }
      } else {
        tmax = fmaxf(tmax, zj);
      }
      sz += zj;
    }
  }
  f.sz += sz;
  if (!(tmax > -INFINITY)) {
    // every value -inf or NaN (a rare tile, e.g. a -inf bias block): exp(z - m) is 0 for -inf
    // and NaN for NaN, exp(z - m) * z is NaN for both (0 * -inf), as in torch's softmax and
    // sum(p * z); the running max is unchanged
    bool any = false, nan = false;
    TK_CE_UNROLL  // (register-resident values: static indices only)
    for (int j = 0; j < NV; ++j) {
      if (!kMasked || off(j) < lim) {
        any = true;
        nan |= z(j) != z(j);
      }
    }
    if (nan) f.s = NAN;
    if (kAux && any) f.tz = NAN;
    return;
  }
  if (kAux) {
    const int am = v0 + c0 + toff;
    if (argmax_better(tmax, am, f.mx, f.am)) {
      f.mx = tmax;
      f.am = am;
    }
  }
  const float mn = fmaxf(f.m, tmax);
  const float scale = fast_exp2((f.m - mn) * kLog2e);  // f.m = -inf: 0
  float s = 0.f, tz = 0.f;
  TK_CE_UNROLL
  for (int j = 0; j < NV; ++j) {
    if (!kMasked || off(j) < lim) {
      const float zj = z(j);
      const float e = fast_exp2((zj - mn) * kLog2e);
      s += e;
      if (kAux) tz = fmaf(e, zj, tz);
    }
  }
  f.s = fmaf(f.s, scale, s);
  if (kAux) f.tz = fmaf(f.tz, scale, tz);
  f.m = mn;
}

// a <- a (+) b: the merge of two running states (lanes of a row, then the splits).
TK_HD void merge_fold(RowFold& a, const RowFold& b) {
  const float mn = fmaxf(a.m, b.m);
  if (mn > -INFINITY) {
    // a side without a finite max has the factor exp(-inf) = 0 (its s, tz are 0 or NaN: NaN
    // propagates, as it does through the reference's sums)
    const float ea = fast_exp2((a.m - mn) * kLog2e), eb = fast_exp2((b.m - mn) * kLog2e);
    a.s = a.s * ea + b.s * eb;
    a.tz = a.tz * ea + b.tz * eb;
  } else {
    a.s += b.s;
    a.tz += b.tz;
  }
  a.m = mn;
  a.sz += b.sz;
  if (argmax_better(b.mx, b.am, a.mx, a.am)) {
    a.mx = b.mx;
    a.am = b.am;
  }
}

// Partial (token r, split sp) in the workspace: fp32 fields at part[(r * splits + sp) * 5],
// arg-max at idx[r * splits + sp].
TK_HD void store_partial(const RowFold& f, float* part, int32_t* idx, int64_t slot) {
  float* p = part + slot * kPartFields;
  p[0] = f.m;
  p[1] = f.s;
  p[2] = f.tz;
  p[3] = f.sz;
  p[4] = f.mx;
  idx[slot] = f.am;
}
TK_HD void load_partial(RowFold& f, const float* part, const int32_t* idx, int64_t slot) {
  const float* p = part + slot * kPartFields;
  f.m = p[0];
  f.s = p[1];
  f.tz = p[2];
  f.sz = p[3];
  f.mx = p[4];
  f.am = idx[slot];
}

// Token r's final state from its splits' partials, merged in split order.
TK_HD RowFold merge_splits(const float* part, const int32_t* idx, int64_t r, int64_t splits) {
  RowFold f;
  fold_init(f);
  for (int64_t k = 0; k < splits; ++k) {
    RowFold b;
    load_partial(b, part, idx, r * splits + k);
    merge_fold(f, b);
  }
  return f;
}

}  // namespace sm90
}  // namespace cross_entropy
}  // namespace tokenkernels

#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace tokenkernels {
namespace cross_entropy {
namespace sm90 {

// The plan for the current device (compute capability, SM count, whether the kernel's binary
// for it is sm_90a code) and these inputs. Host queries only, no sync.
// cluster: 1 (default), or 2 to ask for the weight-multicast CTA pairs (opt-in: the adapter
// reads TOKENKERNELS_CE_SM90_CLUSTER).
cudaError_t forward_plan(const void* hidden, const void* weight, DType dtype, int64_t N,
                         int64_t D, int64_t V, Impl impl, int cluster, FwdPlan* plan);

// Runs the planned sm_90a forward (plan.path == Sm90, else cudaErrorInvalidValue): the GEMM +
// fold kernel over the persistent schedule, then the merge of the splits into st (m, s, tz,
// sumz, amax, maxz as the WMMA path leaves them; zt written by the kernel; st.zt zeroed by the
// caller). st.tz / st.amax / st.maxz non-null = aux (entropy, arg-max). hidden (N, D), weight
// (V, D) row-major fp16/bf16; bias (V,) fp32 or nullptr; workspace: plan.workspace_bytes.
// The caller runs launch_finalize afterwards.
cudaError_t launch_fwd_sm90(const FwdPlan& plan, const void* hidden, const void* weight,
                            DType dtype, int64_t N, int64_t D, const float* bias, float cap,
                            const Targets& tg, const FwdState& st, void* workspace,
                            cudaStream_t stream);

}  // namespace sm90
}  // namespace cross_entropy
}  // namespace tokenkernels
#endif
