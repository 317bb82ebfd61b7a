"""verify_greedy / verify_sampling vs the reference, and losslessness of verify_sampling."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenkernels as tk
from tokenkernels.reference import tree as ref

from tokenkernels.testing import MEDUSA_63, chain, random_parents, star
from tokenkernels.variants import impls

IMPLS = impls("tree")   # "auto", the CUDA variants (one verify kernel per device), "reference"


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- greedy
def greedy_case(parents, lens, V, seed, device, hit=0.6):
    g = gen(seed)
    tree = tk.tree.build(parents.to(device), None if lens is None else lens.to(device))
    B, n = parents.shape
    draft = torch.randint(0, V, (B, n), generator=g)
    argmax = torch.randint(0, V, (B, n), generator=g)
    # make acceptance likely: the target's arg-max at a node often equals one of its children's tokens
    for b in range(B):
        for i in range(1, n):
            if torch.rand(1, generator=g) < hit:
                argmax[b, int(parents[b, i])] = draft[b, i]
    return tree, draft.to(device), argmax.to(device)


def brute_greedy(tree, draft, argmax):
    """An independent oracle: children from the parents, the first matching child in node order."""
    parents = tree.parents.cpu()
    B, n = parents.shape
    lens = [n] * B if tree.tree_lens is None else tree.tree_lens.tolist()
    acc = torch.full((B, tree.max_depth + 1), -1, dtype=torch.long)
    alen, bonus = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for b in range(B):
        path = [0]
        while True:
            u = path[-1]
            kids = [c for c in range(1, lens[b]) if int(parents[b, c]) == u
                    and int(draft[b, c]) == int(argmax[b, u])]
            if not kids:
                break
            path.append(kids[0])
        acc[b, :len(path)] = torch.tensor(path)
        alen[b], bonus[b] = len(path) - 1, int(argmax[b, path[-1]])
    return acc, alen, bonus


def check_greedy(tree, draft, argmax, impl="auto", check=True):
    got = tk.tree.verify_greedy(tree, draft, argmax, impl=impl, check=check)
    want = brute_greedy(tree, draft.cpu(), argmax.cpu())
    for a, b in zip(got, want):
        assert a.dtype == torch.long and torch.equal(a.cpu(), b)
    return got


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("shape", ["chain", "star", "medusa", "random1", "random7", "random129", "random1024"])
def test_verify_greedy(device, shape, check, impl):
    if shape == "chain":
        p = chain(50)[None]
    elif shape == "star":
        p = star(50)[None]
    elif shape == "medusa":
        p = tk.tree.from_paths(MEDUSA_63)[None].expand(3, 64)
    else:
        p = random_parents(2, int(shape[6:]), seed=1, bushy=0.2)
    tree, draft, argmax = greedy_case(p, None, 5, 2, device)
    acc, alen, bonus = check_greedy(tree, draft, argmax, impl, check)
    assert acc.shape == (p.shape[0], tree.max_depth + 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_verify_greedy_noncontiguous_int32(device, impl):
    """Strided int32 tokens (and a 1-D single tree) give the same walk."""
    p = random_parents(3, 40, seed=5)
    lens = torch.tensor([40, 13, 1])
    tree, draft, argmax = greedy_case(p, lens, 4, 6, device)
    dn = torch.stack([draft.int(), -torch.ones_like(draft.int())], -1)[..., 0]
    an = argmax.int().t().contiguous().t()
    assert not dn.is_contiguous() and not an.is_contiguous()
    want = check_greedy(tree, draft, argmax, impl)
    for a, b in zip(tk.tree.verify_greedy(tree, dn, an, impl=impl), want):
        assert torch.equal(a, b)
    one = tk.tree.build(p[0].to(device))
    got = tk.tree.verify_greedy(one, draft[0], argmax[0], impl=impl)
    for a, b in zip(got, brute_greedy(one, draft[:1].cpu(), argmax[:1].cpu())):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("impl", IMPLS)
def test_verify_greedy_full_chain_accept(device, impl):
    p = chain(6)[None]
    tree = tk.tree.build(p.to(device))
    draft = torch.tensor([[9, 1, 2, 3, 4, 5]], device=device)
    argmax = torch.tensor([[1, 2, 3, 4, 5, 6]], device=device)
    acc, alen, bonus = tk.tree.verify_greedy(tree, draft, argmax, impl=impl)
    assert acc.tolist() == [[0, 1, 2, 3, 4, 5]] and alen.tolist() == [5] and bonus.tolist() == [6]
    argmax[0, 2] = 0   # reject at node 2's child
    acc, alen, bonus = tk.tree.verify_greedy(tree, draft, argmax, impl=impl)
    assert acc.tolist() == [[0, 1, 2, -1, -1, -1]] and alen.tolist() == [2] and bonus.tolist() == [0]


@pytest.mark.parametrize("impl", IMPLS)
def test_verify_greedy_first_matching_sibling(device, impl):
    """Duplicate tokens among siblings: the first child (node order) wins."""
    p = torch.tensor([[-1, 0, 0, 0, 2, 3]])
    tree = tk.tree.build(p.to(device))
    draft = torch.tensor([[0, 4, 7, 7, 1, 2]], device=device)
    argmax = torch.tensor([[7, 0, 0, 2, 0, 0]], device=device)
    acc, alen, bonus = tk.tree.verify_greedy(tree, draft, argmax, impl=impl)
    assert acc.tolist() == [[0, 2, -1]] and alen.tolist() == [1] and bonus.tolist() == [0]


@settings(max_examples=25)
@given(n=st.integers(1, 60), B=st.integers(1, 4), V=st.integers(1, 6), seed=st.integers(0, 10**6), data=st.data())
def test_verify_greedy_hypothesis(n, B, V, seed, data):
    p = random_parents(B, n, seed, data.draw(st.floats(0, 1)))
    lens = torch.tensor([data.draw(st.integers(1, n)) for _ in range(B)])
    case = greedy_case(p, lens, V, seed, "cpu")
    for a, b in zip(check_greedy(*case), tk.tree.verify_greedy(*case, impl="reference")):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- sampling vs reference
def probs(shape, g, temp=1.0):
    return torch.softmax(torch.randn(*shape, generator=g) / temp, -1)


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("dtypes", [pytest.param((torch.float32, torch.float32), id="fp32"),
                                    pytest.param((torch.bfloat16, torch.bfloat16), id="bf16"),
                                    pytest.param((torch.float16, torch.float32), id="fp16-target-fp32-draft")])
@pytest.mark.parametrize("mode", ["one_hot", "draft_probs"])
@pytest.mark.parametrize("shape", ["medusa", "random"])
def test_verify_sampling_vs_reference(device, mode, shape, dtypes, impl):
    """The kernels (and, as an implementation, the reference on the tree's device) against the
    reference on CPU; the losslessness tests below are the independent oracle."""
    g = gen(7)
    if shape == "medusa":
        p = tk.tree.from_paths(MEDUSA_63)[None].expand(4, 64)
        lens = None
    else:
        p = random_parents(4, 90, seed=3, bushy=0.3)
        lens = torch.tensor([90, 1, 45, 60])
    B, n = p.shape
    V = 6
    tree = tk.tree.build(p.to(device), None if lens is None else lens.to(device))
    target = probs((B, n, V), g, 0.5).to(dtypes[0])
    q = probs((B, n, V), g, 0.5).to(dtypes[1]) if mode == "draft_probs" else None
    draft = torch.randint(0, V, (B, n), generator=g)
    coins, bu = torch.rand(B, n, generator=g), torch.rand(B, generator=g)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = tk.tree.verify_sampling(tree, dev(draft), dev(target), draft_probs=dev(q), coins=dev(coins), bonus_u=dev(bu),
                                  check=False, impl=impl)   # low-precision rows sum to 1 only within their rounding
    want = ref.verify_sampling(tree.to("cpu"), draft, target, draft_probs=q, coins=coins, bonus_u=bu, check=False)
    # exact: the kernels (CPU and CUDA) and the reference all decide in fp64 with the same
    # formulas; only the summation order of the residual's sum differs (a tie within its last
    # bits has probability ~1e-16 per decision)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    # accepted nodes form a root path whose tokens ... and accept_len is consistent
    acc, alen, _ = got
    assert torch.equal((acc >= 0).sum(1) - 1, alen)


def test_verify_sampling_generator_reproducible(device):
    """The same generator state, the same result -- also between the kernel and the reference,
    which draw the uniforms the same way."""
    p = random_parents(3, 30, seed=4)
    tree = tk.tree.build(p.to(device))
    g = gen(1)
    target = probs((3, 30, 5), g).to(device)
    draft = torch.randint(0, 5, (3, 30), generator=g).to(device)
    a = tk.tree.verify_sampling(tree, draft, target, generator=torch.Generator(device).manual_seed(5))
    b = tk.tree.verify_sampling(tree, draft, target, generator=torch.Generator(device).manual_seed(5))
    c = tk.tree.verify_sampling(tree, draft, target, generator=torch.Generator(device).manual_seed(5),
                                impl="reference")
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 7, 129, 1000])
def test_verify_sampling_sizes_noncontiguous(device, n, impl):
    """Odd tree sizes, strided inputs (int32 tokens, transposed probabilities) and a 1-D single
    tree, against the reference on CPU."""
    B, V = 2, 7
    g = gen(n)
    p = random_parents(B, n, seed=n, bushy=0.3)
    tree = tk.tree.build(p.to(device))
    target = probs((B, n, V), g, 0.5)
    q = probs((B, n, V), g, 0.5)
    draft = torch.randint(0, V, (B, n), generator=g)
    coins, bu = torch.rand(B, n, generator=g), torch.rand(B, generator=g)
    want = ref.verify_sampling(tree.to("cpu"), draft, target, draft_probs=q, coins=coins, bonus_u=bu)
    strided = lambda t: t.transpose(0, -1).contiguous().transpose(0, -1).to(device)  # noqa: E731
    got = tk.tree.verify_sampling(tree, strided(draft.int()), strided(target), draft_probs=strided(q),
                                  coins=strided(coins), bonus_u=bu.to(device), impl=impl)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    one = tk.tree.build(p[0].to(device))
    got = tk.tree.verify_sampling(one, draft[0].to(device), target[:1].to(device), coins=coins[:1].to(device),
                                  bonus_u=bu[:1].to(device), impl=impl)
    want = ref.verify_sampling(one.to("cpu"), draft[:1], target[:1], coins=coins[:1], bonus_u=bu[:1])
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


# ------------------------------------------------------------------------------ losslessness
# The "target model" is a table over token contexts: p(. | root) = P0, p(. | x) = P1[x],
# p(. | x, y) = P2[x, y]. Each of N independent draws builds the same tree shape; draft tokens
# are either drawn i.i.d. from the draft distributions (draft_probs mode) or fixed distinct
# candidates (one-hot mode). The first emitted token must be ~ P0 and, when the first token was
# an accepted draft, the second ~ P1[first]. A chi-square test at significance 1e-6 (fixed
# seeds, so the outcome is deterministic) checks both; the same test rejects the lossy rules.
V = 8
N_DRAWS = 60000
SHAPE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0)]


def chi2_crit(df: int, z: float = 4.753) -> float:
    """Upper chi-square quantile by Wilson-Hilferty (z = 4.753: one-sided p = 1e-6)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, expected_p: torch.Tensor) -> tuple:
    """Chi-square statistic and df, pooling cells with expected count < 5 into one."""
    total = counts.sum()
    e = expected_p.double() * total
    big = e >= 5
    o_cells = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    e_cells = torch.cat([e[big], e[~big].sum().reshape(1)])
    keep = e_cells > 0
    o_cells, e_cells = o_cells[keep], e_cells[keep]
    return float(((o_cells - e_cells) ** 2 / e_cells).sum()), int(keep.sum()) - 1


