#!/usr/bin/env bash
# Build tokenkernels' CUDA kernels against the GPU machine's torch (torch 2.11.0+cu130, Python
# 3.12, nvcc 13.0) on a machine WITHOUT a GPU, import the result and check that every CUDA kernel
# is registered for the CUDA dispatch key. Loading libtorch_cuda and our _C needs no GPU, only the
# CUDA libraries torch links against, so these come from their PyPI wheels.
#
#   make cuda-torch-check                   (MAX_JOBS=$(JOBS); BUILD=build)
#   bash tools/cuda_torch_check.sh [--clean] [--print-wheels]
#     --clean          remove the scratch venv and build folder first (the wheel folder stays)
#     --print-wheels   only print the pip download commands (below) and exit
#
# Steps (all under build/cuda-torch unless CUDA_TORCH_CHECK_DIR says otherwise):
#   1. venv/    python3.12 -m venv; the exact wheels below, installed --no-deps --no-index from the
#               wheel folder (skipped when the venv's stamp matches this list)
#   2. cmake/   `setup.py build` (the project's own CMake + ninja driver, with TOKENKERNELS_CUDA=1,
#               TOKENKERNELS_CUDA_ARCHS=90a, TOKENKERNELS_BENCH=0) -> setup/lib.*/tokenkernels,
#               python sources and _C together; then the tokenkernels-bench binary in the same
#               CMake folder (setup.py would copy it into the source tree, so CMake builds it)
#   3. import tokenkernels from setup/lib.* (not from the source tree) and check: torch is
#      2.11.0+cu130 from the venv; the dispatcher holds exactly the schemas of
#      csrc/registration.cpp, each with a CPU kernel, and every op that a
#      TORCH_LIBRARY_IMPL(tokenkernels, CUDA, m) block in csrc/ names has a CUDA kernel; _C's
#      fatbin carries sm_90a code; a CPU and a Meta call run; tokenkernels-bench --list runs
#   4. one line: cuda-torch-check: PASS|FAIL ... (N s)
#
# Wheels. torch 2.11.0's manylinux_2_28 cp312 wheel on PyPI IS the cu130 build. Of its Linux
# requirements, only the libraries that libtorch_cpu / libtorch_cuda / libtorch_python list as
# DT_NEEDED are installed (cudart, cupti, cublas, cufft, cufile, curand, cusparse + its nvjitlink,
# cudnn, cusparselt, nccl, nvshmem) plus torch's pure-Python requirements. Not installed, since
# neither the build nor `import torch` loads them: triton, cuda-bindings, cuda-pathfinder, the
# cuda-toolkit meta-package, nvidia-cuda-nvrtc (NVRTC JIT only), nvidia-cusolver (loaded with
# libtorch_cuda_linalg on the first linalg call), nvidia-nvtx (optional). cudart and cupti are
# also in /usr/local/cuda here, but the wheels (13 MB) keep the check independent of ldconfig.
# Build tools: nvidia-cutlass (requirements/cuda.txt), cmake and ninja (requirements/lock.txt).
#
# Downloads go to a wheel folder that outlives `make clean` (CUDA_TORCH_CHECK_WHEELS, default
# ~/.cache/tokenkernels/wheels-torch2.11-cu130), with this command (it skips wheels already there;
# pip's own HTTP cache is used too where the index sends cache headers -- PyPI does; a mirror that
# sends none, like the one on the dev machine, leaves pip's cache empty, hence the wheel folder):
#   python3.12 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_25_x86_64 --platform manylinux_2_18_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_12_x86_64 --platform manylinux1_x86_64 \
#     -d "$CUDA_TORCH_CHECK_WHEELS" --find-links "$CUDA_TORCH_CHECK_WHEELS" NAME==VERSION ...
# Offline, with a folder of these wheels: PIP_NO_INDEX=1 CUDA_TORCH_CHECK_WHEELS=DIR make cuda-torch-check.
# The GPU machine needs none of them (it has torch 2.11.0+cu130 and its CUDA wheels), only
# nvidia-cutlass; --print-wheels prints both commands.
#
# Cost (2-core shared dev machine, MAX_JOBS=1): 2.27 GB of wheels (25 s there), a 3.5 GB venv;
# first run 7.6 min, a --clean run with the wheels present 5.1 min, a rerun 11 s. The compile
# itself is ~2.5 min of CPU time (_C for sm_90a ~1.6, tokenkernels-bench ~0.6).
#
# Environment: PYTHON312 (default: python3.12, else pyenv's 3.12), NVCC (default: nvcc on PATH,
# else /usr/local/cuda/bin/nvcc), CUDA_HOME (default: the toolkit of that nvcc),
# TOKENKERNELS_CUDA_ARCHS (default 90a), MAX_JOBS (default: nproc), CUDA_TORCH_CHECK_DIR,
# CUDA_TORCH_CHECK_WHEELS, CUDA_TORCH_CHECK_BENCH=0 (skip the bench binary).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$(date +%s)
step="setup"
elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "cuda-torch-check: [$(elapsed) s] $*"; }
die() { echo "cuda-torch-check: $*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || echo "cuda-torch-check: FAIL at step \"$step\" (exit $rc) after $(elapsed) s"' EXIT

clean=0 print_only=0
for a in "$@"; do
  case $a in
    --clean) clean=1 ;;
    --print-wheels) print_only=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $a (see --help)" ;;
  esac
