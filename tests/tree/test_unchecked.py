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

from tokenkernels.testing import chain, random_parents
from .trees import buffers, unchecked_build

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
OPS = torch.ops.tokenkernels
BIG = 2**32

# parents the CPU rejects; on CUDA with check=False each bad entry detaches its node
BAD_PARENTS = [
    pytest.param([[-1, 1, 0]], id="self-loop"),                      # the walk used to loop forever
    pytest.param([[-1, 2, 1]], id="cycle"),                          # 1 -> 2 -> 1 through a forward parent
    pytest.param([[-1, 0, 3, 1]], id="forward-parent"),
    pytest.param([[-1, 0, -1, 2]], id="second-root-with-child"),
    pytest.param([[-1, 0, -5, 2]], id="below-minus-1"),
    pytest.param([[-1, 7, 0], [-1, 0, 99]], id="beyond-n"),          # used to read past the tree
    pytest.param([[5, 0, 1]], id="root-parent-ignored"),
    pytest.param([[-1, BIG, BIG + 1]], id="int64-beyond-int32"),     # used to wrap to 0 and 1
    pytest.param([[-1, 0, 1 - BIG]], id="int64-wrapping-to-1"),
]


# ------------------------------------------------------------------------------------ build
def test_unchecked_build_model_matches_reference():
    """The brute-force model of check=False is build itself on valid trees."""
    for seed, (B, n) in enumerate([(3, 1), (2, 40), (4, 130)]):
        p = random_parents(B, n, seed)
        lens = torch.randint(1, n + 1, (B,), generator=torch.Generator().manual_seed(seed))
        for got, want in zip(unchecked_build(p, lens), buffers(ref.build(p, lens))):
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
@pytest.mark.parametrize("impl", ["plain", "simt", "tuned"])
@pytest.mark.parametrize("parents", BAD_PARENTS)
def test_cuda_unchecked_build_bad_parents(parents, impl):
    p = torch.tensor(parents)
    _poison_allocator(p.shape)
    t = tk.tree.build(p.cuda(), check=False, impl=impl)
    torch.cuda.synchronize()
    _assert_build_equals(t, unchecked_build(p))


@CUDA
@pytest.mark.parametrize("impl", ["plain", "simt", "tuned"])
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
    pytest.param([[-1, 1, 0]], [[0, 0, 1]], [[2, -1, -1]], [[[1, -1], [0, 2]]], id="self-loop"),
    pytest.param([[-1, 2, 1]], [[0, 0, 1]], [[-1, 2, -1]], [[[0, -1], [1, 2]]], id="forward-parent"),
    pytest.param([[-1, 0, 9]], [[0, 1, 0]], [[1, -1, -1]], [[[0, 1], [2, -1]]], id="beyond-n"),
    # inconsistent depths are not written
    pytest.param([[-1, 0, 0]], [[5, -3, 1]], [[1, -1, -1]], [[[-1, -1], [-1, 2]]], id="bad-depths"),
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
@pytest.mark.parametrize("impl", ["plain", "simt", "tuned"])
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
@pytest.mark.parametrize("impl", ["plain", "simt", "tuned"])
def test_cuda_attention_any_batch(impl):
    """B > 65535 (the grid's y/z limit): rows of every request on x."""
    B, P = 65544, 40
    g = torch.Generator(device="cuda").manual_seed(0)
    t = tk.tree.build(torch.full((B, 1), -1, device="cuda"), max_depth=0, max_leaves=1, check=False)
    q = torch.randn(B, 1, 2, 32, device="cuda", generator=g)
    k = torch.randn(B, P + 1, 2, 32, device="cuda", generator=g)
    v = torch.randn(B, P + 1, 2, 32, device="cuda", generator=g)
    out = tk.tree.attention(q, k, v, torch.full((B,), P, device="cuda"), t, impl=impl, check=False)
    # the reference in chunks of requests: SDPA's own kernels have grid limits of their own
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[i:i + 16384].transpose(1, 2), k[i:i + 16384].transpose(1, 2),
        v[i:i + 16384].transpose(1, 2)).transpose(1, 2) for i in range(0, B, 16384)])
    torch.testing.assert_close(out, want, rtol=1e-4, atol=2e-5)
    assert (out[-1].abs().sum() > 0).item()   # the last request was computed too


