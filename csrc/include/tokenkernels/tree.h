// tree family (speculative-decoding token trees): torch-free definitions shared by the CPU
// kernels (csrc/tree/tree.cpp), the CUDA kernels (tree.cuh) and their launchers
// (csrc/tree/tree_kernels.cu).
//
// Conventions (see python/tokenkernels/reference/tree.py, the oracle):
//   parents (B, n): parents[b][0] = -1, 0 <= parents[b][i] < i for i < tree_lens[b];
//   mask (B, n, W = ceil(n/32)) int32, little-endian bit-packed: bit j%32 of word j/32 of row i
//     is set iff j is i or an ancestor of i (padding rows all zero);
//   depth, first_child, next_sibling (B, n) int64 (-1 = none; children linked in node order);
//   paths (B, L_max, depth_max+1) int64, one root-to-leaf path per leaf in node order, -1 pad.
#pragma once
#include <cfloat>
#include <cstdint>

#include "tokenkernels/common.h"

namespace tokenkernels {
namespace tree {

// The `impl` option of tree_build / tree_attention(_out) (schema `str impl`, parsed once in
// csrc/tree/tree_args.h, which rejects any other name on every device): "auto" (the kernels'
// own choice: simt), "plain", "simt", "tuned" (the tensor-core attention core, issue #13;
// opt-in until proven on a GPU). The CPU kernels have one implementation and do not use
// it; the CUDA launchers take it.
enum class Impl : int32_t { Auto = 0, Plain = 1, Simt = 2, Tuned = 3 };

// What the launchers run for an impl: Auto is the kernels' own heuristic (the simt kernels).
// the tree-building kernels' choice: Plain, or the sorted sibling scan for every other impl
TK_HD Impl resolve_impl(Impl impl) { return impl == Impl::Plain ? Impl::Plain : Impl::Simt; }

TK_HD int64_t mask_words(int64_t n) { return (n + 31) / 32; }

// Largest n the CUDA build / select kernels handle (one block per tree, node data in shared
// memory); the CUDA adapter checks it (csrc/tree/tree_args.h).
constexpr int64_t kMaxCudaNodes = 4096;

// The parent node i follows in every ancestor walk: parents[i] when it is a valid parent
// (0 <= p < i), else -1. With validated parents this is the identity; with unvalidated ones
// (CUDA check=False) a node whose parent is invalid -- the root's own -1 aside: a second -1, a
// self or forward reference, a value >= n, or an int64 beyond int32 -- becomes the root of a
// detached subtree: walks stop there (no loops, no reads past the tree), it is nobody's child.
TK_HD int64_t effective_parent(int64_t p, int64_t i) { return (p >= 0 && p < i) ? p : -1; }

// tree_lens[b] clamped into [0, n] (unvalidated lengths never index past the tree).
TK_HD int64_t clamp_len(int64_t L, int64_t n) { return L < 0 ? 0 : (L > n ? n : L); }

// Child links are valid iff they point forward inside the tree: first_child[u] is -1 or in
// (u, n), next_sibling[c] is -1 or in (c, n) (what build produces). Walks over unvalidated links
// stop at the first link that is not (so a corrupt link can never loop or read out of bounds).
TK_HD bool link_ok(int64_t next, int64_t cur, int64_t n) { return next > cur && next < n; }

// Bit j of a packed mask row.
TK_HD bool mask_bit(const int32_t* row, int64_t j) {
  return ((static_cast<uint32_t>(row[j >> 5]) >> (j & 31)) & 1u) != 0;
}

// Speculative-sampling acceptance (SpecInfer): candidate token t drawn from q is accepted with
// probability min(1, p(t)/q(t)); with a uniform coin in [0, 1) that is coin * q(t) < p(t). The
// deterministic-candidate case is q = one-hot: coin < p(t). p = residual / its sum S, so the
// tests below take the unnormalised residual r(t) and S. CPU and CUDA evaluate them (and every
// residual update) in fp64 with the same formulas, so their decisions agree.
//
// A residual without usable mass (S not > 0 or not finite: a target row of zeros / NaN, only
// possible with check=False) accepts no child and never divides by S; its bonus is the inverse-
// CDF fallback (the last positive entry, token 0 if none).
// max(x, 0), with NaN -> 0 on every compiler and device (std::max and fmax disagree on NaN).
TK_HD double pos_part(double x) { return x > 0.0 ? x : 0.0; }
TK_HD bool residual_usable(double S) { return S > 0.0 && S <= DBL_MAX; }   // false for NaN, inf
TK_HD bool accept_with_q(double coin, double q_t, double r_t, double S) { return coin * q_t < r_t / S; }
TK_HD bool accept_one_hot(double coin, double r_t, double S) { return coin * S < r_t; }

// The `mode` option of tree_verify_sampling (schema `str mode`, parsed once in
// csrc/tree/tree_args.h): the rule that verifies the siblings of a node when draft_probs is given.
//
// * SpecInfer ("specinfer"): siblings drawn i.i.d. from q = draft_probs[u]. Child c_i (token x_i)
//   is accepted with probability min(1, p(x_i) / q(x_i)), else p <- normalise(max(p - q, 0)); q
//   never changes.
// * Rsd ("rsd", Recursive Speculative Decoding, Jeon et al. 2024, RSD-S / RSD-C): siblings drawn
//   from q *without replacement* (Gumbel-top-k), in node order. With p_0 = target_probs[u] and
//   q_0 = q / sum(q): c_i is accepted with probability min(1, p_{i-1}(x_i) / q_{i-1}(x_i)); on a
//   rejection p_i = normalise(max(p_{i-1} - q_{i-1}, 0)) and q_i = q_{i-1} with x_i removed,
//   renormalised. Kept unnormalised: qr (the draft residual) and its sum Q, q_{i-1} = qr / Q; the
//   removal is qr[x_i] <- 0, Q <- the sum of what is left.
//   Lossless (proved in the RSD paper; briefly): given the history, X_i ~ q_{i-1}, so child i
//   emits x with probability q_{i-1}(x) min(1, p_{i-1}(x) / q_{i-1}(x)) = min(p_{i-1}, q_{i-1})(x)
//   and is rejected with probability beta = sum max(p_{i-1} - q_{i-1}, 0). p_i does not depend on
//   which x_i was rejected, so if (induction from the last sibling, whose rejection leads to the
//   bonus ~ p_k) whatever follows a rejection at i emits ~ p_i whatever x_i was, the emitted
//   token is min(p, q)(x) + beta * max(p - q, 0)(x) / beta = p_{i-1}(x). SpecInfer's rule keeps q
//   for every sibling, which is right only for i.i.d. siblings: on draws without replacement it is
//   lossy (tests/tree/test_rsd.py shows the chi-square test catching it).
//   Edge cases (none divides by zero): a child whose token has no draft-residual mass
//   (q_{i-1}(x_i) = 0: q's support exhausted by the earlier siblings -- Gumbel-top-k with more
//   siblings than q has tokens -- or a draft row without usable mass, Q not > 0 or not finite,
//   only with check=False) is a deterministic candidate given the history and gets the one-hot
//   rule below (accept with p_{i-1}(x_i), else zero it in p; q unchanged), which keeps the
//   induction above (the emitted token is p_{i-1}(x_i) 1[x = x_i] + (1 - p_{i-1}(x_i)) p_i(x)).
//   A residual p_i that rounding would empty is not applied (p kept), as in SpecInfer; Q is
//   recomputed as the sum of the remaining qr entries after each removal (no drift), and once
//   it is not > 0 every later sibling is a deterministic candidate. (Duplicate siblings are not a
//   draw without replacement: the second copy has q_{i-1} = 0 and is handled as above.)
// Without draft_probs (deterministic candidates: q_{i-1} = one-hot at x_i for every child) the two
// rules coincide: accept with p(x_i), else p(x_i) <- 0 and renormalise; mode changes nothing.
enum class VerifyMode : int32_t { SpecInfer = 0, Rsd = 1 };

// "a ranks before b" for the dynamic-tree selections: larger score first, ties to the lower
// index. NaN scores rank last.
TK_HD bool rank_before(float sa, int64_t ia, float sb, int64_t ib) {
  const bool na = sa != sa, nb = sb != sb;
  if (na != nb) return nb;
  if (na) return ia < ib;
  return sa > sb || (sa == sb && ia < ib);
}

}  // namespace tree
}  // namespace tokenkernels

