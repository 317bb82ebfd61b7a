"""verify_sampling(mode="rsd"): Recursive Speculative Decoding (siblings drawn from the draft
without replacement, verified by recursive rejection sampling) -- kernels vs the reference, a
hand-computed case, the option's errors, and losslessness of the first and second emitted token
under temperature / top-k / top-p warping, with the power to reject a lossy combination."""
from __future__ import annotations

import pytest
import torch

import tokenkernels as tk
from tokenkernels.reference import tree as ref
from tokenkernels.testing import MEDUSA_63, random_parents
from tokenkernels.variants import impls

from .test_verify import chi2, chi2_crit

IMPLS = impls("tree")
OPS = torch.ops.tokenkernels


def gen(seed):
    return torch.Generator().manual_seed(seed)


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution of `logits` (..., V): temperature, then top-k, then top-p (the
    smallest set of most likely tokens whose mass reaches top_p), renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    kth = torch.topk(p, top_k, -1).values[..., -1:]
    p = torch.where(p >= kth, p, torch.zeros_like(p))
    p = p / p.sum(-1, keepdim=True)
    sp, order = torch.sort(p, -1, descending=True)
    before = sp.cumsum(-1) - sp                        # mass of the tokens ranked above
    keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, before < top_p)
    p = torch.where(keep, p, torch.zeros_like(p))
    return (p / p.sum(-1, keepdim=True)).float()


def children_of(parents: torch.Tensor):
    """{node: [children in node order]} of one tree's parents (n,)."""
    kids = {}
    for i in range(1, parents.numel()):
        kids.setdefault(int(parents[i]), []).append(i)
    return kids


def draw_children(qu: torch.Tensor, k: int, g, replacement: bool) -> torch.Tensor:
    """(B, k) tokens of k siblings drawn from qu (B, V): i.i.d., or without replacement by
    Gumbel-top-k (the k largest log q + Gumbel noise, in rank order: sequential sampling without
    replacement). Past q's support Gumbel-top-k ranks the zero-probability tokens (log q = -inf)
    last, in arbitrary order; more siblings than V get random tokens (duplicates)."""
    B, V = qu.shape
    if replacement:
        return torch.multinomial(qu.double(), k, replacement=True, generator=g)
    u = torch.rand(B, V, generator=g, dtype=torch.float64).clamp_min(1e-300)
    ranked = torch.argsort(qu.double().log() - torch.log(-torch.log(u)), -1, descending=True)
    return torch.cat([ranked[:, :min(k, V)], torch.randint(0, V, (B, max(0, k - V)), generator=g)], 1)


def draw_siblings(parents: torch.Tensor, q: torch.Tensor, g, replacement: bool) -> torch.Tensor:
    """Draft tokens (B, n) of B trees of the shape `parents` (n,): the children of node u drawn
    from q[:, u] (q: (B, n, V)) by :func:`draw_children`."""
    B, n, V = q.shape
    draft = torch.zeros(B, n, dtype=torch.long)
    for u, kids in children_of(parents).items():
        draft[:, kids] = draw_children(q[:, u], len(kids), g, replacement)
    return draft