# ----------------------------------------------------------------------------------- verify
def _verify_case(device, V=5):
    p = random_parents(2, 9, seed=3)
    t = tk.tree.build(p.to(device))
    g = torch.Generator().manual_seed(4)
    draft = torch.randint(0, V, (2, 9), generator=g)
    probs = torch.softmax(torch.randn(2, 9, V, generator=g), -1)
    coins, bu = torch.rand(2, 9, generator=g), torch.rand(2, generator=g)
    return t, draft, probs, coins, bu


def test_cpu_verify_validates_even_unchecked():
    t, draft, probs, coins, bu = _verify_case("cpu")
    draft[1, 4] = -1
    with pytest.raises(RuntimeError, match=r"draft_tokens\[1, 4\] = -1 is not in \[0, V = 5\)"):
        tk.tree.verify_sampling(t, draft, probs, coins=coins, bonus_u=bu, check=False)


@CUDA
@pytest.mark.parametrize("mode", ["one_hot", "draft_probs"])
def test_cuda_unchecked_draft_tokens_skipped(mode):
    """check=False: an out-of-range draft token is never accepted and leaves the residual as it
    was (the reference's rule for such tokens)."""
    t, draft, probs, coins, bu = _verify_case("cuda")
    draft[:, 1::2] = torch.tensor([-1, 5, 1 << 40, -(1 << 40)])
    q = probs.flip(-1).contiguous() if mode == "draft_probs" else None
    c = lambda x: None if x is None else x.cuda()  # noqa: E731
    got = tk.tree.verify_sampling(t, draft.cuda(), probs.cuda(), draft_probs=c(q), coins=coins.cuda(),
                                  bonus_u=bu.cuda(), check=False)
    want = ref.verify_sampling(t.to("cpu"), draft, probs, draft_probs=q, coins=coins, bonus_u=bu, check=False)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


def _corrupt(t, **links):
    return dataclasses.replace(t, **{k: v.to(t.first_child.device) for k, v in links.items()})


@pytest.mark.parametrize("kind,argmax,greedy", [
    pytest.param("self_loop", [9, 9, 9, 9], ([0, -1, -1, -1], 0, 9), id="self-loop"),   # looped forever on node 1
    pytest.param("backward", [1, 2, 1, 9], ([0, 1, 2, -1], 2, 1), id="backward"),      # re-accepted node 1
    pytest.param("past_n", [1, 2, 3, 9], ([0, 1, 2, 3], 3, 9), id="past-n"),
])
def test_corrupt_links(device, kind, argmax, greedy):
    """Hand-made links that are not the tree's: with check=True (the default) both verifications
    raise the same error on CPU and CUDA (the CPU in any case); CUDA with check=False ends the
    walk at the corrupt link instead of looping or reading past the tree -- the reference's
    guarded walk."""
    t = tk.tree.build(chain(4)[None].to(device))   # first_child [1, 2, 3, -1], next_sibling -1
    ns = t.next_sibling.cpu().clone()
    fc = t.first_child.cpu().clone()
    if kind == "self_loop":
        ns[0, 1] = 1
        match = r"next_sibling\[0, 1\] = 1 is not -1 or a node in \(1, n = 4\)"
    elif kind == "backward":
        fc[0, 2] = 1
        match = r"first_child\[0, 2\] = 1 is not -1 or a node in \(2, n = 4\)"
    else:
        fc[0, 3] = 1 << 40
        match = r"first_child\[0, 3\] = 1099511627776 is not -1"
    bad = _corrupt(t, first_child=fc, next_sibling=ns)
    draft = torch.tensor([[0, 1, 2, 3]], device=device)
    am = torch.tensor([argmax], device=device)
    probs = torch.full((1, 4, 4), 0.25, device=device)
    coins = torch.full((1, 4), 0.99, device=device)          # rejects every candidate
    bu = torch.zeros(1, device=device)
    with pytest.raises(RuntimeError, match=match):
        tk.tree.verify_sampling(bad, draft, probs, coins=coins, bonus_u=bu)
    with pytest.raises(RuntimeError, match="verify_greedy: " + match):
        tk.tree.verify_greedy(bad, draft, am)
    # the reference's guarded walk is the documented check=False result
    acc, alen, bonus = tk.tree.verify_greedy(bad, draft, am, check=False, impl="reference")
    assert (acc[0].tolist(), int(alen), int(bonus)) == greedy
    if device == "cpu":
        with pytest.raises(RuntimeError, match="verify_greedy: " + match):
            tk.tree.verify_greedy(bad, draft, am, check=False)   # the CPU validates in any case
        return
    acc, alen, bonus = tk.tree.verify_greedy(bad, draft, am, check=False)
    assert (acc[0].tolist(), int(alen), int(bonus)) == greedy
    acc, alen, bonus = tk.tree.verify_sampling(bad, draft, probs, coins=coins, bonus_u=bu, check=False)
    torch.cuda.synchronize()
    assert alen.tolist() == [0]


