// kcenter family, impl="tuned" (issue #13 item 5): torch-free host + device helpers shared by
// the CUDA kernels (kcenter_tuned.cuh), their launchers (csrc/kcenter/kcenter_tuned_kernels.cu),
// the CUDA adapter, and the CPU planner / emulation ops (csrc/kcenter/kcenter_tuned_host.cpp,
// torch.ops.tokenkernels._kcenter_tuned_plan / _kcenter_tuned_emulate). Everything a test can
// check without a GPU lives here as TK_HD (host + device) functions the kernels call.
//
// The tuned path (fp16 / bf16 x, 1 <= N <= 8192):
//   1. kc_gram_tc_kernel: a symmetric Gram on tensor cores. Only upper-triangle tiles (I <= J)
//      of BT x BT tokens are computed (mma.sync m16n8k16, fp32 accumulation, cp.async 3-stage
//      pipeline, ldmatrix). Its epilogue turns each Gram value into the greedy's key (kcenter.h:
//      key_from_gram) and stores it at (i, j) and mirrored at (j, i) in a (B, N, ld) fp32 key
//      matrix (i < j; the diagonal once), and folds the tile's row minima and column minima over
//      valid pairs i != j into the per-token nearest-neighbour key (ordered-uint atomicMin).
//   2. kc_greedy_tuned_kernel: one CTA per item, thread t owns the contiguous tokens
//      [t*ITEMS, (t+1)*ITEMS) with their running minimum in registers; a pick's key row is read
//      with 16-byte loads; the arg-max is a 32-bit __reduce_max_sync over the ordered key plus
//      __ballot_sync (lowest lane = lowest token index, since tokens are contiguous by lane),
//      then one shared-memory combine over the warps (double buffered: one barrier per pick).
// fp32 inputs and N > 8192 run the simt / plain Gram path (cuBLAS IEEE-fp32 Gram; see
// kcenter_cuda.cpp): TF32 atoms would move fp32 distances by ~1e-3 and change picks.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "tokenkernels/common.h"
#include "tokenkernels/kcenter.h"

