// kv_select scoring at bandwidth: CUDA device code (torch-free) of kv_select.score(impl="tuned").
// Design, work list and the host-visible arithmetic: kv_select_score.h. Launcher:
// csrc/kv_select/kv_select_score_kernels.cu. Three kernels:
//   kvs_score_bw_kernel        pass 1 (persistent): logits[b][h][n] + per-chunk (max, sum exp)
//   kvs_score_bw_merge_kernel  pass 2: per (b, h) the request's chunk partials -> (m, s)
//   kvs_score_bw_final_kernel  pass 3: out[b][n] = sum_h exp(logit - m_h) / s_h (logits read once)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "tokenkernels/kv_select.h"
#include "tokenkernels/kv_select_score.h"

namespace tokenkernels {
namespace kv_select {
namespace score_bw {

constexpr int CPT = kScoreTunedCPT;

// Everything pass 1 needs (by value).
struct Pass1Args {
  const void* k;
  ScoreTokenMap map;
  int64_t s_head;
  const int32_t* block_table;   // (B, bt_stride) or nullptr
  int64_t bt_stride;
  const int32_t* seq_lens;
  const bool* skip;             // (B,) or nullptr
  const bool* valid;            // (B, N_max) or nullptr
  int64_t N_max;
  const float* q;               // (B, H_q, D) fp32 contiguous, pre-scaled
  int H_q, H_kv, G, D;
  int tp, tp_shift, stages;
  bool fast;                    // score_tile_fast_path: one offset per tile
  int64_t chunk_tokens;
  uint32_t chunks_per_req, chunks;
  float* logits;                // (B, H_q, N_max)
  float2* pstat;                // (B, H_q, chunks_per_req)
};

// ---------------------------------------------------------------- cp.async (16 bytes, L2 evict-first)
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, uint64_t pol) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "l"(pol)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Waits until at most stages - 1 groups of this thread are pending (the oldest tile landed).
__device__ __forceinline__ void cp_async_wait_oldest(int stages) {
  if (stages >= 4) cp_async_wait<3>();
  else if (stages == 3) cp_async_wait<2>();
  else cp_async_wait<1>();
}

// ---------------------------------------------------------------- 8 elements of a 16-byte vector
template <typename T> struct Unpack8;
template <> struct Unpack8<__nv_bfloat16> {
  __device__ __forceinline__ static void run(const uint4& r, float (&f)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);               // lower address: low half
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
template <> struct Unpack8<__half> {
  __device__ __forceinline__ static void run(const uint4& r, float (&f)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 v = __half22float2(h);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
};

// ---------------------------------------------------------------- the producer's position
// Walks the block's chunks c = blockIdx.x + i * gridDim.x and their tiles, skipping chunks past
// the request's length exactly as the consumer loop does (both read the same seq_lens / skip).
struct TileIter {
  uint32_t c;
  int32_t b;
  int64_t n0, n_end;
  bool done;
};

__device__ __forceinline__ int64_t req_len(const Pass1Args& a, int32_t b) {
  if (a.skip && a.skip[b]) return 0;
  const int64_t n = a.seq_lens[b];
  return n < 0 ? 0 : (n > a.N_max ? a.N_max : n);
}

// Moves `it` to the first non-empty chunk at or after it.c (it.c already set).
__device__ __forceinline__ void iter_settle(const Pass1Args& a, TileIter& it) {
  while (it.c < a.chunks) {
    const ScoreChunk ck = score_chunk(it.c, a.chunks_per_req, a.chunk_tokens, a.N_max);
    const int64_t len = req_len(a, ck.b);
    const int64_t e = ck.n_end < len ? ck.n_end : len;
    if (ck.n_begin < e) {
      it.b = ck.b;
      it.n0 = ck.n_begin;
      it.n_end = e;
      return;
    }
    it.c += gridDim.x;
  }
  it.done = true;
}

__device__ __forceinline__ void iter_next(const Pass1Args& a, TileIter& it, int tile) {
  it.n0 += tile;
  if (it.n0 < it.n_end) return;
  it.c += gridDim.x;
  iter_settle(a, it);
}

// Issues the cp.async copies of the producer's current tile into ring slot `slot` (or an empty
// group when the block's list is exhausted), records which rows were copied, commits, advances.
template <typename T>
__device__ __forceinline__ void issue_tile(const Pass1Args& a, TileIter& it, int slot, int p, int64_t head_off,
                                           uint4* ring, uint8_t* masks, uint64_t pol) {
  const int tid = threadIdx.x, nthr = blockDim.x;
  if (!it.done) {
    const T* kb = static_cast<const T*>(a.k);
    const int32_t* bt_row = a.block_table ? a.block_table + static_cast<int64_t>(it.b) * a.bt_stride : nullptr;
    const int64_t req_off = static_cast<int64_t>(it.b) * a.map.s_page;
    const bool* vrow = a.valid ? a.valid + static_cast<int64_t>(it.b) * a.N_max : nullptr;
    uint32_t bits = 0;
    uint4* dst = ring + static_cast<int64_t>(slot) * CPT * nthr + tid;
    const int64_t n_first = it.n0 + p;
    if (a.fast) {   // the tile in one page, no mask: one offset, rows at a fixed stride
      const int cnt = score_tile_rows(n_first, it.n_end, a.tp_shift);
      const int64_t off0 = cnt > 0 ? score_row_offset(a.map, bt_row, req_off, static_cast<uint32_t>(n_first)) : -1;
      if (off0 >= 0) {
        const T* src = kb + off0 + head_off;
        const int64_t step = static_cast<int64_t>(a.tp) * a.map.s_slot;
#pragma unroll
        for (int j = 0; j < CPT; ++j)
          if (j < cnt) cp_async16(dst + j * nthr, src + j * step, pol);
        bits = (1u << cnt) - 1u;
      }
    } else {
#pragma unroll 1
      for (int j = 0; j < CPT; ++j) {   // (not unrolled: the copies need no registers to land in)
        const int64_t n = n_first + static_cast<int64_t>(a.tp) * j;
        if (n < it.n_end && (vrow == nullptr || vrow[n])) {
          const int64_t off = score_row_offset(a.map, bt_row, req_off, static_cast<uint32_t>(n));
          if (off >= 0) {
            cp_async16(dst + j * nthr, kb + off + head_off, pol);
            bits |= 1u << j;
          }
        }
      }
    }
    masks[slot * nthr + tid] = static_cast<uint8_t>(bits);
    iter_next(a, it, CPT * a.tp);
  }
  cp_async_commit();
}

// ---------------------------------------------------------------- pass 1
// sass: kvs_score_bw_kernel sm_80 LDGSTS !LDL !STL stack==0 regs<=160
// sass: kvs_score_bw_kernel sm_90a LDGSTS !LDL !STL stack==0 regs<=160
template <typename T, int R, int MAXG>
__global__ void __launch_bounds__(score_tuned_max_threads(MAXG), 1) kvs_score_bw_kernel(Pass1Args a) {
  constexpr int U = score_rows_per_batch(R, MAXG);
  constexpr int V = U * MAXG;
  constexpr int NB = CPT / U;
  static_assert(V <= R && CPT % U == 0, "reduce batch must fit the lane group");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, nthr = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nthr >> 5;
  const int stages = a.stages;
  uint4* ring = reinterpret_cast<uint4*>(smem_raw);
  uint8_t* masks = smem_raw + score_tuned_mask_offset(stages, nthr);
  float2* part = reinterpret_cast<float2*>(smem_raw + score_tuned_part_offset(stages, nthr));

  const int sub = tid % R, gi = tid / R;
  const int g = gi % a.H_kv, p = gi / a.H_kv;
  const int G = a.G, H_q = a.H_q;
  const int64_t head_off = static_cast<int64_t>(g) * a.s_head + sub * 8;
  const bool owner = rs_owner(sub, R, V);
  const int own_x = rs_owned_index(sub, R, V);
  const int own_u = own_x / MAXG, own_h = own_x % MAXG;
  const bool own_head = owner && own_h < G;
  const int tile = CPT * a.tp;
  const uint64_t pol = evict_first_policy();

  // Producer: the first `stages` tiles of the block's list.
  TileIter prod{blockIdx.x, 0, 0, 0, false};
  iter_settle(a, prod);
  for (int s = 0; s < stages; ++s) issue_tile<T>(a, prod, s, p, head_off, ring, masks, pol);

  float qr[MAXG][8];
  int32_t qb = -1;
  int slot = 0, par = 0;
  for (uint32_t c = blockIdx.x; c < a.chunks; c += gridDim.x) {
    const ScoreChunk ck = score_chunk(c, a.chunks_per_req, a.chunk_tokens, a.N_max);
    const int64_t len = req_len(a, ck.b);
    const int64_t n_end = ck.n_end < len ? ck.n_end : len;
    float2* ps = a.pstat + static_cast<int64_t>(ck.b) * H_q * a.chunks_per_req + ck.cl;
    if (ck.n_begin >= n_end) {   // nothing valid: empty partials (block-uniform branch)
      for (int h = tid; h < H_q; h += nthr) ps[static_cast<int64_t>(h) * a.chunks_per_req] = make_float2(-INFINITY, 0.0f);
      continue;
    }
    if (ck.b != qb) {   // this lane's slice of its G q-heads, fp32 in registers
      qb = ck.b;
      const float* qg = a.q + (static_cast<int64_t>(qb) * H_q + static_cast<int64_t>(g) * G) * a.D + sub * 8;
#pragma unroll
      for (int h = 0; h < MAXG; ++h) {
        float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
        if (h < G) {
          lo = *reinterpret_cast<const float4*>(qg + static_cast<int64_t>(h) * a.D);
          hi = *reinterpret_cast<const float4*>(qg + static_cast<int64_t>(h) * a.D + 4);
        }
        qr[h][0] = lo.x; qr[h][1] = lo.y; qr[h][2] = lo.z; qr[h][3] = lo.w;
        qr[h][4] = hi.x; qr[h][5] = hi.y; qr[h][6] = hi.z; qr[h][7] = hi.w;
      }
    }
    float* lrow = a.logits + (static_cast<int64_t>(ck.b) * H_q + static_cast<int64_t>(g) * G +
                              (own_head ? own_h : 0)) * a.N_max;
    float m_run = -INFINITY, s_run = 0.0f;
    for (int64_t n0 = ck.n_begin; n0 < n_end; n0 += tile) {
      cp_async_wait_oldest(stages);
      const uint32_t bits = masks[slot * nthr + tid];
      const uint4* rs = ring + static_cast<int64_t>(slot) * CPT * nthr + tid;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        float acc[V];
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = 0.0f;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          float kf[8];
          Unpack8<T>::run(rs[(nb * U + u) * nthr], kf);
#pragma unroll
          for (int h = 0; h < MAXG; ++h)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[u * MAXG + h] = fmaf(qr[h][e], kf[e], acc[u * MAXG + h]);
        }
        // reduce-scatter over the R lanes (kv_select_score.h)
        int cnt = V;
#pragma unroll
        for (int o = R / 2; o > 0; o >>= 1) {
          const bool up = (sub & o) != 0;
          if (cnt > 1) {
#pragma unroll
            for (int kk = 0; kk < V / 2; ++kk) {
              if (kk < cnt / 2) {
                const float send = rs_send(acc, kk, cnt, up);
                rs_keep_add(acc, kk, cnt, up, __shfl_xor_sync(0xffffffffu, send, o));
              }
            }
            cnt /= 2;
          } else {
            acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], o);
          }
        }
        if (own_head) {
          const int j = nb * U + own_u;
          const int64_t n = n0 + p + static_cast<int64_t>(a.tp) * j;
          if (n < n_end) {
            const float l = ((bits >> j) & 1u) ? acc[0] : -INFINITY;
            lrow[n] = l;
            online_push(m_run, s_run, l);
          }
        }
      }
      issue_tile<T>(a, prod, slot, p, head_off, ring, masks, pol);   // refill the slot just read
      slot = slot + 1 == stages ? 0 : slot + 1;
    }
    // Chunk end: merge the owners of each q-head (tp * U of them) into pstat[b][h][cl].
    float2* pb = part + par * nthr;
    pb[tid] = own_head ? make_float2(m_run, s_run) : make_float2(-INFINITY, 0.0f);
    __syncthreads();
    for (int hq = warp; hq < H_q; hq += nwarps) {
      const int gg = hq / G, hh = hq - gg * G;
      float m = -INFINITY, s = 0.0f;
      if (lane < a.tp * U) {
        const float2 v = pb[score_owner_tid(gg, hh, lane / U, lane % U, R, MAXG, a.H_kv)];
        m = v.x;
        s = v.y;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
      }
      if (lane == 0) ps[static_cast<int64_t>(hq) * a.chunks_per_req] = make_float2(m, s);
    }
    par ^= 1;   // the next chunk writes the other buffer: no second barrier needed
  }
  cp_async_wait<0>();   // (only empty groups can be pending here)
}

