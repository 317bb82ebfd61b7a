"""tokenkernels.kcenter vs the fp64 replay oracle and the PyTorch reference."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenkernels as tk
from tokenkernels.reference import kcenter as ref

from tokenkernels.testing import DTYPES, tol
from .oracle import (assert_equal_where_tie_free, check_sorted_matches, kcenter_margin,
                     replay_kcenter, valid_mask)

METRICS = ["cosine", "l2"]
IMPLS = ["auto", "plain", "simt", "tuned", "stream"]            # the op's (CUDA variants; CPU: one kernel)
ORACLE_IMPLS = ["auto", "reference"]                    # kernel and reference against the oracle


def gen(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_x(B, N, D, dtype, seed, device="cpu", offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g) + offset
    return x.to(dtype).to(device), g


def first_valid(valid: torch.Tensor):
    return [int(v.to(torch.int8).argmax()) for v in valid]


def random_valid(valid: torch.Tensor, g: torch.Generator):
    out = []
    for v in valid:
        ids = torch.nonzero(v).flatten()
        out.append(int(ids[torch.randint(len(ids), (1,), generator=g)]) if len(ids) else 0)
    return out


# ------------------------------------------------------------------------------ the main grid
# (lengths, exclude, k) layouts of a (3, 129, D) batch
LAYOUTS = ["dense", "ragged_k_tensor", "ragged_exclude", "ragged_exclude_k_tensor"]


def make_layout(layout: str, B: int, N: int, g: torch.Generator, device):
    lengths = exclude = None
    k = 20
    if layout != "dense":
        lengths = torch.tensor([N, 77, 31], device=device)
    if layout.startswith("ragged_exclude"):
        exclude = torch.rand(B, N, generator=g) < 0.15
        exclude[:, 0] = True                     # the "first" start is then not token 0
        exclude[2, 1:4] = True
        exclude = exclude.to(device)
        k = 12
    if layout.endswith("k_tensor"):
        k = torch.tensor([25, 9, 0] if exclude is not None else [20, 13, 5], device=device)
    return lengths, exclude, k


def resolve_start(start: str, valid: torch.Tensor, g: torch.Generator, device):
    """-> (start argument for the op, start description for the replay oracle)."""
    if start == "isolated":
        return "isolated", "isolated"
    if start == "first":
        return "first", first_valid(valid)
    if start == "random":
        return "random", "any"
    s = random_valid(valid, g)
    return torch.tensor(s, device=device), s


@pytest.mark.parametrize("impl", ORACLE_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sorted_", [False, True], ids=["order", "sorted"])
@pytest.mark.parametrize("start", ["isolated", "first", "random", "index"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kcenter_vs_reference_grid(device, dtype, metric, start, sorted_, layout, impl):
    B, N, D = 3, 129, 48
    x, g = make_x(B, N, D, dtype, seed=1234, device=device)
    lengths, exclude, k = make_layout(layout, B, N, g, device)
    valid = valid_mask(B, N, lengths, exclude)
    start_arg, replay_start = resolve_start(start, valid, g, device)
    kw = dict(lengths=lengths, exclude=exclude, metric=metric, start=start_arg, return_radii=True)

    idx, rad = tk.kcenter(x, k, **kw, generator=gen(device, 7), impl=impl)
    assert idx.device == x.device and rad.device == x.device
    r_idx, r_rad = ref.kcenter(x, k, **kw, generator=gen(device, 7))
    assert idx.shape == r_idx.shape == (B, 20 if layout == "dense" else int(torch.as_tensor(k).max()))
    if start == "random":
        # same generator state -> same start as the reference
        assert torch.equal(idx[:, 0].cpu(), r_idx[:, 0].cpu())
        replay_start = [int(v) for v in idx[:, 0].cpu()]
    replay_kcenter(x, idx, rad, k=k, metric=metric, start=replay_start if start != "random" else "any",
                   lengths=lengths, exclude=exclude)
    margins = kcenter_margin(x, k=k, metric=metric, start=replay_start, lengths=lengths,
                             exclude=exclude)
    assert_equal_where_tie_free(idx, r_idx, margins, tol(dtype, "tie_dist"))

    if sorted_:
        s_idx, s_rad = tk.kcenter(x, k, **kw, sorted=True, generator=gen(device, 7), impl=impl)
        check_sorted_matches(s_idx, s_rad, idx, rad)
        rs_idx = ref.kcenter(x, k, **kw, sorted=True, generator=gen(device, 7))[0]
        assert_equal_where_tie_free(s_idx, rs_idx, margins, tol(dtype, "tie_dist"))


# ------------------------------------------------------------------------------ sizes N x D
def _size_cases():
    cases = []
    for N in (1, 7, 129, 577, 1000, 2880):
        for D in (1, 3, 1024, 4096):
            for metric in METRICS:
                for start in ("isolated", "first"):
                    big = N == 2880 and D == 4096
                    if big and (metric, start) not in (("cosine", "isolated"), ("l2", "first")):
                        continue   # the largest shape only twice (fp64 oracle costs seconds)
                    if N == 1000 and (D not in (3, 1024) or (D == 1024 and metric != "l2")):
                        continue   # N = 1000 (not a multiple of 8 or of a tile): a few cases
                    # the Python reference is a loop: it runs the sizes up to 1000
                    for impl in ORACLE_IMPLS if N <= 1000 else ["auto"]:
                        cases.append(pytest.param(N, D, metric, start, impl,
                                                  id=f"N{N}-D{D}-{metric}-{start}-{impl}"))
    return cases


@pytest.mark.parametrize("N,D,metric,start,impl", _size_cases())
def test_kcenter_sizes(device, N, D, metric, start, impl):
    B = 1 if N == 2880 else 2
    k = {1: 1, 7: 7, 129: 40, 577: 48, 1000: 50, 2880: 24}[N]
    dtype = torch.bfloat16 if (N, D) in ((577, 1024), (2880, 4096)) else torch.float32
    x, g = make_x(B, N, D, dtype, seed=N * 10007 + D, device=device, offset=0.25)
    idx, rad = tk.kcenter(x, k, metric=metric, start=start, return_radii=True, impl=impl)
    assert idx.shape == (B, k)
    replay_start = "isolated" if start == "isolated" else [0] * B
    replay_kcenter(x, idx, rad, k=k, metric=metric, start=replay_start)
    if N <= 577 and impl != "reference":   # (the Python reference is a loop)
        r_idx = ref.kcenter(x, k, metric=metric, start=start)
        margins = kcenter_margin(x, k=k, metric=metric, start=replay_start)
        assert_equal_where_tie_free(idx, r_idx, margins, tol(dtype, "tie_dist"))


# ------------------------------------------------------------------------------ tie-free equality
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("start", ["isolated", "first", "index"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kcenter_equals_reference_tie_free(device, dtype, metric, start):
    """Small N, D >= 16 gaussians: every greedy step has a clear winner in fp64, so the op must
    return exactly the reference's picks (and radii within tolerance of them)."""
    B, N, D, k = 4, 17, 32, 8
    x, g = make_x(B, N, D, dtype, seed=5, device=device)
    starts = [3, 0, 16, 9]
    start_arg = {"isolated": "isolated", "first": "first", "index": torch.tensor(starts, device=device)}[start]
    replay_start = {"isolated": "isolated", "first": [0] * B, "index": starts}[start]
    margins = kcenter_margin(x, k=k, metric=metric, start=replay_start)
    thr = tol(dtype, "tie_dist")
    tie_free = sum(m > thr for m in margins)
    assert tie_free >= 3, f"test data are not tie-free enough: margins {margins}"
    idx, rad = tk.kcenter(x, k, metric=metric, start=start_arg, return_radii=True)
    r_idx, r_rad = ref.kcenter(x, k, metric=metric, start=start_arg, return_radii=True)
    assert assert_equal_where_tie_free(idx, r_idx, margins, thr) == tie_free
    replay_kcenter(x, idx, rad, k=k, metric=metric, start=replay_start)
    # same picks -> same radii up to fp32 rounding
    same = (idx.cpu() == r_idx.cpu()).all(1)
    torch.testing.assert_close(rad.cpu()[same], r_rad.cpu()[same], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ DivPrune parity
@pytest.mark.parametrize("N,D,k,seed", [
    pytest.param(576, 64, 56, 2, id="llava-N576-k56"),
    pytest.param(129, 32, 16, 1, id="N129-k16"),
    pytest.param(300, 128, 30, 0, id="N300-k30"),
    pytest.param(64, 16, 20, 1, id="N64-k20"),
])
def test_divprune_parity(device, N, D, k, seed):
    """kcenter(x, k) (isolated start, cosine, pick order) is DivPrune's selection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    margin = kcenter_margin(x, k=k, metric="cosine", start="isolated")[0]
    assert margin > tol(torch.float32, "tie_dist"), f"seed {seed} does not give tie-free data ({margin})"
    x = x.to(device)
    got = tk.kcenter(x, k)
    want = ref.divprune_style(x, k)
    assert got.shape == (k,)
    assert torch.equal(got.cpu(), want.cpu())
    assert torch.equal(got.cpu(), ref.kcenter(x, k).cpu())


# ------------------------------------------------------------------------------ random start
@pytest.mark.parametrize("metric", METRICS)
def test_random_start_matches_reference(device, metric):
    B, N, D, k = 5, 40, 24, 6
    x, g = make_x(B, N, D, torch.float32, seed=11, device=device)
    lengths = torch.tensor([40, 33, 5, 40, 12], device=device)
    exclude = (torch.rand(B, N, generator=g) < 0.3).to(device)
    exclude[2, :5] = torch.tensor([True, False, True, False, False])
    kk = torch.tensor([6, 6, 3, 6, 4], device=device)
    kw = dict(lengths=lengths, exclude=exclude, metric=metric, start="random", return_radii=True)
    idx, rad = tk.kcenter(x, kk, **kw, generator=gen(device, 99))
    r_idx, r_rad = ref.kcenter(x, kk, **kw, generator=gen(device, 99))
    replay_kcenter(x, idx, rad, k=kk, metric=metric, start="any", lengths=lengths, exclude=exclude)
    assert torch.equal(idx[:, 0].cpu(), r_idx[:, 0].cpu())
    margins = kcenter_margin(x, k=kk, metric=metric, start=idx[:, 0].cpu(), lengths=lengths,
                             exclude=exclude)
    assert_equal_where_tie_free(idx, r_idx, margins, tol(torch.float32, "tie_dist"))
    # same seed -> same result; the generator advances between calls
    g2 = gen(device, 99)
    a = tk.kcenter(x, kk, lengths=lengths, exclude=exclude, metric=metric, start="random", generator=g2)
    assert torch.equal(a.cpu(), idx.cpu())
    starts = {tuple(tk.kcenter(x, kk, lengths=lengths, exclude=exclude, metric=metric,
                               start="random", generator=g2)[:, 0].cpu().tolist())
              for _ in range(5)}
    assert len(starts) > 1


def test_random_start_roughly_uniform(device):
    """First pick of start='random' is uniform over the valid tokens (never an invalid one)."""
    B, N, D = 4000, 8, 4
    x = torch.randn(1, N, D, generator=torch.Generator().manual_seed(3)).expand(B, N, D).to(device)
    exclude = torch.tensor([True, False, False, True, False, False, True, False]).expand(B, N).to(device)
    lengths = torch.full((B,), 7, device=device)              # token 7 is past the length
    first = tk.kcenter(x, 1, lengths=lengths, exclude=exclude, start="random",
                       generator=gen(device, 2024))[:, 0].cpu()
    counts = torch.bincount(first, minlength=N)
    ok = torch.tensor([1, 2, 4, 5])
    assert counts.sum() == B and counts[ok].sum() == B, counts
    expect = B / len(ok)
    assert ((counts[ok] - expect).abs() < 5 * (expect * (1 - 1 / len(ok))) ** 0.5).all(), counts


# ------------------------------------------------------------------------------ k corner cases
@pytest.mark.parametrize("start", ["isolated", "first", "random"])
def test_per_item_k_tensor(device, start):
    B, N, D = 4, 50, 16
    x, g = make_x(B, N, D, torch.float32, seed=21, device=device)
    lengths = torch.tensor([50, 0, 20, 37], device=device)
    kk = torch.tensor([7, 0, 20, 1], device=device)           # item 2 takes all its tokens
    idx, rad = tk.kcenter(x, kk, lengths=lengths, start=start, return_radii=True,
                          generator=gen(device, 1))
    assert idx.shape == (B, 20)
    rs = "isolated" if start == "isolated" else ([0] * B if start == "first" else "any")
    replay_kcenter(x, idx, rad, k=kk, metric="cosine", start=rs, lengths=lengths)
    assert sorted(idx[2].cpu().tolist()) == list(range(20))
    # explicit k_max: wider output, padded
    idx2, rad2 = tk.kcenter(x, kk, lengths=lengths, start=start, return_radii=True, k_max=23,
                            generator=gen(device, 1))
    assert idx2.shape == (B, 23)
    assert torch.equal(idx2[:, :20].cpu(), idx.cpu())
    assert (idx2[:, 20:] == -1).all() and torch.isnan(rad2[:, 20:]).all()
    # sorted output pads the same way
    s_idx, s_rad = tk.kcenter(x, kk, lengths=lengths, start=start, return_radii=True, sorted=True,
                              generator=gen(device, 1))
    check_sorted_matches(s_idx, s_rad, idx, rad)


def test_zero_dim_k_tensor_with_k_max(device):
    """A 0-d k tensor with k_max= is one k for every item and stays on the device (no host
    sync): the output is k_max wide, padded with -1 past k."""
    x, _ = make_x(2, 12, 5, torch.float32, seed=3, device=device)
    k0 = torch.tensor(3, device=device)
    idx, rad = tk.kcenter(x, k0, k_max=5, return_radii=True)
    a_idx, a_rad = tk.kcenter(x, 3, return_radii=True)
    assert idx.shape == (2, 5)
    assert torch.equal(idx[:, :3], a_idx) and torch.equal(rad[:, :3], a_rad)
    assert (idx[:, 3:] == -1).all() and torch.isnan(rad[:, 3:]).all()
    assert tk.kcenter(x, k0).shape == (2, 3)                  # without k_max: k itself
    sim = torch.rand(2, 6, 12, generator=torch.Generator().manual_seed(0)).to(device)
    c = tk.coverage_select(sim, k0, k_max=4)
    assert c.shape == (2, 4) and torch.equal(c[:, :3], tk.coverage_select(sim, 3))
    assert (c[:, 3] == -1).all()


def test_k_zero(device):
    x, _ = make_x(3, 9, 5, torch.float32, seed=0, device=device)
    for start in ("isolated", "first", "random"):
        idx, rad = tk.kcenter(x, 0, start=start, return_radii=True)
        assert idx.shape == (3, 0) and rad.shape == (3, 0)
        assert idx.dtype == torch.int64 and rad.dtype == torch.float32
    assert tk.kcenter(x[0], 0).shape == (0,)
    assert tk.kcenter(x, torch.zeros(3, dtype=torch.long, device=device)).shape == (3, 0)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("start", ["isolated", "first", "random", "index"])
def test_k_equals_valid_tokens(device, metric, start):
    """k = number of valid tokens picks every valid token exactly once."""
    B, N, D = 3, 129, 8
    x, g = make_x(B, N, D, torch.float32, seed=8, device=device)
    lengths = torch.tensor([129, 64, 7], device=device)
    exclude = (torch.rand(B, N, generator=g) < 0.2)
    exclude[:, 3] = True
    exclude = exclude.to(device)
    valid = valid_mask(B, N, lengths, exclude)
    kk = valid.sum(1).to(device)
    start_arg, rs = resolve_start(start, valid, g, device)
    idx, rad = tk.kcenter(x, kk, lengths=lengths, exclude=exclude, metric=metric, start=start_arg,
                          return_radii=True, generator=gen(device, 3))
    replay_kcenter(x, idx, rad, k=kk, metric=metric, start=rs, lengths=lengths, exclude=exclude)
    for b in range(B):
        n = int(kk[b])
        assert sorted(idx[b, :n].cpu().tolist()) == torch.nonzero(valid[b]).flatten().tolist()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("start", ["isolated", "first", "random", "index"])
def test_single_token(device, metric, start):
    """N = 1: the only token, radius +inf (no neighbour / no earlier pick)."""
    x = torch.randn(2, 1, 6, generator=torch.Generator().manual_seed(0)).to(device)
    start_arg = torch.zeros(2, dtype=torch.long, device=device) if start == "index" else start
    idx, rad = tk.kcenter(x, 1, metric=metric, start=start_arg, return_radii=True,
                          generator=gen(device, 0))
    assert idx.cpu().tolist() == [[0], [0]]
    assert torch.isinf(rad).all() and (rad > 0).all()
    i1, r1 = tk.kcenter(x[0], 1, metric=metric, start=start_arg if start != "index" else 0,
                        return_radii=True, generator=gen(device, 0))
    assert i1.shape == (1,) and int(i1) == 0 and torch.isinf(r1).all()


def test_empty_shapes(device):
    x = torch.randn(2, 0, 4, device=device)
    assert tk.kcenter(x, 0).shape == (2, 0)
    x = torch.randn(0, 5, 4, device=device)
    assert tk.kcenter(x, 2).shape == (0, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("start", ["isolated", "first", "random", "index"])
def test_no_tokens_k_positive_check_false(device, impl, start):
    """N = 0 with k > 0 and check=False: every output is -1 / NaN on every path. (On CUDA the
    arg-max over no tokens stays at the packed minimum, whose index decodes to 2^32 - 1: the
    kernels must treat it as "nothing to pick", like coverage_select does, instead of writing
    the running minimum / reading the Gram at that index, and the streaming path must not
    launch a step with no blocks.)"""
    for D in (4, 0):
        x = torch.randn(3, 0, D, device=device)
        exclude = torch.zeros(3, 0, dtype=torch.bool, device=device)
        start_arg = torch.zeros(3, dtype=torch.long, device=device) if start == "index" else start
        for kw in (dict(), dict(exclude=exclude),
                   dict(lengths=torch.tensor([0, 2, 5], device=device))):
            idx, rad = tk.kcenter(x, 4, start=start_arg, check=False, impl=impl, return_radii=True,
                                  generator=gen(device, 0), **kw)
            assert idx.shape == (3, 4) and rad.shape == (3, 4)
            assert (idx == -1).all() and torch.isnan(rad).all()
        kk = torch.tensor([2, 0, 3], device=device)
        idx, rad = tk.kcenter(x, kk, k_max=5, start=start_arg, check=False, impl=impl,
                              return_radii=True, sorted=True, generator=gen(device, 0))
        assert idx.shape == (3, 5) and (idx == -1).all() and torch.isnan(rad).all()
        i1 = tk.kcenter(x[0], 2, start=start_arg if start != "index" else 0, check=False,
                        impl=impl, generator=gen(device, 0))
        assert i1.cpu().tolist() == [-1, -1]
    # with check=True the same call is an error that names the problem, on CPU and CUDA alike
    with pytest.raises(RuntimeError, match="exceeds the number of valid tokens"):
        tk.kcenter(torch.randn(2, 0, 4, device=device), 1)


def test_coverage_no_candidates_check_false(device):
    """coverage_select with N = 0 candidates and k > 0, check=False: all -1 / NaN."""
    sim = torch.rand(2, 5, 0, device=device)
    idx, gains = tk.coverage_select(sim, 3, check=False, return_gains=True)
    assert idx.shape == (2, 3) and (idx == -1).all() and torch.isnan(gains).all()


@pytest.mark.parametrize("metric", METRICS)
def test_lengths_zero_item(device, metric):
    """An item with no valid tokens and k = 0 gets an all -1 row."""
    x, _ = make_x(2, 10, 4, torch.float32, seed=4, device=device)
    lengths = torch.tensor([10, 0], device=device)
    kk = torch.tensor([3, 0], device=device)
    for start in ("isolated", "first", "random"):
        idx, rad = tk.kcenter(x, kk, lengths=lengths, metric=metric, start=start, return_radii=True,
                              generator=gen(device, 0))
        assert (idx[1] == -1).all() and torch.isnan(rad[1]).all()
        rs = "isolated" if start == "isolated" else ([0, 0] if start == "first" else "any")
        replay_kcenter(x, idx, rad, k=kk, metric=metric, start=rs, lengths=lengths)


# ------------------------------------------------------------------------------ shapes / layout
@pytest.mark.parametrize("start", ["isolated", "first"])
def test_2d_input_returns_1d(device, start):
    x, _ = make_x(1, 33, 12, torch.float32, seed=2, device=device)
    x2 = x[0]
    idx, rad = tk.kcenter(x2, 5, start=start, return_radii=True)
    assert idx.shape == (5,) and rad.shape == (5,)
    i3, r3 = tk.kcenter(x, 5, start=start, return_radii=True)
    assert i3.shape == (1, 5)
    assert torch.equal(idx, i3[0]) and torch.equal(rad, r3[0])
    # 1-D exclude / 0-d lengths are accepted for 2-D x
    ex = torch.zeros(33, dtype=torch.bool, device=device)
    ex[[0, 5]] = True
    a, ar = tk.kcenter(x2, 4, exclude=ex, lengths=torch.tensor(30, device=device), start=start,
                       return_radii=True)
    assert a.shape == (4,)
    replay_kcenter(x2, a, ar, k=4, metric="cosine", start="isolated" if start == "isolated" else [1],
                   lengths=torch.tensor([30]), exclude=ex)
    assert not ({0, 5} & set(a.cpu().tolist()))


@pytest.mark.parametrize("impl", ORACLE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("start", ["isolated", "first"])
def test_non_contiguous_inputs(device, dtype, metric, start, impl):
    B, N, D = 3, 65, 20
    g = torch.Generator().manual_seed(31)
    base_t = torch.randn(B, D, N, generator=g).to(dtype).to(device)
    x_t = base_t.transpose(1, 2)                                   # (B, N, D), stride-N features
    base_s = torch.randn(B, 2 * N, 2 * D, generator=g).to(dtype).to(device)
    x_s = base_s[:, ::2, 1::2]                                     # strided tokens and features
    x_b = torch.randn(2 * B, N, D, generator=g).to(dtype).to(device)[::2]   # strided batch
    lengths_nc = torch.tensor([65, 0, 50, 0, 41, 0], device=device)[::2]
    ex_nc = (torch.rand(N, B, generator=g) < 0.2).to(device).t()
    for x in (x_t, x_s, x_b):
        assert not x.is_contiguous()
        kw = dict(metric=metric, start=start, return_radii=True, lengths=lengths_nc, exclude=ex_nc,
                  impl=impl)
        a_idx, a_rad = tk.kcenter(x, 9, **kw)
        c_kw = dict(kw, lengths=lengths_nc.contiguous(), exclude=ex_nc.contiguous())
        b_idx, b_rad = tk.kcenter(x.contiguous(), 9, **c_kw)
        assert torch.equal(a_idx, b_idx)
        torch.testing.assert_close(a_rad, b_rad, equal_nan=True)
        rs = "isolated" if start == "isolated" else first_valid(valid_mask(B, N, lengths_nc, ex_nc))
        replay_kcenter(x, a_idx, a_rad, k=9, metric=metric, start=rs, lengths=lengths_nc,
                       exclude=ex_nc)


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("start", ["isolated", "first"])
def test_impl_variants(device, impl, metric, start):
    """Every impl gives a valid selection (the CPU kernel has one implementation: every variant
    name is identical to auto there)."""
    B, N, D, k = 3, 300, 40, 30
    x, g = make_x(B, N, D, torch.float32, seed=77, device=device)
    lengths = torch.tensor([300, 211, 17], device=device)
    exclude = (torch.rand(B, N, generator=g) < 0.1).to(device)
    kk = torch.tensor([30, 25, 10], device=device)
    kw = dict(lengths=lengths, exclude=exclude, metric=metric, start=start, return_radii=True)
    idx, rad = tk.kcenter(x, kk, impl=impl, **kw)
    rs = "isolated" if start == "isolated" else first_valid(valid_mask(B, N, lengths, exclude))
    replay_kcenter(x, idx, rad, k=kk, metric=metric, start=rs, lengths=lengths, exclude=exclude)
    if device == "cpu" and impl != "reference":
        a_idx, a_rad = tk.kcenter(x, kk, impl="auto", **kw)
        assert torch.equal(idx, a_idx) and torch.equal(rad.nan_to_num(), a_rad.nan_to_num())


# ------------------------------------------------------------------------------ check=False
@pytest.mark.parametrize("start", ["isolated", "first", "random"])
def test_check_false_pads(device, start):
    """k larger than the valid tokens with check=False: missing picks are -1 / NaN, no crash."""
    B, N, D = 3, 12, 8
    x, g = make_x(B, N, D, torch.float32, seed=6, device=device)
    lengths = torch.tensor([12, 5, 0], device=device)
    exclude = torch.zeros(B, N, dtype=torch.bool, device=device)
    exclude[1, 1] = True
    idx, rad = tk.kcenter(x, 8, lengths=lengths, exclude=exclude, start=start, check=False,
                          return_radii=True, generator=gen(device, 0))
    assert idx.shape == (B, 8)
    rs = "isolated" if start == "isolated" else ([0, 0, 0] if start == "first" else "any")
    replay_kcenter(x, idx, rad, k=8, metric="cosine", start=rs, lengths=lengths, exclude=exclude)
    assert (idx[1, 4:] == -1).all() and (idx[2] == -1).all()
    # per-item k beyond the valid count, too
    kk = torch.tensor([12, 6, 1], device=device)
    idx, rad = tk.kcenter(x, kk, lengths=lengths, exclude=exclude, start=start, check=False,
                          return_radii=True, generator=gen(device, 0))
    replay_kcenter(x, idx, rad, k=kk, metric="cosine", start=rs, lengths=lengths, exclude=exclude)


# ------------------------------------------------------------------------------ hypothesis
@st.composite
def kcenter_problems(draw):
    B = draw(st.integers(1, 3))
    N = draw(st.integers(1, 40))
    D = draw(st.integers(1, 20))
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, N), min_size=B, max_size=B)))
    use_ex = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    exclude = (torch.rand(B, N, generator=g) < draw(st.sampled_from([0.1, 0.5]))) if use_ex else None
    valid = valid_mask(B, N, lengths, exclude)
    counts = valid.sum(1).tolist()
    k_tensor = draw(st.booleans())
    if k_tensor:
        k = [draw(st.integers(0, c)) for c in counts]
    else:
        k = draw(st.integers(0, min(counts)))
    metric = draw(st.sampled_from(METRICS))
    start = draw(st.sampled_from(["isolated", "first", "random", "index"]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 1e-2, 30.0]))
    x = (torch.randn(B, N, D, generator=g) * scale).to(dtype)
    return dict(x=x, lengths=lengths, exclude=exclude, k=k, metric=metric, start=start,
                valid=valid, g=g, sorted=draw(st.booleans()))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=kcenter_problems())
def test_kcenter_hypothesis(device, p):
    x = p["x"].to(device)
    B, N = x.shape[:2]
    lengths = None if p["lengths"] is None else torch.tensor(p["lengths"], device=device)
    exclude = None if p["exclude"] is None else p["exclude"].to(device)
    k = torch.tensor(p["k"], device=device) if isinstance(p["k"], list) else p["k"]
    start_arg, rs = resolve_start(p["start"], p["valid"], p["g"], device)
    kw = dict(lengths=lengths, exclude=exclude, metric=p["metric"], start=start_arg,
              return_radii=True)
    idx, rad = tk.kcenter(x, k, **kw, generator=gen(device, 5))
    replay_kcenter(x, idx, rad, k=k, metric=p["metric"], start=rs, lengths=lengths, exclude=exclude)
    r_idx = ref.kcenter(x, k, **kw, generator=gen(device, 5))[0]
    if p["start"] == "random" and idx.shape[1] > 0:
        assert torch.equal(idx[:, 0].cpu(), r_idx[:, 0].cpu())
        rs = [int(v) for v in idx[:, 0].cpu()]
    margins = kcenter_margin(x, k=k, metric=p["metric"], start=rs, lengths=lengths, exclude=exclude)
    assert_equal_where_tie_free(idx, r_idx, margins, tol(x.dtype, "tie_dist"))
    if p["sorted"]:
        s_idx, s_rad = tk.kcenter(x, k, **kw, sorted=True, generator=gen(device, 5))
        check_sorted_matches(s_idx, s_rad, idx, rad)


def test_check_false_invalid_start_does_not_crash(device):
    """With check=False an impossible start index is not validated; the result must still be a
    valid selection (the CPU kernel falls back to the first valid token)."""
    B, N, D = 2, 15, 6
    x, _ = make_x(B, N, D, torch.float32, seed=13, device=device)
    exclude = torch.zeros(B, N, dtype=torch.bool, device=device)
    exclude[0, 2] = True
    start = torch.tensor([2, 40], device=device)            # excluded / out of range
    idx, rad = tk.kcenter(x, 5, exclude=exclude, start=start, check=False, return_radii=True)
    replay_kcenter(x, idx, rad, k=5, metric="cosine", start="any", exclude=exclude)


# ------------------------------------------------------------------------------ ties / degenerate
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("start", ["isolated", "first"])
def test_ties_go_to_lowest_index(device, metric, start):
    """Identical (integer-valued, so every Gram entry is exact) tokens: all distances tie, so the
    picks are the valid tokens in ascending order."""
    B, N = 2, 12
    x = torch.tensor([1.0, -2.0, 3.0, 4.0]).expand(B, N, 4).contiguous().to(device)
    exclude = torch.zeros(B, N, dtype=torch.bool, device=device)
    exclude[1, [0, 1, 4]] = True
    idx, rad = tk.kcenter(x, 6, exclude=exclude, metric=metric, start=start, return_radii=True)
    assert idx.cpu().tolist() == [[0, 1, 2, 3, 4, 5], [2, 3, 5, 6, 7, 8]]
    rs = "isolated" if start == "isolated" else [0, 2]
    replay_kcenter(x, idx, rad, k=6, metric=metric, start=rs, exclude=exclude)


@pytest.mark.parametrize("metric", METRICS)
def test_degenerate_tokens(device, metric):
    """Zero vectors and exact duplicates still give a valid greedy."""
    g = torch.Generator().manual_seed(40)
    x = torch.randn(2, 30, 8, generator=g)
    x[:, 5] = 0.0
    x[:, 17] = 0.0
    x[:, 20:25] = x[:, 0:5]
    x[1, 10:] = x[1, 10]
    x = x.to(device)
    for start, rs in (("isolated", "isolated"), ("first", [0, 0])):
        idx, rad = tk.kcenter(x, 20, metric=metric, start=start, return_radii=True)
        replay_kcenter(x, idx, rad, k=20, metric=metric, start=rs)


def test_int32_index_tensors_accepted(device):
    """The wrapper converts int32 k / lengths / start tensors to int64."""
    x, _ = make_x(2, 20, 8, torch.float32, seed=3, device=device)
    kw64 = dict(lengths=torch.tensor([20, 9], device=device), start=torch.tensor([4, 8], device=device))
    kw32 = {n: v.int() for n, v in kw64.items()}
    k64 = torch.tensor([5, 3], device=device)
    a = tk.kcenter(x, k64, **kw64)
    b = tk.kcenter(x, k64.int(), **kw32)
    assert torch.equal(a, b)
    sim = torch.rand(2, 6, 20, generator=torch.Generator().manual_seed(0)).to(device)
    c = tk.coverage_select(sim, k64, lengths=kw64["lengths"], row_lengths=torch.tensor([6, 2], device=device))
    d = tk.coverage_select(sim, k64.int(), lengths=kw32["lengths"],
                           row_lengths=torch.tensor([6, 2], device=device, dtype=torch.int32))
    assert torch.equal(c, d)


_SPEC_SCRIPT = """
import torch, tokenkernels as tk
from tests.kcenter.oracle import replay_kcenter, valid_mask
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for metric in ("cosine", "l2"):
        for D in (1, 7, 37, 300):
            x = torch.randn(3, 301, D, generator=g).to(dtype)
            lengths = torch.tensor([301, 250, 90])
            exclude = torch.rand(3, 301, generator=g) < 0.2
            kk = torch.tensor([40, 25, 9])
            first = [int(v.to(torch.int8).argmax()) for v in valid_mask(3, 301, lengths, exclude)]
            idx, rad = tk.kcenter(x, kk, lengths=lengths, exclude=exclude, metric=metric,
                                  start="first", return_radii=True)
            replay_kcenter(x, idx, rad, k=kk, metric=metric, start=first, lengths=lengths,
                           exclude=exclude)
print("ok")
"""


@pytest.mark.parametrize("batch", ["1", "5", "16"])
def test_cpu_speculative_batch_override(batch):
    """The CPU kernel's speculative Gram-row batch size (TOKENKERNELS_KCENTER_BATCH, read once per
    process) does not change validity: run the check in a fresh interpreter per size."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TOKENKERNELS_KCENTER_BATCH=batch)
    r = subprocess.run([sys.executable, "-c", _SPEC_SCRIPT], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("name", ["kcenter", "coverage_select", "mmtok_similarity"])
def test_reference_has_the_public_signature(name):
    """tokenkernels.reference.kcenter.<op> is an implementation of tokenkernels.<op>: same
    parameters, defaults and annotations (mmtok_similarity, pure PyTorch, is one function)."""
    import inspect

    assert inspect.signature(getattr(ref, name)) == inspect.signature(getattr(tk, name))
    if name == "mmtok_similarity":
        assert ref.mmtok_similarity is tk.mmtok_similarity


@pytest.mark.parametrize("impl", ["auto", "plain", "simt", "tuned", "stream", "reference"])
def test_every_impl_name_runs_on_cpu(impl):
    """CPU: every name runs (the variant names all run the one CPU kernel), "reference" the
    reference; both ops take impl=."""
    from .oracle import coverage_margin, replay_coverage

    x, _ = make_x(2, 30, 8, torch.float32, seed=9)
    idx, rad = tk.kcenter(x, 5, impl=impl, return_radii=True)
    replay_kcenter(x, idx, rad, k=5, metric="cosine", start="isolated")
    margins = kcenter_margin(x, k=5, metric="cosine", start="isolated")
    assert assert_equal_where_tie_free(idx, ref.kcenter(x, 5), margins,
                                       tol(torch.float32, "tie_dist")) >= 1
    sim = torch.rand(2, 6, 30, generator=torch.Generator().manual_seed(1))
    c_idx, c_gains = tk.coverage_select(sim, 4, impl=impl, return_gains=True)
    replay_coverage(sim, c_idx, c_gains, k=4)
    margins = coverage_margin(sim, k=4)
    assert assert_equal_where_tie_free(c_idx, ref.coverage_select(sim, 4), margins,
                                       tol(torch.float32, "tie_gain")) >= 1