// ------------------------------------------------------------------ CUDA launchers (host API)
#if defined(TOKENKERNELS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace tokenkernels {
namespace tree {

// build: parents (B, n) int64 (validated by the caller), lens (B,) int64 or nullptr (= n).
// Writes mask (B, n, W) int32, depth, first_child, next_sibling (B, n) int64. One block per tree.
// Impl::Plain: each node scans for its next sibling, O(n) per thread; Impl::Simt (and Auto, Tuned):
// children grouped by a block-wide bitonic sort of (parent, index) keys.
cudaError_t launch_build(const int64_t* parents, const int64_t* lens, int64_t B, int64_t n,
                         int32_t* mask, int64_t* depth, int64_t* first_child,
                         int64_t* next_sibling, Impl impl, cudaStream_t stream);

// paths (B, L_max, D_max + 1) int64, fully written (-1 padding). One block per tree.
cudaError_t launch_paths(const int64_t* parents, const int64_t* depth, const int64_t* first_child,
                         const int64_t* lens, int64_t B, int64_t n, int64_t L_max, int64_t D_max,
                         int64_t* paths, cudaStream_t stream);

// Tree attention. q (B, n, Hq, D) contiguous; K/V caches contiguous (B, N_max, Hkv, D) or paged
// (num_pages, page_size, Hkv, D) with block_table (B, max_pages) int64. Tree token j of request
// b sits at cache position prefix_lens[b] + j. Output out (B, n, Hq, D) in the input dtype, lse
// (B, n, Hq) fp32 (natural log). Rows i >= tree_lens[b]: zeros, lse = -inf. Any B: every grid
// puts (request, row block) on x (launched in chunks past the x limit).
struct AttnProblem {
  int64_t B = 0, n = 0, Hq = 0, Hkv = 0, D = 0;
  DType dtype = DType::kFloat32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int64_t* prefix_lens = nullptr;   // (B,)
  const int32_t* mask = nullptr;          // (B, n, W)
  const int64_t* tree_lens = nullptr;     // (B,) or nullptr
  const int64_t* block_table = nullptr;   // (B, max_pages) or nullptr (contiguous)
  int64_t N_max = 0;                      // contiguous: cache length per request
  int64_t page_size = 0, max_pages = 0;   // paged
  int64_t num_pages = 0;                  // paged: table entries are clamped into [0, num_pages)
  // Cache positions per request (contiguous N_max, paged max_pages * page_size; 0 if the cache
  // holds nothing): prefixes are clamped to max_prefix - tree_len and tree keys past it skipped,
  // so unvalidated prefix_lens / tree_lens (check=False) never read out of bounds.
  int64_t max_prefix = 0;
  float scale = 1.0f;
  void* out = nullptr;
  float* lse = nullptr;
};
// Number of prefix splits the plain / simt launchers use, and the workspace `impl` needs
// (Impl::Tuned where the tensor-core core takes the problem: attn::tree_plan's).
int64_t attention_splits(const AttnProblem& p);
size_t attention_workspace_bytes(const AttnProblem& p, Impl impl = Impl::Auto);
// Impl::Plain: one warp per query row and head, K/V read from global memory; Impl::Simt (and
// Auto): K/V tiles staged in shared memory once per block and reused by every query row of the
// KV head. Both: prefix in splits with no mask, then the tree part with the mask merged with
// the splits by log-sum-exp. Requires D % 32 == 0 and D <= 256.
// Impl::Tuned: the tensor-core attention core (tokenkernels/attn_core.h: prefix splits cut from
// the real prefix lengths + the tree part as one more part, merged by the last CTA) for fp16 /
// bf16 with D = 64 or 128 and 16-byte aligned tensors; anything else (fp32, other D) runs Simt.
cudaError_t launch_attention(const AttnProblem& p, Impl impl, void* workspace, cudaStream_t stream);

// Greedy verification, one thread per tree. accepted (B, max_depth+1), accept_len, bonus (B,).
// Corrupt child links (only possible with check=false) end the sibling walk (link_ok).
cudaError_t launch_verify_greedy(const int64_t* first_child, const int64_t* next_sibling,
                                 const int64_t* draft_tokens, const int64_t* target_argmax,
                                 int64_t B, int64_t n, int64_t max_depth, int64_t* accepted,
                                 int64_t* accept_len, int64_t* bonus, cudaStream_t stream);

// Stochastic verification, one block per tree. target_probs / draft_probs (B, n, V) contiguous,
// both fp32 or (probs_fp64) both fp64 (draft_probs may be nullptr); coins (B, n), bonus_u (B,)
// fp64. workspace: verify_sampling_workspace(B, V, mode, draft_probs != nullptr) doubles (the fp64
// residual, as on CPU, and for VerifyMode::Rsd with draft_probs the fp64 draft residual). Draft
// tokens outside [0, V) are never accepted and leave the residuals unchanged; corrupt child links
// end the sibling walk.
inline int64_t verify_sampling_workspace(int64_t B, int64_t V, VerifyMode mode, bool has_draft_probs) {
  return (mode == VerifyMode::Rsd && has_draft_probs ? 2 : 1) * B * V;
}
cudaError_t launch_verify_sampling(const int64_t* first_child, const int64_t* next_sibling,
                                   const int64_t* draft_tokens, const void* target_probs,
                                   const void* draft_probs, bool probs_fp64, const double* coins,
                                   const double* bonus_u, int64_t B, int64_t n, int64_t V,
                                   int64_t max_depth, VerifyMode mode, int64_t* accepted,
                                   int64_t* accept_len, int64_t* bonus, double* workspace,
                                   cudaStream_t stream);

// Dynamic trees. select_frontier: cum (B, F), child (B, F, K) fp32 -> the m best (parent, rank,
// score). select_tree: cum (B, T) fp32, parents (B, T) int64 -> n kept nodes (indices, parents
// re-indexed to the nearest kept ancestor, score). One block per item, F*K and T <= kMaxCudaNodes.
cudaError_t launch_select_frontier(const float* cum, const float* child, int64_t B, int64_t F,
                                   int64_t K, int64_t m, int64_t* parent, int64_t* rank,
                                   float* score, cudaStream_t stream);
cudaError_t launch_select_tree(const float* cum, const int64_t* parents, int64_t B, int64_t T,
                               int64_t n, int64_t* idx, int64_t* new_parents, float* score,
                               cudaStream_t stream);

}  // namespace tree
}  // namespace tokenkernels
#endif