def lossless_setup(mode, seed=11):
    g = gen(seed)
    parents = tk.tree.from_paths(SHAPE)
    n = parents.numel()
    depth = tk.tree.build(parents).depth[0]
    P0 = probs((V,), g, 0.7)
    P1 = probs((V, V), g, 0.7)
    P2 = probs((V, V, V), g, 0.7)
    Q = probs((n, V), g, 0.7)           # draft distribution at each node (children ~ Q[parent])
    B = N_DRAWS
    if mode == "draft_probs":
        draft = torch.zeros(B, n, dtype=torch.long)
        for i in range(1, n):
            draft[:, i] = torch.multinomial(Q[int(parents[i])], B, replacement=True, generator=g)
        q = Q[None].expand(B, n, V).contiguous()
    else:
        # distinct candidates per sibling group: the draft's top tokens in rank order
        order = torch.argsort(Q, -1, descending=True)
        ranks = {c: k for k, c in enumerate(sorted(SHAPE, key=lambda x: (len(x), x)))}
        draft = torch.zeros(B, n, dtype=torch.long)
        for c, k in ranks.items():
            draft[:, k + 1] = order[int(parents[k + 1]), c[-1]]
        q = None
    # target probabilities at each node from the token context of the node
    target = torch.empty(B, n, V)
    target[:, 0] = P0
    for i in range(1, n):
        path = []
        j = i
        while j > 0:
            path.append(j)
            j = int(parents[j])
        toks = [draft[:, j] for j in reversed(path)]
        if len(toks) == 1:
            target[:, i] = P1[toks[0]]
        elif len(toks) == 2:
            target[:, i] = P2[toks[0], toks[1]]
        else:
            target[:, i] = probs((V,), gen(99))   # deeper contexts: any fixed distribution
    return parents, draft, target, q, P0, P1, g


