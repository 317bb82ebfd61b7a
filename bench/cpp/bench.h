// tokenkernels-bench: the C++ cases of the benchmarks and the timer they need.
//
// The binary keeps only what needs C++: calling the ops through the dispatcher and the ATen
// ports of the baselines without Python in the timed loop, and timing them (steady clock on the
// CPU, CUDA events on the current stream with a cold L2 on CUDA). It prints its rows as JSON
// lines on stdout, in the structure of the Python harness (python/tokenkernels/bench/harness.py:
// a case, its baselines, implementation name -> timing, work and metrics); the table, the
// progress lines, the load meter, --wait-idle and the CSV are the Python harness's
// (python -m tokenkernels.bench.cpp, which `tokenkernels-bench` and `make bench-cpp` run).
//
// A family lives in bench/cpp/bench_<family>.cpp and exposes one registration function,
// `void register_<family>_benches()`, which calls tkbench::register_family(). To add a family:
// write that file, add it to the tokenkernels-bench sources in CMakeLists.txt and add one line to
// the TKBENCH_FAMILIES list in bench_main.cpp.
//
// Ops are called through the dispatcher (torch::ops schemas registered by the linked op objects'
// static initialisers), so the binary measures exactly what torch.ops.tokenkernels.* runs.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace tkbench {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Options {
  std::string family = "all";
  at::Device device = at::kCPU;
  bool quick = false;
  int repeats = 0;        // 0: the default for the device (and fewer for slow baselines)
  bool control = false;   // --control: before and after each CPU measurement ask the runner on
                          // stdin (its --wait-idle: wait for a quiet machine, measure again)
  std::vector<int64_t> medusa63;   // --medusa63: parents of tokenkernels.testing.MEDUSA_63
};

// One timed measurement: the median (and min) over `n` repeats after warmup, in milliseconds.
struct Timing {
  double ms = kNaN;
  int n = 0;
  double other = kNaN;   // cores other processes kept busy meanwhile (the runner's figure)
  double min_ms = kNaN;
};

// One implementation's measurement in a row.
struct Result {
  std::string impl;
  Timing timing;
  double work = 0.0;     // flops (rate in GFLOP/s) or bytes (rate in GB/s), see `bytes`; 0: no rate
  bool bytes = false;
  std::vector<std::pair<std::string, std::string>> metrics;   // key -> JSON value
  Result& metric(const std::string& key, const std::string& text);
  Result& metric(const std::string& key, double value);
};

// One case: implementation name -> Result, and the implementations the ratios are taken
// against (computed by the Python printer, never here).
struct Row {
  std::string name;                     // case label, e.g. "kcenter isolated B1 N576 D4096 k56"
  std::vector<std::string> baselines;
  std::vector<Result> results;
  Row() = default;
  explicit Row(std::string n, std::vector<std::string> b = {}) : name(std::move(n)), baselines(std::move(b)) {}
  Result& add(std::string impl, Timing t, double work = 0.0, bool bytes = false);
};

class Context {
 public:
  Context(Options o, std::string fam) : opt(std::move(o)), family(std::move(fam)) {}
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  Options opt;
  std::string family;

  // Median time of fn(). `slow` marks a baseline that is timed with fewer repeats.
  Timing time(const std::function<void()>& fn, bool slow = false);
  // Wait for the device (no-op on CPU).
  void sync() const;
  // Print the row (one JSON line on stdout).
  void add(const Row& r);
  // Free-form line printed under the family's table (e.g. batch scaling).
  void note(const std::string& s);

  at::TensorOptions f32() const { return at::TensorOptions().dtype(at::kFloat).device(opt.device); }
  bool cuda() const { return opt.device.is_cuda(); }

 private:
  Timing measure(const std::function<void()>& fn, bool slow);
  void flush_l2();
  void* flush_ = nullptr;   // CUDA: a buffer twice the L2 size, written before every repeat
  size_t flush_bytes_ = 0;
};

using FamilyFn = void (*)(Context&);
void register_family(const char* name, const char* description, FamilyFn fn);

}  // namespace tkbench

// Registration functions, one per bench_<family>.cpp.
void register_kcenter_benches();
void register_cross_entropy_benches();
void register_tree_benches();
void register_kv_select_benches();   // kv_select family
