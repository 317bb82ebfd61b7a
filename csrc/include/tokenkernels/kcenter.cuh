// kcenter family: CUDA device code (torch-free). Launchers: csrc/kcenter/kcenter_kernels.cu.
//
// Indexing conventions (all kernels):
//   item b = b0 + blockIdx.y (row kernels: the launcher covers B in chunks of at most
//   kMaxGridY items, so any B launches) or blockIdx.x (one-block-per-item kernels)
//   token j in [0, N); valid(b, j) = j < lengths[b] && !exclude[b*N + j]
//   Gram value of (i, j) of item b: gram[b*batch_stride + (i - row0)*ld + j]
//   "mind" = running minimum key to the selected set; -inf marks selected or invalid tokens.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "tokenkernels/kcenter.h"
#include "tokenkernels/convert.cuh"
#include "tokenkernels/reduce.cuh"

namespace tokenkernels {
namespace kcenter {
namespace device {
using namespace ::tokenkernels::device;   // shared device helpers: convert.cuh, reduce.cuh

__device__ __forceinline__ int64_t item_length(const Problem& p, int64_t b) {
  if (!p.lengths) return p.N;
  const int64_t L = p.lengths[b];
  return L < 0 ? 0 : (L > p.N ? p.N : L);
}
__device__ __forceinline__ bool is_valid(const Problem& p, int64_t b, int64_t j, int64_t L) {
  return j < L && !(p.exclude && p.exclude[b * p.N + j]);
}
// True when an arg-max over the packed keys found nothing pickable: either no key took part
// (N = 0: the max stayed at its identity kPackedMin, whose value decodes to NaN and whose
// index to 2^32 - 1) or every token is selected / invalid (-inf).
__device__ __forceinline__ bool nothing_to_pick(unsigned long long best) {
  return best == kPackedMin || packed_value(best) == -INFINITY;
}
__device__ __forceinline__ int64_t item_k(int64_t k, const int64_t* k_per_item, int64_t b) {
  if (!k_per_item) return k;
  const int64_t kb = k_per_item[b];
  return kb < 0 ? 0 : (kb > k ? k : kb);
}

// ---------------------------------------------------------------- nearest-neighbour keys
// One warp per row. grid = (ceil(rows / warps_per_block), items b0 .. b0 + gridDim.y - 1);
// launched with 256 threads.
__global__ void __launch_bounds__(256) nn_keys_kernel(Problem p, const float* __restrict__ gram, int64_t row0,
                               int64_t rows, int64_t ld, int64_t batch_stride,
                               float* __restrict__ nn_key, int64_t b0) {
  const int64_t b = b0 + blockIdx.y;
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (r >= rows) return;
  const int64_t i = row0 + r;
  const int64_t L = item_length(p, b);
  const float* aux = p.aux + b * p.N;
  float best = INFINITY;
  if (is_valid(p, b, i, L)) {
    const float* g = gram + b * batch_stride + r * ld;
    const float ai = aux[i];
    for (int64_t j = lane; j < L; j += 32) {
      if (j == i || !is_valid(p, b, j, L)) continue;
      best = fminf(best, key_from_gram(p.metric, g[j], ai, aux[j]));
    }
    best = warp_min_f(best);
  } else {
    best = -INFINITY;   // invalid rows never win the arg-max
  }
  if (lane == 0) nn_key[b * p.N + i] = best;
}

// ---------------------------------------------------------------- greedy over a full Gram
// Both variants: one block per item; the first pick is the arg-max of a score that encodes the
// start rule (nn_key for "isolated"; for a given start, 1 at the start token and 0 elsewhere,
// or 1 everywhere when that start is invalid, which falls back to the first valid token).
__device__ __forceinline__ float start_score(const Problem& p, const float* nn_key,
                                             const int64_t* start, bool start_ok, int64_t st,
                                             int64_t b, int64_t j, bool valid) {
  if (!valid) return -INFINITY;
  if (!start) return nn_key[b * p.N + j];
  return start_ok ? (j == st ? 1.0f : 0.0f) : 1.0f;
}

// Plain variant: the running minimum lives in global memory (scratch, B*N floats); thread t
// handles tokens t, t + blockDim, ... Straightforward, any N.
__global__ void __launch_bounds__(1024) greedy_gram_plain_kernel(
    Problem p, const float* __restrict__ gram, const float* __restrict__ nn_key,
    const int64_t* __restrict__ start, int64_t k, const int64_t* __restrict__ k_per_item,
    int64_t* __restrict__ idx, float* __restrict__ radii, float* __restrict__ scratch) {
  __shared__ unsigned long long red[32];
  const int64_t b = blockIdx.x, N = p.N;
  const int64_t L = item_length(p, b);
  const int64_t kb = item_k(k, k_per_item, b);
  int64_t* out_idx = idx + b * k;
  float* out_rad = radii + b * k;
  for (int64_t s = threadIdx.x; s < k; s += blockDim.x) {
    out_idx[s] = -1;
    out_rad[s] = NAN;
  }
  float* mind = scratch + b * N;
  const float* aux = p.aux + b * N;
  const int64_t st = start ? start[b] : -1;
  const bool start_ok = st >= 0 && st < N && is_valid(p, b, st, L);
  unsigned long long best = kPackedMin;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const bool v = is_valid(p, b, j, L);
    mind[j] = v ? INFINITY : -INFINITY;
    const unsigned long long key = pack_argmax(start_score(p, nn_key, start, start_ok, st, b, j, v), j);
    best = key > best ? key : best;
  }
  best = block_max_u64(best, red);   // its barriers also order mind[] before later reads
  if (kb == 0 || nothing_to_pick(best)) return;
  int64_t pick = packed_index(best);
  float rad = INFINITY;   // radius of the current pick
  if (!start && packed_value(best) != INFINITY) rad = dist_from_key(p.metric, packed_value(best));
  const float* gb = gram + b * N * N;
  for (int64_t s = 0; s < kb; ++s) {
    if (threadIdx.x == 0) {
      out_idx[s] = pick;
      out_rad[s] = rad;
      mind[pick] = -INFINITY;   // selected
    }
    __syncthreads();
    if (s + 1 == kb) break;
    const float* grow = gb + pick * N;   // Gram row of the pick (fp32)
    const float ap = aux[pick];
    unsigned long long local = kPackedMin;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float v = fminf(mind[j], key_from_gram(p.metric, grow[j], ap, aux[j]));
      mind[j] = v;
      const unsigned long long key = pack_argmax(v, j);
      local = key > local ? key : local;
    }
    const unsigned long long top = block_max_u64(local, red);
    if (nothing_to_pick(top)) break;   // nothing left (only without `check`)
    pick = packed_index(top);
    rad = dist_from_key(p.metric, packed_value(top));
  }
}

// Simt variant: thread t owns tokens t + i*blockDim (i < ITEMS) and keeps their running
// minimum and aux value in registers, so a step is: read the pick's Gram row (L2-resident),
// update registers, one block arg-max with a single barrier (double-buffered partials). The
// owner of the pick marks it selected in its own registers: no other barrier. N <= ITEMS*1024,
// ITEMS <= 8 (16 spills registers under the 1024-thread launch bound).
template <int ITEMS>
__global__ void __launch_bounds__(1024) greedy_gram_reg_kernel(
    Problem p, const float* __restrict__ gram, const float* __restrict__ nn_key,
    const int64_t* __restrict__ start, int64_t k, const int64_t* __restrict__ k_per_item,
    int64_t* __restrict__ idx, float* __restrict__ radii) {
  __shared__ unsigned long long red[2][32];
  const int64_t b = blockIdx.x, N = p.N;
  const int T = blockDim.x, tid = threadIdx.x;
  const int64_t L = item_length(p, b);
  const int64_t kb = item_k(k, k_per_item, b);
  int64_t* out_idx = idx + b * k;
  float* out_rad = radii + b * k;
  for (int64_t s = tid; s < k; s += T) {
    out_idx[s] = -1;
    out_rad[s] = NAN;
  }
  const int64_t st = start ? start[b] : -1;
  const bool start_ok = st >= 0 && st < N && is_valid(p, b, st, L);
  float mind[ITEMS], aux[ITEMS];
  unsigned long long best = kPackedMin;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int64_t j = tid + int64_t(it) * T;
    const bool v = j < N && is_valid(p, b, j, L);
    mind[it] = v ? INFINITY : -INFINITY;
    aux[it] = j < N ? p.aux[b * N + j] : 0.0f;
    if (j < N) {
      const unsigned long long key = pack_argmax(start_score(p, nn_key, start, start_ok, st, b, j, v), j);
      best = key > best ? key : best;
    }
  }
  best = block_max_u64_db(best, red[0]);
  int buf = 1;
  if (kb == 0 || nothing_to_pick(best)) return;
  int64_t pick = packed_index(best);
  float rad = INFINITY;
  if (!start && packed_value(best) != INFINITY) rad = dist_from_key(p.metric, packed_value(best));
  const float* gb = gram + b * N * N;
  for (int64_t s = 0; s < kb; ++s) {
    if (tid == 0) {
      out_idx[s] = pick;
      out_rad[s] = rad;
    }
#pragma unroll
    for (int it = 0; it < ITEMS; ++it)
      if (tid + int64_t(it) * T == pick) mind[it] = -INFINITY;   // the owner marks it selected
    if (s + 1 == kb) break;
    const float* grow = gb + pick * N;
    const float ap = p.aux[b * N + pick];
    unsigned long long local = kPackedMin;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t j = tid + int64_t(it) * T;
      if (j < N) {
        const float v = fminf(mind[it], key_from_gram(p.metric, grow[j], ap, aux[it]));
        mind[it] = v;
        const unsigned long long key = pack_argmax(v, j);
        local = key > local ? key : local;
      }
    }
    const unsigned long long top = block_max_u64_db(local, red[buf]);
    buf ^= 1;
    if (nothing_to_pick(top)) break;
    pick = packed_index(top);
    rad = dist_from_key(p.metric, packed_value(top));
  }
}

