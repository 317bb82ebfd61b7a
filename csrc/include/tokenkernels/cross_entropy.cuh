// cross_entropy family: CUDA device code (torch-free). Launchers: cross_entropy_kernels.cu.
//
// Plain variant (any dtype): the logits come tile by tile from cuBLAS (via ATen in the adapter,
// fp32 output); fwd_tile_kernel folds one fp32 tile into the per-token online log-sum-exp,
// dz_tile_kernel turns one tile into dZ for the gradient GEMMs. One block per token row, so
// every per-token state entry has exactly one writer.
//
// WMMA forward (fp16/bf16): fwd_fused_kernel computes 64 x 128 logit tiles with WMMA tensor
// cores straight from hidden/weight and folds each tile into per-thread online states in the
// epilogue; the logits never reach global memory. Splits of the vocabulary run in parallel and
// leave partial states that fwd_merge_kernel combines.
//
// Gradient filtering (both backward variants) works on the same 64 x 128 logit sub-tiles,
// aligned to global multiples of kBM tokens and kBN vocabulary rows: a sub-tile whose every
// |dZ| is below its row's threshold filter_eps * max(|cp|, |ct|) contributes nothing; a NaN
// dZ entry always keeps its sub-tile. fp16 dZ is scaled by a power of two before it is
// rounded to fp16 (grad_scale_kernel), so that small entries do not underflow; the fp32
// accumulators are unscaled exactly at the end.
//
// Arg-max of a row without any logit > -inf (all -inf or NaN): 0, in every path (as on CPU).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "tokenkernels/common.h"
#include "tokenkernels/convert.cuh"
#include "tokenkernels/cross_entropy.h"

