// kv_select radix top-k (impl="tuned"): the host planner and a sequential CPU emulation of the
// two CUDA kernels (tokenkernels/radix_topk.cuh), for tests without a GPU. Private ops:
//   _kv_select_radix_topk_plan(B, N_max, sm_count) -> [splits, chunk, cap, workspace bytes,
//       zeroed bytes, dynamic shared memory bytes]: what the CUDA adapter launches with;
//   _kv_select_radix_topk_emulate(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask,
//       sm_count, cap) -> (out (B, W) int32, stats (B, 4) int64 [splits, compacted entries,
//       threshold key T, keys equal to T taken]): the kernels' passes run one CTA and one
//       thread at a time -- the same block steps (radix_first_step / radix_vector_ok), per-CTA
//       histograms summed as the global atomics do, the same bin ownership and exclusive scan in
//       the bucket choice, the per-step ordered compaction into each CTA's segment with the
//       candidates' pass-1 histogram, the
//       concatenation by segment offsets, and the emission's per-thread items and scan -- all
//       through the functions of radix_topk.h that the kernels call. cap > 0 overrides the
//       plan's shared-memory capacity (only which source the finishing CTA reads changes; the
//       stats say how many entries it had).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "kv_select/kv_select_args.h"
#include "tokenkernels/radix_topk.h"

