# tokenkernels — the two commands a fresh machine needs:
#   make bench   install what is missing, build, print the benchmark table (GPU when present)
#   make test    install what is missing, build, run every test, and (where nvcc exists) the
#                CUDA compile-and-link check for sm_80 + sm_90a
PYTHON  ?= python3
PIP     := $(PYTHON) -m pip
NVCC    := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUTLASS := nvidia-cutlass==4.2.0.0
TORCH   := torch==2.13.0
TRANSFORMERS := transformers>=5.23,<6
BUILD   ?= build
JOBS    ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all deps build test pytest cuda-check bench bench-cpp clean

all: test

# Install only what is missing: a CUDA torch already on the machine is kept as it is.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	@$(PYTHON) -c "import pytest, hypothesis, numpy, ninja, matplotlib, setuptools, wheel" 2>/dev/null || \
		$(PIP) install -q pytest hypothesis numpy ninja matplotlib "setuptools>=64" wheel
	@command -v cmake >/dev/null 2>&1 || $(PIP) install -q "cmake>=3.18"
	@$(PYTHON) -c "import sys, transformers as t; v = tuple(int(x) for x in t.__version__.split('.')[:2]); sys.exit(not (5, 23) <= v < (6, 0))" 2>/dev/null || \
		$(PIP) install -q "$(TRANSFORMERS)"
	@if [ -n "$(NVCC)" ]; then $(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)" \
		|| $(PIP) install -q --no-deps $(CUTLASS); fi

build: deps
	MAX_JOBS=$(JOBS) $(PIP) install -q -e . --no-build-isolation --no-deps

pytest: build
	$(PYTHON) -m pytest tests -q

# Compile every .cu for sm_80 and sm_90a and link them with the CUDA adapters and the CPU
# objects into one shared library with --no-undefined. Needs nvcc, not a GPU or a CUDA torch.
cuda-check: deps
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: no nvcc on this machine, skipped"; exit 0; fi; \
	cmake -S . -B $(BUILD)/cuda-check -G Ninja -DPython3_EXECUTABLE=$$(command -v $(PYTHON)) \
		-DCMAKE_CUDA_COMPILER=$(NVCC) -DTOKENKERNELS_CUDA=OFF -DTOKENKERNELS_CUDA_CHECK=ON \
		-DTOKENKERNELS_BENCH=OFF -DTOKENKERNELS_CUDA_ARCHS="80;90a" >/dev/null && \
	cmake --build $(BUILD)/cuda-check --target tokenkernels_cuda_check -j $(JOBS) && \
	echo "cuda-check: every CUDA source compiled for sm_80 + sm_90a and linked"

test: pytest cuda-check

bench: build
	$(PYTHON) -m tokenkernels.bench

bench-cpp: build
	$(PYTHON) -m tokenkernels._bench_bin

clean:
	rm -rf $(BUILD) python/tokenkernels/_C*.so python/tokenkernels/_bin *.egg-info python/*.egg-info
