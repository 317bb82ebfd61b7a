// kcenter family, impl="tuned": CPU ops exposing the CUDA path's host code and a host emulation
// of its index / fold / arg-max arithmetic, built from the same TK_HD functions the kernels call
// (tokenkernels/kcenter_tuned.h). Private (tests only):
//   _kcenter_tuned_plan     the launch plan (make_plan) and the Gram's triangle tile schedule;
//   _kcenter_tuned_emulate  the Gram epilogue (fragment -> element mapping, store / mirror rule,
//                           row / column nearest-neighbour folds) over every tile of the plan,
//                           then the greedy's thread / warp / block arg-max, on the CPU. Only the
//                           Gram values themselves come from an fp32 ATen GEMM instead of HMMA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include "kcenter/kcenter_args.h"
#include "tokenkernels/kcenter_tuned.h"

namespace tokenkernels {
namespace kcenter {
namespace tuned {
namespace {

constexpr int kPlanFields = 18;

// (plan fields (18,) int64, tiles (tiles_per_item, 2) int64 of (I, J) in launch order)
std::tuple<at::Tensor, at::Tensor> plan_op(int64_t B, int64_t N, int64_t D, int64_t sm_count,
                                           bool low_precision, int64_t force_tile) {
  const Plan p = make_plan(B, N, D, low_precision, sm_count, static_cast<int>(force_tile));
  auto fields = at::empty({kPlanFields}, at::kLong);
  int64_t* f = fields.data_ptr<int64_t>();
  const int64_t v[kPlanFields] = {p.ok,          p.tile,         p.tiles_1d,     p.tiles_per_item,
                                  p.gram_ctas,   p.gram_threads, p.gram_smem,    p.ctas_per_sm,
                                  p.waves,       p.greedy_items, p.greedy_threads, p.d_pad,
                                  p.ld,          p.key_offset,   p.nn_offset,    p.workspace_bytes,
                                  kMaxN,         static_cast<int64_t>(p.est_gram_us + 0.5)};
  std::copy(v, v + kPlanFields, f);
  auto tiles = at::empty({p.tiles_per_item, 2}, at::kLong);
  int64_t* t = tiles.data_ptr<int64_t>();
  for (int64_t q = 0; q < p.tiles_per_item; ++q) {
    const TileIJ ij = triangle_tile(q, p.tiles_1d);
    t[2 * q] = ij.i;
    t[2 * q + 1] = ij.j;
  }
  return {fields, tiles};
}

// The Gram tile (I, J) of one item as the kernel's tensor-core main loop computes it, element
// moves emulated at the level of the PTX definitions: the cp.async loader's (row, chunk) of
// every copy into the XOR-swizzled panels, ldmatrix.x4 (lane l supplies row l & 7 of matrix
// l >> 3; register i of lane l' receives row l' / 4, columns 2 (l' % 4), +1 of matrix i) at the
// kernel's lane addresses, and mma.sync m16n8k16 .row.col on the resulting a0..a3 / b0, b1
// fragments (A[g][2t+e] = a0, A[g+8][2t+e] = a1, A[g][2t+8+e] = a2, A[g+8][2t+8+e] = a3;
// B[2t+e][g] = b0, B[2t+8+e][g] = b1; C[g][2t+e] = c[e], C[g+8][2t+e] = c[2+e]). Products and
// sums in fp32 (exact for small-integer features, whatever the hardware's summation order).
// acc: [warp][lane][mt][nt][4], the accumulator registers the epilogue reads.
template <int BT>
void emulate_tile_mma(const float* x, int64_t N, int64_t Dp, int64_t r0, int64_t c0, bool diag,
                      std::vector<float>& acc) {
  using G = GramGeom<BT>;
  constexpr int kAcc = G::kMT * G::kNT * 4;
  acc.assign(static_cast<size_t>(G::kWarps) * 32 * kAcc, 0.0f);
  std::vector<float> sa(BT * G::kBK), sb(BT * G::kBK);
  const int64_t KT = (Dp + G::kBK - 1) / G::kBK;
  auto lds_pair = [](const std::vector<float>& panel, int addr, int reg_lane, float out[2]) {
    out[0] = panel[addr + 2 * (reg_lane % 4)];
    out[1] = panel[addr + 2 * (reg_lane % 4) + 1];
  };
  for (int64_t kt = 0; kt < KT; ++kt) {
    const int64_t k0 = kt * G::kBK;
    for (int tid = 0; tid < G::kThreads; ++tid)
      for (int c = 0; c < G::kChunksPerThread; ++c) {
        const int q = tid + c * G::kThreads;
        const int row = loader_row(q), ch = loader_chunk(q);
        const int64_t kk = k0 + ch * 8;
        for (int e = 0; e < 8; ++e) {
          const bool oka = kk < Dp && r0 + row < N, okb = kk < Dp && c0 + row < N;
          sa[smem_offset(row, ch) + e] = oka ? x[(r0 + row) * Dp + kk + e] : 0.0f;   // zero-fill
          sb[smem_offset(row, ch) + e] = okb ? x[(c0 + row) * Dp + kk + e] : 0.0f;
        }
      }
    const std::vector<float>& bpanel = diag ? sa : sb;
    for (int warp = 0; warp < G::kWarps; ++warp) {
      const int wm = warp / G::kWN, wn = warp % G::kWN;
      for (int ks = 0; ks < G::kBK / 16; ++ks) {
        // ldmatrix: per lane, the element offsets its 4 registers come from
        float af[32][G::kMT][4][2], bf[32][G::kNT][2][2];
        for (int mt = 0; mt < G::kMT; ++mt)
          for (int l = 0; l < 32; ++l)
            for (int i = 0; i < 4; ++i) {
              const int src = 8 * i + l / 4;   // the lane that supplied this row's address
              lds_pair(sa, smem_offset(ldsm_a_row<BT>(wm, mt, src), ldsm_a_chunk(ks, src)), l, af[l][mt][i]);
            }
        for (int np = 0; np < G::kNT / 2; ++np)
          for (int l = 0; l < 32; ++l)
            for (int i = 0; i < 4; ++i) {
              const int src = 8 * i + l / 4;
              float* dst = bf[l][2 * np + (i >> 1)][i & 1];
              lds_pair(bpanel, smem_offset(ldsm_b_row<BT>(wn, np, src), ldsm_b_chunk(ks, src)), l, dst);
            }
        for (int mt = 0; mt < G::kMT; ++mt)
          for (int nt = 0; nt < G::kNT; ++nt) {
            float A[16][16], Bm[16][8];
            for (int l = 0; l < 32; ++l) {
              const int g = l >> 2, t = l & 3;
              for (int e = 0; e < 2; ++e) {
                A[g][2 * t + e] = af[l][mt][0][e];
                A[g + 8][2 * t + e] = af[l][mt][1][e];
                A[g][2 * t + 8 + e] = af[l][mt][2][e];
                A[g + 8][2 * t + 8 + e] = af[l][mt][3][e];
                Bm[2 * t + e][g] = bf[l][nt][0][e];
                Bm[2 * t + 8 + e][g] = bf[l][nt][1][e];
              }
            }
            for (int l = 0; l < 32; ++l) {
              const int g = l >> 2, t = l & 3;
              float* c = &acc[((static_cast<size_t>(warp) * 32 + l) * G::kMT * G::kNT + mt * G::kNT + nt) * 4];
              for (int h = 0; h < 2; ++h)
                for (int e = 0; e < 2; ++e) {
                  float sum = 0.0f;
                  for (int kq = 0; kq < 16; ++kq) sum += A[g + 8 * h][kq] * Bm[kq][2 * t + e];
                  c[2 * h + e] += sum;
                }
            }
          }
      }
    }
  }
}

// gram: the item's (N, N) fp32 Gram from ATen, or nullptr: the tensor-core path's accumulators
// from emulate_tile_mma over x (N, Dp).
template <int BT>
void emulate_epilogue(const float* gram, const float* x, int64_t Dp, const float* aux,
                      const bool* valid, int64_t N, int64_t T1d, Metric m, float* keys,
                      int32_t* writes, uint32_t* nn) {
  using G = GramGeom<BT>;
  const int64_t tiles = triangle_count(T1d);
  std::vector<float> acc;
  for (int64_t t = 0; t < tiles; ++t) {
    const TileIJ ij = triangle_tile(t, T1d);
    const int64_t r0 = int64_t(ij.i) * BT, c0 = int64_t(ij.j) * BT;
    if (!gram) emulate_tile_mma<BT>(x, N, Dp, r0, c0, ij.i == ij.j, acc);
    std::vector<uint32_t> smin_r(BT, kNnInit), smin_c(BT, kNnInit);
    for (int warp = 0; warp < G::kWarps; ++warp) {
      const int wm = warp / G::kWN, wn = warp % G::kWN;
      // per lane registers, then the quad / column shuffles as minima over the lanes
      std::vector<uint32_t> rmin(32 * G::kMT * 2, kNnInit), cmin(32 * G::kNT * 2, kNnInit);
      for (int lane = 0; lane < 32; ++lane)
        for (int mt = 0; mt < G::kMT; ++mt)
          for (int h = 0; h < 2; ++h) {
            const int r = frag_row<BT>(wm, mt, lane, h);
            const int64_t gi = r0 + r;
            const bool vi = gi < N && valid[gi];
            const float ai = gi < N ? aux[gi] : 0.0f;
            for (int nt = 0; nt < G::kNT; ++nt)
              for (int e = 0; e < 2; ++e) {
                const int c = frag_col<BT>(wn, nt, lane, e);
                const int64_t gj = c0 + c;
                const bool vj = gj < N && valid[gj];
                const float aj = gj < N ? aux[gj] : 0.0f;
                // out-of-range rows / columns are zero-filled operands: Gram value 0
                const float g =
                    gram ? ((gi < N && gj < N) ? gram[gi * N + gj] : 0.0f)
                         : acc[((static_cast<size_t>(warp) * 32 + lane) * G::kMT * G::kNT + mt * G::kNT + nt) * 4 +
                               2 * h + e];
                const float key = key_from_gram(m, g, ai, aj);
                if (stores_element(gi, gj, N)) {
                  keys[gi * N + gj] = key;
                  ++writes[gi * N + gj];
                  if (stores_mirror(gi, gj)) {
                    keys[gj * N + gi] = key;
                    ++writes[gj * N + gi];
                  }
                }
                if (folds_element(gi, gj, vi, vj)) {
                  const uint32_t o = ordered_key(key);
                  uint32_t& rm = rmin[(lane * G::kMT + mt) * 2 + h];
                  uint32_t& cm = cmin[(lane * G::kNT + nt) * 2 + e];
                  rm = min_ordered(rm, o);
                  cm = min_ordered(cm, o);
                }
              }
          }
      // rows: xor 1, 2 (the quad); the quad leader (lane & 3 == 0) holds the minimum
      for (int lane = 0; lane < 32; lane += 4)
        for (int mt = 0; mt < G::kMT; ++mt)
          for (int h = 0; h < 2; ++h) {
            uint32_t v = kNnInit;
            for (int q = 0; q < 4; ++q) v = min_ordered(v, rmin[((lane + q) * G::kMT + mt) * 2 + h]);
            if (v != kNnInit) {
              uint32_t& s = smin_r[frag_row<BT>(wm, mt, lane, h)];
              s = min_ordered(s, v);
            }
          }
      // columns: xor 4, 8, 16 (the 8 quads); lanes 0..3 hold the minima
      for (int lane = 0; lane < 4; ++lane)
        for (int nt = 0; nt < G::kNT; ++nt)
          for (int e = 0; e < 2; ++e) {
            uint32_t v = kNnInit;
            for (int q = 0; q < 8; ++q) v = min_ordered(v, cmin[((lane + 4 * q) * G::kNT + nt) * 2 + e]);
            if (v != kNnInit) {
              uint32_t& s = smin_c[frag_col<BT>(wn, nt, lane, e)];
              s = min_ordered(s, v);
            }
          }
    }
    for (int q = 0; q < BT; ++q) {
      if (smin_r[q] != kNnInit) nn[r0 + q] = min_ordered(nn[r0 + q], smin_r[q]);
      if (smin_c[q] != kNnInit) nn[c0 + q] = min_ordered(nn[c0 + q], smin_c[q]);
    }
  }
}

// The greedy kernel's arithmetic for one item: blockDim = plan.greedy_threads threads with
// plan.greedy_items contiguous tokens each; warp REDUX = max over 32 lanes, ballot = bit mask of
// the lanes equal to it, first_lane picks the winner; then the same over the warps' partials.
void emulate_greedy(const Plan& plan, const float* keys, const uint32_t* nn, const bool* valid,
                    int64_t N, bool isolated, int64_t st, int64_t kb, Metric m, int64_t* out_idx,
                    float* out_rad) {
  const int threads = plan.greedy_threads, items = plan.greedy_items, nw = threads / 32;
  const bool start_ok = st >= 0 && st < N && valid[st];
  std::vector<float> mind(static_cast<size_t>(threads) * items);
  std::vector<uint32_t> best(threads);
  std::vector<int32_t> best_j(threads);
  auto block_argmax = [&](int32_t& pick) {
    std::vector<uint32_t> pv(32, kOrdNone);
    std::vector<int32_t> pj(32, 0);
    for (int w = 0; w < nw; ++w) {
      uint32_t mx = 0;
      for (int l = 0; l < 32; ++l) mx = std::max(mx, best[w * 32 + l]);
      uint32_t ballot = 0;
      for (int l = 0; l < 32; ++l) ballot |= uint32_t(best[w * 32 + l] == mx) << l;
      pv[w] = mx;
      const int fl = first_lane(ballot);   // >= 0: the maximum's own lane is in the ballot
      pj[w] = best_j[w * 32 + (fl < 0 ? 0 : fl)];
    }
    uint32_t mx = 0;
    for (int l = 0; l < 32; ++l) mx = std::max(mx, pv[l]);
    uint32_t ballot = 0;
    for (int l = 0; l < 32; ++l) ballot |= uint32_t(pv[l] == mx) << l;
    const int fl = first_lane(ballot);
    pick = pj[fl < 0 ? 0 : fl];
    return mx;
  };
  for (int t = 0; t < threads; ++t) {
    best[t] = kOrdNone;
    best_j[t] = 0;
    for (int it = 0; it < items; ++it) {
      const int32_t j = t * items + it;
      const bool v = j < N && valid[j];
      mind[t * items + it] = v ? INFINITY : -INFINITY;
      if (j < N) {
        const float nnj = (isolated && v) ? decode_nn(nn[j]) : 0.0f;
        fold_argmax(best[t], best_j[t], ordered_key(first_score(v, isolated, nnj, start_ok, st, j)), j);
      }
    }
  }
  int32_t pick = 0;
  uint32_t top = block_argmax(pick);
  if (kb == 0 || nothing_left(top)) return;
  float rad = INFINITY;
  if (isolated && ordered_value(top) != INFINITY) rad = dist_from_key(m, ordered_value(top));
  for (int64_t s = 0; s < kb; ++s) {
    out_idx[s] = pick;
    out_rad[s] = rad;
    mind[pick] = -INFINITY;   // (token j's slot is t*items + it = j)
    if (s + 1 == kb) break;
    for (int t = 0; t < threads; ++t) {
      best[t] = kOrdNone;
      best_j[t] = 0;
      const int32_t base = t * items;
      if (base >= N) continue;
      for (int it = 0; it < items; ++it) {
        const int32_t j = base + it;
        const float v = j < N ? std::min(mind[j], keys[int64_t(pick) * N + j]) : -INFINITY;
        mind[j] = v;
        fold_argmax(best[t], best_j[t], ordered_key(v), j);
      }
    }
    top = block_argmax(pick);
    if (nothing_left(top)) break;
    rad = dist_from_key(m, ordered_value(top));
  }
}

// x (B, N, D) any float dtype (computed in fp32); lengths / exclude / start_index as the op's;
// mma: Gram tiles from emulate_tile_mma (the tensor-core loop's data movement) instead of ATen.
// Returns (idx (B, k), radii (B, k), keys (B, N, N), nn (B, N) decoded, writes (B, N, N) int32:
// how many times the epilogue stored each key element).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_op(
    const at::Tensor& x_in, int64_t k, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& exclude, const std::optional<at::Tensor>& start_index,
    std::string_view metric, int64_t force_tile, bool mma) {
  const auto a = check_select_args(x_in, k, std::nullopt, lengths, exclude, start_index, metric, "tuned");
  const int64_t B = a.B, N = a.N;
  TORCH_CHECK_VALUE(N >= 1 && N <= kMaxN, "_kcenter_tuned_emulate: N must lie in [1, ", kMaxN, "]");
  auto x = x_in.to(at::kFloat).contiguous();
  const Plan plan = make_plan(B, N, a.D, true, 132, static_cast<int>(force_tile));
  // mma: the Gram tiles from the fragment-level emulation of the tensor-core loop over x padded
  // to plan.d_pad features (as the adapter pads); else one fp32 ATen GEMM.
  at::Tensor xp = plan.d_pad != a.D ? at::constant_pad_nd(x, {0, plan.d_pad - a.D}).contiguous() : x;
  auto gram = mma ? at::Tensor() : at::bmm(x, x.transpose(1, 2)).contiguous();
  auto aux = (a.metric == Metric::Cosine ? at::linalg_vector_norm(x, 2, {2}).clamp_min(kNormEps).reciprocal()
                                         : x.square().sum(2))
                 .contiguous();
  auto valid = at::arange(N, at::kLong).unsqueeze(0).lt(
      lengths.has_value() ? lengths->clamp(0, N).unsqueeze(1) : at::full({B, 1}, N, at::kLong));
  if (exclude.has_value()) valid = valid.logical_and(exclude->logical_not());
  valid = valid.contiguous();
  auto keys = at::full({B, N, N}, NAN, at::kFloat);
  auto writes = at::zeros({B, N, N}, at::kInt);
  auto idx = at::full({B, k}, -1, at::kLong);
  auto rad = at::full({B, k}, NAN, at::kFloat);
  auto nnf = at::empty({B, N}, at::kFloat);
  auto st = start_index.has_value() ? start_index->contiguous() : at::Tensor();
  for (int64_t b = 0; b < B; ++b) {
    std::vector<uint32_t> nn(N, kNnInit);
    const float* g = mma ? nullptr : gram.data_ptr<float>() + b * N * N;
    const float* xb = xp.data_ptr<float>() + b * N * plan.d_pad;
    const float* ax = aux.data_ptr<float>() + b * N;
    const bool* v = valid.data_ptr<bool>() + b * N;
    float* kk = keys.data_ptr<float>() + b * N * N;
    int32_t* w = writes.data_ptr<int32_t>() + b * N * N;
    if (plan.tile == 128)
      emulate_epilogue<128>(g, xb, plan.d_pad, ax, v, N, plan.tiles_1d, a.metric, kk, w, nn.data());
    else
      emulate_epilogue<64>(g, xb, plan.d_pad, ax, v, N, plan.tiles_1d, a.metric, kk, w, nn.data());
    for (int64_t j = 0; j < N; ++j) nnf.data_ptr<float>()[b * N + j] = decode_nn(nn[j]);
    const bool isolated = !st.defined();
    emulate_greedy(plan, kk, nn.data(), v, N, isolated, isolated ? -1 : st.data_ptr<int64_t>()[b], k,
                   a.metric, idx.data_ptr<int64_t>() + b * k, rad.data_ptr<float>() + b * k);
  }
  return {idx, rad, keys, nnf, writes};
}

}  // namespace
}  // namespace tuned
}  // namespace kcenter
}  // namespace tokenkernels

// The plan op takes no tensor: a backend-independent kernel (the dispatcher has no device key
// to pick a CPU one by).
TORCH_LIBRARY_IMPL(tokenkernels, CompositeExplicitAutograd, m) {
  m.impl("_kcenter_tuned_plan", &tokenkernels::kcenter::tuned::plan_op);
}
TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("_kcenter_tuned_emulate", &tokenkernels::kcenter::tuned::emulate_op);
}
