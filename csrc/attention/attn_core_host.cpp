// The attention core's host-visible code on the CPU (private ops, tests only): the planner
// (attn_plan), the per-CTA key ranges (split_range) and an emulation of the kernel's split /
// tile / key-group / merge arithmetic that calls the same TK_HD functions as
// attn_core_tc_kernel (attn_core.h), so tests compare the kernel's own softmax bookkeeping with
// torch's softmax attention without a GPU. (The emulation takes fp32 scores: what it checks is the
// bookkeeping -- ranges, masks, rescales, merges -- not the tensor-core products.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <string_view>
#include <vector>

#include "tokenkernels/attn_core.h"

namespace tokenkernels {
namespace attn {
namespace {

at::Tensor plan_op(const at::Tensor& args) {
  TORCH_CHECK_VALUE(args.dim() == 1 && args.numel() == 7 && args.scalar_type() == at::kLong,
                    "tokenkernels._attn_core_plan: args must be 7 int64 values "
                    "(heads, rows, max_keys, extra_parts, D, sm_count, ctas_per_sm)");
  auto a = args.contiguous();
  const int64_t* v = a.data_ptr<int64_t>();
  const Plan p = attn_plan(v[0], v[1], v[2], v[3], v[4], static_cast<int>(v[5]), static_cast<int>(v[6]));
  auto out = at::empty({11}, a.options());
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t vals[11] = {p.wn, p.rows_per_cta, p.row_blocks, p.splits, p.parts, p.ctas,
                            static_cast<int64_t>(p.smem_bytes), static_cast<int64_t>(p.ws_o),
                            static_cast<int64_t>(p.ws_lse), static_cast<int64_t>(p.ws_ticket),
                            static_cast<int64_t>(p.ws_total)};
  for (int i = 0; i < 11; ++i) o[i] = vals[i];
  return out;
}

at::Tensor ranges_op(const at::Tensor& lens, int64_t splits) {
  TORCH_CHECK_VALUE(lens.dim() == 1 && lens.scalar_type() == at::kLong, "tokenkernels._attn_core_ranges: lens must be 1-D int64");
  TORCH_CHECK_VALUE(splits >= 0, "tokenkernels._attn_core_ranges: splits must be >= 0");
  auto l = lens.contiguous();
  auto out = at::empty({l.numel(), splits, 2}, l.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < l.numel(); ++i)
    for (int64_t s = 0; s < splits; ++s) {
      const Range r = split_range(l.data_ptr<int64_t>()[i], splits, s);
      o[(i * splits + s) * 2] = r.k0;
      o[(i * splits + s) * 2 + 1] = r.k1;
    }
  return out;
}

// ---------------------------------------------------------------- fragment-layout emulation
// A model of the two warp-level instructions the kernel builds on (PTX ISA: ldmatrix, mma.sync
// m16n8k16 .row.col), fed with the kernel's own addressing (attn_core.h: swz_off, q/k/v_lds_*,
// acc_row/col, pa_*). Values stay fp32 (the model checks where elements go, not their rounding).
struct Warp {
  // ldmatrix.x4 (.trans): lane l supplies the address of row (l % 8) of matrix l / 8; register i of
  // lane l gets matrix i's elements (row l / 4, columns 2 (l % 4), +1) -- transposed: (rows
  // 2 (l % 4), +1, column l / 4). Each register = two values (lo, hi).
  static void ldsm(const std::vector<float>& smem, const int (&addr)[32], bool trans, float (&reg)[32][4][2]) {
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i)
        for (int h = 0; h < 2; ++h) {
          const int row = trans ? 2 * (l % 4) + h : l / 4, col = trans ? l / 4 : 2 * (l % 4) + h;
          reg[l][i][h] = smem[addr[8 * i + row] + col];
        }
  }
  // mma.sync m16n8k16 row.col: A (16 x 16) from a[l][r][h]: r0 (row g, k 2t + h), r1 (g + 8, ..),
  // r2 (g, 2t + 8 + h), r3 (g + 8, 2t + 8 + h); B (16 x 8) from b[l][r][h]: r0 (k 2t + h, n g),
  // r1 (k 2t + 8 + h, n g); C / D c[l][e]: e0, e1 (row g, n 2t + e), e2, e3 (row g + 8, ..); g = l / 4,
  // t = l % 4.
  static void mma(float (&c)[32][4], const float (&a)[32][4][2], const float (&b)[32][2][2]) {
    float A[16][16], Bm[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = a[l][0][h];
        A[g + 8][2 * t + h] = a[l][1][h];
        A[g][2 * t + 8 + h] = a[l][2][h];
        A[g + 8][2 * t + 8 + h] = a[l][3][h];
        Bm[2 * t + h][g] = b[l][0][h];
        Bm[2 * t + 8 + h][g] = b[l][1][h];
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        float s = 0.f;
        for (int k = 0; k < 16; ++k) s += A[row][k] * Bm[k][col];
        c[l][e] += s;
      }
    }
  }
};

// One warp's tile, as the kernel computes it: q (16, D), k / v (n, D) (n = keys of the warp,
// a multiple of 16) stored swizzled; S = Q K^T by ldmatrix + mma, then P = S re-packed as A
// fragments, O = P V by ldmatrix.trans + mma; S (16, n) and O (16, D) read out through
// acc_row / acc_col.
std::tuple<at::Tensor, at::Tensor> fragments_op(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in) {
  const char* op = "tokenkernels._attn_core_fragments";
  auto q = q_in.to(at::kFloat).contiguous(), k = k_in.to(at::kFloat).contiguous(), v = v_in.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(q.dim() == 2 && q.size(0) == 16, op, ": q must be (16, D)");
  const int D = static_cast<int>(q.size(1)), n = static_cast<int>(k.size(0));
  TORCH_CHECK_VALUE(D % 16 == 0 && D > 0 && D <= 256 && k.dim() == 2 && k.size(1) == D && v.sizes() == k.sizes() &&
                        n % 16 == 0 && n > 0 && n <= 256,
                    op, ": k, v must be (n, D) with n, D multiples of 16 (<= 256)");
  const int CH = D / 8;
  auto stage = [&](const at::Tensor& t, int rows) {   // rows x D, chunk c of row r at swz_off(r, c, D)
    std::vector<float> s(static_cast<size_t>(rows) * D);
    const float* p = t.data_ptr<float>();
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < CH; ++c)
        for (int e = 0; e < 8; ++e) s[swz_off(r, c, D) + e] = p[r * D + c * 8 + e];
    return s;
  };
  const auto sQ = stage(q, 16), sK = stage(k, n), sV = stage(v, n);
  const int DK = D / 16, NB = n / 8, DN = D / 8;
  std::vector<std::array<float, 4>> sacc(static_cast<size_t>(NB) * 32, {0.f, 0.f, 0.f, 0.f});
  float qf[16][32][4][2];   // Q fragments, k-steps <= 16 (D <= 256)
  int addr[32];
  for (int kk = 0; kk < DK; ++kk) {
    for (int l = 0; l < 32; ++l) addr[l] = swz_off(q_lds_row(0, l), q_lds_chunk(kk, l), D);
    Warp::ldsm(sQ, addr, false, qf[kk]);
  }
  // S
  for (int kk = 0; kk < DK; ++kk)
    for (int n2 = 0; n2 < NB / 2; ++n2) {
      for (int l = 0; l < 32; ++l) addr[l] = swz_off(k_lds_row(0, n2, l), k_lds_chunk(kk, l), D);
      float r[32][4][2];
      Warp::ldsm(sK, addr, false, r);
      for (int u = 0; u < 2; ++u) {
        float b[32][2][2], c[32][4];
        for (int l = 0; l < 32; ++l) {
          for (int h = 0; h < 2; ++h) {
            b[l][0][h] = r[l][2 * u][h];
            b[l][1][h] = r[l][2 * u + 1][h];
          }
          for (int e = 0; e < 4; ++e) c[l][e] = sacc[(2 * n2 + u) * 32 + l][e];
        }
        Warp::mma(c, qf[kk], b);
        for (int l = 0; l < 32; ++l)
          for (int e = 0; e < 4; ++e) sacc[(2 * n2 + u) * 32 + l][e] = c[l][e];
      }
    }
  // O = P V with P = S
  std::vector<std::array<float, 4>> oacc(static_cast<size_t>(DN) * 32, {0.f, 0.f, 0.f, 0.f});
  for (int ks = 0; ks < NB / 2; ++ks) {
    float a[32][4][2];
    for (int l = 0; l < 32; ++l)
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h) a[l][r][h] = sacc[(2 * ks + pa_block(r)) * 32 + l][pa_elem(r, h)];
    for (int d2 = 0; d2 < DN / 2; ++d2) {
      for (int l = 0; l < 32; ++l) addr[l] = swz_off(v_lds_row(0, ks, l), v_lds_chunk(d2, l), D);
      float r[32][4][2];
      Warp::ldsm(sV, addr, true, r);
      for (int u = 0; u < 2; ++u) {
        float b[32][2][2], c[32][4];
        for (int l = 0; l < 32; ++l) {
          for (int h = 0; h < 2; ++h) {
            b[l][0][h] = r[l][2 * u][h];
            b[l][1][h] = r[l][2 * u + 1][h];
          }
          for (int e = 0; e < 4; ++e) c[l][e] = oacc[(2 * d2 + u) * 32 + l][e];
        }
        Warp::mma(c, a, b);
        for (int l = 0; l < 32; ++l)
          for (int e = 0; e < 4; ++e) oacc[(2 * d2 + u) * 32 + l][e] = c[l][e];
      }
    }
  }
  auto S = at::zeros({16, n}, q.options()), O = at::zeros({16, D}, q.options());
  float* sp = S.data_ptr<float>();
  float* op_ = O.data_ptr<float>();
  for (int l = 0; l < 32; ++l)
    for (int e = 0; e < 4; ++e) {
      for (int i = 0; i < NB; ++i) sp[acc_row(l, e) * n + i * 8 + acc_col(l, e)] = sacc[i * 32 + l][e];
      for (int i = 0; i < DN; ++i) op_[acc_row(l, e) * D + i * 8 + acc_col(l, e)] = oacc[i * 32 + l][e];
    }
  return {S, O};
}

