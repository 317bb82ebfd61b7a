// kcenter family: torch-free definitions shared by the CPU kernels, the CUDA kernels and their
// launchers. The CUDA launchers (implemented in csrc/kcenter/kcenter_kernels.cu from the device
// code in kcenter.cuh) take raw pointers and a cudaStream_t and return cudaError_t.
//
// Distances, all from a Gram value g = <x_i, x_j> accumulated in fp32:
//   cosine : d(i,j) = 1 - g_ij / (max(|x_i|, eps) * max(|x_j|, eps))     (DivPrune's 1 - cos)
//   l2     : d(i,j) = sqrt(max(|x_i|^2 + |x_j|^2 - 2 g_ij, 0))
// The greedy works in a "key" space that is monotone in d, so no sqrt is taken per element:
//   cosine : key = d                 l2 : key = d^2
#pragma once
#include <cmath>
#include <cstdint>

#include "tokenkernels/common.h"

namespace tokenkernels {
namespace kcenter {

// The schema's `str metric` ("cosine", "l2") and `str impl` ("auto", "plain", "simt",
// "tuned", "stream"), parsed once in csrc/kcenter/kcenter_args.h.
enum class Metric : int32_t { Cosine, L2 };
// CUDA variant of kcenter_select (the CPU kernel has one implementation and ignores it):
//   Auto   the kernels' heuristic: the Gram path as Simt (N <= 8192, else Plain);
//   Plain  Gram path, running minimum in global memory (any N);
//   Simt   Gram path, running minimum in registers (N <= 8192; larger N runs Plain);
//   Tuned  fp16 / bf16 with N <= 8192: symmetric tensor-core Gram (upper-triangle tiles, mirror
//          write) with the keys and the nearest-neighbour minimum in its epilogue, REDUX + ballot
//          arg-max per pick (issue #13; kcenter_tuned.h); fp32 and larger N run as Simt. Opt-in
//          until proven on a GPU;
//   Stream the large-N path: one distance row per pick straight from x, never N x N.
// Auto, Plain, Simt and Tuned also take the Stream path when the batch's fp32 Gram would exceed
// 4 GiB (csrc/kcenter/kcenter_cuda.cpp).
enum class Impl : int32_t { Auto, Plain, Simt, Stream, Tuned };
constexpr float kNormEps = 1e-8f;   // same eps as torch.nn.functional.normalize

// key(i,j) from the Gram value and the per-token auxiliaries.
// cosine: a_i = 1 / max(|x_i|, eps)  (inverse norm);  l2: a_i = |x_i|^2.
TK_HD float key_from_gram(Metric m, float g, float a_i, float a_j) {
  if (m == Metric::Cosine) return 1.0f - g * a_i * a_j;
  float s = a_i + a_j - 2.0f * g;
  return s > 0.0f ? s : 0.0f;
}
// Distance reported to the user (radii) from a key.
TK_HD float dist_from_key(Metric m, float key) {
  return m == Metric::Cosine ? key : sqrtf(key);
}

}  // namespace kcenter
}  // namespace tokenkernels

// ------------------------------------------------------------------ CUDA launchers (host API)
#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace tokenkernels {
namespace kcenter {

// Shared description of one batched problem. All pointers are device pointers.
//   B items, each with N tokens (rows), valid prefix lengths[b] (nullptr: N), exclude[b*N+j]
//   (nullptr: none; nonzero = never picked, not a neighbour).
struct Problem {
  int64_t B = 0, N = 0;
  Metric metric = Metric::Cosine;
  const int64_t* lengths = nullptr;   // (B,) or nullptr
  const bool* exclude = nullptr;      // (B, N) or nullptr
  const float* aux = nullptr;         // (B, N): inverse norms (cosine) or squared norms (l2)
};

// Nearest-neighbour keys for rows [row0, row0 + rows) of every item, from a Gram slab
// gram[b, r, j] (fp32, row stride ld, item stride batch_stride). Writes nn_key[b*N + row0 + r]
// = min over valid j != i of key(i, j) (+inf if none; -inf for invalid rows so they never win).
cudaError_t launch_nn_keys(const Problem& p, const float* gram, int64_t row0, int64_t rows,
                           int64_t ld, int64_t batch_stride, float* nn_key, cudaStream_t stream);

// Greedy over a full Gram (B, N, N) fp32. start[b] >= 0 forces the first pick; start == nullptr
// takes the arg-max of nn_key (the "isolated" rule). k_per_item nullptr: every item takes k.
// Outputs: idx (B, k) int64 padded -1, radii (B, k) fp32 padded NaN. scratch: B*N floats.
// impl: Plain (running minimum in global memory, any N); Simt and Auto (running minimum in
// registers for N <= 8192, larger N falls back to Plain). Stream is not a Gram variant
// (launch_greedy_streaming): cudaErrorInvalidValue, nothing launched.
cudaError_t launch_greedy_gram(const Problem& p, const float* gram, const float* nn_key,
                               const int64_t* start, int64_t k, const int64_t* k_per_item,
                               int64_t* idx, float* radii, float* scratch, Impl impl,
                               cudaStream_t stream);

// Streaming greedy for large N: one launch per pick, each computing one distance row per item
// straight from x (B, N, D) in `dtype`, never holding N x N. workspace: see streaming_workspace.
size_t streaming_workspace_bytes(int64_t B, int64_t N);
cudaError_t launch_greedy_streaming(const Problem& p, const void* x, DType dtype, int64_t D,
                                    const float* nn_key, const int64_t* start, int64_t k,
                                    const int64_t* k_per_item, int64_t* idx, float* radii,
                                    void* workspace, cudaStream_t stream);

// Greedy maximum coverage: sim (B, M, N) fp32 >= 0 rows x candidates; row_lengths (B,) valid
// rows, lengths/exclude on candidates as in Problem. Outputs idx (B, k) padded -1, gains (B, k)
// padded NaN. scratch: B*(M+N) floats.
cudaError_t launch_coverage(const float* sim, int64_t B, int64_t M, int64_t N,
                            const int64_t* row_lengths, const int64_t* lengths,
                            const bool* exclude, int64_t k, const int64_t* k_per_item,
                            int64_t* idx, float* gains, float* scratch, cudaStream_t stream);

}  // namespace kcenter
}  // namespace tokenkernels
#endif
