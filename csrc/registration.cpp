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
  // ---- cross_entropy family ---------------------------------------------------------------
  // Fused linear cross-entropy statistics, never materialising the (N, V) logits.
  // z = softcap(hidden @ weight^T + bias) for the vocabulary shard [vocab_start, vocab_start+V)
  // of a vocabulary of vocab_total entries. Per token (fp32 unless noted): log-sum-exp over the
  // shard, the target logit (0 when ignored or owned by another shard; NaN when out of range and
  // check=False), sum of logits (if sum_z, else empty), arg-max (int64) and max logit and
  // entropy of softmax(z) (if aux, else empty). check: validate targets (host sync on CUDA).
  // impl: 0 auto, 1 plain (tiles through ATen GEMMs), 2 tuned (CUDA fused kernel).
  // filter_eps / accum_fp32 are not used by the forward: its autograd formula passes them on.
  m.def(
      "lce_forward(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
      "float? softcap, int vocab_start, int vocab_total, bool sum_z, bool aux, bool check, "
      "float filter_eps, bool accum_fp32, int impl) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of the logits recomputed tile by tile:
  //   dZ = coef_p * exp(z - lse) + coef_t * onehot(target) + coef_1   (times softcap')
  // dhidden = dZ @ weight, dweight = dZ^T @ hidden, dbias = sum_rows dZ; each empty unless
  // asked for. filter_eps > 0 skips tiles where every |dZ| < filter_eps * max(|coef_p|, |coef_t|)
  // of its row (CPU; gradient filtering). accum_fp32: fp32 accumulation of dweight for
  // fp16/bf16.
  m.def(
      "lce_backward(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor lse, "
      "Tensor coef_p, Tensor coef_t, Tensor? coef_1, int ignore_index, float? softcap, "
      "int vocab_start, float filter_eps, bool need_dhidden, bool need_dweight, bool need_dbias, "
      "bool accum_fp32, int impl) -> (Tensor, Tensor, Tensor)");
}
