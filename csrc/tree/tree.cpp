// tree family, CPU kernels (speculative-decoding token trees).
//
// build: every mask row is independent (walk the node's ancestors, set their bits), so rows run
//   in parallel over (tree, node) with at::parallel_for; depth falls out of the same walk. Child
//   lists need, per tree, one backward linear pass (O(n), ~1 ns a node: cheaper than any thread
//   hand-off), run in parallel over the batch. paths: leaf ranks by one prefix count per tree,
//   then every leaf writes its own path in parallel.
// attention: the prefix is split into chunks over (request, KV head, chunk) work items in
//   parallel (split-KV): each item streams 256-key blocks through two BLAS GEMMs with an online
//   softmax and no mask at all (every tree token sees the whole prefix). The tree part (n keys)
//   is a third GEMM with the packed mask applied, and a log-sum-exp merge combines it with the
//   prefix chunks. All G = H_q / H_kv query heads of a KV head share one GEMM (GQA), and
//   fp16/bf16 K/V blocks are converted to fp32 once per block.
// verify: one tree per task, in parallel over the batch (the walk itself is inherently serial);
//   the O(V) residual passes run on explicit 4-lane blocks (Lanes, below).
// select_frontier / select_tree: partial sorts per batch item, in parallel over the batch.
//
// Every argument check and option parse is in tree_args.h (shared with the CUDA adapter). Value
// checks (parents / tree_lens, prefix_lens / block_table, child links / draft tokens) are cheap
// linear passes here, so the CPU always runs them (`check` only adds verify_sampling's
// probability rows; on CUDA it costs a host sync); the walks are nevertheless guarded exactly
// as on CUDA (tree.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "tree/tree_args.h"
#include "tokenkernels/tree.h"

namespace tokenkernels {
namespace tree {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------- build

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> build(
    const at::Tensor& parents_in, const std::optional<at::Tensor>& tree_lens, bool check, c10::string_view impl) {
  const auto a = check_build_args(parents_in, tree_lens, impl);   // impl: one CPU kernel
  const int64_t B = a.B, n = a.n;
  auto parents = long_contig(parents_in);
  auto lens = opt_long_contig(tree_lens);
  validate_build_values(parents, lens, check);   // always on CPU

  const int64_t W = mask_words(n);
  auto opts = parents.options();
  auto mask = at::zeros({B, n, W}, opts.dtype(at::kInt));
  auto depth = at::zeros({B, n}, opts);
  auto first_child = at::full({B, n}, -1, opts);
  auto next_sibling = at::full({B, n}, -1, opts);
  const int64_t* par = parents.data_ptr<int64_t>();
  const int64_t* len = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  uint32_t* m = reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>());
  int64_t* dep = depth.data_ptr<int64_t>();
  int64_t* fc = first_child.data_ptr<int64_t>();
  int64_t* ns = next_sibling.data_ptr<int64_t>();

  // Mask rows and depths: one independent ancestor walk per node. A chunk gets about 64K
  // word-operations (W words to clear + the walk), so small batches stay on the calling thread:
  // waking the pool costs more than they do (n = 1024, B = 1 takes ~15 us on one core).
  const int64_t grain = std::max<int64_t>(256, (int64_t(1) << 16) / (W + 8));
  at::parallel_for(0, B * n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / n, i = r % n;
      if (i >= (len ? len[b] : n)) continue;   // padding: zero row, depth 0
      const int64_t* p = par + b * n;
      uint32_t* row = m + r * W;
      int64_t d = -1;
      for (int64_t j = i; j >= 0; j = p[j]) {
        row[j >> 5] |= 1u << (j & 31);
        ++d;
      }
      dep[r] = d;
    }
  });
  // Child lists: a backward pass per tree links children in increasing order.
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / n), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t L = len ? len[b] : n;
      const int64_t* p = par + b * n;
      int64_t* f = fc + b * n;
      int64_t* s = ns + b * n;
      for (int64_t i = L - 1; i >= 1; --i) {
        s[i] = f[p[i]];
        f[p[i]] = i;
      }
    }
  });
  return {mask, depth, first_child, next_sibling};
}

