"""tree.attention vs the fp64 reference (dense mask over prefix + tree) and the SDPA baseline."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenkernels as tk
from tokenkernels.reference import tree as ref

from tokenkernels.testing import DTYPES, MEDUSA_63, chain, random_parents, tol
from tokenkernels.variants import impls

IMPLS = impls("tree")   # "auto", the CUDA variants, "reference"


def make_case(B, n, Hq, Hkv, D, prefix, dtype, seed, device, page_size=None, lens=None, parents=None):
    g = torch.Generator().manual_seed(seed)
    if parents is None:
        parents = random_parents(B, n, seed)
    tree = tk.tree.build(parents.to(device), None if lens is None else lens.to(device))
    P = torch.tensor(prefix)
    N = int(P.max()) + n + 3
    q = torch.randn(B, n, Hq, D, generator=g)
    k = torch.randn(B, N, Hkv, D, generator=g)
    v = torch.randn(B, N, Hkv, D, generator=g)
    table = None
    if page_size is not None:
        # scatter each request's positions over shuffled pages of a shared pool
        pages_per = (N + page_size - 1) // page_size
        num_pages = B * pages_per + 5
        table = torch.randperm(num_pages, generator=g)[: B * pages_per].view(B, pages_per)
        kp = torch.randn(num_pages, page_size, Hkv, D, generator=g)
        vp = torch.randn(num_pages, page_size, Hkv, D, generator=g)
        pos = torch.arange(pages_per * page_size)
        for b in range(B):
            kp[table[b, pos // page_size], pos % page_size] = torch.cat(
                [k[b], torch.zeros(pages_per * page_size - N, Hkv, D)])
            vp[table[b, pos // page_size], pos % page_size] = torch.cat(
                [v[b], torch.zeros(pages_per * page_size - N, Hkv, D)])
        k, v = kp, vp
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return tree, cast(q), cast(k), cast(v), P.to(device), None if table is None else table.to(device)


def fp64_truth(tree, q, k, v, P, table, scale=None):
    """The oracle: the reference in fp64 on the same (upcast) inputs, on CPU."""
    return ref.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), P.cpu(), tree.to("cpu"),
                         block_table=None if table is None else table.cpu(), scale=scale, return_lse=True)


def check(tree, q, k, v, P, table, scale=None, impl="auto"):
    out, lse = tk.tree.attention(q, k, v, P, tree, block_table=table, scale=scale, return_lse=True, impl=impl)
    want, want_lse = fp64_truth(tree, q, k, v, P, table, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    err = (out.double().cpu() - want).abs().max().item()
    assert err <= tol(q.dtype, "tree_attn"), err
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    assert (lse.cpu().double()[fin] - want_lse[fin]).abs().max().item() <= tol(q.dtype, "tree_lse") * max(
        1.0, want_lse[fin].abs().max().item())
    return out, lse


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "paged16", "paged1"])
@pytest.mark.parametrize("heads", [pytest.param((4, 4), id="mha"), pytest.param((8, 2), id="gqa4")])
def test_attention_grid(device, dtype, layout, heads, impl):
    Hq, Hkv = heads
    page = {"contiguous": None, "paged16": 16, "paged1": 1}[layout]
    B, n = 3, 37
    lens = torch.tensor([37, 1, 20])
    tree, q, k, v, P, table = make_case(B, n, Hq, Hkv, 32, [300, 0, 77], dtype, 1, device, page, lens)
    out, lse = check(tree, q, k, v, P, table, impl=impl)
    assert (out[1, 1:] == 0).all() and torch.isinf(lse[1, 1:]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 7, 129, 1000])
def test_attention_sizes(device, n, impl):
    tree, q, k, v, P, table = make_case(2, n, 4, 1, 64, [1000, 3], torch.float32, n, device)
    check(tree, q, k, v, P, table, scale=0.3, impl=impl)


def test_attention_medusa_tree_vs_sdpa(device):
    """The dense-mask SDPA baseline (what the benchmark compares against) agrees too."""
    parents = tk.tree.from_paths(MEDUSA_63)[None].expand(2, 64)
    tree, q, k, v, P, _ = make_case(2, 64, 8, 2, 64, [513, 200], torch.float32, 3, device, parents=parents)
    out = tk.tree.attention(q, k, v, P, tree)
    base = ref.attention_sdpa(q.cpu(), k.cpu(), v.cpu(), P.cpu(), tree.mask.cpu())
    torch.testing.assert_close(out.cpu(), base, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_chain_equals_causal(device, impl):
    """A chain tree is ordinary causal attention over prefix + n tokens."""
    tree, q, k, v, P, _ = make_case(1, 16, 2, 2, 32, [40], torch.float32, 4, device, parents=chain(16)[None])
    out = tk.tree.attention(q, k, v, P, tree, impl=impl)
    N = 56
    causal = torch.ones(16, N, dtype=torch.bool).tril(40)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.cpu().transpose(1, 2), k.cpu()[:, :N].transpose(1, 2), v.cpu()[:, :N].transpose(1, 2), attn_mask=causal)
    torch.testing.assert_close(out.cpu(), want.transpose(1, 2), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_out(device, dtype, impl):
    tree, q, k, v, P, table = make_case(2, 9, 4, 2, 32, [50, 10], dtype, 5, device, 8)
    want, want_lse = tk.tree.attention(q, k, v, P, tree, block_table=table, return_lse=True, impl=impl)
    out = torch.full_like(q, 7.0)
    lse = torch.full(q.shape[:3], 7.0, device=device)
    got = tk.tree.attention(q, k, v, P, tree, block_table=table, out=out, lse_out=lse, impl=impl)
    assert got is out
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    out2 = torch.empty_like(q)
    got2, lse2 = tk.tree.attention(q, k, v, P, tree, block_table=table, out=out2, return_lse=True, impl=impl)
    assert got2 is out2 and torch.equal(out2, want) and torch.equal(lse2, want_lse)
    # and the fp64 truth
    truth, _ = fp64_truth(tree, q, k, v, P, table)
    assert (out.double().cpu() - truth).abs().max().item() <= tol(dtype, "tree_attn")


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_noncontiguous(device, impl):
    """Strided q, k/v caches (contiguous and paged), prefix_lens, tree_lens and block_table give
    the fp64 truth of the same values."""
    lens = torch.tensor([11, 4])
    tree, q, k, v, P, _ = make_case(2, 11, 4, 2, 32, [20, 30], torch.float32, 6, device, lens=lens)
    strided = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  same values, other strides
    every_other = lambda t: torch.stack([t, torch.zeros_like(t)], -1)[..., 0]  # noqa: E731
    qn, kn, vn = strided(q), strided(k), strided(v)
    Pn, Ln = every_other(P), every_other(tree.tree_lens)
    assert not (qn.is_contiguous() or kn.is_contiguous() or Pn.is_contiguous() or Ln.is_contiguous())
    out = tk.tree.attention(qn, kn, vn, Pn, tree.mask, tree_lens=Ln, impl=impl)
    truth, _ = fp64_truth(tree, q, k, v, P, None)
    assert (out.double().cpu() - truth).abs().max().item() <= tol(torch.float32, "tree_attn")
    assert torch.equal(out, tk.tree.attention(q, k, v, P, tree, impl=impl))
    tree, q, k, v, P, table = make_case(2, 11, 4, 2, 32, [20, 30], torch.float32, 7, device, page_size=4)
    out = tk.tree.attention(q, strided(k), strided(v), P, tree, block_table=every_other(table), impl=impl)
    truth, _ = fp64_truth(tree, q, k, v, P, table)
    assert (out.double().cpu() - truth).abs().max().item() <= tol(torch.float32, "tree_attn")


@settings(max_examples=12)
@given(n=st.integers(1, 40), G=st.sampled_from([1, 2, 4]), prefix=st.integers(0, 700),
       page=st.sampled_from([None, 3, 32]), seed=st.integers(0, 10**6))
def test_attention_hypothesis(n, G, prefix, page, seed):
    lens = torch.tensor([n, max(1, n // 2)])
    tree, q, k, v, P, table = make_case(2, n, 2 * G, 2, 32, [prefix, prefix // 3], torch.float32, seed, "cpu",
                                        page, lens)
    check(tree, q, k, v, P, table)


@pytest.mark.parametrize("impl", ["plain", "simt", "tuned", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_impls(device, impl, dtype):
    """Both CUDA prefix passes (per-row plain, shared-memory tiled; the CPU has one kernel) and the
    reference, long prefix (several splits), head dims 64 and 128."""
    for D, page in ((64, None), (128, 16)):
        lens = torch.tensor([30, 64])
        tree, q, k, v, P, table = make_case(2, 64, 8, 2, D, [2000, 700], dtype, D, device, page, lens)
        out, lse = tk.tree.attention(q, k, v, P, tree, block_table=table, return_lse=True, impl=impl)
        want, want_lse = fp64_truth(tree, q, k, v, P, table)
        assert (out.double().cpu() - want).abs().max().item() <= tol(dtype, "tree_attn")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_cpu_split_kv(dtype, threads):
    """The CPU kernel's work plans: one item per (request, KV head) on one thread; with several
    threads a long prefix is split over items (split-KV, merged by log-sum-exp) next to pairs
    that stay whole (short prefixes, an empty one), tree_lens 0 among them; the small-block path
    (<= 8 query rows per KV head) and the BLAS one (more rows); HF's (B, H_kv, N, D) cache as a
    transpose(1, 2) view."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 8 query rows per KV head: small-block path, 4096-key blocks, 2 and 3 threads split request
        # 0's prefix (chunks >= 8192 keys); 96 rows: BLAS path, 512-key blocks, 3 threads split
        # request 1's (chunks >= 1024), request 0 (empty prefix) stays whole
        for n, Hq, prefix, lens in ((4, 2, [9000, 10, 0], [4, 3, 4]), (24, 4, [0, 2500, 700], [24, 17, 0])):
            lens = torch.tensor(lens)
            tree, q, k, v, P, _ = make_case(3, n, Hq, 1, 48, prefix, dtype, n + threads, "cpu", lens=lens.clamp(min=1))
            tree = dataclasses.replace(tree, tree_lens=lens)   # build takes >= 1 node, attention 0 too
            out, lse = check(tree, q, k, v, P, None)
            assert (out[lens == 0] == 0).all() and torch.isinf(lse[lens == 0]).all()
            hf = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  (B, H, N, D) storage
            out2, lse2 = tk.tree.attention(q, hf(k), hf(v), P, tree, return_lse=True)
            assert torch.equal(out2, out) and torch.equal(lse2, lse)
    finally:
        torch.set_num_threads(old)
