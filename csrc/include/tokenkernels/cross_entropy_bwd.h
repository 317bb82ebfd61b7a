// cross_entropy family, impl="tuned" backward: the atomic-free chunked backward (issue #13,
// item 4). Torch-free: the chunk planner and the epilogue arithmetic (TK_HD, shared by the CUDA
// kernel in cross_entropy_bwd.cuh and the CPU emulation behind the private op
// tokenkernels::_cross_entropy_bwd_emulate), and the launcher declaration.
//
// The backward walks the shard's vocabulary in chunks of Vc columns (plan_bwd). Per chunk c
// (shard columns [v0, v0 + cols), v0 = c * Vc):
//   1. launch_bwd_chunk: a tensor-core GEMM (CuTe mma.sync m16n8k16, cp.async pipeline,
//      ldmatrix) recomputes the logit tiles hidden @ weight[v0 : v0+cols]^T in fp32 and its
//      epilogue writes dZ (N, cols) in the input dtype into a chunk buffer of row pitch ld:
//        dZ = (cp * exp(z - lse) + c1 + ct * [v is the target]) * softcap'(z)   (times gscale)
//      with z = softcap(acc + bias); tokens with cp = ct = c1 = 0 give exact zeros. Gradient
//      filtering: every 64 x 128 sub-tile (aligned to global multiples of 64 tokens and 128
//      shard columns, as in the plain / WMMA backward) whose every |dZ| lies below its row's
//      filter_eps * max(|cp|, |ct|) is written as zeros and marked 0 in the skip mask (a NaN
//      always keeps its sub-tile);
//   2. (the adapter, cuBLAS through ATen, fp32 accumulation) dH32 += dZ @ W_chunk,
//      dW32[v0 : v0+cols] = dZ^T @ H written once, db32[v0 : v0+cols] = column sums of dZ.
// No atomics anywhere (bitwise run-to-run deterministic); every gradient element is
// accumulated in fp32 and rounded once, like the other CUDA paths.
#pragma once
#include <cmath>
#include <cstdint>

#include "tokenkernels/common.h"

