// cross_entropy family: torch-free launcher API of the CUDA kernels (implemented in
// csrc/cross_entropy/cross_entropy_kernels.cu from the device code in cross_entropy.cuh).
// Every launcher takes device pointers and a cudaStream_t and returns the launch's cudaError_t;
// none syncs the host.
//
// Notation: N tokens, D features, V vocabulary rows of this shard (global ids vocab_start + v),
// z = softcap(hidden @ weight^T + bias). Per-token running state of the online log-sum-exp:
// m (max), s (sum exp(z - m)), tz (sum exp(z - m) * z, for the entropy).
#pragma once
#include <cstdint>

#include "tokenkernels/common.h"

namespace tokenkernels {
namespace cross_entropy {

// The `str impl` option of cross_entropy_forward / cross_entropy_backward, parsed once by
// parse_impl (csrc/cross_entropy/cross_entropy_args.h). The CPU has one engine for all three.
//   "auto"  the kernels' own heuristic: the fused kernels where fused_supported, else plain;
//   "plain" fp32 logit tiles from ATen/cuBLAS GEMMs, folded by the tile kernels (deterministic);
//   "wmma"  the fused WMMA kernels (no logit buffer); fp32 or shapes fused_supported rejects
//           run the plain path;
//   "tuned" the fast-by-design path (issue #13): sm_90a CUTLASS forward + atomic-free chunked
//           backward; the WMMA kernels elsewhere. Opt-in until proven on a GPU.
enum class Impl : int32_t { Auto, Plain, Wmma, Tuned };

// Whether a CUDA call with `impl` runs the fused kernels, given fused_supported's answer.
inline bool use_fused(Impl impl, bool supported) {
  switch (impl) {
    case Impl::Plain: return false;
    case Impl::Wmma:
    case Impl::Tuned: return supported;
    case Impl::Auto: return supported;  // the kernels' heuristic: the WMMA kernels wherever they apply
  }
  return false;
}

}  // namespace cross_entropy
}  // namespace tokenkernels

