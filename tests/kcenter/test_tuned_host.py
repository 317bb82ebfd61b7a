"""kcenter impl="tuned": the CUDA path's host code and a CPU emulation of its arithmetic, no GPU.

* ``_kcenter_tuned_plan`` runs the launcher's planner (tokenkernels/kcenter_tuned.h make_plan):
  the triangle tile schedule covers every (I, J), I <= J, exactly once in launch order; the
  greedy's threads cover every token; the workspace holds the key matrix and the nn keys; the
  wave model picks the tile it should at the issue's shapes.
* ``_kcenter_tuned_emulate`` runs the kernels' own TK_HD functions on the CPU (fragment ->
  element mapping of the mma accumulators, store / mirror rule, row / column nearest-neighbour
  folds in ordered uints, the thread / warp REDUX + ballot / block arg-max of the greedy) with an
  fp32 ATen GEMM in place of the tensor cores, or (``mma=True``) with the tensor-core loop's data
  movement emulated too (cp.async loader rows / chunks, the swizzled panels, the ldmatrix lane
  addresses, the mma.sync fragment layouts); its keys, nn keys and picks are compared with torch
  and with the reference greedy (the tie rule included).
"""
from __future__ import annotations

import math

import pytest
import torch

from tokenkernels.reference import kcenter as ref
from tokenkernels.testing import tol

from .oracle import assert_equal_where_tie_free, kcenter_margin

FIELDS = ["ok", "tile", "tiles_1d", "tiles_per_item", "gram_ctas", "gram_threads", "gram_smem",
          "ctas_per_sm", "waves", "greedy_items", "greedy_threads", "d_pad", "ld", "key_offset",
          "nn_offset", "workspace_bytes", "max_n", "est_gram_us"]
SIZES = [1, 7, 63, 64, 65, 127, 128, 129, 1000, 2880, 4096, 4097, 8192]


def plan(B, N, D, sms=132, low=True, tile=0):
    f, tiles = torch.ops.tokenkernels._kcenter_tuned_plan(B, N, D, sms, low, tile)
    assert f.dtype == torch.int64 and f.shape == (len(FIELDS),)
    return dict(zip(FIELDS, f.tolist())), tiles