namespace tokenkernels {
namespace cross_entropy {
namespace device {

constexpr float kInf = __builtin_huge_valf();
constexpr int kBM = 64;            // tokens per block tile (fused kernels, filter sub-tiles)
constexpr int kBN = 128;           // vocabulary rows per block tile (idem)
constexpr int kGradScaleLog2 = 15; // fp16 dZ: max |dZ| * scale < 2^15 (fp16 max 65504)

__device__ __forceinline__ float apply_cap(float z, float cap) {
  return cap > 0.f ? cap * tanhf(z / cap) : z;
}

// Shard-local index of token r's target, or -1 (ignored, another shard's, or out of range).
__device__ __forceinline__ int64_t local_target(const Targets& tg, int64_t r) {
  const int64_t t = tg.t[r];
  // t >= vocab_start >= 0 before the subtraction: no int64 overflow
  if (t == tg.ignore_index || t < 0 || t >= tg.vocab_total || t < tg.vocab_start) return -1;
  const int64_t l = t - tg.vocab_start;
  return l < tg.V ? l : -1;
}

using tokenkernels::device::from_f;

// (value, index) arg-max with ties to the lower index.
__device__ __forceinline__ void better(float& v, int64_t& i, float v2, int64_t i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

// Online log-sum-exp state merge: (m, s, tz) <- (m, s, tz) (+) (m2, s2, tz2).
__device__ __forceinline__ void merge_lse(float& m, float& s, float& tz, float m2, float s2,
                                          float tz2) {
  if (m2 == -kInf) return;
  if (m == -kInf) {
    m = m2; s = s2; tz = tz2;
    return;
  }
  const float mn = fmaxf(m, m2);
  const float a = expf(m - mn), b = expf(m2 - mn);
  s = s * a + s2 * b;
  tz = tz * a + tz2 * b;
  m = mn;
}

// Block-wide sum / arg-max for THREADS threads (multiple of 32). Every thread gets the result.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  float r = 0.f;
  for (int k = 0; k < THREADS / 32; ++k) r += sh[k];
  return r;
}
template <int THREADS>
__device__ __forceinline__ void block_argmax(float& v, int64_t& i, float* shv, int64_t* shi) {
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t i2 = __shfl_xor_sync(0xffffffffu, i, o);
    better(v, i, v2, i2);
  }
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  __syncthreads();
  if (l == 0) {
    shv[w] = v;
    shi[w] = i;
  }
  __syncthreads();
  v = shv[0];
  i = shi[0];
  for (int k = 1; k < THREADS / 32; ++k) better(v, i, shv[k], shi[k]);
}

// ------------------------------------------------------------------------------ plain forward
// grid.x = rows of the tile; block = THREADS. Row i of Z is token r0 + i.
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
fwd_tile_kernel(const float* __restrict__ Z, int64_t cols, int64_t r0, int64_t v0,
                const float* __restrict__ bias, float cap, Targets tg, FwdState st) {
  __shared__ float shf[THREADS / 32];
  __shared__ int64_t shi[THREADS / 32];
  const int64_t i = blockIdx.x, r = r0 + i;
  const float* z = Z + i * cols;
  const int64_t lt = local_target(tg, r);
  float mx = -kInf, sz = 0.f;
  int64_t am = INT64_MAX;
  for (int64_t j = threadIdx.x; j < cols; j += THREADS) {
    const float v = apply_cap(z[j] + (bias ? bias[v0 + j] : 0.f), cap);
    if (v > mx) { mx = v; am = v0 + j; }
    sz += v;
    if (v0 + j == lt) st.zt[r] = v;
  }
  block_argmax<THREADS>(mx, am, shf, shi);
  if (st.sumz) sz = block_sum<THREADS>(sz, shf);
  const float m_old = st.m[r];
  const float mn = fmaxf(m_old, mx);
  float se = 0.f, te = 0.f;
  if (mn > -kInf) {
    for (int64_t j = threadIdx.x; j < cols; j += THREADS) {
      const float v = apply_cap(z[j] + (bias ? bias[v0 + j] : 0.f), cap);
      const float e = expf(v - mn);
      se += e;
      te += e * v;
    }
  }
  se = block_sum<THREADS>(se, shf);
  if (st.tz) te = block_sum<THREADS>(te, shf);
  if (threadIdx.x == 0 && mn > -kInf) {
    const float scale = m_old > -kInf ? expf(m_old - mn) : 0.f;
    st.s[r] = st.s[r] * scale + se;
    if (st.tz) st.tz[r] = st.tz[r] * scale + te;
    st.m[r] = mn;
  }
  if (threadIdx.x == 0) {
    if (st.sumz) st.sumz[r] += sz;
    if (st.amax && mx > st.maxz[r]) {  // strict: earlier tiles keep ties
      st.maxz[r] = mx;
      st.amax[r] = am;
    }
  }
}

__global__ void finalize_kernel(int64_t N, FwdState st, Targets tg, float* __restrict__ lse,
                                float* __restrict__ ent) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= N) return;
  const float l = st.m[r] + logf(st.s[r]);
  lse[r] = l;
  if (ent) ent[r] = l - st.tz[r] / st.s[r];
  const int64_t t = tg.t[r];
  if (t != tg.ignore_index && (t < 0 || t >= tg.vocab_total)) st.zt[r] = __int_as_float(0x7fc00000);
}

// ------------------------------------------------------------------------------ plain backward
// Keep flag of a dZ entry for gradient filtering: nonzero and not below the threshold; NaN
// always keeps (|NaN| < thr is false).
__device__ __forceinline__ bool filter_keeps(float x, float thr) {
  return x != 0.f && !(fabsf(x) < thr);
}