namespace tokenkernels {
namespace kv_select {
namespace {

constexpr int kT = kRadixThreads;

// select_bucket of radix_topk.cuh: thread t owns bins nbins-1-t*per down to nbins-per*(t+1).
void emu_select_bucket(const std::vector<int64_t>& hist, int nbins, int64_t krem, int& bucket, int64_t& krem_out) {
  const int per = nbins / kT;
  std::vector<int64_t> local(kT, 0);
  for (int t = 0; t < kT; ++t)
    for (int i = 0; i < per; ++i) local[t] += hist[nbins - 1 - t * per - i];
  bucket = 0;
  krem_out = krem;
  int64_t above = 0;   // exclusive scan over the threads
  for (int t = 0; t < kT; ++t) {
    const int top = nbins - 1 - t * per;
    int64_t a = above;
    for (int i = 0; i < per; ++i) {
      const int64_t c = hist[top - i];
      if (radix_bucket_hit(a, c, krem)) { bucket = top - i; krem_out = krem - a; }
      a += c;
    }
    above += local[t];
  }
}

// Calls f(n0, v[4], ok[4]) per (step, thread) exactly as stream_range does.
template <typename F>
void emu_stream(const float* row, int64_t c0, int64_t c1, bool vec, F&& f) {
  for (int64_t t0 = radix_first_step(c0); t0 < c1; t0 += kRadixStep) {
    std::vector<std::array<float, 4>> vs(kT);
    std::vector<std::array<bool, 4>> oks(kT);
    for (int t = 0; t < kT; ++t) {
      const int64_t n0 = t0 + 4 * t;
      if (radix_vector_ok(vec, n0, c0, c1)) {
        for (int j = 0; j < 4; ++j) { vs[t][j] = row[n0 + j]; oks[t][j] = true; }
      } else {
        for (int j = 0; j < 4; ++j) {
          const int64_t n = n0 + j;
          oks[t][j] = n >= c0 && n < c1;
          vs[t][j] = oks[t][j] ? row[n] : 0.0f;
        }
      }
    }
    f(t0, vs, oks);
  }
}

std::tuple<at::Tensor, at::Tensor> radix_topk_emulate(const at::Tensor& scores_in, int64_t k, const at::Tensor& seq_lens,
                                                      int64_t n_sink, int64_t n_local,
                                                      const std::optional<at::Tensor>& reuse,
                                                      const std::optional<at::Tensor>& reuse_mask, int64_t sm_count,
                                                      int64_t cap) {
  TopkArgs a = check_topk(scores_in, k, seq_lens, n_sink, n_local, reuse, reuse_mask, true);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), N = scores.size(1), W = a.width;
  RadixTopkPlan plan = radix_topk_plan(B, N, sm_count);
  if (cap > 0) plan.cap = cap;
  auto out = at::full({B, W}, -1, scores.options().dtype(at::kInt));
  auto stats = at::zeros({B, 4}, scores.options().dtype(at::kLong));
  const float* sc = scores.data_ptr<float>();
  const int32_t* sl = a.seq_lens.data_ptr<int32_t>();
  const bool* rm = a.reuse_mask.defined() ? a.reuse_mask.data_ptr<bool>() : nullptr;
  const int32_t* ru = a.reuse.defined() ? a.reuse.data_ptr<int32_t>() : nullptr;
  int32_t* ob = out.data_ptr<int32_t>();
  int64_t* st = stats.data_ptr<int64_t>();
  const bool vec = true;   // contiguous rows: the kernels' alignment condition holds when N % 4 == 0
  for (int64_t b = 0; b < B; ++b) {
    int32_t* o = ob + b * W;
    const float* row = sc + b * N;
    const RadixRow r = radix_row(sl[b], N, k, n_sink, n_local, rm != nullptr && rm[b]);
    st[b * 4 + 0] = plan.splits;
    if (r.kind == RadixRowKind::All) {
      for (int64_t i = 0; i < W; ++i) o[i] = i < r.L ? static_cast<int32_t>(i) : -1;
      continue;
    }
    int64_t written = 0;
    if (r.kind == RadixRowKind::Reuse) {
      uint64_t run_max = 0;
      for (int64_t j = 0; j < k; ++j) {   // (the block max-scan, one entry at a time)
        const uint64_t key = radix_reuse_key(ru[b * k + j], r.lo, r.hi);
        if (radix_reuse_keep(key, run_max)) o[n_sink + written++] = ru[b * k + j];
        run_max = key > run_max ? key : run_max;
      }
    } else if (r.kind == RadixRowKind::Select) {
      // kernel 1: per-CTA pass-0 histograms, summed (the global atomics)
      std::vector<int64_t> hist(kRadixBins, 0);
      std::vector<int64_t> visits(static_cast<size_t>(r.hi - r.lo), 0);
      for (int64_t s = 0; s < plan.splits; ++s) {
        int64_t c0, c1;
        radix_chunk_range(plan, s, r.lo, r.hi, c0, c1);
        if (c0 >= c1) continue;
        emu_stream(row, c0, c1, vec, [&](int64_t t0, const auto& vs, const auto& oks) {
          for (int t = 0; t < kT; ++t)
            for (int j = 0; j < 4; ++j)
              if (oks[t][j]) {
                hist[radix_digit(radix_key(vs[t][j]), 0)] += 1;
                visits[t0 + 4 * t + j - r.lo] += 1;
              }
        });
      }
      for (int64_t i = 0; i < r.hi - r.lo; ++i)
        TORCH_CHECK(visits[i] == 1, "radix_topk_emulate: element ", r.lo + i, " visited ", visits[i], " times");
      int t1i;
      int64_t krem;
      emu_select_bucket(hist, kRadixBins, k, t1i, krem);
      const uint32_t t1 = static_cast<uint32_t>(t1i);
      // kernel 2: ordered compaction per CTA into its own segment, and the candidates' pass-1
      // histogram (per CTA, summed as the global atomics do)
      std::vector<int64_t> hist1(kRadixBins, 0);
      std::vector<std::vector<int32_t>> segs(static_cast<size_t>(plan.splits));
      for (int64_t s = 0; s < plan.splits; ++s) {
        int64_t c0, c1;
        radix_chunk_range(plan, s, r.lo, r.hi, c0, c1);
        std::vector<int32_t>& seg = segs[s];
        seg.assign(static_cast<size_t>(plan.chunk), -7);
        int64_t run = 0;
        emu_stream(row, c0, c1, vec, [&](int64_t t0, const auto& vs, const auto& oks) {
          int64_t pos = 0;   // exclusive scan over the threads
          for (int t = 0; t < kT; ++t)
            for (int j = 0; j < 4; ++j) {
              const uint32_t kj = radix_key(vs[t][j]);
              if (oks[t][j] && radix_digit(kj, 0) == t1) hist1[radix_digit(kj, 1)] += 1;
              if (oks[t][j] && radix_compact_keep(kj, t1)) {
                TORCH_CHECK(run + pos < plan.chunk, "radix_topk_emulate: segment overflow");
                seg[run + pos++] = static_cast<int32_t>(t0 + 4 * t + j);
              }
            }
          run += pos;
        });
        seg.resize(static_cast<size_t>(run));
      }
      // the last CTA: segment offsets, entries in index order
      std::vector<uint32_t> key;
      std::vector<int32_t> idx;
      for (const auto& seg : segs)
        for (int32_t i : seg) { idx.push_back(i); key.push_back(radix_key(row[i])); }
      const int64_t total = static_cast<int64_t>(idx.size());
      // the last CTA: the pass-1 bucket from the summed histogram, pass 2 over the entries
      int t2;
      {
        int64_t kr;
        emu_select_bucket(hist1, kRadixBins, krem, t2, kr);
        krem = kr;
      }
      uint32_t prefix = (t1 << radix_shift(0)) | (static_cast<uint32_t>(t2) << radix_shift(1));
      for (int pass = 2; pass < kRadixPasses; ++pass) {
        const int nbins = 1 << radix_bits(pass);
        std::vector<int64_t> h(nbins, 0);
        for (int64_t p = 0; p < total; ++p)
          if ((key[p] & radix_fixed_mask(pass)) == prefix) h[radix_digit(key[p], pass)] += 1;
        int d;
        int64_t kr;
        emu_select_bucket(h, nbins, krem, d, kr);
        prefix |= static_cast<uint32_t>(d) << radix_shift(pass);
        krem = kr;
      }
      const uint32_t T = prefix;
      // emission: kItems consecutive entries per thread, one exclusive scan per block tile
      constexpr int I = kRadixEmitItems;
      int64_t gt_run = 0, eq_run = 0;
      for (int64_t p0 = 0; p0 < total; p0 += int64_t{kT} * I) {
        int64_t gt_pre = 0, eq_pre = 0;
        for (int t = 0; t < kT; ++t) {
          int64_t gt_before = gt_run + gt_pre, eq_before = eq_run + eq_pre;
          for (int j = 0; j < I; ++j) {
            const int64_t p = p0 + int64_t{t} * I + j;
            const bool in = p < total;
            const bool gt = in && key[p] > T, eq = in && key[p] == T;
            const int64_t slot = radix_emit_slot(gt_before, eq_before, krem, gt, eq);
            if (slot >= 0) {
              TORCH_CHECK(slot < k, "radix_topk_emulate: slot ", slot, " out of range");
              o[n_sink + slot] = idx[p];
            }
            gt_before += gt;
            eq_before += eq;
            gt_pre += gt;
            eq_pre += eq;
          }
        }
        gt_run += gt_pre;
        eq_run += eq_pre;
      }
      written = k;
      st[b * 4 + 1] = total;
      st[b * 4 + 2] = T;
      st[b * 4 + 3] = krem;
    }
    for (int64_t i = 0; i < n_sink; ++i) o[i] = static_cast<int32_t>(i);
    for (int64_t i = 0; i < n_local; ++i) o[n_sink + written + i] = static_cast<int32_t>(r.hi + i);
    for (int64_t i = n_sink + written + n_local; i < W; ++i) o[i] = -1;
  }
  return {out, stats};
}

std::vector<int64_t> radix_topk_plan_op(int64_t B, int64_t N_max, int64_t sm_count) {
  const RadixTopkPlan p = radix_topk_plan(B, N_max, sm_count);
  return {p.splits, p.chunk, p.cap, radix_workspace_bytes(p, B), radix_zeroed_bytes(B), radix_dynamic_smem_bytes(p)};
}

}  // namespace
}  // namespace kv_select
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("_kv_select_radix_topk_emulate", &tokenkernels::kv_select::radix_topk_emulate);
}
TORCH_LIBRARY_IMPL(tokenkernels, CompositeExplicitAutograd, m) {
  m.impl("_kv_select_radix_topk_plan", &tokenkernels::kv_select::radix_topk_plan_op);
}
