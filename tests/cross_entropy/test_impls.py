"""Every implementation choice (impl="auto" / "plain" / "tuned") against the reference, and the
deterministic mode. On the CPU all three share one engine; on CUDA "plain" is the ATen-GEMM tile
path and "tuned" the fused WMMA kernels (fp16/bf16), whose 64 x 128 tiles the shapes here
cross with ragged edges (N, V, D not multiples of 16 / 64 / 128)."""
import pytest
import torch

from .common import ALL_DTYPES, kernel, make_inputs
from .test_forward_backward import _compare

IMPLS = ["auto", "plain", "tuned"]
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
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_impl_vs_reference(device, impl, dtype, reduction):
    args = (dtype, device, (150,), 40, 700, dict(ignore_frac=0.1, wscale=3.0),
            dict(ALL_OPTS, reduction=reduction))
    if device == "cpu" and impl != "auto":
        _same_as_auto(device, dtype, *args[2:], impl)
        return
    _compare(*args, dict(impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_impl_vs_reference_with_bias(device, impl, dtype):
    args = (dtype, device, (2, 67), 64, 300, dict(bias=True, ignore_frac=0.1, wscale=3.0),
            dict(ALL_OPTS, reduction="sum", shift=True))
    if device == "cpu" and impl != "auto":
        _same_as_auto(device, dtype, *args[2:], impl)
        return
    _compare(*args, dict(impl=impl))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
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
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
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
