// kcenter family, CPU kernels.
//
// kcenter: per item, Gram rows come from ATen GEMMs (fp32 accumulation, BLAS); the greedy itself
// is the O(k*N) incremental update of a running minimum "key" (see kcenter.h) with a fused,
// vectorisable min/arg-max pass. Two ways to get Gram rows:
//   * full Gram (the "isolated" start needs every nearest-neighbour distance, and it is also the
//     cheapest when k is a large fraction of N): the upper block-triangle only, by tiled GEMMs,
//     then mirrored, so about half the flops of x x^T;
//   * speculative row batches (first / random / given starts with small k): the rows of the next
//     pick plus the m-1 current front-runners are computed together in one GEMM. A row is only
//     ever used when its token is the true arg-max, so the result is exact; batching turns k
//     memory-bound GEMVs into a few compute-bound GEMMs.
// Items run in parallel over the batch when there is more than one; a single item gets the
// GEMM's own threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <string_view>
#include <vector>

#include "kcenter/kcenter_cpu.h"
#include "kcenter/kcenter_args.h"
#include "tokenkernels/kcenter.h"

namespace tokenkernels {
namespace kcenter {
namespace cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Per-token auxiliary values (see kcenter.h): inverse norms (cosine) or squared norms (l2).
// (Squared norms as a plain sum of squares, like the reference, so identical tokens are at
// distance 0 rather than sqrt(rounding of norm^2).)
at::Tensor token_aux(const at::Tensor& X, Metric m) {
  if (m == Metric::L2) return X.square().sum(1);
  return at::linalg_vector_norm(X, 2, {1}).clamp_min(kNormEps).reciprocal();
}

// Full Gram G = X X^T (M x M, fp32, row-major), computing only block-upper tiles when that saves
// work, then mirroring them into the lower triangle.
at::Tensor gram_full(const at::Tensor& X) {
  const int64_t M = X.size(0);
  constexpr int64_t kTile = 256;
  if (M <= 2 * kTile) return at::mm(X, X.t());
  auto G = at::empty({M, M}, X.options());
  const int64_t nb = (M + kTile - 1) / kTile;
  for (int64_t bi = 0; bi < nb; ++bi) {
    const int64_t i0 = bi * kTile, mi = std::min(kTile, M - i0);
    // One GEMM per block row: rows [i0, i0+mi) against columns [i0, M).
    auto out = G.narrow(0, i0, mi).narrow(1, i0, M - i0);
    at::mm_out(out, X.narrow(0, i0, mi), X.narrow(0, i0, M - i0).t());
  }
  // Mirror: G[j, i] = G[i, j] for j > i outside the diagonal blocks, tile by tile (cache-sized
  // transposes), in parallel over tiles.
  float* g = G.data_ptr<float>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t i0 = bi * kTile, i1 = std::min(M, i0 + kTile);
      for (int64_t j0 = i1; j0 < M; j0 += 64) {
        const int64_t j1 = std::min(M, j0 + 64);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j) g[j * M + i] = g[i * M + j];
      }
    }
  });
  return G;
}

// Nearest-neighbour key of every row of a full Gram (min over j != i).
void nn_keys_full(const float* G, const float* aux, int64_t M, Metric m, float* nn) {
  at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* gi = G + i * M;
      const float ai = aux[i];
      float best = kInf;
      if (m == Metric::Cosine) {
        // key = 1 - g*ai*aj : minimise  <=>  maximise g*aj
        float mx = -kInf;
        for (int64_t j = 0; j < i; ++j) mx = std::max(mx, gi[j] * aux[j]);
        for (int64_t j = i + 1; j < M; ++j) mx = std::max(mx, gi[j] * aux[j]);
        best = M > 1 ? 1.0f - mx * ai : kInf;
      } else {
        // key = ai + aj - 2g (clamped at 0)
        float mn = kInf;
        for (int64_t j = 0; j < i; ++j) mn = std::min(mn, aux[j] - 2.0f * gi[j]);
        for (int64_t j = i + 1; j < M; ++j) mn = std::min(mn, aux[j] - 2.0f * gi[j]);
        best = M > 1 ? std::max(ai + mn, 0.0f) : kInf;
      }
      nn[i] = best;
    }
  });
}

// mind[j] = min(mind[j], key(p, j)) for all j; returns the arg-max of the new mind (lowest index
// among ties) or -1 when every entry is -inf (nothing left to pick). Selected tokens hold -inf.
int64_t update_and_argmax(float* mind, const float* grow, const float* aux, float ap, int64_t M,
                          Metric m) {
  float mx = -kInf;
  if (m == Metric::Cosine) {
    for (int64_t j = 0; j < M; ++j) {
      const float key = 1.0f - grow[j] * ap * aux[j];
      const float v = std::min(mind[j], key);
      mind[j] = v;
      mx = std::max(mx, v);
    }
  } else {
    for (int64_t j = 0; j < M; ++j) {
      const float s = ap + aux[j] - 2.0f * grow[j];
      const float key = s > 0.0f ? s : 0.0f;
      const float v = std::min(mind[j], key);
      mind[j] = v;
      mx = std::max(mx, v);
    }
  }
  if (mx == -kInf) return -1;
  for (int64_t j = 0; j < M; ++j)
    if (mind[j] == mx) return j;
  return -1;  // unreachable (NaN input)
}