def emitted(draft, acc, alen, bonus):
    B = draft.shape[0]
    ar = torch.arange(B)
    first = torch.where(alen >= 1, draft[ar, acc[:, 1].clamp_min(0)], bonus)
    second_node = acc[:, 2] if acc.shape[1] > 2 else torch.full((B,), -1)
    second = torch.where(alen >= 2, draft[ar, second_node.clamp_min(0)], bonus)
    return first, second, alen >= 1


def lossless_stats(first, second, has_second, P0, P1):
    stat0, df0 = chi2(torch.bincount(first, minlength=V), P0)
    # second token given the first, over rows where the first was an accepted draft token
    counts = torch.zeros(V, V)
    counts.index_put_((first[has_second], second[has_second]), torch.ones(int(has_second.sum())), accumulate=True)
    exp = counts.sum(1, keepdim=True) * P1 / counts.sum()
    stat1, df1 = chi2(counts.flatten(), exp.flatten())
    return (stat0, df0), (stat1, df1)


@pytest.mark.parametrize("mode", ["one_hot", "draft_probs"])
def test_verify_sampling_lossless(device, mode):
    parents, draft, target, q, P0, P1, g = lossless_setup(mode)
    B, n = draft.shape
    tree = tk.tree.build(parents[None].expand(B, n).contiguous().to(device))
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    acc, alen, bonus = tk.tree.verify_sampling(tree, dev(draft), dev(target), draft_probs=dev(q),
                                               generator=torch.Generator(device).manual_seed(3))
    first, second, has_second = emitted(draft, acc.cpu(), alen.cpu(), bonus.cpu())
    assert 0.2 < has_second.double().mean() < 0.95   # the test exercises both acceptance and rejection
    for stat, df in lossless_stats(first, second, has_second, P0, P1):
        assert stat < chi2_crit(df), (stat, df, chi2_crit(df))


