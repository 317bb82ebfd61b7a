// kv_select scoring at bandwidth (issue #13 item 3): torch-free host plan and the arithmetic the
// CUDA kernel (kv_select_score.cuh, impl="tuned") shares with its CPU emulation
// (csrc/kv_select/kv_select_score_host.cpp, private ops _kv_select_score_plan / _emulate).
//
// The kernel (fp16 / bf16 K only; fp32 K and the shapes below run the simt kernel):
//   * a row is (token n, KV head g): D elements = R = D / 8 lanes x one 16-byte vector each;
//   * a block has tp * H_kv lane groups of R lanes; group gi is pinned to KV head g = gi % H_kv
//     and token phase p = gi / H_kv for its whole life, so lane `sub` keeps q[b][g*G + h][sub*8 ..
//     sub*8 + 7] of its G q-heads in registers (fp32), reloaded only when the request changes;
//   * work list: chunks of chunk_tiles tiles of `tile` = kScoreTunedCPT * tp tokens over the
//     flattened (request, chunk) list, taken grid-stride by `grid` persistent blocks (a static
//     list: no atomics, deterministic); chunks past a request's length are skipped (their
//     partial statistics written empty);
//   * in a tile, the thread of (g, p, sub) copies -- and later reads itself -- the 16-byte pieces
//     of its CPT rows n = n0 + p + tp * j (j < CPT), with cp.async into a per-thread ring of
//     `stages` tiles: stages - 1 tiles in flight while one is scored, no block barrier in the
//     token loop (each thread only reads what it copied);
//   * token -> address: contiguous b * s_page + n * s_slot; paged block_table[b][n / P] with a
//     32-bit multiply-shift division (FastDivU32), never a 64-bit div / mod;
//   * U rows' partial dots (U * MAXG values per lane) are summed over the R lanes by a
//     reduce-scatter butterfly (rs_send / rs_keep_add): V - 1 + log2(R / V) shuffles instead of
//     V * log2(R), after which lane `sub` owns the one logit (row, head) rs_owned_index(sub, R, V);
//   * the owner writes the logit to logits[b][h][n] and folds it into its running (max, sum exp)
//     with one exp (online_push); at the end of a chunk the owners of each q-head are merged
//     (online_merge) into pstat[b][h][chunk] -- pass 2 merges a request's chunks into (m, s) per
//     head, pass 3 reads every logit once: score = sum_h exp(l - m_h) / s_h.
#pragma once
#include <cmath>
#include <cstdint>

#include "tokenkernels/common.h"

namespace tokenkernels {
namespace kv_select {

constexpr int kScoreTunedCPT = 8;              // rows (tokens) per thread per tile
constexpr int kScoreTunedMaxThreads = 512;     // block size limit (__launch_bounds__) ...
// ... 256 for 8 q-heads per KV head (64 registers of q alone: the 128-register cap of 512-thread
// blocks would spill).
TK_HD constexpr int score_tuned_max_threads(int maxg) { return maxg >= 8 ? 256 : kScoreTunedMaxThreads; }
constexpr int kScoreTunedTargetThreads = 256;  // tp is grown up to this block size
constexpr int kScoreTunedMaxTp = 4;            // token phases per KV head
constexpr int kScoreTunedMaxG = 8;             // q-heads per KV head held in registers
constexpr int64_t kScoreTunedRingBudget = 64 * 1024;   // cp.async ring bytes per block
constexpr int64_t kScoreTunedMinChunkTokens = 64;      // => chunks per request <= ceil(N / 64)
constexpr int64_t kScoreTunedMaxChunksPerReq = 4096;   // planner search bound

// ------------------------------------------------------------------ 32-bit division by a constant
// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 as (umulhi(n, m) + n) >> s (Granlund-Montgomery with
// the 33-bit multiplier 2^32 + m = floor(2^(32+s) / d) + 1, s = ceil(log2 d); exact for every n <
// 2^32, and the 32-bit sum umulhi + n cannot overflow for n < 2^31).
struct FastDivU32 {
  uint32_t d = 1, m = 1, s = 0;
};

inline FastDivU32 make_fastdiv_u32(uint32_t d) {
  FastDivU32 f;
  f.d = d < 1 ? 1 : d;
  uint32_t s = 0;
  while ((uint64_t{1} << s) < f.d) ++s;
  f.s = s;
  f.m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - f.d)) / f.d + 1);
  return f;
}

TK_HD uint32_t umulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

TK_HD uint32_t fastdiv(const FastDivU32& f, uint32_t n) { return (umulhi_u32(n, f.m) + n) >> f.s; }

