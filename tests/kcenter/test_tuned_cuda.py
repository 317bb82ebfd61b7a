"""kcenter impl="tuned" on CUDA (skipped without CUDA): the symmetric tensor-core Gram with the
key / nearest-neighbour epilogue and the REDUX + ballot register greedy
(tokenkernels/kcenter_tuned.cuh) against the fp64 replay oracle and the reference, over fp16 /
bf16 (tensor cores) and fp32 (the documented simt fallback), the sizes where the kernels change
strategy (one tile, tile tails, several tile rows, 4 -> 8 tokens per greedy thread, the 8192
limit), ragged lengths, exclude, every start rule, both metrics, B = 1 / 8, k = N, odd D
(zero-padded features), non-contiguous inputs and bad inputs.
"""
from __future__ import annotations

import pytest
import torch

import tokenkernels as tk
from tokenkernels.reference import kcenter as ref
from tokenkernels.testing import tol

from ..conftest import HAS_CUDA
from .oracle import assert_equal_where_tie_free, kcenter_margin, replay_kcenter, valid_mask

# tools/gpu_proof.py attributes these tests (no impl parameter) to the tuned variant
GPU_PROOF_IMPL = "tuned"

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DT_IDS = ["fp16", "bf16", "fp32"]


def make(B, N, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g) + 0.3).to(dtype), g


def run_and_replay(x, k, *, metric="cosine", start="isolated", lengths=None, exclude=None, **kw):
    xc = x.cuda()
    st = start.cuda() if isinstance(start, torch.Tensor) else start
    idx, rad = tk.kcenter(xc, k, metric=metric, start=st, impl="tuned", return_radii=True,
                          lengths=None if lengths is None else lengths.cuda(),
                          exclude=None if exclude is None else exclude.cuda(), **kw)
    if start == "first":
        B, N = x.shape[0], x.shape[1]
        v = valid_mask(B, N, lengths, exclude)
        rs = [int(v[b].to(torch.int8).argmax()) for b in range(B)]
    elif isinstance(start, torch.Tensor):
        rs = start.tolist()
    else:
        rs = start
    replay_kcenter(x, idx, rad, k=k, metric=metric, start=rs, lengths=lengths, exclude=exclude)
    return idx.cpu(), rad.cpu(), rs


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("N", [1, 7, 64, 65, 129, 1000, 2880])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("start", ["isolated", "first"])
def test_tuned_sizes(dtype, N, metric, start):
    B = 2
    x, _ = make(B, N, 96, dtype, N)
    k = min(N, 37)
    idx, rad, rs = run_and_replay(x, k, metric=metric, start=start)
    r_idx = ref.kcenter(x, k, metric=metric, start=start)
    margins = kcenter_margin(x, k=k, metric=metric, start=rs)
    assert_equal_where_tie_free(idx, r_idx, margins, tol(dtype, "tie_dist"))


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("B", [1, 8])
def test_tuned_issue_shape(dtype, B):
    """N = 2880, k = 288, D = 4096: the goal shape (several tile rows, 4 tokens per thread)."""
    x, _ = make(B, 2880, 4096, dtype, 5)
    idx, rad, rs = run_and_replay(x, 288)
    assert idx.shape == (B, 288) and bool((idx >= 0).all())


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("N", [4096, 4097, 8192])
def test_tuned_greedy_items_switch(dtype, N):
    """4 tokens per greedy thread up to 4096, 8 beyond (up to the 8192 limit)."""
    x, _ = make(1, N, 32, dtype, N)
    run_and_replay(x, 50, start="first")