int64_t argmax_first(const float* v, int64_t M) {
  int64_t best = -1;
  float bv = -kInf;
  for (int64_t j = 0; j < M; ++j)
    if (v[j] > bv) { bv = v[j]; best = j; }
  return best;
}

// Source of Gram rows for the greedy.
struct RowSource {
  const at::Tensor& X;        // (M, D) fp32, contiguous
  at::Tensor full;            // (M, M) when the full Gram is used
  std::vector<std::vector<float>> chunks;
  std::vector<const float*> row_ptr;   // per token: its Gram row, or nullptr
  int64_t M;
  int batch;

  RowSource(const at::Tensor& X_, at::Tensor full_, int batch_)
      : X(X_), full(std::move(full_)), M(X_.size(0)), batch(batch_) {
    row_ptr.assign(M, nullptr);
    if (full.defined()) {
      const float* g = full.data_ptr<float>();
      for (int64_t i = 0; i < M; ++i) row_ptr[i] = g + i * M;
    }
  }

  // Row of token p; when missing, computes p's row together with the (batch-1) unselected
  // tokens of largest running minimum that have no row yet, in one pass over X.
  const float* row(int64_t p, const float* mind) {
    if (row_ptr[p]) return row_ptr[p];
    std::vector<int64_t> cand;
    cand.reserve(M);
    for (int64_t j = 0; j < M; ++j)
      if (j != p && !row_ptr[j] && mind[j] != -kInf) cand.push_back(j);
    const int64_t extra = std::min<int64_t>(batch - 1, (int64_t)cand.size());
    if (extra > 0 && extra < (int64_t)cand.size())
      std::nth_element(cand.begin(), cand.begin() + extra, cand.end(), [&](int64_t a, int64_t b) {
        return argmax_better(mind[a], a, mind[b], b);
      });
    cand.resize(extra);
    cand.insert(cand.begin(), p);
    const int m = static_cast<int>(cand.size());
    const int64_t D = X.size(1);
    const float* x = X.data_ptr<float>();
    std::vector<const float*> arows(m);
    for (int t = 0; t < m; ++t) arows[t] = x + cand[t] * D;
    std::vector<float> rows(static_cast<size_t>(m) * M);
    small_batch_dots(arows.data(), m, x, M, D, rows.data(), M);
    for (int t = 0; t < m; ++t) row_ptr[cand[t]] = rows.data() + t * M;
    chunks.push_back(std::move(rows));   // moving a vector keeps its buffer (and our pointers)
    return row_ptr[p];
  }
};

// Rows per speculative batch: each batch streams X once, so when X is larger than the
// last-level cache, bigger batches amortise the memory traffic; when it fits, small batches
// waste fewer rows on candidates that never get picked.
// TOKENKERNELS_KCENTER_BATCH overrides it (for tuning).
int speculative_batch(int64_t M, int64_t D) {
  static const int forced = [] {
    const char* e = std::getenv("TOKENKERNELS_KCENTER_BATCH");
    return e ? std::max(1, std::atoi(e)) : 0;
  }();
  if (forced) return forced;
  const int64_t bytes = M * D * int64_t(sizeof(float));
  return bytes <= (int64_t(16) << 20) ? 4 : 12;
}