// Power-of-two scale of fp16 dZ: out[0] = 2^e, out[1] = 2^-e with e chosen so that
// max_r (|cp| + |ct| + |c1|) * 2^e < 2^kGradScaleLog2 (that sum bounds every |dZ| of row r:
// softmax <= 1 and the softcap derivative <= 1). No finite positive bound: e = 0. One block.
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
grad_scale_kernel(int64_t N, const float* __restrict__ cp, const float* __restrict__ ct,
                  const float* __restrict__ c1, float* __restrict__ out) {
  __shared__ float sh[THREADS / 32];
  float m = 0.f;
  for (int64_t r = threadIdx.x; r < N; r += THREADS)
    m = fmaxf(m, fabsf(cp[r]) + fabsf(ct[r]) + (c1 ? fabsf(c1[r]) : 0.f));  // fmaxf drops NaN
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 0; k < THREADS / 32; ++k) m = fmaxf(m, sh[k]);
    int e = 0;
    if (m > 0.f && m <= 3.4028235e38f) {
      int k = 0;
      frexpf(m, &k);  // m = f * 2^k, f in [0.5, 1): m < 2^k
      e = kGradScaleLog2 - k;
      e = e < -126 ? -126 : (e > 126 ? 126 : e);
    }
    out[0] = ldexpf(1.f, e);
    out[1] = ldexpf(1.f, -e);
  }
}

// Filter sub-tiles covered by a plain tile: rows [r0, r0+rows) x shard rows [v0, v0+cols).
__device__ __forceinline__ int64_t keep_index(int64_t r, int64_t r0, int64_t v, int64_t v0,
                                              int64_t cols) {
  const int64_t nsv = (v0 + cols - 1) / kBN - v0 / kBN + 1;
  return (r / kBM - r0 / kBM) * nsv + (v / kBN - v0 / kBN);
}

// grid.x = rows of the tile. dZ of one fp32 logit tile, times *gscale when given, rounded to
// T. Tokens without gradient (cp = ct = c1 = 0, e.g. ignored) give exact zeros whatever their
// logits. keep (nullable, zeroed): set to 1 for every filter sub-tile that holds an entry
// filter_keeps() accepts at threshold feps * max(|cp|, |ct|).
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
dz_tile_kernel(const float* __restrict__ Z, int64_t cols, int64_t r0, int64_t v0,
               const float* __restrict__ bias, float cap, Targets tg,
               const float* __restrict__ lse, const float* __restrict__ cp,
               const float* __restrict__ ct, const float* __restrict__ c1,
               const float* __restrict__ gscale, float feps, unsigned* __restrict__ keep,
               T* __restrict__ out) {
  const int64_t i = blockIdx.x, r = r0 + i;
  const float* z = Z + i * cols;
  T* o = out + i * cols;
  const float l = lse[r], a = cp[r], b = ct[r], c = c1 ? c1[r] : 0.f;
  if (a == 0.f && b == 0.f && c == 0.f) {
    for (int64_t j = threadIdx.x; j < cols; j += THREADS) o[j] = from_f<T>(0.f);
    return;
  }
  const float sc = gscale ? gscale[0] : 1.f;
  const float thr = feps * fmaxf(fabsf(a), fabsf(b));
  const int64_t lt = local_target(tg, r);
  for (int64_t j = threadIdx.x; j < cols; j += THREADS) {
    const float v = apply_cap(z[j] + (bias ? bias[v0 + j] : 0.f), cap);
    float d = a * expf(v - l) + c + (v0 + j == lt ? b : 0.f);
    if (cap > 0.f) {
      const float u = v / cap;
      d *= 1.f - u * u;
    }
    if (keep && filter_keeps(d, thr)) keep[keep_index(r, r0, v0 + j, v0, cols)] = 1u;
    o[j] = from_f<T>(d * sc);
  }
}

// grid.x = rows of the tile: zero the dZ entries of the filter sub-tiles nothing kept.
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
dz_filter_kernel(int64_t cols, int64_t r0, int64_t v0, const unsigned* __restrict__ keep,
                 T* __restrict__ out) {
  const int64_t i = blockIdx.x, r = r0 + i;
  T* o = out + i * cols;
  for (int64_t j = threadIdx.x; j < cols; j += THREADS)
    if (!keep[keep_index(r, r0, v0 + j, v0, cols)]) o[j] = from_f<T>(0.f);
}

