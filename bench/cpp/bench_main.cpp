// tokenkernels-bench [--family F] [--device cpu|cuda] [--quick] [--repeats N] [--wait-idle S]
//                    [--list]
//
// Microbenchmarks of the tokenkernels ops, called through the dispatcher, against ATen baselines
// written in C++. Timing: warmup, then the median of the repeats; std::chrono::steady_clock on
// CPU, cudaEvent pairs on the current stream on CUDA (compiled only with TOKENKERNELS_WITH_CUDA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

#include "bench.h"

#ifdef TOKENKERNELS_WITH_CUDA
#include <cuda_runtime_api.h>
// The current-stream C shim from libtorch_cuda (the c10/cuda headers are not usable with the CPU
// wheel's headers; csrc/cuda_glue.cpp declares it the same way).
extern "C" int32_t aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);
#endif

// Every family's registration function (see bench.h).
#define TKBENCH_FAMILIES X(kcenter) X(cross_entropy) X(kv_select)

namespace tkbench {
namespace {

struct Family {
  std::string name, description;
  FamilyFn fn;
};

std::vector<Family>& families() {
  static std::vector<Family> f;
  return f;
}

double median(std::vector<double> v) {
  if (v.empty()) return kNaN;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#ifdef TOKENKERNELS_WITH_CUDA
void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "tokenkernels-bench: CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}
#endif

std::string fmt_ms(double ms) {
  if (std::isnan(ms)) return "-";
  char b[32];
  if (ms < 1.0) std::snprintf(b, sizeof b, "%.3f", ms);
  else if (ms < 100.0) std::snprintf(b, sizeof b, "%.2f", ms);
  else std::snprintf(b, sizeof b, "%.1f", ms);
  return b;
}

std::string fmt_x(double x) {
  if (std::isnan(x)) return "-";
  char b[32];
  std::snprintf(b, sizeof b, x < 10 ? "%.2fx" : "%.1fx", x);
  return b;
}

std::string fmt_rate(const Row& r) {
  if (std::isnan(r.op.ms) || r.work <= 0) return "-";
  char b[48];
  std::snprintf(b, sizeof b, "%.1f %s", r.work / (r.op.ms * 1e-3) / 1e9, r.bytes ? "GB/s" : "GFLOP/s");
  return b;
}

std::string cpu_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto p = line.find(':');
      if (p != std::string::npos) return line.substr(p + 2);
    }
  }
  return "unknown CPU";
}

}  // namespace