at::Tensor paths(const at::Tensor& parents_in, const at::Tensor& depth_in,
                 const at::Tensor& first_child_in, const std::optional<at::Tensor>& tree_lens,
                 int64_t max_leaves, int64_t max_depth) {
  check_paths_args(parents_in, depth_in, first_child_in, tree_lens, max_leaves, max_depth);
  const int64_t B = parents_in.size(0), n = parents_in.size(1);
  auto parents = long_contig(parents_in);
  auto depth = long_contig(depth_in);
  auto fcs = long_contig(first_child_in);
  auto lens = opt_long_contig(tree_lens);
  check_paths_values(depth, fcs, lens, max_leaves, max_depth);
  auto paths = at::full({B, max_leaves, max_depth + 1}, -1, parents.options());
  auto rank = at::full({B, n}, -1, parents.options());
  const int64_t* par = parents.data_ptr<int64_t>();
  const int64_t* dep = depth.data_ptr<int64_t>();
  const int64_t* fc = fcs.data_ptr<int64_t>();
  const int64_t* len = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  int64_t* rk = rank.data_ptr<int64_t>();
  int64_t* out = paths.data_ptr<int64_t>();
  // Leaf ranks: a prefix count per tree.
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / n), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t L = std::min(len ? len[b] : n, n);
      int64_t c = 0;
      for (int64_t i = 0; i < L; ++i)
        if (fc[b * n + i] < 0) rk[b * n + i] = c++;   // c <= max_leaves (check_paths_values)
    }
  });
  // Every leaf writes its own root-to-leaf path (chunks of 4096 nodes, as in build).
  const int64_t Dp = max_depth + 1;
  at::parallel_for(0, B * n, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (rk[r] < 0) continue;
      const int64_t b = r / n;
      int64_t* row = out + (b * max_leaves + rk[r]) * Dp;
      // effective parents (tree.h): a direct call with bad parents cannot loop or read past
      // the tree; depths outside [0, max_depth] (inconsistent inputs) are not written
      for (int64_t j = r % n; j >= 0; j = effective_parent(par[b * n + j], j)) {
        const int64_t d = dep[b * n + j];
        if (d >= 0 && d <= max_depth) row[d] = j;
      }
    }
  });
  return paths;
}

// ---------------------------------------------------------------------------------- attention

constexpr int64_t kKeyBlock = 256;   // keys per GEMM block in the prefix loop

template <typename T>
struct CacheView {
  const T* base;
  const AttnDims* d;
  const int64_t* table;   // (B, max_pages) or nullptr
  // Pointer to the D values of (request b, position pos, kv head h).
  const T* row(int64_t b, int64_t pos, int64_t h) const {
    int64_t slot;
    if (table) {
      const int64_t page = table[b * d->max_pages + pos / d->page_size];
      slot = page * d->page_size + pos % d->page_size;
    } else {
      slot = b * d->N_max + pos;
    }
    return base + (slot * d->Hkv + h) * d->D;
  }
  // Rows [pos0, pos0 + cnt) of head h as fp32 (cnt, D) into dst.
  void gather(int64_t b, int64_t h, int64_t pos0, int64_t cnt, float* dst) const {
    const int64_t D = d->D;
    for (int64_t r = 0; r < cnt; ++r) {
      const T* src = row(b, pos0 + r, h);
      float* o = dst + r * D;
      for (int64_t x = 0; x < D; ++x) o[x] = static_cast<float>(src[x]);
    }
  }
};

// (L*G, D) fp32 queries of KV head h, pre-multiplied by the softmax scale; row i*G + g is query
// token i, head h*G + g.
template <typename T>
at::Tensor gather_q(const T* q, const AttnDims& d, int64_t b, int64_t h, int64_t L, float scale) {
  const int64_t G = d.Hq / d.Hkv, D = d.D;
  auto Q = at::empty({L * G, D}, at::TensorOptions().dtype(at::kFloat));
  float* dst = Q.data_ptr<float>();
  for (int64_t i = 0; i < L; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const T* src = q + ((b * d.n + i) * d.Hq + h * G + g) * D;
      float* o = dst + (i * G + g) * D;
      for (int64_t x = 0; x < D; ++x) o[x] = static_cast<float>(src[x]) * scale;
    }
  return Q;
}

struct Chunk {
  int64_t b, h, pos0, cnt;
};