// ------------------------------------------------------------------------------ tuned forward
constexpr int kBK = 32;            // features per K step
constexpr int kLdAB = kBK + 8;     // smem row pitch of the A/B tiles (elements; multiple of 8)
constexpr int kLdC = kBN + 4;      // smem row pitch of the fp32 C tile (multiple of 4)
constexpr int kFusedThreads = 256; // 8 warps: 2 (tokens) x 4 (vocab) warp tiles of 32 x 32
constexpr int kPartFields = 5;     // m, s, tz, sumz, maxz per (token, split)
constexpr int kSmemAB = (kBM + kBN) * kLdAB * 2;
constexpr int kSmemC = kBM * kLdC * 4;
constexpr int kSmemFused = kSmemAB > kSmemC ? kSmemAB : kSmemC;

// C (kBM x kBN, fp32, row-major, pitch kLdC) = H[row0 : row0+kBM] @ W[v0 : v0+kBN]^T with
// WMMA tensor cores; rows past N / V and features past D read as zero. All kFusedThreads threads
// call it; it ends with a barrier, after which Cs (which aliases As/Bs) is ready.
// Warp w computes the 32 x 32 sub-tile (w / 4, w % 4) as 2 x 2 fragments of 16 x 16.
template <typename T>
__device__ __forceinline__ void gemm_tile_to_smem(const T* __restrict__ H, const T* __restrict__ W,
                                                  int64_t N, int64_t D, int64_t V, int64_t row0,
                                                  int64_t v0, T* As, T* Bs, float* Cs) {
  using namespace nvcuda;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.f);

    for (int64_t k0 = 0; k0 < D; k0 += kBK) {
      {  // A: kBM x kBK = 256 chunks of 8 elements, one per thread
        const int ar = tid >> 2, ac = (tid & 3) * 8;
        const int64_t gr = row0 + ar, gc = k0 + ac;
        uint4 val = zero4;
        if (gr < N && gc < D) val = *reinterpret_cast<const uint4*>(H + gr * D + gc);
        *reinterpret_cast<uint4*>(As + ar * kLdAB + ac) = val;
      }
#pragma unroll
      for (int c = tid; c < kBN * kBK / 8; c += kFusedThreads) {  // B: 512 chunks, two each
        const int br = c >> 2, bc = (c & 3) * 8;
        const int64_t gv = v0 + br, gc = k0 + bc;
        uint4 val = zero4;
        if (gv < V && gc < D) val = *reinterpret_cast<const uint4*>(W + gv * D + gc);
        *reinterpret_cast<uint4*>(Bs + br * kLdAB + bc) = val;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
        for (int a = 0; a < 2; ++a)
          wmma::load_matrix_sync(fa[a], As + (wm * 32 + a * 16) * kLdAB + kk, kLdAB);
#pragma unroll
        for (int b = 0; b < 2; ++b)
          wmma::load_matrix_sync(fb[b], Bs + (wn * 32 + b * 16) * kLdAB + kk, kLdAB);
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
        wmma::store_matrix_sync(Cs + (wm * 32 + a * 16) * kLdC + wn * 32 + b * 16, acc[a][b],
                                kLdC, wmma::mem_row_major);
    __syncthreads();

}

// grid = (ceil(N / kBM), splits). Block (x, y) covers tokens [x*kBM, +kBM) and vocabulary tiles
// [y*tiles_per_split, +tiles_per_split). Epilogue: thread tid owns token row tid/4 and the
// columns c = tid%4 + 4u (u < 32) of every C tile; the 4 owners of a row are adjacent lanes
// and merge their states by shuffles at the end.
template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
fwd_fused_kernel(const T* __restrict__ H, const T* __restrict__ W, int64_t N, int64_t D,
                 const float* __restrict__ bias, float cap, Targets tg, int64_t tiles_per_split,
                 int splits, float* __restrict__ part, int64_t* __restrict__ part_idx,
                 float* __restrict__ zt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(128) unsigned char smem[kSmemFused];
  T* As = reinterpret_cast<T*>(smem);               // kBM x kLdAB
  T* Bs = As + kBM * kLdAB;                         // kBN x kLdAB (weight rows)
  float* Cs = reinterpret_cast<float*>(smem);       // kBM x kLdC, aliases As/Bs after K loop

  const int64_t V = tg.V;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t num_vt = (V + kBN - 1) / kBN;
  const int64_t vt_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t vt_end = vt_begin + tiles_per_split < num_vt ? vt_begin + tiles_per_split : num_vt;
  const int tid = threadIdx.x;
  const int er = tid >> 2, q = tid & 3;
  const int64_t r = row0 + er;
  const bool row_ok = r < N;
  const int64_t lt = row_ok ? local_target(tg, r) : -1;

  float m = -kInf, s = 0.f, tz = 0.f, sz = 0.f, mx = -kInf;
  int64_t am = INT64_MAX;

  for (int64_t vt = vt_begin; vt < vt_end; ++vt) {
    const int64_t v0 = vt * kBN;
    gemm_tile_to_smem<T>(H, W, N, D, V, row0, v0, As, Bs, Cs);

    if (row_ok) {
      float* crow = Cs + er * kLdC;
      float tmax = -kInf;
      int64_t tam = INT64_MAX;
      for (int u = 0; u < kBN / 4; ++u) {
        const int c = q + 4 * u;
        const int64_t v = v0 + c;
        if (v >= V) break;
        const float zz = apply_cap(crow[c] + (bias ? bias[v] : 0.f), cap);
        crow[c] = zz;
        if (zz > tmax) { tmax = zz; tam = v; }
        sz += zz;
        if (v == lt) zt[r] = zz;
      }
      if (tmax > -kInf) {
        better(mx, am, tmax, tam);
        const float mn = fmaxf(m, tmax);
        const float scale = m > -kInf ? __expf(m - mn) : 0.f;
        s *= scale;
        tz *= scale;
        for (int u = 0; u < kBN / 4; ++u) {
          const int c = q + 4 * u;
          if (v0 + c >= V) break;
          const float e = __expf(crow[c] - mn);
          s += e;
          tz += e * crow[c];
        }
        m = mn;
      }
    }
    __syncthreads();  // Cs is overwritten by the next tile's A/B loads
  }

  // merge the 4 owners of each row (adjacent lanes)
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    const float t2 = __shfl_xor_sync(0xffffffffu, tz, o);
    const float z2 = __shfl_xor_sync(0xffffffffu, sz, o);
    const float x2 = __shfl_xor_sync(0xffffffffu, mx, o);
    const int64_t a2 = __shfl_xor_sync(0xffffffffu, am, o);
    merge_lse(m, s, tz, m2, s2, t2);
    sz += z2;
    better(mx, am, x2, a2);
  }
  if (q == 0 && row_ok) {
    float* p = part + (r * splits + blockIdx.y) * kPartFields;
    p[0] = m; p[1] = s; p[2] = tz; p[3] = sz; p[4] = mx;
    part_idx[r * splits + blockIdx.y] = am;
  }
#endif
}

