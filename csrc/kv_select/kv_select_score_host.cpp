// kv_select scoring at bandwidth (impl="tuned"): the CUDA kernel's host plan and a CPU emulation
// of its work list and arithmetic, as private ops for the tests (tests/kv_select/test_score_host.py):
//   _kv_select_score_plan     score_tuned_plan (kv_select_score.h), as its 16 fields;
//   _kv_select_score_fastdiv  the kernel's 32-bit page division (FastDivU32) over given numerators;
//   _kv_select_score_emulate  the three passes as the kernel runs them -- the grid-stride chunk list
//                             of every persistent block, each tile's rows per (g, p, sub) thread,
//                             score_row_offset for token -> (page, slot), the reduce-scatter
//                             (rs_send / rs_keep_add over the lanes in lockstep) and its owner map,
//                             online_push per owner, the chunk-end owner merge (score_owner_tid,
//                             the 32-lane xor butterfly), pass 2's merge order and pass 3 -- with
//                             the same TK_HD functions; returns (logits, pstat, stat, out).
// Rows the kernel skips (past seq_len, valid false, bad page) read nothing here either.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "tokenkernels/kv_select_score.h"

namespace tokenkernels {
namespace kv_select {
namespace {

std::vector<int64_t> score_plan_cpu(int64_t B, int64_t N_max, int64_t H_kv, int64_t H_q, int64_t D,
                                    int64_t elt_size, int64_t sm_count, int64_t blocks_per_sm) {
  const ScoreTunedPlan p = score_tuned_plan(B, N_max, H_kv, H_q, D, elt_size, sm_count, blocks_per_sm);
  std::vector<int64_t> f(kScoreTunedPlanFields);
  score_tuned_plan_fields(p, f.data());
  return f;
}

at::Tensor score_fastdiv_cpu(const at::Tensor& n, int64_t d) {
  TORCH_CHECK(d >= 1 && d < (int64_t{1} << 31), "_kv_select_score_fastdiv: d must be in [1, 2^31)");
  auto nn = n.to(at::kLong).contiguous();
  auto out = at::empty_like(nn);
  const FastDivU32 f = make_fastdiv_u32(static_cast<uint32_t>(d));
  const int64_t* src = nn.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < nn.numel(); ++i) {
    TORCH_CHECK(src[i] >= 0 && src[i] < (int64_t{1} << 31), "_kv_select_score_fastdiv: n must be in [0, 2^31)");
    dst[i] = fastdiv(f, static_cast<uint32_t>(src[i]));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_emulate_cpu(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& seq_lens_in,
    const std::optional<at::Tensor>& block_table_in, const std::optional<at::Tensor>& skip_in,
    const std::optional<at::Tensor>& valid_in, int64_t sm_count, int64_t blocks_per_sm) {
  constexpr const char* op = "_kv_select_score_emulate";
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4, op, ": q (B, H_q, D), k_cache 4-D");
  TORCH_CHECK(k_cache.scalar_type() == at::kHalf || k_cache.scalar_type() == at::kBFloat16, op,
              ": k_cache must be fp16 or bf16");
  const int64_t B = q_in.size(0), H_q = q_in.size(1), D = q_in.size(2), H_kv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && k_cache.stride(3) == 1, op, ": k_cache (.., D) with unit stride on D");
  const bool paged = block_table_in.has_value();
  const int64_t P = k_cache.size(1);
  const int64_t N_max = paged ? block_table_in->size(1) * P : P;
  const ScoreTunedPlan p = score_tuned_plan(B, N_max, H_kv, H_q, D, 2, sm_count, blocks_per_sm);
  TORCH_CHECK(p.ok, op, ": the tuned plan does not cover this shape");
  auto q = q_in.to(at::kFloat).contiguous();
  // fp32 copy of the cache with the very same strides (offsets are computed from them)
  auto kf = at::empty_strided(k_cache.sizes(), k_cache.strides(), k_cache.options().dtype(at::kFloat));
  kf.copy_(k_cache);
  auto sl = seq_lens_in.to(at::kInt).contiguous();
  at::Tensor bt = paged ? block_table_in->to(at::kInt).contiguous() : at::Tensor();
  at::Tensor sk = skip_in.has_value() ? skip_in->to(at::kBool).contiguous() : at::Tensor();
  at::Tensor va = valid_in.has_value() ? valid_in->to(at::kBool).contiguous() : at::Tensor();

  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  auto logits = at::full({B, H_q, N_max}, nan, q.options());
  auto pstat = at::full({B, H_q, p.chunks_per_req, 2}, nan, q.options());
  auto stat = at::empty({B, H_q, 2}, q.options());
  auto out = at::empty({B, N_max}, q.options());
  float* LG = logits.data_ptr<float>();
  float* PS = pstat.data_ptr<float>();
  float* ST = stat.data_ptr<float>();
  float* OUT = out.data_ptr<float>();
  const float* Q = q.data_ptr<float>();
  const float* K = kf.data_ptr<float>();
  const int32_t* SL = sl.data_ptr<int32_t>();
  const int32_t* BT = paged ? bt.data_ptr<int32_t>() : nullptr;
  const bool* SK = sk.defined() ? sk.data_ptr<bool>() : nullptr;
  const bool* VA = va.defined() ? va.data_ptr<bool>() : nullptr;

