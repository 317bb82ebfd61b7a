"""impl="tuned" backward: the recompute kernel's CuTe index arithmetic, checked on the CPU.

``cuda_host/ce_bwd_layout_check.cu`` instantiates the kernel's own compile-time configuration
(``Cfg<T>`` of csrc/include/tokenkernels/cross_entropy_bwd.cuh: swizzled shared layouts, tiled
MMA, ldmatrix copies) in host code and checks, for every thread, that a pipeline stage's layout is
a bijection whose 16-byte cp.async chunks are contiguous and aligned, that the accumulators cover
the 128 x 128 tile exactly once (what the epilogue reads its (m, n) from) and that the ldmatrix
sources of each 16-feature step cover exactly that step's slice. It needs nvcc and the CUTLASS /
CuTe headers (the nvidia-cutlass wheel the CUDA build uses), not a GPU; the binary is cached
under build/host_checks/ and rebuilt when a source is newer."""
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(__file__).resolve().parent / "cuda_host" / "ce_bwd_layout_check.cu"
HEADERS = [ROOT / "csrc" / "include" / "tokenkernels" / n
           for n in ("cross_entropy_bwd.cuh", "cross_entropy_bwd.h", "cross_entropy.h", "common.h")]


def _nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def _cutlass_include():
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return inc if (inc / "cute" / "tensor.hpp").exists() else None


NVCC, CUTLASS = _nvcc(), _cutlass_include()
pytestmark = pytest.mark.skipif(NVCC is None or CUTLASS is None,
                                reason="needs nvcc and the CUTLASS/CuTe headers (nvidia-cutlass)")


def _binary() -> Path:
    out = ROOT / "build" / "host_checks" / "ce_bwd_layout_check"
    newest = max(p.stat().st_mtime for p in [SRC, *HEADERS])
    if not out.exists() or out.stat().st_mtime < newest:
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [NVCC, "-std=c++17", "--expt-relaxed-constexpr", "-arch=sm_80", "-w",
               f"-I{ROOT / 'csrc' / 'include'}", f"-I{CUTLASS}", "-o", str(out), str(SRC)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_recompute_kernel_index_arithmetic():
    r = subprocess.run([str(_binary())], capture_output=True, text=True, timeout=300)
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 8, r.stdout + r.stderr  # 4 checks x (bf16, fp16)
    bad = [" ".join(ln) for ln in lines if ln[-1] != "0"]
    assert not bad and r.returncode == 0, bad