// ------------------------------------------------------------------ token -> cache offset
// Token n of one request -> element offset of its (head 0, dim 0), or -1 for a page number out
// of range (unchecked inputs: the kernel then skips the row). bt_row: that request's block-table
// row, or nullptr for the contiguous layout, where req_off = b * s_page.
struct ScoreTokenMap {
  int64_t s_page = 0, s_slot = 0;
  int64_t num_pages = 0;
  FastDivU32 page;   // divisor: page_size (paged only)
};

TK_HD int64_t score_row_offset(const ScoreTokenMap& m, const int32_t* bt_row, int64_t req_off, uint32_t n) {
  if (bt_row == nullptr) return req_off + static_cast<int64_t>(n) * m.s_slot;
  const uint32_t pi = fastdiv(m.page, n);
  const uint32_t slot = n - pi * m.page.d;
  const int32_t page = bt_row[pi];
  if (page < 0 || page >= m.num_pages) return -1;
  return static_cast<int64_t>(page) * m.s_page + static_cast<int64_t>(slot) * m.s_slot;
}

// A tile's rows of one thread: n = n_first + tp * j, j < kScoreTunedCPT. Where the tile lies in
// one page (contiguous layout, or page_size a multiple of the tile: tiles start at multiples of
// the tile) and there is no valid mask, the producer takes its fast path: one offset per tile
// (score_row_offset of n_first), row j at + j * tp * s_slot, and the rows below n_end are the
// first score_tile_rows(...) -- no per-row page lookup, compare or multiply.
TK_HD int score_tile_rows(int64_t n_first, int64_t n_end, int tp_shift) {
  const int64_t left = n_end - n_first;
  if (left <= 0) return 0;
  const int64_t r = (left + (int64_t{1} << tp_shift) - 1) >> tp_shift;
  return r < kScoreTunedCPT ? static_cast<int>(r) : kScoreTunedCPT;
}

TK_HD bool score_tile_fast_path(bool paged, int64_t page_size, int64_t tile, bool has_valid) {
  return !has_valid && (!paged || page_size % tile == 0);
}

// ------------------------------------------------------------------ work list
// Chunk c of the flattened (request, chunk) list: request b, its chunk index cl, and the token
// range [n_begin, n_end) before clamping to the request's length.
struct ScoreChunk {
  int32_t b = 0, cl = 0;
  int64_t n_begin = 0, n_end = 0;
};

TK_HD ScoreChunk score_chunk(uint32_t c, uint32_t chunks_per_req, int64_t chunk_tokens, int64_t N_max) {
  ScoreChunk k;
  k.b = static_cast<int32_t>(c / chunks_per_req);
  k.cl = static_cast<int32_t>(c - static_cast<uint32_t>(k.b) * chunks_per_req);
  k.n_begin = static_cast<int64_t>(k.cl) * chunk_tokens;
  const int64_t e = k.n_begin + chunk_tokens;
  k.n_end = e < N_max ? e : N_max;
  return k;
}

// ------------------------------------------------------------------ online softmax statistics
TK_HD float score_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// Folds logit l into the running (max m, sum s of exp(l_i - m)) with one exp; l == -inf (a
// masked row) is skipped. Empty state: (-inf, 0).
TK_HD void online_push(float& m, float& s, float l) {
  if (l == -INFINITY) return;
  const float e = score_exp(-fabsf(l - m));   // m == -inf: e = 0
  if (l > m) {
    s = s * e + 1.0f;
    m = l;
  } else {
    s += e;
  }
}

// Merges (m2, s2) into (m, s).
TK_HD void online_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  if (m2 > m) {
    s = s * score_exp(m - m2) + s2;
    m = m2;
  } else {
    s += s2 * score_exp(m2 - m);
  }
}

// ------------------------------------------------------------------ reduce-scatter over R lanes
// V partial sums per lane (V <= R, both powers of two) summed over the R lanes of a group. Each
// halving step at xor-offset o (o = R/2, R/4, ...) with c live values: the lane keeps the upper
// half [c/2, c) when (sub & o) != 0, else the lower half, sends the other half to its partner
// (sub ^ o, who keeps it) and adds what it receives; once one value is left the remaining
// offsets are a plain butterfly. The lane then holds the full sum of value index
// rs_owned_index(sub, R, V); the R / V lanes sharing it all hold it, the first one owns it.
template <int V>
TK_HD float rs_send(const float (&v)[V], int k, int c, bool up) { return up ? v[k] : v[k + c / 2]; }

template <int V>
TK_HD void rs_keep_add(float (&v)[V], int k, int c, bool up, float recv) {
  v[k] = (up ? v[k + c / 2] : v[k]) + recv;
}