namespace tokenkernels {
namespace cross_entropy {
namespace bwd {

// CTA tile of the recompute GEMM (tokens x vocabulary columns x features per pipeline stage).
constexpr int kTileM = 128;
constexpr int kTileN = 128;
constexpr int kTileK = 32;
constexpr int kStages = 4;      // cp.async pipeline depth
constexpr int kThreads = 128;   // 4 warps: 2 (tokens) x 2 (vocabulary), 64 x 64 each
// Filter sub-tiles (= the plain / WMMA backward's 64 x 128): one CTA tile holds 2 of them.
constexpr int kSubM = 64;
constexpr int kSubN = 128;
static_assert(kTileM % kSubM == 0 && kTileN == kSubN, "a CTA tile holds whole filter sub-tiles");
// dZ chunk budget: 5% of the fp32 N x V logits, at least kMinChunkBytes, at most kMaxChunkBytes.
constexpr int64_t kMinChunkBytes = int64_t(32) << 20;
constexpr int64_t kMaxChunkBytes = int64_t(1) << 30;
constexpr int64_t kMaxColTiles = 65535;   // gridDim.y of one chunk launch

// The chunk schedule of one backward call.
struct Plan {
  int64_t vc = 0;         // vocabulary columns per chunk (multiple of kTileN)
  int64_t chunks = 0;     // ceil(V / vc)
  int64_t ld = 0;         // row pitch (elements) of the dZ chunk buffer (= vc)
  int64_t row_tiles = 0;  // ceil(N / kTileM): gridDim.x of every chunk launch
  int64_t col_tiles = 0;  // vc / kTileN: gridDim.y of a full chunk (the last may have fewer)
  int64_t mask_rows = 0;  // ceil(N / kSubM): rows of the (whole-shard) skip mask
  int64_t mask_cols = 0;  // ceil(V / kSubN): its columns
  int64_t dz_bytes = 0;   // N * ld * elt: the chunk buffer
};

TK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Default dZ chunk budget for N tokens x V columns: 5% of the fp32 logits (the chunk is then
// 2.5% of them in bf16 / fp16), clamped to [kMinChunkBytes, kMaxChunkBytes].
inline int64_t default_budget_bytes(int64_t N, int64_t V) {
  const double want = 0.05 * double(N) * double(V) * 4.0;
  if (want < double(kMinChunkBytes)) return kMinChunkBytes;
  if (want > double(kMaxChunkBytes)) return kMaxChunkBytes;
  return static_cast<int64_t>(want);
}

// Chunk plan for N >= 0 tokens, V >= 1 columns, dZ elements of elt bytes: the largest multiple
// of kTileN columns whose dZ chunk fits budget_bytes (at least one tile, at most V rounded up to
// the tile and kMaxColTiles tiles). vc_override > 0 (tests, tuning) replaces the budget:
// vc = vc_override rounded up to kTileN (same bounds).
inline Plan plan_bwd(int64_t N, int64_t V, int64_t elt, int64_t budget_bytes,
                     int64_t vc_override) {
  Plan p;
  const int64_t vmax_tiles = ceil_div(V < 1 ? 1 : V, kTileN);
  int64_t tiles;
  if (vc_override > 0) {
    tiles = ceil_div(vc_override, kTileN);
  } else {
    const int64_t row_bytes = (N < 1 ? 1 : N) * (elt < 1 ? 1 : elt) * kTileN;  // one tile column
    tiles = budget_bytes / row_bytes;
  }
  if (tiles > vmax_tiles) tiles = vmax_tiles;
  if (tiles > kMaxColTiles) tiles = kMaxColTiles;
  if (tiles < 1) tiles = 1;
  p.vc = tiles * kTileN;
  p.chunks = ceil_div(V, p.vc);
  p.ld = p.vc;
  p.row_tiles = ceil_div(N, kTileM);
  p.col_tiles = tiles;
  p.mask_rows = ceil_div(N, kSubM);
  p.mask_cols = ceil_div(V, kSubN);
  p.dz_bytes = N * p.ld * elt;
  return p;
}

// First shard column and number of columns of chunk c.
TK_HD int64_t chunk_v0(const Plan& p, int64_t c) { return c * p.vc; }
TK_HD int64_t chunk_cols(const Plan& p, int64_t c, int64_t V) {
  const int64_t left = V - c * p.vc;
  return left < p.vc ? left : p.vc;
}
// CTA tiles of chunk c along the vocabulary (gridDim.y of its launch).
TK_HD int64_t chunk_col_tiles(const Plan& p, int64_t c, int64_t V) {
  return ceil_div(chunk_cols(p, c, V), kTileN);
}

// Skip-mask entry of token r and shard column v: mask[(r / kSubM) * mask_cols + v / kSubN].
TK_HD int64_t mask_index(int64_t r, int64_t v, int64_t mask_cols) {
  return (r / kSubM) * mask_cols + v / kSubN;
}

// ------------------------------------------------------------------------- epilogue arithmetic
// Shard-local column of target t, or -1 (ignored, negative, another shard's or past the shard).
// No int64 overflow: t >= vocab_start >= 0 before the subtraction.
TK_HD int64_t target_column(int64_t t, int64_t ignore_index, int64_t vocab_start, int64_t V) {
  if (t == ignore_index || t < 0 || t < vocab_start) return -1;
  const int64_t l = t - vocab_start;
  return l < V ? l : -1;
}

// What the epilogue needs of one token row.
struct DzRow {
  float lse = 0.f, cp = 0.f, ct = 0.f, c1 = 0.f;
  float thr = 0.f;     // filter threshold filter_eps * max(|cp|, |ct|)
  int64_t lt = -1;     // target column (shard-local) or -1
  int32_t live = 0;    // 0: no gradient from this token (cp = ct = c1 = 0): exact zeros
};

TK_HD DzRow dz_row(float lse, float cp, float ct, float c1, float feps, int64_t lt) {
  DzRow r;
  r.lse = lse;
  r.cp = cp;
  r.ct = ct;
  r.c1 = c1;
  const float acp = cp < 0.f ? -cp : cp, act = ct < 0.f ? -ct : ct;
  r.thr = feps * (acp > act ? acp : act);
  r.lt = lt;
  r.live = (cp != 0.f || ct != 0.f || c1 != 0.f) ? 1 : 0;
  return r;
}

// z = cap * tanh(z / cap) for cap > 0 (softcap), else z.
TK_HD float softcap_z(float z, float cap) { return cap > 0.f ? cap * tanhf(z / cap) : z; }

// dZ of one logit (unscaled fp32): acc = hidden . weight[v] (fp32 accumulator), bias_v = bias[v]
// (0 without a bias), v the shard column.
TK_HD float dz_value(const DzRow& r, float acc, float bias_v, float cap, int64_t v) {
  if (!r.live) return 0.f;
  const float z = softcap_z(acc + bias_v, cap);
  float x = r.cp * expf(z - r.lse) + r.c1 + (v == r.lt ? r.ct : 0.f);
  if (cap > 0.f) {
    const float u = z / cap;
    x *= 1.f - u * u;
  }
  return x;
}

// Whether a dZ entry keeps its filter sub-tile: nonzero and not below the threshold (a NaN
// always keeps: |NaN| < thr is false). With filter_eps = 0 only all-zero sub-tiles are dropped,
// which changes nothing.
TK_HD bool filter_keeps(float x, float thr) {
  const float ax = x < 0.f ? -x : x;
  return x != 0.f && !(ax < thr);
}

}  // namespace bwd
}  // namespace cross_entropy
}  // namespace tokenkernels

#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

#include "tokenkernels/cross_entropy.h"

namespace tokenkernels {
namespace cross_entropy {
namespace bwd {

// One chunk of the tuned backward (see the top of this file). Device pointers; hidden (N, D) and
// weight (V, D) row-major fp16/bf16 with D % 8 == 0 and 16-byte aligned rows
// (fused_supported), else cudaErrorInvalidValue without launching. dZ: (N, ld) of `dtype`,
// 16-byte aligned, ld a multiple of 8 with ld >= cols rounded up to kTileN; the columns
// [cols, ld) of each row are written as zeros. gscale (nullable, device): dZ is multiplied by
// gscale[0] before rounding (fp16, see launch_grad_scale). mask (nullable): (ceil(N / kSubM),
// mask_cols) bytes, entries of this chunk's sub-tiles set to 1 (kept) or 0 (zeroed).
// skipped (nullable): incremented by the number of zeroed sub-tiles (an integer count).
struct ChunkArgs {
  const void* hidden = nullptr;
  const void* weight = nullptr;
  int64_t N = 0, D = 0;
  const float* bias = nullptr;   // (V,) fp32 or nullptr
  float cap = 0.f;               // <= 0: no softcap
  Targets tg;
  const float* lse = nullptr;
  const float* cp = nullptr;
  const float* ct = nullptr;
  const float* c1 = nullptr;     // nullable
  const float* gscale = nullptr; // nullable
  float feps = 0.f;
  int64_t v0 = 0, cols = 0, ld = 0;
  void* dZ = nullptr;
  unsigned char* mask = nullptr;
  int64_t mask_cols = 0;
  unsigned long long* skipped = nullptr;
};

// Dynamic shared memory of the recompute kernel (bytes).
size_t chunk_smem_bytes();
cudaError_t launch_bwd_chunk(const ChunkArgs& a, DType dtype, cudaStream_t stream);

}  // namespace bwd
}  // namespace cross_entropy
}  // namespace tokenkernels
#endif
