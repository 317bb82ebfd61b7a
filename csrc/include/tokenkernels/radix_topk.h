// kv_select radix top-k (kv_select.topk, impl="tuned"): torch-free host-visible pieces.
//
// The kernels (radix_topk.cuh, launched by csrc/kv_select/kv_select_topk_kernels.cu) and the CPU
// emulation (csrc/kv_select/radix_topk_host.cpp, private op _kv_select_radix_topk_emulate) run
// the same functions below, so the digit schedule, the bucket choice, the compaction rule, the
// chunking of a row over several CTAs and the emission slots are tested without a GPU.
//
// Algorithm (per request b whose length L exceeds the budget W = n_sink + k + n_local; the
// middle region is [lo, hi) = [n_sink, L - n_local), M = hi - lo > k elements):
//   keys     ordered_key(score): monotone uint32 (larger score -> larger key), the rule of the
//            plain kernel and the CPU (+NaN above +inf, -NaN below -inf);
//   digits   11 + 11 + 10 bits, most significant first (pass 0: bits 31..21);
//   kernel 1 (grid B x splits): every CTA streams its chunk of the row with 16-byte loads, builds
//            the pass-0 histogram in shared memory (warp-aggregated: __match_any_sync, one atomic
//            per distinct digit per warp) and adds it to the row's global histogram;
//   kernel 2 (grid B x splits): every CTA reads the row's histogram, finds the threshold bucket
//            T1 (the digit holding the k-th largest key) and compacts its chunk's entries with
//            digit >= T1 (the sure winners and the candidates), in index order, as (key, index)
//            into its own segment of the workspace, adding the candidates' pass-1 digits to the
//            row's second histogram; the last CTA of the row to finish (threadfence + arrival
//            counter) picks the pass-1 bucket, runs pass 2 over the compacted entries only (in
//            shared memory when they fit, else from the workspace) and writes the row: sinks, the k
//            winners in ascending index order (one block scan per 512 * 4 entries: keys above
//            the threshold key T, and the first krem keys equal to T, lowest index first),
//            the local window and the -1 padding.
// Rows that take every token, reuse rows (Selection Cache hits) and k = 0 rows are written by
// CTA 0 of kernel 2 alone.
#pragma once
#include <cstdint>
#include <cstring>

#include "tokenkernels/common.h"

