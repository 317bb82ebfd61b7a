"""Kernel vs reference: loss, lse, arg-max, entropy and the gradients of hidden / weight / bias.

fp32 inputs are compared with the fp64 reference (tolerances ``ce_loss`` / ``ce_grad``).
fp16 / bf16 inputs follow the precision rule: the kernel's error vs the fp64 truth on the same
low-precision values upcast is no worse than the same-dtype reference's (a plain F.linear +
cross-entropy pipeline in that dtype) + ``ce_rule`` — for the loss, lse, entropy and every
gradient. Most cases use filter_eps=None (exact); filtering has its own tests at the end.
"""
import pytest
import torch

import tokenkernels as tk
from tokenkernels.reference import cross_entropy as ref

from tokenkernels.testing import DTYPES, tol
from .common import (BIAS_FACTOR, LOWP, assert_close_fp32, assert_precision_rule,
                     kernel, logit_scale, logits64, make_inputs, norm_err, reference, rel_err)

F64 = torch.float64


@pytest.fixture
def small_tiles(monkeypatch):
    """Small tiles (the CPU kernel's tuning knobs) so small shapes run through many row / vocab
    tiles, the online log-sum-exp across tiles and the tile-wise gradient accumulation."""
    monkeypatch.setenv("TOKENKERNELS_CE_BLOCK_N", "16")
    monkeypatch.setenv("TOKENKERNELS_CE_BLOCK_V", "64")


# options that matter, alone and combined; (name, make_inputs kwargs, op kwargs, leading shape)
OPTIONS = [
    ("plain", {}, {}, (40,)),
    ("bias", dict(bias=True), {}, (40,)),
    ("ignore", dict(ignore_frac=0.3), {}, (40,)),
    ("ignore_index_in_vocab", dict(ignore_frac=0.3, ignore_index=3), dict(ignore_index=3), (40,)),
    ("softcap", dict(wscale=6.0), dict(softcap=4.0), (40,)),
    ("smoothing", {}, dict(label_smoothing=0.1), (40,)),
    ("smoothing_1", {}, dict(label_smoothing=1.0), (40,)),
    ("z_loss", dict(wscale=3.0), dict(z_loss=0.05), (40,)),
    ("shift", {}, dict(shift=True), (3, 13)),
    ("return_lse", {}, dict(return_lse=True), (40,)),
    ("return_aux", dict(wscale=3.0), dict(return_aux=True), (40,)),
    ("int32_targets", dict(int32=True, ignore_frac=0.2), {}, (40,)),
    ("batch_dims", dict(bias=True, ignore_frac=0.2), dict(return_lse=True), (2, 3, 7)),
    ("all", dict(bias=True, ignore_frac=0.25, wscale=5.0),
     dict(softcap=3.0, label_smoothing=0.2, z_loss=0.01, shift=True, return_lse=True,
          return_aux=True), (4, 10)),
]
OPTION_IDS = [o[0] for o in OPTIONS]
REDUCTIONS = ["mean", "sum", "none"]
V_SMALL, D_SMALL = 300, 32


def _compare(dtype, device, shape, D, V, inp, opts, k_opts=None):
    h, w, t, b = make_inputs(shape, D, V, dtype, **inp)
    ko = dict(filter_eps=None, **opts, **(k_opts or {}))
    k = kernel(h.to(device), w.to(device), t.to(device), None if b is None else b.to(device), **ko)
    truth = reference(h, w, t, b, dtype=F64, **opts)
    if dtype == torch.float32:
        assert_close_fp32(k, truth, zscale=logit_scale(h, w, b))
    else:
        r = reference(h, w, t, b, **opts)
        assert_precision_rule(k, r, truth, dtype, factor=1.0 if b is None else BIAS_FACTOR)
        if "argmax" in truth:
            # the logits of the kernel and of the truth differ by rounding only: an arg-max may
            # differ only where the fp64 top-2 gap is within that rounding
            _argmax_up_to_rounding(k["argmax"], h, w, b, opts, dtype)
    # shapes and dtypes of the outputs
    red = opts.get("reduction", "mean")
    assert k["out"].dtype == torch.float32
    assert k["out"].shape == (t.shape if red == "none" else ())
    if "lse" in k:
        assert k["lse"].dtype == torch.float32 and k["lse"].shape == t.shape
    if "argmax" in k:
        assert k["argmax"].shape == t.shape and k["entropy"].shape == t.shape
        assert k["entropy"].dtype == torch.float32
    assert k["dh"].dtype == dtype and k["dh"].shape == h.shape
    assert k["dw"].dtype == dtype and k["dw"].shape == w.shape
    if b is not None:
        assert k["db"].dtype == dtype and k["db"].shape == b.shape
    return k, truth