enum class Kind { Tree, Decode, Prefill };

// One row's state per key group.
struct State {
  float m = -INFINITY, l = 0.f;
  std::vector<float> o;
};

// One CTA tile of attn_core_wgmma_kernel (sm_90a), as the kernel lays it out: q (64, D), k, v
// (64, D) staged at gmma_off (the kernel's cp.async destinations; CuTe's SW128 layouts by the
// kernel's static_asserts); S = Q K^T into the warpgroup's accumulator registers through
// wg_acc_row / wg_acc_col; P re-packed register by register with wg_pa_src into the A fragments of
// the 4 key k-steps; the A operand gathered from the 128 threads through wg_a_row / wg_a_col (the
// hardware's view of an RS operand), B = V from the staged tile; O accumulated through the same
// accumulator map. Returns S (64, 64) and O (64, D) read out of the registers, and the maps
// acc (128, 32, 2) (S value i of thread t -> row, column), a (128, 8, 2) (A value v -> row, k) and
// off (64, D / 8): gmma_off(row, chunk).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wgmma_fragments_op(const at::Tensor& q_in,
                                                                             const at::Tensor& k_in,
                                                                             const at::Tensor& v_in) {
  const char* op = "tokenkernels._attn_core_wgmma_fragments";
  auto q = q_in.to(at::kFloat).contiguous(), k = k_in.to(at::kFloat).contiguous(), v = v_in.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(q.dim() == 2 && q.size(0) == 64 && (q.size(1) == 64 || q.size(1) == 128), op,
                    ": q must be (64, D), D 64 or 128");
  const int D = static_cast<int>(q.size(1));
  TORCH_CHECK_VALUE(k.dim() == 2 && k.size(0) == 64 && k.size(1) == D && v.sizes() == k.sizes(), op,
                    ": k, v must be (64, D)");
  const int CH = D / 8;
  auto stage = [&](const at::Tensor& t) {
    std::vector<float> sm(static_cast<size_t>(64) * D, NAN);
    const float* p = t.data_ptr<float>();
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < CH; ++c)
        for (int e = 0; e < 8; ++e) {
          const int off = gmma_off(r, c) + e;
          TORCH_CHECK(off >= 0 && off < 64 * D && std::isnan(sm[off]), op, ": gmma_off is not a bijection");
          sm[off] = p[r * D + c * 8 + e];
        }
    return sm;
  };
  const auto sQ = stage(q), sK = stage(k), sV = stage(v);
  auto at_ = [&](const std::vector<float>& sm, int r, int d) { return sm[gmma_off(r, d >> 3) + (d & 7)]; };
  // S = Q K^T (wgmma SS: both operands read from the staged tiles)
  std::vector<float> sacc(128 * 32);
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < 32; ++i) {
      const int r = wg_acc_row(t, i), c = wg_acc_col(t, i);
      float acc = 0.f;
      for (int d = 0; d < D; ++d) acc += at_(sQ, r, d) * at_(sK, c, d);
      sacc[t * 32 + i] = acc;
    }
  // O += P V per key k-step: registers -> A (64 x 16) by the A layout, B from the V tile
  const int NO = D / 2;
  std::vector<float> oacc(static_cast<size_t>(128) * NO, 0.f);
  for (int ks = 0; ks < 4; ++ks) {
    std::vector<float> A(64 * 16, NAN);
    for (int t = 0; t < 128; ++t)
      for (int vv = 0; vv < 8; ++vv) {
        float& dst = A[wg_a_row(t, vv) * 16 + wg_a_col(t, vv)];
        TORCH_CHECK(std::isnan(dst), op, ": A fragment element held twice");
        dst = sacc[t * 32 + wg_pa_src(ks, vv)];
      }
    for (int t = 0; t < 128; ++t)
      for (int i = 0; i < NO; ++i) {
        const int r = wg_acc_row(t, i), c = wg_acc_col(t, i);
        float acc = 0.f;
        for (int kk = 0; kk < 16; ++kk) acc += A[r * 16 + kk] * at_(sV, 16 * ks + kk, c);
        oacc[t * NO + i] += acc;
      }
  }
  auto S = at::full({64, 64}, NAN, at::kFloat), O = at::full({64, D}, NAN, at::kFloat);
  auto acc_map = at::empty({128, 32, 2}, at::kLong), a_map = at::empty({128, 8, 2}, at::kLong);
  float* sp = S.data_ptr<float>();
  float* opp = O.data_ptr<float>();
  int64_t* am = acc_map.data_ptr<int64_t>();
  int64_t* aa = a_map.data_ptr<int64_t>();
  for (int t = 0; t < 128; ++t) {
    for (int i = 0; i < 32; ++i) {
      sp[wg_acc_row(t, i) * 64 + wg_acc_col(t, i)] = sacc[t * 32 + i];
      am[(t * 32 + i) * 2] = wg_acc_row(t, i);
      am[(t * 32 + i) * 2 + 1] = wg_acc_col(t, i);
    }
    for (int i = 0; i < NO; ++i) opp[wg_acc_row(t, i) * D + wg_acc_col(t, i)] = oacc[t * NO + i];
    for (int vv = 0; vv < 8; ++vv) {
      aa[(t * 8 + vv) * 2] = wg_a_row(t, vv);
      aa[(t * 8 + vv) * 2 + 1] = wg_a_col(t, vv);
    }
  }
  auto offs = at::empty({64, CH}, at::kLong);
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < CH; ++c) offs.data_ptr<int64_t>()[r * CH + c] = gmma_off(r, c);
  return {S, O, acc_map, a_map, offs};
}