// One thread per token: combine the splits' partial states into st.
__global__ void fwd_merge_kernel(int64_t N, int splits, const float* __restrict__ part,
                                 const int64_t* __restrict__ part_idx, FwdState st) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= N) return;
  float m = -kInf, s = 0.f, tz = 0.f, sz = 0.f, mx = -kInf;
  int64_t am = INT64_MAX;
  for (int k = 0; k < splits; ++k) {
    const float* p = part + (r * splits + k) * kPartFields;
    merge_lse(m, s, tz, p[0], p[1], p[2]);
    sz += p[3];
    better(mx, am, p[4], part_idx[r * splits + k]);
  }
  st.m[r] = m;
  st.s[r] = s;
  if (st.tz) st.tz[r] = tz;
  if (st.sumz) st.sumz[r] = sz;
  if (st.amax) {
    st.maxz[r] = mx;
    st.amax[r] = mx > -kInf ? am : 0;  // no logit > -inf: 0, like the plain path and the CPU
  }
}


// ------------------------------------------------------------------------------ tuned backward
// One block per (64-token tile, 128-row vocabulary tile): recompute the logit tile (WMMA), turn
// it into dZ in shared memory, skip the whole tile when every |dZ| is below its row's filter
// threshold (gradient filtering), else
//   dH32[rows, :] += dZ (64 x 128) @ W[vtile, :]      and   dW32[vtile, :] += dZ^T @ H[rows, :]
// in 64-feature chunks on WMMA, flushed to the fp32 global accumulators with atomicAdd; db32 gets
// the column sums. dZ is multiplied by *gscale (fp16; nullable) before it is rounded to T, so
// the accumulators hold scaled sums (the caller unscales them). Dynamic shared memory,
// kSmemBwd bytes:
//   [0, kSmemC)            As/Bs during the K loop, then Cs (fp32), then dZ (T, pitch kLdZ)
//   [kSmemC, +kSmemG)      G: staging of a W chunk (128 x 64) or an H chunk (64 x 64), pitch kLdG
//   [.., +kSmemO)          O: fp32 output chunk (up to 128 x 64), pitch kLdO
constexpr int kLdZ = 2 * kLdC;     // T elements per dZ row: same bytes as a Cs row
constexpr int kDC = 64;            // feature chunk of the gradient GEMMs
constexpr int kLdG = kDC + 8;
constexpr int kLdO = kDC + 4;
constexpr int kSmemG = kBN * kLdG * 2;
constexpr int kSmemO = kBN * kLdO * 4;
constexpr int kSmemBwd = kSmemFused + kSmemG + kSmemO;