@pytest.mark.parametrize("mode", ["one_hot", "draft_probs"])
def test_verify_sampling_zero_residual(device, mode):
    """check=False with target rows of no usable mass (all zero, NaN): no child is accepted there
    and the bonus is the row's last positive entry (0 if none) -- the same on both devices, the
    same as the reference, never a 0/0."""
    V = 4
    target = torch.tensor([[[0.0, 0.0, 0.0, 0.0],               # root: no mass
                            [0.0, 0.0, 0.0, 0.0],
                            [0.25, 0.25, 0.25, 0.25],
                            [0.25, 0.25, 0.25, 0.25]]]).expand(3, 4, V).clone()
    target[1, 0] = torch.tensor([0.0, math.nan, 0.5, 0.0])      # root: NaN sum -> last positive = 2
    target[2, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0])           # root accepts node 1 (token 1) ...
    target[2, 1] = 0.0                                          # ... whose row is empty
    draft = torch.tensor([[0, 1, 3, 2]]).expand(3, 4).contiguous()
    q = torch.full((3, 4, V), 0.25) if mode == "draft_probs" else None
    coins = torch.full((3, 4), 0.1)
    bu = torch.full((3,), 0.5)
    t3 = tk.tree.build(torch.tensor([[-1, 0, 0, 1]]).expand(3, 4).contiguous().to(device))
    c = lambda x: None if x is None else x.to(device)  # noqa: E731
    acc, alen, bonus = tk.tree.verify_sampling(t3, c(draft), c(target), draft_probs=c(q), coins=c(coins),
                                               bonus_u=c(bu), check=False)
    assert alen.tolist() == [0, 0, 1]
    assert acc.tolist() == [[0, -1, -1], [0, -1, -1], [0, 1, -1]]
    assert bonus.tolist() == [0, 2, 0]
    want = ref.verify_sampling(t3.to("cpu"), draft, target, draft_probs=q, coins=coins, bonus_u=bu, check=False)
    for a, b in zip((acc, alen, bonus), want):
        assert torch.equal(a.cpu(), b)