done

WORK=${CUDA_TORCH_CHECK_DIR:-build/cuda-torch}
case $WORK in /*) ;; *) WORK=$ROOT/$WORK ;; esac
WHEELS=${CUDA_TORCH_CHECK_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/tokenkernels/wheels-torch2.11-cu130}
ARCHS=${TOKENKERNELS_CUDA_ARCHS:-90a}
JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
VENV=$WORK/venv
VPY=$VENV/bin/python

# ---------------------------------------------------------------- the exact wheels
req_pin() {  # the NAME==VERSION line of a requirements file
  local line
  line=$(grep -E "^$1==" "$2" | head -1) || true
  [ -n "$line" ] || die "no '$1==' pin in $2"
  echo "$line"
}
TORCH_PINS=(torch==2.11.0)
TORCH_PY_PINS=(filelock==4.3.1 typing_extensions==4.16.0 sympy==1.14.0 mpmath==1.3.0 networkx==3.7
  Jinja2==3.1.6 MarkupSafe==3.0.4 fsspec==2026.9.0 setuptools==81.0.0)
# cuda-toolkit[...]==13.0.2 and torch's other nvidia pins, resolved; only the libraries torch's
# shared objects are linked against (see the header).
CUDA_LIB_PINS=(nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 nvidia-cublas==13.1.0.3
  nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6 nvidia-curand==10.4.0.35
  nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88 nvidia-cudnn-cu13==9.19.0.56
  nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9 nvidia-nvshmem-cu13==3.4.5)
CUTLASS_PIN=$(req_pin nvidia-cutlass requirements/cuda.txt)
CMAKE_PIN=$(req_pin cmake requirements/lock.txt)
NINJA_PIN=$(req_pin ninja requirements/lock.txt)
BUILD_PINS=("$CUTLASS_PIN" "$CMAKE_PIN" "$NINJA_PIN")
ALL_PINS=("${TORCH_PINS[@]}" "${TORCH_PY_PINS[@]}" "${CUDA_LIB_PINS[@]}" "${BUILD_PINS[@]}")

PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_25_x86_64 manylinux_2_18_x86_64
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux1_x86_64)
DL_ARGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
for p in "${PLATFORMS[@]}"; do DL_ARGS+=(--platform "$p"); done

print_wheel_commands() {
  echo "cuda-torch-check: wheels for an offline machine (run where pip reaches the index):"
  echo "  # the GPU machine: it already holds torch 2.11.0+cu130 and its CUDA wheels; the CUDA build"
  echo "  # needs only the CUTLASS/CuTe headers there (then: PIP_FIND_LINKS=\$PWD/.whl PIP_NO_INDEX=1 make test)"
  echo "  python3 -m pip download ${DL_ARGS[*]} -d .whl $CUTLASS_PIN"
  echo "  # this check's own ${#ALL_PINS[@]} wheels, for a machine that cannot reach the index"
  echo "  # (then: PIP_NO_INDEX=1 CUDA_TORCH_CHECK_WHEELS=\$PWD/.whl make cuda-torch-check)"
  echo "  python3 -m pip download ${DL_ARGS[*]} -d .whl ${ALL_PINS[*]}"
}
if [ $print_only = 1 ]; then print_wheel_commands; exit 0; fi

# ---------------------------------------------------------------- tools
step="find python3.12 and nvcc"
find_py312() {
  local c cands=("${PYTHON312:-}" python3.12)
  if command -v pyenv >/dev/null 2>&1; then cands+=("$(pyenv root)"/versions/3.12*/bin/python3.12); fi
  cands+=(/usr/bin/python3.12 /usr/local/bin/python3.12)
  for c in "${cands[@]}"; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}
