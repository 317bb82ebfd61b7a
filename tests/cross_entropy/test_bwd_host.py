"""impl="tuned" backward, host side (no GPU needed): the chunk planner the CUDA adapter runs
(``_cross_entropy_bwd_plan`` = ``plan_bwd`` in tokenkernels/cross_entropy_bwd.h) and a CPU
emulation of the recompute kernel's epilogue (``_cross_entropy_bwd_emulate``: the kernel's grid,
chunk by chunk and 128 x 128 tile by tile, through the same TK_HD functions dz_row / dz_value /
filter_keeps / mask_index the kernel calls), checked against torch autograd of the reference.

The coefficients (coef_p, coef_t, coef_1) are the ones the real backward receives: the public
op runs on the CPU with ``torch.ops.tokenkernels.cross_entropy_backward`` wrapped to record its
arguments. The ground truth dZ = d(objective)/d(logits) comes from the fp64 reference run on
hidden = the logits and weight = the identity (so that its hidden.grad is dZ)."""
import math

import pytest
import torch

from tokenkernels.testing import tol

from .common import kernel, make_inputs, reference, rel_err

plan_op = torch.ops.tokenkernels._cross_entropy_bwd_plan
emulate_op = torch.ops.tokenkernels._cross_entropy_bwd_emulate
F64 = torch.float64
FIELDS = ("vc", "chunks", "ld", "row_tiles", "col_tiles", "mask_rows", "mask_cols", "dz_bytes",
          "budget")


def plan(N, V, elt=2, budget=-1, vc=0):
    return dict(zip(FIELDS, plan_op(N, V, elt, budget, vc).tolist()))


# ------------------------------------------------------------------------------------ planner
def test_plan_at_the_issue_shape():
    """N = 8192, V = 256000, bf16: the dZ chunk is 5% of the fp32 logits (2.5% of them in bf16),
    25600 columns, 10 chunks, 200 column tiles of 128 and 64 token tiles per chunk launch."""
    p = plan(8192, 256000)
    assert p["budget"] == 8192 * 256000 * 4 // 20
    assert (p["vc"], p["chunks"], p["ld"], p["row_tiles"], p["col_tiles"]) == (25600, 10, 25600,
                                                                              64, 200)
    assert (p["mask_rows"], p["mask_cols"]) == (128, 2000)
    assert p["dz_bytes"] == 8192 * 25600 * 2 <= p["budget"]


@pytest.mark.parametrize("N", [0, 1, 7, 129, 1000, 8192, 65536])
@pytest.mark.parametrize("V", [1, 7, 127, 128, 129, 1000, 50257, 256000, 2 ** 23 + 5])
@pytest.mark.parametrize("elt", [2, 4])
@pytest.mark.parametrize("budget", [-1, 0, 1, 300000, 2 ** 26])
def test_plan_invariants(N, V, elt, budget):
    """Whole tiles, every column in exactly one chunk, the largest chunk within the budget (at
    least one tile, at most the vocabulary rounded up to the tile and 65535 tiles per launch)."""
    p = plan(N, V, elt, budget)
    b = p["budget"]
    if budget < 0:
        assert b == min(max(int(0.05 * N * V * 4), 32 << 20), 1 << 30)
    vc = p["vc"]
    assert vc % 128 == 0 and 128 <= vc <= 128 * math.ceil(V / 128) and vc // 128 <= 65535
    assert p["ld"] == vc and p["col_tiles"] == vc // 128
    assert p["chunks"] == math.ceil(V / vc) and (p["chunks"] - 1) * vc < V <= p["chunks"] * vc
    assert p["row_tiles"] == math.ceil(N / 128)
    assert (p["mask_rows"], p["mask_cols"]) == (math.ceil(N / 64), math.ceil(V / 128))
    assert p["dz_bytes"] == N * vc * elt
    row_tile_bytes = max(N, 1) * elt * 128
    if vc > 128:  # not the one-tile floor: it fits the budget
        assert p["dz_bytes"] <= b
    if vc < 128 * math.ceil(V / 128) and vc // 128 < 65535:  # not capped: the largest that fits
        assert vc + 128 > b // row_tile_bytes * 128


@pytest.mark.parametrize("vc,want", [(1, 128), (128, 128), (129, 256), (300, 384), (10 ** 9, None)])
def test_plan_override(vc, want):
    """vc_override (TOKENKERNELS_CE_TUNED_VC) rounds up to whole tiles, capped by the
    vocabulary; it replaces the budget."""
    p = plan(100, 1000, 2, 1, vc)
    assert p["vc"] == (want if want is not None else 1024)
    assert p["chunks"] == math.ceil(1000 / p["vc"])


def test_plan_bad_arguments():
    with pytest.raises(ValueError, match="_cross_entropy_bwd_plan"):
        plan_op(-1, 10, 2, -1, 0)
    with pytest.raises(ValueError, match="_cross_entropy_bwd_plan"):
        plan_op(10, 0, 2, -1, 0)