LoadSample load_sample() {
  LoadSample s;
  s.wall = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  std::ifstream f("/proc/stat");
  std::string cpu;
  long long v[8] = {0};
  if (f >> cpu && cpu == "cpu") {
    for (auto& x : v) f >> x;
    const double hz = (double)sysconf(_SC_CLK_TCK);
    if (f && hz > 0) s.busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz;
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  s.self = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
  return s;
}

double other_cores(const LoadSample& a, const LoadSample& b) {
  if (a.busy < 0 || b.busy < 0 || b.wall <= a.wall) return kNaN;
  return std::max(0.0, ((b.busy - a.busy) - (b.self - a.self)) / (b.wall - a.wall));
}

namespace {

void print_table(const Context& ctx) {
  const std::vector<std::string> head = {"case", "op ms", "op rate", ctx.ref_label + " ms",
                                         "vs " + ctx.ref_label, ctx.alt_label + " ms",
                                         "vs " + ctx.alt_label, ctx.floor_label + " ms",
                                         "op/" + ctx.floor_label, ctx.match_label, "n"};
  std::vector<std::vector<std::string>> cells;
  for (const auto& r : ctx.rows) {
    cells.push_back({r.name, fmt_ms(r.op.ms), fmt_rate(r), fmt_ms(r.ref.ms), fmt_x(r.ref.ms / r.op.ms),
                     fmt_ms(r.divprune.ms), fmt_x(r.divprune.ms / r.op.ms), fmt_ms(r.gemm.ms),
                     fmt_x(r.op.ms / r.gemm.ms), r.match.empty() ? "-" : r.match,
                     std::to_string(r.op.n)});
  }
  std::vector<size_t> w(head.size());
  for (size_t c = 0; c < head.size(); ++c) {
    w[c] = head[c].size();
    for (const auto& row : cells) w[c] = std::max(w[c], row[c].size());
  }
  auto line = [&](const std::vector<std::string>& v) {
    std::string s = "|";
    for (size_t c = 0; c < v.size(); ++c) {
      const size_t pad = w[c] - v[c].size();
      s += " " + (c == 0 ? v[c] + std::string(pad, ' ') : std::string(pad, ' ') + v[c]) + " |";
    }
    std::printf("%s\n", s.c_str());
  };
  line(head);
  std::string sep = "|";
  for (size_t c = 0; c < head.size(); ++c)
    sep += (c == 0 ? std::string(w[c] + 1, '-') + " |" : " " + std::string(w[c], '-') + ":|");
  std::printf("%s\n", sep.c_str());
  for (const auto& row : cells) line(row);
  for (const auto& n : ctx.notes) std::printf("\n%s\n", n.c_str());
  std::fflush(stdout);
}

void usage(const char* argv0) {
  std::printf(
      "usage: %s [--family F] [--device cpu|cuda] [--quick] [--repeats N] [--wait-idle S] [--list]\n"
      "  --family F    run one family (default: all); --list shows them\n"
      "  --device D    cpu (default) or cuda\n"
      "  --quick       fewer repeats (a smoke run)\n"
      "  --repeats N   repeats of each op (baselines: about N/3, at least 1); default:\n"
      "                CPU 10 (3 with --quick), CUDA 50 (10), capped by a per-measurement time budget\n"
      "  --wait-idle S CPU on a shared machine: before each measurement wait up to S s until other\n"
      "                processes are quiet, and measure again (twice at most) if they were not\n",
      argv0);
}

}  // namespace

void register_family(const char* name, const char* description, FamilyFn fn) {
  families().push_back({name, description, fn});
}

void Context::sync() const {
#ifdef TOKENKERNELS_WITH_CUDA
  if (cuda()) cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
#endif
}

namespace {
// Wait (at most max_s) until other processes have used < 0.1 cores for one second.
void wait_for_idle(double max_s) {
  const auto t_end = std::chrono::steady_clock::now() + std::chrono::duration<double>(max_s);
  int quiet = 0;
  LoadSample a = load_sample();
  while (std::chrono::steady_clock::now() < t_end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const LoadSample b = load_sample();
    const double other = other_cores(a, b);
    if (std::isnan(other)) return;
    quiet = other < 0.1 ? quiet + 1 : 0;
    if (quiet >= 4) return;
    a = b;
  }
}
}  // namespace

Timing Context::time(const std::function<void()>& fn, bool slow) {
  if (cuda()) return measure(fn, slow);
  Timing t;
  const int attempts = opt.wait_idle > 0 ? 3 : 1;
  for (int i = 0; i < attempts; ++i) {
    if (opt.wait_idle > 0) wait_for_idle(opt.wait_idle);
    const LoadSample a = load_sample();
    t = measure(fn, slow);
    t.other = other_cores(a, load_sample());
    if (!(t.other > 0.25)) break;
  }
  return t;
}

Timing Context::measure(const std::function<void()>& fn, bool slow) {
  const bool forced = opt.repeats > 0;
  int repeats, warmup;
  double budget_s;   // stop early once the measured time exceeds this (unless --repeats)
  if (cuda()) {
    repeats = opt.quick ? 10 : 50;
    warmup = opt.quick ? 2 : 5;
    if (slow) { repeats = opt.quick ? 2 : 5; warmup = 1; }
    budget_s = opt.quick ? 1.0 : 3.0;
  } else {
    repeats = opt.quick ? 3 : 10;
    warmup = 1;
    if (slow) repeats = opt.quick ? 1 : 3;
    budget_s = opt.quick ? 0.5 : 3.0;
  }
  if (forced) repeats = slow ? std::max(1, (opt.repeats + 2) / 3) : opt.repeats;
  const int min_repeats = std::min(repeats, opt.quick ? 1 : 3);

  for (int i = 0; i < warmup; ++i) fn();
  sync();
  std::vector<double> ms;
  double total = 0.0;
#ifdef TOKENKERNELS_WITH_CUDA
  if (cuda()) {
    void* sp = nullptr;
    if (aoti_torch_get_current_cuda_stream(opt.device.index() < 0 ? 0 : opt.device.index(), &sp) != 0) {
      std::fprintf(stderr, "tokenkernels-bench: could not get the current CUDA stream\n");
      std::exit(1);
    }
    auto stream = static_cast<cudaStream_t>(sp);
    cudaEvent_t a, b;
    cuda_check(cudaEventCreate(&a), "cudaEventCreate");
    cuda_check(cudaEventCreate(&b), "cudaEventCreate");
    for (int i = 0; i < repeats; ++i) {
      cuda_check(cudaEventRecord(a, stream), "cudaEventRecord");
      fn();
      cuda_check(cudaEventRecord(b, stream), "cudaEventRecord");
      cuda_check(cudaEventSynchronize(b), "cudaEventSynchronize");
      float t = 0.f;
      cuda_check(cudaEventElapsedTime(&t, a, b), "cudaEventElapsedTime");
      ms.push_back(t);
      total += t * 1e-3;
      if (!forced && (int)ms.size() >= min_repeats && total > budget_s) break;
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return {median(ms), (int)ms.size(), kNaN};
  }
#endif
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    const double t = std::chrono::duration<double, std::milli>(t1 - t0).count();
    ms.push_back(t);
    total += t * 1e-3;
    if (!forced && (int)ms.size() >= min_repeats && total > budget_s) break;
  }
  return {median(ms), (int)ms.size(), kNaN};
}

void Context::add(Row r) {
  const LoadSample now = load_sample();
  double other = opt.wait_idle > 0 ? 0.0 : other_cores(case_start, now);
  if (opt.wait_idle > 0)   // the worst measurement kept (the waits in between do not count)
    for (const Timing* t : {&r.op, &r.ref, &r.divprune, &r.gemm})
      if (!std::isnan(t->other)) other = std::max(other, t->other);
  std::fprintf(stderr, "  %-38s op %8s ms  ref %8s ms  DivPrune %8s ms  (%.1f s, other load %.2f cores)\n",
               r.name.c_str(), fmt_ms(r.op.ms).c_str(), fmt_ms(r.ref.ms).c_str(),
               fmt_ms(r.divprune.ms).c_str(), now.wall - case_start.wall, other);
  case_start = load_sample();
  rows.push_back(std::move(r));
}

}  // namespace tkbench

