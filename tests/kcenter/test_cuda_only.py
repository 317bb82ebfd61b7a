"""CUDA-only properties of the kcenter family (skipped without CUDA):

* batches beyond the 65535 limit of gridDim.y (row kernels are launched in chunks of items);
* fp32 inputs get an IEEE fp32 Gram whatever the global TF32 / matmul-precision setting;
* every hot path is free of host syncs with ``check=False`` (under
  ``torch.cuda.set_sync_debug_mode("error")``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tokenkernels as tk
from tokenkernels.reference import kcenter as ref

from ..conftest import HAS_CUDA
from .oracle import replay_kcenter

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")

IMPLS = ["auto", "plain", "simt", "tuned", "stream"]
TINY = 1e-6


# ------------------------------------------------------------------------------ B > 65535
@pytest.mark.parametrize("impl,start", [("plain", "isolated"), ("simt", "isolated"), ("tuned", "isolated"),
                                        ("auto", "first"), ("stream", "first")])
def test_batch_beyond_grid_y_limit(impl, start):
    """B = 70001 > 65535 items: nn_keys (isolated start) and the streaming steps put items on
    gridDim.y, whose limit is 65535; every item, including those of the second launch chunk,
    must be computed, and computed for its own index (b0 offset)."""
    P, Lv, N, D, k = 7, 5, 9, 16, 4
    R = P * Lv                                  # 35 distinct (features, length) combinations
    B = 70001
    g = torch.Generator().manual_seed(11)
    base = torch.randn(P, N, D, generator=g)
    b = torch.arange(B)
    x = base[b % P].cuda()                      # item b has the inputs of item b % R
    lengths = (N - Lv + 1 + b % Lv).cuda()      # 5 .. 9 valid tokens
    idx, rad = tk.kcenter(x, k, lengths=lengths, start=start, impl=impl, return_radii=True)
    assert idx.shape == (B, k)
    rs = "isolated" if start == "isolated" else [0] * R
    replay_kcenter(x[:R], idx[:R], rad[:R], k=k, metric="cosine", start=rs, lengths=lengths[:R])
    rep = (b % R).cuda()
    assert torch.equal(idx, idx[rep]), "items past 65535 differ from their identical twins"
    assert torch.equal(rad, rad[rep])


# ------------------------------------------------------------------------------ TF32
def _radii_errors(rad, r_rad, t_rad):
    fin = torch.isfinite(t_rad)
    t = t_rad.double()[fin]
    return ((rad.cpu().double()[fin] - t).abs().max().item(),
            (r_rad.double()[fin] - t).abs().max().item())


@pytest.mark.parametrize("impl", ["plain", "simt", "tuned", "stream"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("mode", ["allow_tf32", "precision_high"])
def test_fp32_gram_ignores_global_tf32(impl, metric, mode):
    """With TF32 allowed globally, cuBLAS would round the fp32 Gram's inputs to 10 mantissa bits
    (distances ~1e-3 off for l2 here, ~2e-5 for cosine): the kernel's radii must stay as close to
    the fp64 truth as the fp32 reference's, and the user's setting must survive the call."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 257, 512, generator=g)
    k = 40
    # CPU references first, under the default precision
    r_idx, r_rad = ref.kcenter(x, k, metric=metric, return_radii=True)
    t_idx, t_rad = ref._select(x, k, metric=metric, dtype=torch.float64)
    assert torch.equal(r_idx, t_idx), "data must be tie-free for this test"
    before = torch.get_float32_matmul_precision()
    try:
        if mode == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            torch.set_float32_matmul_precision("high")
        idx, rad = tk.kcenter(x.cuda(), k, metric=metric, impl=impl, return_radii=True)
        torch.cuda.synchronize()
        assert torch.backends.cuda.matmul.allow_tf32 is True, "the TF32 setting leaked"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(idx.cpu(), t_idx)
    e_k, e_r = _radii_errors(rad, r_rad, t_rad)
    assert e_k <= e_r + TINY, (e_k, e_r)


