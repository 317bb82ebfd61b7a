// The tensor-core split-KV attention core (issue #13 item 1): torch-free host-visible parts.
//
// One kernel (attn_core.cuh, launchers in csrc/attention/attn_core_kernels.cu) serves
//   * tree.attention(impl="tuned")            prefix splits (no mask) + the tree part (ancestor bits),
//   * kv_select.sparse_decode(impl="tuned")   gathered indices, no mask,
//   * kv_select.sparse_prefill(impl="tuned")  gathered indices + the chunk, chunk-causal mask.
// A CTA (4 warps, 128 threads) serves one (request b, KV head h, row block rb, part s): the query
// rows of KV head h (G q-heads x tree nodes / decode rows / chunk rows, row r = node*G + g) in
// blocks of kCoreRows(kWN) rows, and one key range ("part": a prefix split, or the tree part).
// The 4 warps are laid out kWM x kWN: kWM row groups of 16 rows, kWN key groups (kWN = 4 when all
// rows fit 16, the decode case: each warp takes a quarter of every key tile, the CTA merges its
// warps at the end; else kWN = 1, 64 rows per CTA).
//
// Arithmetic (everything here is TK_HD: the kernel and the CPU emulation run the same code):
//   scores are kept in the log2 domain, s2 = (q . k) * scale * log2(e) (one multiply);
//   per row the online state (m, l, o): m the running max of s2, l = sum exp2(s2 - m),
//   o = sum exp2(s2 - m) v; a part ends as (lse2 = m + log2 l, o / l), or (-inf, 0) with no key;
//   parts merge by log-sum-exp: M = max lse2_s, w_s = exp2(lse2_s - M), out = sum w_s o_s / sum
//   w_s, lse (natural) = (M + log2 sum w_s) * ln 2; -inf / zeros when nothing was attended.
// Splits are planned twice: the host picks their number from the shapes only (attn_plan: about
// two waves on the SM count, no host sync); each CTA cuts its own key range from the REAL length
// on the device (split_range), so no CTA streams keys past seq_len / prefix_len and short
// requests spread their keys over all splits.
#pragma once
#include <cmath>
#include <cstdint>

#include "tokenkernels/common.h"