PY312=$(find_py312) || die "no working Python 3.12 with venv + ensurepip (set PYTHON312=/path/to/python3.12)"
NVCC=${NVCC:-$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)}
[ -x "$NVCC" ] || die "no nvcc (set NVCC=/path/to/nvcc); this check compiles the CUDA kernels"
if [ -z "${CUDA_HOME:-}" ]; then
  # the toolkit of that nvcc (which may be a wrapper script elsewhere, e.g. /usr/local/bin/nvcc)
  for d in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
    if [ -f "$d/include/cuda_runtime.h" ]; then CUDA_HOME=$d; break; fi
  done
fi
[ -n "${CUDA_HOME:-}" ] || die "cannot tell the CUDA toolkit of $NVCC; set CUDA_HOME"
export CUDA_HOME CUDACXX="$NVCC"
# torch's import warns (once per process: the configure step, the check) that numpy is missing;
# numpy is no requirement of torch, the build or this check
export PYTHONWARNINGS="ignore:Failed to initialize NumPy"
say "python $("$PY312" -c 'import sys; print(sys.version.split()[0])') ($PY312), $("$NVCC" --version | sed -n 's/.*\(release [0-9.]*\).*/\1/p'), CUDA_HOME=$CUDA_HOME, archs $ARCHS, $JOBS jobs, in $WORK"

if [ $clean = 1 ]; then
  step="clean"
  say "removing $WORK"
  rm -rf "$WORK"
fi
mkdir -p "$WORK" "$WHEELS"

# ---------------------------------------------------------------- 1. venv
step="venv"
stamp_want=$(printf '%s\n' "$PY312" "${ALL_PINS[@]}" | sha256sum | cut -c1-16)
stamp=$VENV/.cuda-torch-check
if [ -x "$VPY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_want" ]; then
  say "venv $VENV matches the pins (nothing downloaded or installed)"
else
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  step="download wheels"
  before=$(du -sb "$WHEELS" | cut -f1)
  say "pip download ${#ALL_PINS[@]} wheels into $WHEELS"
  "$VPY" -m pip download -q --disable-pip-version-check "${DL_ARGS[@]}" \
    -d "$WHEELS" --find-links "$WHEELS" "${ALL_PINS[@]}"
  after=$(du -sb "$WHEELS" | cut -f1)
  say "downloaded $(( (after - before) / 1000000 )) MB; the wheel folder holds $(( after / 1000000 )) MB"
  step="install wheels"
  say "pip install --no-deps --no-index (${#ALL_PINS[@]} wheels)"
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps --no-index --no-compile \
    --find-links "$WHEELS" "${ALL_PINS[@]}"
  echo "$stamp_want" > "$stamp"
  say "venv ready ($(du -sh "$VENV" | cut -f1))"
fi
export PATH="$VENV/bin:$PATH"
tv=$("$VPY" -c 'import torch.version as v; print(v.__version__, v.cuda)')
[ "$tv" = "2.11.0+cu130 13.0" ] || die "the venv's torch is '$tv', not '2.11.0+cu130 13.0'"

# ---------------------------------------------------------------- 2. build
step="build _C (setup.py)"
say "setup.py build: TOKENKERNELS_CUDA=1 TOKENKERNELS_CUDA_ARCHS=$ARCHS MAX_JOBS=$JOBS"
TOKENKERNELS_BUILD_DIR="$WORK/cmake" TOKENKERNELS_CUDA=1 TOKENKERNELS_CUDA_ARCHS="$ARCHS" \
  TOKENKERNELS_BENCH=0 MAX_JOBS="$JOBS" \
  "$VPY" setup.py -q build --build-base "$WORK/setup"
LIBDIR=$(ls -d "$WORK"/setup/lib.*-cpython-312 | head -1)
so=$(ls "$LIBDIR"/tokenkernels/_C*.so)
bench=
if [ "${CUDA_TORCH_CHECK_BENCH:-1}" != 0 ]; then
  step="build tokenkernels-bench"
  say "tokenkernels-bench in $WORK/cmake"
  cmake -S "$ROOT" -B "$WORK/cmake" -DTOKENKERNELS_BENCH=ON > "$WORK/bench-configure.log" 2>&1 ||
    { cat "$WORK/bench-configure.log"; exit 1; }
  cmake --build "$WORK/cmake" -j "$JOBS" --target tokenkernels-bench
  bench=$WORK/cmake/tokenkernels-bench
fi

# ---------------------------------------------------------------- 3. import and check
step="import and check"
say "import tokenkernels from $LIBDIR"
cd "$WORK"          # away from the source tree: python/tokenkernels must not be the one imported
PYTHONPATH="$LIBDIR" "$VPY" - "$ROOT" "$LIBDIR" "$ARCHS" "$so" <<'EOF'
import os, pathlib, re, subprocess, sys, tempfile
root, libdir, archs, so = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
bad = []
def check(ok, what):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        bad.append(what)