// ---------------------------------------------------------------- pass 2
// One block (128 threads) per (b, h): (m, s) of the request's chunk partials; an empty head
// (no valid token) gets (+inf, 1) so that pass 3's terms exp(l - m) / s are 0.
// sass: kvs_score_bw_merge_kernel sm_80 !LDL !STL stack==0 regs<=32
// sass: kvs_score_bw_merge_kernel sm_90a !LDL !STL stack==0 regs<=32
__global__ void __launch_bounds__(128) kvs_score_bw_merge_kernel(const float2* __restrict__ pstat, int nchunk,
                                                                 float2* __restrict__ stat) {
  __shared__ float2 red[4];
  const int64_t row = blockIdx.x;
  const float2* p = pstat + row * nchunk;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float m = -INFINITY, s = 0.0f;
  for (int i = threadIdx.x; i < nchunk; i += blockDim.x) {
    const float2 v = p[i];
    online_merge(m, s, v.x, v.y);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    online_merge(m, s, m2, s2);
  }
  if (lane == 0) red[warp] = make_float2(m, s);
  __syncthreads();
  if (threadIdx.x == 0) {
    m = -INFINITY;
    s = 0.0f;
    for (int w = 0; w < 4; ++w) online_merge(m, s, red[w].x, red[w].y);
    stat[row] = (m == -INFINITY || s == 0.0f) ? make_float2(INFINITY, 1.0f) : make_float2(m, s);
  }
}

