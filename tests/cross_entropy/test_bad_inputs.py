"""Bad inputs: a clear error naming the argument, never a crash or an out-of-bounds read."""
import math

import pytest
import torch

import tokenkernels as tk

LCE = tk.linear_cross_entropy


def _ok(device, N=6, D=4, V=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype).to(device)
    w = torch.randn(V, D, generator=g).to(dtype).to(device)
    b = torch.randn(V, generator=g).to(dtype).to(device)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    return h, w, t, b


def _raises(match, fn, *a, **k):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        fn(*a, **k)


def test_valid_inputs_pass(device):
    h, w, t, b = _ok(device)
    assert torch.isfinite(LCE(h, w, t, b))


def test_shape_mismatches(device):
    h, w, t, b = _ok(device)
    _raises(r"weight.*D|D.*weight", LCE, h, w[:, :3], t)            # weight D mismatch
    _raises(r"weight", LCE, h, w[0], t)                             # weight 1-d
    _raises(r"weight", LCE, h, w.unsqueeze(0), t)                   # weight 3-d
    _raises(r"bias", LCE, h, w, t, b[:5])                           # bias length
    _raises(r"bias", LCE, h, w, t, b.view(3, 3))                    # bias 2-d
    _raises(r"targets", LCE, h, w, t[:4])                           # targets length
    _raises(r"targets", LCE, h, w, t.view(2, 3))                    # targets shape
    _raises(r"targets", LCE, h.view(2, 3, 4), w, t)                 # leading dims mismatch
    _raises(r"hidden", LCE, h[0, 0], w, t[0])                       # 0-d hidden


def test_dtype_mismatches(device):
    h, w, t, b = _ok(device)
    _raises(r"targets", LCE, h, w, t.float())                       # float targets
    _raises(r"targets", LCE, h, w, t.to(torch.int16))               # int16 targets
    _raises(r"targets", LCE, h, w, t.bool())
    _raises(r"hidden", LCE, h.to(torch.int32), w.to(torch.int32), t)  # integer hidden
    _raises(r"hidden", LCE, h.to(torch.int64), w, t)
    _raises(r"weight", LCE, h, w.half(), t)                         # weight dtype differs
    _raises(r"bias", LCE, h, w, t, b.half())                        # bias dtype differs
    _raises(r"hidden", LCE, h.to(torch.complex64), w.to(torch.complex64), t)