template <typename T>
void attention_cpu_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const AttnDims& d, const int64_t* P, const int64_t* Lens,
                        const int32_t* mask, const int64_t* table, float scale, at::Tensor& out,
                        at::Tensor& lse) {
  const int64_t G = d.Hq / d.Hkv, D = d.D, n = d.n, W = d.W;
  const T* qp = q.data_ptr<T>();
  CacheView<T> K{k.data_ptr<T>(), &d, table};
  CacheView<T> V{v.data_ptr<T>(), &d, table};
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto len_of = [&](int64_t b) { return Lens ? Lens[b] : n; };

  // Plan the split-KV chunks: enough work items for every thread, >= 2 key blocks each.
  int64_t total = 0;
  for (int64_t b = 0; b < d.B; ++b)
    if (len_of(b) > 0) total += P[b];
  const int64_t target = 4 * std::max<int64_t>(1, at::get_num_threads());
  int64_t chunk = std::max<int64_t>(2 * kKeyBlock, (total * d.Hkv + target - 1) / target);
  chunk = (chunk + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  std::vector<Chunk> chunks;
  std::vector<int64_t> first(d.B * d.Hkv + 1, 0);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hkv; ++h) {
      first[b * d.Hkv + h] = static_cast<int64_t>(chunks.size());
      if (len_of(b) > 0)
        for (int64_t s = 0; s < P[b]; s += chunk) chunks.push_back({b, h, s, std::min(chunk, P[b] - s)});
    }
  first[d.B * d.Hkv] = static_cast<int64_t>(chunks.size());
  const int64_t R = n * G;   // rows per (request, KV head)
  const int64_t C = static_cast<int64_t>(chunks.size());
  auto part_o = at::empty({std::max<int64_t>(C, 1), R, D}, f32);
  auto part_lse = at::empty({std::max<int64_t>(C, 1), R}, f32);

  // Prefix chunks: no mask, online softmax over 256-key blocks.
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    auto Kb = at::empty({kKeyBlock, D}, f32);
    auto Vb = at::empty({kKeyBlock, D}, f32);
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t rows = len_of(ch.b) * G;
      auto Q = gather_q(qp, d, ch.b, ch.h, len_of(ch.b), scale);
      auto m = at::full({rows}, kNegInf, f32);
      auto l = at::zeros({rows}, f32);
      auto o = part_o[c].narrow(0, 0, rows);
      o.zero_();
      for (int64_t s = 0; s < ch.cnt; s += kKeyBlock) {
        const int64_t kn = std::min(kKeyBlock, ch.cnt - s);
        K.gather(ch.b, ch.h, ch.pos0 + s, kn, Kb.data_ptr<float>());
        V.gather(ch.b, ch.h, ch.pos0 + s, kn, Vb.data_ptr<float>());
        auto kb = Kb.narrow(0, 0, kn), vb = Vb.narrow(0, 0, kn);
        auto sc = at::mm(Q, kb.t());                           // (rows, kn)
        auto m_new = at::maximum(m, sc.amax(1));
        auto alpha = (m - m_new).exp_();                        // 0 on the first block
        sc.sub_(m_new.unsqueeze(1)).exp_();
        l.mul_(alpha).add_(sc.sum(1));
        o.mul_(alpha.unsqueeze(1)).addmm_(sc, vb);
        m = m_new;
      }
      o.div_(l.unsqueeze(1));
      part_lse[c].narrow(0, 0, rows).copy_(m + l.log());
    }
  });

  // Tree part with the mask, then the log-sum-exp merge with the prefix chunks.
  at::parallel_for(0, d.B * d.Hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / d.Hkv, h = t % d.Hkv, L = len_of(b);
      const int64_t rows = L * G;
      // padding query rows: zeros, lse = -inf
      for (int64_t i = L; i < n; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t hq = h * G + g;
          T* dst = op + ((b * n + i) * d.Hq + hq) * D;
          for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(0.0f);
          lp[(b * n + i) * d.Hq + hq] = kNegInf;
        }
      if (L == 0) continue;
      auto Q = gather_q(qp, d, b, h, L, scale);
      auto Kt = at::empty({L, D}, f32), Vt = at::empty({L, D}, f32);
      K.gather(b, h, P[b], L, Kt.data_ptr<float>());
      V.gather(b, h, P[b], L, Vt.data_ptr<float>());
      auto allowed = at::empty({L, L}, at::TensorOptions().dtype(at::kBool));
      bool* al = allowed.data_ptr<bool>();
      for (int64_t i = 0; i < L; ++i) {
        const int32_t* row = mask + (b * n + i) * W;
        for (int64_t j = 0; j < L; ++j) al[i * L + j] = mask_bit(row, j);
      }
      auto sc = at::mm(Q, Kt.t());                                   // (rows, L)
      sc.view({L, G, L}).masked_fill_(allowed.logical_not().unsqueeze(1), kNegInf);
      auto mt = sc.amax(1);
      auto mt_safe = at::where(at::isinf(mt), at::zeros_like(mt), mt);
      sc.sub_(mt_safe.unsqueeze(1)).exp_();
      auto lt = sc.sum(1);
      auto ot = at::mm(sc, Vt).div_(lt.clamp_min(1e-30f).unsqueeze(1));
      auto lse_t = mt_safe + lt.log();                                   // -inf where empty
      // merge: parts = prefix chunks of (b, h) + the tree part
      const int64_t c0 = first[t], c1 = first[t + 1];
      auto M = lse_t.clone();
      for (int64_t c = c0; c < c1; ++c) M = at::maximum(M, part_lse[c].narrow(0, 0, rows));
      auto Ms = at::where(at::isinf(M), at::zeros_like(M), M);
      auto w = (lse_t - Ms).exp_();
      auto num = ot.mul_(w.unsqueeze(1));
      auto den = w.clone();
      for (int64_t c = c0; c < c1; ++c) {
        auto wc = (part_lse[c].narrow(0, 0, rows) - Ms).exp_();
        num.addcmul_(part_o[c].narrow(0, 0, rows), wc.unsqueeze(1));
        den.add_(wc);
      }
      num.div_(den.clamp_min(1e-30f).unsqueeze(1));
      auto lse_all = Ms + den.log();
      const float* nm = num.template data_ptr<float>();
      const float* la = lse_all.template data_ptr<float>();
      for (int64_t i = 0; i < L; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = i * G + g, hq = h * G + g;
          T* dst = op + ((b * n + i) * d.Hq + hq) * D;
          for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(nm[r * D + x]);
          lp[(b * n + i) * d.Hq + hq] = la[r];
        }
    }
  });
}

