// Every tokenkernels schema lives here (one place to read the whole API surface).
// Implementations register per dispatch key in csrc/<family>/<family>.cpp (CPU) and
// csrc/<family>/<family>_cuda.cpp (CUDA). Python wrappers: python/tokenkernels/ops/.
#include <torch/library.h>

TORCH_LIBRARY(tokenkernels, m) {
  // ---- kcenter family ---------------------------------------------------------------------
  // Greedy k-center (farthest-point) selection. x (B, N, D); picks (B, k) int64 padded -1 and
  // the max-min distance at each pick (B, k) fp32 padded NaN. start_index None = "isolated".
  // metric: 0 cosine, 1 l2. impl: 0 auto, 1 plain, 2 tuned (CUDA; CPU ignores it).
  // check: validate value-dependent arguments (one host sync on CUDA).
  m.def(
      "kcenter(Tensor x, int k, Tensor? k_per_item, Tensor? lengths, Tensor? exclude, "
      "Tensor? start_index, int metric, bool sorted, bool check, int impl) -> (Tensor, Tensor)");
  // Greedy maximum coverage (MMTok). sim (B, M, N) >= 0; picks (B, k) padded -1, marginal
  // gains (B, k) fp32 padded NaN.
  m.def(
      "coverage_select(Tensor sim, int k, Tensor? k_per_item, Tensor? lengths, "
      "Tensor? row_lengths, Tensor? exclude, bool check) -> (Tensor, Tensor)");
}