def test_not_tensors():
    h, w, t, b = _ok("cpu")
    _raises(r"hidden", LCE, h.tolist(), w, t)
    _raises(r"weight", LCE, h, None, t)
    _raises(r"targets", LCE, h, w, t.tolist())
    _raises(r"bias", LCE, h, w, t, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_device_mismatches():
    h, w, t, b = _ok("cpu")
    _raises(r"weight", LCE, h, w.cuda(), t)
    _raises(r"targets", LCE, h, w, t.cuda())
    _raises(r"bias", LCE, h, w, t, b.cuda())
    _raises(r"weight|hidden", LCE, h.cuda(), w, t.cuda())


def test_device_mismatch_meta_weight():
    """A weight / bias left on the meta device (deferred initialisation never materialised) with
    CPU hidden states must be refused by name, not dispatched to the fake kernel, whose
    uninitialised outputs would become a garbage loss. Also exercises the device checks
    without CUDA."""
    h, w, t, b = _ok("cpu")
    _raises(r"weight|device", LCE, h, w.to("meta"), t)
    _raises(r"bias|device", LCE, h, w, t, b.to("meta"))


@pytest.mark.parametrize("bad", [9, 100, -1, -101, 2 ** 40])
def test_targets_out_of_range_cpu_error(bad):
    h, w, t, b = _ok("cpu")
    t[3] = bad
    _raises(r"targets\[3\].*outside", LCE, h, w, t)
    _raises(r"targets", LCE, h, w, t.to(torch.int32) if abs(bad) < 2 ** 31 else t, b,
            reduction="none")
    # the backward path too (via autograd) never runs: the forward refuses first
    hh = h.clone().requires_grad_()
    _raises(r"targets", LCE, hh, w, t)


def test_targets_out_of_range_with_shift_checked_after_shift():
    """With shift=True the last target of a row is dropped (never predicted): an out-of-range
    value there is harmless, anywhere else it is an error."""
    h, w, t, b = _ok("cpu", N=6)
    h, t = h.view(2, 3, 4), t.view(2, 3)
    t0 = t.clone()
    t0[:, 0] = 999  # shifted out
    assert torch.isfinite(LCE(h, w, t0, shift=True))
    t1 = t.clone()
    t1[1, 2] = 999  # predicted by position (1, 1)
    _raises(r"targets", LCE, h, w, t1, shift=True)


@pytest.mark.parametrize("bad", [9, -1, 1000])
def test_targets_out_of_range_unchecked_gives_nan(device, bad):
    """check=False: never a crash or out-of-bounds read; the token's loss is NaN (so the mean
    is NaN) and the other tokens are unaffected."""
    h, w, t, b = _ok(device)
    t[3] = bad
    good = t.clone()
    good[3] = -100
    per_tok = LCE(h, w, t, b, reduction="none", check=False)
    assert math.isnan(per_tok[3].item())
    ref_tok = LCE(h, w, good, b, reduction="none")
    keep = torch.arange(6, device=device) != 3
    torch.testing.assert_close(per_tok[keep], ref_tok[keep])
    assert math.isnan(LCE(h, w, t, b, check=False).item())
    hh = h.clone().requires_grad_()
    LCE(hh, w, t, b, check=False, reduction="sum").backward()  # must not crash


def test_invalid_options(device):
    h, w, t, b = _ok(device)
    _raises(r"reduction", LCE, h, w, t, reduction="avg")
    _raises(r"reduction", LCE, h, w, t, reduction=None)
    _raises(r"label_smoothing", LCE, h, w, t, label_smoothing=-0.1)
    _raises(r"label_smoothing", LCE, h, w, t, label_smoothing=1.5)
    _raises(r"label_smoothing", LCE, h, w, t, label_smoothing=float("nan"))
    _raises(r"z_loss", LCE, h, w, t, z_loss=-1e-4)
    _raises(r"z_loss", LCE, h, w, t, z_loss=float("nan"))
    _raises(r"softcap", LCE, h, w, t, softcap=0.0)
    _raises(r"softcap", LCE, h, w, t, softcap=-5.0)
    _raises(r"softcap", LCE, h, w, t, softcap=float("nan"))
    _raises(r"filter_eps", LCE, h, w, t, filter_eps="fast")
    _raises(r"filter_eps", LCE, h, w, t, filter_eps=-1e-3)
    _raises(r"filter_eps", LCE, h, w, t, filter_eps=float("nan"))
    _raises(r"impl", LCE, h, w, t, impl="fastest")
    _raises(r"impl", LCE, h, w, t, impl=None)


def test_invalid_shift(device):
    """shift: an int in [0, T] or a bool; anything else raises naming shift (a float or a
    shift beyond the sequence was once accepted, and shift=2 silently ran as shift 1)."""
    h, w, t, b = _ok(device)
    h3, t3 = h.view(2, 3, 4), t.view(2, 3)
    _raises(r"shift", LCE, h3, w, t3, shift=-1)
    _raises(r"shift", LCE, h3, w, t3, shift=4)
    _raises(r"shift", LCE, h3, w, t3, shift=1.0)
    _raises(r"shift", LCE, h3, w, t3, shift="1")
    _raises(r"shift", LCE, h[0], w, t[0], shift=1)          # 0-d targets: no sequence
    _raises(r"shift", tk.LinearCrossEntropy(shift=-2), h3, w, t3)
    assert torch.isfinite(LCE(h3, w, t3, shift=3))           # = T: everything ignored, loss 0
    assert LCE(h3, w, t3, shift=3).item() == 0.0
    assert LCE(h3[:, :0], w, t3[:, :0], shift=2).item() == 0.0  # empty sequences: nothing to shift
    assert torch.isfinite(LCE(h[0], w, t[0], shift=False))


def test_module_invalid_options_raise_on_call(device):
    h, w, t, b = _ok(device)
    with pytest.raises((ValueError, TypeError), match="reduction"):
        tk.LinearCrossEntropy(reduction="avg")(h, w, t)


def test_empty_vocabulary(device):
    h, w, t, b = _ok(device)
    _raises(r"V >= 1|at least one|weight", LCE, h, w[:0], t.clamp(max=-100))


def test_empty_tokens(device):
    """N = 0 is valid: mean 0 (not NaN), sum 0, empty per-token loss, zero gradients."""
    h, w, t, b = _ok(device)
    h0, t0 = h[:0].clone().requires_grad_(), t[:0]
    assert LCE(h0, w, t0).item() == 0.0
    assert LCE(h0, w, t0, reduction="sum").item() == 0.0
    assert LCE(h0, w, t0, reduction="none").shape == (0,)
    ww = w.clone().requires_grad_()
    LCE(h0, ww, t0, reduction="sum").backward()
    assert torch.equal(ww.grad, torch.zeros_like(ww))


def test_ops_reject_bad_internal_arguments(device):
    """The ops themselves (used directly or by other code) check their arguments too."""
    h, w, t, b = _ok(device)
    fwd = torch.ops.tokenkernels.cross_entropy_forward
    bwd = torch.ops.tokenkernels.cross_entropy_backward
    _raises(r"hidden", fwd, h.view(2, 3, 4), w, t, None, -100, None, 0, 9, False, False, True,
            0.0, False, "auto")
    _raises(r"shard|vocab", fwd, h, w, t, None, -100, None, 5, 9, False, False, True, 0.0,
            False, "auto")
    _raises(r"softcap", fwd, h, w, t, None, -100, -1.0, 0, 9, False, False, True, 0.0, False, "auto")
    lse = fwd(h, w, t, None, -100, None, 0, 9, False, False, True, 0.0, False, "auto")[0]
    c = torch.ones(6, device=device)
    _raises(r"lse", bwd, h, w, t, None, lse[:3], c, c, None, -100, None, 0, 0.0, True, True,
            False, False, "auto")
    _raises(r"coef_p", bwd, h, w, t, None, lse, c.long(), c, None, -100, None, 0, 0.0, True,
            True, False, False, "auto")
    _raises(r"coef_t", bwd, h, w, t, None, lse, c, c[:2], None, -100, None, 0, 0.0, True, True,
            False, False, "auto")
    _raises(r"bias", bwd, h, w, t, None, lse, c, c, None, -100, None, 0, 0.0, True, True, True,
            False, "auto")
    _raises(r"filter_eps", bwd, h, w, t, None, lse, c, c, None, -100, None, 0, -1.0, True, True,
            False, False, "auto")


def test_vocab_parallel_range_mismatch():
    h, w, t, b = _ok("cpu")
    vp = tk.VocabParallel(group=None, start=0, stop=5)  # weight has 9 rows
    _raises(r"vocab_parallel", LCE, h, w, t, vocab_parallel=vp)


# --- issue #16 (part 0): overflow in the shard range, softcap / options, D = 0, non-tensors ---
_I64 = 2 ** 63 - 1


def test_ops_vocab_range_without_overflow(device):
    """vocab_start + V must not overflow int64 into an accepted shard, and the backward (which
    has no vocab_total) refuses a vocab_start whose t - vocab_start / vocab_start + V overflow."""
    h, w, t, b = _ok(device)
    fwd = torch.ops.tokenkernels.cross_entropy_forward
    bwd = torch.ops.tokenkernels.cross_entropy_backward
    for start, total in ((_I64 - 3, _I64), (_I64, _I64), (-(2 ** 63), 9), (-1, 9), (1, 9),
                         (0, 8), (0, -(2 ** 63))):
        for check in (True, False):
            _raises(r"linear_cross_entropy.*vocab", fwd, h, w, t, None, -100, None, start, total,
                    False, False, check, 0.0, False, "auto")
    fwd(h, w, t, None, -100, None, _I64 - 9, _I64, False, False, False, 0.0, False, "auto")  # fits
    lse = fwd(h, w, t, None, -100, None, 0, 9, False, False, True, 0.0, False, "auto")[0]
    c = torch.ones(6, device=device)
    for start in (-(2 ** 63), -5, _I64, _I64 - 8):
        _raises(r"backward.*vocab_start", bwd, h, w, t, None, lse, c, c, None, -100, None, start,
                0.0, True, True, False, False, "auto")
    bwd(h, w, t, None, lse, c, c, None, -100, None, _I64 - 9, 0.0, True, True, False, False, "auto")


def test_ops_backward_checks_softcap(device):
    h, w, t, b = _ok(device)
    fwd = torch.ops.tokenkernels.cross_entropy_forward
    bwd = torch.ops.tokenkernels.cross_entropy_backward
    lse = fwd(h, w, t, None, -100, None, 0, 9, False, False, True, 0.0, False, "auto")[0]
    c = torch.ones(6, device=device)
    for cap in (float("nan"), 0.0, -1.0, float("-inf")):
        _raises(r"backward.*softcap", bwd, h, w, t, None, lse, c, c, None, -100, cap, 0, 0.0,
                True, True, False, False, "auto")
        _raises(r"softcap", fwd, h, w, t, None, -100, cap, 0, 9, False, False, True, 0.0, False, "auto")


def test_softcap_inf_is_no_softcap(device):
    """softcap = +inf is the limit softcap * tanh(z / softcap) -> z: the same as None (it was a
    NaN loss), in the wrapper and in the ops themselves."""
    h, w, t, b = _ok(device)
    inf = float("inf")
    torch.testing.assert_close(LCE(h, w, t, b, softcap=inf), LCE(h, w, t, b))
    fwd = torch.ops.tokenkernels.cross_entropy_forward
    bwd = torch.ops.tokenkernels.cross_entropy_backward
    a = fwd(h, w, t, b, -100, inf, 0, 9, True, True, True, 0.0, False, "auto")
    e = fwd(h, w, t, b, -100, None, 0, 9, True, True, True, 0.0, False, "auto")
    for x, y in zip(a, e):
        torch.testing.assert_close(x, y)
    c = torch.ones(6, device=device)
    ga = bwd(h, w, t, b, e[0], c, -c, None, -100, inf, 0, 0.0, True, True, True, False, "auto")
    ge = bwd(h, w, t, b, e[0], c, -c, None, -100, None, 0, 0.0, True, True, True, False, "auto")
    for x, y in zip(ga, ge):
        torch.testing.assert_close(x, y)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    LCE(hh, ww, t, softcap=inf).backward()
    assert torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()


def test_options_nan_inf_and_types_name_the_argument(device):
    h, w, t, b = _ok(device)
    nan, inf = float("nan"), float("inf")
    _raises(r"z_loss", LCE, h, w, t, z_loss=inf)
    _raises(r"label_smoothing", LCE, h, w, t, label_smoothing=inf)
    _raises(r"label_smoothing", LCE, h, w, t, label_smoothing=torch.tensor(nan))
    _raises(r"softcap", LCE, h, w, t, softcap=-inf)
    for name in ("softcap", "label_smoothing", "z_loss", "filter_eps"):
        for bad in ("x", [1.0], True, 1j):
            _raises(name, LCE, h, w, t, **{name: bad})
    _raises(r"z_loss", LCE, h, w, t, z_loss=None)
    _raises(r"label_smoothing", LCE, h, w, t, label_smoothing=None)
    # still accepted: ints, numpy-like / 0-d tensor numbers
    assert torch.isfinite(LCE(h, w, t, softcap=30, label_smoothing=torch.tensor(0.1), z_loss=0))


def test_non_tensor_and_non_int_arguments_name_the_argument(device):
    h, w, t, b = _ok(device)
    _raises(r"targets", LCE, h, w, None)
    _raises(r"hidden", LCE, None, w, t)
    _raises(r"hidden", LCE, h.tolist(), w, t)
    for bad in (1.5, None, "a", True, 2 ** 70):
        _raises(r"ignore_index", LCE, h, w, t, ignore_index=bad)
    assert torch.isfinite(LCE(h, w, t, ignore_index=torch.tensor(-100)))  # __index__ is fine
    for name in ("return_lse", "return_aux", "accum_fp32", "check"):
        for bad in ("no", None, 1):
            _raises(name, LCE, h, w, t, **{name: bad})
    _raises(r"reduction", LCE, h, w, t, reduction=["mean"])
    _raises(r"impl", LCE, h, w, t, impl=["auto"])
    _raises(r"vocab_parallel", LCE, h, w, t, vocab_parallel=(0, 9))
    _raises(r"vocab_parallel", LCE, h, w, t,
            vocab_parallel=tk.VocabParallel(group=None, start=0.0, stop=9.0))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_features(device, with_bias, dtype):
    """D = 0 is valid: every logit is the bias (0 without): loss = lse(bias) - bias[t]
    (log V without a bias), dhidden (N, 0), dweight (V, 0), dbias = the usual softmax - onehot."""
    from tokenkernels.reference import cross_entropy as ref
    h, w, t, b = _ok(device, dtype=dtype)
    h0 = h[:, :0].clone().requires_grad_()
    w0 = w[:, :0].clone().requires_grad_()
    b0 = b.clone().requires_grad_() if with_bias else None
    for reduction in ("mean", "sum", "none"):
        kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        got = LCE(h0, w0, t, b0, **kw)
        f32 = [None if x is None else x.float() for x in (h0, w0, b0)]
        exp = ref.linear_cross_entropy(f32[0], f32[1], t, f32[2], **kw)
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    if not with_bias:
        torch.testing.assert_close(LCE(h0, w0, t), torch.tensor(math.log(9), device=device))
    loss = LCE(h0, w0, t, b0, reduction="sum", label_smoothing=0.1)
    loss.backward()
    assert h0.grad.shape == (6, 0) and w0.grad.shape == (9, 0)
    if with_bias:
        bb = b.clone().requires_grad_()
        ref.linear_cross_entropy(h0.detach().float(), w0.detach().float(), t, bb.float(),
                                 reduction="sum", label_smoothing=0.1).backward()
        torch.testing.assert_close(b0.grad.float(), bb.grad.float(), atol=1e-2, rtol=1e-2)
    # the ops directly, every impl
    for impl in ("auto", "plain", "wmma", "tuned"):
        out = torch.ops.tokenkernels.cross_entropy_forward(h0.detach(), w0.detach(), t, None, -100, None,
                                                 0, 9, True, True, True, 0.0, False, impl)
        torch.testing.assert_close(out[0], torch.full((6,), math.log(9), device=device))


def test_ops_parse_impl_names(device):
    """The schemas' ``str impl``: "auto", "plain" or "tuned" (every one accepted on every device);
    any other name is a ValueError naming the op, impl and the accepted names."""
    h, w, t, b = _ok(device)
    fwd = torch.ops.tokenkernels.cross_entropy_forward
    bwd = torch.ops.tokenkernels.cross_entropy_backward
    c = torch.ones(6, device=device)
    for impl in ("auto", "plain", "wmma", "tuned"):
        lse = fwd(h, w, t, b, -100, None, 0, 9, False, False, True, 0.0, False, impl)[0]
        bwd(h, w, t, b, lse, c, -c, None, -100, None, 0, 0.0, True, True, True, False, impl)
    accepted = r"impl must be one of 'auto', 'plain', 'wmma', 'tuned', got '(fast|Auto|reference|)'"
    for bad in ("fast", "Auto", "reference", ""):  # "reference" is the Python API's, not an op's
        with pytest.raises(ValueError, match=r"tokenkernels\.linear_cross_entropy: " + accepted):
            fwd(h, w, t, b, -100, None, 0, 9, False, False, True, 0.0, False, bad)
        with pytest.raises(ValueError,
                           match=r"tokenkernels\.linear_cross_entropy_backward: " + accepted):
            bwd(h, w, t, b, lse, c, -c, None, -100, None, 0, 0.0, True, True, True, False, bad)


def test_ops_error_types(device):
    """The ops' checks raise ValueError for shapes / devices / values and TypeError for dtypes
    (cross_entropy_args.h), whatever the device; the wrapper passes them through."""
    h, w, t, b = _ok(device)
    fwd = torch.ops.tokenkernels.cross_entropy_forward
    rest = (-100, None, 0, 9, False, False, True, 0.0, False, "auto")
    with pytest.raises(ValueError, match=r"tokenkernels\.linear_cross_entropy: weight has D = 3"):
        fwd(h, w[:, :3], t, None, *rest)
    with pytest.raises(TypeError, match=r"tokenkernels\.linear_cross_entropy: targets must be "
                                        r"int64 or int32, got Float"):
        LCE(h, w, t.float())
    with pytest.raises(ValueError, match=r"tokenkernels\.linear_cross_entropy: softcap must be > 0"):
        LCE(h, w, t, softcap=-1.0)
    with pytest.raises(ValueError, match=r"tokenkernels\.linear_cross_entropy: filter_eps must be >= 0"):
        fwd(h, w, t, None, -100, None, 0, 9, False, False, True, -1.0, False, "auto")
    with pytest.raises(ValueError, match=r"tokenkernels\.linear_cross_entropy: bias must have shape"):
        LCE(h, w, t, b[:5])


# fakes-accept-mixed-meta (found by tests/fuzz, cross_entropy part): one meta tensor among real
# ones dispatches to the fake kernel, which must refuse it naming the argument (the C++ message),
# never return a shape-only or uninitialised result.
_FWD_TENSORS = ("hidden", "weight", "targets", "bias")
_BWD_TENSORS = ("hidden", "weight", "targets", "bias", "lse", "coef_p", "coef_t", "coef_1")


def _direct_args(device):
    h, w, t, b = _ok(device)
    fwd = torch.ops.tokenkernels.cross_entropy_forward
    lse = fwd(h, w, t, b, -100, None, 0, 9, False, False, True, 0.0, False, "auto")[0]
    c = torch.ones(6, device=device)
    return dict(hidden=h, weight=w, targets=t, bias=b, lse=lse, coef_p=c, coef_t=c, coef_1=c.clone())


@pytest.mark.parametrize("op,meta", [pytest.param("forward", n, id=f"forward-{n}") for n in _FWD_TENSORS] +
                         [pytest.param("backward", n, id=f"backward-{n}") for n in _BWD_TENSORS])
def test_ops_refuse_one_meta_tensor(device, op, meta):
    a = _direct_args(device)
    a[meta] = a[meta].to("meta")
    if op == "forward":
        call = lambda: torch.ops.tokenkernels.cross_entropy_forward(  # noqa: E731
            a["hidden"], a["weight"], a["targets"], a["bias"], -100, None, 0, 9, False, False, True, 0.0,
            False, "auto")
        name = "linear_cross_entropy"
    else:
        call = lambda: torch.ops.tokenkernels.cross_entropy_backward(  # noqa: E731
            a["hidden"], a["weight"], a["targets"], a["bias"], a["lse"], a["coef_p"], a["coef_t"], a["coef_1"],
            -100, None, 0, 0.0, True, True, True, False, "auto")
        name = "linear_cross_entropy_backward"
    if meta == "hidden":   # the reference tensor on meta: the first other one is named
        pat = rf"^tokenkernels\.{name}: weight is on {device}\S* but hidden is on meta"
    else:
        pat = rf"^tokenkernels\.{name}: {meta} is on meta but hidden is on {device}"
    with pytest.raises(ValueError, match=pat):
        call()


@pytest.mark.parametrize("meta", [pytest.param(n, id=n) for n in _FWD_TENSORS])
def test_public_op_refuses_one_meta_tensor(device, meta):
    h, w, t, b = _ok(device)
    a = dict(hidden=h, weight=w, targets=t, bias=b)
    a[meta] = a[meta].to("meta")
    with pytest.raises(ValueError, match=r"^tokenkernels\.linear_cross_entropy: \w+ is on "):
        LCE(a["hidden"], a["weight"], a["targets"], a["bias"], reduction="none")
