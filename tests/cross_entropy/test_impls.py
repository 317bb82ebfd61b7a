"""Every implementation choice (impl="auto" / "plain" / "tuned" / "reference") against the fp64
reference (the precision rule for fp16/bf16), and the deterministic mode. On the CPU the three
kernel impls share one engine; on CUDA "plain" is the ATen-GEMM tile path and "tuned" the fused
WMMA kernels (fp16/bf16), whose 64 x 128 tiles the shapes here cross with ragged edges (N, V, D
not multiples of 16 / 64 / 128). "reference" is the pure-PyTorch reference, run through the
public op like any other implementation."""
import inspect

import pytest
import torch

import tokenkernels as tk
from tokenkernels import variants
from tokenkernels.reference import cross_entropy as ref
from tokenkernels.testing import DTYPES

from .common import (BIAS_FACTOR, assert_close_fp32, assert_precision_rule, kernel,
                     logit_scale, make_inputs, reference)
from .test_forward_backward import _compare

IMPLS = list(variants.impls("cross_entropy"))  # auto, plain, tuned, reference
ALL_OPTS = dict(softcap=20.0, label_smoothing=0.1, z_loss=1e-3, return_lse=True,
                return_aux=True)


def _same_as_auto(device, dtype, shape, D, V, inp, opts, impl):
    """CPU: one engine behind every impl; "plain" / "tuned" must give auto's results exactly."""
    h, w, t, b = make_inputs(shape, D, V, dtype, device=device, **inp)
    a = kernel(h, w, t, b, impl="auto", filter_eps=None, **opts)
    c = kernel(h, w, t, b, impl=impl, filter_eps=None, **opts)
    assert a.keys() == c.keys()
    for key in a:
        if a[key] is not None:
            assert torch.equal(a[key], c[key]), key


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_impl_vs_reference(device, impl, dtype, reduction):
    args = (dtype, device, (150,), 40, 700, dict(ignore_frac=0.1, wscale=3.0),
            dict(ALL_OPTS, reduction=reduction))
    if device == "cpu" and impl in ("plain", "wmma", "tuned"):
        _same_as_auto(device, dtype, *args[2:], impl)
        return
    _compare(*args, dict(impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_impl_vs_reference_with_bias(device, impl, dtype):
    args = (dtype, device, (2, 67), 64, 300, dict(bias=True, ignore_frac=0.1, wscale=3.0),
            dict(ALL_OPTS, reduction="sum", shift=True))
    if device == "cpu" and impl in ("plain", "wmma", "tuned"):
        _same_as_auto(device, dtype, *args[2:], impl)
        return
    _compare(*args, dict(impl=impl))


def _strided(h, w, t, b):
    """Non-contiguous views with the same values: hidden transposed, weight / bias / targets
    with stride 2."""
    hv = h.t().contiguous().t()
    wv = torch.stack([w, torch.zeros_like(w)], dim=2).reshape(w.shape[0], -1)[:, ::2]
    bv = None if b is None else torch.stack([b, torch.zeros_like(b)], 1).reshape(-1)[::2]
    tv = torch.stack([t, t], 1)[:, 1]
    assert torch.equal(hv, h) and torch.equal(wv, w) and torch.equal(tv, t)
    assert not wv.is_contiguous()
    assert t.shape[0] == 1 or not tv.is_contiguous()
    assert min(h.shape) == 1 or not hv.is_contiguous()
    return hv, wv, tv, bv


ODD = [(1, 7, 129), (7, 129, 1000), (129, 1, 7), (1000, 33, 1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,V", ODD, ids=[f"N{n}-D{d}-V{v}" for n, d, v in ODD])
def test_impl_odd_sizes_non_contiguous(device, impl, dtype, N, D, V):
    """Odd sizes (1, 7, 129, 1000) with non-contiguous hidden / weight / bias / targets, every
    impl against the fp64 reference (fp16/bf16: the precision rule)."""
    opts = dict(reduction="none", label_smoothing=0.1, softcap=8.0, return_lse=True,
                return_aux=True, filter_eps=None)
    h, w, t, b = make_inputs(N, D, V, dtype, bias=True, ignore_frac=0.1, wscale=2.0)
    hv, wv, tv, bv = _strided(*(x.to(device) for x in (h, w, t, b)))
    k = kernel(hv, wv, tv, bv, impl=impl, **opts)
    truth = reference(h, w, t, b, dtype=torch.float64, **opts)
    if dtype == torch.float32:
        assert_close_fp32(k, truth, zscale=logit_scale(h, w, b), exact_argmax=False)
    else:
        assert_precision_rule(k, reference(h, w, t, b, **opts), truth, dtype, factor=BIAS_FACTOR)
    assert k["dh"].shape == (N, D) and k["dw"].shape == (V, D) and k["db"].shape == (V,)


def test_reference_has_the_public_signature():
    """tokenkernels.reference.cross_entropy.linear_cross_entropy takes the public op's
    arguments (names, kinds, defaults), all but impl (it is what impl="reference" runs) and the
    internal ones (a leading underscore: _divisor, for the HF patch)."""
    pub = {k: p for k, p in inspect.signature(tk.linear_cross_entropy).parameters.items()
           if not k.startswith("_")}
    assert pub.pop("impl").default == "auto"
    got = dict(inspect.signature(ref.linear_cross_entropy).parameters)
    assert list(got) == list(pub)
    for name, p in pub.items():
        assert (got[name].kind, got[name].default) == (p.kind, p.default), name


@pytest.mark.parametrize("opts", [dict(), dict(return_lse=True), dict(return_aux=True),
                                  dict(return_lse=True, return_aux=True, reduction="none")],
                         ids=["loss", "lse", "aux", "all"])
def test_reference_returns_the_public_structure(device, opts):
    h, w, t, b = make_inputs((2, 5), 8, 20, torch.float32, bias=True, device=device)
    a = tk.linear_cross_entropy(h, w, t, b, **opts)
    r = tk.linear_cross_entropy(h, w, t, b, impl="reference", **opts)
    assert type(a) is type(r)
    for x, y in zip(a if isinstance(a, tuple) else (a,), r if isinstance(r, tuple) else (r,)):
        assert x.shape == y.shape and x.dtype == y.dtype and x.device == y.device


def test_reference_module_and_unchecked_targets(device):
    """impl="reference" through the module; check=True raises like the kernels, check=False
    gives a NaN loss for that token only."""
    h, w, t, b = make_inputs(6, 8, 9, torch.float32, bias=True, device=device)
    mod = tk.LinearCrossEntropy(impl="reference", reduction="none")
    torch.testing.assert_close(mod(h, w, t, b), tk.linear_cross_entropy(h, w, t, b,
                                                                        reduction="none"))
    t = t.clone()
    t[3] = 9
    with pytest.raises(RuntimeError, match=r"targets\[3\] = 9 is outside \[0, V=9\)"):
        mod(h, w, t, b)
    with pytest.raises(RuntimeError, match=r"targets\[3\] = 9 is outside \[0, V=9\)"):
        tk.linear_cross_entropy(h, w, t, b)
    per_tok = tk.LinearCrossEntropy(impl="reference", reduction="none", check=False)(h, w, t, b)
    assert torch.isnan(per_tok[3]) and torch.isfinite(per_tok[torch.arange(6) != 3]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_mode_bitwise_repeatable(device, dtype):
    h, w, t, b = make_inputs(200, 48, 900, dtype, bias=True, ignore_frac=0.1, device=device)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [kernel(h, w, t, b, label_smoothing=0.1, return_lse=True, filter_eps=None)
                for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for r in runs[1:]:
        for key in ("out", "lse", "dh", "dw", "db"):
            assert torch.equal(r[key], runs[0][key]), key


def test_deterministic_mode_equals_plain(device):
    h, w, t, b = make_inputs(100, 32, 500, torch.bfloat16, bias=True, device=device)
    plain = kernel(h, w, t, b, impl="plain", filter_eps=None)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        auto = kernel(h, w, t, b, impl="auto", filter_eps=None)
    finally:
        torch.use_deterministic_algorithms(prev)
    for key in ("out", "dh", "dw", "db"):
        assert torch.equal(auto[key], plain[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_mode_without_cublas_workspace_config(monkeypatch, dtype):
    """Deterministic mode runs the CUDA plain path (cuBLAS). Torch releases that demand
    CUBLAS_WORKSPACE_CONFIG for that (and read it at call time) must give an error naming this
    op and the fix, not torch's bare GEMM error; newer releases (and those that cached the
    variable at the first GEMM, set by conftest.py) just compute, deterministically."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    h, w, t, b = make_inputs(60, 32, 300, dtype, bias=True, device="cuda")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [kernel(h, w, t, b, filter_eps=None) for _ in range(2)]
    except RuntimeError as e:
        msg = str(e)
        assert "tokenkernels.linear_cross_entropy" in msg, msg
        assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in msg and "warn_only" in msg, msg
        return
    finally:
        torch.use_deterministic_algorithms(prev)
    for key in ("out", "dh", "dw", "db"):
        assert torch.equal(runs[0][key], runs[1][key]), key