  ScoreTokenMap map;
  map.s_page = kf.stride(0);
  map.s_slot = kf.stride(1);
  map.num_pages = k_cache.size(0);
  map.page = make_fastdiv_u32(paged ? static_cast<uint32_t>(P) : 1u);
  const int64_t s_head = kf.stride(2);
  const int R = static_cast<int>(p.R), MAXG = static_cast<int>(p.maxg), U = static_cast<int>(p.U);
  const int V = U * MAXG, NB = kScoreTunedCPT / U, G = static_cast<int>(H_q / H_kv);
  const int tp = static_cast<int>(p.tp), threads = static_cast<int>(p.threads), tile = static_cast<int>(p.tile);
  const int64_t chunk_tokens = p.chunk_tiles * p.tile;
  const int tp_shift = tp == 4 ? 2 : (tp == 2 ? 1 : 0);
  const bool fast = score_tile_fast_path(paged, P, p.tile, VA != nullptr);
  auto req_len = [&](int32_t b) -> int64_t {
    if (SK && SK[b]) return 0;
    const int64_t n = SL[b];
    return n < 0 ? 0 : (n > N_max ? N_max : n);
  };

  std::vector<float> m_run(threads), s_run(threads);
  std::vector<std::array<float, 32>> acc(R), sends(R);
  std::vector<uint32_t> bits(R);
  for (int64_t blk = 0; blk < p.grid; ++blk) {
    for (int64_t c = blk; c < p.chunks; c += p.grid) {
      const ScoreChunk ck = score_chunk(static_cast<uint32_t>(c), static_cast<uint32_t>(p.chunks_per_req),
                                        chunk_tokens, N_max);
      const int64_t len = req_len(ck.b);
      const int64_t n_end = ck.n_end < len ? ck.n_end : len;
      float* ps = PS + (static_cast<int64_t>(ck.b) * H_q * p.chunks_per_req + ck.cl) * 2;
      if (ck.n_begin >= n_end) {
        for (int64_t h = 0; h < H_q; ++h) {
          ps[h * p.chunks_per_req * 2] = -inf;
          ps[h * p.chunks_per_req * 2 + 1] = 0.0f;
        }
        continue;
      }
      std::fill(m_run.begin(), m_run.end(), -inf);
      std::fill(s_run.begin(), s_run.end(), 0.0f);
      const int32_t* bt_row = BT ? BT + static_cast<int64_t>(ck.b) * bt.size(1) : nullptr;
      const int64_t req_off = static_cast<int64_t>(ck.b) * map.s_page;
      const bool* vrow = VA ? VA + static_cast<int64_t>(ck.b) * N_max : nullptr;
      for (int64_t n0 = ck.n_begin; n0 < n_end; n0 += tile) {
        for (int gi = 0; gi < threads / R; ++gi) {   // lane groups, lanes in lockstep
          const int g = gi % static_cast<int>(H_kv), pp = gi / static_cast<int>(H_kv);
          const float* qg = Q + (static_cast<int64_t>(ck.b) * H_q + static_cast<int64_t>(g) * G) * D;
          // the producer's row masks and offsets (issue_tile: fast path or per row)
          int64_t off[kScoreTunedCPT];
          uint32_t mask = 0;
          const int64_t n_first = n0 + pp;
          if (fast) {
            const int cnt = score_tile_rows(n_first, n_end, tp_shift);
            const int64_t off0 = cnt > 0 ? score_row_offset(map, bt_row, req_off, static_cast<uint32_t>(n_first)) : -1;
            for (int j = 0; j < kScoreTunedCPT; ++j) off[j] = off0 >= 0 && j < cnt ? off0 + j * tp * map.s_slot : -1;
            if (off0 >= 0) mask = (1u << cnt) - 1u;
          } else {
            for (int j = 0; j < kScoreTunedCPT; ++j) {
              const int64_t n = n_first + static_cast<int64_t>(tp) * j;
              off[j] = -1;
              if (n < n_end && (vrow == nullptr || vrow[n])) {
                off[j] = score_row_offset(map, bt_row, req_off, static_cast<uint32_t>(n));
                if (off[j] >= 0) mask |= 1u << j;
              }
            }
          }
          for (int nb = 0; nb < NB; ++nb) {
            for (int sub = 0; sub < R; ++sub) {
              acc[sub].fill(0.0f);
              for (int u = 0; u < U; ++u) {
                const int j = nb * U + u;
                float kv[8] = {0, 0, 0, 0, 0, 0, 0, 0};   // (the kernel reads a stale slot: discarded)
                if ((mask >> j) & 1u)
                  for (int e = 0; e < 8; ++e) kv[e] = K[off[j] + g * s_head + sub * 8 + e];
                for (int h = 0; h < MAXG; ++h)
                  for (int e = 0; e < 8; ++e) {
                    const float qv = h < G ? qg[static_cast<int64_t>(h) * D + sub * 8 + e] : 0.0f;
                    acc[sub][u * MAXG + h] = std::fma(qv, kv[e], acc[sub][u * MAXG + h]);
                  }
              }
            }
            int cnt = V;
            for (int o = R / 2; o > 0; o >>= 1) {
              if (cnt > 1) {
                for (int kk = 0; kk < cnt / 2; ++kk) {
                  for (int sub = 0; sub < R; ++sub) {
                    float (&v)[32] = *reinterpret_cast<float(*)[32]>(acc[sub].data());
                    sends[sub][0] = rs_send(v, kk, cnt, (sub & o) != 0);
                  }
                  for (int sub = 0; sub < R; ++sub) {
                    float (&v)[32] = *reinterpret_cast<float(*)[32]>(acc[sub].data());
                    rs_keep_add(v, kk, cnt, (sub & o) != 0, sends[sub ^ o][0]);
                  }
                }
                cnt /= 2;
              } else {
                for (int sub = 0; sub < R; ++sub) sends[sub][0] = acc[sub][0];
                for (int sub = 0; sub < R; ++sub) acc[sub][0] += sends[sub ^ o][0];
              }
            }
            for (int sub = 0; sub < R; ++sub) {
              if (!rs_owner(sub, R, V)) continue;
              const int x = rs_owned_index(sub, R, V), u = x / MAXG, h = x % MAXG;
              if (h >= G) continue;
              const int j = nb * U + u;
              const int64_t n = n0 + pp + static_cast<int64_t>(tp) * j;
              if (n >= n_end) continue;
              const float l = ((mask >> j) & 1u) ? acc[sub][0] : -inf;
              LG[(static_cast<int64_t>(ck.b) * H_q + g * G + h) * N_max + n] = l;
              const int tid = gi * R + sub;
              online_push(m_run[tid], s_run[tid], l);
            }
          }
        }
      }
      // chunk end: the owners of each q-head, merged by the warp's xor butterfly
      for (int64_t hq = 0; hq < H_q; ++hq) {
        const int gg = static_cast<int>(hq / G), hh = static_cast<int>(hq % G);
        float wm[32], ws[32];
        for (int lane = 0; lane < 32; ++lane) {
          wm[lane] = -inf;
          ws[lane] = 0.0f;
          if (lane < tp * U) {
            const int t = score_owner_tid(gg, hh, lane / U, lane % U, R, MAXG, static_cast<int>(H_kv));
            wm[lane] = m_run[t];
            ws[lane] = s_run[t];
          }
        }
        for (int o = 16; o > 0; o >>= 1) {
          float nm[32], ns[32];
          for (int lane = 0; lane < 32; ++lane) {
            nm[lane] = wm[lane];
            ns[lane] = ws[lane];
            online_merge(nm[lane], ns[lane], wm[lane ^ o], ws[lane ^ o]);
          }
          std::copy(nm, nm + 32, wm);
          std::copy(ns, ns + 32, ws);
        }
        ps[hq * p.chunks_per_req * 2] = wm[0];
        ps[hq * p.chunks_per_req * 2 + 1] = ws[0];
      }
    }
  }
  // pass 2 (kvs_score_bw_merge_kernel): 128 threads strided, warp butterflies, 4 warps in order
  for (int64_t row = 0; row < B * H_q; ++row) {
    const float* pr = PS + row * p.chunks_per_req * 2;
    float tm[128], ts[128];
    for (int t = 0; t < 128; ++t) {
      tm[t] = -inf;
      ts[t] = 0.0f;
      for (int64_t i = t; i < p.chunks_per_req; i += 128) online_merge(tm[t], ts[t], pr[2 * i], pr[2 * i + 1]);
    }
    float m = -inf, s = 0.0f;
    for (int w = 0; w < 4; ++w) {
      float* wm = tm + 32 * w;
      float* ws = ts + 32 * w;
      for (int o = 16; o > 0; o >>= 1) {
        float nm[32], ns[32];
        for (int lane = 0; lane < 32; ++lane) {
          nm[lane] = wm[lane];
          ns[lane] = ws[lane];
          online_merge(nm[lane], ns[lane], wm[lane ^ o], ws[lane ^ o]);
        }
        std::copy(nm, nm + 32, wm);
        std::copy(ns, ns + 32, ws);
      }
      online_merge(m, s, wm[0], ws[0]);
    }
    const bool empty = m == -inf || s == 0.0f;
    ST[2 * row] = empty ? inf : m;
    ST[2 * row + 1] = empty ? 1.0f : s;
  }
  // pass 3 (kvs_score_bw_final_kernel)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = req_len(static_cast<int32_t>(b));
    for (int64_t n = 0; n < N_max; ++n) {
      const bool take = n < len && (VA == nullptr || VA[b * N_max + n]);
      float a = 0.0f;
      if (take)
        for (int64_t h = 0; h < H_q; ++h)
          a += score_exp(LG[(b * H_q + h) * N_max + n] - ST[2 * (b * H_q + h)]) / ST[2 * (b * H_q + h) + 1];
      OUT[b * N_max + n] = take ? a : -inf;
    }
  }
  return {logits, pstat, stat, out};
}

}  // namespace
}  // namespace kv_select
}  // namespace tokenkernels

// The plan takes no tensor: registered for every backend (a CPU-only kernel is unreachable
// without a tensor argument to dispatch on).
TORCH_LIBRARY_IMPL(tokenkernels, CompositeExplicitAutograd, m) {
  m.impl("_kv_select_score_plan", &tokenkernels::kv_select::score_plan_cpu);
}

TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("_kv_select_score_fastdiv", &tokenkernels::kv_select::score_fastdiv_cpu);
  m.impl("_kv_select_score_emulate", &tokenkernels::kv_select::score_emulate_cpu);
}