// ---------------------------------------------------------------- streaming greedy (large N)
// Workspace layout per batch item (see streaming_workspace_bytes):
//   mind[B*N] f32 | partial[B*nblk] u64 | counter[B] u32 | pick[B] i64
struct StreamState {
  float* mind;
  unsigned long long* partial;
  unsigned int* counter;
  int64_t* pick;   // current pick whose row the next step computes; -1 = finished
  int64_t nblk;
};

using tokenkernels::device::to_f;

// One block per item: outputs padding, mind initialisation and the first pick.
__global__ void __launch_bounds__(1024) stream_init_kernel(Problem p, const float* __restrict__ nn_key,
                                   const int64_t* __restrict__ start, int64_t k,
                                   const int64_t* __restrict__ k_per_item, int64_t* __restrict__ idx,
                                   float* __restrict__ radii, StreamState ws) {
  __shared__ unsigned long long red[32];
  const int64_t b = blockIdx.x, N = p.N;
  const int64_t L = item_length(p, b);
  const int64_t kb = item_k(k, k_per_item, b);
  for (int64_t s = threadIdx.x; s < k; s += blockDim.x) {
    idx[b * k + s] = -1;
    radii[b * k + s] = NAN;
  }
  const int64_t st = start ? start[b] : -1;
  const bool start_ok = st >= 0 && st < N && is_valid(p, b, st, L);
  unsigned long long best = kPackedMin;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const bool v = is_valid(p, b, j, L);
    ws.mind[b * N + j] = v ? INFINITY : -INFINITY;
    float score = !v ? -INFINITY : (start ? (start_ok ? (j == st ? 1.0f : 0.0f) : 1.0f) : nn_key[b * N + j]);
    unsigned long long key = pack_argmax(score, j);
    best = key > best ? key : best;
  }
  best = block_max_u64(best, red);
  if (threadIdx.x == 0) {
    ws.counter[b] = 0;
    if (kb == 0 || nothing_to_pick(best)) {
      ws.pick[b] = -1;
    } else {
      const int64_t pick = packed_index(best);
      float r0 = INFINITY;
      if (!start) {
        const float nk = packed_value(best);
        r0 = nk == INFINITY ? INFINITY : dist_from_key(p.metric, nk);
      }
      idx[b * k] = pick;
      radii[b * k] = r0;
      ws.mind[b * N + pick] = -INFINITY;
      ws.pick[b] = kb > 1 ? pick : -1;
    }
  }
}

