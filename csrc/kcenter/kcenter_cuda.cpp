// kcenter family: CUDA adapter (compiled by the host C++ compiler; kernels live in
// kcenter_kernels.cu). Gram matrices come from ATen (cuBLAS; fp16/bf16 on tensor cores with
// fp32 output via the out_dtype overloads); the greedy loops are our fused kernels. No host
// sync unless `check` is set.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <string_view>

#include "cuda_glue.h"
#include "kcenter/kcenter_args.h"
#include "tokenkernels/kcenter.h"
#include "tokenkernels/kcenter_tuned.h"

namespace tokenkernels {
namespace kcenter {
namespace {

// Above this many bytes of fp32 Gram for the whole batch, use the streaming path.
constexpr int64_t kMaxGramBytes = int64_t(4) << 30;
// Rows per Gram slab when the isolated start needs nearest neighbours in streaming mode.
constexpr int64_t kSlabBytes = int64_t(512) << 20;

// x (.., n, D) @ y(.., m, D)^T in fp32 (fp32 accumulate; fp16/bf16 inputs stay on tensor cores).
// fp32 inputs get an IEEE fp32 GEMM whatever the global matmul precision says
// (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision("high"/"medium"),
// fp32_precision = "tf32", TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1): TF32 would move distances by
// ~1e-3 and change picks. at::NoTF32Guard is thread-local and restores on scope exit: GEMMs
// of other threads keep the user's setting, and nothing leaks past this call. (ATen's cuBLAS
// path, the default, honours it; with torch.backends.cuda.preferred_blas_library("cublaslt")
// ATen's cuBLASLt path reads only the global setting - see README, kcenter.)
at::Tensor gram_fp32(const at::Tensor& a, const at::Tensor& b) {
  const bool lowp = a.scalar_type() != at::kFloat;
  if (lowp) {
    if (a.dim() == 3) return at::bmm(a, b.transpose(1, 2), at::kFloat);
    return at::mm(a, b.t(), at::kFloat);
  }
  at::NoTF32Guard ieee_fp32;
  if (a.dim() == 3) return at::bmm(a, b.transpose(1, 2));
  return at::mm(a, b.t());
}

// Gram tile of the tuned path: 0 lets the plan's wave model choose; TOKENKERNELS_KCENTER_TILE=64 or
// 128 forces one (tuning and benchmarks on a GPU).
int tuned_force_tile() {
  static const int forced = [] {
    const char* e = std::getenv("TOKENKERNELS_KCENTER_TILE");
    const int v = e ? std::atoi(e) : 0;
    return (v == 64 || v == 128) ? v : 0;
  }();
  return forced;
}

int sm_count(const at::Device& device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device.index()) != cudaSuccess || n < 1)
    n = 1;   // the plan only needs a positive count; a real launch error surfaces below
  return n;
}

// Sort each row's picks ascending, -1 padding last; radii follow.
void sort_picks(at::Tensor& idx, at::Tensor& rad, int64_t N) {
  auto key = at::where(idx.lt(0), at::full({}, N, idx.options()), idx);
  auto perm = std::get<1>(key.sort(1));
  idx = idx.gather(1, perm);
  rad = rad.gather(1, perm);
}

std::tuple<at::Tensor, at::Tensor> select_cuda(const at::Tensor& x_in, int64_t k,
                                               const std::optional<at::Tensor>& k_per_item,
                                               const std::optional<at::Tensor>& lengths,
                                               const std::optional<at::Tensor>& exclude,
                                               const std::optional<at::Tensor>& start_index,
                                               std::string_view metric, bool sorted, bool check,
                                               std::string_view impl) {
  const auto a = check_select_args(x_in, k, k_per_item, lengths, exclude, start_index, metric,
                                   impl);
  c10::DeviceGuard guard(x_in.device());
  if (check) check_select_values(x_in, a, k_per_item, lengths, exclude, start_index);
  const int64_t B = a.B, N = a.N, D = a.D;
  auto idx = at::empty({B, k}, x_in.options().dtype(at::kLong));
  auto rad = at::empty({B, k}, x_in.options().dtype(at::kFloat));
  if (B == 0 || k == 0) return {idx, rad};
  const cudaStream_t stream = current_cuda_stream(x_in.device());

  auto x = x_in.contiguous();
  // (B, N) fp32: inverse norms (cosine) or squared norms as a sum of squares (l2), as the
  // CPU kernel and the reference compute them.
  auto aux = (a.metric == Metric::Cosine
                  ? at::linalg_vector_norm(x, 2, {2}, false, at::kFloat).clamp_min(kNormEps).reciprocal()
                  : x.to(at::kFloat).square().sum(2))
                 .contiguous();
  auto lens = contiguous_or_undefined(lengths);
  auto excl = contiguous_or_undefined(exclude);
  auto kk = contiguous_or_undefined(k_per_item);
  auto st = contiguous_or_undefined(start_index);

  Problem p;
  p.B = B;
  p.N = N;
  p.metric = a.metric;
  p.lengths = opt_ptr<int64_t>(lens);
  p.exclude = opt_ptr<bool>(excl);
  p.aux = aux.data_ptr<float>();
  const bool isolated = !st.defined();
  const auto f32 = x.options().dtype(at::kFloat);

  // Tuned (fp16 / bf16, 1 <= N <= 8192, the (B, N, ld) fp32 key matrix within kMaxGramBytes):
  // the symmetric tensor-core Gram with the key / nearest-neighbour epilogue and the register
  // greedy, all in one launcher (tokenkernels/kcenter_tuned.h). fp32 x and larger N take the
  // Simt / Plain path below (IEEE-fp32 cuBLAS Gram), as documented in the README.
  if (a.impl == Impl::Tuned) {
    const tuned::Plan plan = tuned::make_plan(B, N, D, x.scalar_type() != at::kFloat,
                                              sm_count(x.device()), tuned_force_tile());
    if (plan.ok && B * N * plan.ld * int64_t(sizeof(float)) <= kMaxGramBytes) {
      // 16-byte rows for cp.async: zero features appended (dot products and norms unchanged)
      at::Tensor xt = x;
      if (plan.d_pad != D) xt = at::constant_pad_nd(x, {0, plan.d_pad - D}).contiguous();
      if (reinterpret_cast<uintptr_t>(xt.data_ptr()) % 16 != 0) xt = xt.clone();
      auto ws = at::empty({plan.workspace_bytes}, x.options().dtype(at::kByte));
      check_cuda(launch_kcenter_tuned(p, xt.data_ptr(), to_dtype(xt.scalar_type()), plan, opt_ptr<int64_t>(st),
                                      k, opt_ptr<int64_t>(kk), idx.data_ptr<int64_t>(), rad.data_ptr<float>(),
                                      ws.data_ptr(), stream),
                 "kcenter tuned");
      if (sorted) sort_picks(idx, rad, N);
      return {idx, rad};
    }
  }

  // Stream forces the streaming path (tests and benchmarks of it at small N); the other
  // variants take it only when the batch's fp32 Gram would not fit in kMaxGramBytes.
  if (a.impl != Impl::Stream && B * N * N * int64_t(sizeof(float)) <= kMaxGramBytes) {
    // Full Gram path: one batched GEMM, then the fused greedy (one block per item).
    auto G = gram_fp32(x, x).contiguous();   // (B, N, N)
    at::Tensor nn;
    if (isolated) {
      nn = at::empty({B, N}, f32);
      check_cuda(launch_nn_keys(p, G.data_ptr<float>(), 0, N, N, N * N, nn.data_ptr<float>(), stream),
                 "kcenter nn_keys");
    }
    auto scratch = at::empty({B, N}, f32);
    check_cuda(launch_greedy_gram(p, G.data_ptr<float>(), opt_ptr<float>(nn), opt_ptr<int64_t>(st), k,
                                  opt_ptr<int64_t>(kk), idx.data_ptr<int64_t>(), rad.data_ptr<float>(),
                                  scratch.data_ptr<float>(), a.impl, stream),
               "kcenter greedy_gram");
  } else {
    // Streaming path (video-sized N): never holds N x N. Nearest neighbours (isolated start
    // only) come from Gram slabs of a bounded number of rows, item by item.
    at::Tensor nn;
    if (isolated) {
      nn = at::empty({B, N}, f32);
      // (N = 0: no rows, no slab; max(N, 1) only keeps the division defined)
      const int64_t rows =
          std::max<int64_t>(1, kSlabBytes / (std::max<int64_t>(N, 1) * int64_t(sizeof(float))));
      for (int64_t b = 0; b < B; ++b) {
        Problem pb = p;
        pb.B = 1;
        if (pb.lengths) pb.lengths += b;
        if (pb.exclude) pb.exclude += b * N;
        pb.aux += b * N;
        for (int64_t r0 = 0; r0 < N; r0 += rows) {
          const int64_t r = std::min(rows, N - r0);
          auto slab = gram_fp32(x[b].narrow(0, r0, r), x[b]).contiguous();   // (r, N)
          check_cuda(launch_nn_keys(pb, slab.data_ptr<float>(), r0, r, N, r * N,
                                    nn.data_ptr<float>() + b * N, stream),
                     "kcenter nn_keys (streaming)");
        }
      }
    }
    auto ws = at::empty({static_cast<int64_t>(streaming_workspace_bytes(B, N))},
                        x.options().dtype(at::kByte));
    check_cuda(launch_greedy_streaming(p, x.data_ptr(), to_dtype(x.scalar_type()), D, opt_ptr<float>(nn),
                                       opt_ptr<int64_t>(st), k, opt_ptr<int64_t>(kk),
                                       idx.data_ptr<int64_t>(), rad.data_ptr<float>(), ws.data_ptr(), stream),
               "kcenter greedy_streaming");
  }
  if (sorted) sort_picks(idx, rad, N);
  return {idx, rad};
}

std::tuple<at::Tensor, at::Tensor> coverage_select_cuda(const at::Tensor& sim_in, int64_t k,
                                                        const std::optional<at::Tensor>& k_per_item,
                                                        const std::optional<at::Tensor>& lengths,
                                                        const std::optional<at::Tensor>& row_lengths,
                                                        const std::optional<at::Tensor>& exclude,
                                                        bool check) {
  auto a = check_coverage_args(sim_in, k, k_per_item, lengths, row_lengths, exclude);
  c10::DeviceGuard guard(sim_in.device());
  if (check) check_coverage_values(sim_in, a, k_per_item, lengths, row_lengths, exclude);
  const int64_t B = a.B, M = a.M, N = a.N;
  auto idx = at::empty({B, k}, sim_in.options().dtype(at::kLong));
  auto gains = at::empty({B, k}, sim_in.options().dtype(at::kFloat));
  if (B == 0 || k == 0) return {idx, gains};
  const cudaStream_t stream = current_cuda_stream(sim_in.device());
  auto sim = sim_in.to(at::kFloat).contiguous();
  auto lens = contiguous_or_undefined(lengths);
  auto rlens = contiguous_or_undefined(row_lengths);
  auto excl = contiguous_or_undefined(exclude);
  auto kk = contiguous_or_undefined(k_per_item);
  auto scratch = at::empty({B, M + N}, sim.options());
  check_cuda(launch_coverage(sim.data_ptr<float>(), B, M, N, opt_ptr<int64_t>(rlens), opt_ptr<int64_t>(lens),
                             opt_ptr<bool>(excl), k, opt_ptr<int64_t>(kk), idx.data_ptr<int64_t>(),
                             gains.data_ptr<float>(), scratch.data_ptr<float>(), stream),
             "kcenter coverage_select");
  return {idx, gains};
}

}  // namespace
}  // namespace kcenter
}  // namespace tokenkernels

TORCH_LIBRARY_IMPL(tokenkernels, CUDA, m) {
  m.impl("kcenter_select", &tokenkernels::kcenter::select_cuda);
  m.impl("kcenter_coverage_select", &tokenkernels::kcenter::coverage_select_cuda);
}
