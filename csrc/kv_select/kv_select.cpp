// kv_select family, CPU kernels.
//
// score: per (request, KV head, 512-token chunk) task, every key is read once (converted to fp32
//   on the fly from any stride / fp16 / bf16) and dotted with the G query heads of its group; the
//   chunk's logits are turned into exp(l - chunk max) in place (one exp per head and token) and
//   the chunk's (max, sum) kept. A light pass combines the chunk statistics into each head's
//   log-sum-exp, and the final pass sums exp(l - lse) = e * exp(chunk max - lse) over heads with
//   one multiply per element. Memory traffic: K once, plus a (B, H_q, N) fp32 scratch.
// topk: per request, one nth_element over packed (score, ~index) 64-bit keys of the middle
//   region finds the k-th best key; a single ascending scan then emits sink, selected middle and
//   local tokens, so the output is sorted without sorting.
// sparse_decode: split-KV flash-decoding over the gathered indices: each (request, KV head,
//   split) task computes logits for the G heads of its group, exp, and the weighted V sum, then
//   the splits are merged by log-sum-exp.
// sparse_prefill: per request and query block, the selected past K/V and the chunk's own K/V
//   are gathered once to fp32 and attended with batched GEMMs (BLAS) under a causal mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kv_select/kv_select_args.h"
#include "kv_select/kv_select_cpu.h"
#include "tokenkernels/kv_select.h"

namespace tokenkernels {
namespace kv_select {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 512;   // tokens per score task

// Calls f(T{}) with T = float, c10::Half or c10::BFloat16 (the cache dtypes; checked before).
template <typename F>
void dispatch_kv(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "tokenkernels.kv_select: unsupported dtype ", t);
  }
}

// ---------------------------------------------------------------------------------- score
template <typename T>
void score_kernel(const KVLayout& L, const T* kbase, const CacheStrides& ks, const float* qm,
                  int64_t H_q, const bool* skip, const bool* valid, float* out) {
  const int64_t B = L.B, N = L.N_max, H_kv = L.H_kv, D = L.D, G = H_q / H_kv;
  const int64_t nch = std::max<int64_t>(1, (N + kChunk - 1) / kChunk);
  // Token-major scratch: e[b][n][h] = exp(l - chunk max of head h); all heads of a token are
  // contiguous, so pass 1 writes and pass 3 reads whole lines.
  std::vector<float> logits(static_cast<size_t>(B * N * H_q));
  std::vector<float> cmax(static_cast<size_t>(B * H_q * nch), -kInf), csum(cmax.size(), 0.0f);
  auto len = [&](int64_t b) { return (skip && skip[b]) ? int64_t(0) : seq_len(L, b); };

  // Pass 1: logits and chunk statistics. Task = (b, chunk): each token's row of all KV heads is
  // read once, front to back (contiguous in both layouts), and scored against every q-head.
  at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kbuf(D), mx(H_q), sums(H_q), msub(H_q);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % nch, b = t / nch;
      const int64_t n0 = c * kChunk, n1 = std::min(len(b), n0 + kChunk);
      if (n0 >= n1) continue;
      float* E = logits.data() + (b * N + n0) * H_q;   // token n, head h: E[(n - n0) * H_q + h]
      std::fill(mx.begin(), mx.end(), -kInf);
      for (int64_t n = n0; n < n1; ++n) {
        float* row = E + (n - n0) * H_q;
        const int64_t off = (valid && !valid[b * N + n]) ? -1 : token_offset(L, ks, b, n);
        if (off < 0) {   // masked out, or page out of range (unchecked input): no weight
          for (int64_t h = 0; h < H_q; ++h) row[h] = -kInf;
          continue;
        }
        for (int64_t g = 0; g < H_kv; ++g)
          cpu::dots_row(qm + (b * H_q + g * G) * D, G, kbase + off + g * ks.head, ks.dim, D,
                        kbuf.data(), row + g * G);
        for (int64_t h = 0; h < H_q; ++h) mx[h] = std::max(mx[h], row[h]);
      }
      for (int64_t h = 0; h < H_q; ++h) msub[h] = mx[h] == -kInf ? 0.0f : mx[h];
      cpu::exp_sub_rows(E, n1 - n0, H_q, msub.data(), sums.data());
      for (int64_t h = 0; h < H_q; ++h) {
        const size_t si = static_cast<size_t>((b * H_q + h) * nch + c);
        cmax[si] = mx[h];
        csum[si] = mx[h] == -kInf ? 0.0f : sums[h];
      }
    }
  });
  // Pass 2: per (b, h) log-sum-exp; then fold it into per-chunk factors exp(cmax - lse).
  // (B * H_q * chunks values: a few microseconds, so no parallel region -- on a shared machine
  // every region's barrier can cost a scheduler tick.)
  for (int64_t r = 0; r < B * H_q; ++r) {
    float* cm = cmax.data() + r * nch;
    const float* cs = csum.data() + r * nch;
    float M = -kInf;
    for (int64_t c = 0; c < nch; ++c) M = std::max(M, cm[c]);
    double S = 0.0;
    for (int64_t c = 0; c < nch; ++c)
      if (cm[c] != -kInf) S += double(cs[c]) * std::exp(double(cm[c]) - double(M));
    for (int64_t c = 0; c < nch; ++c)
      cm[c] = (cm[c] == -kInf || S == 0.0) ? 0.0f
                                           : static_cast<float>(std::exp(double(cm[c]) - double(M)) / S);
  }
  // Pass 3: score_n = sum_h e[n][h] * factor[h][chunk(n)] (a dot over the token's H_q values);
  // -inf past the valid length.
  at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> f(H_q);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % nch, b = t / nch;
      const int64_t n0 = c * kChunk, n1e = std::min(N, n0 + kChunk);
      const int64_t n1 = std::min(len(b), n1e);
      float* o = out + b * N;
      for (int64_t h = 0; h < H_q; ++h) f[h] = cmax[(b * H_q + h) * nch + c];
      const float* E = logits.data() + b * N * H_q;
      for (int64_t n = n0; n < n1; ++n) {
        if (valid && !valid[b * N + n]) o[n] = -kInf;   // masked out: never a candidate
        else cpu::dots(f.data(), 1, E + n * H_q, H_q, o + n);
      }
      for (int64_t n = std::max(n0, n1); n < n1e; ++n) o[n] = -kInf;
    }
  });
}