namespace tokenkernels {
namespace attn {

constexpr int kThreads = 128;        // 4 warps per CTA
constexpr int kWarps = 4;
constexpr int kKeyTile = 64;         // keys per shared-memory tile (per stage)
constexpr int kStages = 2;           // cp.async double buffering
constexpr int64_t kMinSplitKeys = 2 * kKeyTile;   // fewest keys a split is planned for
constexpr int64_t kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Rows a CTA holds for a key-group count kWN (1 or 4).
TK_HD int core_rows(int wn) { return 16 * (kWarps / wn); }

// ------------------------------------------------------------------ fragment addressing
// Where each lane of a warp points its ldmatrix x4 addresses and which tile element each register
// of an mma.sync m16n8k16 fragment holds -- the kernel's own index arithmetic, emulated on the CPU
// (torch.ops.tokenkernels._attn_core_fragments) against a model of ldmatrix / mma.sync.
// Shared-memory tiles are (rows x D) 16-bit, in 16-byte chunks of 8 elements, chunk c of row r at
// element swz_off(r, c, D): chunks XOR-swizzled by the row's low 3 bits, so the 8 rows one
// ldmatrix matrix reads fall in 8 different bank groups.
TK_HD int swz_off(int row, int c, int D) { return row * D + ((c ^ (row & 7)) << 3); }
// Q (A operand, row-major rows x D): k-step kk (columns 16 kk ..), matrices a0..a3 = rows 0-7 /
// 8-15 x columns 0-7 / 8-15.
TK_HD int q_lds_row(int wm, int lane) { return wm * 16 + (lane & 7) + 8 * ((lane >> 3) & 1); }
TK_HD int q_lds_chunk(int kk, int lane) { return 2 * kk + (lane >> 4); }
// K (B operand of S = Q K^T, K rows = keys): n-block pair n2 (keys key0 + 16 n2 ..), k-step kk;
// matrices = (b0, b1) of n-block 2 n2, then of 2 n2 + 1.
TK_HD int k_lds_row(int key0, int n2, int lane) { return key0 + n2 * 16 + (lane & 7) + 8 * (lane >> 4); }
TK_HD int k_lds_chunk(int kk, int lane) { return 2 * kk + ((lane >> 3) & 1); }
// V (B operand of O = P V, transposed ldmatrix): key k-step ks (keys key0 + 16 ks ..), column
// n-block pair d2; matrices = (b0, b1) of n-block 2 d2, then of 2 d2 + 1.
TK_HD int v_lds_row(int key0, int ks, int lane) { return key0 + ks * 16 + (lane & 7) + 8 * ((lane >> 3) & 1); }
TK_HD int v_lds_chunk(int d2, int lane) { return 2 * d2 + (lane >> 4); }
// Accumulator element e (0..3) of an m16n8 fragment: row in the 16-row tile, column in the n-block.
TK_HD int acc_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
TK_HD int acc_col(int lane, int e) { return (lane & 3) * 2 + (e & 1); }
// P as the A operand of k-step ks: register r (0..3) packs S n-block 2 ks + pa_block(r), elements
// pa_elem(r, 0) (low half) and pa_elem(r, 1) (high half).
TK_HD int pa_block(int r) { return r >> 1; }
TK_HD int pa_elem(int r, int half) { return (r & 1) * 2 + half; }

// ------------------------------------------------------------------ the sm_90a wgmma layout
// attn_core_wgmma_kernel (attn_core_sm90.cuh): one CTA = one warpgroup (128 threads), 64 rows.
// Shared-memory tiles (64 rows x D, 16-bit) in CuTe's SW128 K-major layout (GMMA::Layout_K_SW128_Atom
// tiled over (64, D)): D / 64 column blocks of 64 rows x 128 bytes, 16-byte chunk c of row r at
// element gmma_off(r, c): (c / 8) * 4096 + 64 r + 8 ((c % 8) ^ (r % 8)) (each tile 1024-byte
// aligned, so the XOR is the hardware's 128-byte swizzle). The V tile uses the same bytes, read by
// wgmma as the MN-major B operand (GMMA::Layout_MN_SW128_Atom over (D, keys), keys tiled first).
TK_HD constexpr int gmma_off(int row, int c) { return (c >> 3) * (64 * 64) + row * 64 + (((c & 7) ^ (row & 7)) << 3); }
// wgmma m64nNk16 fp32 accumulator: value i (0 .. N/2) of thread t (0..127) of the warpgroup holds
// element (wg_acc_row, wg_acc_col) -- per warp the mma.sync m16n8 fragments of n-block i / 4,
// element i % 4 (acc_row / acc_col), rows 16 * warp ..
TK_HD constexpr int wg_acc_row(int t, int i) { return (t >> 5) * 16 + ((t & 31) >> 2) + 8 * ((i >> 1) & 1); }
TK_HD constexpr int wg_acc_col(int t, int i) { return (i >> 2) * 8 + (t & 3) * 2 + (i & 1); }
// wgmma A operand from registers (m64 x k16, 16-bit): value v (0..7) of thread t holds element
// (wg_a_row, wg_a_col) of the k-step.
TK_HD constexpr int wg_a_row(int t, int v) { return (t >> 5) * 16 + ((t & 31) >> 2) + 8 * ((v >> 1) & 1); }
TK_HD constexpr int wg_a_col(int t, int v) { return (v >> 2) * 8 + (t & 3) * 2 + (v & 1); }
// P re-packed for O += P V: A value v of key k-step ks is S accumulator value wg_pa_src(ks, v)
// (the mma.sync repacking pa_block / pa_elem, per warp).
TK_HD constexpr int wg_pa_src(int ks, int v) { return (2 * ks + (v >> 2)) * 4 + (v & 3); }

// ------------------------------------------------------------------ softmax / merge arithmetic
// The base a row's exponentials are taken against: its max, or 0 while it has seen no key (so
// exp2(-inf - base) = 0 and never NaN).
TK_HD float row_base(float m) { return m == -INFINITY ? 0.f : m; }
// Factor the old state is rescaled by when the max moves from m_old to m_new (0 on the first key).
TK_HD float rescale(float m_old, float m_new) { return exp2f(m_old - row_base(m_new)); }
// exp2 of a (masked: -inf) log2-domain score against the row's base.
TK_HD float prob(float s2, float m_new) { return exp2f(s2 - row_base(m_new)); }
// A finished part: its log2 log-sum-exp (-inf without keys) and the factor normalising o.
TK_HD float part_lse2(float m, float l) { return l > 0.f ? m + log2f(l) : -INFINITY; }
TK_HD float part_inv(float l) { return l > 0.f ? 1.f / l : 0.f; }
// Merge weight of a part against M = max of the parts' lse2 (0 for an empty part).
TK_HD float merge_weight(float lse2, float M) { return lse2 == -INFINITY ? 0.f : exp2f(lse2 - row_base(M)); }
// The merged natural-log lse, from M and den = sum of the weights.
TK_HD float merged_lse(float M, float den) { return den > 0.f ? (row_base(M) + log2f(den)) * kLn2 : -INFINITY; }
TK_HD float merged_inv(float den) { return den > 0.f ? 1.f / den : 0.f; }

// Merge a second running state (mw, lw) of the same row into (m, l) -- the CTA's key groups at
// the end of the key loop: returns the factors the two o accumulators are scaled by
// (o = o * cm + o_w * cw).
TK_HD void merge_into(float& m, float& l, float mw, float lw, float& cm, float& cw) {
  const float mn = m > mw ? m : mw;
  cm = rescale(m, mn);
  cw = rescale(mw, mn);
  l = l * cm + lw * cw;
  m = mn;
}

// Online update of one row with a tile of log2 scores s2[0..n) (masked ones -inf) and their
// value rows (v[t * D ...]): the reference form of what each thread does on its fragment (the
// kernel splits the max / sum over the 4 lanes of a quad; the order of additions differs).
TK_HD void online_update(float& m, float& l, float* o, const float* s2, const float* v, int n, int D) {
  float mx = -INFINITY;
  for (int t = 0; t < n; ++t) mx = s2[t] > mx ? s2[t] : mx;
  const float m_new = mx > m ? mx : m;
  const float c = rescale(m, m_new);
  l *= c;
  for (int d = 0; d < D; ++d) o[d] *= c;
  for (int t = 0; t < n; ++t) {
    const float p = prob(s2[t], m_new);
    l += p;
    for (int d = 0; d < D; ++d) o[d] += p * v[t * D + d];
  }
  m = m_new;
}

// ------------------------------------------------------------------------------ key ranges
// Keys [k0, k1) of split s of `splits` over `len` real keys: splits of equal size rounded up to
// whole tiles; trailing splits may be empty (k0 == k1 == len).
struct Range {
  int64_t k0, k1;
};
TK_HD Range split_range(int64_t len, int64_t splits, int64_t s) {
  if (len <= 0 || splits <= 0) return Range{0, 0};
  int64_t chunk = (len + splits - 1) / splits;
  chunk = (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;
  int64_t k0 = s * chunk, k1 = k0 + chunk;
  if (k0 > len) k0 = len;
  if (k1 > len) k1 = len;
  return Range{k0, k1};
}

// Tree mask: may row `node` attend tree key j (bit j of its packed row, words of 32 bits)?
TK_HD bool tree_bit(const int32_t* mask_row, int64_t j) {
  return ((static_cast<uint32_t>(mask_row[j >> 5]) >> (j & 31)) & 1u) != 0;
}
// Prefill chunk-causal mask over the key list (K gathered keys, then the chunk): row c may attend
// key j iff j < K or j - K <= c.
TK_HD bool chunk_causal(int64_t j, int64_t K, int64_t c) { return j < K || j - K <= c; }

// Length of a prefill row block's key list: the K gathered keys and the chunk keys up to the
// block's last real row (rows row0 .. row0 + nrows - 1, chunk row c = r / G; clen chunk rows of
// the request exist); 0 when the request has no chunk row.
TK_HD int64_t prefill_key_len(int64_t K, int64_t clen, int64_t C, int64_t G, int64_t row0, int64_t nrows) {
  if (clen <= 0) return 0;
  int64_t last_c = (row0 + nrows - 1) / G;
  if (last_c > C - 1) last_c = C - 1;
  return K + (clen < last_c + 1 ? clen : last_c + 1);
}

// ---------------------------------------------------------------------------------- the plan
// Host planner (shapes only, no device data): how the grid is laid out and what workspace the
// launch needs. heads = B * Hkv (CTA groups), rows = query rows per (b, h), max_keys = the most
// keys one part can have (the cache capacity / the index count: the real lengths are only known
// on the device), extra_parts = parts besides the splits (the tree part: 1), D the head size.
struct Plan {
  int wn = 1;                 // key groups per CTA (1 or 4)
  int64_t rows_per_cta = 0;   // core_rows(wn)
  int64_t row_blocks = 0;     // ceil(rows / rows_per_cta)
  int64_t splits = 0;         // key splits of the main key list
  int64_t parts = 0;          // splits + extra_parts (grid.y)
  int64_t ctas = 0;           // heads * row_blocks * parts
  size_t smem_bytes = 0;      // dynamic shared memory per CTA
  // workspace (bytes, each 256-aligned; 0 when parts == 1: the CTA writes the output itself)
  size_t ws_o = 0, ws_lse = 0, ws_ticket = 0, ws_total = 0;
};

TK_HD int64_t plan_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TK_HD size_t plan_align(size_t v) { return (v + 255) / 256 * 256; }

// Shared memory: Q (rows x D, 16-bit), K and V tiles (kStages x kKeyTile x D each, 16-bit), the
// key offsets (K and V, int64, a ring of kOffSlots tiles); the end-of-CTA warp merge (kWN = 4)
// reuses the K/V tiles.
constexpr int kOffSlots = 3;
TK_HD size_t core_smem_bytes(int wn, int64_t D) {
  const size_t q = static_cast<size_t>(core_rows(wn)) * D * 2;
  const size_t kv = static_cast<size_t>(2) * kStages * kKeyTile * D * 2;
  const size_t offs = static_cast<size_t>(2) * kOffSlots * kKeyTile * sizeof(int64_t);
  return q + kv + offs;
}

// ctas_per_sm: CTAs an SM holds (ctas_per_sm(D) below). The splits aim at <= ~2 waves in all
// (floor, so no partial third wave), at least 1, each split >= kMinSplitKeys keys, <= kMaxSplits.
inline Plan attn_plan(int64_t heads, int64_t rows, int64_t max_keys, int64_t extra_parts, int64_t D,
                      int sm_count, int ctas_per_sm) {
  Plan p;
  p.wn = rows <= 16 ? 4 : 1;
  p.rows_per_cta = core_rows(p.wn);
  p.row_blocks = rows > 0 ? plan_ceil_div(rows, p.rows_per_cta) : 0;
  const int64_t base = heads * p.row_blocks;
  if (base <= 0) return p;
  const int64_t slots = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * (ctas_per_sm > 0 ? ctas_per_sm : 1);
  // whole waves: the parts of all CTA groups fill at most ~2 waves (the extra parts included)
  int64_t want = 2 * slots / base - extra_parts;
  const int64_t cap = max_keys > 0 ? plan_ceil_div(max_keys, kMinSplitKeys) : 1;
  if (want > cap) want = cap;
  if (want > kMaxSplits) want = kMaxSplits;
  if (want < 1) want = 1;
  // no key list at all: no split, unless there is no other part (then one CTA writes -inf / 0)
  if (max_keys <= 0) want = extra_parts > 0 ? 0 : 1;
  p.splits = want;
  p.parts = p.splits + extra_parts;
  p.ctas = base * p.parts;
  p.smem_bytes = core_smem_bytes(p.wn, D);
  if (p.parts > 1) {
    const size_t prow = static_cast<size_t>(p.parts) * base * p.rows_per_cta;
    p.ws_o = plan_align(sizeof(float) * prow * D);
    p.ws_lse = plan_align(sizeof(float) * prow);
    p.ws_ticket = plan_align(sizeof(int32_t) * base);
  }
  p.ws_total = p.ws_o + p.ws_lse + p.ws_ticket;
  return p;
}

// Which inputs the core takes (else the launchers' callers keep the simt kernels): 16-bit K/V
// (fp32 runs simt), D = 64 or 128 (other D <= 256 run simt), unit stride on D and 16-byte aligned
// rows (checked by the launchers on the strides and base pointers).
TK_HD bool core_head_dim_ok(int64_t D) { return D == 64 || D == 128; }

// Dynamic shared memory of attn_core_wgmma_kernel (64 rows): the same tiles, plus 1024 bytes to
// align them to 1024 bytes (the 128-byte swizzle atoms).
TK_HD size_t wgmma_smem_bytes(int64_t D) { return core_smem_bytes(1, D) + 1024; }

}  // namespace attn
}  // namespace tokenkernels

// ------------------------------------------------------------------ CUDA launchers (host API)
#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

#include "tokenkernels/kv_select.h"
#include "tokenkernels/tree.h"

namespace tokenkernels {
namespace attn {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// CTAs per SM the launchers plan with (shared memory: ~83 KB per CTA at D = 128, ~43 KB at 64).
inline int ctas_per_sm(int64_t D) { return D > 64 ? 2 : 4; }

// tree.attention(impl="tuned"). tree_supported: 16-bit dtype, D 64 / 128, 16-byte aligned q / k /
// v / out (else the caller runs the simt kernels). The plan, its workspace (bytes) and the launch
// (B, n, Hq > 0; the workspace's tickets are zeroed here with cudaMemsetAsync).
bool tree_supported(const tree::AttnProblem& p);
Plan tree_plan(const tree::AttnProblem& p);
cudaError_t launch_tree(const tree::AttnProblem& p, void* workspace, cudaStream_t stream);

// kv_select.sparse_decode / sparse_prefill(impl="tuned"): q (B, H_q, D) / (B, C, H_q, D)
// contiguous in the caches' dtype, NOT pre-scaled (scale multiplies the fp32 products, so q is
// never rounded after scaling; the simt launchers take fp32 q * scale). kv_supported: 16-bit dtype, D 64 / 128, unit stride on D,
// every other stride a multiple of 8 elements and 16-byte aligned bases (else simt).
bool kv_supported(const kv_select::KVLayout& L, const void* k, kv_select::CacheStrides ks, const void* v,
                  kv_select::CacheStrides vs, DType dtype);
Plan decode_plan(const kv_select::KVLayout& L, int64_t H_q, int64_t K);
Plan prefill_plan(const kv_select::KVLayout& L, int64_t C, int64_t H_q, int64_t K);
cudaError_t launch_decode(const kv_select::KVLayout& L, const void* k, kv_select::CacheStrides ks, const void* v,
                          kv_select::CacheStrides vs, DType dtype, const void* q, float scale, int64_t H_q,
                          const int32_t* indices, int64_t K, void* out, float* lse, void* workspace,
                          cudaStream_t stream);
cudaError_t launch_prefill(const kv_select::KVLayout& L, const void* k, kv_select::CacheStrides ks, const void* v,
                           kv_select::CacheStrides vs, DType dtype, const void* q, float scale, int64_t C, int64_t H_q,
                           const int32_t* indices, int64_t K, const int32_t* chunk_start, void* out, float* lse,
                           void* workspace, cudaStream_t stream);

}  // namespace attn
}  // namespace tokenkernels
#endif