# ------------------------------------------------------------------------------ planner
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("tile", [0, 64, 128])
def test_triangle_schedule_covers_each_tile_once(N, tile):
    p, tiles = plan(3, N, 100, tile=tile)
    assert p["ok"] == 1
    if tile:
        assert p["tile"] == tile
    T = math.ceil(N / p["tile"])
    assert p["tiles_1d"] == T and p["tiles_per_item"] == T * (T + 1) // 2
    assert p["gram_ctas"] == 3 * p["tiles_per_item"]
    assert tiles.shape == (T * (T + 1) // 2, 2)
    want = [(i, j) for i in range(T) for j in range(i, T)]      # row by row: launch order
    assert [tuple(t) for t in tiles.tolist()] == want
    # every element (i, j), i <= j < N, lies in exactly one tile (tails included)
    bt = p["tile"]
    cover = torch.zeros(N, N, dtype=torch.int32)
    for i, j in want:
        cover[i * bt:(i + 1) * bt, j * bt:(j + 1) * bt] += 1
    upper = torch.ones(N, N, dtype=torch.bool).triu()
    assert bool((cover[upper] == 1).all())
    assert int(cover[~upper].sum()) == sum(
        max(0, min(N, (i + 1) * bt) - i * bt) * (max(0, min(N, (i + 1) * bt) - i * bt) - 1) // 2
        for i in range(T)), "only diagonal tiles reach below the diagonal"


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("D", [1, 7, 8, 100, 4096])
def test_plan_fields(N, D):
    p, _ = plan(2, N, D)
    assert p["ok"] == 1 and p["max_n"] == 8192
    assert p["tile"] in (64, 128)
    assert p["gram_threads"] == (256 if p["tile"] == 128 else 128)
    assert p["gram_smem"] == 3 * 2 * p["tile"] * 64 * 2        # 3 stages, A + B panels, 64 bf16
    assert p["ctas_per_sm"] * p["gram_smem"] <= 228 * 1024 - p["ctas_per_sm"] * 3 * 1024
    assert p["waves"] == math.ceil(p["gram_ctas"] / (132 * p["ctas_per_sm"]))
    # greedy: ITEMS contiguous tokens per thread, whole warps, no idle warp, <= 1024 threads
    it, th = p["greedy_items"], p["greedy_threads"]
    assert it == (4 if N <= 4096 else 8)
    assert th % 32 == 0 and 32 <= th <= 1024
    assert it * th >= N and (N <= 32 * it or (th - 32) * it < N)
    # 16-byte rows: features padded to 8, key rows to 4 floats
    assert p["d_pad"] % 8 == 0 and D <= p["d_pad"] < D + 8
    assert p["ld"] % 4 == 0 and N <= p["ld"] < N + 4
    assert p["key_offset"] == 0 and p["nn_offset"] % 256 == 0
    assert p["nn_offset"] >= 2 * N * p["ld"] * 4
    assert p["workspace_bytes"] >= p["nn_offset"] + 2 * N * 4 and p["workspace_bytes"] % 256 == 0


@pytest.mark.parametrize("args", [dict(N=0), dict(N=8193), dict(low=False), dict(B=0), dict(D=0)])
def test_plan_declines(args):
    kw = dict(B=2, N=100, D=64, low=True) | args
    p, tiles = plan(kw["B"], kw["N"], kw["D"], low=kw["low"])
    assert p["ok"] == 0 and tiles.shape == (0, 2)


def test_plan_issue_shapes():
    """N=2880, D=4096 bf16 on 132 SMs: the model must not pick 64-wide tiles, which would move
    twice the L2 bytes per flop for no better wave quantisation; B=8 fills every CTA slot many
    times over (several CTAs per item on every SM)."""
    p1, _ = plan(1, 2880, 4096)
    p8, _ = plan(8, 2880, 4096)
    for p in (p1, p8):
        f64, _ = plan(p["gram_ctas"] // p["tiles_per_item"], 2880, 4096, tile=64)
        f128, _ = plan(p["gram_ctas"] // p["tiles_per_item"], 2880, 4096, tile=128)
        assert p["est_gram_us"] == min(f64["est_gram_us"], f128["est_gram_us"])
        assert p["tile"] == 128
    assert p1["tiles_per_item"] == 276 and p1["gram_ctas"] == 276
    assert p8["gram_ctas"] == 2208 and p8["waves"] >= 8
    # small problems prefer more, smaller tiles (BT=128 would leave most SMs idle)
    small, _ = plan(1, 576, 4096)
    assert small["tile"] == 64


def test_plan_sm_count_matters():
    a, _ = plan(1, 1200, 4096, sms=132)
    b, _ = plan(1, 1200, 4096, sms=8)
    assert a["waves"] <= b["waves"]
    assert b["est_gram_us"] > a["est_gram_us"]


# ------------------------------------------------------------------------------ emulation
def emulate(x, k, *, lengths=None, exclude=None, start=None, metric="cosine", tile=0, mma=False):
    return torch.ops.tokenkernels._kcenter_tuned_emulate(x, k, lengths, exclude, start, metric, tile, mma)


def torch_keys(x, metric):
    """The epilogue's key formula (kcenter.h key_from_gram) in torch, same op order, upper
    triangle from (i <= j) then mirrored."""
    x = x.float()
    g = torch.bmm(x, x.transpose(1, 2))
    if metric == "cosine":
        a = torch.linalg.vector_norm(x, 2, dim=2).clamp_min(1e-8).reciprocal()
        k = 1.0 - (g * a[:, :, None]) * a[:, None, :]
    else:
        a = (x * x).sum(2)
        k = ((a[:, :, None] + a[:, None, :]) - 2.0 * g).clamp_min(0.0)
    up = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu()
    return torch.where(up, k, k.transpose(1, 2))


def valid_of(B, N, lengths, exclude):
    v = torch.ones(B, N, dtype=torch.bool)
    if lengths is not None:
        v &= torch.arange(N)[None, :] < lengths[:, None]
    if exclude is not None:
        v &= ~exclude
    return v


def layout(B, N, kind, g):
    lengths = exclude = None
    if kind in ("ragged", "ragged_exclude"):
        lengths = torch.tensor([N, max(N // 2, 1), max(N - 3, 0)][:B])
    if kind in ("exclude", "ragged_exclude"):
        exclude = torch.rand(B, N, generator=g) < 0.2
    return lengths, exclude


@pytest.mark.parametrize("N", [1, 7, 129, 1000])
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("kind", ["dense", "ragged_exclude"])
def test_epilogue_keys_and_nn(N, tile, metric, kind):
    g = torch.Generator().manual_seed(N + tile)
    B = 3
    x = torch.randn(B, N, 24, generator=g)
    lengths, exclude = layout(B, N, kind, g)
    idx, rad, keys, nn, writes = emulate(x, min(N, 5), lengths=lengths, exclude=exclude,
                                         metric=metric, tile=tile)
    assert bool((writes == 1).all()), "every key element is stored exactly once"
    want = torch_keys(x, metric)
    assert torch.equal(keys, want)
    assert torch.equal(keys, keys.transpose(1, 2)), "mirror writes make the key matrix symmetric"
    # nearest-neighbour keys: min over valid j != i, +inf with no valid neighbour / invalid row
    v = valid_of(B, N, lengths, exclude)
    kk = want.masked_fill(~(v[:, :, None] & v[:, None, :]), math.inf)
    kk = kk.masked_fill(torch.eye(N, dtype=torch.bool), math.inf)
    assert torch.equal(nn, kk.min(2).values)


def _ref_greedy(keys, valid, k, start, metric):
    """The reference greedy (reference.kcenter._greedy_kcenter) over the emulated keys."""
    out_i, out_r = [], []
    for b in range(keys.shape[0]):
        kb = min(k, int(valid[b].sum()))
        st = None
        if start is not None:
            st = int(start[b])
            if not (0 <= st < keys.shape[1] and bool(valid[b, st])):
                st = int(valid[b].to(torch.int8).argmax())
        i, r = ref._greedy_kcenter(keys[b], valid[b], kb, st)
        i = torch.cat([i, torch.full((k - kb,), -1, dtype=torch.long)])
        r = torch.cat([r, torch.full((k - kb,), math.nan)])
        out_i.append(i)
        out_r.append(r if metric == "cosine" else r.sqrt())
    return torch.stack(out_i), torch.stack(out_r)


@pytest.mark.parametrize("N", [1, 7, 129, 1000])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("start", ["isolated", "index", "bad_index"])
@pytest.mark.parametrize("kind", ["dense", "ragged", "exclude", "ragged_exclude"])
def test_greedy_arithmetic_matches_reference_greedy(N, metric, start, kind):
    """Same keys in, so the picks must be identical, ties included: integer-valued features
    (many exactly equal keys) exercise the lowest-index rule through the thread fold, the warp
    ballot and the block combine."""
    g = torch.Generator().manual_seed(3 * N + len(kind))
    B = 3
    x = torch.randint(-2, 3, (B, N, 6), generator=g).float()
    lengths, exclude = layout(B, N, kind, g)
    v = valid_of(B, N, lengths, exclude)
    st = None
    if start == "index":
        st = torch.tensor([int(torch.nonzero(v[b]).flatten()[-1]) if v[b].any() else 0 for b in range(B)])
    elif start == "bad_index":
        st = torch.tensor([N + 5, -1, 0])          # check=False: falls back to the first valid
        if exclude is not None:
            exclude[2, 0] = True
            v = valid_of(B, N, lengths, exclude)
    k = N                                          # k = N: the tail runs out of valid tokens
    idx, rad, keys, nn, _ = emulate(x, k, lengths=lengths, exclude=exclude, start=st, metric=metric)
    r_idx, r_rad = _ref_greedy(keys, v, k, st, metric)
    assert torch.equal(idx, r_idx)
    # cosine radii are the keys themselves; l2 takes one sqrt (C sqrtf vs torch: 1 ulp)
    assert torch.allclose(rad, r_rad, rtol=0 if metric == "cosine" else 2.5e-7, atol=0, equal_nan=True)


@pytest.mark.parametrize("N,D", [(7, 16), (129, 64), (1000, 48), (2880, 32)])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_emulation_vs_reference_op(N, D, metric):
    """The emulated kernels against tokenkernels.reference.kcenter (its own fp32 distances)
    wherever the fp64 greedy's margins show the data are tie-free."""
    g = torch.Generator().manual_seed(N)
    B = 3
    x = torch.randn(B, N, D, generator=g)
    k = min(N, 20)
    idx, rad, *_ = emulate(x, k, metric=metric)
    r_idx, r_rad = ref.kcenter(x, k, metric=metric, return_radii=True)
    margins = kcenter_margin(x, k=k, metric=metric, start="isolated")
    assert assert_equal_where_tie_free(idx, r_idx, margins, tol(torch.float32, "tie_dist")) >= 1, "no tie-free item to compare"
    same = idx == r_idx
    assert torch.allclose(rad[same], r_rad[same], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("N", [1, 7, 65, 129, 300])
@pytest.mark.parametrize("D", [5, 64, 70, 136])
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_tensor_core_data_movement(N, D, tile, metric):
    """The Gram tiles through the emulated cp.async / swizzle / ldmatrix / mma fragment path equal
    torch's Gram exactly (small-integer features: every fp32 sum is exact), for one and several
    tile rows, tails, diagonal tiles (B operand = A panel), feature padding (D % 8 != 0) and a
    partial last k tile (D = 70, 136); then the same keys, nn and picks as the ATen path."""
    g = torch.Generator().manual_seed(N * 7 + D)
    B = 2
    x = torch.randint(-3, 4, (B, N, D), generator=g).float()
    lengths = torch.tensor([N, max(N - 4, 1)])
    idx, rad, keys, nn, writes = emulate(x, min(N, 9), lengths=lengths, metric=metric, tile=tile, mma=True)
    assert bool((writes == 1).all())
    assert torch.equal(keys, torch_keys(x, metric))
    a_idx, a_rad, a_keys, a_nn, _ = emulate(x, min(N, 9), lengths=lengths, metric=metric, tile=tile)
    assert torch.equal(keys, a_keys) and torch.equal(nn, a_nn)
    assert torch.equal(idx, a_idx) and torch.equal(rad.nan_to_num(), a_rad.nan_to_num())


def test_emulation_rejects_out_of_range_n():
    with pytest.raises(ValueError, match="N must lie"):
        emulate(torch.randn(1, 8193, 2), 1)