at::Tensor score_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& seq_lens,
                     const std::optional<at::Tensor>& block_table, double scale,
                     const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& valid,
                     bool /*check: always on the CPU*/, c10::string_view impl) {
  parse_impl(impl, kScoreOp);   // validated; the CPU has one implementation
  ScoreArgs a = check_score(q, k_cache, seq_lens, block_table, skip, valid, true);
  const int64_t B = q.size(0);
  auto out = at::empty({B, a.meta.layout.N_max}, q.options().dtype(at::kFloat));
  if (B == 0 || a.meta.layout.N_max == 0) return out;
  if (q.dim() == 4 && q.size(1) == 0) return out.fill_(-kInf);
  auto qm = scaled_query(q, scale, true);
  dispatch_kv(k_cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    score_kernel<scalar_t>(a.meta.layout, k_cache.data_ptr<scalar_t>(), strides_of(k_cache),
                           qm.data_ptr<float>(), a.H_q,
                           a.skip.defined() ? a.skip.data_ptr<bool>() : nullptr,
                           a.valid.defined() ? a.valid.data_ptr<bool>() : nullptr, out.data_ptr<float>());
  });
  return out;
}

// ---------------------------------------------------------------------------------- topk
inline uint32_t ordered(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (seq_lens were validated by check_topk: within [0, N].)
void topk_impl(const at::Tensor& scores_in, int64_t k, const TopkArgs& a, int64_t n_sink,
               int64_t n_local, at::Tensor& out) {
  const int64_t B = scores_in.size(0), N = scores_in.size(1), W = a.width;
  if (B == 0 || W == 0) return;
  auto scores = scores_in.contiguous();
  const int32_t* s = a.seq_lens.data_ptr<int32_t>();
  const at::Tensor& ru = a.reuse;
  const at::Tensor& rm = a.reuse_mask;
  const float* sc = scores.data_ptr<float>();
  int32_t* o = out.data_ptr<int32_t>();
  // One request per task; a single request runs inline (no parallel region for one task).
  at::parallel_for(0, B, 2, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> keys;
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* ob = o + b * W;
      const int64_t L = s[b];
      int64_t w = 0;
      if (L <= W) {
        for (; w < L; ++w) ob[w] = static_cast<int32_t>(w);
      } else {
        const int64_t lo = n_sink, hi = L - n_local;
        for (int64_t n = 0; n < lo; ++n) ob[w++] = static_cast<int32_t>(n);
        if (rm.defined() && rm.data_ptr<bool>()[b]) {
          // Cache hit: the previous middle picks, restricted to the current middle region;
          // an entry is kept when it exceeds the last kept one (ascending input: duplicates
          // dropped; any input: the output stays ascending). The CUDA kernel keeps the same.
          const int32_t* r = ru.data_ptr<int32_t>() + b * k;
          int64_t last = -1;
          for (int64_t j = 0; j < k; ++j)
            if (r[j] >= lo && r[j] < hi && r[j] > last) { ob[w++] = r[j]; last = r[j]; }
        } else if (k > 0) {
          const float* row = sc + b * N;
          keys.resize(static_cast<size_t>(hi - lo));
          for (int64_t n = lo; n < hi; ++n)
            keys[n - lo] = (uint64_t(ordered(row[n])) << 32) | uint64_t(~static_cast<uint32_t>(n));
          std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint64_t>());
          const uint64_t thr = keys[k - 1];
          for (int64_t n = lo; n < hi; ++n) {
            const uint64_t key = (uint64_t(ordered(row[n])) << 32) | uint64_t(~static_cast<uint32_t>(n));
            if (key >= thr) ob[w++] = static_cast<int32_t>(n);
          }
        }
        for (int64_t n = hi; n < L; ++n) ob[w++] = static_cast<int32_t>(n);
      }
      for (; w < W; ++w) ob[w] = -1;
    }
  });
}

