"""Dynamic trees: select_frontier / select_tree vs the reference, and DynamicTreeDrafter."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenkernels as tk
from tokenkernels.reference import tree as ref

from tokenkernels.testing import random_parents
from tokenkernels.variants import impls

IMPLS = impls("tree")   # "auto", the CUDA variants (one selection kernel per device), "reference"


def same(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert torch.equal(a.cpu(), b), (a, b)


def brute_frontier(cum, child, m):
    """Independent oracle: every (f, k) scored in fp32, sorted by (-score, flat index)."""
    B, F, K = child.shape
    out = []
    for b in range(B):
        cand = sorted(((-float(torch.tensor(float(cum[b, f]), dtype=torch.float32) + float(child[b, f, k])), f * K + k)
                       for f in range(F) for k in range(K)))[:m]
        out.append(cand)
    par = torch.tensor([[i // K for _, i in c] for c in out], dtype=torch.long).view(B, m)
    rank = torch.tensor([[i % K for _, i in c] for c in out], dtype=torch.long).view(B, m)
    return par, rank


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_select_frontier(device, dtype, impl):
    g = torch.Generator().manual_seed(0)
    cum = (-torch.rand(3, 10, generator=g) * 5).to(dtype)
    child = torch.log_softmax(torch.randn(3, 10, 10, generator=g), -1).topk(10, -1).values.to(dtype)
    got = tk.tree.select_frontier(cum.to(device), child.to(device), 10, impl=impl)
    same(got, ref.select_frontier(cum, child, 10))
    assert (got[2][:, 1:] <= got[2][:, :-1]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("F,K,m", [pytest.param(1, 1, 1, id="F1-K1-m1"), pytest.param(7, 3, 7, id="F7-K3-m7"),
                                   pytest.param(43, 3, 129, id="F43-K3-m129"),
                                   pytest.param(100, 10, 1000, id="F100-K10-m1000")])
def test_select_frontier_sizes_noncontiguous(device, F, K, m, impl):
    """Odd sizes and strided inputs against a brute-force oracle (tie-free fp32 scores)."""
    g = torch.Generator().manual_seed(F)
    cum = -torch.rand(2, F, generator=g) * 5
    child = -torch.rand(2, F, K, generator=g) * 5
    cum_s = cum.t().contiguous().t().to(device)
    child_s = child.transpose(0, 2).contiguous().transpose(0, 2).to(device)
    assert not (cum_s.is_contiguous() or child_s.is_contiguous()) or F == 1
    par, rank, score = tk.tree.select_frontier(cum_s, child_s, m, impl=impl)
    want_par, want_rank = brute_frontier(cum, child, m)
    assert torch.equal(par.cpu(), want_par) and torch.equal(rank.cpu(), want_rank)
    assert torch.equal(score.cpu(), (cum[:, :, None] + child).reshape(2, -1).gather(1, want_par * K + want_rank))


@pytest.mark.parametrize("impl", IMPLS)
def test_select_frontier_ties(device, impl):
    cum = torch.zeros(1, 3)
    child = torch.tensor([[[-1.0, -2.0], [-1.0, -1.0], [-2.0, -1.0]]])
    par, rank, score = tk.tree.select_frontier(cum.to(device), child.to(device), 5, impl=impl)
    assert par.tolist() == [[0, 1, 1, 2, 0]] and rank.tolist() == [[0, 0, 1, 1, 1]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,n", [pytest.param(1, 1, id="T1-n1"), pytest.param(7, 3, id="T7-n3"),
                                 pytest.param(129, 60, id="T129-n60"), pytest.param(1000, 64, id="T1000-n64")])
def test_select_tree(device, T, n, impl):
    g = torch.Generator().manual_seed(T)
    parents = random_parents(2, T, seed=T)
    logp = -torch.rand(2, T, generator=g) * 3
    logp[:, 0] = 0
    cum = torch.zeros(2, T)
    for i in range(1, T):        # cumulative log-probs: non-increasing from parent to child
        cum[:, i] = cum.gather(1, parents[:, i : i + 1]).squeeze(1) + logp[:, i]
    # strided inputs: the same values transposed in memory
    got = tk.tree.select_tree(cum.t().contiguous().t().to(device), parents.t().contiguous().t().to(device), n,
                              impl=impl)
    same(got, ref.select_tree(cum, parents, n))
    idx, new_par, _ = got
    # ancestor-closed: every kept node's new parent is its original parent
    for b in range(2):
        for r in range(1, n):
            assert int(idx[b, int(new_par[b, r])]) == int(parents[b, int(idx[b, r])])
    tk.tree.build(new_par)   # a valid tree, parents first


@settings(max_examples=25)
@given(T=st.integers(1, 80), seed=st.integers(0, 10**6), data=st.data())
def test_select_tree_hypothesis_any_scores(T, seed, data):
    """Arbitrary (non-monotone, tied) scores: kept nodes re-attach to their nearest kept ancestor."""
    n = data.draw(st.integers(1, T))
    g = torch.Generator().manual_seed(seed)
    parents = random_parents(1, T, seed)
    cum = torch.randint(-3, 1, (1, T), generator=g).float()
    got = tk.tree.select_tree(cum, parents, n)
    same(got, ref.select_tree(cum, parents, n))
    tk.tree.build(got[1])
    # independent check: the root and the n - 1 best others (ties: lower index), in node order
    keep = sorted([0] + sorted(range(1, T), key=lambda i: (-float(cum[0, i]), i))[: n - 1])
    assert got[0][0].tolist() == keep


@pytest.mark.parametrize("impl", IMPLS)
def test_dynamic_drafter_bigram(impl):
    """Drafting with a fixed bigram model: the result is a valid tree of total_tokens nodes whose
    scores are the cumulative log-probs of its tokens, and it keeps the best-scoring nodes a
    brute-force expansion finds (EAGLE-2 rule: per depth top_k children of the top_k frontier)."""
    g = torch.Generator().manual_seed(1)
    V = 12
    logits = torch.randn(V, V, generator=g) * 2
    logp = torch.log_softmax(logits, -1)

    def step(tokens, parents, frontier):
        return logp[torch.gather(tokens, 1, frontier)]

    drafter = tk.tree.DynamicTreeDrafter(step, top_k=4, depth=4, total_tokens=12, impl=impl)
    root = torch.tensor([3, 7])
    tokens, parents, score = drafter.draft(root)
    assert tokens.shape == (2, 12) and parents.shape == (2, 12)
    tree = tk.tree.build(parents)
    for b in range(2):
        assert int(tokens[b, 0]) == int(root[b])
        for i in range(1, 12):
            p = int(parents[b, i])
            want = float(score[b, p]) + float(logp[tokens[b, p], tokens[b, i]])
            assert abs(float(score[b, i]) - want) < 1e-5
    assert tree.max_depth <= 4
    # brute force, written out: per depth, every frontier node's top_k children, the top_k
    # best by cumulative log-prob (ties: lower flat index) become the next frontier; finally the
    # total_tokens best nodes (root first, ties: lower index) in node order.
    for b in range(2):
        toks, pars, cums = [int(root[b])], [-1], [0.0]
        frontier = [0]
        for _ in range(4):
            cand = []
            for fi, f in enumerate(frontier):
                lp, tk_ = logp[toks[f]].topk(4)
                for r in range(4):
                    cand.append((float(torch.tensor(cums[f], dtype=torch.float32) + lp[r]), fi * 4 + r, f, int(tk_[r])))
            cand.sort(key=lambda c: (-c[0], c[1]))
            frontier = []
            for sc, _, f, t in cand[:4]:
                frontier.append(len(toks))
                toks.append(t)
                pars.append(f)
                cums.append(sc)
        keep = sorted(sorted(range(1, len(toks)), key=lambda i: (-cums[i], i))[:11] + [0])
        pos = {j: r for r, j in enumerate(keep)}
        assert tokens[b].tolist() == [toks[j] for j in keep]
        assert parents[b].tolist() == [-1] + [pos[pars[j]] for j in keep[1:]]