// q (R, D), k / v (N, D) fp32; key_ok (N,) bool: keys that are there (index valid, page in
// range). kind "decode": keys 0..N-1, `splits` splits; "tree": prefix keys 0..P-1 in `splits`
// splits + the tree part (keys P..N-1 = tree keys 0..N-P-1, mask (n, W) int32 rows per node
// i = r / G); "prefill": gathered keys 0..P-1 (P = K), chunk keys P..N-1 (C = N - P chunk rows,
// row r = c * G + g), chunk-causal, each row block's list cut by prefill_key_len. wn: the kernel's
// key groups (1 or 4), rows in blocks of core_rows(wn) as on the device.
std::tuple<at::Tensor, at::Tensor> emulate_op(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                              const at::Tensor& ok_in, const at::Tensor& mask_in, int64_t P,
                                              int64_t G, int64_t splits, int64_t wn, double scale,
                                              c10::string_view kind_s) {
  const char* op = "tokenkernels._attn_core_emulate";
  TORCH_CHECK_VALUE(q_in.dim() == 2 && k_in.dim() == 2 && v_in.dim() == 2, op, ": q, k, v must be 2-D");
  TORCH_CHECK_VALUE(wn == 1 || wn == 4, op, ": wn must be 1 or 4, got ", wn);
  TORCH_CHECK_VALUE(G >= 1 && splits >= 0, op, ": G must be >= 1 and splits >= 0");
  const std::string_view ks(kind_s.data(), kind_s.size());
  Kind kind;
  if (ks == "tree") kind = Kind::Tree;
  else if (ks == "decode") kind = Kind::Decode;
  else if (ks == "prefill") kind = Kind::Prefill;
  else TORCH_CHECK_VALUE(false, op, ": kind must be tree, decode or prefill, got ", ks);
  auto q = q_in.to(at::kFloat).contiguous(), k = k_in.to(at::kFloat).contiguous(), v = v_in.to(at::kFloat).contiguous();
  auto ok = ok_in.to(at::kBool).contiguous();
  const int64_t R = q.size(0), D = q.size(1), N = k.size(0);
  TORCH_CHECK_VALUE(k.size(1) == D && v.size(0) == N && v.size(1) == D && ok.numel() == N, op, ": shapes disagree");
  TORCH_CHECK_VALUE(P >= 0 && P <= N, op, ": P must be in [0, N]");
  at::Tensor mask;
  int64_t W = 0;
  if (kind == Kind::Tree) {
    mask = mask_in.to(at::kInt).contiguous();
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) * G >= R && mask.size(1) * 32 >= N - P, op, ": mask shape");
    W = mask.size(1);
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* okp = ok.data_ptr<bool>();
  const int64_t C = N - P;
  const int64_t rows_per_cta = core_rows(static_cast<int>(wn));
  const int64_t parts = kind == Kind::Tree ? splits + 1 : splits;
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  const int64_t KPW = kKeyTile / wn;

  auto out = at::zeros({R, D}, q.options());
  auto lse = at::empty({R}, q.options());
  float* outp = out.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  std::vector<float> s2(KPW), part_o(static_cast<size_t>(parts > 0 ? parts : 1) * D), part_l(parts > 0 ? parts : 1);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row0 = r / rows_per_cta * rows_per_cta;
    for (int64_t s = 0; s < parts; ++s) {
      // the part's logical keys [k0, k1), their first row in k / v, and the mask
      Range rg{0, 0};
      int64_t base = 0;
      bool masked = false;
      if (kind == Kind::Decode) {
        rg = split_range(N, splits, s);
      } else if (kind == Kind::Tree) {
        if (s < splits) rg = split_range(P, splits, s);
        else { rg = Range{0, N - P}; base = P; masked = true; }
      } else {
        rg = split_range(prefill_key_len(P, C, C, G, row0, rows_per_cta), splits, s);
        masked = rg.k1 > P;
      }
      std::vector<State> st(wn);
      for (auto& x : st) x.o.assign(D, 0.f);
      for (int64_t t0 = rg.k0; t0 < rg.k1; t0 += kKeyTile) {
        for (int64_t w = 0; w < wn; ++w) {
          const int64_t j0 = t0 + w * KPW;
          for (int64_t u = 0; u < KPW; ++u) {   // the group's keys of this tile; past k1: masked
            const int64_t j = j0 + u;
            bool allowed = j < rg.k1 && okp[base + j];
            if (allowed && masked) {
              if (kind == Kind::Tree) allowed = tree_bit(mask.data_ptr<int32_t>() + (r / G) * W, j);
              else allowed = chunk_causal(j, P, r / G);
            }
            float dot = 0.f;
            if (allowed)
              for (int64_t d = 0; d < D; ++d) dot += qp[r * D + d] * kp[(base + j) * D + d];
            s2[u] = allowed ? dot * scale_log2 : -INFINITY;
          }
          // value rows past N are never weighted (their scores are -inf): clamp the tile
          const int64_t n = std::min<int64_t>(KPW, N - (base + j0));
          if (n > 0) online_update(st[w].m, st[w].l, st[w].o.data(), s2.data(), vp + (base + j0) * D, static_cast<int>(n),
                                   static_cast<int>(D));
        }
      }
      for (int64_t w = 1; w < wn; ++w) {   // the CTA's key groups -> group 0
        float cm, cw;
        merge_into(st[0].m, st[0].l, st[w].m, st[w].l, cm, cw);
        for (int64_t d = 0; d < D; ++d) st[0].o[d] = st[0].o[d] * cm + st[w].o[d] * cw;
      }
      const float inv = part_inv(st[0].l);
      part_l[s] = part_lse2(st[0].m, st[0].l);
      for (int64_t d = 0; d < D; ++d) part_o[s * D + d] = st[0].o[d] * inv;
    }
    if (parts == 1) {
      for (int64_t d = 0; d < D; ++d) outp[r * D + d] = part_o[d];
      lsep[r] = part_l[0] * kLn2;
    } else {
      float M = -INFINITY;
      for (int64_t s = 0; s < parts; ++s) M = part_l[s] > M ? part_l[s] : M;
      float den = 0.f;
      std::vector<float> acc(D, 0.f);
      for (int64_t s = 0; s < parts; ++s) {
        const float w = merge_weight(part_l[s], M);
        if (w == 0.f) continue;
        den += w;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * part_o[s * D + d];
      }
      const float inv = merged_inv(den);
      for (int64_t d = 0; d < D; ++d) outp[r * D + d] = acc[d] * inv;
      lsep[r] = merged_lse(M, den);
    }
  }
  return {out, lse};
}

}  // namespace
}  // namespace attn
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CPU, m) {
  m.impl("_attn_core_plan", &tokenkernels::attn::plan_op);
  m.impl("_attn_core_ranges", &tokenkernels::attn::ranges_op);
  m.impl("_attn_core_emulate", &tokenkernels::attn::emulate_op);
  m.impl("_attn_core_fragments", &tokenkernels::attn::fragments_op);
  m.impl("_attn_core_wgmma_fragments", &tokenkernels::attn::wgmma_fragments_op);
}