def _argmax_up_to_rounding(argmax, h, w, b, opts, dtype):
    z = logits64(h, w, b, opts.get("softcap"))
    am = argmax.cpu().reshape(-1)
    gap = z.max(-1).values - z.gather(1, am[:, None])[:, 0]
    ulp = torch.finfo(dtype).eps * z.abs().max(-1).values
    assert bool((gap <= 2 * ulp).all()), gap.max().item()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,inp,opts,shape", OPTIONS, ids=OPTION_IDS)
def test_options_fp32(device, name, inp, opts, shape, reduction):
    _compare(torch.float32, device, shape, D_SMALL, V_SMALL, inp, dict(opts, reduction=reduction))


@pytest.mark.parametrize("name,inp,opts,shape", OPTIONS, ids=OPTION_IDS)
def test_options_fp32_small_tiles(device, small_tiles, name, inp, opts, shape):
    """Per-token losses and gradients (reduction="none": the most demanding) through many tiles."""
    _compare(torch.float32, device, shape, D_SMALL, V_SMALL, inp, dict(opts, reduction="none"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("name,inp,opts,shape", OPTIONS, ids=OPTION_IDS)
def test_options_low_precision_rule(device, dtype, name, inp, opts, shape, reduction):
    """One tile in each direction (N <= 256, V <= 2048): the rule per option."""
    _compare(dtype, device, shape, D_SMALL, V_SMALL, inp, dict(opts, reduction=reduction))


# odd shapes from the issue: N in {1, 3, 1000}, V in {1, 7, 50257}, D in {1, 64, 4096}
SHAPES = [
    (1, 64, 7), (3, 1, 7), (3, 64, 1), (1000, 64, 7), (3, 8, 50257), (3, 4096, 7),
    (1000, 1, 1), (1, 4096, 1), (257, 64, 2049),
]


@pytest.mark.parametrize("N,D,V", SHAPES, ids=[f"N{n}-D{d}-V{v}" for n, d, v in SHAPES])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_shapes_fp32(device, N, D, V, bias):
    _compare(torch.float32, device, (N,), D, V, dict(bias=bias, wscale=2.0),
             dict(reduction="none", return_lse=True, return_aux=True, label_smoothing=0.1))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("N,D,V", SHAPES, ids=[f"N{n}-D{d}-V{v}" for n, d, v in SHAPES])
def test_shapes_low_precision_rule(device, dtype, N, D, V):
    """The rule at the issue's shapes with the kernel's default tiles. Shapes spanning several
    row tiles (N = 1000, 257) or vocabulary tiles (V = 50257, 2049) check that the gradients
    accumulated tile by tile are not rounded to fp16/bf16 more often than torch's one GEMM.
    No bias: the kernel's logits are then rounded exactly like torch's, so the rule needs no
    BIAS_FACTOR and measures the kernel's own arithmetic."""
    _compare(dtype, device, (N,), D, V, dict(wscale=2.0), dict(reduction="none", return_lse=True))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("accum_fp32", [False, True])
def test_multi_tile_gradients_low_precision_rule(device, small_tiles, dtype, accum_fp32):
    """Many row and vocabulary tiles (16 x 64): dhidden sums 16 vocabulary tiles and dweight 8
    row tiles. The same-dtype reference rounds each gradient once (one GEMM, fp32 accumulation);
    the kernel must not be less accurate (accum_fp32 only changes dweight's accumulator)."""
    _compare(dtype, device, (128,), 32, 1000, dict(wscale=2.0),
             dict(reduction="sum"), dict(accum_fp32=accum_fp32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_tokens_ignored(device, dtype, reduction):
    """Every target ignored: the loss is 0 (mean over zero tokens: 0, not NaN) and every
    gradient is exactly 0; lse is still returned for every token."""
    h, w, t, b = make_inputs((2, 5), 16, 11, dtype, bias=True, device=device)
    t = torch.full_like(t, -100)
    for shift in (False, True):
        for smoothing, zl in ((0.0, 0.0), (0.3, 0.1)):
            k = kernel(h, w, t, b, reduction=reduction, shift=shift, filter_eps=None,
                       label_smoothing=smoothing, z_loss=zl)
            assert not torch.isnan(k["out"]).any()
            assert torch.equal(k["out"].cpu(), torch.zeros(() if reduction != "none" else t.shape))
            for key in ("dh", "dw", "db"):
                assert torch.equal(k[key].cpu(), torch.zeros_like(k[key].cpu())), key
    loss, lse = tk.linear_cross_entropy(h, w, t, b, reduction=reduction, return_lse=True)
    truth = reference(h.cpu(), w.cpu(), t.cpu(), b.cpu(), dtype=F64, return_lse=True)
    assert torch.isfinite(lse).all()
    assert rel_err(lse, truth["lse"]) <= 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shift_last_position_only(device, dtype):
    """shift=True with T = 1: every position is the last, so everything is ignored."""
    h, w, t, b = make_inputs((3, 1), 8, 5, dtype, device=device)
    k = kernel(h, w, t, b, shift=True, filter_eps=None)
    assert k["out"].item() == 0.0 and not k["dh"].abs().any()


def test_shift_equals_manual_shift(device):
    h, w, t, b = make_inputs((2, 9), 16, 23, torch.float32, bias=True, device=device)
    a = tk.linear_cross_entropy(h, w, t, b, shift=True, reduction="none")
    t2 = torch.cat([t[:, 1:], torch.full_like(t[:, :1], -100)], dim=1)
    c = tk.linear_cross_entropy(h, w, t2, b, reduction="none")
    assert torch.equal(a, c)
    assert torch.equal(a[:, -1].cpu(), torch.zeros(2))


@pytest.mark.parametrize("s", [0, 1, 2, 3, 9])
def test_integer_shift(device, s):
    """shift=s (Cut Cross-Entropy's semantics): hidden[:, :-s] predicts targets[:, s:]; the last
    s positions are ignored. Equal to shifting by hand, to CCE's slicing (mean over the same
    tokens) and to the reference; shift=2 really differs from shift=1 (it once silently ran as
    shift 1, ~10 nats off)."""
    T = 9
    h, w, t, b = make_inputs((2, T), 16, 23, torch.float32, bias=True, wscale=4.0, device=device)
    a = tk.linear_cross_entropy(h, w, t, b, shift=s, reduction="none")
    t2 = torch.cat([t[:, s:], torch.full_like(t[:, :s], -100)], dim=1)
    assert torch.equal(a, tk.linear_cross_entropy(h, w, t2, b, reduction="none"))
    assert torch.equal(a[:, T - s:].cpu(), torch.zeros(2, s))
    truth = reference(h.cpu(), w.cpu(), t.cpu(), b.cpu(), dtype=F64, shift=s, reduction="none")
    assert_close_fp32(kernel(h, w, t, b, shift=s, reduction="none", filter_eps=None), truth,
                      zscale=logit_scale(h, w, b))
    mean = tk.linear_cross_entropy(h, w, t, b, shift=s)
    if 0 < s < T:  # CCE: e[:, :-s] with targets[:, s:]
        cce = tk.linear_cross_entropy(h[:, :-s], w, t[:, s:], b)
        torch.testing.assert_close(mean, cce, rtol=1e-6, atol=1e-6)
    if s >= 2:
        assert not torch.allclose(mean, tk.linear_cross_entropy(h, w, t, b, shift=1))
    if s <= 1:  # bool True = 1, False = 0
        assert torch.equal(a, tk.linear_cross_entropy(h, w, t, b, shift=bool(s), reduction="none"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(device, dtype):
    """Transposed / strided views of hidden, weight, bias and targets give the same result as
    their contiguous copies, and gradients of the views' shapes."""
    N, D, V = 37, 24, 150
    g = torch.Generator().manual_seed(5)
    h_t = torch.randn(D, N, generator=g).to(dtype).to(device)
    hidden = h_t.t()                                                     # (N, D), transposed
    w_big = (torch.randn(V, 2 * D, generator=g) / D ** 0.5).to(dtype).to(device)
    weight = w_big[:, ::2]                                               # (V, D), stride 2
    b_big = torch.randn(2 * V, generator=g).to(dtype).to(device)
    bias = b_big[1::2]                                                   # (V,), stride 2
    t_big = torch.randint(0, V, (N, 2), generator=g).to(device)
    targets = t_big[:, 1]                                                # (N,), stride 2
    assert not (hidden.is_contiguous() or weight.is_contiguous() or bias.is_contiguous()
                or targets.is_contiguous())
    opts = dict(label_smoothing=0.1, softcap=5.0, return_lse=True, filter_eps=None)
    k = kernel(hidden, weight, targets, bias, **opts)
    c = kernel(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
               bias.contiguous(), **opts)
    for key in ("out", "lse", "dh", "dw", "db"):
        torch.testing.assert_close(k[key], c[key], rtol=0, atol=0, msg=key)
    assert k["dh"].shape == (N, D) and k["dw"].shape == (V, D) and k["db"].shape == (V,)
    if dtype == torch.float32:
        truth = reference(hidden.cpu(), weight.cpu(), targets.cpu(), bias.cpu(), dtype=F64,
                          label_smoothing=0.1, softcap=5.0, return_lse=True)
        assert_close_fp32(k, truth, zscale=logit_scale(hidden, weight, bias))


def test_int32_targets_equal_int64(device):
    h, w, t, b = make_inputs(50, 16, 70, torch.float32, bias=True, ignore_frac=0.2,
                             device=device)
    a = kernel(h, w, t, b, reduction="none", return_aux=True)
    c = kernel(h, w, t.to(torch.int32), b, reduction="none", return_aux=True)
    for key in ("out", "argmax", "entropy", "dh", "dw", "db"):
        assert torch.equal(a[key], c[key]), key


def test_gradients_only_for_inputs_that_need_them(device):
    h, w, t, b = make_inputs(20, 8, 30, torch.float32, bias=True, device=device)
    truth = {}
    hh, ww, bb = (x.cpu().double().requires_grad_() for x in (h, w, b))
    ref.linear_cross_entropy(hh, ww, t.cpu(), bb).backward()
    truth = dict(dh=hh.grad, dw=ww.grad, db=bb.grad)
    for need in [(True, False, False), (False, True, False), (False, False, True),
                 (True, True, False), (False, False, False)]:
        xs = [x.clone().requires_grad_(r) for x, r in zip((h, w, b), need)]
        loss = tk.linear_cross_entropy(*xs[:2], t, xs[2], filter_eps=None)
        assert loss.requires_grad == any(need)
        if not any(need):
            continue
        loss.backward()
        for x, r, key in zip(xs, need, ("dh", "dw", "db")):
            if r:
                assert rel_err(x.grad, truth[key]) <= tol(torch.float32, "ce_grad"), key
            else:
                assert x.grad is None


def test_aux_matches_reference(device):
    """arg-max (exact, no ties in continuous data) and entropy, also for the first-maximum rule
    on exact ties (a duplicated weight row)."""
    h, w, t, b = make_inputs(64, 16, 500, torch.float32, wscale=4.0, device=device)
    w = w.clone()
    w[7] = w[400] = w[7] * 3  # exact duplicate, large: ties resolve to the lower index like
    # torch.argmax (index 7 lies in an earlier tile than 400 with the default and small tiles)
    k = kernel(h, w, t, None, return_aux=True)
    truth = reference(h.cpu(), w.cpu(), t.cpu(), None, dtype=F64, return_aux=True)
    assert_close_fp32(k, truth, keys=("entropy",), zscale=logit_scale(h, w))
    assert torch.equal(k["argmax"].cpu(), truth["argmax"])
    assert (truth["argmax"] == 7).any(), "the tie case must occur"


def test_lse_and_loss_without_grad(device):
    """No autograd: the op runs under no_grad / on plain tensors too."""
    h, w, t, b = make_inputs(10, 8, 20, torch.float32, bias=True, device=device)
    with torch.no_grad():
        loss, lse = tk.linear_cross_entropy(h, w, t, b, return_lse=True)
    truth = reference(h.cpu(), w.cpu(), t.cpu(), b.cpu(), dtype=F64, return_lse=True)
    zs = logit_scale(h, w, b)
    assert rel_err(loss, truth["out"], zs) <= tol(torch.float32, "ce_loss")
    assert rel_err(lse, truth["lse"], zs) <= tol(torch.float32, "ce_loss")


@pytest.mark.parametrize("impl", ["auto", "plain", "wmma", "tuned", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_without_finite_logits_is_zero(device, dtype, impl):
    """A token without any logit > -inf (all -inf via the bias, or NaN hidden states) has
    arg-max 0 on every device and path (the fused CUDA forward once wrote INT64_MAX)."""
    N, D, V = 70, 16, 300  # D % 8 == 0: "tuned" is the fused kernel on CUDA for fp16/bf16
    h, w, t, b = make_inputs(N, D, V, dtype, bias=True, device=device)
    h = h.clone()
    h[3] = float("nan")
    am = tk.linear_cross_entropy(h, w, t, b, return_aux=True, impl=impl)[1]
    assert am.dtype == torch.int64 and am[3].item() == 0
    assert bool(((am >= 0) & (am < V)).all())
    ninf = torch.full_like(b, float("-inf"))
    am = tk.linear_cross_entropy(h, w, t, ninf, return_aux=True, impl=impl, check=False)[1]
    assert torch.equal(am.cpu(), torch.zeros(N, dtype=torch.int64))


def _tiny_gradient_inputs():
    """fp32 (hidden, weight, targets) whose fp16 dZ (~2^-27 for g = 2^-13) lies below fp16's
    smallest subnormal while dhidden (~2^-13) does not: every non-target weight row is the same
    sign vector u. Returns N, D, V, g, hidden, weight, targets."""
    N, D, V, g = 16, 32, 2 ** 14, 2.0 ** -13
    gen = torch.Generator().manual_seed(11)
    u = torch.randn(D, generator=gen).sign()
    w = u.repeat(V, 1)
    w[:N] = 0.05 * torch.randn(N, D, generator=gen)
    h = 0.05 * torch.randn(N, D, generator=gen)
    return N, D, V, g, h, w, torch.arange(N)


@pytest.mark.parametrize("impl", ["auto", "plain", "wmma", "tuned"])
def test_fp16_tiny_gradients_not_flushed(device, impl):
    """fp16: the dZ entries (~2^-27 here) lie below fp16's smallest subnormal, while the
    gradient of hidden (~2^-13) does not. dZ must not be rounded to fp16 unscaled before the
    gradient GEMMs (it flushed to zero on CUDA: N = 8192 tokens, V = 256000, mean reduction
    gives dZ ~ 5e-10). Construction: every non-target weight row is the same vector u, so
    dhidden = g * (E_p[w] - w_target) is dominated by u."""
    N, D, V, g, h, w, t = _tiny_gradient_inputs()
    h16, w16 = h.half(), w.half()
    hk = h16.to(device).clone().requires_grad_()
    (tk.linear_cross_entropy(hk, w16.to(device), t.to(device), reduction="sum", impl=impl,
                             filter_eps=None) * g).backward()
    hr = h16.double().requires_grad_()
    (ref.linear_cross_entropy(hr, w16.double(), t, reduction="sum") * g).backward()
    assert hr.grad.abs().max() > 2.0 ** -14  # representable in fp16
    assert norm_err(hk.grad, hr.grad) <= 2.0 ** -8


def test_extreme_logits_finite(device):
    """Large logits (|z| ~ 1e4) must not overflow the online log-sum-exp."""
    h, w, t, b = make_inputs(16, 8, 100, torch.float32, wscale=3e4, device=device)
    k = kernel(h, w, t, None, reduction="none", return_lse=True, filter_eps=None)
    truth = reference(h.cpu(), w.cpu(), t.cpu(), None, dtype=F64, reduction="none",
                      return_lse=True)
    for key in ("out", "lse", "dh", "dw"):
        assert torch.isfinite(k[key]).all(), key
    assert_close_fp32(k, truth, keys=("out", "lse", "dh", "dw"), zscale=logit_scale(h, w))


# ---------------------------------------------------------------------------------------------
# gradient filtering
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_filter_auto_within_rule(device, dtype):
    """filter_eps="auto" on random data (one tile in each direction): within the precision rule
    + ``ce_filter`` (fp32: no filtering, bitwise equal to exact)."""
    opts = dict(reduction="none", label_smoothing=0.05, return_lse=True)
    h, w, t, b = make_inputs(100, 32, 1500, dtype, bias=True, wscale=4.0)
    dev = lambda x: x.to(device)  # noqa: E731
    auto = kernel(dev(h), dev(w), dev(t), dev(b), filter_eps="auto", **opts)
    exact = kernel(dev(h), dev(w), dev(t), dev(b), filter_eps=None, **opts)
    if dtype == torch.float32:
        for key in ("out", "lse", "dh", "dw", "db"):
            assert torch.equal(auto[key], exact[key]), key
        return
    truth = reference(h, w, t, b, dtype=F64, **opts)
    r = reference(h, w, t, b, **opts)
    assert_precision_rule(auto, r, truth, dtype, slack=tol(dtype, "ce_filter"),
                          factor=BIAS_FACTOR)


def _peaked_inputs(dtype, device, V=4096, cut=2048, drop=-9.0):
    """Logits of vocabulary rows >= cut are pushed down by a bias of ``drop``: every softmax
    value there is <= ~1e-4 * e^drop (measured) < 2^-15, below the auto threshold of fp16 and
    bf16, yet not zero, so the exact gradients of those rows are small but nonzero."""
    h, w, t, b = make_inputs(24, 16, V, dtype, bias=True)
    b = torch.where(torch.arange(V) >= cut, torch.full((V,), drop), torch.zeros(V)).to(dtype)
    t = torch.randint(0, cut, t.shape, generator=torch.Generator().manual_seed(3))
    return h.to(device), w.to(device), t.to(device), b.to(device)


@pytest.mark.parametrize("impl", ["auto", "plain", "tuned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_filter_skips_negligible_tiles(device, monkeypatch, dtype, impl):
    """Filtering really skips tiles: with every |softmax - onehot| of vocabulary rows >= 2048
    below the threshold, those rows' weight / bias gradients are exactly 0 with filtering (no
    tile touched them) and nonzero without; the rest is unchanged, and dhidden loses at most
    ``ce_filter`` (normwise) against the exact kernel (fp32 with filter_eps=1e-3: 1e-3).
    Every path filters: the CUDA plain path (fp32, impl="plain", deterministic mode) once
    ignored filter_eps."""
    monkeypatch.setenv("TOKENKERNELS_CE_FUSED", "0")  # the CPU fused path does not filter
    monkeypatch.setenv("TOKENKERNELS_CE_BLOCK_V", "512")  # tiles inside either half
    h, w, t, b = _peaked_inputs(dtype, device)
    feps = "auto" if dtype != torch.float32 else 1e-3  # fp32 "auto" never filters
    filt = kernel(h, w, t, b, filter_eps=feps, impl=impl)
    exact = kernel(h, w, t, b, filter_eps=None, impl=impl)
    assert exact["dw"][2048:].abs().sum() > 0 and exact["db"][2048:].abs().sum() > 0
    assert not filt["dw"][2048:].abs().any() and not filt["db"][2048:].abs().any()
    assert torch.equal(filt["dw"][:2048], exact["dw"][:2048])
    assert torch.equal(filt["db"][:2048], exact["db"][:2048])
    assert torch.equal(filt["out"], exact["out"])
    hc, wc, tc, bc = (x.cpu() for x in (h, w, t, b))
    truth = reference(hc, wc, tc, bc, dtype=F64)
    slack = 1e-3 if dtype == torch.float32 else tol(dtype, "ce_filter")
    for key in ("dh", "dw", "db"):
        e_f, e_x = norm_err(filt[key], truth[key]), norm_err(exact[key], truth[key])
        assert e_f <= e_x + slack, (key, e_f, e_x)


def test_filter_fp32_auto_never_filters(device, monkeypatch):
    monkeypatch.setenv("TOKENKERNELS_CE_BLOCK_V", "512")
    h, w, t, b = _peaked_inputs(torch.float32, device)
    auto = kernel(h, w, t, b, filter_eps="auto")
    assert auto["dw"][2048:].abs().sum() > 0


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_filter_zero_equals_exact(device, dtype):
    h, w, t, b = make_inputs(30, 16, 300, dtype, bias=True, device=device)
    a = kernel(h, w, t, b, filter_eps=0.0)
    c = kernel(h, w, t, b, filter_eps=None)
    for key in ("out", "dh", "dw", "db"):
        assert torch.equal(a[key], c[key]), key


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("impl", ["auto", "plain", "wmma", "tuned"])
@pytest.mark.parametrize("feps", [0.0, "auto", 1e-3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_filter_never_drops_nan(device, dtype, feps, impl, softcap):
    """A tile whose only nonzero dZ entries are NaN (token 0 has NaN hidden states, the others
    are ignored) must not be skipped by the filter, whatever filter_eps (0 included): NaN fails
    every |x| >= threshold test. The gradients must be NaN, not silently 0 or finite (the CPU's
    vectorised exp and softcap once turned NaN logits into finite values)."""
    h, w, t, b = make_inputs(8, 16, 300, dtype, bias=True, device=device)
    h = h.clone()
    h[0] = float("nan")
    t = torch.full_like(t, -100)
    t[0] = 5
    k = kernel(h, w, t, b, reduction="sum", filter_eps=feps, impl=impl, softcap=softcap)
    assert torch.isnan(k["out"])
    assert torch.isnan(k["dh"][0]).all()
    assert not torch.isnan(k["dh"][1:]).any() and not k["dh"][1:].abs().any()
    assert torch.isnan(k["dw"]).any() and torch.isnan(k["db"]).all()