// After check_attention_args / check_attention_out_args (impl: one CPU kernel).
void run_attention(const AttnDims& d, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                   const at::Tensor& prefix_lens, const at::Tensor& mask_in,
                   const std::optional<at::Tensor>& tree_lens, const std::optional<at::Tensor>& block_table,
                   double scale, bool check, const at::Tensor& out, const at::Tensor& lse) {
  auto P = long_contig(prefix_lens);
  auto Lens = opt_long_contig(tree_lens);
  auto table = opt_long_contig(block_table);
  validate_attention_values(d, P, Lens, table, check);   // always on CPU
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor o = out, l = lse;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_cpu", [&] {
    attention_cpu_impl<scalar_t>(q, k, v, d, P.data_ptr<int64_t>(),
                                 Lens.defined() ? Lens.data_ptr<int64_t>() : nullptr,
                                 mask.data_ptr<int32_t>(),
                                 table.defined() ? table.data_ptr<int64_t>() : nullptr,
                                 static_cast<float>(scale), o, l);
  });
}

void attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_lens,
                   const at::Tensor& mask, const std::optional<at::Tensor>& tree_lens,
                   const std::optional<at::Tensor>& block_table, double scale, bool check, c10::string_view impl,
                   const at::Tensor& out, const at::Tensor& lse) {
  const auto d = check_attention_args(q, k, v, prefix_lens, mask, tree_lens, block_table, impl);
  check_attention_out_args(q, d, out, lse);
  run_attention(d, q, k, v, prefix_lens, mask, tree_lens, block_table, scale, check, out, lse);
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& prefix_lens, const at::Tensor& mask,
                                             const std::optional<at::Tensor>& tree_lens,
                                             const std::optional<at::Tensor>& block_table, double scale, bool check,
                                             c10::string_view impl) {
  const auto d = check_attention_args(q, k, v, prefix_lens, mask, tree_lens, block_table, impl);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({d.B, d.n, d.Hq}, q.options().dtype(at::kFloat));
  run_attention(d, q, k, v, prefix_lens, mask, tree_lens, block_table, scale, check, out, lse);
  return {out, lse};
}

// ------------------------------------------------------------------------------------- verify

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy(
    const at::Tensor& first_child_in, const at::Tensor& next_sibling_in, const at::Tensor& draft_in,
    const at::Tensor& argmax_in, int64_t max_depth, bool check) {
  check_verify_greedy_args(first_child_in, next_sibling_in, draft_in, argmax_in, max_depth);
  const int64_t B = first_child_in.size(0), n = first_child_in.size(1);
  auto fcs = long_contig(first_child_in), nss = long_contig(next_sibling_in);
  auto draft = long_contig(draft_in), am = long_contig(argmax_in);
  validate_greedy_values(fcs, nss, check);   // always on CPU
  auto opts = fcs.options();
  auto accepted = at::full({B, max_depth + 1}, -1, opts);
  auto accept_len = at::empty({B}, opts);
  auto bonus = at::empty({B}, opts);
  const int64_t *fc = fcs.data_ptr<int64_t>(), *ns = nss.data_ptr<int64_t>();
  const int64_t *dt = draft.data_ptr<int64_t>(), *ta = am.data_ptr<int64_t>();
  int64_t *acc = accepted.data_ptr<int64_t>(), *al = accept_len.data_ptr<int64_t>(), *bo = bonus.data_ptr<int64_t>();
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * n;
      int64_t* row = acc + b * (max_depth + 1);
      int64_t u = 0, k = 0;
      row[0] = 0;
      while (k < max_depth) {
        const int64_t want = ta[o + u];
        int64_t c = fc[o + u], prev = u;
        while (link_ok(c, prev, n) && dt[o + c] != want) {
          prev = c;
          c = ns[o + c];
        }
        if (!link_ok(c, prev, n)) break;
        row[++k] = c;
        u = c;
      }
      al[b] = k;
      bo[b] = ta[o + u];
    }
  });
  return {accepted, accept_len, bonus};
}