at::Tensor topk_cpu(const at::Tensor& scores, int64_t k, const at::Tensor& seq_lens, int64_t n_sink,
                    int64_t n_local, const std::optional<at::Tensor>& reuse,
                    const std::optional<at::Tensor>& reuse_mask, bool /*check: always on the CPU*/,
                    c10::string_view impl) {
  parse_impl(impl, kTopkOp);   // validated, one CPU implementation
  TopkArgs a = check_topk(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, true);
  auto out = at::empty({scores.size(0), a.width}, scores.options().dtype(at::kInt));
  topk_impl(scores, k, a, n_sink, n_local, out);
  return out;
}

void topk_out_cpu(const at::Tensor& scores, int64_t k, const at::Tensor& seq_lens, int64_t n_sink,
                  int64_t n_local, const std::optional<at::Tensor>& reuse,
                  const std::optional<at::Tensor>& reuse_mask, bool /*check*/, at::Tensor out,
                  c10::string_view impl) {
  parse_impl(impl, kTopkOp);
  TopkArgs a = check_topk(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, true);
  check_topk_out(scores, a, out);
  topk_impl(scores, k, a, n_sink, n_local, out);
}

// ---------------------------------------------------------------------------------- decode
// Partial softmax state of one (b, h, split): max, sum of exp, unnormalised output.
template <typename T>
void decode_kernel(const KVLayout& L, const T* kb, const CacheStrides& ks, const T* vb,
                   const CacheStrides& vs, const float* q /*(B,H_q,D) scaled fp32*/, int64_t H_q,
                   const int32_t* indices, int64_t K, T* out, float* lse) {
  const int64_t B = L.B, H_kv = L.H_kv, D = L.D, G = H_q / H_kv;
  const int64_t threads = at::get_num_threads();
  // Split the index list so that there are >= 2 tasks per thread, each >= 128 indices.
  int64_t splits = std::max<int64_t>(1, (2 * threads + B - 1) / std::max<int64_t>(B, 1));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, K / 128));
  const int64_t per = (K + splits - 1) / std::max<int64_t>(splits, 1);
  std::vector<float> pm(static_cast<size_t>(B * H_q * splits), -kInf), ps(pm.size(), 0.0f);
  std::vector<float> pacc(static_cast<size_t>(B * H_q * splits * D), 0.0f);

  // Task = (b, split): each listed token's K row (all KV heads, contiguous in both layouts) is
  // read once and scored against every q-head; then each V row once, accumulated into the G
  // heads of its group.
  at::parallel_for(0, B * splits, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kbuf(D), lg, mx(H_q);
    std::vector<int64_t> offk, offv;
    float dotv[64];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t sp = t % splits, b = t / splits;
      const int64_t j0 = sp * per, j1 = std::min(K, j0 + per);
      const int64_t Lb = seq_len(L, b);
      offk.clear();
      offv.clear();
      for (int64_t j = j0; j < j1; ++j) {   // valid listed tokens (-1 / out of range skipped)
        const int32_t n = indices[b * K + j];
        if (n < 0 || n >= Lb) continue;
        const int64_t ok = token_offset(L, ks, b, n), ov = token_offset(L, vs, b, n);
        if (ok < 0 || ov < 0) continue;
        offk.push_back(ok);
        offv.push_back(ov);
      }
      const int64_t M = static_cast<int64_t>(offk.size());
      if (M == 0) continue;
      lg.resize(static_cast<size_t>(H_q * M));
      std::fill(mx.begin(), mx.end(), -kInf);
      const float* qb = q + b * H_q * D;
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t g = 0; g < H_kv; ++g) {
          for (int64_t h0 = 0; h0 < G; h0 += 64) {
            const int64_t gh = std::min<int64_t>(64, G - h0);
            cpu::dots_row(qb + (g * G + h0) * D, gh, kb + offk[i] + g * ks.head, ks.dim, D,
                          kbuf.data(), dotv);
            for (int64_t x = 0; x < gh; ++x) {
              const int64_t h = g * G + h0 + x;
              lg[h * M + i] = dotv[x];
              mx[h] = std::max(mx[h], dotv[x]);
            }
          }
        }
      }
      for (int64_t h = 0; h < H_q; ++h) {
        const size_t si = static_cast<size_t>((b * H_q + h) * splits + sp);
        pm[si] = mx[h];
        ps[si] = cpu::exp_sub_sum(lg.data() + h * M, M, mx[h]);
      }
      std::vector<float> w(4 * G);
      int64_t i = 0;
      if (vs.dim == 1) {   // four value rows per step (accumulators loaded/stored once per four)
        for (; i + 4 <= M; i += 4) {
          for (int64_t g = 0; g < H_kv; ++g) {
            const T* rows[4];
            for (int r = 0; r < 4; ++r) {
              rows[r] = vb + offv[i + r] + g * vs.head;
              for (int64_t x = 0; x < G; ++x) w[r * G + x] = lg[(g * G + x) * M + i + r];
            }
            if (!cpu::axpy4_rows(w.data(), G, rows, D, pacc.data() + ((b * H_q + g * G) * splits + sp) * D,
                                 splits * D)) {
              for (int r = 0; r < 4; ++r)
                cpu::axpy_row(w.data() + r * G, G, rows[r], vs.dim, D, kbuf.data(),
                              pacc.data() + ((b * H_q + g * G) * splits + sp) * D, splits * D);
            }
          }
        }
      }
      for (; i < M; ++i) {
        for (int64_t g = 0; g < H_kv; ++g) {
          for (int64_t x = 0; x < G; ++x) w[x] = lg[(g * G + x) * M + i];
          cpu::axpy_row(w.data(), G, vb + offv[i] + g * vs.head, vs.dim, D, kbuf.data(),
                        pacc.data() + ((b * H_q + g * G) * splits + sp) * D, splits * D);
        }
      }
    }
  });
  // Merge the splits by log-sum-exp (inline below 64 rows: tiny work, no region barrier).
  at::parallel_for(0, B * H_q, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(D);
    for (int64_t r = r0; r < r1; ++r) {
      float M = -kInf;
      for (int64_t sp = 0; sp < splits; ++sp) M = std::max(M, pm[r * splits + sp]);
      T* o = out + r * D;
      if (M == -kInf) {   // nothing to attend
        for (int64_t d = 0; d < D; ++d) o[d] = T(0.0f);
        if (lse) lse[r] = -kInf;
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float S = 0.0f;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const float m = pm[r * splits + sp];
        if (m == -kInf) continue;
        const float f = std::exp(m - M);
        S += ps[r * splits + sp] * f;
        cpu::axpy(f, pacc.data() + (r * splits + sp) * D, acc.data(), D);
      }
      const float inv = 1.0f / S;
      for (int64_t d = 0; d < D; ++d) o[d] = T(acc[d] * inv);
      if (lse) lse[r] = M + std::log(S);
    }
  });
}

