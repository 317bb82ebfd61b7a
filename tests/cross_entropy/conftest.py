"""cross_entropy tests: CUBLAS_WORKSPACE_CONFIG for the deterministic-mode tests on CUDA.

torch releases that still demand it for deterministic cuBLAS read it when the process' first
cuBLAS call happens, so it is set here, at collection time (before any test runs a GEMM); newer
releases ignore it. A value already in the environment is kept.
"""
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