// ---------------------------------------------------------------- pass 3
// grid (ceil(N_max / (256 * 4)), B), 256 threads, 4 consecutive tokens per thread (16-byte loads
// of each head's logits when N_max % 4 == 0, else scalar). -inf past seq_len, for valid[b][n]
// false and in skipped rows (their logits are never read).
constexpr int kFinalThreads = 256;
// sass: kvs_score_bw_final_kernel sm_80 LDG.E.128 !LDL !STL stack==0 regs<=64
// sass: kvs_score_bw_final_kernel sm_90a LDG.E.128 !LDL !STL stack==0 regs<=64
__global__ void __launch_bounds__(kFinalThreads) kvs_score_bw_final_kernel(
    const int32_t* __restrict__ seq_lens, const bool* __restrict__ skip, const bool* __restrict__ valid,
    int64_t N_max, int H_q, const float* __restrict__ logits, const float2* __restrict__ stat,
    float* __restrict__ out) {
  extern __shared__ float2 st[];   // (H_q) this request's (m, s)
  const int b = blockIdx.y;
  for (int h = threadIdx.x; h < H_q; h += blockDim.x) st[h] = stat[static_cast<int64_t>(b) * H_q + h];
  __syncthreads();
  int64_t len = (skip && skip[b]) ? 0 : seq_lens[b];
  len = len < 0 ? 0 : (len > N_max ? N_max : len);
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (n >= N_max) return;
  const bool* vrow = valid ? valid + static_cast<int64_t>(b) * N_max : nullptr;
  bool take[4];
  bool any = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    take[i] = n + i < len && (vrow == nullptr || vrow[n + i]);
    any = any || take[i];
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const float* lg = logits + static_cast<int64_t>(b) * H_q * N_max + n;
  // 16-byte loads when the row stride allows them and all four tokens take part (a logit is
  // only read where pass 1 wrote it)
  const bool vec = (N_max & 3) == 0 && take[0] && take[1] && take[2] && take[3];
  if (any) {
    for (int h = 0; h < H_q; ++h) {
      const float2 ms = st[h];
      float l[4];
      if (vec) {
        const float4 v = *reinterpret_cast<const float4*>(lg + static_cast<int64_t>(h) * N_max);
        l[0] = v.x; l[1] = v.y; l[2] = v.z; l[3] = v.w;
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) l[i] = take[i] ? lg[static_cast<int64_t>(h) * N_max + i] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] += __expf(l[i] - ms.x) / ms.y;
    }
  }
  float r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) r[i] = take[i] ? acc[i] : -INFINITY;
  float* o = out + static_cast<int64_t>(b) * N_max + n;
  if ((N_max & 3) == 0) {
    *reinterpret_cast<float4*>(o) = make_float4(r[0], r[1], r[2], r[3]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (n + i < N_max) o[i] = r[i];
  }
}

}  // namespace score_bw
}  // namespace kv_select
}  // namespace tokenkernels