// The O(V) passes of verify_sampling work on 4-blocks of a row (Lanes: entries x .. x + 3, as two
// SSE2 pairs of doubles on x86-64, four plain doubles elsewhere: the same lane-wise arithmetic;
// on x86-64 both forms give the same bits, NaN / inf / subnormal / -0 entries included). Every
// sum keeps four lane sums, lane j taking entries j, j + 4, j + 8, ... in increasing order, the
// tail (V % 4 entries) going into lane 0, and ends as (s0 + s1) + (s2 + s3). The lanes are
// explicit because the compiler may not reassociate the scalar form of these sums, and its own
// vectorisation of that form (or none, with a conditional load or a pos_part branch per entry)
// made RSD's update pass ~10x slower than SpecInfer's.
#if defined(__SSE2__)
struct Lanes {
  __m128d lo, hi;   // entries x, x + 1 and x + 2, x + 3
};
inline Lanes lanes_zero() { return {_mm_setzero_pd(), _mm_setzero_pd()}; }
inline Lanes lanes_load(const double* p) { return {_mm_loadu_pd(p), _mm_loadu_pd(p + 2)}; }
inline Lanes lanes_load(const float* p) {
  const __m128 f = _mm_loadu_ps(p);
  return {_mm_cvtps_pd(f), _mm_cvtps_pd(_mm_movehl_ps(f, f))};
}
inline Lanes lanes_set(double a, double b, double c, double d) { return {_mm_set_pd(b, a), _mm_set_pd(d, c)}; }
inline void lanes_store(double* p, Lanes v) {
  _mm_storeu_pd(p, v.lo);
  _mm_storeu_pd(p + 2, v.hi);
}
inline Lanes operator+(Lanes a, Lanes b) { return {_mm_add_pd(a.lo, b.lo), _mm_add_pd(a.hi, b.hi)}; }
inline Lanes operator-(Lanes a, Lanes b) { return {_mm_sub_pd(a.lo, b.lo), _mm_sub_pd(a.hi, b.hi)}; }
inline Lanes operator*(Lanes a, double c) {
  const __m128d m = _mm_set1_pd(c);
  return {_mm_mul_pd(a.lo, m), _mm_mul_pd(a.hi, m)};
}
// pos_part lane-wise (NaN -> 0, -0 -> +0): keep the lanes that are > 0
inline __m128d pos_part2(__m128d v) { return _mm_and_pd(v, _mm_cmpgt_pd(v, _mm_setzero_pd())); }
inline Lanes lanes_pos_part(Lanes a) { return {pos_part2(a.lo), pos_part2(a.hi)}; }
inline void lanes_get(Lanes a, double* out) {
  _mm_storeu_pd(out, a.lo);
  _mm_storeu_pd(out + 2, a.hi);
}
inline Lanes lanes_add0(Lanes a, double v) { return {_mm_add_sd(a.lo, _mm_set_sd(v)), a.hi}; }   // lane 0 += v
#else
struct Lanes {
  double v[4];
};
inline Lanes lanes_zero() { return {{0, 0, 0, 0}}; }
template <typename F>
inline Lanes lanes_load(const F* p) { return {{double(p[0]), double(p[1]), double(p[2]), double(p[3])}}; }
inline Lanes lanes_set(double a, double b, double c, double d) { return {{a, b, c, d}}; }
inline void lanes_store(double* p, Lanes a) { std::memcpy(p, a.v, sizeof a.v); }
inline Lanes operator+(Lanes a, Lanes b) { return {{a.v[0] + b.v[0], a.v[1] + b.v[1], a.v[2] + b.v[2], a.v[3] + b.v[3]}}; }
inline Lanes operator-(Lanes a, Lanes b) { return {{a.v[0] - b.v[0], a.v[1] - b.v[1], a.v[2] - b.v[2], a.v[3] - b.v[3]}}; }
inline Lanes operator*(Lanes a, double c) { return {{a.v[0] * c, a.v[1] * c, a.v[2] * c, a.v[3] * c}}; }
inline Lanes lanes_pos_part(Lanes a) {
  return {{pos_part(a.v[0]), pos_part(a.v[1]), pos_part(a.v[2]), pos_part(a.v[3])}};
}
inline void lanes_get(Lanes a, double* out) { std::memcpy(out, a.v, sizeof a.v); }
inline Lanes lanes_add0(Lanes a, double v) {   // lane 0 += v
  a.v[0] += v;
  return a;
}
#endif
inline double lanes_total(Lanes a) {
  double s[4];
  lanes_get(a, s);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Probability entry -> double, exact (Half / BFloat16 through c10's conversions).
template <typename T>
inline double prob_to_double(const T* src, int64_t x) { return static_cast<double>(src[x]); }

// entries x .. x + 3 of src in double
template <typename T>
inline Lanes lanes_at(const T* src, int64_t x) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>)
    return lanes_load(src + x);
  else
    return lanes_set(prob_to_double(src, x), prob_to_double(src, x + 1), prob_to_double(src, x + 2),
                     prob_to_double(src, x + 3));
}

