// The attention core's launchers (torch-free; nvcc, every arch in TOKENKERNELS_CUDA_ARCHS).
// Plans come from attn_plan (attn_core.h, unit-tested on the CPU through
// torch.ops.tokenkernels._attn_core_plan); nothing here syncs the host. Each launch: one
// cudaMemsetAsync of the tickets (only with several parts), one kernel.
#include <cstdint>

#include "tokenkernels/attn_core.cuh"
#include "tokenkernels/attn_core_sm90.cuh"

namespace tokenkernels {
namespace attn {

namespace {
constexpr int64_t kMaxGridX = 2147483647;

int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 108;
  return sms > 0 ? sms : 108;
}

template <typename F>
cudaError_t with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// attn_core_wgmma_kernel for this device? Compute capability 9.0 and sm_90a SASS in the
// fatbinary (compute_80 PTX JIT-compiled for an H100 reports ptxVersion 80 and has the empty
// body). Cached per device (0 unknown, 1 no, 2 yes; a benign race: every writer stores the same).
template <typename Kernel>
bool use_wgmma(Kernel kernel) {
  static int8_t known[256] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 256) return false;
  if (known[dev] == 0) {
    int major = 0, minor = 0;
    bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
               cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
               major == 9 && minor == 0;
    if (yes) {
      cudaFuncAttributes attr{};
      yes = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)) == cudaSuccess &&
            attr.binaryVersion == 90 && attr.ptxVersion >= 90;
    }
    known[dev] = yes ? 2 : 1;
  }
  return known[dev] == 2;
}

// Launch attn_core_tc_kernel<T, D, kWN, Src> with plan `pl` -- or, for the 64-row layout
// (kWN = 1) on an sm_90a device, attn_core_wgmma_kernel<T, D, Src> (same grid, plan, workspace
// and outputs).
template <typename T, int D, int kWN, typename Src>
cudaError_t launch_core(const Plan& pl, const Src& src, const void* k, const void* v, float scale_log2, int64_t Hkv,
                        int64_t heads, void* workspace, cudaStream_t stream) {
  const int64_t gx = heads * pl.row_blocks;
  if (gx <= 0 || pl.parts <= 0) return cudaSuccess;
  if (gx > kMaxGridX || pl.parts > 65535) return cudaErrorInvalidValue;
  auto kernel = device::attn_core_tc_kernel<T, D, kWN, Src>;
  size_t smem = core_smem_bytes(kWN, D);
  if constexpr (kWN == 1) {
    auto wg = device::attn_core_wgmma_kernel<T, D, Src>;
    if (use_wgmma(wg)) {
      kernel = wg;
      smem = wgmma_smem_bytes(D);
    }
  }
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  float* ws_o = nullptr;
  float* ws_lse = nullptr;
  int* tickets = nullptr;
  if (pl.parts > 1) {
    char* base = static_cast<char*>(workspace);
    ws_o = reinterpret_cast<float*>(base);
    ws_lse = reinterpret_cast<float*>(base + pl.ws_o);
    tickets = reinterpret_cast<int*>(base + pl.ws_o + pl.ws_lse);
    e = cudaMemsetAsync(tickets, 0, pl.ws_ticket, stream);
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(pl.parts)), kThreads, smem, stream>>>(
      src, static_cast<const T*>(k), static_cast<const T*>(v), scale_log2, pl.row_blocks, Hkv, ws_o, ws_lse, tickets);
  return cudaGetLastError();
}

// Dispatch on D and the plan's key groups.
template <typename T, typename Src>
cudaError_t dispatch(const Plan& pl, int64_t D, const Src& src, const void* k, const void* v, float scale_log2,
                     int64_t Hkv, int64_t heads, void* ws, cudaStream_t stream) {
  if (D == 64)
    return pl.wn == 4 ? launch_core<T, 64, 4>(pl, src, k, v, scale_log2, Hkv, heads, ws, stream)
                      : launch_core<T, 64, 1>(pl, src, k, v, scale_log2, Hkv, heads, ws, stream);
  if (D == 128)
    return pl.wn == 4 ? launch_core<T, 128, 4>(pl, src, k, v, scale_log2, Hkv, heads, ws, stream)
                      : launch_core<T, 128, 1>(pl, src, k, v, scale_log2, Hkv, heads, ws, stream);
  return cudaErrorInvalidValue;
}

bool strides_ok(const kv_select::CacheStrides& s) {
  return s.dim == 1 && s.head % 8 == 0 && s.slot % 8 == 0 && s.page % 8 == 0;
}
}  // namespace