void decode_run(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k_cache,
                const at::Tensor& v_cache, double scale, at::Tensor& out, at::Tensor& lse) {
  if (q.size(0) == 0 || a.H_q == 0) return;
  auto qs = scaled_query(q, scale, false);
  const at::Tensor& ix = a.indices;
  dispatch_kv(k_cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    decode_kernel<scalar_t>(a.meta.layout, k_cache.data_ptr<scalar_t>(), strides_of(k_cache),
                            v_cache.data_ptr<scalar_t>(), strides_of(v_cache), qs.data_ptr<float>(),
                            a.H_q, ix.data_ptr<int32_t>(), a.K, out.data_ptr<scalar_t>(),
                            lse.data_ptr<float>());
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                     const at::Tensor& v_cache, const at::Tensor& indices,
                                                     const at::Tensor& seq_lens,
                                                     const std::optional<at::Tensor>& block_table,
                                                     double scale, bool /*check: always on the CPU*/,
                                                     c10::string_view impl) {
  parse_impl(impl, kDecodeOp);   // validated; the CPU has one implementation
  auto a = check_attn(q, k_cache, v_cache, indices, seq_lens, nullptr, block_table, true);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), a.H_q}, q.options().dtype(at::kFloat));
  decode_run(a, q, k_cache, v_cache, scale, out, lse);
  return {out, lse};
}