import torch, tokenkernels
venv_torch = os.path.realpath(torch.__file__).startswith(os.path.realpath(sys.prefix))
check(torch.__version__ == "2.11.0+cu130" and torch.version.cuda == "13.0" and venv_torch,
      f"torch {torch.__version__} (CUDA {torch.version.cuda}) from {os.path.dirname(torch.__file__)}")
check(tokenkernels._C.__file__.startswith(libdir), f"tokenkernels._C from {tokenkernels._C.__file__}")
check(so.endswith("/_C.abi3.so"), f"_C built against the stable ABI (Py_LIMITED_API): {os.path.basename(so)}")
maps = open("/proc/self/maps").read()
check(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda.so") in maps,
      "libtorch_cuda.so of that torch is loaded")
print(f"  info tokenkernels.cuda_available() = {tokenkernels.cuda_available()} "
      f"(torch.cuda.is_available() = {torch.cuda.is_available()}; no GPU needed for this check)")

src = root / "csrc"
schemas = sorted(set(re.findall(r'm\.def\(\s*"(\w+)\(', (src / "registration.cpp").read_text())))
cuda_ops = set()
for f in sorted(src.rglob("*.cpp")):
    for block in re.findall(r"TORCH_LIBRARY_IMPL\(tokenkernels,\s*CUDA,\s*m\)\s*\{(.*?)\n\}", f.read_text(), re.S):
        cuda_ops |= set(re.findall(r'm\.impl\(\s*"(\w+)"', block))
registered = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("tokenkernels::"))
check(bool(schemas) and registered == schemas,
      f"{len(registered)} tokenkernels ops registered, csrc/registration.cpp defines {len(schemas)}"
      + ("" if registered == schemas else f" (missing {sorted(set(schemas) - set(registered))}, "
                                          f"extra {sorted(set(registered) - set(schemas))})"))
has = torch._C._dispatch_has_kernel_for_dispatch_key
# (the private host planners take no tensor: they are CompositeExplicitAutograd, which serves CPU)
no_cpu = [op for op in schemas if not (has(f"tokenkernels::{op}", "CPU")
                                       or has(f"tokenkernels::{op}", "CompositeExplicitAutograd"))]
check(not no_cpu, f"every op has a CPU kernel{f' (not: {no_cpu})' if no_cpu else ''}")
no_cuda = sorted(op for op in cuda_ops if not has(f"tokenkernels::{op}", "CUDA"))
check(bool(cuda_ops) and not no_cuda,
      f"{len(cuda_ops) - len(no_cuda)} of the {len(cuda_ops)} ops with a CUDA implementation in csrc/ "
      f"have a CUDA kernel{f' (not: {no_cuda})' if no_cuda else ''}")
op = torch.ops.tokenkernels.kcenter_select.default
check(op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CUDA),
      "torch.ops.tokenkernels.kcenter_select.default.has_kernel_for_dispatch_key(DispatchKey.CUDA)")

with tempfile.TemporaryDirectory() as tmp:
    fat = os.path.join(tmp, "fatbin")
    r = subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", so, fat],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  info objcopy failed ({r.stderr.strip()}); fatbin not inspected")
    else:
        data = open(fat, "rb").read()
        for a in filter(None, archs.split(";")):
            n = data.count(f"sm_{a}".encode())
            check(n > 0, f"_C's fatbin ({len(data) // 1000} kB) carries sm_{a} code ({n} mentions)")

x = torch.randn(2, 40, 8)
picks = tokenkernels.kcenter(x, 5)
check(tuple(picks.shape) == (2, 5) and bool(((picks >= 0) & (picks < 40)).all()), "kcenter runs on CPU")
m = tokenkernels.kcenter(torch.empty(2, 40, 8, device="meta"), 5)
check(m.device.type == "meta" and tuple(m.shape) == (2, 5), "kcenter runs on Meta (register_fake)")
sys.exit(1 if bad else 0)
EOF
if [ -n "$bench" ]; then
  "$bench" --list > "$WORK/bench-list.txt" || { cat "$WORK/bench-list.txt"; die "tokenkernels-bench --list failed"; }
  echo "  ok   tokenkernels-bench --list runs ($(wc -l < "$WORK/bench-list.txt") families)"
fi
cd "$ROOT"

step="done"
print_wheel_commands
echo "cuda-torch-check: PASS: CUDA kernels (sm_${ARCHS//;/ + sm_}) built against torch 2.11.0+cu130 / Python 3.12 and registered for CUDA, in $(elapsed) s"