// One item. X: (M, D) fp32 valid rows; `orig` maps compact -> original token index.
// start_pos: compact index of a forced start, or -1 for the isolated rule.
void kcenter_item(const at::Tensor& X, const std::vector<int64_t>& orig, int64_t start_pos,
                  int64_t kb, Metric m, bool sorted, int64_t* out_idx, float* out_rad,
                  int64_t k_max) {
  for (int64_t s = 0; s < k_max; ++s) { out_idx[s] = -1; out_rad[s] = kNaN; }
  const int64_t M = X.size(0);
  if (kb <= 0 || M == 0) return;
  auto auxT = token_aux(X, m).contiguous();
  const float* aux = auxT.data_ptr<float>();

  const bool isolated = start_pos < 0;
  // Full Gram when every pair is needed anyway, or when the rows we would compute one batch at
  // a time would cost about as much (k a large fraction of M).
  const bool use_full = isolated || kb * 4 >= M;
  RowSource src(X, use_full ? gram_full(X) : at::Tensor(), speculative_batch(M, X.size(1)));

  std::vector<float> mind(M, kInf);
  int64_t p;
  float r0;
  if (isolated) {
    std::vector<float> nn(M);
    nn_keys_full(src.full.data_ptr<float>(), aux, M, m, nn.data());
    p = argmax_first(nn.data(), M);
    if (p < 0) p = 0;   // all nn = -inf cannot happen; NaN input falls back to token 0
    r0 = nn[p] == kInf ? kInf : dist_from_key(m, nn[p]);
  } else {
    p = start_pos;
    r0 = kInf;
  }
  int64_t n = 0;   // picks written
  while (n < kb && p >= 0) {
    out_idx[n] = orig[p];
    out_rad[n] = n == 0 ? r0 : dist_from_key(m, mind[p]);
    mind[p] = -kInf;
    ++n;
    if (n == kb) break;
    const float* grow = src.row(p, mind.data());
    p = update_and_argmax(mind.data(), grow, aux, aux[p], M, m);
  }
  if (sorted) {
    std::vector<int64_t> perm(n);
    std::iota(perm.begin(), perm.end(), 0);
    std::sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return out_idx[a] < out_idx[b]; });
    std::vector<int64_t> ti(n);
    std::vector<float> tr(n);
    for (int64_t t = 0; t < n; ++t) { ti[t] = out_idx[perm[t]]; tr[t] = out_rad[perm[t]]; }
    std::copy(ti.begin(), ti.end(), out_idx);
    std::copy(tr.begin(), tr.end(), out_rad);
  }
}

// The CPU kernel has one implementation: `impl` is parsed (an unknown name is the same error
// as on CUDA) and otherwise ignored.
std::tuple<at::Tensor, at::Tensor> select(const at::Tensor& x_in, int64_t k,
                                          const std::optional<at::Tensor>& k_per_item,
                                          const std::optional<at::Tensor>& lengths,
                                          const std::optional<at::Tensor>& exclude,
                                          const std::optional<at::Tensor>& start_index,
                                          std::string_view metric, bool sorted, bool check,
                                          std::string_view impl) {
  const auto a = check_select_args(x_in, k, k_per_item, lengths, exclude, start_index, metric,
                                   impl);
  if (check) check_select_values(x_in, a, k_per_item, lengths, exclude, start_index);
  const int64_t B = a.B, N = a.N;
  auto idx = at::empty({B, k}, x_in.options().dtype(at::kLong));
  auto rad = at::empty({B, k}, x_in.options().dtype(at::kFloat));
  if (B == 0 || k == 0) return {idx, rad};

  auto lens = contiguous_or_undefined(lengths);
  auto excl = contiguous_or_undefined(exclude);
  auto kk = contiguous_or_undefined(k_per_item);
  auto st = contiguous_or_undefined(start_index);
  const Metric m = a.metric;
  int64_t* pidx = idx.data_ptr<int64_t>();
  float* prad = rad.data_ptr<float>();

  auto run = [&](int64_t b) {
    int64_t L = lens.defined() ? std::clamp<int64_t>(lens.data_ptr<int64_t>()[b], 0, N) : N;
    std::vector<int64_t> orig;
    orig.reserve(L);
    const bool* ex = excl.defined() ? excl.data_ptr<bool>() + b * N : nullptr;
    for (int64_t j = 0; j < L; ++j)
      if (!ex || !ex[j]) orig.push_back(j);
    const int64_t M = (int64_t)orig.size();
    int64_t kb = kk.defined() ? std::clamp<int64_t>(kk.data_ptr<int64_t>()[b], 0, k) : k;
    kb = std::min(kb, M);   // without `check`, missing picks are padded with -1
    at::Tensor X;
    if (M == L) {
      X = x_in[b].narrow(0, 0, L).to(at::kFloat).contiguous();
    } else {
      auto ids = at::from_blob(orig.data(), {M}, at::kLong).clone();
      X = x_in[b].index_select(0, ids).to(at::kFloat).contiguous();
    }
    int64_t start_pos = -1;
    if (st.defined() && M > 0) {
      const int64_t s0 = st.data_ptr<int64_t>()[b];
      auto it = std::lower_bound(orig.begin(), orig.end(), s0);
      // An invalid start (possible only with check=false) falls back to the first valid token.
      start_pos = (it != orig.end() && *it == s0) ? (it - orig.begin()) : 0;
    }
    kcenter_item(X, orig, start_pos, kb, m, sorted, pidx + b * k, prad + b * k, k);
  };
  if (B > 1 && at::get_num_threads() > 1) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) run(b);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) run(b);
  }
  return {idx, rad};
}