void sparse_decode_out_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& indices, const at::Tensor& seq_lens,
                           const std::optional<at::Tensor>& block_table, double scale, bool /*check*/,
                           c10::string_view impl, at::Tensor out, at::Tensor lse) {
  parse_impl(impl, kDecodeOp);
  auto a = check_attn(q, k_cache, v_cache, indices, seq_lens, nullptr, block_table, true);
  check_attn_out(q, k_cache, a, out, lse);
  decode_run(a, q, k_cache, v_cache, scale, out, lse);
}

// ---------------------------------------------------------------------------------- prefill
// Gather rows `pos` of request b (all KV heads) into a (T, H_kv, D) fp32 tensor.
template <typename T>
void gather_rows(const KVLayout& L, const T* base, const CacheStrides& s, int64_t b,
                 const std::vector<int32_t>& pos, float* dst) {
  const int64_t H = L.H_kv, D = L.D;
  at::parallel_for(0, static_cast<int64_t>(pos.size()), 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t off = token_offset(L, s, b, pos[i]);
      for (int64_t h = 0; h < H; ++h) {
        float* d = dst + (i * H + h) * D;
        if (off < 0) { std::fill(d, d + D, 0.0f); continue; }   // checked inputs never get here
        const float* r = cpu::row_as_float(base + off + h * s.head, s.dim, D, d);
        if (r != d) std::copy(r, r + D, d);
      }
    }
  });
}