int main(int argc, char** argv) {
  using namespace tkbench;
#define X(fam) register_##fam##_benches();
  TKBENCH_FAMILIES
#undef X

  Options opt;
  std::string device = "cpu";
  bool list = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], val;
    auto eq = a.find('=');
    const bool has_eq = a.rfind("--", 0) == 0 && eq != std::string::npos;
    if (has_eq) { val = a.substr(eq + 1); a = a.substr(0, eq); }
    auto value = [&]() -> std::string {
      if (has_eq) return val;
      if (i + 1 >= argc) {
        std::fprintf(stderr, "tokenkernels-bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--family") opt.family = value();
    else if (a == "--device") device = value();
    else if (a == "--quick") opt.quick = true;
    else if (a == "--repeats") {
      const std::string v = value();
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end || n < 1) {
        std::fprintf(stderr, "tokenkernels-bench: --repeats wants a positive integer, got '%s'\n", v.c_str());
        return 2;
      }
      opt.repeats = (int)n;
    } else if (a == "--wait-idle") {
      const std::string v = value();
      char* end = nullptr;
      opt.wait_idle = std::strtod(v.c_str(), &end);
      if (v.empty() || *end || opt.wait_idle < 0) {
        std::fprintf(stderr, "tokenkernels-bench: --wait-idle wants seconds >= 0, got '%s'\n", v.c_str());
        return 2;
      }
    } else if (a == "--list") list = true;
    else if (a == "-h" || a == "--help") { usage(argv[0]); return 0; }
    else {
      std::fprintf(stderr, "tokenkernels-bench: unknown argument '%s'\n", argv[i]);
      usage(argv[0]);
      return 2;
    }
  }
  if (list) {
    for (const auto& f : families()) std::printf("%-12s %s\n", f.name.c_str(), f.description.c_str());
    return 0;
  }
  if (device == "cpu") {
    opt.device = at::kCPU;
  } else if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
