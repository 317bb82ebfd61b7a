// kv_select.score(impl="tuned"): launcher of the bandwidth-bound scoring kernels
// (tokenkernels/kv_select_score.cuh; plan and design in kv_select_score.h). Torch-free, no host
// sync: besides the three launches only device-attribute and occupancy queries run on the host.
#include <cstdint>

#include "tokenkernels/kv_select_score.cuh"

namespace tokenkernels {
namespace kv_select {

namespace {

using Pass1Fn = void (*)(score_bw::Pass1Args);

template <typename T, int R>
Pass1Fn pick_g(int64_t maxg) {
  switch (maxg) {
    case 1: return score_bw::kvs_score_bw_kernel<T, R, 1>;
    case 2: return score_bw::kvs_score_bw_kernel<T, R, 2>;
    case 4: return score_bw::kvs_score_bw_kernel<T, R, 4>;
    case 8: return score_bw::kvs_score_bw_kernel<T, R, 8>;
  }
  return nullptr;
}

template <typename T>
Pass1Fn pick_r(int64_t R, int64_t maxg) {
  switch (R) {
    case 8: return pick_g<T, 8>(maxg);
    case 16: return pick_g<T, 16>(maxg);
    case 32: return pick_g<T, 32>(maxg);
  }
  return nullptr;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t launch_score_tuned(const KVLayout& L, const void* k, CacheStrides ks, DType dtype,
                               const float* q, int64_t H_q, const bool* skip, const bool* valid,
                               float* out, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (L.B == 0 || L.N_max == 0) return cudaSuccess;
  if (dtype == DType::kFloat32) return cudaErrorNotSupported;   // fp32 K: the simt kernel
  // 16-byte vectors of 8 elements: unit stride on D, every row start 16-byte aligned; q rows too.
  if (ks.dim != 1 || ks.page % 8 != 0 || ks.slot % 8 != 0 || ks.head % 8 != 0) return cudaErrorNotSupported;
  if (!aligned16(k) || !aligned16(q) || !aligned16(workspace)) return cudaErrorNotSupported;
  if (L.H_kv <= 0 || H_q % L.H_kv != 0 || L.B > 65535) return cudaErrorNotSupported;
  int dev = 0, major = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess) return e;
  if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
  if (major < 8) return cudaErrorNotSupported;   // cp.async: sm_80+

  ScoreTunedPlan p = score_tuned_plan(L.B, L.N_max, L.H_kv, H_q, L.D, 2, sms, 0);
  if (!p.ok) return cudaErrorNotSupported;
  const Pass1Fn fn = dtype == DType::kFloat16 ? pick_r<__half>(p.R, p.maxg) : pick_r<__nv_bfloat16>(p.R, p.maxg);
  if (fn == nullptr) return cudaErrorNotSupported;
  const size_t smem = static_cast<size_t>(p.smem_bytes);
  if (smem > 48 * 1024) {
    e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  int occ = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, static_cast<int>(p.threads), smem);
  if (e != cudaSuccess) return e;
  if (occ < 1) return cudaErrorNotSupported;
  p = score_tuned_plan(L.B, L.N_max, L.H_kv, H_q, L.D, 2, sms, occ);   // grid from the real occupancy
  if (!p.ok || static_cast<size_t>(p.workspace_bytes) > workspace_bytes) return cudaErrorNotSupported;

  char* base = static_cast<char*>(workspace);
  float* logits = reinterpret_cast<float*>(base);
  base += score_align256(4 * L.B * H_q * L.N_max);
  float2* pstat = reinterpret_cast<float2*>(base);
  base += score_align256(8 * L.B * H_q * p.chunks_per_req);
  float2* stat = reinterpret_cast<float2*>(base);

  score_bw::Pass1Args a{};
  a.k = k;
  a.map.s_page = ks.page;
  a.map.s_slot = ks.slot;
  a.map.num_pages = L.num_pages;
  a.map.page = make_fastdiv_u32(L.block_table ? static_cast<uint32_t>(L.page_size) : 1u);
  a.s_head = ks.head;
  a.block_table = L.block_table;
  a.bt_stride = L.bt_stride;
  a.seq_lens = L.seq_lens;
  a.skip = skip;
  a.valid = valid;
  a.N_max = L.N_max;
  a.q = q;
  a.H_q = static_cast<int>(H_q);
  a.H_kv = static_cast<int>(L.H_kv);
  a.G = static_cast<int>(H_q / L.H_kv);
  a.D = static_cast<int>(L.D);
  a.tp = static_cast<int>(p.tp);
  a.tp_shift = p.tp == 4 ? 2 : (p.tp == 2 ? 1 : 0);
  a.fast = score_tile_fast_path(L.block_table != nullptr, L.page_size, p.tile, valid != nullptr);
  a.stages = static_cast<int>(p.stages);
  a.chunk_tokens = p.chunk_tiles * p.tile;
  a.chunks_per_req = static_cast<uint32_t>(p.chunks_per_req);
  a.chunks = static_cast<uint32_t>(p.chunks);
  a.logits = logits;
  a.pstat = pstat;
  fn<<<static_cast<unsigned>(p.grid), static_cast<unsigned>(p.threads), smem, stream>>>(a);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  score_bw::kvs_score_bw_merge_kernel<<<static_cast<unsigned>(L.B * H_q), 128, 0, stream>>>(
      pstat, static_cast<int>(p.chunks_per_req), stat);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  const int64_t per_block = score_bw::kFinalThreads * 4;
  const dim3 grid3(static_cast<unsigned>((L.N_max + per_block - 1) / per_block), static_cast<unsigned>(L.B));
  score_bw::kvs_score_bw_final_kernel<<<grid3, score_bw::kFinalThreads, sizeof(float2) * H_q, stream>>>(
      L.seq_lens, skip, valid, L.N_max, static_cast<int>(H_q), logits, stat, out);
  return cudaGetLastError();
}

}  // namespace kv_select
}  // namespace tokenkernels
