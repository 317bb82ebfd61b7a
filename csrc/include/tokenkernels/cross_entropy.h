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

#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace tokenkernels {
namespace ce {

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
  int64_t* amax = nullptr; // arg-max (global id), init 0; nullptr when not needed
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
// for the fp32 logit tile Z; written as `out_dtype` (row-major, ld = cols). c1 may be nullptr.
cudaError_t launch_dz_tile(const float* Z, int64_t rows, int64_t cols, int64_t r0, int64_t v0,
                           const float* bias, float cap, const Targets& tg, const float* lse,
                           const float* cp, const float* ct, const float* c1, void* dZ,
                           DType out_dtype, cudaStream_t stream);

// Tuned forward (fp16/bf16 only): tensor-core GEMM tiles (WMMA, 64 tokens x 128 vocabulary
// rows, fp32 accumulation) with the online log-sum-exp fused into the epilogue; no logit
// buffer in global memory. The vocabulary is split over `splits` blocks per token tile; each
// writes a partial state, merged by launch_fwd_fused's second kernel into `st`.
// Needs D % 8 == 0 and 16-byte aligned hidden/weight rows (checked: returns
// cudaErrorInvalidValue otherwise, so the caller can fall back to the plain path).
// workspace: fused_workspace_bytes(N, splits).
size_t fused_workspace_bytes(int64_t N, int splits);
int fused_default_splits(int64_t N, int64_t V);
cudaError_t launch_fwd_fused(const void* hidden, const void* weight, DType dtype, int64_t N,
                             int64_t D, const float* bias, float cap, const Targets& tg,
                             const FwdState& st, int splits, void* workspace,
                             cudaStream_t stream);

// Tuned backward (fp16/bf16; same shape/alignment rules as the fused forward, else
// cudaErrorInvalidValue): one block per 64 x 128 logit tile recomputes it with WMMA, forms dZ
// (as launch_dz_tile) in shared memory, skips the tile when every |dZ| < filter_eps *
// max(|cp|, |ct|) of its row, else adds dZ @ W to dH32 (N, D) and dZ^T @ H to dW32 (V, D)
// (fp32, zero-initialised by the caller, either may be nullptr) with atomics; db32 (V,) gets
// the column sums. skipped (nullable): incremented once per filtered tile.
cudaError_t launch_bwd_fused(const void* hidden, const void* weight, DType dtype, int64_t N,
                             int64_t D, const float* bias, float cap, const Targets& tg,
                             const float* lse, const float* cp, const float* ct, const float* c1,
                             float filter_eps, float* dH32, float* dW32, float* db32,
                             unsigned long long* skipped, cudaStream_t stream);

}  // namespace ce
}  // namespace tokenkernels
#endif