// ---------------------------------------------------------------------------------- coverage
// Lazy greedy (Minoux): coverage is submodular, so a candidate's gain only shrinks; a max-heap of
// stale upper bounds ordered by (gain desc, index asc) lets most candidates skip re-evaluation.
// The popped candidate is taken once its fresh gain still beats the next bound under the same
// order, which gives exactly the plain greedy's picks, tie rule included.
void coverage_item(const float* simT /*(N, M) candidates x rows*/, int64_t M, int64_t R,
                   const std::vector<int64_t>& cands, int64_t kb, int64_t* out_idx,
                   float* out_gain, int64_t k_max) {
  for (int64_t s = 0; s < k_max; ++s) { out_idx[s] = -1; out_gain[s] = kNaN; }
  if (kb <= 0 || cands.empty()) return;
  std::vector<float> cur(R, 0.0f);
  // fp64 accumulation, rounded once: the gain is then the correctly rounded fp32 value of the
  // fp32 terms' sum (the CUDA kernel sums in the same order, so both agree bit for bit).
  auto gain_of = [&](int64_t j) {
    const float* col = simT + j * M;
    double g = 0.0;
    for (int64_t r = 0; r < R; ++r) g += std::max(col[r] - cur[r], 0.0f);
    return static_cast<float>(g);
  };
  struct Entry { float g; int64_t j; int64_t stamp; };
  auto worse = [](const Entry& a, const Entry& b) { return argmax_better(b.g, b.j, a.g, a.j); };
  std::vector<Entry> heap;
  heap.reserve(cands.size());
  for (int64_t j : cands) heap.push_back({gain_of(j), j, 0});
  std::make_heap(heap.begin(), heap.end(), worse);
  int64_t n = 0;
  while (n < kb && !heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    Entry e = heap.back();
    heap.pop_back();
    if (e.stamp != n) {
      e.g = gain_of(e.j);
      e.stamp = n;
      if (!heap.empty() && !argmax_better(e.g, e.j, heap.front().g, heap.front().j)) {
        heap.push_back(e);
        std::push_heap(heap.begin(), heap.end(), worse);
        continue;
      }
    }
    out_idx[n] = e.j;
    out_gain[n] = e.g;
    ++n;
    const float* col = simT + e.j * M;
    for (int64_t r = 0; r < R; ++r) cur[r] = std::max(cur[r], col[r]);
  }
}

std::tuple<at::Tensor, at::Tensor> coverage_select(const at::Tensor& sim, int64_t k,
                                                   const std::optional<at::Tensor>& k_per_item,
                                                   const std::optional<at::Tensor>& lengths,
                                                   const std::optional<at::Tensor>& row_lengths,
                                                   const std::optional<at::Tensor>& exclude,
                                                   bool check) {
  auto a = check_coverage_args(sim, k, k_per_item, lengths, row_lengths, exclude);
  if (check) check_coverage_values(sim, a, k_per_item, lengths, row_lengths, exclude);
  const int64_t B = a.B, M = a.M, N = a.N;
  auto idx = at::empty({B, k}, sim.options().dtype(at::kLong));
  auto gains = at::empty({B, k}, sim.options().dtype(at::kFloat));
  if (B == 0 || k == 0) return {idx, gains};
  auto lens = contiguous_or_undefined(lengths);
  auto rlens = contiguous_or_undefined(row_lengths);
  auto excl = contiguous_or_undefined(exclude);
  auto kk = contiguous_or_undefined(k_per_item);
  int64_t* pidx = idx.data_ptr<int64_t>();
  float* pg = gains.data_ptr<float>();
  auto run = [&](int64_t b) {
    const int64_t L = lens.defined() ? std::clamp<int64_t>(lens.data_ptr<int64_t>()[b], 0, N) : N;
    const int64_t R = rlens.defined() ? std::clamp<int64_t>(rlens.data_ptr<int64_t>()[b], 0, M) : M;
    const bool* ex = excl.defined() ? excl.data_ptr<bool>() + b * N : nullptr;
    std::vector<int64_t> cands;
    for (int64_t j = 0; j < L; ++j)
      if (!ex || !ex[j]) cands.push_back(j);
    const int64_t kb = std::min<int64_t>(
        kk.defined() ? std::clamp<int64_t>(kk.data_ptr<int64_t>()[b], 0, k) : k, cands.size());
    // (N, M) candidate-major copy so each gain reads one contiguous column.
    auto simT = sim[b].t().to(at::kFloat).contiguous();
    coverage_item(simT.data_ptr<float>(), M, R, cands, kb, pidx + b * k, pg + b * k, k);
  };
  if (B > 1 && at::get_num_threads() > 1) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) run(b);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) run(b);
  }
  return {idx, gains};
}

}  // namespace
}  // namespace cpu
}  // namespace kcenter
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("kcenter_select", &tokenkernels::kcenter::cpu::select);
  m.impl("kcenter_coverage_select", &tokenkernels::kcenter::cpu::coverage_select);
}