# ---------------------------------------------------------------------- kernels vs reference
DTYPES = [pytest.param((torch.float32, torch.float32), id="fp32"),
          pytest.param((torch.float64, torch.float64), id="fp64"),
          pytest.param((torch.bfloat16, torch.bfloat16), id="bf16"),
          pytest.param((torch.float16, torch.float32), id="fp16-target-fp32-draft")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("draws", ["without_replacement", "iid", "top_k_exhausted"])
@pytest.mark.parametrize("n", [1, 7, 129, 1000])
def test_rsd_vs_reference(device, n, draws, dtypes, impl):
    """The kernels (every impl, the reference on the tree's device too) against the reference
    on CPU with the same coins: trees of odd sizes, siblings drawn without replacement, i.i.d.
    (duplicates: the q' = 0 path) or from top-3 draft rows with more children than tokens (q's
    support exhausted), strided int32 tokens."""
    B, V = 3, 7
    g = gen(n)
    par = random_parents(B, n, seed=n, bushy=0.4)
    tree = tk.tree.build(par.to(device))
    target = torch.softmax(torch.randn(B, n, V, generator=g) / 0.5, -1)
    if draws == "top_k_exhausted":
        q = warp(torch.randn(B, n, V, generator=g), 0.7, 3, 1.0)
    else:
        q = torch.softmax(torch.randn(B, n, V, generator=g) / 0.5, -1)
    draft = torch.stack([draw_siblings(par[b], q[b:b + 1], g, draws == "iid")[0] for b in range(B)])
    coins, bu = torch.rand(B, n, generator=g), torch.rand(B, generator=g)
    target, q = target.to(dtypes[0]), q.to(dtypes[1])
    check = dtypes[0] in (torch.float32, torch.float64)   # low-precision rows sum to 1 only within rounding
    d = lambda t: t.to(device)  # noqa: E731
    strided = d(draft.int()).t().contiguous().t()
    got = tk.tree.verify_sampling(tree, strided, d(target), draft_probs=d(q), coins=d(coins), bonus_u=d(bu),
                                  check=check, impl=impl, mode="rsd")
    want = ref.verify_sampling(tree.to("cpu"), draft, target, draft_probs=q, coins=coins, bonus_u=bu,
                               check=check, mode="rsd")
    # exact: every implementation decides in fp64 with the same formulas (only the summation
    # order of the residuals' sums differs; a tie within their last bits has probability ~1e-16)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    acc, alen, _ = got
    assert torch.equal((acc >= 0).sum(1) - 1, alen)


MIXED = [pytest.param((torch.float32, torch.float32), id="fp32"),
         pytest.param((torch.float16, torch.float16), id="fp16"),
         pytest.param((torch.bfloat16, torch.float32), id="bf16-target-fp32-draft"),
         pytest.param((torch.float32, torch.float16), id="fp32-target-fp16-draft"),
         pytest.param((torch.float64, torch.bfloat16), id="fp64-target-bf16-draft")]


@pytest.mark.parametrize("dtypes", MIXED)
@pytest.mark.parametrize("mode", ["specinfer", "rsd"])
@pytest.mark.parametrize("V", [1, 3, 4, 5, 8, 11, 64, 1001])
def test_verify_sampling_vocab_blocks(device, V, mode, dtypes):
    """Both rules against the reference over vocabulary sizes around the CPU kernel's 4-entry
    blocks (the residual passes run on 4-blocks with a tail, and RSD masks the rejected token
    out of the draft residual's sum inside its block) and over (mixed) dtype pairs read in
    place; Medusa trees with siblings drawn as the mode assumes."""
    B = 6
    g = gen(V)
    p = tk.tree.from_paths(MEDUSA_63)[None].expand(B, 64).contiguous()
    tree = tk.tree.build(p.to(device))
    target = torch.softmax(torch.randn(B, 64, V, generator=g), -1)
    q = torch.softmax(torch.randn(B, 64, V, generator=g) * 1.5, -1)
    target = (0.5 * target + 0.5 * q).to(dtypes[0])   # overlapping rows: acceptances and rejections
    q = q.to(dtypes[1])
    draft = draw_siblings(p[0], q.double(), g, replacement=mode == "specinfer")
    coins, bu = torch.rand(B, 64, generator=g), torch.rand(B, generator=g)
    d = lambda t: t.to(device)  # noqa: E731
    got = tk.tree.verify_sampling(tree, d(draft), d(target), draft_probs=d(q), coins=d(coins), bonus_u=d(bu),
                                  check=False, mode=mode)
    want = ref.verify_sampling(tree.to("cpu"), draft, target, draft_probs=q, coins=coins, bonus_u=bu,
                               check=False, mode=mode)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("impl", IMPLS)
def test_rsd_medusa_differs_from_specinfer(device, impl):
    """On a Medusa tree the two rules give different walks for some coins (the q update
    matters), and each matches its reference."""
    g = gen(5)
    p = tk.tree.from_paths(MEDUSA_63)[None].expand(64, 64).contiguous()
    tree = tk.tree.build(p.to(device))
    B, n, V = 64, 64, 10
    target = torch.softmax(torch.randn(B, n, V, generator=g), -1)
    q = torch.softmax(torch.randn(B, n, V, generator=g) * 2, -1)
    draft = draw_siblings(p[0], q, g, replacement=False)
    coins, bu = torch.rand(B, n, generator=g), torch.rand(B, generator=g)
    d = lambda t: t.to(device)  # noqa: E731
    out = {}
    for mode in ("specinfer", "rsd"):
        out[mode] = tk.tree.verify_sampling(tree, d(draft), d(target), draft_probs=d(q), coins=d(coins),
                                            bonus_u=d(bu), impl=impl, mode=mode)
        want = ref.verify_sampling(tree.to("cpu"), draft, target, draft_probs=q, coins=coins, bonus_u=bu, mode=mode)
        for a, b in zip(out[mode], want):
            assert torch.equal(a.cpu(), b)
    assert not torch.equal(out["specinfer"][0], out["rsd"][0])


@pytest.mark.parametrize("impl", IMPLS)
def test_rsd_hand_computed(device, impl):
    """Root with two children (tokens 0, 1), p = (.3, .5, .2), q = (.6, .3, .1). Child 1 is
    accepted with min(1, .3/.6) = .5; rejected, p1 = max(p - q, 0) / .3 = (0, 2/3, 1/3) and
    q1 = (0, .3, .1) / .4 = (0, .75, .25), so child 2 is accepted with min(1, (2/3)/.75) = 8/9
    (SpecInfer, with q unchanged: min(1, (2/3)/.3) = 1); rejected again,
    p2 = max(p1 - q1, 0) = (0, 0, 1/12) -> the bonus is token 2 whatever bonus_u."""
    tree = tk.tree.build(torch.tensor([[-1, 0, 0]], device=device))
    target = torch.tensor([[[.3, .5, .2], [1., 0., 0.], [0., 1., 0.]]], dtype=torch.float64, device=device)
    q = torch.tensor([[.6, .3, .1]] * 3, dtype=torch.float64, device=device)[None]
    draft = torch.tensor([[0, 0, 1]], device=device)
    bu = torch.tensor([0.5], device=device)

    def run(c2, mode):
        coins = torch.tensor([[0.0, 0.9, c2]], device=device)
        acc, alen, bonus = tk.tree.verify_sampling(tree, draft, target, draft_probs=q, coins=coins, bonus_u=bu,
                                                   impl=impl, mode=mode)
        return acc.tolist(), alen.tolist(), bonus.tolist()

    assert run(0.95, "rsd") == ([[0, -1]], [0], [2])        # 0.95 * .75 > 2/3: rejected
    assert run(0.85, "rsd") == ([[0, 2]], [1], [1])         # 0.85 * .75 < 2/3: accepted
    assert run(0.95, "specinfer") == ([[0, 2]], [1], [1])   # SpecInfer accepts with probability 1
    coins = torch.tensor([[0.0, 0.4, 0.0]], device=device)   # 0.4 * .6 < .3: child 1 in both modes
    for mode in ("specinfer", "rsd"):
        acc, alen, bonus = tk.tree.verify_sampling(tree, draft, target, draft_probs=q, coins=coins, bonus_u=bu,
                                                   impl=impl, mode=mode)
        assert acc.tolist() == [[0, 1]] and bonus.tolist() == [0]


@pytest.mark.parametrize("impl", IMPLS)
def test_rsd_one_hot_is_specinfer(device, impl):
    """Without draft_probs (deterministic candidates) the two modes are the same rule."""
    g = gen(3)
    par = random_parents(4, 60, seed=3, bushy=0.4)
    tree = tk.tree.build(par.to(device))
    target = torch.softmax(torch.randn(4, 60, 5, generator=g), -1).to(device)
    draft = torch.randint(0, 5, (4, 60), generator=g).to(device)
    coins, bu = torch.rand(4, 60, generator=g).to(device), torch.rand(4, generator=g).to(device)
    a = tk.tree.verify_sampling(tree, draft, target, coins=coins, bonus_u=bu, impl=impl, mode="rsd")
    b = tk.tree.verify_sampling(tree, draft, target, coins=coins, bonus_u=bu, impl=impl, mode="specinfer")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", IMPLS)
def test_rsd_unchecked_empty_draft_row(device, impl):
    """check=False: a draft row without usable mass (zeros, a NaN) makes every child of that node
    a deterministic candidate (the one-hot rule, as without draft_probs), the same on every
    implementation; a usable row (tree 2) is RSD's."""
    g = gen(8)
    par = torch.tensor([[-1, 0, 0, 0]]).expand(3, 4).contiguous()
    tree = tk.tree.build(par.to(device))
    target = torch.softmax(torch.randn(3, 4, 4, generator=g), -1)
    q = torch.softmax(torch.randn(3, 4, 4, generator=g), -1)
    q[0, 0] = 0.0
    q[1, 0, 2] = float("nan")
    draft = torch.randint(0, 4, (3, 4), generator=g)
    coins, bu = torch.rand(3, 4, generator=g), torch.rand(3, generator=g)
    d = lambda t: t.to(device)  # noqa: E731
    got = tk.tree.verify_sampling(tree, d(draft), d(target), draft_probs=d(q), coins=d(coins), bonus_u=d(bu),
                                  check=False, impl=impl, mode="rsd")
    one_hot = ref.verify_sampling(tree.to("cpu"), draft, target, coins=coins, bonus_u=bu, check=False)
    want = ref.verify_sampling(tree.to("cpu"), draft, target, draft_probs=q, coins=coins, bonus_u=bu, check=False,
                               mode="rsd")
    for a, b, c in zip(got, one_hot, want):
        assert torch.equal(a.cpu()[:2], b[:2]) and torch.equal(a.cpu(), c)


@pytest.mark.parametrize("impl", IMPLS)
def test_rsd_bad_mode(device, impl):
    tree = tk.tree.build(torch.tensor([[-1, 0]], device=device))
    probs = torch.tensor([[[.5, .5], [.5, .5]]], device=device)
    draft = torch.zeros(1, 2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="tree.verify_sampling: mode must be one of 'specinfer', 'rsd', got 'RSD'"):
        tk.tree.verify_sampling(tree, draft, probs, mode="RSD", impl=impl)
    with pytest.raises(TypeError, match="tree.verify_sampling: mode must be a str, got NoneType"):
        tk.tree.verify_sampling(tree, draft, probs, mode=None, impl=impl)
    one = torch.zeros(1, 2, device=device)
    with pytest.raises(ValueError, match="tree.verify_sampling: mode must be one of 'specinfer', 'rsd', got ''"):
        OPS.tree_verify_sampling(tree.first_child, tree.next_sibling, draft, probs, None, one, one[:, 0],
                                 tree.max_depth, True, "")


# ------------------------------------------------------------------------------ losslessness
# A table "model" over token contexts, warped like a sampler (temperature 0.7, top-k 5, top-p
# 0.9, the same warping for target and draft): target p(. | root) = P0, p(. | x) = P1[x]; draft
# q(. | root) = Q0, q(. | x) = Q1[x] (the target's logits plus noise). The root has 3 children,
# the first two 2 each, and one grandchild goes a level deeper; the warped draft rows keep 1 to 4
# tokens, so a second sibling sometimes finds q's support exhausted (the one-hot path). Each of N draws drafts the siblings of every node from the draft at that node (without
# replacement for "rsd", i.i.d. for "specinfer"), then verifies. The first emitted token must be
# ~ P0 and, where the first is an accepted draft token x, the second ~ P1[x]: chi-square at
# significance 1e-6 (fixed seeds, so deterministic). The lossy combination (SpecInfer's rule on
# draws without replacement) must fail the same test.
V = 8
N_DRAWS = 60000
SHAPE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (0, 0, 0)]
WARP = dict(temperature=0.7, top_k=5, top_p=0.9)


