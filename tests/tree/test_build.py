"""tree.build / from_paths vs the reference, a Medusa-style builder and brute force."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenkernels as tk
from tokenkernels.reference import tree as ref

from tokenkernels.testing import MEDUSA_63, chain, random_parents, star
from tokenkernels.variants import impls
from .trees import FIELDS, medusa_buffers

IMPLS = impls("tree")   # "auto", the CUDA variants, "reference"


def assert_matches_reference(parents, lens=None, device="cpu", dtype=torch.long, impl="auto"):
    t = tk.tree.build(parents.to(dtype).to(device), None if lens is None else lens.to(device), impl=impl)
    want = ref.build(parents, lens)
    assert isinstance(t, tk.tree.Tree) and isinstance(want, tk.tree.Tree)
    for name in FIELDS + ("parents",):
        got, w = getattr(t, name), getattr(want, name)
        assert got.dtype == w.dtype, name
        assert torch.equal(got.cpu(), w), name
    assert (t.tree_lens is None) == (lens is None)
    if lens is not None:
        assert t.tree_lens.dtype == torch.long and torch.equal(t.tree_lens.cpu(), lens)
    assert t.max_depth == want.max_depth == int(want.depth.max())
    return t


def brute_ancestors(p: torch.Tensor, L: int) -> torch.Tensor:
    """Dense ancestor-or-self matrix by an explicit walk per node (different code path)."""
    n = p.shape[0]
    A = torch.zeros(n, n, dtype=torch.bool)
    for i in range(L):
        j = i
        while j != -1:
            A[i, j] = True
            j = int(p[j])
    return A


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 7, 129, 1000, 1024])
@pytest.mark.parametrize("shape", ["chain", "star", "random"])
def test_build_shapes(device, n, shape, impl):
    if shape == "chain":
        p = chain(n)[None]
    elif shape == "star":
        p = star(n)[None]
    else:
        p = random_parents(2, n, seed=n)
    t = assert_matches_reference(p, device=device, impl=impl)
    dense = t.dense_mask().cpu()
    assert torch.equal(dense[0], brute_ancestors(p[0], n))
    if shape == "chain":
        assert torch.equal(t.depth[0].cpu(), torch.arange(n))
        assert t.paths.shape == (1, 1, n)
    if shape == "star":
        assert t.paths.shape == (1, max(n - 1, 1), 2 if n > 1 else 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_build_ragged(device, dtype, impl):
    p = random_parents(4, 75, seed=3)
    lens = torch.tensor([75, 1, 33, 64])
    p[1, 1:] = 12345          # padding entries are ignored
    t = assert_matches_reference(p, lens, device, dtype, impl)
    assert t.mask[1, 1:].abs().sum() == 0 and t.mask[1, 0, 0] == 1
    assert int(t.depth[2, 33:].abs().sum()) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_build_noncontiguous(device, impl):
    """Strided parents / tree_lens (a transposed batch, every other tree) give the same tree."""
    p = random_parents(6, 130, seed=8)
    lens = torch.tensor([130, 7, 1, 129, 64, 100])
    want = ref.build(p[::2], lens[::2])
    pt = p.t().contiguous().to(device).t()[::2]        # column-major, then a row stride of 2
    assert not pt.is_contiguous()
    t = tk.tree.build(pt, lens.to(device)[::2], impl=impl)
    for name in FIELDS:
        assert torch.equal(getattr(t, name).cpu(), getattr(want, name)), name


@pytest.mark.parametrize("impl", IMPLS)
def test_build_single_tree_and_list_lens(device, impl):
    """A 1-D parents tensor is one tree; tree_lens may be integers."""
    p = random_parents(1, 9, seed=4)[0].to(device)
    t = tk.tree.build(p, 5, impl=impl)
    want = ref.build(p.cpu()[None], torch.tensor([5]))
    assert t.batch == 1 and t.tree_lens.tolist() == [5]
    for name in FIELDS:
        assert torch.equal(getattr(t, name).cpu(), getattr(want, name)), name


def test_mask_bits_beyond_32(device):
    """Bit j of a row for j in word 1+ (n > 32): chain of 100, row 99 has all 100 bits set."""
    t = tk.tree.build(chain(100).to(device))
    words = t.mask[0, 99].cpu()
    assert words.tolist() == [-1, -1, -1, 0xF]
    assert t.mask[0, 40].cpu().tolist() == [-1, (1 << 9) - 1, 0, 0]


def test_positions(device):
    p = random_parents(2, 20, seed=5).to(device)
    t = tk.tree.build(p)
    pos = t.positions(torch.tensor([100, 7], device=device))
    assert torch.equal(pos, torch.tensor([100, 7], device=device)[:, None] + t.depth)
    assert torch.equal(t.positions(3), 3 + t.depth)


def test_from_paths_medusa_63(device):
    assert len(MEDUSA_63) == 63
    parents = tk.tree.from_paths(MEDUSA_63)
    assert parents.shape == (64,)
    t = tk.tree.build(parents.to(device))
    attn, pos, paths = medusa_buffers(MEDUSA_63)
    assert torch.equal(t.dense_mask()[0].cpu(), attn)
    assert torch.equal(t.depth[0].cpu(), pos)
    ours = sorted(tuple(x for x in row if x >= 0) for row in t.paths[0].cpu().tolist())
    assert ours == paths
    assert t.paths.shape == (1, len(paths), 5)


def test_from_paths_order_and_errors():
    p = tk.tree.from_paths([(1,), (0, 0), (0,)])
    assert p.tolist() == [-1, 0, 0, 1]           # (0,), (1,), (0, 0)
    with pytest.raises(ValueError, match="no parent path"):
        tk.tree.from_paths([(0,), (1, 0)])
    with pytest.raises(ValueError, match="twice"):
        tk.tree.from_paths([(0,), (0,)])


@settings(max_examples=30)
@given(n=st.integers(1, 90), B=st.integers(1, 3), bushy=st.floats(0, 1), seed=st.integers(0, 10**6),
       data=st.data())
def test_build_hypothesis(n, B, bushy, seed, data):
    p = random_parents(B, n, seed, bushy)
    lens = torch.tensor([data.draw(st.integers(1, n)) for _ in range(B)])
    t = assert_matches_reference(p, lens)
    dense = t.dense_mask()
    for b in range(B):   # the independent oracle too
        assert torch.equal(dense[b], brute_ancestors(p[b], int(lens[b])))


@pytest.mark.parametrize("impl", IMPLS)
def test_max_sizes_without_sync(device, impl):
    p = random_parents(2, 50, seed=9).to(device)
    t = tk.tree.build(p, impl=impl)
    t2 = tk.tree.build(p, max_depth=t.max_depth + 2, max_leaves=t.paths.shape[1] + 1, impl=impl)
    assert t2.paths.shape == (2, t.paths.shape[1] + 1, t.max_depth + 3)
    assert torch.equal(t2.paths[:, : t.paths.shape[1], : t.max_depth + 1], t.paths)
    assert (t2.paths[:, t.paths.shape[1]:] == -1).all()


@pytest.mark.parametrize("impl", ["plain", "simt", "tuned", "reference"])
def test_build_impls(device, impl):
    """Both CUDA variants (plain sibling scan, bitonic-sorted child lists; the CPU has one kernel)
    and the reference, against brute force on large ragged trees."""
    p = torch.cat([random_parents(2, 1024, seed=11, bushy=0.9), random_parents(1, 1024, seed=12, bushy=0.05)])
    lens = torch.tensor([1024, 517, 1000])
    t = assert_matches_reference(p, lens, device, impl=impl)
    dense = t.dense_mask().cpu()
    for b in range(3):
        assert torch.equal(dense[b], brute_ancestors(p[b], int(lens[b])))