#ifndef TOKENKERNELS_WITH_CUDA
    std::fprintf(stderr, "tokenkernels-bench: this binary was built without CUDA kernels "
                         "(no nvcc or a CPU torch at build time); use --device cpu\n");
    return 2;
#else
    if (!at::hasCUDA()) {
      std::fprintf(stderr, "tokenkernels-bench: no CUDA device is visible\n");
      return 2;
    }
    opt.device = at::Device(device);
#endif
  } else {
    std::fprintf(stderr, "tokenkernels-bench: --device must be cpu or cuda, got '%s'\n", device.c_str());
    return 2;
  }

  std::vector<const Family*> run;
  for (const auto& f : families())
    if (opt.family == "all" || opt.family == f.name) run.push_back(&f);
  if (run.empty()) {
    std::fprintf(stderr, "tokenkernels-bench: unknown family '%s' (have:", opt.family.c_str());
    for (const auto& f : families()) std::fprintf(stderr, " %s", f.name.c_str());
    std::fprintf(stderr, ")\n");
    return 2;
  }

  std::string dev_desc;
  if (opt.device.is_cpu()) {
    dev_desc = "cpu (" + cpu_name() + ", " + std::to_string(at::get_num_threads()) + " threads)";
  } else {
#ifdef TOKENKERNELS_WITH_CUDA
    cudaDeviceProp prop;
    cuda_check(cudaGetDeviceProperties(&prop, opt.device.index() < 0 ? 0 : opt.device.index()),
               "cudaGetDeviceProperties");
    dev_desc = opt.device.str() + " (" + prop.name + ")";
#endif
  }
  const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
  std::printf("tokenkernels-bench: device %s, torch %s, %s%s%s\n", dev_desc.c_str(), TORCH_VERSION,
              opt.quick ? "quick" : "full", opt.device.is_cpu() ? ", OMP_WAIT_POLICY=" : "",
              opt.device.is_cpu() ? (wait_policy ? wait_policy : "unset") : "");
  std::printf("times: median ms after warmup; rate: flops (GFLOP/s) or bytes (GB/s) of the op per "
              "its median; vs X: X's time / op's time; op/GEMM: op time / one fp32 x@x^T; "
              "picks=ref: leading picks equal to the ATen reference\n\n");
  std::fflush(stdout);

  const LoadSample load0 = load_sample();
  for (const Family* f : run) {
    Context ctx(opt);
    std::fprintf(stderr, "[%s] %s\n", f->name.c_str(), f->description.c_str());
    f->fn(ctx);
    std::printf("## %s\n\n", f->name.c_str());
    print_table(ctx);
    std::printf("\n");
  }
  const double other = other_cores(load0, load_sample());
  if (opt.device.is_cpu() && !std::isnan(other))
    std::printf("background load: other processes kept %.2f of %ld cores busy on average during this "
                "run\n", other, sysconf(_SC_NPROCESSORS_ONLN));
  return 0;
}