// ---------------------------------------------------------------------------------- tree
bool tree_supported(const tree::AttnProblem& p) {
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && core_head_dim_ok(p.D) && p.Hkv > 0 &&
         p.Hq % p.Hkv == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.out);
}

Plan tree_plan(const tree::AttnProblem& p) {
  // prefix splits over the cache capacity (the real prefix lengths cut them on the device) + the
  // tree part; no capacity: the tree part alone
  const int64_t rows = p.n * (p.Hkv > 0 ? p.Hq / p.Hkv : 0);
  Plan pl = attn_plan(p.B * p.Hkv, rows, p.max_prefix, 1, p.D, num_sms(), ctas_per_sm(p.D));
  return pl;
}

cudaError_t launch_tree(const tree::AttnProblem& p, void* workspace, cudaStream_t stream) {
  if (p.B == 0 || p.n == 0 || p.Hq == 0) return cudaSuccess;
  if (!tree_supported(p)) return cudaErrorInvalidValue;
  const Plan pl = tree_plan(p);
  const float scale_log2 = p.scale * kLog2e;
  return with_type(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    device::TreeSrc<T> src{p, pl.splits};
    return dispatch<T>(pl, p.D, src, p.k, p.v, scale_log2, p.Hkv, p.B * p.Hkv, workspace, stream);
  });
}

// ---------------------------------------------------------------------------------- kv_select
bool kv_supported(const kv_select::KVLayout& L, const void* k, kv_select::CacheStrides ks, const void* v,
                  kv_select::CacheStrides vs, DType dtype) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && core_head_dim_ok(L.D) && strides_ok(ks) &&
         strides_ok(vs) && aligned16(k) && aligned16(v);
}

Plan decode_plan(const kv_select::KVLayout& L, int64_t H_q, int64_t K) {
  const int64_t G = L.H_kv > 0 ? H_q / L.H_kv : 0;
  return attn_plan(L.B * L.H_kv, G, K, 0, L.D, num_sms(), ctas_per_sm(L.D));
}

Plan prefill_plan(const kv_select::KVLayout& L, int64_t C, int64_t H_q, int64_t K) {
  const int64_t G = L.H_kv > 0 ? H_q / L.H_kv : 0;
  return attn_plan(L.B * L.H_kv, C * G, K + C, 0, L.D, num_sms(), ctas_per_sm(L.D));
}

cudaError_t launch_decode(const kv_select::KVLayout& L, const void* k, kv_select::CacheStrides ks, const void* v,
                          kv_select::CacheStrides vs, DType dtype, const void* q, float scale, int64_t H_q,
                          const int32_t* indices, int64_t K, void* out, float* lse, void* workspace,
                          cudaStream_t stream) {
  if (L.B == 0 || H_q == 0) return cudaSuccess;
  if (!kv_supported(L, k, ks, v, vs, dtype) || H_q % L.H_kv != 0 || H_q / L.H_kv > 16 || !aligned16(q) ||
      !aligned16(out))
    return cudaErrorInvalidValue;
  const Plan pl = decode_plan(L, H_q, K);
  return with_type(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    device::DecodeSrc<T> src{L, ks, vs, static_cast<const T*>(q), out, lse, indices, K, H_q, pl.splits};
    return dispatch<T>(pl, L.D, src, k, v, scale * kLog2e, L.H_kv, L.B * L.H_kv, workspace, stream);
  });
}

cudaError_t launch_prefill(const kv_select::KVLayout& L, const void* k, kv_select::CacheStrides ks, const void* v,
                           kv_select::CacheStrides vs, DType dtype, const void* q, float scale, int64_t C, int64_t H_q,
                           const int32_t* indices, int64_t K, const int32_t* chunk_start, void* out, float* lse,
                           void* workspace, cudaStream_t stream) {
  if (L.B == 0 || C == 0 || H_q == 0) return cudaSuccess;
  if (!kv_supported(L, k, ks, v, vs, dtype) || H_q % L.H_kv != 0 || !aligned16(q) || !aligned16(out))
    return cudaErrorInvalidValue;
  const Plan pl = prefill_plan(L, C, H_q, K);
  return with_type(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    device::PrefillSrc<T> src{L, ks, vs, static_cast<const T*>(q), out, lse, indices, chunk_start, K, C, H_q,
                              pl.splits};
    return dispatch<T>(pl, L.D, src, k, v, scale * kLog2e, L.H_kv, L.B * L.H_kv, workspace, stream);
  });
}

}  // namespace attn
}  // namespace tokenkernels
