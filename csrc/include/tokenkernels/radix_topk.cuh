// kv_select radix top-k (impl="tuned"): CUDA device code (torch-free). The algorithm and the
// host-visible pieces it shares with the CPU emulation: radix_topk.h. Launcher:
// csrc/kv_select/kv_select_topk_kernels.cu.
#pragma once
#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "tokenkernels/radix_topk.h"

namespace tokenkernels {
namespace kv_select {
namespace radix_device {

constexpr int kThreads = kRadixThreads;
constexpr int kBins = kRadixBins;
constexpr int kItems = kRadixEmitItems;

using ScanI = cub::BlockScan<int, kThreads>;
using ScanU = cub::BlockScan<unsigned long long, kThreads>;

struct MaxU64 {
  __device__ __forceinline__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a > b ? a : b;
  }
};

// Shared memory every CTA of the emit kernel uses (static part).
struct EmitShared {
  union {
    ScanI::TempStorage i;
    ScanU::TempStorage u;
  } scan;
  unsigned hist[kBins];
  int seg_off[kRadixMaxSplits + 1];
  int bucket;
  long long krem;
  int last;
};

// Adds one key per lane to a shared histogram: lanes with the same bin elect their lowest lane,
// which adds the group's size (one atomic per distinct bin per warp, no same-address storm on
// ties). Every lane of the warp must call it (ok = false: no key).
__device__ __forceinline__ void warp_hist_add(unsigned* hist, uint32_t bin, bool ok) {
  const uint32_t sel = ok ? bin : 0xffffffffu;
  const unsigned peers = __match_any_sync(0xffffffffu, sel);
  const int lane = static_cast<int>(threadIdx.x & 31u);
  if (ok && __ffs(peers) - 1 == lane) atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
}

// Streams [c0, c1) of `row` in block steps (radix_first_step / radix_vector_ok): f(n0, v, ok)
// gets four consecutive elements n0 .. n0 + 3 per thread. The trip count is the same for every
// thread of the block (f may use warp and block collectives).
template <typename F>
__device__ __forceinline__ void stream_range(const float* __restrict__ row, int64_t c0, int64_t c1, bool vec,
                                             F&& f) {
  for (int64_t t0 = radix_first_step(c0); t0 < c1; t0 += kRadixStep) {
    const int64_t n0 = t0 + 4 * static_cast<int64_t>(threadIdx.x);
    float v[4];
    bool ok[4];
    if (radix_vector_ok(vec, n0, c0, c1)) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(row + n0));
      v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
#pragma unroll
      for (int j = 0; j < 4; ++j) ok[j] = true;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + j;
        ok[j] = n >= c0 && n < c1;
        v[j] = ok[j] ? __ldg(row + n) : 0.0f;
      }
    }
    f(n0, v, ok);
  }
}