template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
bwd_fused_kernel(const T* __restrict__ H, const T* __restrict__ W, int64_t N, int64_t D,
                 const float* __restrict__ bias, float cap, Targets tg,
                 const float* __restrict__ lse, const float* __restrict__ cp,
                 const float* __restrict__ ct, const float* __restrict__ c1,
                 const float* __restrict__ gscale, float feps,
                 float* __restrict__ dH32, float* __restrict__ dW32, float* __restrict__ db32,
                 unsigned long long* __restrict__ skipped) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem_dyn[];
  T* As = reinterpret_cast<T*>(smem_dyn);
  T* Bs = As + kBM * kLdAB;
  float* Cs = reinterpret_cast<float*>(smem_dyn);
  T* dZs = reinterpret_cast<T*>(smem_dyn);
  T* G = reinterpret_cast<T*>(smem_dyn + kSmemFused);
  float* O = reinterpret_cast<float*>(smem_dyn + kSmemFused + kSmemG);

  const int64_t V = tg.V;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t v0 = int64_t(blockIdx.y) * kBN;
  const int tid = threadIdx.x, warp = tid / 32;
  const int er = tid >> 2, q = tid & 3;
  const int64_t r = row0 + er;
  const bool row_ok = r < N;

  gemm_tile_to_smem<T>(H, W, N, D, V, row0, v0, As, Bs, Cs);

  // dZ for this thread's 32 columns of its row, in registers
  float d[kBN / 4];
  bool keep = false;
  {
    const int64_t lt = row_ok ? local_target(tg, r) : -1;
    const float a = row_ok ? cp[r] : 0.f, b = row_ok ? ct[r] : 0.f;
    const float c = (row_ok && c1) ? c1[r] : 0.f, l = row_ok ? lse[r] : 0.f;
    const float thr = feps * fmaxf(fabsf(a), fabsf(b));
    const float* crow = Cs + er * kLdC;
#pragma unroll
    for (int u = 0; u < kBN / 4; ++u) {
      const int col = q + 4 * u;
      const int64_t v = v0 + col;
      float x = 0.f;
      if (row_ok && v < V && (a != 0.f || b != 0.f || c != 0.f)) {
        const float z = apply_cap(crow[col] + (bias ? bias[v] : 0.f), cap);
        x = a * __expf(z - l) + c + (v == lt ? b : 0.f);
        if (cap > 0.f) {
          const float t = z / cap;
          x *= 1.f - t * t;
        }
        keep |= filter_keeps(x, thr);
      }
      d[u] = x;
    }
  }
  const float sc = gscale ? gscale[0] : 1.f;
  if (!__syncthreads_or(keep)) {  // also the barrier before dZs overwrites Cs
    if (skipped && tid == 0) atomicAdd(skipped, 1ull);
    return;
  }
