"""torch.autograd.gradcheck in float64 on the CPU (the contract: "gradcheck in fp64") of hidden,
weight and bias, with every option that changes the gradient formula, for reduction="none"
(per-token gradients) and "mean", and through the returned lse."""
import pytest
import torch

import tokenkernels as tk

F64 = torch.float64


def _inputs(N=5, D=3, V=7, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=F64).requires_grad_()
    b = torch.randn(V, generator=g, dtype=F64).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    if ignore:
        t[1] = -100
    return h, w, b, t


OPTS = [
    dict(),
    dict(softcap=2.0),
    dict(label_smoothing=0.2),
    dict(z_loss=0.1),
    dict(softcap=1.5, label_smoothing=0.3, z_loss=0.05),
    dict(shift=True, label_smoothing=0.1),
]
IDS = ["plain", "softcap", "smoothing", "z_loss", "all", "shift"]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("opts", OPTS, ids=IDS)
def test_gradcheck_hidden_weight_bias(opts, reduction):
    h, w, b, t = _inputs()

    def f(h, w, b):
        return tk.linear_cross_entropy(h, w, t, b, reduction=reduction, filter_eps=None, **opts)

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("opts", OPTS[:2], ids=IDS[:2])
def test_gradcheck_through_lse(opts):
    """lse is differentiable on its own (d lse / dz = softmax), ignored tokens included."""
    h, w, b, t = _inputs(seed=1)

    def f(h, w, b):
        loss, lse = tk.linear_cross_entropy(h, w, t, b, reduction="none", return_lse=True,
                                            filter_eps=None, **opts)
        return lse, loss

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_without_bias_and_batch_dims():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 3, 4, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(6, 4, generator=g, dtype=F64).requires_grad_()
    t = torch.randint(0, 6, (2, 3), generator=g)

    def f(h, w):
        return tk.linear_cross_entropy(h, w, t, reduction="none", filter_eps=None,
                                       label_smoothing=0.1)

    assert torch.autograd.gradcheck(f, (h, w), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_create_graph_first_derivative_and_no_silent_second():
    """backward(create_graph=True) (gradient penalties, meta-learning) must still give the right
    first derivative; a second derivative is either right or an error, never silently wrong."""
    h, w, b, t = _inputs()
    loss = tk.linear_cross_entropy(h, w, t, b, filter_eps=None)
    (gh,) = torch.autograd.grad(loss, h, create_graph=True)
    hh = h.detach().requires_grad_()
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hh, w.detach(), b.detach()), t), hh, create_graph=True)[0]
    torch.testing.assert_close(gh.detach(), want.detach())
    if gh.requires_grad:
        try:
            (ggh,) = torch.autograd.grad((gh * gh).sum(), h)
        except RuntimeError:
            return
        (gg_want,) = torch.autograd.grad((want * want).sum(), hh)
        torch.testing.assert_close(ggh, gg_want)