TK_HD int rs_owned_index(int sub, int R, int V) { return sub / (R / V); }
TK_HD bool rs_owner(int sub, int R, int V) { return sub % (R / V) == 0; }

// Rows per reduce batch U: U * MAXG values per lane, at most R and at most kScoreTunedMaxV (the
// registers of the partial sums), U at most CPT.
constexpr int kScoreTunedMaxV = 16;
TK_HD constexpr int score_rows_per_batch(int R, int maxg) {
  const int v = R < kScoreTunedMaxV ? R : kScoreTunedMaxV;
  return (v / maxg) < kScoreTunedCPT ? (v / maxg) : kScoreTunedCPT;
}

// Thread of the owner of (KV head g, q-head h within the group, phase p, batch row u).
TK_HD int score_owner_tid(int g, int h, int p, int u, int R, int maxg, int H_kv) {
  const int V = score_rows_per_batch(R, maxg) * maxg;
  const int sub = (u * maxg + h) * (R / V);
  return (p * H_kv + g) * R + sub;
}

// ------------------------------------------------------------------ host plan
struct ScoreTunedPlan {
  int64_t ok = 0;              // 1: the tuned kernel runs this shape; 0: the simt path
  int64_t R = 0;               // lanes per row (D / 8)
  int64_t maxg = 0;            // G rounded up to a power of two (template bucket)
  int64_t U = 0;               // rows per reduce batch
  int64_t tp = 0;              // token phases (lane groups per KV head)
  int64_t threads = 0;         // R * H_kv * tp
  int64_t tile = 0;            // tokens per tile: kScoreTunedCPT * tp
  int64_t stages = 0;          // cp.async ring depth in tiles
  int64_t smem_bytes = 0;      // dynamic shared memory per block
  int64_t tiles_per_req = 0;   // ceil(N_max / tile)
  int64_t chunk_tiles = 0;     // tiles per work item
  int64_t chunks_per_req = 0;  // ceil(tiles_per_req / chunk_tiles) (<= ceil(N_max / 64))
  int64_t chunks = 0;          // B * chunks_per_req
  int64_t blocks_per_sm = 0;   // given, or estimated from threads and shared memory
  int64_t grid = 0;            // persistent blocks: min(chunks, blocks_per_sm * sm_count)
  int64_t workspace_bytes = 0; // logits + chunk partials + per-head stats (256-byte aligned parts)
};
constexpr int kScoreTunedPlanFields = 16;

inline int64_t score_align256(int64_t v) { return (v + 255) / 256 * 256; }

// Shared-memory layout of a block: ring [stages][CPT][threads] x 16 B, row masks
// [stages][threads] bytes, merge buffer [2][threads] x (m, s) floats (16-byte aligned).
TK_HD int64_t score_tuned_mask_offset(int64_t stages, int64_t threads) { return stages * kScoreTunedCPT * threads * 16; }
TK_HD int64_t score_tuned_part_offset(int64_t stages, int64_t threads) {
  return (score_tuned_mask_offset(stages, threads) + stages * threads + 15) / 16 * 16;
}
TK_HD int64_t score_tuned_smem_bytes(int64_t stages, int64_t threads) {
  return score_tuned_part_offset(stages, threads) + 2 * threads * 8;
}

inline int64_t score_tuned_workspace_bytes(int64_t B, int64_t H_q, int64_t N_max, int64_t chunks_per_req) {
  return score_align256(4 * B * H_q * N_max) + score_align256(8 * B * H_q * chunks_per_req) +
         score_align256(8 * B * H_q);
}