def lossy_first_token(mode, draft, target, q, coins, bu, kind):
    """Root-level simulation of two lossy rules, vectorised over draws:
    'no_residual': min(1, p/q) acceptance without updating p after a rejection (q = one-hot in
    one-hot mode), bonus from the final residual; 'threshold': sgl-kernel style eager acceptance
    (accept if coin < p(t) / 0.5) with the correct residual otherwise; 'correct': neither."""
    B = draft.shape[0]
    kids = [1, 2, 3]                      # the root's children in SHAPE's canonical order
    p0 = target[:, 0].double()
    r = p0.clone()
    out = torch.full((B,), -1, dtype=torch.long)
    ar = torch.arange(B)
    for c in kids:
        t = draft[:, c]
        pend = out < 0
        if q is not None:
            qt = q[:, 0].double()[ar, t]
        else:
            qt = torch.ones(B, dtype=torch.float64)
        pnow = p0 if kind == "no_residual" else r / r.sum(1, keepdim=True)
        ratio = pnow[ar, t] / qt
        if kind == "threshold":
            ratio = ratio / 0.5
        acc = pend & (coins[:, c].double() < ratio)
        out[acc] = t[acc]
        rej = pend & ~acc
        if q is not None:
            newr = (r / r.sum(1, keepdim=True) - q[:, 0].double()).clamp_min(0)
        else:
            newr = r.clone()
            newr[ar, t] = 0
        ok = rej & (newr.sum(1) > 0)
        r[ok] = newr[ok]
    pend = out < 0
    cdf = (r / r.sum(1, keepdim=True)).cumsum(1)
    bon = (cdf < bu[:, None].double()).sum(1).clamp_max(V - 1)
    out[pend] = bon[pend]
    return out