// dst <- src (V entries) in double; returns their sum
template <typename T>
double load_row(const T* src, double* dst, int64_t V) {
  Lanes s = lanes_zero();
  int64_t x = 0;
  for (; x + 4 <= V; x += 4) {
    const Lanes v = lanes_at(src, x);
    lanes_store(dst + x, v);
    s = s + v;
  }
  for (; x < V; ++x) s = lanes_add0(s, dst[x] = prob_to_double(src, x));
  return lanes_total(s);
}

// SpecInfer's residual update: tmp <- max(r * inv - q, 0) (inv = 1 / S); returns its sum. Q: the
// draft row's element type, float or double (Half / BFloat16 rows are converted to double once
// per node first, not once per rejection).
template <typename Q>
double specinfer_residual(const double* __restrict__ r, const Q* __restrict__ q, double inv,
                          double* __restrict__ tmp, int64_t V) {
  Lanes s = lanes_zero();
  int64_t x = 0;
  for (; x + 4 <= V; x += 4) {
    const Lanes v = lanes_pos_part(lanes_at(r, x) * inv - lanes_at(q, x));
    lanes_store(tmp + x, v);
    s = s + v;
  }
  for (; x < V; ++x) s = lanes_add0(s, tmp[x] = pos_part(r[x] * inv - static_cast<double>(q[x])));
  return lanes_total(s);
}

// RSD's update after rejecting token t (0 <= t < V), one pass: tmp <- max(r * inv - qr * qinv, 0)
// (inv = 1 / S, qinv = 1 / Q; returns its sum) and *qsum <- the sum of qr without entry t. Only
// the 4-block holding t masks it out (no index compare per entry).
inline double rsd_residual(const double* __restrict__ r, const double* __restrict__ qr, double inv, double qinv,
                           int64_t t, double* __restrict__ tmp, int64_t V, double* qsum) {
  Lanes s = lanes_zero(), qs = lanes_zero();
  const int64_t V4 = V - V % 4, tb = t < V4 ? t - t % 4 : V4;   // tb: the 4-block holding t
  int64_t x = 0;
  auto blocks = [&](int64_t x1) {   // the update of the 4-blocks [x, x1)
    for (; x < x1; x += 4) {
      const Lanes qv = lanes_at(qr, x);
      const Lanes v = lanes_pos_part(lanes_at(r, x) * inv - qv * qinv);
      lanes_store(tmp + x, v);
      s = s + v;
      qs = qs + qv;
    }
  };
  blocks(tb);
  if (tb < V4) {   // t's block: its qr entry counts as 0 in qs
    double qv[4] = {qr[tb], qr[tb + 1], qr[tb + 2], qr[tb + 3]};
    const Lanes v = lanes_pos_part(lanes_at(r, tb) * inv - lanes_load(qv) * qinv);
    lanes_store(tmp + tb, v);
    s = s + v;
    qv[t - tb] = 0.0;
    qs = qs + lanes_load(qv);
    x = tb + 4;
    blocks(V4);
  }
  for (x = V4; x < V; ++x) {
    const double qv = qr[x];
    s = lanes_add0(s, tmp[x] = pos_part(r[x] * inv - qv * qinv));
    qs = lanes_add0(qs, x == t ? 0.0 : qv);
  }
  *qsum = lanes_total(qs);
  return lanes_total(s);
}