#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace tokenkernels {
namespace cross_entropy {

// Where a token's target lives. Targets are global ids (int64); a token is ignored when its
// target equals ignore_index, "bad" when outside [0, vocab_total) otherwise.
struct Targets {
  const int64_t* t = nullptr;   // (N,)
  int64_t ignore_index = -100;
  int64_t vocab_start = 0;      // first global id of this shard
  int64_t V = 0;                // rows in this shard
  int64_t vocab_total = 0;      // global vocabulary size
};

// Per-token forward state and outputs (all (N,), fp32 unless noted; optional ones nullptr).
struct FwdState {
  float* m = nullptr;      // running max, init -inf
  float* s = nullptr;      // running sum-exp, init 0
  float* tz = nullptr;     // running sum exp*z (aux), init 0; nullptr when not needed
  float* zt = nullptr;     // target logit, init 0 (NaN written for bad targets by finalize)
  float* sumz = nullptr;   // sum of z (label smoothing), init 0; nullptr when not needed
  int64_t* amax = nullptr; // arg-max (global id), init 0 (stays 0 when no z > -inf)
  float* maxz = nullptr;   // max z for the arg-max, init -inf; nullptr when not needed
};

// Plain forward, one fp32 logit tile Z (rows, cols) = rows [r0, r0+rows) x shard rows
// [v0, v0+cols), row-major, ld = cols: folds it into the state. bias: (V,) fp32 or nullptr.
// cap <= 0: no softcap.
cudaError_t launch_fwd_tile(const float* Z, int64_t rows, int64_t cols, int64_t r0, int64_t v0,
                            const float* bias, float cap, const Targets& tg, const FwdState& st,
                            cudaStream_t stream);

// lse = m + log(s); entropy = lse - tz / s (when ent != nullptr); zt = NaN for bad targets.
cudaError_t launch_finalize(int64_t N, const FwdState& st, const Targets& tg, float* lse,
                            float* ent, cudaStream_t stream);

// Backward tile: dZ[i, j] = (cp * exp(z - lse) + c1 + ct * [v0+j is the target]) * softcap'(z)
// for the fp32 logit tile Z, times gscale[0] when gscale != nullptr (see launch_grad_scale),
// written as `out_dtype` (row-major, ld = cols). c1 may be nullptr. Tokens with
// cp = ct = c1 = 0 get exact zeros. filter_eps > 0: gradient filtering as in the fused
// backward: every 64 x 128 sub-tile (aligned to global multiples of 64 tokens and 128 shard
// rows) whose |dZ| all lie below filter_eps * max(|cp|, |ct|) of their rows is zeroed (a NaN
// always keeps its sub-tile); keep: scratch of dz_keep_flags(rows, cols) unsigned ints (may be
// nullptr when filter_eps == 0).
int64_t dz_keep_flags(int64_t rows, int64_t cols);
cudaError_t launch_dz_tile(const float* Z, int64_t rows, int64_t cols, int64_t r0, int64_t v0,
                           const float* bias, float cap, const Targets& tg, const float* lse,
                           const float* cp, const float* ct, const float* c1, const float* gscale,
                           float filter_eps, unsigned* keep, void* dZ, DType out_dtype,
                           cudaStream_t stream);

// fp16 gradients: scale[0] = 2^e, scale[1] = 2^-e (device, 2 floats) with e such that every dZ
// of the N tokens, times 2^e, stays below 2^15 (bound |cp| + |ct| + |c1| per token), so that
// small dZ entries do not underflow fp16 before the gradient GEMMs; the fp32 results are
// multiplied by scale[1] (exact: a power of two). e = 0 without a finite positive bound.
cudaError_t launch_grad_scale(int64_t N, const float* cp, const float* ct, const float* c1,
                              float* scale, cudaStream_t stream);

// WMMA forward (fp16/bf16 only): tensor-core GEMM tiles (WMMA, 64 tokens x 128 vocabulary
// rows, fp32 accumulation) with the online log-sum-exp fused into the epilogue; no logit
// buffer in global memory. The vocabulary is split over `splits` blocks per token tile; each
// writes a partial state, merged by launch_fwd_fused's second kernel into `st`.
// Needs fused_supported(): fp16/bf16, D % 8 == 0 and 16-byte aligned hidden/weight (else the
// launchers return cudaErrorInvalidValue without launching; callers use the plain path).
// workspace: fused_workspace_bytes(N, splits); splits: fused_default_splits (queries the
// current device's SM count; returns that query's error, if any).
bool fused_supported(const void* hidden, const void* weight, DType dtype, int64_t D);
size_t fused_workspace_bytes(int64_t N, int splits);
cudaError_t fused_default_splits(int64_t N, int64_t V, int* splits);
cudaError_t launch_fwd_fused(const void* hidden, const void* weight, DType dtype, int64_t N,
                             int64_t D, const float* bias, float cap, const Targets& tg,
                             const FwdState& st, int splits, void* workspace,
                             cudaStream_t stream);

// WMMA backward (fp16/bf16; same shape/alignment rules as the fused forward, else
// cudaErrorInvalidValue): one block per 64 x 128 logit tile recomputes it with WMMA, forms dZ
// (as launch_dz_tile, times gscale[0] when gscale != nullptr) in shared memory, skips the tile
// when every |dZ| < filter_eps * max(|cp|, |ct|) of its row (a NaN keeps it), else adds
// dZ @ W to dH32 (N, D) and dZ^T @ H to dW32 (V, D) (fp32, zero-initialised by the caller,
// either may be nullptr) with atomics; db32 (V,) gets the column sums. With gscale the three
// accumulators hold scaled sums: the caller multiplies them by gscale[1].
// skipped (nullable): incremented once per filtered tile.
cudaError_t launch_bwd_fused(const void* hidden, const void* weight, DType dtype, int64_t N,
                             int64_t D, const float* bias, float cap, const Targets& tg,
                             const float* lse, const float* cp, const float* ct, const float* c1,
                             const float* gscale, float filter_eps, float* dH32, float* dW32,
                             float* db32, unsigned long long* skipped, cudaStream_t stream);

}  // namespace cross_entropy
}  // namespace tokenkernels
#endif