def test_verify_sampling_tiny_residual(device):
    """A residual whose mass is below fp32's smallest subnormal (3.5e-46) after a rejection: kept
    in fp64 on both devices (an fp32 residual rounded it to 0 and divided 0 by 0 at the next
    child), so the next child is accepted on CPU and CUDA alike."""
    t = tk.tree.build(torch.tensor([[-1, 0, 0]]).to(device))
    tiny = torch.tensor(1e-45).item()                          # fp32's smallest subnormal
    target = torch.tensor([[[2.0, tiny, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])   # root sum 4
    q = torch.tensor([[[0.75, 0.0, 0.5], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])      # (check=False rows)
    draft = torch.tensor([[0, 0, 1]])
    coins = torch.tensor([[0.0, 0.9, 0.5]])    # node 1: 0.9 * 0.75 >= 0.5 -> rejected
    bu = torch.tensor([0.5])
    c = lambda x: x.to(device)  # noqa: E731
    acc, alen, bonus = tk.tree.verify_sampling(t, c(draft), c(target), draft_probs=c(q), coins=c(coins),
                                               bonus_u=c(bu), check=False)
    assert acc.tolist() == [[0, 2]] and alen.tolist() == [1] and bonus.tolist() == [2]
    want = ref.verify_sampling(t.to("cpu"), draft, target, draft_probs=q, coins=coins, bonus_u=bu, check=False)
    for a, b in zip((acc, alen, bonus), want):
        assert torch.equal(a.cpu(), b)


@CUDA
@pytest.mark.parametrize("mode", ["one_hot", "draft_probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_verify_sampling_equals_cpu(mode, dtype):
    """fp64 residual and decisions on both devices: identical results over many draws, large V."""
    B, V = 256, 32000
    p = tk.tree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])[None].expand(B, 8).contiguous()
    g = torch.Generator().manual_seed(5)
    target = torch.softmax(torch.randn(B, 8, V, generator=g) * 3, -1).to(dtype)
    q = torch.softmax(torch.randn(B, 8, V, generator=g) * 3, -1).to(dtype) if mode == "draft_probs" else None
    draft = torch.multinomial(target[:, 0].float(), 8, generator=g)   # likely tokens: both outcomes happen
    coins, bu = torch.rand(B, 8, generator=g), torch.rand(B, generator=g)
    got = [tk.tree.verify_sampling(tk.tree.build(p.to(dev)), draft.to(dev), target.to(dev),
                                   draft_probs=None if q is None else q.to(dev), coins=coins.to(dev),
                                   bonus_u=bu.to(dev), check=False) for dev in ("cpu", "cuda")]
    for a, b in zip(*got):
        assert torch.equal(a, b.cpu())


# ------------------------------------------------------------------------------- sync-free
@CUDA
def test_cuda_check_false_has_no_host_sync():
    """build (sizes given), attention (out=, contiguous and paged, both impls), verify_greedy and
    verify_sampling (coins given; both modes) with check=False never sync with the host."""
    dev = "cuda"
    B, n, V = 2, 24, 50
    par = random_parents(B, n, seed=6).to(dev)
    lens = torch.tensor([24, 13], device=dev)
    t0 = tk.tree.build(par, lens)
    md, ml = t0.max_depth, t0.paths.shape[1]
    q = torch.randn(B, n, 8, 64, device=dev)
    k = torch.randn(B, 300, 2, 64, device=dev)
    v = torch.randn(B, 300, 2, 64, device=dev)
    kp, vp = k.view(B * 75, 4, 2, 64), v.view(B * 75, 4, 2, 64)
    table = torch.arange(B * 75, device=dev).view(B, 75)
    P = torch.tensor([250, 100], device=dev)
    out, lse = torch.empty_like(q), torch.empty(B, n, 8, device=dev)
    draft = torch.randint(0, V, (B, n), device=dev)
    am = torch.randint(0, V, (B, n), device=dev)
    probs = torch.softmax(torch.randn(B, n, V, device=dev), -1)
    coins, bu = torch.rand(B, n, device=dev), torch.rand(B, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for impl in ("plain", "simt", "tuned"):
            t = tk.tree.build(par, lens, max_depth=md, max_leaves=ml, check=False, impl=impl)
            tk.tree.attention(q, k, v, P, t, out=out, lse_out=lse, check=False, impl=impl)
            tk.tree.attention(q, kp, vp, P, t, block_table=table, out=out, check=False, impl=impl)
            tk.tree.verify_greedy(t, draft, am, check=False)
            tk.tree.verify_sampling(t, draft, probs, draft_probs=probs, coins=coins, bonus_u=bu, check=False)
            tk.tree.verify_sampling(t, draft, probs, draft_probs=probs, coins=coins, bonus_u=bu, check=False,
                                    mode="rsd")
            tk.tree.verify_sampling(t, draft, probs, generator=None, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # the last pass ran impl="tuned": compare with the same kernel, checked
    want = tk.tree.attention(q, kp, vp, P, t0, block_table=table, impl="tuned")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