// TP / TQ: the element types of target_probs / draft_probs (TQ = TP without draft_probs).
template <typename TP, typename TQ>
void verify_sampling_impl(const int64_t* fc, const int64_t* ns, const int64_t* dt, const TP* pt, const TQ* pq,
                          const double* cn, const double* bv, int64_t B, int64_t n, int64_t V, int64_t max_depth,
                          VerifyMode mode, int64_t* acc, int64_t* al, int64_t* bo) {
  const bool rsd = mode == VerifyMode::Rsd && pq;   // (without draft_probs the two rules coincide)
  // SpecInfer reads float / double draft rows in place; Half / BFloat16 ones are converted into
  // qbuf at the node's first rejection (exact, so the results are those of reading in place)
  constexpr bool q_in_place = std::is_same_v<TQ, float> || std::is_same_v<TQ, double>;
  const bool need_qbuf = pq && (rsd || !q_in_place);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> rbuf(V), tbuf(V), qbuf(need_qbuf ? V : 0);
    double* r = rbuf.data();
    double* tmp = tbuf.data();
    // RSD: the draft residual (unnormalised; Q its sum), see tree.h. SpecInfer on Half /
    // BFloat16: the current node's draft row in double (q_node: the node it holds, -1 none).
    double* qr = qbuf.data();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * n;
      int64_t* row = acc + b * (max_depth + 1);
      int64_t u = 0, k = 0, q_node = -1;
      row[0] = 0;
      // residual <- target_probs[b, node]; returns its sum
      auto load = [&](int64_t node) { return load_row(pt + (o + node) * V, r, V); };
      // RSD: qr <- draft_probs[b, node]; returns its sum
      auto load_q = [&](int64_t node) { return rsd ? load_row(pq + (o + node) * V, qr, V) : 0.0; };
      double S = load(0), Q = load_q(0);
      while (true) {
        int64_t c = fc[o + u], prev = u, got = -1;
        // (links and tokens are validated up front; the guards mirror the CUDA kernel)
        while (residual_usable(S) && link_ok(c, prev, n)) {
          const int64_t t = dt[o + c];
          const double coin = cn[o + c];
          const bool in_vocab = t >= 0 && t < V;   // else: never accepted, residuals unchanged
          // RSD: q_{i-1}(t) = qr[t] / Q; a token without draft-residual mass is a deterministic
          // candidate (the one-hot rule below, q unchanged)
          const double qinv = rsd && residual_usable(Q) ? 1.0 / Q : 0.0;
          const double q_t = rsd && in_vocab ? qr[t] * qinv : 0.0;
          if (in_vocab && rsd && q_t > 0) {
            if (accept_with_q(coin, q_t, r[t], S)) { got = c; break; }
            // p <- max(p - q_{i-1}, 0) (kept only if it has mass), and in the same pass the sum
            // of q without t: q_i = q_{i-1} with t removed
            double qsum;
            const double s2 = rsd_residual(r, qr, 1.0 / S, qinv, t, tmp, V, &qsum);
            if (s2 > 0) {
              std::swap(r, tmp);
              S = s2;
            }
            qr[t] = 0;
            Q = qsum;
          } else if (in_vocab && pq && !rsd) {
            const TQ* q = pq + (o + u) * V;
            if (accept_with_q(coin, prob_to_double(q, t), r[t], S)) { got = c; break; }
            // residual <- max(p - q, 0) with p = r / S (kept unnormalised; S is its sum), one
            // pass into the spare buffer, kept only if it has mass (rounding can empty it)
            double s2;
            if constexpr (q_in_place) {
              s2 = specinfer_residual(r, q, 1.0 / S, tmp, V);
            } else {
              if (q_node != u) {
                load_row(q, qr, V);
                q_node = u;
              }
              s2 = specinfer_residual(r, static_cast<const double*>(qr), 1.0 / S, tmp, V);
            }
            if (s2 > 0) {
              std::swap(r, tmp);
              S = s2;
            }
          } else if (in_vocab) {
            if (accept_one_hot(coin, r[t], S)) { got = c; break; }
            if (S - r[t] > 0) {
              S = S - r[t];
              r[t] = 0;
            }
          }
          prev = c;
          c = ns[o + c];
        }
        if (got < 0 || k >= max_depth) break;
        row[++k] = got;
        u = got;
        S = load(u);
        Q = load_q(u);
      }
      al[b] = k;
      // bonus ~ residual, by inverse CDF: first x with running sum > u * S; if none (rounding,
      // or a residual without usable mass), the last positive entry (0 if none)
      int64_t pick = -1, last_pos = 0;
      if (residual_usable(S)) {
        const double thr = bv[b] * S;
        double run = 0;
        for (int64_t x = 0; x < V; ++x) {
          run += r[x];
          if (run > thr) { pick = x; break; }
        }
      }
      if (pick < 0)
        for (int64_t x = 0; x < V; ++x)
          if (r[x] > 0) last_pos = x;
      bo[b] = pick >= 0 ? pick : last_pos;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sampling(
    const at::Tensor& first_child_in, const at::Tensor& next_sibling_in, const at::Tensor& draft_in,
    const at::Tensor& target_probs_in, const std::optional<at::Tensor>& draft_probs_in,
    const at::Tensor& coins_in, const at::Tensor& bonus_u_in, int64_t max_depth, bool check,
    c10::string_view mode) {
  const auto dims = check_verify_sampling_args(first_child_in, next_sibling_in, draft_in, target_probs_in,
                                               draft_probs_in, coins_in, bonus_u_in, max_depth, mode);
  const int64_t B = dims.B, n = dims.n, V = dims.V;
  auto fcs = long_contig(first_child_in), nss = long_contig(next_sibling_in), draft = long_contig(draft_in);
  // links and tokens always on CPU, probability rows with check
  validate_sampling_values(fcs, nss, draft, target_probs_in, draft_probs_in, V, check);
  // Probabilities are read in their own dtypes, each row when it is visited (converting the whole
  // (B, n, V) tensors would cost more than the verification); arithmetic is in double.
  auto tp = target_probs_in.contiguous();
  auto dp = draft_probs_in.has_value() ? draft_probs_in->contiguous() : at::Tensor();
  auto coins = coins_in.to(at::kDouble).contiguous(), bu = bonus_u_in.to(at::kDouble).contiguous();
  auto opts = fcs.options();
  auto accepted = at::full({B, max_depth + 1}, -1, opts);
  auto accept_len = at::empty({B}, opts);
  auto bonus = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tp.scalar_type(), "tree_verify_sampling_cpu", [&] {
    using TP = scalar_t;
    const auto q_type = dp.defined() ? dp.scalar_type() : tp.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_type, "tree_verify_sampling_cpu", [&] {
      verify_sampling_impl<TP, scalar_t>(fcs.data_ptr<int64_t>(), nss.data_ptr<int64_t>(),
                                         draft.data_ptr<int64_t>(), tp.data_ptr<TP>(),
                                         dp.defined() ? dp.data_ptr<scalar_t>() : nullptr, coins.data_ptr<double>(),
                                         bu.data_ptr<double>(), B, n, V, max_depth, dims.mode,
                                         accepted.data_ptr<int64_t>(), accept_len.data_ptr<int64_t>(),
                                         bonus.data_ptr<int64_t>());
    });
  });
  return {accepted, accept_len, bonus};
}