# ----------------------------------------------------------------------------------- emulation
@pytest.fixture
def spy(monkeypatch):
    """Records the arguments of every cross_entropy_backward call (the real op still runs).
    The CPU gradients-in-forward path (which never calls it) is turned off."""
    monkeypatch.setenv("TOKENKERNELS_CE_FUSED", "0")
    calls = []
    real = torch.ops.tokenkernels.cross_entropy_backward

    def wrapper(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(torch.ops.tokenkernels, "cross_entropy_backward", wrapper)
    return calls


def _emulate(args, logits, vc, filter_eps=None, grad_scale=1.0, vocab_start=None):
    (_, _, targets, bias, lse, cp, ct, c1, ignore_index, softcap, v_start, feps) = args[:12]
    return emulate_op(logits, targets, bias, lse, cp, ct, c1, ignore_index, softcap,
                      v_start if vocab_start is None else vocab_start,
                      feps if filter_eps is None else filter_eps, grad_scale, vc)


def _truth_dz(h, w, t, b, opts):
    """dZ of the fp64 reference: hidden = the logits h @ w^T, weight = I, the same seeds."""
    z = h.double() @ w.double().T
    eye = torch.eye(w.shape[0], dtype=F64)
    return reference(z, eye, t, b, dtype=F64, **opts)


OPTS = [
    ("plain", {}, {}),
    ("bias", dict(bias=True), {}),
    ("ignore", dict(ignore_frac=0.3), {}),
    ("ignore_index_in_vocab", dict(ignore_frac=0.3, ignore_index=3), dict(ignore_index=3)),
    ("softcap", dict(wscale=6.0, bias=True), dict(softcap=4.0)),
    ("smoothing", {}, dict(label_smoothing=0.1)),
    ("z_loss", dict(wscale=3.0), dict(z_loss=0.05, return_lse=True)),
    ("all", dict(bias=True, ignore_frac=0.25, wscale=5.0),
     dict(softcap=3.0, label_smoothing=0.2, z_loss=0.01, return_lse=True)),
]
SIZES = [(1, 300, 128), (7, 1000, 256), (129, 129, 128), (200, 1000, 384), (129, 7, 0)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name,inp,opts", OPTS, ids=[o[0] for o in OPTS])
@pytest.mark.parametrize("N,V,vc", SIZES, ids=[f"N{n}-V{v}-vc{c}" for n, v, c in SIZES])
def test_emulated_dz_equals_autograd(spy, N, V, vc, name, inp, opts, reduction):
    """The epilogue's dZ (several chunks, V not a multiple of the tile or the chunk, ragged N)
    equals d(objective)/d(logits) of the fp64 reference; the adapter's composition
    dZ @ W, dZ^T @ H and the column sums of dZ equals the reference's gradients."""
    D = 24
    opts = dict(opts, reduction=reduction)
    h, w, t, b = make_inputs((N,), D, V, torch.float32, seed=N + V, **inp)
    k = kernel(h, w, t, b, filter_eps=None, **opts)
    assert len(spy) == 1
    logits = h @ w.T
    dz, mask = _emulate(spy[0], logits, vc)
    truth = _truth_dz(h, w, t, b, opts)
    assert rel_err(dz, truth["dh"]) <= tol(torch.float32, "ce_grad")
    assert mask.shape == (math.ceil(N / 64), math.ceil(V / 128)) and mask.dtype == torch.uint8
    ref = reference(h, w, t, b, dtype=F64, **opts)
    assert rel_err(dz.double() @ w.double(), ref["dh"]) <= tol(torch.float32, "ce_grad")
    assert rel_err(dz.double().T @ h.double(), ref["dw"]) <= tol(torch.float32, "ce_grad")
    if b is not None:
        assert rel_err(dz.double().sum(0), ref["db"]) <= tol(torch.float32, "ce_grad")
    # the kernel op's own gradients agree too (same coefficients)
    assert rel_err(k["dh"], ref["dh"]) <= tol(torch.float32, "ce_grad")


def _peaked(N=150, V=1000, cut=512, drop=-12.0, seed=0):
    """Logits of columns >= cut pushed down by a bias of ``drop``: their softmax lies below the
    bf16 auto threshold, so those filter sub-tiles are dropped, the others kept."""
    h, w, t, _ = make_inputs(N, 16, V, torch.float32, seed=seed)
    b = torch.where(torch.arange(V) >= cut, torch.full((V,), drop), torch.zeros(V))
    t = torch.randint(0, cut, t.shape, generator=torch.Generator().manual_seed(seed + 1))
    return h, w, t, b


def _pool(keeps):
    """OR of a (N, V) bool tensor over the global 64 x 128 sub-tiles."""
    N, V = keeps.shape
    pad = torch.zeros(math.ceil(N / 64) * 64, math.ceil(V / 128) * 128, dtype=torch.bool)
    pad[:N, :V] = keeps
    return pad.reshape(pad.shape[0] // 64, 64, pad.shape[1] // 128, 128).any(3).any(1)


@pytest.mark.parametrize("vc", [128, 256, 0])
@pytest.mark.parametrize("feps", [2.0 ** -12, 1e-3, 0.3])
def test_emulated_skip_mask(spy, vc, feps):
    """Filtering: the mask is the OR over each global 64 x 128 sub-tile of filter_keeps
    (|dZ| >= filter_eps * max(|coef_p|, |coef_t|) of its row, nonzero), computed here with torch
    on the unfiltered dZ; dropped sub-tiles are exactly zero, kept ones unchanged (bitwise)."""
    h, w, t, b = _peaked()
    N, V = h.shape[0], w.shape[0]
    kernel(h, w, t, b, filter_eps=None, reduction="sum")
    args = spy[0]
    logits = h @ w.T
    dz0, mask0 = _emulate(args, logits, vc, filter_eps=0.0)
    dz, mask = _emulate(args, logits, vc, filter_eps=feps)
    cp, ct = args[5], args[6]
    thr = feps * torch.maximum(cp.abs(), ct.abs())
    want = _pool((dz0 != 0) & ~(dz0.abs() < thr[:, None]))
    assert torch.equal(mask, want.to(torch.uint8))
    assert torch.equal(mask0, _pool(dz0 != 0).to(torch.uint8))  # eps 0: only all-zero dropped
    expand = want.repeat_interleave(64, 0).repeat_interleave(128, 1)[:N, :V]
    assert torch.equal(dz, torch.where(expand, dz0, torch.zeros_like(dz0)))
    if feps == 2.0 ** -12:  # the columns past the cut are dropped, the others kept
        assert not mask[:, 4:].any() and mask[:, :4].all()


def test_emulated_filter_eps_zero_is_exact(spy):
    h, w, t, b = make_inputs(100, 16, 700, torch.float32, bias=True, ignore_frac=0.5)
    kernel(h, w, t, b, filter_eps=None)
    logits = h @ w.T
    dz0, mask0 = _emulate(spy[0], logits, 256, filter_eps=0.0)
    truth = _truth_dz(h, w, t, b, {})
    assert rel_err(dz0, truth["dh"]) <= tol(torch.float32, "ce_grad")
    assert mask0.all()  # every sub-tile holds a nonzero dZ


def test_emulated_nan_keeps_and_ignored_rows_are_zero(spy):
    """A NaN row keeps every sub-tile it touches whatever filter_eps; tokens without gradient
    (ignored) give exact zeros (not NaN) even with NaN logits."""
    h, w, t, b = make_inputs(70, 16, 300, torch.float32, bias=True)
    t = torch.full_like(t, -100)
    t[0] = 5
    kernel(h, w, t, b, filter_eps=None, reduction="sum")
    logits = h @ w.T
    logits[0] = float("nan")
    logits[1] = float("nan")  # ignored token: zeros
    dz, mask = _emulate(spy[0], logits, 128, filter_eps=0.5)
    assert torch.isnan(dz[0]).all()
    assert not torch.isnan(dz[1:]).any() and not dz[1:].abs().any()
    assert mask[0].all() and not mask[1].any()


def test_emulated_grad_scale_is_exact(spy):
    """fp16's power-of-two scale multiplies dZ exactly (before the one rounding)."""
    h, w, t, b = make_inputs(40, 16, 300, torch.float32, bias=True)
    kernel(h, w, t, b, filter_eps=None, label_smoothing=0.1)
    logits = h @ w.T
    dz1, m1 = _emulate(spy[0], logits, 128)
    dz8, m8 = _emulate(spy[0], logits, 128, grad_scale=2.0 ** 8)
    assert torch.equal(dz8, dz1 * 2.0 ** 8) and torch.equal(m1, m8)


@pytest.mark.parametrize("start,stop", [(0, 300), (300, 700), (700, 1000), (130, 259)])
def test_emulated_vocab_shard(spy, start, stop):
    """A vocabulary shard [start, stop) (vocab_start = start, targets outside the shard get no
    one-hot term) gives the columns [start, stop) of the full dZ."""
    h, w, t, b = make_inputs(90, 16, 1000, torch.float32, bias=True, ignore_frac=0.1)
    kernel(h, w, t, b, filter_eps=None, label_smoothing=0.1)
    args = spy[0]
    logits = h @ w.T
    full, _ = _emulate(args, logits, 256)
    shard_args = args[:3] + (b[start:stop],) + args[4:]
    part, mask = _emulate(shard_args, logits[:, start:stop].contiguous(), 256, vocab_start=start)
    assert torch.equal(part, full[:, start:stop])
    assert mask.shape == (2, math.ceil((stop - start) / 128))