#pragma unroll
  for (int u = 0; u < kBN / 4; ++u) dZs[er * kLdZ + q + 4 * u] = from_f<T>(d[u] * sc);
  __syncthreads();

  if (db32 && tid < kBN && v0 + tid < V) {  // column sums of dZ (as rounded to T)
    float acc = 0.f;
    for (int i = 0; i < kBM; ++i) acc += static_cast<float>(dZs[i * kLdZ + tid]);
    atomicAdd(db32 + v0 + tid, acc);
  }
  const uint4 zero4 = make_uint4(0, 0, 0, 0);

  if (dH32) {
    for (int64_t d0 = 0; d0 < D; d0 += kDC) {
      // G = W[v0 : v0+128, d0 : d0+64]  (row k = vocabulary row, column n = feature)
      for (int ch = tid; ch < kBN * kDC / 8; ch += kFusedThreads) {
        const int k = ch / (kDC / 8), n = (ch % (kDC / 8)) * 8;
        uint4 val = zero4;
        if (v0 + k < V && d0 + n < D) val = *reinterpret_cast<const uint4*>(W + (v0 + k) * D + d0 + n);
        *reinterpret_cast<uint4*>(G + k * kLdG + n) = val;
      }
      __syncthreads();
      // 64 x 64 output = 4 x 4 fragments; warp w: row fragment w/2, column fragments 2(w%2)+{0,1}
      const int rf = warp >> 1, cf0 = (warp & 1) * 2;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
      wmma::fill_fragment(acc[0], 0.f);
      wmma::fill_fragment(acc[1], 0.f);
#pragma unroll
      for (int kk = 0; kk < kBN; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, dZs + (rf * 16) * kLdZ + kk, kLdZ);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, G + kk * kLdG + (cf0 + j) * 16, kLdG);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(O + (rf * 16) * kLdO + (cf0 + j) * 16, acc[j], kLdO, wmma::mem_row_major);
      __syncthreads();
      for (int e = tid; e < kBM * kDC; e += kFusedThreads) {
        const int i = e / kDC, n = e % kDC;
        if (row0 + i < N && d0 + n < D) atomicAdd(dH32 + (row0 + i) * D + d0 + n, O[i * kLdO + n]);
      }
      __syncthreads();
    }
  }

  if (dW32) {
    for (int64_t d0 = 0; d0 < D; d0 += kDC) {
      // G = H[row0 : row0+64, d0 : d0+64]
      for (int ch = tid; ch < kBM * kDC / 8; ch += kFusedThreads) {
        const int k = ch / (kDC / 8), n = (ch % (kDC / 8)) * 8;
        uint4 val = zero4;
        if (row0 + k < N && d0 + n < D) val = *reinterpret_cast<const uint4*>(H + (row0 + k) * D + d0 + n);
        *reinterpret_cast<uint4*>(G + k * kLdG + n) = val;
      }
      __syncthreads();
      // 128 x 64 output = 8 x 4 fragments; warp w: row fragment w, all 4 column fragments.
      // A = dZ^T (128 x 64): element (m, k) = dZ[k][m], i.e. dZs read column-major.
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.f);
#pragma unroll
      for (int kk = 0; kk < kBM; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
        wmma::load_matrix_sync(fa, dZs + kk * kLdZ + warp * 16, kLdZ);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, G + kk * kLdG + j * 16, kLdG);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wmma::store_matrix_sync(O + (warp * 16) * kLdO + j * 16, acc[j], kLdO, wmma::mem_row_major);
      __syncthreads();
      for (int e = tid; e < kBN * kDC; e += kFusedThreads) {
        const int i = e / kDC, n = e % kDC;
        if (v0 + i < V && d0 + n < D) atomicAdd(dW32 + (v0 + i) * D + d0 + n, O[i * kLdO + n]);
      }
      __syncthreads();
    }
  }
#endif
}

}  // namespace device
}  // namespace cross_entropy
}  // namespace tokenkernels