// ------------------------------------------------------------------------------ dynamic trees

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_frontier(const at::Tensor& cum_in, const at::Tensor& child_in,
                                                               int64_t m) {
  const auto dims = check_select_frontier_args(cum_in, child_in, m);
  const int64_t B = dims.B, F = dims.F, K = dims.K;
  auto cum = cum_in.to(at::kFloat).contiguous(), child = child_in.to(at::kFloat).contiguous();
  auto lopt = cum.options().dtype(at::kLong);
  auto parent = at::empty({B, m}, lopt), rank = at::empty({B, m}, lopt), score = at::empty({B, m}, cum.options());
  const float *cp = cum.data_ptr<float>(), *kp = child.data_ptr<float>();
  int64_t *po = parent.data_ptr<int64_t>(), *ro = rank.data_ptr<int64_t>();
  float* so = score.data_ptr<float>();
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(F * K);
    std::vector<int64_t> idx(F * K);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t f = 0; f < F; ++f)
        for (int64_t k = 0; k < K; ++k) s[f * K + k] = cp[b * F + f] + kp[(b * F + f) * K + k];
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + m, idx.end(),
                        [&](int64_t a, int64_t c) { return rank_before(s[a], a, s[c], c); });
      for (int64_t j = 0; j < m; ++j) {
        po[b * m + j] = idx[j] / K;
        ro[b * m + j] = idx[j] % K;
        so[b * m + j] = s[idx[j]];
      }
    }
  });
  return {parent, rank, score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_tree(const at::Tensor& cum_in, const at::Tensor& parents_in,
                                                           int64_t n) {
  const auto dims = check_select_tree_args(cum_in, parents_in, n);
  const int64_t B = dims.B, T = dims.T;
  auto cum = cum_in.to(at::kFloat).contiguous();
  auto parents = long_contig(parents_in);
  validate_select_tree_values(parents);
  auto lopt = parents.options();
  auto idx = at::empty({B, n}, lopt), newp = at::empty({B, n}, lopt), score = at::empty({B, n}, cum.options());
  const float* cp = cum.data_ptr<float>();
  const int64_t* pp = parents.data_ptr<int64_t>();
  int64_t *io = idx.data_ptr<int64_t>(), *npo = newp.data_ptr<int64_t>();
  float* so = score.data_ptr<float>();
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(T), pos(T);
    for (int64_t b = b0; b < b1; ++b) {
      const float* s = cp + b * T;
      const int64_t* p = pp + b * T;
      std::iota(order.begin(), order.end(), 0);
      // the root first, then by score (ties: lower index)
      std::partial_sort(order.begin(), order.begin() + n, order.end(), [&](int64_t a, int64_t c) {
        if (a == 0 || c == 0) return a == 0 && c != 0;
        return rank_before(s[a], a, s[c], c);
      });
      std::sort(order.begin(), order.begin() + n);
      std::fill(pos.begin(), pos.end(), -1);
      for (int64_t r = 0; r < n; ++r) pos[order[r]] = r;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t j = order[r];
        int64_t a = j > 0 ? p[j] : -1;
        while (a >= 0 && pos[a] < 0) a = p[a];   // nearest kept ancestor
        io[b * n + r] = j;
        npo[b * n + r] = a >= 0 ? pos[a] : -1;
        so[b * n + r] = s[j];
      }
    }
  });
  return {idx, newp, score};
}

}  // namespace
}  // namespace cpu
}  // namespace tree
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("tree_build", &tokenkernels::tree::cpu::build);
  m.impl("tree_paths", &tokenkernels::tree::cpu::paths);
  m.impl("tree_attention", &tokenkernels::tree::cpu::attention);
  m.impl("tree_attention_out", &tokenkernels::tree::cpu::attention_out);
  m.impl("tree_verify_greedy", &tokenkernels::tree::cpu::verify_greedy);
  m.impl("tree_verify_sampling", &tokenkernels::tree::cpu::verify_sampling);
  m.impl("tree_select_frontier", &tokenkernels::tree::cpu::select_frontier);
  m.impl("tree_select_tree", &tokenkernels::tree::cpu::select_tree);
}