def _logits(seed: int = 21, scale: float = 0.5, noise: float = 1.5):
    """Target logits at the root and after each token, and the draft's: the target's plus noise."""
    g = gen(seed)
    L0, L1 = scale * torch.randn(V, generator=g), scale * torch.randn(V, V, generator=g)
    return L0, L1, L0 + noise * torch.randn(V, generator=g), L1 + noise * torch.randn(V, V, generator=g)


def lossless_case(replacement: bool, seed: int = 21):
    g = gen(seed + 1)
    L0, L1, M0, M1 = _logits()
    P0, P1, Q0, Q1 = (warp(x, **WARP) for x in (L0, L1, M0, M1))
    parents = tk.tree.from_paths(SHAPE)
    n = parents.numel()
    depth = tk.tree.build(parents).depth[0]
    B = N_DRAWS
    draft = torch.zeros(B, n, dtype=torch.long)
    q = torch.zeros(B, n, V)
    target = torch.zeros(B, n, V)
    q[:, 0], target[:, 0] = Q0, P0
    far = warp(torch.randn(V, generator=gen(99)), **WARP)   # deeper contexts: any fixed distribution
    kids = children_of(parents)
    for u in range(n):   # parents before children: node u's distributions are set when it is reached
        if u in kids:
            draft[:, kids[u]] = draw_children(q[:, u], len(kids[u]), g, replacement)
        for c in kids.get(u, []):
            if int(depth[c]) == 1:
                q[:, c], target[:, c] = Q1[draft[:, c]], P1[draft[:, c]]
            else:
                q[:, c], target[:, c] = far, far
    return parents, draft, target, q, P0, P1


