// tokenkernels-bench [--family F] [--device cpu|cuda] [--quick] [--repeats N] [--list]
//                    [--medusa63 P0,P1,...] [--control]
//
// The C++ cases of the benchmarks (see bench.h): the ops through the dispatcher against ATen
// baselines, timed without Python in the loop. Output: JSON lines on stdout, one object each --
//   {"type": "start", "device": .., "torch": .., "threads": .., "mode": "quick"|"full"}
//   {"type": "family", "name": .., "description": ..}
//   {"type": "row", "family": .., "case": .., "baselines": [..],
//    "results": {impl: {"median_ms", "min_ms", "n", "other", "work", "bytes", "metrics"}}}
//   {"type": "note", "family": .., "text": ..}
//   {"type": "end_family", "name": ..}
// which python -m tokenkernels.bench.cpp (the `tokenkernels-bench` console script, `make
// bench-cpp`) turns into the harness's progress lines, tables and CSV. With --control the binary
// also prints {"type": "ready"} before and {"type": "measured", "ms": ..} after each CPU
// measurement and reads the runner's answer from stdin ("go"; then "keep <other cores>" or
// "again"): how the runner's --wait-idle waits for a quiet machine and measures again.
//
// Timing: warmup, then the median of the repeats; std::chrono::steady_clock on CPU; on CUDA
// (compiled only with TOKENKERNELS_WITH_CUDA) a cudaEvent pair per repeat on the current stream,
// after a write of a buffer twice the L2 size queued before the start event (cold L2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "bench.h"

#ifdef TOKENKERNELS_WITH_CUDA
#include <cuda_runtime_api.h>
// The current-stream C shim from libtorch_cuda (the c10/cuda headers are not usable with the CPU
// wheel's headers; csrc/cuda_glue.cpp declares it the same way).
extern "C" int32_t aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);
#endif

// Every family's registration function (see bench.h).
#define TKBENCH_FAMILIES X(kcenter) X(cross_entropy) X(tree) X(kv_select)

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

cudaStream_t current_stream(const at::Device& d) {
  void* sp = nullptr;
  if (aoti_torch_get_current_cuda_stream(d.index() < 0 ? 0 : d.index(), &sp) != 0) {
    std::fprintf(stderr, "tokenkernels-bench: could not get the current CUDA stream\n");
    std::exit(1);
  }
  return static_cast<cudaStream_t>(sp);
}
#endif

// ------------------------------------------------------------------ JSON output
std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (const unsigned char c : s) {
    if (c == '"' || c == '\\') { o += '\\'; o += char(c); }
    else if (c == '\n') o += "\\n";
    else if (c == '\t') o += "\\t";
    else if (c < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\u%04x", c); o += b; }
    else o += char(c);
  }
  return o + "\"";
}

std::string json_num(double x) {
  if (!std::isfinite(x)) return "null";
  char b[40];
  std::snprintf(b, sizeof b, "%.9g", x);
  return b;
}

void emit(const std::string& line) {
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

// --control: one line from the runner ("" at end of input).
std::string ask(const std::string& msg) {
  emit(msg);
  std::string reply;
  if (!std::getline(std::cin, reply)) return "";
  return reply;
}

void usage(const char* argv0) {
  std::printf(
      "usage: %s [--family F] [--device cpu|cuda] [--quick] [--repeats N] [--list]\n"
      "          [--medusa63 P0,P1,...] [--control]\n"
      "  --family F      run one family (default: all); --list shows them\n"
      "  --device D      cpu (default) or cuda\n"
      "  --quick         fewer repeats and smaller shapes\n"
      "  --repeats N     repeats of each op (baselines: about N/3, at least 1); default:\n"
      "                  CPU 10 (3 with --quick), CUDA 50 (10), capped by a per-measurement time budget\n"
      "  --medusa63 P    the parents of tokenkernels.testing.MEDUSA_63 (the tree family needs them)\n"
      "  --control       ask the runner on stdin around each CPU measurement (its --wait-idle)\n"
      "Prints JSON lines; python -m tokenkernels.bench.cpp (tokenkernels-bench) runs this binary\n"
      "with the tree and prints tables, progress lines and a CSV.\n",
      argv0);
}

}  // namespace

void register_family(const char* name, const char* description, FamilyFn fn) {
  families().push_back({name, description, fn});
}

Result& Result::metric(const std::string& key, const std::string& text) {
  metrics.emplace_back(key, json_str(text));
  return *this;
}

Result& Result::metric(const std::string& key, double value) {
  metrics.emplace_back(key, json_num(value));
  return *this;
}

Result& Row::add(std::string impl, Timing t, double work, bool bytes) {
  Result r;
  r.impl = std::move(impl);
  r.timing = t;
  r.work = work;
  r.bytes = bytes;
  results.push_back(std::move(r));
  return results.back();
}

Context::~Context() {
#ifdef TOKENKERNELS_WITH_CUDA
  if (flush_) cudaFree(flush_);
#endif
}

void Context::sync() const {
#ifdef TOKENKERNELS_WITH_CUDA
  if (cuda()) cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
#endif
}

void Context::flush_l2() {
#ifdef TOKENKERNELS_WITH_CUDA
  const int dev = opt.device.index() < 0 ? 0 : opt.device.index();
  if (!flush_) {
    int l2 = 0;
    cuda_check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "cudaDeviceGetAttribute");
    flush_bytes_ = 2 * size_t(l2 > 0 ? l2 : 64 << 20);
    cuda_check(cudaMalloc(&flush_, flush_bytes_), "cudaMalloc");
  }
  cuda_check(cudaMemsetAsync(flush_, 0, flush_bytes_, current_stream(opt.device)), "cudaMemsetAsync");