def test_tuned_beyond_limit_runs_fallback():
    x, _ = make(1, 8193, 16, torch.bfloat16, 1)
    run_and_replay(x, 10, start="first")


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("start", ["isolated", "first", "index"])
@pytest.mark.parametrize("N", [129, 1000])
def test_tuned_ragged_exclude(dtype, metric, start, N):
    B = 4
    x, g = make(B, N, 72, dtype, 17 + N)
    lengths = torch.tensor([N, N // 2, 3, 0])
    exclude = torch.rand(B, N, generator=g) < 0.2
    exclude[1, :5] = True
    exclude[2, :3] = False                       # item 2 keeps its 3 tokens for k = 3
    v = valid_mask(B, N, lengths, exclude)
    st = start
    if start == "index":
        st = torch.tensor([int(torch.nonzero(v[b]).flatten()[-1]) if v[b].any() else 0 for b in range(B)])
    k = torch.tensor([20, 9, 3, 0])
    kw = dict(metric=metric, start=st, lengths=lengths, exclude=exclude)
    idx, rad, rs = run_and_replay(x, k, **kw, k_max=20)
    r_idx = ref.kcenter(x, k, **kw, k_max=20)
    assert_equal_where_tie_free(idx, r_idx, kcenter_margin(x, k=k, metric=metric, start=rs, lengths=lengths,
                                                           exclude=exclude), tol(dtype, "tie_dist"))


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("start", ["isolated", "first"])
def test_tuned_k_equals_n_and_check_false_pads(dtype, start):
    """k = N picks every token; with check=False and k > valid tokens the rest is -1 / NaN."""
    N = 129
    x, g = make(2, N, 40, dtype, 3)
    idx, rad, _ = run_and_replay(x, N, start=start)
    assert all(sorted(r.tolist()) == list(range(N)) for r in idx)
    lengths = torch.tensor([N, 50])
    idx2, rad2 = tk.kcenter(x.cuda(), 60, lengths=lengths.cuda(), start=start, impl="tuned",
                            return_radii=True, check=False)
    assert bool((idx2[1, 50:] == -1).all()) and bool(torch.isnan(rad2[1, 50:]).all())
    assert bool((idx2[1, :50] >= 0).all()) and bool((idx2[1, :50] < 50).all())


@pytest.mark.parametrize("D", [1, 3, 13, 100])
def test_tuned_odd_feature_counts(D):
    """D % 8 != 0: the adapter zero-pads features to 16-byte rows (norms and dots unchanged)."""
    x, _ = make(2, 200, D, torch.bfloat16, D)
    run_and_replay(x, 30)
    run_and_replay(x, 30, metric="l2", start="first")


def test_tuned_non_contiguous_and_sorted():
    base, _ = make(2, 300, 128, torch.float16, 9)
    x = base[:, ::2, ::2]                        # (2, 150, 64), strided
    assert not x.is_contiguous()
    idx, rad, _ = run_and_replay(x, 25)
    s_idx, s_rad = tk.kcenter(x.cuda(), 25, impl="tuned", sorted=True, return_radii=True)
    o_idx, o_rad = tk.kcenter(x.contiguous().cuda(), 25, impl="tuned", return_radii=True)
    perm = torch.argsort(o_idx.cpu(), dim=1)
    assert torch.equal(s_idx.cpu(), o_idx.cpu().gather(1, perm))
    assert torch.equal(s_rad.cpu(), o_rad.cpu().gather(1, perm))


def test_tuned_2d_input_and_random_start():
    x, _ = make(1, 333, 48, torch.bfloat16, 4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    idx = tk.kcenter(x[0].cuda(), 12, start="random", generator=gen, impl="tuned")
    assert idx.shape == (12,)
    rad = tk.kcenter(x[0].cuda(), 12, start=int(idx[0]), impl="tuned", return_radii=True)[1]
    replay_kcenter(x[0], idx.cpu(), rad.cpu(), k=12, metric="cosine", start=[int(idx[0])])


def test_tuned_ties_lowest_index():
    """Duplicated tokens: equal keys everywhere; the tie rule (lowest index) must hold exactly."""
    base = torch.randn(1, 5, 32)
    x = base.repeat(1, 40, 1).to(torch.bfloat16)        # 200 tokens, 5 distinct
    idx = tk.kcenter(x.cuda(), 5, metric="l2", start="first", impl="tuned").cpu()
    r_idx = ref.kcenter(x, 5, metric="l2", start="first")
    assert torch.equal(idx, r_idx)
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3, 4]


def test_tuned_matches_simt_on_fp32_fallback():
    x, _ = make(2, 257, 64, torch.float32, 2)
    a = tk.kcenter(x.cuda(), 30, impl="tuned", return_radii=True)
    b = tk.kcenter(x.cuda(), 30, impl="simt", return_radii=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_tuned_big_batch_chunks():
    """B > 65535 puts Gram items in several gridDim.y chunks."""
    B, N = 66000, 9
    base, _ = make(7, N, 16, torch.bfloat16, 8)
    b = torch.arange(B)
    x = base[b % 7].cuda()
    idx = tk.kcenter(x, 4, impl="tuned")
    assert torch.equal(idx, idx[(b % 7).cuda()])
    replay_kcenter(base.float(), idx[:7].cpu(), tk.kcenter(x[:7], 4, impl="tuned", return_radii=True)[1].cpu(),
                   k=4, metric="cosine", start="isolated")


def test_tuned_bad_inputs_same_errors():
    x = torch.randn(2, 10, 8, device="cuda", dtype=torch.bfloat16)
    for impl in ("simt", "tuned"):
        with pytest.raises(RuntimeError, match="exceeds the number of valid tokens"):
            tk.kcenter(x, 11, impl=impl)
        with pytest.raises(ValueError, match="lengths must have shape"):
            tk.kcenter(x, 2, lengths=torch.tensor([3], device="cuda"), impl=impl)
        with pytest.raises(RuntimeError, match="start index"):
            tk.kcenter(x, 2, start=torch.tensor([99, 0], device="cuda"), impl=impl)


@pytest.mark.parametrize("tile", ["64", "128"])
def test_tuned_forced_tile(tile):
    """TOKENKERNELS_KCENTER_TILE (read once per process) forces the Gram tile; both tiles give
    valid picks at the same shapes (tails, ragged, isolated) in a fresh process."""
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import torch, tokenkernels as tk
        from tests.kcenter.oracle import replay_kcenter
        g = torch.Generator().manual_seed(2)
        for N in (65, 1000, 2880):
            x = (torch.randn(2, N, 136, generator=g) + 0.3).to(torch.bfloat16)
            lengths = torch.tensor([N, N - 7])
            for metric in ("cosine", "l2"):
                idx, rad = tk.kcenter(x.cuda(), 33, lengths=lengths.cuda(), metric=metric,
                                      impl="tuned", return_radii=True)
                replay_kcenter(x, idx.cpu(), rad.cpu(), k=33, metric=metric, start="isolated",
                               lengths=lengths)
        print("ok")
    """)
    env = dict(os.environ, TOKENKERNELS_KCENTER_TILE=tile)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr
