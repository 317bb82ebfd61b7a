"""check=False: bad values never hang, crash or read out of bounds, and give the documented
results; check=True gives the CPU's errors on CUDA too; check=False paths never sync with the
host (CUDA graphs). The CPU always validates (its checks are cheap), so the CUDA-only results
of check=False are compared with brute-force models of the documented behaviour (and, where
both devices compute, with the CPU)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import tokenkernels as tk
from tokenkernels.reference import tree as ref

from .trees import chain, random_parents, unchecked_build

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
OPS = torch.ops.tokenkernels
BIG = 2**32

# parents the CPU rejects; on CUDA with check=False each bad entry detaches its node
BAD_PARENTS = [
    [[-1, 1, 0]],                       # self loop (the walk used to loop forever)
    [[-1, 2, 1]],                       # 1 -> 2 -> 1 cycle through a forward parent
    [[-1, 0, 3, 1]],                    # forward parent
    [[-1, 0, -1, 2]],                   # a second root with a child
    [[-1, 0, -5, 2]],                   # < -1
    [[-1, 7, 0], [-1, 0, 99]],          # >= n (used to read past the tree)
    [[5, 0, 1]],                        # the root's own parent is ignored
    [[-1, BIG, BIG + 1]],               # int64 beyond int32 (used to wrap to 0 and 1)
    [[-1, 0, 1 - BIG]],                 # (wrapped to 1)
]


# ------------------------------------------------------------------------------------ build
def test_unchecked_build_model_matches_reference():
    """The brute-force model of check=False is build itself on valid trees."""
    for seed, (B, n) in enumerate([(3, 1), (2, 40), (4, 130)]):
        p = random_parents(B, n, seed)
        lens = torch.randint(1, n + 1, (B,), generator=torch.Generator().manual_seed(seed))
        for got, want in zip(unchecked_build(p, lens), ref.build(p, lens)):
            assert torch.equal(got, want)


def test_unchecked_build_model_detaches():
    mask, depth, fc, ns, paths = unchecked_build(torch.tensor([[-1, 1, 0]]))
    assert depth.tolist() == [[0, 0, 1]] and fc.tolist() == [[2, -1, -1]] and ns.tolist() == [[-1, -1, -1]]
    assert paths.tolist() == [[[1, -1], [0, 2]]]
    assert ref.unpack_bits(mask, 3)[0].tolist() == [[True, False, False], [False, True, False],
                                                     [True, False, True]]


@pytest.mark.parametrize("parents", BAD_PARENTS)
def test_cpu_validates_even_unchecked(parents):
    """CPU: bad parents raise whatever `check` says (int64 values compared unwrapped)."""
    with pytest.raises(RuntimeError, match=r"tokenkernels\.tree\.build: parents\[\d+, \d+\] = -?\d+"):
        tk.tree.build(torch.tensor(parents), check=False)


def _poison_allocator(shape, device="cuda"):
    """Hand the caching allocator blocks of this shape full of 7777, so an output the kernel
    forgets to write shows up as 7777 instead of a lucky zero."""
    junk = [torch.full(shape, 7777, dtype=torch.long, device=device) for _ in range(8)]
    del junk


def _assert_build_equals(t, want):
    for name, got, w in zip(("mask", "depth", "first_child", "next_sibling", "paths"),
                            (t.mask, t.depth, t.first_child, t.next_sibling, t.paths), want):
        assert torch.equal(got.cpu(), w), name


@CUDA
@pytest.mark.parametrize("impl", ["plain", "tuned"])
@pytest.mark.parametrize("parents", BAD_PARENTS)
def test_cuda_unchecked_build_bad_parents(parents, impl):
    p = torch.tensor(parents)
    _poison_allocator(p.shape)
    t = tk.tree.build(p.cuda(), check=False, impl=impl)
    torch.cuda.synchronize()
    _assert_build_equals(t, unchecked_build(p))


@CUDA
@pytest.mark.parametrize("impl", ["plain", "tuned"])
@pytest.mark.parametrize("n", [3, 100, 1024])
def test_cuda_unchecked_build_garbage(n, impl):
    """Random parents in [-3, n + 3) plus int64 extremes, tree_lens outside [1, n]."""
    g = torch.Generator().manual_seed(n)
    p = torch.randint(-3, n + 3, (6, n), generator=g)
    p[1] = random_parents(1, n, seed=1)[0]
    p[1, n // 2] = BIG + n // 4            # one wrapped value in an otherwise valid tree
    p[2, 1:] = torch.arange(n - 1) - BIG   # all wrap to valid-looking parents (a chain)
    lens = torch.tensor([n, n, n, n + 5, -2, max(n // 2, 1)])
    _poison_allocator(p.shape)
    t = tk.tree.build(p.cuda(), lens.cuda(), check=False, impl=impl)
    torch.cuda.synchronize()
    _assert_build_equals(t, unchecked_build(p, lens))


@pytest.mark.parametrize("parents,depth,fc,want", [
    # the walk of a direct tree_paths call follows only parents in [0, j)
    ([[-1, 1, 0]], [[0, 0, 1]], [[2, -1, -1]], [[[1, -1], [0, 2]]]),
    ([[-1, 2, 1]], [[0, 0, 1]], [[-1, 2, -1]], [[[0, -1], [1, 2]]]),
    ([[-1, 0, 9]], [[0, 1, 0]], [[1, -1, -1]], [[[0, 1], [2, -1]]]),
    # inconsistent depths are not written
    ([[-1, 0, 0]], [[5, -3, 1]], [[1, -1, -1]], [[[-1, -1], [-1, 2]]]),
])
def test_paths_walk_guarded(device, parents, depth, fc, want):
    d = lambda x: torch.tensor(x, device=device)  # noqa: E731
    got = OPS.tree_paths(d(parents), d(depth), d(fc), None, 2, 1)
    assert got.cpu().tolist() == want


def test_int64_parents_rejected_unwrapped(device):
    """check=True (both devices): an int64 parent that would wrap to a valid int32 one raises."""
    p = torch.tensor([[-1, 0, BIG + 1]])
    with pytest.raises(RuntimeError, match=r"parents\[0, 2\] = 4294967297 must lie in \[0, 2\)"):
        tk.tree.build(p.to(device))


# -------------------------------------------------------------------------------- attention
def _attn_case(device, B=2, n=6, N=20, pages=None):
    par = random_parents(B, n, seed=1)
    t = tk.tree.build(par.to(device))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, n, 4, 32, generator=g).to(device)
    if pages is None:
        k = torch.randn(B, N, 2, 32, generator=g).to(device)
        v = torch.randn(B, N, 2, 32, generator=g).to(device)
    else:
        k = torch.randn(pages, 4, 2, 32, generator=g).to(device)
        v = torch.randn(pages, 4, 2, 32, generator=g).to(device)
    return t, q, k, v


def test_cpu_attention_validates_even_unchecked():
    t, q, kp, vp = _attn_case("cpu", pages=5)
    table = torch.tensor([[0, 1, 2, 3], [4, 0, 9, 1]])
    with pytest.raises(RuntimeError, match=r"block_table\[1, 2\] = 9 is not a page index"):
        tk.tree.attention(q, kp, vp, torch.tensor([3, 9]), t, block_table=table, check=False)


@CUDA
@pytest.mark.parametrize("impl", ["plain", "tuned"])
def test_cuda_unchecked_attention_clamps(impl):
    """Pages outside [0, num_pages) are clamped, prefix_lens into [0, capacity - tree_len], tree
    keys past the capacity skipped: no error, no out-of-bounds read (a later sync stays clean)."""
    t, q, kp, vp = _attn_case("cuda", pages=5)
    A = lambda *a, **kw: tk.tree.attention(*a, check=False, impl=impl, return_lse=True, **kw)  # noqa: E731
    P = torch.tensor([3, 9], device="cuda")
    bad = torch.tensor([[0, 1, -7, 3], [4, 0, 9, 1 << 40]], device="cuda")
    got = A(q, kp, vp, P, t, block_table=bad)
    want = A(q, kp, vp, P, t, block_table=bad.clamp(0, 4))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # prefix_lens: negative -> 0, too long -> capacity (4 pages * 4) - tree_len (6) = 10
    table = torch.tensor([[0, 1, 2, 3], [4, 0, 2, 1]], device="cuda")
    got = A(q, kp, vp, torch.tensor([-5, 1 << 40], device="cuda"), t, block_table=table)
    want = A(q, kp, vp, torch.tensor([0, 10], device="cuda"), t, block_table=table)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # a tree longer than the cache (6 tree tokens, 4 positions): keys past it are skipped
    tc, qc, kc, vc = _attn_case("cuda", N=4)
    out, lse = tk.tree.attention(qc, kc, vc, torch.tensor([2, 0], device="cuda"), tc, check=False, impl=impl,
                                 tree_lens=torch.tensor([6, 9], device="cuda"), return_lse=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    # row 0 (the root) attends key 0 only: its output is v of position 0
    torch.testing.assert_close(out[:, 0], vc[:, 0].repeat_interleave(2, dim=1), rtol=1e-5, atol=1e-5)


@CUDA
@pytest.mark.parametrize("impl", ["plain", "tuned"])
def test_cuda_attention_any_batch(impl):
    """B > 65535 (the grid's y/z limit): rows of every request on x."""
    B, P = 65544, 40
    g = torch.Generator(device="cuda").manual_seed(0)
    t = tk.tree.build(torch.full((B, 1), -1, device="cuda"), max_depth=0, max_leaves=1, check=False)
    q = torch.randn(B, 1, 2, 32, device="cuda", generator=g)
    k = torch.randn(B, P + 1, 2, 32, device="cuda", generator=g)
    v = torch.randn(B, P + 1, 2, 32, device="cuda", generator=g)
    out = tk.tree.attention(q, k, v, torch.full((B,), P, device="cuda"), t, impl=impl, check=False)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=2e-5)
    assert (out[-1].abs().sum() > 0).item()   # the last request was computed too