namespace tokenkernels {
namespace kcenter {
namespace tuned {

// ------------------------------------------------------------------ order-preserving keys
// float -> uint32 with a < b  <=>  ordered_key(a) < ordered_key(b) (for non-NaN floats).
TK_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  __builtin_memcpy(&u, &v, 4);
  return u;
#endif
}
TK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  __builtin_memcpy(&v, &u, 4);
  return v;
#endif
}
TK_HD uint32_t ordered_key(float v) {
  const uint32_t u = float_bits(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
TK_HD float ordered_value(uint32_t o) {
  return bits_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
constexpr uint32_t kOrdPosInf = 0xFF800000u;   // ordered_key(+inf)
constexpr uint32_t kOrdNegInf = 0x007FFFFFu;   // ordered_key(-inf): selected / invalid tokens
constexpr uint32_t kOrdNone = 0u;              // below every ordered float: "no candidate"
constexpr uint32_t kNnInit = 0xFFFFFFFFu;      // nn accumulator before any fold (memset 0xff)

// Nearest-neighbour key from its ordered-uint accumulator: never folded (no valid neighbour)
// reads as +inf, like launch_nn_keys.
TK_HD float decode_nn(uint32_t o) { return ordered_value(o < kOrdPosInf ? o : kOrdPosInf); }

// Thread-local arg-max fold over tokens visited in increasing index order: strict > keeps the
// lowest index among equal keys (the project's tie rule).
TK_HD void fold_argmax(uint32_t& best, int32_t& best_j, uint32_t key, int32_t j) {
  if (key > best) {
    best = key;
    best_j = j;
  }
}
// Which lane wins among those whose key equals the warp maximum (bit l of `ballot` = lane l):
// the lowest, because lane l owns lower token indices than lane l + 1.
TK_HD int first_lane(uint32_t ballot) {
#if defined(__CUDA_ARCH__)
  return __ffs(ballot) - 1;
#else
  return ballot ? __builtin_ctz(ballot) : -1;
#endif
}
// Nothing left to pick: no candidate at all (N = 0) or every token selected / invalid.
TK_HD bool nothing_left(uint32_t best) { return best <= kOrdNegInf; }

// Score of token j for the first pick (see kcenter.cuh start_score): the isolated rule takes
// the arg-max of the nearest-neighbour key; a given valid start scores 1 there and 0 elsewhere;
// an invalid start (check=False) scores 1 everywhere, i.e. the first valid token.
TK_HD float first_score(bool valid, bool isolated, float nn, bool start_ok, int64_t st, int64_t j) {
  if (!valid) return -INFINITY;
  if (isolated) return nn;
  return start_ok ? (j == st ? 1.0f : 0.0f) : 1.0f;
}

// ------------------------------------------------------------------ triangle tile schedule
// T = ceil(N / BT) tiles per side; the T (T + 1) / 2 tiles (I, J), I <= J, are numbered row by
// row: t = off(I) + (J - I) with off(I) = I*T - I*(I-1)/2. Consecutive CTAs share the A panel I.
struct TileIJ {
  int32_t i, j;
};
TK_HD int64_t triangle_count(int64_t T) { return T * (T + 1) / 2; }
TK_HD int64_t triangle_row_offset(int64_t I, int64_t T) { return I * T - I * (I - 1) / 2; }
TK_HD TileIJ triangle_tile(int64_t t, int64_t T) {
  // Row I is the largest with off(I) <= t. off is increasing; start from the real root of
  // off(I) = t and correct by whole steps (the float estimate is off by at most one or two).
  const double a = 2.0 * static_cast<double>(T) + 1.0;
  int64_t I = static_cast<int64_t>((a - sqrt(a * a - 8.0 * static_cast<double>(t))) * 0.5);
  if (I < 0) I = 0;
  if (I > T - 1) I = T - 1;
  while (I > 0 && triangle_row_offset(I, T) > t) --I;
  while (I + 1 < T && triangle_row_offset(I + 1, T) <= t) ++I;
  return {static_cast<int32_t>(I), static_cast<int32_t>(I + (t - triangle_row_offset(I, T)))};
}

// ------------------------------------------------------------------ Gram tile geometry
// Per BT: warps WM x WN, warp tile (BT/WM) x (BT/WN) = MT m16 tiles x NT n8 tiles.
template <int BT>
struct GramGeom {
  static constexpr int kBT = BT;
  static constexpr int kBK = 64;                       // k elements (bf16/fp16) per stage
  static constexpr int kStages = 3;
  static constexpr int kWM = 2;
  static constexpr int kWN = BT == 128 ? 4 : 2;
  static constexpr int kWarps = kWM * kWN;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMinBlocks = BT == 128 ? 2 : 4;   // CTAs per SM the plan assumes
  static constexpr int kWTM = BT / kWM, kWTN = BT / kWN;
  static constexpr int kMT = kWTM / 16, kNT = kWTN / 8;
  // one stage = A and B panels of BT rows x kBK elements (2 bytes): 128 bytes per row
  static constexpr int kStageBytes = 2 * BT * kBK * 2;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static constexpr int kChunksPerThread = BT * (kBK / 8) / kThreads;   // 16-byte copies / operand
  static_assert(kMT >= 1 && kNT % 2 == 0, "warp tile");
  static_assert(BT * (kBK / 8) % kThreads == 0, "loader");
};

// Swizzled element offset of (row, 16-byte chunk c) in a BT x 64 panel: chunk c of row r goes
// to slot c ^ (r & 7), so the 8 rows an ldmatrix phase reads hit 8 different bank groups.
TK_HD int smem_offset(int row, int chunk) { return row * 64 + ((chunk ^ (row & 7)) << 3); }

// cp.async loader: copy q (0 .. BT*8-1; thread tid's c-th copy is q = tid + c * threads) moves
// 16 bytes = 8 elements of panel row loader_row(q), k chunk loader_chunk(q): 8 consecutive
// threads read one 128-byte row segment.
TK_HD int loader_row(int q) { return q >> 3; }
TK_HD int loader_chunk(int q) { return q & 7; }

// ldmatrix.x4 row addresses: lane l supplies row (l & 7) of 8x8 matrix (l >> 3); register i of
// lane l then holds row l / 4, columns 2 (l % 4), +1 of matrix i.
// A (16 rows x 16 k per m tile): matrices (rows 0-7, k lo), (rows 8-15, k lo), (rows 0-7, k hi),
// (rows 8-15, k hi) = the mma's a0 .. a3.
template <int BT>
TK_HD int ldsm_a_row(int wm, int mt, int lane) {
  return wm * GramGeom<BT>::kWTM + mt * 16 + (lane & 15);
}
TK_HD int ldsm_a_chunk(int ks, int lane) { return ks * 2 + (lane >> 4); }
// B (16 n x 16 k for n tiles 2np, 2np+1; rows of x are B's columns): matrices (n 0-7, k lo),
// (n 0-7, k hi), (n 8-15, k lo), (n 8-15, k hi) = b0, b1 of n tile 2np, b0, b1 of n tile 2np+1.
template <int BT>
TK_HD int ldsm_b_row(int wn, int np, int lane) {
  return wn * GramGeom<BT>::kWTN + np * 16 + ((lane >> 4) << 3) + (lane & 7);
}
TK_HD int ldsm_b_chunk(int ks, int lane) { return ks * 2 + ((lane >> 3) & 1); }

// Accumulator fragment of mma.sync m16n8k16 (fp32 C/D): lane l holds c[h*2 + e] at
// row (l >> 2) + 8h, column 2 (l & 3) + e of its 16 x 8 tile. Tile-local coordinates for the
// warp (wm, wn), m tile mt, n tile nt:
template <int BT>
TK_HD int frag_row(int wm, int mt, int lane, int h) {
  return wm * GramGeom<BT>::kWTM + mt * 16 + (lane >> 2) + 8 * h;
}
template <int BT>
TK_HD int frag_col(int wn, int nt, int lane, int e) {
  return wn * GramGeom<BT>::kWTN + nt * 8 + 2 * (lane & 3) + e;
}
// The tile element (gi, gj) (global token indices) is stored by exactly one thread of one
// tile: the one with gi <= gj (lower-triangle elements of a diagonal tile are skipped and come
// from the mirror of their upper twin).
TK_HD bool stores_element(int64_t gi, int64_t gj, int64_t N) { return gi < N && gj < N && gi <= gj; }
// ... it also stores the mirror (gj, gi) when off the diagonal,
TK_HD bool stores_mirror(int64_t gi, int64_t gj) { return gi < gj; }
// ... and folds key(gi, gj) into nn[gi] (row minimum) and nn[gj] (column minimum) when both
// tokens are valid (vi / vj include gi < L, gj < L and not excluded).
TK_HD bool folds_element(int64_t gi, int64_t gj, bool vi, bool vj) { return gi < gj && vi && vj; }
// The epilogue's fold of one element into a running row / column minimum (ordered uints).
TK_HD uint32_t min_ordered(uint32_t a, uint32_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------ launch plan
// Inputs: B items of N tokens, D features, the device's SM count. The Gram tile BT (64 or 128)
// comes from a wave model. One CTA of a BT tile moves 2 * BT * Dp * 2 bytes (its A and B
// panels) from L2 and does 2 * BT^2 * Dp flops; a CTA-slot runs at an SM's share of the
// mma.sync rate (kSmFlops) and of L2 bandwidth (kSmL2Bytes), both divided among the
// ctas_per_sm CTAs resident per SM (BT=128: 2, BT=64: 4, by shared memory and registers), so
// t_tile = max(flops / kSmFlops, bytes / kSmL2Bytes) per CTA-slot. With n = B * T(T+1)/2 CTAs
// and slots = SMs * ctas_per_sm:
//   time = (n / slots) * ctas_per_sm * t_tile + ceil((n % slots) / SMs) * t_tile
// (full waves, then a tail whose busiest SM holds ceil(rest / SMs) CTAs). BT=128 halves the L2
// bytes per flop; BT=64 wins when BT=128 would leave SMs idle (small B * N). Ties go to 128.
// force_tile (64 or 128; 0 = model) overrides the model (tuning, tests).
constexpr double kSmFlops = 3.4e12;   // ~450 TFLOP/s of bf16 mma.sync over 132 SMs (H200)
constexpr double kSmL2Bytes = 50e9;   // ~6.6 TB/s of L2 hits over 132 SMs

struct Plan {
  int32_t ok = 0;              // 1: the tuned path applies (fp16/bf16, 1 <= N <= kMaxN)
  int32_t tile = 0;            // BT
  int64_t tiles_1d = 0;        // T
  int64_t tiles_per_item = 0;  // T(T+1)/2
  int64_t gram_ctas = 0;       // B * tiles_per_item
  int32_t gram_threads = 0;
  int32_t gram_smem = 0;       // dynamic shared memory bytes
  int32_t ctas_per_sm = 0;
  int64_t waves = 0;           // ceil(gram_ctas / (SMs * ctas_per_sm))
  int32_t greedy_items = 0;    // tokens per thread (4 or 8)
  int32_t greedy_threads = 0;  // multiple of 32, >= 32
  int64_t d_pad = 0;           // D rounded up to 8 (16-byte rows; the adapter zero-pads)
  int64_t ld = 0;              // key-matrix row stride in floats (N rounded up to 4)
  int64_t key_offset = 0, nn_offset = 0, workspace_bytes = 0;   // workspace layout (bytes)
  double est_gram_us = 0.0;    // the wave model's Gram time for the chosen tile (microseconds)
};
constexpr int64_t kMaxN = 8192;   // 8 tokens per thread x 1024 threads, registers only

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

inline Plan make_plan(int64_t B, int64_t N, int64_t D, bool low_precision, int64_t sm_count,
                      int force_tile = 0) {
  Plan p;
  if (!low_precision || N < 1 || N > kMaxN || B < 1 || D < 1 || sm_count < 1) return p;
  p.ok = 1;
  if (force_tile != 64 && force_tile != 128) force_tile = 0;
  const int tiles[2] = {128, 64};
  const int cps[2] = {2, 4};
  const int64_t Dp = ceil_div(D, 8) * 8;
  int best = -1;
  double best_cost = 0.0;
  for (int c = 0; c < 2; ++c) {
    if (force_tile && force_tile != tiles[c]) continue;
    const double bt = tiles[c];
    const double t_tile = fmax(2.0 * bt * bt * Dp / kSmFlops, 4.0 * bt * Dp / kSmL2Bytes);
    const int64_t n = B * triangle_count(ceil_div(N, tiles[c]));
    const int64_t slots = sm_count * cps[c];
    const double cost = static_cast<double>(n / slots) * cps[c] * t_tile +
                        static_cast<double>(ceil_div(n % slots, sm_count)) * t_tile;
    if (best < 0 || cost < best_cost) {
      best = c;
      best_cost = cost;
    }
  }
  p.est_gram_us = best_cost * 1e6;
  p.tile = tiles[best];
  p.ctas_per_sm = cps[best];
  p.tiles_1d = ceil_div(N, p.tile);
  p.tiles_per_item = triangle_count(p.tiles_1d);
  p.gram_ctas = B * p.tiles_per_item;
  p.gram_threads = p.tile == 128 ? GramGeom<128>::kThreads : GramGeom<64>::kThreads;
  p.gram_smem = p.tile == 128 ? GramGeom<128>::kSmemBytes : GramGeom<64>::kSmemBytes;
  p.waves = ceil_div(p.gram_ctas, sm_count * p.ctas_per_sm);
  p.greedy_items = N <= 4 * 1024 ? 4 : 8;
  p.greedy_threads = static_cast<int32_t>(ceil_div(ceil_div(N, p.greedy_items), 32) * 32);
  p.d_pad = ceil_div(D, 8) * 8;
  p.ld = ceil_div(N, 4) * 4;
  p.key_offset = 0;
  p.nn_offset = align256(B * N * p.ld * 4);
  p.workspace_bytes = p.nn_offset + align256(B * N * 4);
  return p;
}

}  // namespace tuned
}  // namespace kcenter
}  // namespace tokenkernels

// ------------------------------------------------------------------ CUDA launcher (host API)
#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace tokenkernels {
namespace kcenter {

// The whole tuned selection: nn accumulator reset (isolated start only), the symmetric Gram +
// key / nn epilogue, the greedy. x: (B, N, plan.d_pad) fp16 / bf16, contiguous, 16-byte
// aligned (zero-padded features). start nullptr: the isolated rule. workspace: plan's layout.
// No host sync. cudaErrorInvalidValue (nothing launched) when !plan.ok or x is misaligned.
cudaError_t launch_kcenter_tuned(const Problem& p, const void* x, DType dtype,
                                 const tuned::Plan& plan, const int64_t* start, int64_t k,
                                 const int64_t* k_per_item, int64_t* idx, float* radii,
                                 void* workspace, cudaStream_t stream);

}  // namespace kcenter
}  // namespace tokenkernels
#endif