// Step s (1 <= s < k): grid = (nblk, items b0 .. b0 + gridDim.y - 1), nblk >= 1. Each block
// computes the distance of the current pick to its tokens (one warp per token, dot product
// over D from x), updates mind and writes its arg-max; the last block of the item to finish
// reduces the partials and makes pick s.
template <typename T>
__global__ void __launch_bounds__(256) stream_step_kernel(Problem p, const T* __restrict__ x, int64_t D, int64_t step,
                                   int64_t k, const int64_t* __restrict__ k_per_item,
                                   int64_t* __restrict__ idx, float* __restrict__ radii,
                                   StreamState ws, int tokens_per_block, int64_t b0) {
  __shared__ unsigned long long red[32];
  __shared__ bool is_last;
  const int64_t b = b0 + blockIdx.y, N = p.N;
  const int64_t cur = ws.pick[b];
  if (cur < 0 || step >= item_k(k, k_per_item, b)) return;   // uniform over the item's blocks
  const int64_t L = item_length(p, b);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* xp = x + (b * N + cur) * D;
  const float ap = p.aux[b * N + cur];
  unsigned long long local = kPackedMin;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  for (int64_t t = warp; t < tokens_per_block; t += warps) {
    const int64_t j = j0 + t;
    if (j >= N) break;
    float m = ws.mind[b * N + j];
    if (m != -INFINITY && is_valid(p, b, j, L)) {
      const T* xj = x + (b * N + j) * D;
      float acc = 0.0f;
      for (int64_t d = lane; d < D; d += 32) acc = fmaf(to_f(xj[d]), to_f(xp[d]), acc);
      acc = warp_sum_f(acc);
      m = fminf(m, key_from_gram(p.metric, acc, ap, p.aux[b * N + j]));
      if (lane == 0) ws.mind[b * N + j] = m;
    }
    if (lane == 0) {
      const unsigned long long key = pack_argmax(m, j);
      local = key > local ? key : local;
    }
  }
  local = block_max_u64(local, red);
  if (threadIdx.x == 0) {
    ws.partial[b * ws.nblk + blockIdx.x] = local;
    __threadfence();   // partial (and mind) visible before the counter says so
    const unsigned int done = atomicAdd(&ws.counter[b], 1u);
    is_last = done == static_cast<unsigned int>(gridDim.x) - 1u;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  unsigned long long best = kPackedMin;
  for (int64_t t = threadIdx.x; t < ws.nblk; t += blockDim.x) {
    const unsigned long long v = *(volatile unsigned long long*)&ws.partial[b * ws.nblk + t];
    best = v > best ? v : best;
  }
  best = block_max_u64(best, red);
  if (threadIdx.x == 0) {
    ws.counter[b] = 0;
    if (nothing_to_pick(best)) {
      ws.pick[b] = -1;
    } else {
      const int64_t pick = packed_index(best);
      idx[b * k + step] = pick;
      radii[b * k + step] = dist_from_key(p.metric, packed_value(best));
      ws.mind[b * N + pick] = -INFINITY;
      ws.pick[b] = pick;
    }
  }
}

// ---------------------------------------------------------------- greedy coverage
// One block per item; cur[r] (coverage of row r so far) and taken[j] live in scratch.
__global__ void __launch_bounds__(512) coverage_kernel(const float* __restrict__ sim, int64_t M, int64_t N,
                                const int64_t* __restrict__ row_lengths,
                                const int64_t* __restrict__ lengths,
                                const bool* __restrict__ exclude, int64_t k,
                                const int64_t* __restrict__ k_per_item, int64_t* __restrict__ idx,
                                float* __restrict__ gains, float* __restrict__ scratch) {
  __shared__ unsigned long long red[32];
  const int64_t b = blockIdx.x;
  int64_t R = row_lengths ? row_lengths[b] : M;
  R = R < 0 ? 0 : (R > M ? M : R);
  int64_t L = lengths ? lengths[b] : N;
  L = L < 0 ? 0 : (L > N ? N : L);
  const int64_t kb = item_k(k, k_per_item, b);
  float* cur = scratch + b * (M + N);
  float* taken = cur + M;   // 1.0f once picked (or never pickable)
  const float* S = sim + b * M * N;
  for (int64_t s = threadIdx.x; s < k; s += blockDim.x) {
    idx[b * k + s] = -1;
    gains[b * k + s] = NAN;
  }
  for (int64_t r = threadIdx.x; r < M; r += blockDim.x) cur[r] = 0.0f;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x)
    taken[j] = (j < L && !(exclude && exclude[b * N + j])) ? 0.0f : 1.0f;
  __syncthreads();
  for (int64_t s = 0; s < kb; ++s) {
    unsigned long long local = kPackedMin;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {   // adjacent threads: adjacent j
      if (taken[j] != 0.0f) continue;
      double g = 0.0;   // fp64 accumulation, rounded once (same order as the CPU kernel)
      for (int64_t r = 0; r < R; ++r) g += fmaxf(S[r * N + j] - cur[r], 0.0f);
      const unsigned long long key = pack_argmax(static_cast<float>(g), j);
      local = key > local ? key : local;
    }
    const unsigned long long top = block_max_u64(local, red);
    if (nothing_to_pick(top)) break;
    const int64_t pick = packed_index(top);
    if (threadIdx.x == 0) {
      idx[b * k + s] = pick;
      gains[b * k + s] = packed_value(top);
      taken[pick] = 1.0f;
    }
    for (int64_t r = threadIdx.x; r < R; r += blockDim.x) cur[r] = fmaxf(cur[r], S[r * N + pick]);
    __syncthreads();
  }
}

}  // namespace device
}  // namespace kcenter
}  // namespace tokenkernels