namespace tokenkernels {
namespace kv_select {

constexpr int kRadixThreads = 512;           // threads of both kernels
constexpr int kRadixBins = 2048;             // bins of an 11-bit digit
constexpr int kRadixPasses = 3;
constexpr int64_t kRadixStep = 4 * kRadixThreads;   // elements per block step (a float4 per thread)
constexpr int64_t kRadixMinChunk = 4096;     // smallest chunk worth a CTA
constexpr int64_t kRadixMaxSplits = kRadixThreads;   // CTAs per row (one scan over the segments)
constexpr int64_t kRadixSmemCap = 8192;      // entries the finishing CTA holds in shared memory
constexpr int kRadixEmitItems = 4;           // entries per thread per emission scan

// Monotone uint32 key of a float score (the plain kernel's and the CPU's ordered()).
TK_HD uint32_t radix_key(float v) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, 4);
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Digit schedule: pass 0 bits 31..21, pass 1 bits 20..10, pass 2 bits 9..0.
TK_HD int radix_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
TK_HD int radix_bits(int pass) { return pass == 2 ? 10 : 11; }
TK_HD uint32_t radix_digit(uint32_t key, int pass) {
  return (key >> radix_shift(pass)) & ((1u << radix_bits(pass)) - 1u);
}
// The key bits fixed before `pass` (the prefix a key must match to take part in it).
TK_HD uint32_t radix_fixed_mask(int pass) {
  return pass == 0 ? 0u : ~((1u << (radix_shift(pass) + radix_bits(pass))) - 1u);
}

// Bucket choice: scanning the bins from the top, `above` keys lie in higher bins; the bin with
// `count` keys holds the krem-th largest (1-based) when above < krem <= above + count. Then
// krem - above keys of that bin are still to take.
TK_HD bool radix_bucket_hit(int64_t above, int64_t count, int64_t krem) {
  return above < krem && above + count >= krem;
}

// Compaction after pass 0: an entry stays when its pass-0 digit is >= the threshold bucket t1
// (the sure winners, digit > t1, and the candidates, digit == t1).
TK_HD bool radix_compact_keep(uint32_t key, uint32_t t1) { return radix_digit(key, 0) >= t1; }

// Output slot (within the k middle slots) of an entry, given the entries before it in index
// order with key > T (gt_before) and key == T (eq_before), krem keys equal to T to take (lowest
// index first); -1 when it is not selected.
TK_HD int64_t radix_emit_slot(int64_t gt_before, int64_t eq_before, int64_t krem, bool gt, bool eq) {
  if (gt) return gt_before + (eq_before < krem ? eq_before : krem);
  if (eq && eq_before < krem) return gt_before + eq_before;
  return -1;
}

// What a row does. L: the request's length clamped into [0, N].
enum class RadixRowKind : int { All = 0, Reuse = 1, Empty = 2, Select = 3 };
struct RadixRow {
  int64_t L = 0, lo = 0, hi = 0;
  RadixRowKind kind = RadixRowKind::All;
};
TK_HD RadixRow radix_row(int64_t seq_len, int64_t N, int64_t k, int64_t n_sink, int64_t n_local,
                         bool reuse_hit) {
  RadixRow r;
  r.L = seq_len < 0 ? 0 : (seq_len > N ? N : seq_len);
  r.lo = n_sink;
  r.hi = r.L - n_local;
  if (r.L <= n_sink + k + n_local) r.kind = RadixRowKind::All;
  else if (reuse_hit) r.kind = RadixRowKind::Reuse;
  else if (k == 0) r.kind = RadixRowKind::Empty;
  else r.kind = RadixRowKind::Select;
  return r;
}

// Reuse rows (the plain kernel's rule): an entry v is kept when it lies in [lo, hi) and exceeds
// the last kept one. key = v + 1 for an in-range entry, 0 otherwise; before = the largest key
// of the earlier entries (0: none); kept iff key > before.
TK_HD uint64_t radix_reuse_key(int32_t v, int64_t lo, int64_t hi) {
  return (v >= lo && v < hi) ? static_cast<uint64_t>(v) + 1u : 0u;
}
TK_HD bool radix_reuse_keep(uint64_t key, uint64_t before) { return key != 0 && key > before; }

// Several CTAs per row: the absolute index range [0, N_max) of every row is cut into `splits`
// chunks of `chunk` elements (a multiple of 4, so 16-byte loads stay aligned when the row is);
// CTA s works on [s * chunk, (s + 1) * chunk) intersected with the middle region and owns the
// workspace segment [s * chunk, (s + 1) * chunk) of the row. cap: entries the finishing CTA
// keeps in shared memory (its dynamic shared memory is 8 * cap bytes).
struct RadixTopkPlan {
  int64_t splits = 1;
  int64_t chunk = 4;
  int64_t cap = 1;
};

// At most 2 CTAs per SM in all (one wave of the emit kernel, which holds 2 CTAs per SM), at
// least kRadixMinChunk elements per CTA, at most kRadixMaxSplits CTAs per row; one CTA per row
// once the batch alone fills that wave.
TK_HD RadixTopkPlan radix_topk_plan(int64_t B, int64_t N_max, int64_t sm_count) {
  RadixTopkPlan p;
  const int64_t b = B < 1 ? 1 : B, n = N_max < 1 ? 1 : N_max, sms = sm_count < 1 ? 1 : sm_count;
  int64_t s = 2 * sms / b;
  const int64_t by_size = n / kRadixMinChunk;   // (0 for a short row: one CTA)
  if (s > by_size) s = by_size;
  if (s > kRadixMaxSplits) s = kRadixMaxSplits;
  if (s < 1) s = 1;
  int64_t chunk = (n + s - 1) / s;
  chunk = (chunk + 3) / 4 * 4;
  p.chunk = chunk;
  p.splits = (n + chunk - 1) / chunk;
  p.cap = n < kRadixSmemCap ? n : kRadixSmemCap;
  return p;
}

// CTA s's part [c0, c1) of the middle region [lo, hi) (empty: c0 >= c1).
TK_HD void radix_chunk_range(const RadixTopkPlan& p, int64_t s, int64_t lo, int64_t hi, int64_t& c0,
                             int64_t& c1) {
  const int64_t a = s * p.chunk, e = a + p.chunk;
  c0 = a > lo ? a : lo;
  c1 = e < hi ? e : hi;
}

// The streaming loop over [c0, c1): block steps t0 = floor4(c0), t0 + kRadixStep, ...; thread t
// of a step covers n0 = t0 + 4 t .. n0 + 3, with one 16-byte load when all four lie in [c0, c1)
// and the row allows vector loads (vec), else element by element (the head and tail).
TK_HD int64_t radix_first_step(int64_t c0) { return c0 & ~int64_t{3}; }
TK_HD bool radix_vector_ok(bool vec, int64_t n0, int64_t c0, int64_t c1) {
  return vec && n0 >= c0 && n0 + 4 <= c1;
}

// Workspace layout (bytes, each part 256-aligned): [histograms B x 2 x 2048 u32 (pass 0 of the
// row, pass 1 of its candidates) | arrival counters B u32] (zeroed by the launcher), segment
// counts B x splits i32, segments B x splits x chunk (key, index) u32 pairs.
TK_HD int64_t radix_align(int64_t v) { return (v + 255) / 256 * 256; }
TK_HD int64_t radix_zeroed_bytes(int64_t B) { return radix_align(8 * B * kRadixBins) + radix_align(4 * B); }
TK_HD int64_t radix_workspace_bytes(const RadixTopkPlan& p, int64_t B) {
  return radix_zeroed_bytes(B) + radix_align(4 * B * p.splits) + radix_align(8 * B * p.splits * p.chunk);
}
// The finishing CTA's dynamic shared memory (keys and indices of up to cap entries).
TK_HD int64_t radix_dynamic_smem_bytes(const RadixTopkPlan& p) { return 8 * p.cap; }

}  // namespace kv_select
}  // namespace tokenkernels

// ------------------------------------------------------------------ CUDA launcher (host API)
#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace tokenkernels {
namespace kv_select {

// topk, impl="tuned": the contract of launch_topk (kv_select.h) -- scores (B, N_max) fp32 with
// row stride ld, out (B, n_sink + k + n_local) int32 ascending, -1 padded, reuse / reuse_mask
// or nullptr -- with the plan of radix_topk_plan(B, N_max, SM count) and a workspace of
// radix_workspace_bytes(plan, B) bytes (its first radix_zeroed_bytes(B) are zeroed here, on the
// stream). Requires N_max <= INT32_MAX. Two kernels plus one memset; no host sync.
cudaError_t launch_topk_radix(const float* scores, int64_t B, int64_t N_max, int64_t ld,
                              const int32_t* seq_lens, int64_t k, int64_t n_sink, int64_t n_local,
                              const int32_t* reuse, const bool* reuse_mask, int32_t* out,
                              const RadixTopkPlan& plan, void* workspace, cudaStream_t stream);

}  // namespace kv_select
}  // namespace tokenkernels
#endif
