# tokenkernels — the two commands a fresh machine needs:
#   make bench   set up the environment, build, print the quick benchmark table of every family
#                (GPU when present; FULL=1 for the full run)
#   make test    set up the environment, build, run every test, and (where nvcc exists) the
#                CUDA compile-and-link check for sm_80 + sm_90a
#
# The environment (tools/env.py): a project-local .venv with exactly requirements/lock.txt
# (torch 2.13.0 CPU, transformers, pytest, ...), seeing none of the machine's packages; on a
# machine whose python3 already holds a CUDA torch, that interpreter is used as it is and only
# missing requirements are installed. Nothing is fetched when everything is installed.
PYTHON  ?= python3
ENV_PY  := $(shell $(PYTHON) tools/env.py python)
ENV_BIN := $(dir $(ENV_PY))
NVCC    := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
BUILD   ?= build
JOBS    ?= $(shell nproc 2>/dev/null || echo 2)
# the environment's tools (cmake, ninja from the lock) come first
export PATH := $(ENV_BIN):$(PATH)

.PHONY: all deps env-check lock build test pytest sanitize cuda-check sass-check cuda-torch-check bench bench-cpp gpu-proof gpu-wheels clean distclean

all: test

deps:
	@$(PYTHON) tools/env.py ensure

env-check:
	@$(PYTHON) tools/env.py check

# Re-resolve requirements/direct.txt into requirements/lock.txt (needs the package index).
lock:
	$(PYTHON) tools/env.py lock

build: deps
	MAX_JOBS=$(JOBS) $(ENV_PY) -m pip install -q -e . --no-build-isolation --no-deps

pytest: build
	$(ENV_PY) -m pytest tests -q

# Compile every .cu for sm_80 and sm_90a and link them with the CUDA adapters and the CPU
# objects into one shared library with --no-undefined. Needs nvcc, not a GPU or a CUDA torch.
cuda-check: deps
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: no nvcc on this machine, skipped"; exit 0; fi; \
	cmake -S . -B $(BUILD)/cuda-check -G Ninja -DPython3_EXECUTABLE=$(ENV_PY) \
		-DCMAKE_CUDA_COMPILER=$(NVCC) -DTOKENKERNELS_CUDA=OFF -DTOKENKERNELS_CUDA_CHECK=ON \
		-DTOKENKERNELS_BENCH=OFF -DTOKENKERNELS_CUDA_ARCHS="80;90a" >/dev/null && \
	cmake --build $(BUILD)/cuda-check --target tokenkernels_cuda_check -j $(JOBS) && \
	echo "cuda-check: every CUDA source compiled for sm_80 + sm_90a and linked"

# Build the CUDA kernels for sm_90a against the GPU machine's torch (2.11.0+cu130, Python 3.12)
# in a scratch venv under $(BUILD)/cuda-torch, import them and check they are registered for
# CUDA. Needs nvcc and python3.12, not a GPU; downloads ~2.3 GB of wheels once
# (tools/cuda_torch_check.sh; ARGS=--clean starts afresh).
cuda-torch-check:
	MAX_JOBS=$(JOBS) CUDA_TORCH_CHECK_DIR=$(BUILD)/cuda-torch bash tools/cuda_torch_check.sh $(ARGS)

# The SASS / resource check (tools/sass_check.py): every `// sass:` expectation declared next to a
# kernel (tensor-core / async-copy instructions present, no local memory, registers, stack) holds
# in the sm_80 / sm_90a objects of the cuda-check build. Needs nvcc (skipped without), not a GPU.
sass-check: cuda-check
	@if [ -z "$(NVCC)" ]; then echo "sass-check: no nvcc on this machine, skipped"; exit 0; fi; \
	$(ENV_PY) tools/sass_check.py --build $(BUILD)/cuda-check $(if $(TABLE),--table $(TABLE),)

test: pytest cuda-check sass-check

# ASan + UBSan: the CPU objects, _C and the bench binary built with -fsanitize=address,undefined
# in $(BUILD)/sanitize (the venv's _C is never replaced), then the test suite and the bad-input
# fuzz suite (tests/fuzz) against them; any sanitizer report fails (tools/sanitize.sh; ARGS= other
# pytest arguments, default `tests -q -x`).
sanitize: deps
	PY=$(ENV_PY) JOBS=$(JOBS) SANITIZE_DIR=$(BUILD)/sanitize bash tools/sanitize.sh $(ARGS)

# quick table of every family (~2 min on 2 CPU cores); FULL=1: the full run (~20 min)
bench: build
	$(ENV_PY) -m tokenkernels.bench $(if $(FULL),--full,)

# the C++ cases (full run, ~1-1.5 min on 2 CPU cores; QUICK=1 for the quick one), printed by the
# Python harness (python -m tokenkernels.bench.cpp)
bench-cpp: build
	$(ENV_PY) -m tokenkernels.bench.cpp $(if $(QUICK),--quick,)

# GPU proof (tools/gpu_proof.py, standard library only; see bench/README.md "GPU proof"). On a GPU
# machine without internet, in one run of at most BUDGET s (default 540): install the wheels carried
# in .whl/, build for its arch, CUDA tests, compute-sanitizer, CUDA benchmarks, summary last; results
# in OUT= / RESULTS= (default $OUT, else build/gpu-proof). DRY_RUN=1: every step that needs no GPU.
gpu-proof:
	@$(PYTHON) tools/gpu_proof.py --fallback-python "$(ENV_PY)" \
		$(if $(filter 1 yes true,$(DRY_RUN)),--dry-run,) \
		$(if $(RESULTS),--results "$(RESULTS)",$(if $(OUT),--results "$(OUT)",)) \
		$(if $(BUDGET),--budget $(BUDGET),)

# Here, before a GPU session: download the wheels the GPU machine lacks into .whl/ (carry it).
gpu-wheels:
	@$(PYTHON) tools/gpu_proof.py --download-wheels --pip-python "$(ENV_PY)"

clean:
	rm -rf $(BUILD) python/tokenkernels/_C*.so python/tokenkernels/_bin *.egg-info python/*.egg-info

distclean: clean
	rm -rf .venv