// Block-wide bucket choice over hist[0, nbins) (shared): thread t owns the bins
// nbins - 1 - t * per .. nbins - per * (t + 1), highest first; one exclusive scan of the owned
// sums gives each thread the count above its bins, then radix_bucket_hit picks the bin. Writes
// sh.bucket and sh.krem (keys of that bin still to take); ends with a barrier.
__device__ __forceinline__ void select_bucket(EmitShared& sh, int nbins, long long krem) {
  const int per = nbins / kThreads;   // 4 (11-bit digit) or 2 (10-bit)
  const int top = nbins - 1 - static_cast<int>(threadIdx.x) * per;
  int local = 0;
  for (int i = 0; i < per; ++i) local += static_cast<int>(sh.hist[top - i]);
  if (threadIdx.x == 0) { sh.bucket = 0; sh.krem = krem; }   // (no hit: only with inconsistent counts)
  __syncthreads();   // the defaults land before any hit
  int above;
  ScanI(sh.scan.i).ExclusiveSum(local, above);
  for (int i = 0; i < per; ++i) {
    const int c = static_cast<int>(sh.hist[top - i]);
    if (radix_bucket_hit(above, c, krem)) { sh.bucket = top - i; sh.krem = krem - above; }
    above += c;
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------- kernel 1
// Pass-0 histogram of CTA (b, s)'s chunk, added to the row's global histogram ghist[b].
// sass: radix_topk_hist_kernel sm_80 LDG.E.128 MATCH !LDL !STL stack==0 regs<=64 smem<=9216
// sass: radix_topk_hist_kernel sm_90a LDG.E.128 MATCH !LDL !STL stack==0 regs<=64 smem<=9216
__global__ void __launch_bounds__(kThreads, 2) radix_topk_hist_kernel(
    const float* __restrict__ scores, int64_t N, int64_t ld, const int32_t* __restrict__ seq_lens, int64_t k,
    int64_t n_sink, int64_t n_local, const bool* __restrict__ reuse_mask, RadixTopkPlan plan, bool vec,
    unsigned* __restrict__ ghist) {
  __shared__ unsigned hist[kBins];
  const int64_t b = blockIdx.x, s = blockIdx.y;
  const RadixRow r = radix_row(seq_lens[b], N, k, n_sink, n_local, reuse_mask != nullptr && reuse_mask[b]);
  if (r.kind != RadixRowKind::Select) return;
  int64_t c0, c1;
  radix_chunk_range(plan, s, r.lo, r.hi, c0, c1);
  if (c0 >= c1) return;
  for (int i = threadIdx.x; i < kBins; i += kThreads) hist[i] = 0;
  __syncthreads();
  stream_range(scores + b * ld, c0, c1, vec, [&](int64_t, const float (&v)[4], const bool (&ok)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) warp_hist_add(hist, radix_digit(radix_key(v[j]), 0), ok[j]);
  });
  __syncthreads();
  unsigned* g = ghist + b * 2 * kBins;
  for (int i = threadIdx.x; i < kBins; i += kThreads) {
    const unsigned c = hist[i];
    if (c) atomicAdd(g + i, c);
  }
}

// ---------------------------------------------------------------------------------- finishing
// Entry sources of the finishing CTA: position p (0 .. total-1, index order) -> (key, index).
struct SmemEntries {
  const uint2* e;   // (key, index)
  __device__ __forceinline__ uint2 get(int p) const { return e[p]; }
};
struct GlobalEntries {   // the row's segments in the workspace
  const uint2* seg;      // segment s at seg + s * chunk
  int64_t chunk;
  const int* off;        // (splits + 1) segment offsets (shared)
  int splits;
  __device__ __forceinline__ uint2 get(int p) const {
    int lo = 0, hi = splits;   // the last segment whose offset is <= p
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (off[mid] <= p) lo = mid; else hi = mid;
    }
    return __ldcg(seg + lo * chunk + (p - off[lo]));
  }
};

// Passes first_pass .. 2 over the candidates (keys matching `prefix` on the bits fixed so far),
// then the ordered emission of the k winners into o[0, k): one block scan of packed
// (key > T, key == T) counts per kThreads * kItems entries. Every loop handles kItems entries per
// thread per step (independent loads in flight).
template <typename Src>
__device__ __forceinline__ void refine_and_emit(EmitShared& sh, const Src& src, int total, int first_pass,
                                                uint32_t prefix, long long krem, int32_t* __restrict__ o) {
  for (int pass = first_pass; pass < kRadixPasses; ++pass) {
    const int nbins = 1 << radix_bits(pass);
    const uint32_t fixed = radix_fixed_mask(pass);
    for (int i = threadIdx.x; i < nbins; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    for (int p0 = 0; p0 < total; p0 += kThreads * kItems) {
      uint2 e[kItems];
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int p = p0 + j * kThreads + static_cast<int>(threadIdx.x);
        e[j] = p < total ? src.get(p) : make_uint2(0u, 0u);
      }
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int p = p0 + j * kThreads + static_cast<int>(threadIdx.x);
        warp_hist_add(sh.hist, radix_digit(e[j].x, pass), p < total && (e[j].x & fixed) == prefix);
      }
    }
    __syncthreads();
    select_bucket(sh, nbins, krem);
    prefix |= static_cast<uint32_t>(sh.bucket) << radix_shift(pass);
    krem = sh.krem;
    __syncthreads();   // sh.hist / sh.bucket reuse
  }
  const uint32_t T = prefix;
  unsigned long long gt_run = 0, eq_run = 0;
  for (int p0 = 0; p0 < total; p0 += kThreads * kItems) {
    uint2 e[kItems];
    bool in[kItems];
    unsigned long long packed = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int p = p0 + static_cast<int>(threadIdx.x) * kItems + j;
      in[j] = p < total;
      e[j] = in[j] ? src.get(p) : make_uint2(0u, 0u);
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j)
      if (in[j]) packed += e[j].x > T ? (1ull << 32) : (e[j].x == T ? 1ull : 0ull);
    unsigned long long pre, tot;
    ScanU(sh.scan.u).ExclusiveSum(packed, pre, tot);
    long long gt_before = static_cast<long long>(gt_run + (pre >> 32));
    long long eq_before = static_cast<long long>(eq_run + (pre & 0xffffffffull));
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const bool gt = in[j] && e[j].x > T, eq = in[j] && e[j].x == T;
      const long long slot = radix_emit_slot(gt_before, eq_before, krem, gt, eq);
      if (slot >= 0) o[slot] = static_cast<int32_t>(e[j].y);
      gt_before += gt ? 1 : 0;
      eq_before += eq ? 1 : 0;
    }
    gt_run += tot >> 32;
    eq_run += tot & 0xffffffffull;
    __syncthreads();   // scan storage reuse
  }
}