void prefill_run(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, double scale, at::Tensor& out, at::Tensor& lse) {
  const KVLayout& L = a.meta.layout;
  const int64_t B = q.size(0), C = a.C, H_q = a.H_q, H_kv = L.H_kv, D = L.D, G = H_q / H_kv;
  out.zero_();
  lse.fill_(-kInf);
  if (B == 0 || C == 0 || H_q == 0) return;
  const at::Tensor& ix = a.indices;
  const at::Tensor& cs = a.chunk_start;
  const auto f32 = q.options().dtype(at::kFloat);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s0 = cs.data_ptr<int32_t>()[b], Lb = seq_len(L, b);
    const int64_t c_len = std::max<int64_t>(0, std::min<int64_t>(C, Lb - s0));
    if (c_len == 0) continue;
    // Key positions: the listed past tokens (every entry counts, as in decode), then the chunk.
    std::vector<int32_t> pos;
    const int32_t* r = ix.data_ptr<int32_t>() + b * a.K;
    for (int64_t j = 0; j < a.K; ++j)
      if (r[j] >= 0 && r[j] < s0) pos.push_back(r[j]);
    const int64_t P = static_cast<int64_t>(pos.size());
    for (int64_t c = 0; c < c_len; ++c) pos.push_back(static_cast<int32_t>(s0 + c));
    const int64_t T = static_cast<int64_t>(pos.size());
    auto Kg = at::empty({T, H_kv, D}, f32), Vg = at::empty({T, H_kv, D}, f32);
    dispatch_kv(k_cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
      gather_rows<scalar_t>(L, k_cache.data_ptr<scalar_t>(), strides_of(k_cache), b, pos, Kg.data_ptr<float>());
      gather_rows<scalar_t>(L, v_cache.data_ptr<scalar_t>(), strides_of(v_cache), b, pos, Vg.data_ptr<float>());
    });
    auto Kh = Kg.permute({1, 0, 2});   // (H_kv, T, D)
    auto Vh = Vg.permute({1, 0, 2});
    // Query blocks keep the (H_kv, cb*G, T) logits around 16 MB.
    const int64_t cb = std::clamp<int64_t>((int64_t(4) << 20) / std::max<int64_t>(1, H_q * T), 1, c_len);
    for (int64_t c0 = 0; c0 < c_len; c0 += cb) {
      const int64_t c1 = std::min(c_len, c0 + cb), nc = c1 - c0, Te = P + c1;
      // (nc, H_q, D) -> (H_kv, nc*G, D), row = c*G + (h % G)
      auto Q = (q[b].narrow(0, c0, nc).to(at::kFloat) * scale)
                   .view({nc, H_kv, G, D}).permute({1, 0, 2, 3}).reshape({H_kv, nc * G, D});
      auto S = at::bmm(Q, Kh.narrow(1, 0, Te).transpose(1, 2));   // (H_kv, nc*G, Te)
      // Causal mask on the chunk part: chunk key t (position s0 + t - P) visible iff t - P <= c.
      auto crow = at::arange(c0, c1, f32.dtype(at::kLong)).repeat_interleave(G);   // (nc*G)
      auto tcol = at::arange(Te, f32.dtype(at::kLong)) - P;
      auto hidden = tcol.unsqueeze(0) > crow.unsqueeze(1);    // (nc*G, Te)
      S.masked_fill_(hidden.unsqueeze(0), -kInf);
      auto l = at::logsumexp(S, {2}, true);                   // (H_kv, nc*G, 1)
      auto O = at::bmm((S - l).exp_(), Vh.narrow(1, 0, Te));  // (H_kv, nc*G, D)
      out[b].narrow(0, c0, nc).copy_(O.view({H_kv, nc, G, D}).permute({1, 0, 2, 3}).reshape({nc, H_q, D}));
      lse[b].narrow(0, c0, nc).copy_(l.view({H_kv, nc, G}).permute({1, 0, 2}).reshape({nc, H_q}));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_prefill_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& indices,
                                                      const at::Tensor& seq_lens, const at::Tensor& chunk_start,
                                                      const std::optional<at::Tensor>& block_table,
                                                      double scale, bool /*check: always on the CPU*/,
                                                      c10::string_view impl) {
  parse_impl(impl, kPrefillOp);   // validated; the CPU has one implementation
  auto a = check_attn(q, k_cache, v_cache, indices, seq_lens, &chunk_start, block_table, true);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), a.C, a.H_q}, q.options().dtype(at::kFloat));
  prefill_run(a, q, k_cache, v_cache, scale, out, lse);
  return {out, lse};
}

void sparse_prefill_out_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& indices, const at::Tensor& seq_lens,
                            const at::Tensor& chunk_start, const std::optional<at::Tensor>& block_table,
                            double scale, bool /*check*/, at::Tensor out, at::Tensor lse,
                            c10::string_view impl) {
  parse_impl(impl, kPrefillOp);
  auto a = check_attn(q, k_cache, v_cache, indices, seq_lens, &chunk_start, block_table, true);
  check_attn_out(q, k_cache, a, out, lse);
  prefill_run(a, q, k_cache, v_cache, scale, out, lse);
}

}  // namespace
}  // namespace kv_select
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("kv_select_score", &tokenkernels::kv_select::score_cpu);
  m.impl("kv_select_topk", &tokenkernels::kv_select::topk_cpu);
  m.impl("kv_select_topk_out", &tokenkernels::kv_select::topk_out_cpu);
  m.impl("kv_select_sparse_decode", &tokenkernels::kv_select::sparse_decode_cpu);
  m.impl("kv_select_sparse_decode_out", &tokenkernels::kv_select::sparse_decode_out_cpu);
  m.impl("kv_select_sparse_prefill", &tokenkernels::kv_select::sparse_prefill_cpu);
  m.impl("kv_select_sparse_prefill_out", &tokenkernels::kv_select::sparse_prefill_out_cpu);
}