def test_fp32_gram_ignores_tf32_env_override():
    """TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (read once at start-up) turns TF32 on for every fp32
    cuBLAS GEMM; the kcenter Gram must stay IEEE fp32 (checked in a fresh process)."""
    script = textwrap.dedent("""
        import torch, tokenkernels as tk
        from tokenkernels.reference import kcenter as ref
        assert torch.backends.cuda.matmul.allow_tf32, "the override did not take effect"
        g = torch.Generator().manual_seed(7)
        x = torch.randn(2, 257, 512, generator=g)
        t_idx, t_rad = ref._select(x, 30, metric="l2", dtype=torch.float64)
        r_idx, r_rad = ref.kcenter(x, 30, metric="l2", return_radii=True)
        idx, rad = tk.kcenter(x.cuda(), 30, metric="l2", return_radii=True)
        fin = torch.isfinite(t_rad)
        e_k = (rad.cpu().double()[fin] - t_rad[fin]).abs().max().item()
        e_r = (r_rad.double()[fin] - t_rad[fin]).abs().max().item()
        assert torch.equal(idx.cpu(), t_idx), "picks differ from the fp64 truth"
        assert e_k <= e_r + 1e-6, (e_k, e_r)
        print("ok")
    """)
    env = dict(os.environ, TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


# ------------------------------------------------------------------------------ no host syncs
def _hot_calls():
    """Every kcenter-family entry point, called the sync-free way: check=False, k a Python int
    (or a device tensor with k_max=), every tensor argument on the device."""
    dev = "cuda"
    g = torch.Generator().manual_seed(5)
    B, N, D = 3, 200, 32
    x32 = torch.randn(B, N, D, generator=g).to(dev)
    xbf = x32.to(torch.bfloat16)
    lengths = torch.tensor([200, 150, 77], device=dev)
    exclude = (torch.rand(B, N, generator=g) < 0.1).to(dev)
    kk = torch.tensor([20, 10, 5], device=dev)
    k0 = torch.tensor(7, device=dev)
    start_idx = torch.tensor([3, 1, 2], device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    text = torch.randn(B, 16, D, generator=g).to(dev)
    tl = torch.tensor([16, 8, 0], device=dev)
    calls = []
    for impl in IMPLS:
        for x in (x32, xbf):
            for start in ("isolated", "first", "random", start_idx, 2):
                calls.append(lambda x=x, s=start, i=impl: tk.kcenter(
                    x, 10, start=s, impl=i, check=False, generator=gen))
            calls.append(lambda x=x, i=impl: tk.kcenter(
                x, kk, k_max=20, lengths=lengths, exclude=exclude, metric="l2", start="first",
                sorted=True, return_radii=True, impl=i, check=False))
            calls.append(lambda x=x, i=impl: tk.kcenter(
                x, k0, k_max=7, lengths=lengths, exclude=exclude, start="random", generator=gen,
                return_radii=True, impl=i, check=False))
        calls.append(lambda i=impl: tk.kcenter(x32[0], 5, exclude=exclude[0], impl=i, check=False))
    sim = tk.mmtok_similarity(text, x32, text_lengths=tl, vision_lengths=lengths)
    calls.append(lambda: tk.mmtok_similarity(text, x32, text_lengths=tl, vision_lengths=lengths))
    calls.append(lambda: tk.coverage_select(sim, 10, lengths=lengths, row_lengths=tl + N,
                                            exclude=exclude, return_gains=True, check=False))
    calls.append(lambda: tk.coverage_select(sim, kk, k_max=20, check=False))
    calls.append(lambda: tk.coverage_select(sim[0].to(torch.bfloat16), 4, check=False))
    return calls, x32


def test_check_false_paths_are_sync_free():
    calls, x = _hot_calls()
    for c in calls:       # warm-up: lazy cuBLAS handles, allocator, generator state
        c()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for c in calls:
            c()
        # the control: check=True (the default) does sync, so the mode is really on
        with pytest.raises(RuntimeError, match="synchroniz"):
            tk.kcenter(x, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