// elt_size: bytes per cache element (2 for fp16 / bf16). blocks_per_sm <= 0: estimated from the
// block size and shared memory (the launcher passes the occupancy calculator's answer).
inline ScoreTunedPlan score_tuned_plan(int64_t B, int64_t N_max, int64_t H_kv, int64_t H_q, int64_t D,
                                       int64_t elt_size, int64_t sm_count, int64_t blocks_per_sm) {
  ScoreTunedPlan p;
  if (B <= 0 || N_max <= 0 || H_kv <= 0 || H_q <= 0 || H_q % H_kv != 0 || elt_size != 2) return p;
  if (N_max >= (int64_t{1} << 31)) return p;   // 32-bit token indices
  const int64_t G = H_q / H_kv;
  if (G > kScoreTunedMaxG) return p;
  if (D != 64 && D != 128 && D != 256) return p;
  p.R = D / 8;
  p.maxg = 1;
  while (p.maxg < G) p.maxg *= 2;
  const int64_t max_threads = score_tuned_max_threads(static_cast<int>(p.maxg));
  if (p.R * H_kv > max_threads) return ScoreTunedPlan{};
  p.U = score_rows_per_batch(static_cast<int>(p.R), static_cast<int>(p.maxg));
  p.tp = 1;
  while (p.tp < kScoreTunedMaxTp && p.R * H_kv * p.tp * 2 <= kScoreTunedTargetThreads) p.tp *= 2;
  while ((p.R * H_kv * p.tp) % 32 != 0 && p.tp < kScoreTunedMaxTp) p.tp *= 2;   // whole warps
  p.threads = p.R * H_kv * p.tp;
  if (p.threads % 32 != 0 || p.threads > max_threads) return ScoreTunedPlan{};
  p.tile = kScoreTunedCPT * p.tp;
  const int64_t stage_bytes = p.threads * kScoreTunedCPT * 16;
  p.stages = kScoreTunedRingBudget / stage_bytes;
  p.stages = p.stages < 2 ? 2 : (p.stages > 4 ? 4 : p.stages);
  p.smem_bytes = score_tuned_smem_bytes(p.stages, p.threads);
  if (blocks_per_sm <= 0) {
    int64_t by_smem = (220 * 1024) / p.smem_bytes, by_threads = 2048 / p.threads;
    blocks_per_sm = by_smem < by_threads ? by_smem : by_threads;
    if (blocks_per_sm > 32) blocks_per_sm = 32;
    if (blocks_per_sm < 1) blocks_per_sm = 1;
  }
  p.blocks_per_sm = blocks_per_sm;
  const int64_t slots = blocks_per_sm * (sm_count < 1 ? 1 : sm_count);
  p.tiles_per_req = (N_max + p.tile - 1) / p.tile;
  // Chunk size: minimise rounds * (chunk_tiles + 1) -- rounds of the static grid-stride list
  // over `slots` resident blocks, one tile of merge overhead per chunk -- with chunks of at
  // least kScoreTunedMinChunkTokens tokens unless a chunk is the whole request; ties keep the
  // fewer chunks.
  const int64_t min_ct = (kScoreTunedMinChunkTokens + p.tile - 1) / p.tile;
  const int64_t kmax = p.tiles_per_req < kScoreTunedMaxChunksPerReq ? p.tiles_per_req : kScoreTunedMaxChunksPerReq;
  int64_t best_cost = -1;
  for (int64_t k = 1; k <= kmax; ++k) {
    const int64_t ct = (p.tiles_per_req + k - 1) / k;
    if (k > 1 && ct < min_ct) break;   // ct only shrinks with k
    const int64_t cpr = (p.tiles_per_req + ct - 1) / ct;
    const int64_t rounds = (B * cpr + slots - 1) / slots;
    const int64_t cost = rounds * (ct + 1);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      p.chunk_tiles = ct;
      p.chunks_per_req = cpr;
    }
  }
  p.chunks = B * p.chunks_per_req;
  if (p.chunks >= (int64_t{1} << 31)) return ScoreTunedPlan{};
  p.grid = p.chunks < slots ? p.chunks : slots;
  p.workspace_bytes = score_tuned_workspace_bytes(B, H_q, N_max, p.chunks_per_req);
  p.ok = 1;
  return p;
}

inline void score_tuned_plan_fields(const ScoreTunedPlan& p, int64_t* out) {
  const int64_t f[kScoreTunedPlanFields] = {p.ok, p.R, p.maxg, p.U, p.tp, p.threads, p.tile, p.stages,
                                            p.smem_bytes, p.tiles_per_req, p.chunk_tiles, p.chunks_per_req,
                                            p.chunks, p.blocks_per_sm, p.grid, p.workspace_bytes};
  for (int i = 0; i < kScoreTunedPlanFields; ++i) out[i] = f[i];
}

}  // namespace kv_select
}  // namespace tokenkernels

// ------------------------------------------------------------------ CUDA launcher (host API)
#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

#include "tokenkernels/kv_select.h"

namespace tokenkernels {
namespace kv_select {

// The tuned scoring (kv_select.score(impl="tuned")): same contract as launch_score. Returns
// cudaErrorNotSupported, having launched nothing, where the plan or the layout does not allow it
// (fp32 K, D not 64 / 128 / 256, G > 8, R * H_kv > 512, a stride on D, 16-byte misalignment,
// a GPU below sm_80): launch_score then runs the simt kernel. workspace: score_workspace_bytes.
cudaError_t launch_score_tuned(const KVLayout& L, const void* k, CacheStrides ks, DType dtype,
                               const float* q, int64_t H_q, const bool* skip, const bool* valid,
                               float* out, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace kv_select
}  // namespace tokenkernels
#endif
