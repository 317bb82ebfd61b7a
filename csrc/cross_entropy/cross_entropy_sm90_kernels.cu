// cross_entropy family: launchers of the impl="tuned" sm_90a forward (torch-free; device code in
// tokenkernels/cross_entropy_sm90.cuh, plan in tokenkernels/cross_entropy_sm90.h). The TMA
// descriptors are encoded here on the host (cuTensorMapEncodeTiled, reached through cudart's
// driver entry point: no libcuda link). Nothing here syncs the host.
#include <algorithm>
#include <cstdint>

#include "tokenkernels/cross_entropy_sm90.cuh"

namespace tokenkernels {
namespace cross_entropy {
namespace sm90 {

namespace {
constexpr int kMergeThreads = 256;

// (rows, D) row-major operand as a CuTe gmem tensor: int32 extents, int64 row stride.
template <class T>
auto gmem_operand(const T* p, int rows, int D) {
  using namespace cute;
  return make_tensor(make_gmem_ptr(p), make_layout(make_shape(rows, D), make_stride(int64_t(D), _1{})));
}

template <class T>
auto make_tma_a(const T* h, int N, int D) {
  using namespace cute;
  return make_tma_atom(SM90_TMA_LOAD{}, gmem_operand(h, N, D),
                       typename device::Config<T>::SmemLayoutA{}(_, _, 0),
                       make_shape(Int<kBM>{}, Int<kBK>{}));
}
// The weight operand: per CTA the whole 256 x 64 stage (kCluster = 1), or its half, multicast
// to both CTAs of the pair (kCluster = 2).
template <class T, int kCluster>
auto make_tma_b(const T* w, int V, int D) {
  using namespace cute;
  if constexpr (kCluster == 1)
    return make_tma_atom(SM90_TMA_LOAD{}, gmem_operand(w, V, D),
                         typename device::Config<T>::SmemLayoutB{}(_, _, 0),
                         make_shape(Int<kBN>{}, Int<kBK>{}));
  else
    return make_tma_atom(SM90_TMA_LOAD_MULTICAST{}, gmem_operand(w, V, D),
                         typename device::Config<T>::SmemLayoutB{}(_, _, 0),
                         make_shape(Int<kBN>{}, Int<kBK>{}), Int<kCluster>{});
}

template <class T, bool kAux, int kCluster>
auto kernel_ptr() {
  using TmaA = decltype(make_tma_a<T>(nullptr, 0, 0));
  using TmaB = decltype(make_tma_b<T, kCluster>(nullptr, 0, 0));
  return device::ce_fwd_sm90_tma_wgmma_kernel<T, kAux, kCluster, TmaA, TmaB>;
}

template <class T, bool kAux, int kCluster>
cudaError_t run(const FwdPlan& plan, const T* H, const T* W, int N, int D, const float* bias,
                float cap, const Targets& tg, float* part, int32_t* part_idx, float* zt,
                cudaStream_t stream) {
  const auto tma_a = make_tma_a<T>(H, N, D);
  const auto tma_b = make_tma_b<T, kCluster>(W, int(tg.V), D);
  auto kernel = kernel_ptr<T, kAux, kCluster>();
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(plan.smem_bytes));
  if (e != cudaSuccess) return e;
  const int V = int(tg.V), ru = int(plan.row_units), vt = int(plan.vocab_tiles);
  const int kbs = int(plan.k_blocks), per = int(plan.tiles_per_split), sp = int(plan.splits);
  const int units = int(plan.units);
  if constexpr (kCluster == 1) {
    kernel<<<unsigned(plan.grid), kThreads, size_t(plan.smem_bytes), stream>>>(
        tma_a, tma_b, N, D, V, bias, cap, tg, ru, vt, kbs, per, sp, units, part, part_idx, zt);
  } else {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = size_t(plan.smem_bytes);
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cfg.gridDim = dim3(unsigned(plan.grid), 1, 1);
    int fit = 0;  // clusters resident at once (a host query; no sync)
    e = cudaOccupancyMaxActiveClusters(&fit, kernel, &cfg);
    if (e != cudaSuccess) return e;
    if (fit < 1) return cudaErrorInvalidConfiguration;
    const int64_t clusters = std::min<int64_t>(plan.grid / kCluster, fit);
    cfg.gridDim = dim3(unsigned(clusters * kCluster), 1, 1);
    e = cudaLaunchKernelEx(&cfg, kernel, tma_a, tma_b, N, D, V, bias, cap, tg, ru, vt, kbs, per,
                           sp, units, part, part_idx, zt);
    if (e != cudaSuccess) return e;
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t run_typed(const FwdPlan& plan, const void* H, const void* W, int N, int D,
                      const float* bias, float cap, const Targets& tg, const FwdState& st,
                      float* part, int32_t* part_idx, cudaStream_t stream) {
  const T* h = static_cast<const T*>(H);
  const T* w = static_cast<const T*>(W);
  const bool aux = st.tz != nullptr || st.amax != nullptr;
  if (plan.cluster == 2)
    return aux ? run<T, true, 2>(plan, h, w, N, D, bias, cap, tg, part, part_idx, st.zt, stream)
               : run<T, false, 2>(plan, h, w, N, D, bias, cap, tg, part, part_idx, st.zt, stream);
  return aux ? run<T, true, 1>(plan, h, w, N, D, bias, cap, tg, part, part_idx, st.zt, stream)
             : run<T, false, 1>(plan, h, w, N, D, bias, cap, tg, part, part_idx, st.zt, stream);
}
}  // namespace

cudaError_t forward_plan(const void* hidden, const void* weight, DType dtype, int64_t N,
                         int64_t D, int64_t V, Impl impl, int cluster, FwdPlan* plan) {
  FwdPlanInput in;
  in.cluster = cluster;
  in.N = N;
  in.D = D;
  in.V = V;
  in.dtype = dtype;
  in.impl = impl;
  in.aligned16 = reinterpret_cast<uintptr_t>(hidden) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(weight) % 16 == 0;
  if (impl == Impl::Tuned) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&in.cc_major, cudaDevAttrComputeCapabilityMajor, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&in.cc_minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&in.sm_count, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    if (in.cc_major == 9 && in.cc_minor == 0) {
      // sm_90a SASS in the fatbinary for this device? (compute_80 PTX JIT-compiled for an H100
      // reports ptxVersion 80 and has the empty body.) Cached per device: 0 unknown, 1 no,
      // 2 yes (a benign race: every writer stores the same answer).
      static int8_t known[256] = {};
      const int slot = dev >= 0 && dev < 256 ? dev : -1;
      if (slot < 0 || known[slot] == 0) {
        cudaFuncAttributes attr{};
        e = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(
                                             kernel_ptr<cutlass::bfloat16_t, false, 1>()));
        if (e != cudaSuccess) return e;
        const bool yes = attr.binaryVersion == 90 && attr.ptxVersion >= 90;
        if (slot >= 0) known[slot] = yes ? 2 : 1;
        in.sm90a_code = yes;
      } else {
        in.sm90a_code = known[slot] == 2;
      }
    }
  }
  *plan = plan_forward(in);
  return cudaSuccess;
}

cudaError_t launch_fwd_sm90(const FwdPlan& plan, const void* hidden, const void* weight,
                            DType dtype, int64_t N, int64_t D, const float* bias, float cap,
                            const Targets& tg, const FwdState& st, void* workspace,
                            cudaStream_t stream) {
  if (plan.path != FwdPath::Sm90 || dtype == DType::kFloat32 || D <= 0 || D % 8 != 0 ||
      N > kMaxDim || tg.V > kMaxDim || D > kMaxDim || tg.V < 1)
    return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  float* part = static_cast<float*>(workspace);
  int32_t* part_idx = reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + plan.part_bytes);
  cudaError_t e =
      dtype == DType::kFloat16
          ? run_typed<cutlass::half_t>(plan, hidden, weight, int(N), int(D), bias, cap, tg, st,
                                       part, part_idx, stream)
          : run_typed<cutlass::bfloat16_t>(plan, hidden, weight, int(N), int(D), bias, cap, tg, st,
                                           part, part_idx, stream);
  if (e != cudaSuccess) return e;
  device::ce_fwd_sm90_merge_kernel<kMergeThreads>
      <<<unsigned((N + kMergeThreads - 1) / kMergeThreads), kMergeThreads, 0, stream>>>(
          N, plan.splits, part, part_idx, st);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace cross_entropy
}  // namespace tokenkernels