def emitted(draft, acc, alen, bonus):
    ar = torch.arange(draft.shape[0])
    first = torch.where(alen >= 1, draft[ar, acc[:, 1].clamp_min(0)], bonus)
    second = torch.where(alen >= 2, draft[ar, acc[:, 2].clamp_min(0)], bonus)
    return first, second, alen >= 1


def stats(first, second, has_second, P0, P1):
    s0 = chi2(torch.bincount(first, minlength=V), P0)
    counts = torch.zeros(V, V)
    counts.index_put_((first[has_second], second[has_second]), torch.ones(int(has_second.sum())), accumulate=True)
    s1 = chi2(counts.flatten(), (counts.sum(1, keepdim=True) * P1.double() / counts.sum()).flatten())
    return s0, s1


def run_case(device, replacement, mode):
    parents, draft, target, q, P0, P1 = lossless_case(replacement)
    B, n = draft.shape
    tree = tk.tree.build(parents[None].expand(B, n).contiguous().to(device))
    acc, alen, bonus = tk.tree.verify_sampling(tree, draft.to(device), target.to(device), draft_probs=q.to(device),
                                               generator=torch.Generator(device).manual_seed(4), mode=mode)
    first, second, has_second = emitted(draft, acc.cpu(), alen.cpu(), bonus.cpu())
    return stats(first, second, has_second, P0, P1), has_second.double().mean()


@pytest.mark.parametrize("mode", ["rsd", "specinfer"])
def test_lossless_warped(device, mode):
    """Each rule on the draws it assumes (RSD: without replacement; SpecInfer: i.i.d.) emits the
    warped target's first and second token."""
    ((s0, df0), (s1, df1)), accepted = run_case(device, replacement=mode == "specinfer", mode=mode)
    assert 0.2 < accepted < 0.95   # both acceptance and rejection are exercised
    assert s0 < chi2_crit(df0), (s0, df0, chi2_crit(df0))
    assert s1 < chi2_crit(df1), (s1, df1, chi2_crit(df1))


def test_lossless_warped_rejects_specinfer_on_draws_without_replacement(device):
    """Power: the same test rejects SpecInfer's rule (min(1, p/q) with q kept for every sibling,
    i.e. without RSD's q update) on siblings drawn without replacement -- the first and the
    second emitted token are both off the target (statistics in the thousands against critical
    values of 35 and 50)."""
    ((s0, df0), (s1, df1)), _ = run_case(device, replacement=False, mode="specinfer")
    assert s0 > chi2_crit(df0), (s0, df0, chi2_crit(df0))
    assert s1 > chi2_crit(df1), (s1, df1, chi2_crit(df1))