@pytest.mark.parametrize("mode", ["one_hot", "draft_probs"])
@pytest.mark.parametrize("kind", ["no_residual", "threshold"])
def test_lossless_check_rejects_lossy_rules(mode, kind):
    """The chi-square test has the power to catch the lossy rules (sgl-kernel's thresholds, a
    missing residual update); the correct rule simulated the same way passes."""
    parents, draft, target, q, P0, P1, g = lossless_setup(mode)
    coins, bu = torch.rand(draft.shape, generator=g), torch.rand(draft.shape[0], generator=g)
    first = lossy_first_token(mode, draft, target, q, coins, bu, kind)
    stat, df = chi2(torch.bincount(first, minlength=V), P0)
    assert stat > chi2_crit(df), (stat, df)


@pytest.mark.parametrize("mode", ["one_hot", "draft_probs"])
def test_lossless_simulator_sanity(mode):
    """The root-level simulator without a lossy change ('correct') reproduces the kernel's first
    token draw for draw (same coins), so the lossy variants differ from the kernel only by the
    rule they break."""
    parents, draft, target, q, P0, P1, g = lossless_setup(mode)
    B, n = draft.shape
    coins, bu = torch.rand(B, n, generator=g), torch.rand(B, generator=g)
    # root-only tree (children 1..3 and nothing below) so the bonus is drawn at the root
    root_parents = torch.tensor([-1, 0, 0, 0])
    tree = tk.tree.build(root_parents[None].expand(B, 4).contiguous())
    acc, alen, bonus = tk.tree.verify_sampling(tree, draft[:, :4].contiguous(), target[:, :4].contiguous(),
                                               draft_probs=None if q is None else q[:, :4].contiguous(),
                                               coins=coins[:, :4].contiguous(), bonus_u=bu)
    first, _, _ = emitted(draft[:, :4], acc, alen, bonus)
    sim = lossy_first_token(mode, draft, target, q, coins, bu, "correct")
    assert (sim == first).double().mean() > 0.999    # rounding at CDF boundaries aside
    stat, df = chi2(torch.bincount(first, minlength=V), P0)
    assert stat < chi2_crit(df)
