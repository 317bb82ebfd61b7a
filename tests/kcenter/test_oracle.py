"""The replay oracles must reject wrong answers (otherwise every validity test is vacuous)."""
import pytest
import torch

from tokenkernels.reference import kcenter as ref

from .oracle import check_sorted_matches, replay_coverage, replay_kcenter


def _kc(metric="cosine", start="isolated"):
    x = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(0))
    idx, rad = ref._select(x, 6, metric=metric, start=start, dtype=torch.float64)
    return x, idx, rad


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_replay_kcenter_accepts_fp64_greedy(metric):
    for start, rs in (("isolated", "isolated"), ("first", [0, 0])):
        x, idx, rad = _kc(metric, start)
        replay_kcenter(x, idx, rad, k=6, metric=metric, start=rs)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_replay_kcenter_rejects(metric):
    x, idx, rad = _kc(metric)
    bad = [idx.clone() for _ in range(6)]
    bad[0][0, 3] = int(next(j for j in range(30) if j not in idx[0].tolist()))  # non-greedy pick
    bad[1][0, 2] = bad[1][0, 1]                                                # duplicate
    bad[2][1, 5] = 30                                                          # out of range
    bad[3][1, 5] = -1                                                          # missing pick
    bad[4][0, [1, 2]] = bad[4][0, [2, 1]]                                      # wrong order
    bad[5][0, 0] = int(next(j for j in range(30) if j not in idx[0].tolist()))  # wrong isolated start
    for b in bad:
        with pytest.raises(AssertionError):
            replay_kcenter(x, b, rad, k=6, metric=metric, start="isolated")
    r = rad.clone()
    r[0, 2] *= 1.01                                                            # wrong radius
    with pytest.raises(AssertionError):
        replay_kcenter(x, idx, r, k=6, metric=metric, start="isolated")
    r = rad.clone()
    r[1, 0] = float("inf")                                                     # isolated radius is finite
    with pytest.raises(AssertionError):
        replay_kcenter(x, idx, r, k=6, metric=metric, start="isolated")
    # excluded / beyond-length picks
    ex = torch.zeros(2, 30, dtype=torch.bool)
    ex[0, int(idx[0, 4])] = True
    with pytest.raises(AssertionError):
        replay_kcenter(x, idx, rad, k=6, metric=metric, start="isolated", exclude=ex)
    # padding must be -1 / NaN
    wide_i = torch.cat([idx, torch.zeros(2, 1, dtype=torch.long)], 1)
    wide_r = torch.cat([rad, torch.full((2, 1), float("nan"))], 1)
    with pytest.raises(AssertionError):
        replay_kcenter(x, wide_i, wide_r, k=torch.tensor([6, 6]), metric=metric, start="isolated")
    # forced start must come first with radius +inf
    xf, i_f, r_f = _kc(metric, "first")
    with pytest.raises(AssertionError):
        replay_kcenter(xf, i_f, r_f, k=6, metric=metric, start=[1, 0])


def test_replay_coverage_rejects():
    sim = torch.rand(2, 20, 12, generator=torch.Generator().manual_seed(0))
    idx, gains = ref._coverage(sim, 5, dtype=torch.float64)
    replay_coverage(sim, idx, gains, k=5)
    b = idx.clone()
    b[0, [0, 1]] = b[0, [1, 0]]
    with pytest.raises(AssertionError):
        replay_coverage(sim, b, gains, k=5)
    g = gains.clone()
    g[1, 3] += 0.01
    with pytest.raises(AssertionError):
        replay_coverage(sim, idx, g, k=5)
    with pytest.raises(AssertionError):
        replay_coverage(sim, idx, gains, k=5, row_lengths=torch.tensor([20, 3]))


def test_sorted_check_rejects():
    i = torch.tensor([[5, 1, 3, -1]])
    r = torch.tensor([[float("inf"), 0.5, 0.2, float("nan")]])
    check_sorted_matches(torch.tensor([[1, 3, 5, -1]]), torch.tensor([[0.5, 0.2, float("inf"), float("nan")]]), i, r)
    with pytest.raises(AssertionError):
        check_sorted_matches(torch.tensor([[1, 3, 5, -1]]), torch.tensor([[0.2, 0.5, float("inf"), float("nan")]]), i, r)
