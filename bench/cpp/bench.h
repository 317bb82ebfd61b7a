// tokenkernels-bench: shared harness for the C++ microbenchmarks.
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
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace tkbench {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Options {
  std::string family = "all";
  at::Device device = at::kCPU;
  bool quick = false;
  int repeats = 0;   // 0: the default for the device (and fewer for slow baselines)
  double wait_idle = 0;   // CPU: wait up to this many s for an idle machine before each measurement
};

// One timed measurement: the median over `n` repeats (after warmup), in milliseconds.
struct Timing {
  double ms = kNaN;
  int n = 0;
  double other = kNaN;   // cores other processes kept busy meanwhile (CPU only)
};

// What a family reports per case: the op's time and its baselines. Missing entries stay NaN
// and print as "-".
struct Row {
  std::string name;        // case label, e.g. "kcenter isolated B1 N576 D4096 k56"
  Timing op;               // the tokenkernels op
  double work = 0.0;       // flops (rate in GFLOP/s) or bytes (rate in GB/s), see `bytes`
  bool bytes = false;
  Timing ref;              // ATen port of the reference greedy
  Timing divprune;         // DivPrune-style loop
  Timing gemm;             // one fp32 x @ x^T (the floor of the isolated start)
  std::string match;       // op picks vs the ATen reference, e.g. "56/56"
};

// CPU seconds the whole machine spent busy (/proc/stat: all but idle and iowait) and this
// process's own CPU seconds; over an interval their difference is what other processes used.
struct LoadSample {
  double wall = 0, busy = -1, self = 0;
};
LoadSample load_sample();
// Average number of cores other processes kept busy between two samples (NaN if unknown).
double other_cores(const LoadSample& a, const LoadSample& b);

class Context {
 public:
  explicit Context(Options o) : opt(std::move(o)), case_start(load_sample()) {}
  Options opt;

  // Median time of fn(). `slow` marks a baseline that is timed with fewer repeats. With
  // --wait-idle (CPU), waits for other processes to go quiet first and measures again (up to
  // twice) when they kept more than a quarter of a core busy meanwhile.
  Timing time(const std::function<void()>& fn, bool slow = false);
  // Wait for the device (no-op on CPU).
  void sync() const;
  // Print a progress line to stderr and keep the row for the table.
  void add(Row r);
  // Free-form line printed under the table (e.g. batch scaling).
  void note(std::string s) { notes.push_back(std::move(s)); }

  at::TensorOptions f32() const { return at::TensorOptions().dtype(at::kFloat).device(opt.device); }
  bool cuda() const { return opt.device.is_cuda(); }

  std::vector<Row> rows;
  std::vector<std::string> notes;
  // Column labels of the table (a family may rename the baselines it fills in).
  std::string ref_label = "ATen-ref", alt_label = "DivPrune", floor_label = "GEMM",
              match_label = "picks=ref";
  LoadSample case_start;   // for the per-case background-load figure in the progress lines

 private:
  Timing measure(const std::function<void()>& fn, bool slow);
};

using FamilyFn = void (*)(Context&);
void register_family(const char* name, const char* description, FamilyFn fn);

}  // namespace tkbench

// Registration functions, one per bench_<family>.cpp.
void register_kcenter_benches();
void register_cross_entropy_benches();
void register_kv_select_benches();   // kv_select family