// Reuse rows: the in-range entries of reuse[b] that exceed the last one kept, in order, into
// o[0, ...); returns how many (block-uniform).
__device__ __forceinline__ int64_t emit_reuse(EmitShared& sh, const int32_t* __restrict__ r, int64_t k,
                                              int64_t lo, int64_t hi, int32_t* __restrict__ o) {
  unsigned long long run_max = 0;
  int64_t written = 0;
  for (int64_t j0 = 0; j0 < k; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    const int32_t v = j < k ? r[j] : -1;
    const unsigned long long key = j < k ? radix_reuse_key(v, lo, hi) : 0ull;
    unsigned long long before, tile_max;
    ScanU(sh.scan.u).ExclusiveScan(key, before, run_max, MaxU64{}, tile_max);
    const bool keep = radix_reuse_keep(key, before);
    __syncthreads();
    unsigned long long pos, cnt;
    ScanU(sh.scan.u).ExclusiveSum(keep ? 1ull : 0ull, pos, cnt);
    if (keep) o[written + static_cast<int64_t>(pos)] = v;
    written += static_cast<int64_t>(cnt);
    run_max = tile_max > run_max ? tile_max : run_max;
    __syncthreads();
  }
  return written;
}

// ---------------------------------------------------------------------------------- kernel 2
// CTA (b, s): threshold bucket T1 from the row's pass-0 histogram; ordered compaction of its
// chunk's entries with digit >= T1 into segment s as (key, index), and the pass-1 histogram of
// its candidates (digit == T1) added to the row's second global histogram; then the row's last
// CTA to arrive picks the pass-1 bucket, runs pass 2 over the candidates and writes the row.
// Dynamic shared memory: radix_dynamic_smem_bytes(plan) (cap (key, index) entries).
// sass: radix_topk_emit_kernel sm_80 LDG.E.128 MATCH !LDL !STL stack==0 regs<=64 smem<=16384
// sass: radix_topk_emit_kernel sm_90a LDG.E.128 MATCH !LDL !STL stack==0 regs<=64 smem<=16384
__global__ void __launch_bounds__(kThreads, 2) radix_topk_emit_kernel(
    const float* __restrict__ scores, int64_t N, int64_t ld, const int32_t* __restrict__ seq_lens, int64_t k,
    int64_t n_sink, int64_t n_local, const int32_t* __restrict__ reuse, const bool* __restrict__ reuse_mask,
    RadixTopkPlan plan, bool vec, unsigned* __restrict__ ghist, unsigned* __restrict__ arrive,
    int* __restrict__ seg_count, uint2* __restrict__ segs, int32_t* __restrict__ out) {
  extern __shared__ uint2 dyn_smem[];
  __shared__ EmitShared sh;
  const int64_t b = blockIdx.x, s = blockIdx.y;
  const int splits = static_cast<int>(plan.splits);
  const RadixRow r = radix_row(seq_lens[b], N, k, n_sink, n_local, reuse_mask != nullptr && reuse_mask[b]);
  const int64_t W = n_sink + k + n_local;
  int32_t* o = out + b * W;
  const float* row = scores + b * ld;
  int64_t written = 0;   // middle entries written (block-uniform)

  if (r.kind == RadixRowKind::All) {
    if (s != 0) return;
    for (int64_t i = threadIdx.x; i < W; i += kThreads) o[i] = i < r.L ? static_cast<int32_t>(i) : -1;
    return;
  }
  if (r.kind == RadixRowKind::Select) {
    unsigned* h0 = ghist + b * 2 * kBins;   // pass-0 histogram (kernel 1)
    unsigned* h1 = h0 + kBins;              // pass-1 histogram of the candidates (this kernel)
    for (int i = threadIdx.x; i < kBins; i += kThreads) sh.hist[i] = h0[i];
    __syncthreads();
    select_bucket(sh, kBins, k);
    const uint32_t t1 = static_cast<uint32_t>(sh.bucket);
    const long long krem1 = sh.krem;
    for (int i = threadIdx.x; i < kBins; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    // ordered compaction of the chunk (+ the candidates' pass-1 histogram)
    int64_t c0, c1;
    radix_chunk_range(plan, s, r.lo, r.hi, c0, c1);
    uint2* seg = segs + (b * splits + s) * plan.chunk;
    int run = 0;
    stream_range(row, c0, c1, vec, [&](int64_t n0, const float (&v)[4], const bool (&ok)[4]) {
      uint32_t key[4];
      bool keep[4];
      int local = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        key[j] = radix_key(v[j]);
        keep[j] = ok[j] && radix_compact_keep(key[j], t1);
        local += keep[j] ? 1 : 0;
        warp_hist_add(sh.hist, radix_digit(key[j], 1), ok[j] && radix_digit(key[j], 0) == t1);
      }
      int pos, tot;
      ScanI(sh.scan.i).ExclusiveSum(local, pos, tot);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (keep[j]) seg[run + pos++] = make_uint2(key[j], static_cast<uint32_t>(n0 + j));
      run += tot;
      __syncthreads();   // scan storage reuse
    });
    if (threadIdx.x == 0) seg_count[b * splits + s] = run;
    __syncthreads();
    for (int i = threadIdx.x; i < kBins; i += kThreads) {
      const unsigned c = sh.hist[i];
      if (c) atomicAdd(h1 + i, c);
    }
    // arrival: the last CTA of the row goes on (threadfence pattern: writes, fence, counter)
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      const unsigned prev = atomicAdd(arrive + b, 1u);
      __threadfence();   // (as cooperative_groups' grid sync: fence, arrive, fence, barrier)
      sh.last = prev == static_cast<unsigned>(splits - 1);
    }
    __syncthreads();
    if (!sh.last) return;
    __threadfence();
    // segment offsets (splits <= kThreads) and the pass-1 bucket
    const int c = static_cast<int>(threadIdx.x) < splits ? __ldcg(seg_count + b * splits + threadIdx.x) : 0;
    int off, total;
    ScanI(sh.scan.i).ExclusiveSum(c, off, total);
    if (static_cast<int>(threadIdx.x) < splits) sh.seg_off[threadIdx.x] = off;
    if (threadIdx.x == 0) sh.seg_off[splits] = total;
    for (int i = threadIdx.x; i < kBins; i += kThreads) sh.hist[i] = __ldcg(h1 + i);
    __syncthreads();
    select_bucket(sh, kBins, krem1);
    const uint32_t prefix = (t1 << radix_shift(0)) | (static_cast<uint32_t>(sh.bucket) << radix_shift(1));
    const long long krem2 = sh.krem;
    __syncthreads();
    int32_t* mid = o + n_sink;
    if (total <= plan.cap) {
      for (int q = 0; q < splits; ++q) {
        const int a = sh.seg_off[q], e = sh.seg_off[q + 1];
        const uint2* sg = segs + (b * splits + q) * plan.chunk - a;
        for (int j0 = a; j0 < e; j0 += kThreads * kItems) {
          uint2 ent[kItems];
#pragma unroll
          for (int u = 0; u < kItems; ++u) {
            const int j = j0 + u * kThreads + static_cast<int>(threadIdx.x);
            if (j < e) ent[u] = __ldcg(sg + j);
          }
#pragma unroll
          for (int u = 0; u < kItems; ++u) {
            const int j = j0 + u * kThreads + static_cast<int>(threadIdx.x);
            if (j < e) dyn_smem[j] = ent[u];
          }
        }
      }
      __syncthreads();
      refine_and_emit(sh, SmemEntries{dyn_smem}, total, 2, prefix, krem2, mid);
    } else {
      refine_and_emit(sh, GlobalEntries{segs + b * splits * plan.chunk, plan.chunk, sh.seg_off, splits}, total, 2,
                      prefix, krem2, mid);
    }
    written = k;
  } else {
    if (s != 0) return;
    if (r.kind == RadixRowKind::Reuse) written = emit_reuse(sh, reuse + b * k, k, r.lo, r.hi, o + n_sink);
  }
  for (int64_t i = threadIdx.x; i < n_sink; i += kThreads) o[i] = static_cast<int32_t>(i);
  for (int64_t i = threadIdx.x; i < n_local; i += kThreads) o[n_sink + written + i] = static_cast<int32_t>(r.hi + i);
  for (int64_t i = n_sink + written + n_local + threadIdx.x; i < W; i += kThreads) o[i] = -1;
}

}  // namespace radix_device
}  // namespace kv_select
}  // namespace tokenkernels
