// Every tokenkernels schema lives here (one place to read the whole API surface).
// Implementations register per dispatch key in csrc/<family>/<family>.cpp (CPU) and
// csrc/<family>/<family>_cuda.cpp (CUDA). Python wrappers: python/tokenkernels/_ops/.
#include <torch/library.h>

TORCH_LIBRARY(tokenkernels, m) {
  // ---- kcenter family ---------------------------------------------------------------------
  // Greedy k-center (farthest-point) selection (tokenkernels.kcenter). x (B, N, D); picks
  // (B, k) int64 padded -1 and the max-min distance at each pick (B, k) fp32 padded NaN.
  // k_per_item (B,) int64 <= k; lengths (B,) valid prefix; exclude (B, N) bool never picked;
  // start_index (B,) forced first picks, None = "isolated" (the token whose nearest neighbour
  // is farthest). metric: "cosine" (1 - cos) or "l2". impl (CUDA; the CPU kernel ignores it):
  // "auto" the kernels' heuristic, "plain" (Gram path, global-memory running minimum),
  // "simt" (Gram path, register running minimum, N <= 8192), "tuned" (symmetric Gram with the
  // nearest-neighbour minimum fused, issue #13), "stream" (large-N path: one distance row per
  // pick from x, never N x N). check: validate value-dependent arguments
  // (one host sync on CUDA).
  m.def(
      "kcenter_select(Tensor x, int k, Tensor? k_per_item, Tensor? lengths, Tensor? exclude, "
      "Tensor? start_index, str metric, bool sorted, bool check, str impl) -> (Tensor, Tensor)");
  // Greedy maximum coverage (MMTok; tokenkernels.coverage_select). sim (B, M, N) >= 0 rows x
  // candidates; picks (B, k) padded -1, marginal gains (B, k) fp32 padded NaN. row_lengths
  // (B,) valid rows; k_per_item / lengths / exclude on candidates as above. One kernel per
  // device (no impl).
  m.def(
      "kcenter_coverage_select(Tensor sim, int k, Tensor? k_per_item, Tensor? lengths, "
      "Tensor? row_lengths, Tensor? exclude, bool check) -> (Tensor, Tensor)");
  // ---- cross_entropy family ---------------------------------------------------------------
  // Fused linear cross-entropy statistics, never materialising the (N, V) logits.
  // z = softcap(hidden @ weight^T + bias) for the vocabulary shard [vocab_start, vocab_start+V)
  // of a vocabulary of vocab_total entries. Per token (fp32 unless noted): log-sum-exp over the
  // shard, the target logit (0 when ignored or owned by another shard; NaN when out of range and
  // check=False), sum of logits (if sum_z, else empty), arg-max (int64) and max logit and
  // entropy of softmax(z) (if aux, else empty). check: validate targets (host sync on CUDA).
  // impl: "auto" (the kernels' heuristic: wmma where it applies), "plain" (logit tiles through
  // ATen GEMMs), "wmma" (CUDA fused WMMA kernels for fp16/bf16, else plain), "tuned" (sm_90a
  // CUTLASS forward + atomic-free backward, issue #13); the CPU has one engine for all. filter_eps (>= 0) / accum_fp32 are not used by the forward: its
  // autograd formula passes them on. Checks: csrc/cross_entropy/cross_entropy_args.h.
  m.def(
      "cross_entropy_forward(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
      "float? softcap, int vocab_start, int vocab_total, bool sum_z, bool aux, bool check, "
      "float filter_eps, bool accum_fp32, str impl) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of the logits recomputed tile by tile:
  //   dZ = coef_p * exp(z - lse) + coef_t * onehot(target) + coef_1   (times softcap')
  // dhidden = dZ @ weight, dweight = dZ^T @ hidden, dbias = sum_rows dZ; each empty unless
  // asked for. filter_eps > 0 skips tiles where every |dZ| < filter_eps * max(|coef_p|, |coef_t|)
  // of its row (gradient filtering). accum_fp32: fp32 accumulation of dweight for fp16/bf16.
  // lse, coef_p, coef_t, coef_1: (N,) fp32 (fp64 for fp64 inputs). impl: as cross_entropy_forward's.
  m.def(
      "cross_entropy_backward(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor lse, "
      "Tensor coef_p, Tensor coef_t, Tensor? coef_1, int ignore_index, float? softcap, "
      "int vocab_start, float filter_eps, bool need_dhidden, bool need_dweight, bool need_dbias, "
      "bool accum_fp32, str impl) -> (Tensor, Tensor, Tensor)");

  // ---- tree family (speculative-decoding token trees) ------------------------------------
  // Conventions: csrc/include/tokenkernels/tree.h; every check and option parse of these ops:
  // csrc/tree/tree_args.h (the same errors on CPU and CUDA). impl (build, attention): "auto"
  // (the kernels' own choice), "plain", "simt" or "tuned" (CUDA variants; the CPU has one kernel and
  // ignores it, but an unknown name is an error everywhere).
  // build: parents (B, n) int32/int64 -> mask (B, n, ceil(n/32)) int32 bit-packed, depth,
  // first_child, next_sibling (B, n) int64. check: validate parents/tree_lens values (always on
  // CPU; one host sync on CUDA).
  m.def("tree_build(Tensor parents, Tensor? tree_lens, bool check, str impl) -> (Tensor, Tensor, Tensor, Tensor)");
  // Root-to-leaf paths (B, max_leaves, max_depth + 1) int64, leaves in node order, padded -1.
  m.def(
      "tree_paths(Tensor parents, Tensor depth, Tensor first_child, Tensor? tree_lens, int max_leaves, "
      "int max_depth) -> Tensor");
  // Tree attention over a KV prefix (no mask) + the tree tokens (packed mask), merged by LSE.
  // q (B, n, Hq, D); caches (B, N, Hkv, D) or paged (pages, page_size, Hkv, D) + block_table.
  // Returns out (B, n, Hq, D) in q's dtype and lse (B, n, Hq) fp32. check: validate prefix_lens,
  // tree_lens and block_table values (always on CPU; one host sync on CUDA, else clamped).
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor prefix_lens, Tensor mask, "
      "Tensor? tree_lens, Tensor? block_table, float scale, bool check, str impl) -> (Tensor, Tensor)");
  m.def(
      "tree_attention_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor prefix_lens, Tensor mask, "
      "Tensor? tree_lens, Tensor? block_table, float scale, bool check, str impl, Tensor(a!) out, "
      "Tensor(b!) lse) -> ()");
  // Verification: accepted (B, max_depth + 1) node indices (root first, padded -1), accept_len
  // (B,) accepted draft nodes (root excluded), bonus (B,) token. check: validate the child links
  // (always on CPU; one host sync on CUDA, else a corrupt link ends the walk).
  m.def(
      "tree_verify_greedy(Tensor first_child, Tensor next_sibling, Tensor draft_tokens, "
      "Tensor target_argmax, int max_depth, bool check=True) -> (Tensor, Tensor, Tensor)");
  // Lossless multi-candidate speculative sampling; coins (B, n) and bonus_u (B,) are the
  // uniforms (drawn by the Python wrapper from the user's generator). check: validate the child
  // links and the draft tokens of linked nodes (always on CPU; one host sync on CUDA, else
  // out-of-range tokens are never accepted) and that the probability rows verification reads
  // (the root's and the linked nodes') are distributions (on both devices only with check).
  // mode: the sibling rule with draft_probs, "specinfer" (siblings drawn i.i.d. from the draft)
  // or "rsd" (Recursive Speculative Decoding: siblings drawn without replacement); the same
  // rule without draft_probs.
  m.def(
      "tree_verify_sampling(Tensor first_child, Tensor next_sibling, Tensor draft_tokens, "
      "Tensor target_probs, Tensor? draft_probs, Tensor coins, Tensor bonus_u, int max_depth, "
      "bool check, str mode=\"specinfer\") -> (Tensor, Tensor, Tensor)");
  // Dynamic trees (EAGLE-2 / DySpec): the m best (parent, child rank, score) expansions, and
  // the n best nodes of a drafted tree (indices, re-indexed parents, scores).
  m.def("tree_select_frontier(Tensor cum_logp, Tensor child_logp, int m) -> (Tensor, Tensor, Tensor)");
  m.def("tree_select_tree(Tensor cum_logp, Tensor parents, int n) -> (Tensor, Tensor, Tensor)");
  // ---- end tree family ---------------------------------------------------------------------
  // ---- kv_select family (TokenSelect: token-level KV selection and sparse attention) -------
  // KV layouts: contiguous k/v_cache (B, N_max, H_kv, D), block_table None; or paged
  // (num_pages, page_size, H_kv, D) with block_table (B, max_pages). Any strides on the cache
  // dims are accepted. Integer metadata (seq_lens (B,), block_table, indices, chunk_start,
  // reuse) may be int8/16/32/64 or uint8: narrowed to int32 saturating (no host sync), so values past
  // int32 are out of range. check: validate value-dependent arguments (seq_lens within
  // capacity, pages in range, indices < seq_len, chunk_start <= seq_len); one host sync on
  // CUDA, always done on CPU. impl: "auto" (the kernels' own choice), "plain", "simt", "tuned"
  // (CUDA variants, csrc/include/tokenkernels/kv_select.h; the CPU validates and ignores it).
  // Criticality scores (B, N_max) fp32: sum over q-heads of softmax over the valid tokens of
  // scale * q_h . k_n (q (B, H_q, D) or (B, C, H_q, D) -> chunk mean); -inf past seq_len, for
  // tokens with valid[b, n] false (valid (B, N_max) bool: masked tokens are not in the softmax)
  // and for rows with skip[b] (Selection Cache hits).
  m.def(
      "kv_select_score(Tensor q, Tensor k_cache, Tensor seq_lens, Tensor? block_table, float scale, "
      "Tensor? skip, Tensor? valid, bool check, str impl) -> Tensor");
  // Selected token indices (B, n_sink + k + n_local) int32 ascending, padded -1. Rows with
  // reuse_mask[b] take their middle tokens from reuse (B, k) ascending. check: seq_lens within
  // [0, scores.size(1)] (always on CPU; one host sync on CUDA, else clamped).
  m.def(
      "kv_select_topk(Tensor scores, int k, Tensor seq_lens, int n_sink, int n_local, Tensor? reuse, "
      "Tensor? reuse_mask, bool check) -> Tensor");
  m.def(
      "kv_select_topk_out(Tensor scores, int k, Tensor seq_lens, int n_sink, int n_local, Tensor? reuse, "
      "Tensor? reuse_mask, bool check, Tensor(a!) out) -> ()");
  // Attention of q (B, H_q, D) over the tokens listed in indices (B, K) (-1 skipped):
  // out (B, H_q, D) in q's dtype, lse (B, H_q) fp32 (natural log; -inf when nothing attended).
  m.def(
      "kv_select_sparse_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, Tensor seq_lens, "
      "Tensor? block_table, float scale, bool check, str impl) -> (Tensor, Tensor)");
  m.def(
      "kv_select_sparse_decode_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
      "Tensor seq_lens, Tensor? block_table, float scale, bool check, str impl, Tensor(a!) out, "
      "Tensor(b!) lse) -> ()");
  // Chunked prefill: q (B, C, H_q, D) at positions chunk_start[b] + c (their K/V already in the
  // cache); attends the indices in [0, chunk_start[b]) plus the chunk causally. out like q,
  // lse (B, C, H_q) fp32. (One CUDA kernel: no impl.)
  m.def(
      "kv_select_sparse_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
      "Tensor seq_lens, Tensor chunk_start, Tensor? block_table, float scale, bool check) "
      "-> (Tensor, Tensor)");
  m.def(
      "kv_select_sparse_prefill_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
      "Tensor seq_lens, Tensor chunk_start, Tensor? block_table, float scale, bool check, "
      "Tensor(a!) out, Tensor(b!) lse) -> ()");
  // ---- end kv_select family ----------------------------------------------------------------

  // ---- private: host planners and emulators of the CUDA kernels (tests only) ------------------
  // Names start with an underscore: not part of the API (tokenkernels.op_names() leaves them
  // out), CPU kernels only, no autograd, no fakes. Each exposes the torch-free host code a CUDA
  // launcher runs (split plans, work lists, tile schedules) or a bit-exact host emulation of a
  // kernel's index / digit / merge arithmetic, so that logic is tested without a GPU.

  // -- attention core (tree.attention, kv_select.sparse_decode / sparse_prefill, impl="tuned")


  // -- kv_select radix top-k (impl="tuned")


  // -- kv_select scoring (impl="tuned")


  // -- cross_entropy (impl="tuned")
  // Forward (sm_90a TMA + wgmma, csrc/include/tokenkernels/cross_entropy_sm90.h): the host plan
  // for these inputs and a described device, cluster 1 or 2 (weight multicast pairs) ->
  // (fields (15,) int64: path (0 sm90, 1 wmma, 2 plain), reason, row_tiles, vocab_tiles,
  // k_blocks, splits, tiles_per_split, units, grid, part_bytes, workspace_bytes, smem_bytes,
  // makespan_tiles, cluster, row_units; schedule (T, 5) int64: cta, unit, row tile, split,
  // vocab tile in each CTA's order, when `schedule` and the sm90 path).
  m.def(
      "_cross_entropy_fwd_plan(int N, int D, int V, ScalarType dtype, bool aligned16, "
      "int cc_major, int cc_minor, int sm_count, bool sm90a_code, str impl, int cluster, "
      "bool schedule) -> (Tensor, Tensor)");
  // The kernel's fold of fp32 logits (N, V) = hidden @ weight^T (no bias), emulated on the CPU
  // with its TK_HD code (lanes, tiles, splits, merges): the outputs of cross_entropy_forward.
  m.def(
      "_cross_entropy_fwd_emulate(Tensor logits, Tensor targets, Tensor? bias, float? softcap, "
      "int ignore_index, int vocab_start, int vocab_total, int splits, bool sum_z, bool aux) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");


  // -- kcenter (impl="tuned")


  // ---- end private ---------------------------------------------------------------------------
}