#endif
}

void Context::note(const std::string& s) {
  emit("{\"type\": \"note\", \"family\": " + json_str(family) + ", \"text\": " + json_str(s) + "}");
}

void Context::add(const Row& r) {
  std::string o = "{\"type\": \"row\", \"family\": " + json_str(family) + ", \"case\": " + json_str(r.name) +
                  ", \"baselines\": [";
  for (size_t i = 0; i < r.baselines.size(); ++i) o += (i ? ", " : "") + json_str(r.baselines[i]);
  o += "], \"results\": {";
  for (size_t i = 0; i < r.results.size(); ++i) {
    const Result& x = r.results[i];
    o += (i ? ", " : "") + json_str(x.impl) + ": {\"median_ms\": " + json_num(x.timing.ms) +
         ", \"min_ms\": " + json_num(x.timing.min_ms) + ", \"n\": " + std::to_string(x.timing.n) +
         ", \"other\": " + json_num(x.timing.other) + ", \"work\": " + json_num(x.work) +
         ", \"bytes\": " + (x.bytes ? "true" : "false") + ", \"metrics\": {";
    for (size_t j = 0; j < x.metrics.size(); ++j)
      o += (j ? ", " : "") + json_str(x.metrics[j].first) + ": " + x.metrics[j].second;
    o += "}}";
  }
  emit(o + "}}");
}

Timing Context::time(const std::function<void()>& fn, bool slow) {
  if (cuda() || !opt.control) return measure(fn, slow);
  // The runner's --wait-idle: it answers "go" once the machine is quiet, then "keep <other>" or
  // "again" (other processes were busy meanwhile; at most twice).
  Timing t;
  for (int attempt = 0; attempt < 3; ++attempt) {
    ask("{\"type\": \"ready\"}");
    t = measure(fn, slow);
    const std::string reply = ask("{\"type\": \"measured\", \"ms\": " + json_num(t.ms) + "}");
    if (reply.rfind("again", 0) == 0) continue;
    if (reply.rfind("keep ", 0) == 0) t.other = std::strtod(reply.c_str() + 5, nullptr);
    break;
  }
  return t;
}

Timing Context::measure(const std::function<void()>& fn, bool slow) {
  // The same numbers as harness.schedule() in python/tokenkernels/bench/harness.py.
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
    if (slow) { repeats = opt.quick ? 1 : 3; warmup = opt.quick ? 0 : 1; }
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
    const cudaStream_t stream = current_stream(opt.device);
    cudaEvent_t a, b;
    cuda_check(cudaEventCreate(&a), "cudaEventCreate");
    cuda_check(cudaEventCreate(&b), "cudaEventCreate");
    for (int i = 0; i < repeats; ++i) {
      flush_l2();   // queued before the start event: not timed
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
    Timing r{median(ms), (int)ms.size(), kNaN, *std::min_element(ms.begin(), ms.end())};
    return r;
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
  Timing r{median(ms), (int)ms.size(), kNaN, *std::min_element(ms.begin(), ms.end())};
  return r;
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
    else if (a == "--control") opt.control = true;
    else if (a == "--repeats") {
      const std::string v = value();
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end || n < 1) {
        std::fprintf(stderr, "tokenkernels-bench: --repeats wants a positive integer, got '%s'\n", v.c_str());
        return 2;
      }
      opt.repeats = (int)n;
    } else if (a == "--medusa63") {
      const std::string v = value();
      const char* p = v.c_str();
      while (*p) {
        char* end = nullptr;
        const long long x = std::strtoll(p, &end, 10);
        if (end == p || (*end && *end != ',')) {
          std::fprintf(stderr, "tokenkernels-bench: --medusa63 wants comma-separated integers, got '%s'\n",
                       v.c_str());
          return 2;
        }
        opt.medusa63.push_back(x);
        p = *end ? end + 1 : end;
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
    for (const auto& f : families()) std::printf("%-14s %s\n", f.name.c_str(), f.description.c_str());
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
  for (const Family* f : run)
    if (f->name == "tree" && opt.medusa63.empty()) {
      std::fprintf(stderr, "tokenkernels-bench: the tree family needs --medusa63 P0,P1,... (the parents "
                           "of tokenkernels.testing.MEDUSA_63; python -m tokenkernels.bench.cpp passes "
                           "them)\n");
      return 2;
    }

  std::string dev_name = opt.device.str();
#ifdef TOKENKERNELS_WITH_CUDA
  if (opt.device.is_cuda()) {
    cudaDeviceProp prop;
    cuda_check(cudaGetDeviceProperties(&prop, opt.device.index() < 0 ? 0 : opt.device.index()),
               "cudaGetDeviceProperties");
    dev_name += std::string(" (") + prop.name + ")";
  }
#endif
  emit("{\"type\": \"start\", \"device\": " + json_str(dev_name) + ", \"torch\": " + json_str(TORCH_VERSION) +
       ", \"threads\": " + std::to_string(at::get_num_threads()) + ", \"mode\": " +
       json_str(opt.quick ? "quick" : "full") + "}");
  for (const Family* f : run) {
    Context ctx(opt, f->name);
    emit("{\"type\": \"family\", \"name\": " + json_str(f->name) + ", \"description\": " +
         json_str(f->description) + "}");
    f->fn(ctx);
    emit("{\"type\": \"end_family\", \"name\": " + json_str(f->name) + "}");
  }
  return 0;
}
