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
  // [0, scores.size(1)] (always on CPU; one host sync on CUDA, else clamped). impl (last, default
  // "auto"): "auto" / "plain" / "simt" run the one-CTA-per-request radix select, "tuned" the
  // radix top-k of tokenkernels/radix_topk.h (several CTAs per row, candidate compaction).
  m.def(
      "kv_select_topk(Tensor scores, int k, Tensor seq_lens, int n_sink, int n_local, Tensor? reuse, "
      "Tensor? reuse_mask, bool check, str impl=\"auto\") -> Tensor");
  m.def(
      "kv_select_topk_out(Tensor scores, int k, Tensor seq_lens, int n_sink, int n_local, Tensor? reuse, "
      "Tensor? reuse_mask, bool check, Tensor(a!) out, str impl=\"auto\") -> ()");
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
  // lse (B, C, H_q) fp32. impl (last, default "auto"): "tuned" runs the tensor-core attention
  // core on CUDA (fp16 / bf16, D 64 / 128; else, and for every other name, the simt kernel).
  m.def(
      "kv_select_sparse_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
      "Tensor seq_lens, Tensor chunk_start, Tensor? block_table, float scale, bool check, "
      "str impl=\"auto\") -> (Tensor, Tensor)");
  m.def(
      "kv_select_sparse_prefill_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
      "Tensor seq_lens, Tensor chunk_start, Tensor? block_table, float scale, bool check, "
      "Tensor(a!) out, Tensor(b!) lse, str impl=\"auto\") -> ()");
  // ---- end kv_select family ----------------------------------------------------------------

  // ---- private: host planners and emulators of the CUDA kernels (tests only) ------------------
  // Names start with an underscore: not part of the API (tokenkernels.op_names() leaves them
  // out), CPU kernels only, no autograd, no fakes. Each exposes the torch-free host code a CUDA
  // launcher runs (split plans, work lists, tile schedules) or a bit-exact host emulation of a
  // kernel's index / digit / merge arithmetic, so that logic is tested without a GPU.

  // -- attention core (tree.attention, kv_select.sparse_decode / sparse_prefill, impl="tuned")
  // csrc/attention/attn_core_host.cpp. _attn_core_plan: args int64 (heads, rows, max_keys,
  // extra_parts, D, sm_count, ctas_per_sm) -> int64 (wn, rows_per_cta, row_blocks, splits, parts,
  // ctas, smem_bytes, ws_o, ws_lse, ws_ticket, ws_total) of attn_plan. _attn_core_ranges: the
  // key range [k0, k1) of every split for each length -> (len(lens), splits, 2). _attn_core_emulate:
  // the kernel's split / tile / key-group / merge arithmetic on fp32 scores -> (out (R, D), lse (R,)).
  m.def("_attn_core_plan(Tensor args) -> Tensor");
  m.def("_attn_core_ranges(Tensor lens, int splits) -> Tensor");
  // _attn_core_fragments: one warp's S = Q K^T and O = S V through the kernel's ldmatrix / mma
  // fragment addressing on a model of the instructions: q (16, D), k, v (n, D) -> (S (16, n), O (16, D)).
  m.def("_attn_core_fragments(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  // _attn_core_wgmma_fragments: one 64-row CTA tile of the sm_90a wgmma variant through its
  // shared-memory layout (gmma_off), accumulator / A-fragment maps and P repacking: q, k, v (64, D)
  // -> (S (64, 64), O (64, D), acc map (128, 32, 2), A map (128, 8, 2), gmma_off (64, D / 8)).
  m.def("_attn_core_wgmma_fragments(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_attn_core_emulate(Tensor q, Tensor k, Tensor v, Tensor key_ok, Tensor mask, int P, int G, int splits, "
      "int wn, float scale, str kind) -> (Tensor, Tensor)");


  // -- kv_select radix top-k (impl="tuned")
  // The CUDA plan of radix_topk_plan (tokenkernels/radix_topk.h): [splits (CTAs per row), chunk
  // (elements per CTA), cap (entries the finishing CTA keeps in shared memory), workspace bytes,
  // zeroed bytes, dynamic shared memory bytes].
  m.def("_kv_select_radix_topk_plan(int B, int N_max, int sm_count) -> int[]");
  // Sequential CPU emulation of the radix top-k kernels (csrc/kv_select/radix_topk_host.cpp):
  // out as kv_select_topk, stats (B, 4) int64 [splits, compacted entries, threshold key, keys
  // equal to it taken]; cap > 0 overrides the plan's shared-memory capacity.
  m.def(
      "_kv_select_radix_topk_emulate(Tensor scores, int k, Tensor seq_lens, int n_sink, int n_local, "
      "Tensor? reuse, Tensor? reuse_mask, int sm_count, int cap) -> (Tensor, Tensor)");

  // -- kv_select scoring (impl="tuned")
  // score_tuned_plan (csrc/include/tokenkernels/kv_select_score.h) as its 16 fields: ok, R, maxg,
  // U, tp, threads, tile, stages, smem_bytes, tiles_per_req, chunk_tiles, chunks_per_req, chunks,
  // blocks_per_sm, grid, workspace_bytes.
  m.def("_kv_select_score_plan(int B, int N_max, int H_kv, int H_q, int D, int elt_size, int sm_count, "
        "int blocks_per_sm) -> int[]");
  // The kernel's 32-bit page division: n // d for every n (int64, values in [0, 2^31)).
  m.def("_kv_select_score_fastdiv(Tensor n, int d) -> Tensor");
  // CPU emulation of the three tuned passes with the kernel's own TK_HD arithmetic (fp16/bf16
  // cache, fp32 pre-scaled q (B, H_q, D)): (logits (B, H_q, N_max) NaN where never written,
  // pstat (B, H_q, chunks_per_req, 2), stat (B, H_q, 2), out (B, N_max)).
  m.def("_kv_select_score_emulate(Tensor q, Tensor k_cache, Tensor seq_lens, Tensor? block_table, "
        "Tensor? skip, Tensor? valid, int sm_count, int blocks_per_sm) -> (Tensor, Tensor, Tensor, Tensor)");


  // -- cross_entropy (impl="tuned")
  // Chunk plan of the tuned backward (plan_bwd, tokenkernels/cross_entropy_bwd.h) for N tokens,
  // V shard columns and dZ elements of elt_bytes: int64 [vc, chunks, ld, row_tiles, col_tiles,
  // mask_rows, mask_cols, dz_bytes, budget_bytes]; budget_bytes < 0 = the default budget
  // (default_budget_bytes), vc_override > 0 replaces it (TOKENKERNELS_CE_TUNED_VC).
  m.def("_cross_entropy_bwd_plan(int N, int V, int elt_bytes, int budget_bytes, int vc_override) -> Tensor");
  // CPU emulation of the tuned backward's recompute epilogue, chunk by chunk and tile by tile
  // with the kernel's own TK_HD code (dz_row, dz_value, filter_keeps, mask_index): logits
  // (N, V) fp32 stand for the kernel's fp32 accumulators hidden @ weight^T; the other
  // arguments are cross_entropy_backward's; grad_scale = gscale[0]; vc: as vc_override.
  // Returns dZ (N, V) fp32 (times grad_scale, not rounded; dropped sub-tiles zero) and the
  // skip mask (ceil(N / 64), ceil(V / 128)) uint8 (1 = kept).
  m.def(
      "_cross_entropy_bwd_emulate(Tensor logits, Tensor targets, Tensor? bias, Tensor lse, "
      "Tensor coef_p, Tensor coef_t, Tensor? coef_1, int ignore_index, float? softcap, "
      "int vocab_start, float filter_eps, float grad_scale, int vc) -> (Tensor, Tensor)");
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

  // CPU engine of linear_cross_entropy for a scalar loss with gradients (grads in forward; not a
  // test-only op: the Python wrapper calls it on the CPU, csrc/cross_entropy/cross_entropy_fused_cpu.cpp
  // explains the engines). loss = mean (mean = true, over tokens not ignored) or sum of the
  // per-token loss of linear_cross_entropy with these options, times scale. Returns (loss 0-d, lse (N,),
  // dhidden, dweight, dbias) in fp32 (fp64 for fp64; gradients in their tensors' dtypes; (0,)
  // when not asked for). engine: "auto" | "chunk" (fp32/fp64) | "brgemm" (bf16, oneDNN's
  // micro-kernel) | "composite" (the forward op + the recompute backward op). filter_eps: checked
  // as linear_cross_entropy checks it (>= 0) and not applied (the fused gradients are exact).
  m.def(
      "_cross_entropy_fused(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "int ignore_index, float? softcap, float label_smoothing, float z_loss, bool mean, "
      "float scale, bool check, float filter_eps, bool need_dhidden, bool need_dweight, bool need_dbias, "
      "str engine=\"auto\") "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Whether the bf16 "brgemm" engine runs on this CPU (AVX512-BF16 or AMX).
  m.def("_cross_entropy_cpu_brgemm() -> bool");


  // -- kcenter (impl="tuned")
  // Launch plan of the tuned path (tokenkernels/kcenter_tuned.h make_plan) for B items of N
  // tokens, D features, sm_count SMs, fp16/bf16 (low_precision) or fp32 x, force_tile 0 / 64 /
  // 128: (fields (18,) int64: ok, tile, tiles_1d, tiles_per_item, gram_ctas, gram_threads,
  // gram_smem, ctas_per_sm, waves, greedy_items, greedy_threads, d_pad, ld, key_offset,
  // nn_offset, workspace_bytes, max_n, est_gram_us (the wave model's Gram time, rounded); tiles (tiles_per_item, 2) int64: the (I, J) tile of each
  // Gram CTA, blockIdx.x order).
  m.def("_kcenter_tuned_plan(int B, int N, int D, int sm_count, bool low_precision, int force_tile) -> (Tensor, Tensor)");
  // Host emulation of the tuned kernels' index / fold / arg-max arithmetic: (idx (B, k), radii
  // (B, k), keys (B, N, N), nn (B, N), writes (B, N, N) int32 = stores of each key element by the
  // epilogue). mma = true: the Gram tiles come from an emulation of the tensor-core loop's data
  // movement (cp.async loader, swizzled panels, ldmatrix lanes, mma fragments); false: one fp32
  // ATen GEMM.
  m.def("_kcenter_tuned_emulate(Tensor x, int k, Tensor? lengths, Tensor? exclude, Tensor? start_index, "
        "str metric, int force_tile, bool mma) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- end private ---------------------------------------------------------------------------
}
