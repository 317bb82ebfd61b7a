#!/usr/bin/env bash
# make sanitize: the CPU objects, tokenkernels._C and the C++ bench binary built with
# AddressSanitizer + UndefinedBehaviorSanitizer (CMake option TOKENKERNELS_SANITIZE=ON) in their
# own build folder, then the whole test suite (the bad-input fuzz suite tests/fuzz included) run
# against that module. Any sanitizer report fails the target: ASan stops at its first error,
# UBSan too (-fno-sanitize-recover=undefined), and every report -- also one from a forked fuzz
# child or a subprocess -- is written under $SAN/reports, which must stay empty.
#
#   make sanitize                     (PY=the environment's python, BUILD=build, JOBS)
#   bash tools/sanitize.sh [pytest args]   default: tests -q -x (less one peak-memory test)
#
# The venv's own tokenkernels._C is never replaced: the sanitized module sits in a copy of the
# Python package under $SAN/pkg, put first on PYTHONPATH (the check below proves it is the one
# imported). libasan must be the first library of the process, so Python runs with it (and the
# C++ runtime) in LD_PRELOAD; detect_leaks=0 since CPython (and torch's caches) keep memory until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-${TOKENKERNELS_VENV:-$ROOT/.venv}/bin/python}
SAN=${SANITIZE_DIR:-build/sanitize}
case $SAN in /*) ;; *) SAN=$ROOT/$SAN ;; esac
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
CXX=${CXX:-c++}
start=$(date +%s)
say() { echo "sanitize: [$(( $(date +%s) - start )) s] $*"; }

[ -x "$PY" ] || { echo "sanitize: no python at $PY (run make deps, or set PY=)"; exit 1; }
say "configure + build (ASan + UBSan) in $SAN/cmake with $JOBS jobs"
cmake -S "$ROOT" -B "$SAN/cmake" -G Ninja -DPython3_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$CXX" -DTOKENKERNELS_CUDA=OFF -DTOKENKERNELS_BENCH=ON \
  -DTOKENKERNELS_SANITIZE=ON > "$SAN.configure.log" 2>&1 || { cat "$SAN.configure.log"; exit 1; }
cmake --build "$SAN/cmake" -j "$JOBS" --target _C tokenkernels-bench

# the package with the sanitized module (and bench binary) in place of the normal ones
rm -rf "$SAN/pkg"
mkdir -p "$SAN/pkg"
cp -r "$ROOT/python/tokenkernels" "$SAN/pkg/"
find "$SAN/pkg" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$SAN/pkg/tokenkernels/_bin" "$SAN/pkg/tokenkernels"/_C*.so
cp "$SAN/cmake/_C.abi3.so" "$SAN/pkg/tokenkernels/"
mkdir -p "$SAN/pkg/tokenkernels/_bin"
cp "$SAN/cmake/tokenkernels-bench" "$SAN/pkg/tokenkernels/_bin/"

REPORTS=$SAN/reports
rm -rf "$REPORTS"
mkdir -p "$REPORTS"
LIBASAN=$("$CXX" -print-file-name=libasan.so)
[ -f "$LIBASAN" ] || { echo "sanitize: $CXX has no libasan.so"; exit 1; }
# libstdc++ too: python itself links no C++ runtime, so without it ASan's __cxa_throw interceptor
# finds no real __cxa_throw at start-up and the first C++ exception of any extension aborts
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so.6)
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
# allocator_may_return_null + max_allocation_size_mb: a size an op wrongly accepts fails to allocate
# (torch raises) instead of taking the machine's memory
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$REPORTS/asan:detect_odr_violation=0:allocator_may_return_null=1:max_allocation_size_mb=6144"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan"
export PYTHONPATH=$SAN/pkg${PYTHONPATH:+:$PYTHONPATH}
# the copied package is outside the checkout: point it at the shipped spec pair
export TOKENKERNELS_SPEC_PAIR=$ROOT/bench/spec_pair
export TOKENKERNELS_SANITIZE_REPORTS=$REPORTS   # the fuzz suite checks its children's reports here

"$PY" - "$SAN/pkg" <<'EOF'
import sys, tokenkernels
want = sys.argv[1]
f = tokenkernels._C.__file__
assert f.startswith(want), f"sanitize: imported {f}, not the sanitized module under {want}"
print(f"sanitize: tokenkernels._C = {f}")
EOF

args=("$@")
# (peak-memory figures are no property of the code under ASan, whose redzones and quarantine
# inflate every allocation: those tests alone stay with the normal build)
[ ${#args[@]} -gt 0 ] || args=(tests -q -x
  --deselect tests/cross_entropy/test_memory.py::test_extra_memory_far_below_logits
  --deselect "tests/cross_entropy/test_fused_cpu.py::test_fused_extra_memory_within_budget[float32]"
  --deselect "tests/cross_entropy/test_fused_cpu.py::test_fused_extra_memory_within_budget[bfloat16]")
say "pytest ${args[*]} (ASan + UBSan)"
rc=0
"$PY" -m pytest -p no:cacheprovider "${args[@]}" || rc=$?
unset LD_PRELOAD
# a report is any log line but ASan's "failed to allocate" warning (allocator_may_return_null:
# a huge size that fails to allocate, judged by the fuzz suite as the op's error), except the
# signal a test sends itself on purpose with os.kill (tests/tools/test_gpu_proof.py simulates a
# crashing test that way; ASan's SEGV handler logs it like a fault)
found=()
for f in "$REPORTS"/*; do
  [ -e "$f" ] || continue
  if grep -qvE '^==[0-9]+==WARNING: AddressSanitizer failed to allocate 0x[0-9a-f]+ bytes$|^$' "$f" &&
     ! grep -q ' in os_kill_impl ' "$f"; then
    found+=("$f")
  fi
done
if [ ${#found[@]} -gt 0 ]; then
  for f in "${found[@]}"; do echo "==== $f"; head -n 60 "$f"; done
  say "FAIL: ${#found[@]} sanitizer report(s) in $REPORTS"
  exit 1
fi
[ $rc -eq 0 ] || { say "FAIL: pytest exit $rc (no sanitizer report)"; exit $rc; }
say "PASS: the test suite and the fuzz suite ran under ASan + UBSan with 0 reports"
