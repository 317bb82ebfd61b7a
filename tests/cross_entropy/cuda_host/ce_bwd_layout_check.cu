// Host-side check of the index arithmetic of ce_bwd_dz_tc_kernel (cross_entropy_bwd.cuh), built
// by nvcc and run on the CPU (no GPU) by tests/cross_entropy/test_bwd_layout.py. It evaluates the
// kernel's own CuTe types (Cfg<T>: shared layouts, tiled MMA, ldmatrix copies) for every thread:
//   1. the swizzled shared layout of a pipeline stage is a bijection onto the stage, and every
//      16-byte chunk the kernel's cp.async writes (8 consecutive features from a multiple of 8)
//      is contiguous and 16-byte aligned in it;
//   2. the accumulators of the 256 threads (partition_C of the identity, what the epilogue reads
//      its (m, n) from) cover the 128 x 128 tile exactly once;
//   3. the ldmatrix sources of the A and B operands at each 16-feature step cover the stage's
//      128 x 16 slice of that step, and nothing outside it.
// Prints one line per check ("<name> <violations>") and exits 1 on any violation.
#include <cstdio>
#include <vector>

#include "tokenkernels/cross_entropy_bwd.cuh"

namespace B = tokenkernels::cross_entropy::bwd;

template <typename T>
int check(const char* tname) {
  using namespace cute;
  using C = B::device::Cfg<T>;
  int total = 0;
  int bad = 0;
  typename C::SmemA sa;
  for (int s = 0; s < B::kStages; ++s) {
    std::vector<int> hit(C::kStageElems, 0);
    for (int r = 0; r < B::kTileM; ++r)
      for (int k = 0; k < B::kTileK; ++k) {
        const int o = int(sa(r, k, s)) - s * C::kStageElems;
        if (o < 0 || o >= C::kStageElems) { ++bad; continue; }
        hit[o]++;
        if (k % 8 != 0 && sa(r, k, s) != sa(r, k - k % 8, s) + k % 8) ++bad;
        if (k % 8 == 0 && sa(r, k, s) % 8 != 0) ++bad;
      }
    for (int h : hit) bad += h != 1;
  }
  std::printf("%s smem_stage_bijection_and_16B_chunks %d\n", tname, bad);
  total += bad;

  typename C::TiledMma mma;
  std::vector<int> cov(B::kTileM * B::kTileN, 0);
  Tensor cC = make_identity_tensor(Shape<Int<B::kTileM>, Int<B::kTileN>>{});
  for (int tid = 0; tid < B::kThreads; ++tid) {
    Tensor t = mma.get_slice(tid).partition_C(cC);
    for (int i = 0; i < size(t); ++i) cov[get<0>(t(i)) * B::kTileN + get<1>(t(i))]++;
  }
  bad = 0;
  for (int c : cov) bad += c != 1;
  std::printf("%s accumulator_coverage %d\n", tname, bad);
  total += bad;

  for (int op = 0; op < 2; ++op) {
    T* base = nullptr;
    Tensor sX = make_tensor(make_gmem_ptr(base), typename C::SmemA{});  // SmemB has the same type
    bad = 0;
    for (int kb = 0; kb < B::kTileK / 16; ++kb) {
      std::vector<int> seen(C::kStageElems, 0);
      for (int tid = 0; tid < B::kThreads; ++tid) {
        auto read = [&](auto src) {
          auto sl = src(_, _, kb, 1);  // stage 1: offsets relative to its start
          for (int i = 0; i < size(sl); ++i) {
            const long off = long(&sl(i) - base) - C::kStageElems;
            if (off < 0 || off >= C::kStageElems) ++bad;
            else seen[off]++;
          }
        };
        if (op == 0) read(make_tiled_copy_A(typename C::S2RAtom{}, mma).get_slice(tid).partition_S(sX));
        else read(make_tiled_copy_B(typename C::S2RAtom{}, mma).get_slice(tid).partition_S(sX));
      }
      for (int r = 0; r < B::kTileM; ++r)
        for (int k = 0; k < B::kTileK; ++k) {
          const int o = int(sX.layout()(r, k, 1)) - C::kStageElems;
          const bool in_step = k / 16 == kb;
          if (in_step != (seen[o] > 0)) ++bad;
        }
    }
    std::printf("%s ldmatrix_%s_sources %d\n", tname, op == 0 ? "A" : "B", bad);
    total += bad;
  }
  return total;
}

int main() {
  const int v = check<cute::bfloat16_t>("bf16") + check<cute::half_t>("fp16");
  return v ? 1 : 0;
}
