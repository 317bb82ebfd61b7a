"""tokenkernels.LinearCrossEntropy: the module form of linear_cross_entropy."""
import pytest
import torch

import tokenkernels as tk

from .common import make_inputs


def test_module_equals_function(device):
    h, w, t, b = make_inputs((2, 7), 16, 33, torch.float32, bias=True, ignore_frac=0.2,
                             device=device)
    opts = dict(reduction="sum", softcap=5.0, label_smoothing=0.1, z_loss=1e-3, shift=True,
                return_lse=True, return_aux=True, filter_eps=None)
    mod = tk.LinearCrossEntropy(**opts)
    assert isinstance(mod, torch.nn.Module)
    a = mod(h, w, t, b)
    c = tk.linear_cross_entropy(h, w, t, b, **opts)
    assert len(a) == len(c) == 4
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_module_defaults_and_grads(device):
    h, w, t, b = make_inputs(20, 8, 30, torch.float32, device=device)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = tk.LinearCrossEntropy()(hh, ww, t)
    assert loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(h2, w2), t).backward()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.T, t))
    torch.testing.assert_close(hh.grad, h2.grad)
    torch.testing.assert_close(ww.grad, w2.grad)


def test_module_as_lm_head_loss(device):
    """Typical use inside a model: the weight is an nn.Linear's parameter, options fixed."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 25, bias=True)
            self.loss = tk.LinearCrossEntropy(ignore_index=0, label_smoothing=0.1)

        def forward(self, x, y):
            return self.loss(x, self.proj.weight, y, self.proj.bias)

    torch.manual_seed(0)
    m = Head().to(device)
    x = torch.randn(4, 6, 8, device=device)
    y = torch.randint(0, 25, (4, 6), device=device)
    loss = m(x, y)
    loss.backward()
    want = torch.nn.functional.cross_entropy(m.proj(x).reshape(-1, 25).double(), y.reshape(-1),
                                             ignore_index=0, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert m.proj.weight.grad is not None and m.proj.bias.grad is not None


def test_module_repr_and_state():
    mod = tk.LinearCrossEntropy(reduction="none", softcap=30.0)
    r = repr(mod)
    assert "reduction='none'" in r and "softcap=30.0" in r
    assert dict(mod.state_dict()) == {}  # holds no parameters or buffers


def test_module_bad_option_raises():
    with pytest.raises(ValueError, match="label_smoothing"):
        tk.LinearCrossEntropy(label_smoothing=2.0)(torch.randn(3, 4), torch.randn(5, 4),
                                                   torch.tensor([0, 1, 2]))
