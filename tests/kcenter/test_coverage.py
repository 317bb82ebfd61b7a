"""tokenkernels.coverage_select / mmtok_similarity vs the fp64 replay oracle and the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenkernels as tk
from tokenkernels.reference import kcenter as ref

from tokenkernels.testing import DTYPES, tol
from .oracle import assert_equal_where_tie_free, coverage_margin, replay_coverage, valid_mask


def make_sim(B, M, N, dtype, seed, device="cpu", power=3.0, sparsity=0.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, M, N, generator=g) ** power
    if sparsity:
        s = s * (torch.rand(B, M, N, generator=g) >= sparsity)
    return s.to(dtype).to(device), g


LAYOUTS = ["dense", "lengths", "row_lengths_exclude", "all_k_tensor"]


def make_layout(layout, B, M, N, g, device):
    lengths = row_lengths = exclude = None
    k = min(N, 12)
    if layout in ("lengths", "all_k_tensor"):
        lengths = torch.tensor([N, max(N * 2 // 3, 1), max(N // 4, 1)][:B], device=device)
    if layout in ("row_lengths_exclude", "all_k_tensor"):
        row_lengths = torch.tensor([M, max(M // 2, 1), 0][:B], device=device)
        exclude = torch.rand(B, N, generator=g) < 0.2
        exclude[:, 0] = True
        exclude = exclude.to(device)
    valid = valid_mask(B, N, lengths, exclude)
    counts = valid.sum(1)
    if layout == "all_k_tensor":
        k = torch.minimum(counts, torch.tensor([12, 5, 30][:B])).to(device)
    else:
        k = min(k, int(counts.min()))
    return lengths, row_lengths, exclude, k


SHAPES = [(1, 1), (7, 7), (40, 129), (33, 2), (600, 577), (129, 1000)]
ORACLE_IMPLS = ["auto", "reference"]       # kernel and reference against the fp64 oracle


@pytest.mark.parametrize("impl", ORACLE_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("M,N", SHAPES, ids=[f"M{m}-N{n}" for m, n in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coverage_vs_reference_grid(device, dtype, M, N, layout, impl):
    B = 3
    sim, g = make_sim(B, M, N, dtype, seed=M * 1000 + N, device=device, sparsity=0.3)
    lengths, row_lengths, exclude, k = make_layout(layout, B, M, N, g, device)
    kw = dict(lengths=lengths, row_lengths=row_lengths, exclude=exclude, return_gains=True)
    idx, gains = tk.coverage_select(sim, k, **kw, impl=impl)
    assert idx.device == sim.device and gains.device == sim.device
    r_idx, r_gains = ref.coverage_select(sim, k, **kw)
    assert idx.shape == r_idx.shape
    replay_coverage(sim, idx, gains, k=k, lengths=lengths, row_lengths=row_lengths, exclude=exclude)
    margins = coverage_margin(sim, k=k, lengths=lengths, row_lengths=row_lengths, exclude=exclude)
    assert_equal_where_tie_free(idx, r_idx, margins, tol(dtype, "tie_gain"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coverage_equals_reference_tie_free(device, dtype):
    B, M, N, k = 4, 24, 10, 6
    sim, _ = make_sim(B, M, N, dtype, seed=3, device=device, power=1.0)
    margins = coverage_margin(sim, k=k)
    thr = tol(dtype, "tie_gain")
    n_free = sum(m > thr for m in margins)
    assert n_free >= 3, f"test data are not tie-free enough: {margins}"
    idx, gains = tk.coverage_select(sim, k, return_gains=True)
    r_idx, r_gains = ref.coverage_select(sim, k, return_gains=True)
    assert assert_equal_where_tie_free(idx, r_idx, margins, thr) == n_free
    replay_coverage(sim, idx, gains, k=k)
    same = (idx.cpu() == r_idx.cpu()).all(1)
    torch.testing.assert_close(gains.cpu()[same], r_gains.cpu()[same], rtol=1e-5, atol=1e-5)


def test_coverage_ties_lowest_index(device):
    """All-zero similarities: every gain is 0, so ties pick the lowest valid indices in order."""
    sim = torch.zeros(2, 5, 9, device=device)
    exclude = torch.zeros(2, 9, dtype=torch.bool, device=device)
    exclude[1, [0, 2]] = True
    idx, gains = tk.coverage_select(sim, 4, exclude=exclude, return_gains=True)
    assert idx.cpu().tolist() == [[0, 1, 2, 3], [1, 3, 4, 5]]
    assert (gains == 0).all()
    # identical columns: the first pick is the lowest index, then gains drop to 0
    sim = torch.rand(5, 1, generator=torch.Generator().manual_seed(0)).expand(5, 6).to(device)
    idx, gains = tk.coverage_select(sim, 3, return_gains=True)
    assert idx.cpu().tolist() == [0, 1, 2]
    torch.testing.assert_close(gains[0].cpu(), sim[:, 0].sum().cpu())
    assert (gains[1:] == 0).all()


def test_coverage_k_corner_cases(device):
    B, M, N = 3, 20, 15
    sim, g = make_sim(B, M, N, torch.float32, seed=9, device=device)
    lengths = torch.tensor([15, 0, 6], device=device)
    # per-item k with a zero and a "take everything"
    kk = torch.tensor([4, 0, 6], device=device)
    idx, gains = tk.coverage_select(sim, kk, lengths=lengths, return_gains=True)
    assert idx.shape == (B, 6)
    replay_coverage(sim, idx, gains, k=kk, lengths=lengths)
    assert sorted(idx[2].cpu().tolist()) == list(range(6))
    assert (idx[1] == -1).all()
    # k_max wider than k.max()
    idx2, gains2 = tk.coverage_select(sim, kk, lengths=lengths, return_gains=True, k_max=9)
    assert idx2.shape == (B, 9) and torch.equal(idx2[:, :6], idx)
    assert (idx2[:, 6:] == -1).all() and torch.isnan(gains2[:, 6:]).all()
    # k = 0
    assert tk.coverage_select(sim, 0).shape == (B, 0)
    assert tk.coverage_select(sim[0], 0).shape == (0,)
    # k = N picks every candidate
    idx = tk.coverage_select(sim, N)
    assert (idx.sort(1).values.cpu() == torch.arange(N)).all()
    # N = 1 / M = 1
    one = torch.rand(1, 1, generator=g).to(device)
    i1, g1 = tk.coverage_select(one, 1, return_gains=True)
    assert i1.cpu().tolist() == [0]
    torch.testing.assert_close(g1.cpu(), one[0].cpu())


def test_coverage_row_lengths_zero(device):
    """No valid rows: every gain is 0 (ties -> lowest index)."""
    sim, _ = make_sim(2, 8, 6, torch.float32, seed=1, device=device)
    rl = torch.tensor([8, 0], device=device)
    idx, gains = tk.coverage_select(sim, 3, row_lengths=rl, return_gains=True)
    assert idx[1].cpu().tolist() == [0, 1, 2] and (gains[1] == 0).all()
    replay_coverage(sim, idx, gains, k=3, row_lengths=rl)


@pytest.mark.parametrize("impl", ORACLE_IMPLS)
def test_coverage_2d_and_non_contiguous(device, impl):
    g = torch.Generator().manual_seed(12)
    base = torch.rand(3, 50, 30, generator=g).to(device)
    s_t = base.transpose(1, 2)                                  # (3, 30, 50)
    s_s = torch.rand(3, 60, 100, generator=g).to(device)[:, ::2, 1::2]
    lengths = torch.tensor([50, 0, 40, 0, 22, 0], device=device)[::2]
    row_lengths = torch.tensor([30, 7, 19], device=device)
    exclude = (torch.rand(50, 3, generator=g) < 0.2).to(device).t()
    for s in (s_t, s_s):
        assert not s.is_contiguous()
        a, ag = tk.coverage_select(s, 8, lengths=lengths, row_lengths=row_lengths, exclude=exclude,
                                   return_gains=True, impl=impl)
        b, bg = tk.coverage_select(s.contiguous(), 8, lengths=lengths.contiguous(),
                                   row_lengths=row_lengths, exclude=exclude.contiguous(),
                                   return_gains=True, impl=impl)
        assert torch.equal(a, b)
        torch.testing.assert_close(ag, bg)
        replay_coverage(s, a, ag, k=8, lengths=lengths, row_lengths=row_lengths, exclude=exclude)
    # 2-D input -> 1-D output, same as the batched call
    i2, g2 = tk.coverage_select(s_t[0], 8, return_gains=True, impl=impl)
    i3, g3 = tk.coverage_select(s_t[:1], 8, return_gains=True, impl=impl)
    assert i2.shape == (8,) and g2.shape == (8,) and i3.shape == (1, 8)
    assert torch.equal(i2, i3[0]) and torch.equal(g2, g3[0])
    ex1 = torch.zeros(50, dtype=torch.bool, device=device)
    ex1[:3] = True
    i2 = tk.coverage_select(s_t[0], 5, exclude=ex1, lengths=torch.tensor(45, device=device),
                            impl=impl)
    assert i2.shape == (5,) and not ({0, 1, 2} & set(i2.cpu().tolist()))
    assert (i2 < 45).all()


def test_coverage_check_false_pads(device):
    sim, _ = make_sim(2, 10, 8, torch.float32, seed=2, device=device)
    lengths = torch.tensor([8, 3], device=device)
    exclude = torch.zeros(2, 8, dtype=torch.bool, device=device)
    exclude[1, 0] = True
    idx, gains = tk.coverage_select(sim, 6, lengths=lengths, exclude=exclude, check=False,
                                    return_gains=True)
    assert idx.shape == (2, 6)
    replay_coverage(sim, idx, gains, k=6, lengths=lengths, exclude=exclude)
    assert (idx[1, 2:] == -1).all() and torch.isnan(gains[1, 2:]).all()


# ------------------------------------------------------------------------------ MMTok
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mmtok_similarity(device, alpha):
    B, T, V, D = 3, 11, 40, 32
    g = torch.Generator().manual_seed(17)
    text = torch.randn(B, T, D, generator=g).to(device)
    vision = torch.randn(B, V, D, generator=g).to(device)
    tl = torch.tensor([11, 4, 0], device=device)
    vl = torch.tensor([40, 25, 9], device=device)
    sim = tk.mmtok_similarity(text, vision, alpha=alpha, tau_tv=0.05, tau_vv=0.1,
                              text_lengths=tl, vision_lengths=vl)
    assert sim.shape == (B, T + V, V) and sim.dtype == torch.float32 and sim.device == text.device
    assert (sim >= 0).all()
    rows = sim.sum(-1).cpu()
    for b in range(B):
        want_t = torch.tensor([alpha if r < int(tl[b]) else 0.0 for r in range(T)])
        want_v = torch.tensor([1 - alpha if j < int(vl[b]) else 0.0 for j in range(V)])
        torch.testing.assert_close(rows[b, :T], want_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows[b, T:], want_v, rtol=1e-5, atol=1e-5)
        assert (sim[b, :, int(vl[b]):] == 0).all()      # padded vision tokens cover nothing
    # dense item 0 against the formula
    tn = torch.nn.functional.normalize(text[0].double(), dim=-1)
    vn = torch.nn.functional.normalize(vision[0].double(), dim=-1)
    want = torch.cat([alpha * torch.softmax(tn @ vn.T / 0.05, -1),
                      (1 - alpha) * torch.softmax(vn @ vn.T / 0.1, -1)])
    torch.testing.assert_close(sim[0].double(), want, rtol=1e-4, atol=1e-6)
    # coverage_select runs on it and is a valid greedy
    kk = torch.tensor([10, 10, 9], device=device)
    idx, gains = tk.coverage_select(sim, kk, lengths=vl, return_gains=True)
    replay_coverage(sim, idx, gains, k=kk, lengths=vl)
    r_idx = ref.coverage_select(sim, kk, lengths=vl)
    margins = coverage_margin(sim, k=kk, lengths=vl)
    assert_equal_where_tie_free(idx, r_idx, margins, tol(torch.float32, "tie_gain"))
    # 2-D inputs
    s2 = tk.mmtok_similarity(text[0], vision[0], alpha=alpha)
    assert s2.shape == (T + V, V)
    assert tk.coverage_select(s2, 5).shape == (5,)


# ------------------------------------------------------------------------------ hypothesis
@st.composite
def coverage_problems(draw):
    B = draw(st.integers(1, 3))
    M = draw(st.integers(1, 30))
    N = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, N), min_size=B, max_size=B)))
    row_lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, M), min_size=B, max_size=B)))
    exclude = (torch.rand(B, N, generator=g) < 0.3) if draw(st.booleans()) else None
    counts = valid_mask(B, N, lengths, exclude).sum(1).tolist()
    if draw(st.booleans()):
        k = [draw(st.integers(0, c)) for c in counts]
    else:
        k = draw(st.integers(0, min(counts)))
    dtype = draw(st.sampled_from(DTYPES))
    power = draw(st.sampled_from([1.0, 4.0]))
    sparsity = draw(st.sampled_from([0.0, 0.5, 0.9]))
    s = torch.rand(B, M, N, generator=g) ** power
    s = s * (torch.rand(B, M, N, generator=g) >= sparsity)
    return dict(sim=s.to(dtype), lengths=lengths, row_lengths=row_lengths, exclude=exclude, k=k)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=coverage_problems())
def test_coverage_hypothesis(device, p):
    sim = p["sim"].to(device)
    t = lambda v: None if v is None else torch.tensor(v, device=device)  # noqa: E731
    lengths, row_lengths = t(p["lengths"]), t(p["row_lengths"])
    exclude = None if p["exclude"] is None else p["exclude"].to(device)
    k = t(p["k"]) if isinstance(p["k"], list) else p["k"]
    kw = dict(lengths=lengths, row_lengths=row_lengths, exclude=exclude)
    idx, gains = tk.coverage_select(sim, k, return_gains=True, **kw)
    replay_coverage(sim, idx, gains, k=k, **kw)
    r_idx = ref.coverage_select(sim, k, **kw)
    assert_equal_where_tie_free(idx, r_idx, coverage_margin(sim, k=k, **kw), tol(sim.dtype, "tie_gain"))
