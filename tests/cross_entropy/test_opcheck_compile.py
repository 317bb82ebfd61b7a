"""torch.library.opcheck of cross_entropy_forward / cross_entropy_backward (the named samples of
tests/cross_entropy/samples.py), and torch.compile(fullgraph=True) of linear_cross_entropy
(forward + backward) against eager."""
import pytest
import torch

import tokenkernels as tk

from .samples import BWD, FWD, op_samples

# test_autograd_registration needs a grad-requiring input; the others apply to every sample
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
         "test_aot_dispatch_dynamic")
# cross_entropy_backward has no autograd formula of its own (no double backward)
BWD_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
NAMES = [s.name for s in op_samples("cpu")]


def test_samples_cover_every_op_with_unique_names():
    samples = op_samples("cpu")
    assert len(set(NAMES)) == len(NAMES)
    assert {s.op for s in samples} == {FWD, BWD}
    ops = {s.name for s in torch._C._jit_get_all_schemas()
           if s.name.startswith("tokenkernels::cross_entropy")}
    assert ops == {"tokenkernels::cross_entropy_forward", "tokenkernels::cross_entropy_backward"}


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(device, name):
    sample = {s.name: s for s in op_samples(device)}[name]
    torch.library.opcheck(sample.op, sample.args,
                          test_utils=UTILS if sample.op is FWD else BWD_UTILS)


def _forward(h, w, t, b):
    return tk.linear_cross_entropy(
        h, w, t, b, softcap=20.0, label_smoothing=0.1, z_loss=1e-3, return_lse=True,
        return_aux=True, reduction="mean", filter_eps=None)


def _loss_and_grads(fn, h, w, t, b):
    """fn's outputs, and the gradients of loss + mean(lse) (the backward runs outside fn: for a
    compiled fn that is the compiled backward graph)."""
    loss, lse, am, ent = fn(h, w, t, b)
    gh, gw, gb = torch.autograd.grad(loss + lse.mean(), (h, w, b))
    return loss, lse, am, ent, gh, gw, gb


def _compile_inputs(device, B=2, T=9, D=16, V=37, seed=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g).to(device).requires_grad_()
    w = (torch.randn(V, D, generator=g) / 4).to(device).requires_grad_()
    b = torch.randn(V, generator=g).to(device).requires_grad_()
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, 3] = -100
    return h, w, t.to(device), b


def _compile_or_fallback(fn, inputs):
    """Inductor first; aot_eager only if inductor itself cannot run here (no C++ toolchain)."""
    try:
        return _loss_and_grads(torch.compile(fn, fullgraph=True), *inputs), "inductor"
    except Exception as e:  # pragma: no cover - depends on the machine's toolchain
        if "InductorError" not in type(e).__name__ and "CppCompileError" not in repr(e):
            raise
        torch._dynamo.reset()
        return (_loss_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), *inputs),
                "aot_eager")


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    inputs = _compile_inputs(device)
    want = _loss_and_grads(_forward, *inputs)
    got, _ = _compile_or_fallback(_forward, inputs)
    for w, o in zip(want, got):
        assert w.shape == o.shape and w.dtype == o.dtype
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-6)


def test_torch_compile_training_step(device):
    """The usual training use: loss.backward() on a compiled module's loss."""
    torch._dynamo.reset()
    mod = tk.LinearCrossEntropy(shift=True, label_smoothing=0.05)
    h, w, t, b = _compile_inputs(device, seed=5)

    def step(h, w, t, b):
        return mod(h, w, t, b)

    eager = step(h, w, t, b)
    eager.backward()
    ge = (h.grad.clone(), w.grad.clone(), b.grad.clone())
    for x in (h, w, b):
        x.grad = None
    comp = torch.compile(step, fullgraph=True, backend="aot_eager")(h, w, t, b)
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
    for a, c in zip(ge, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)


def test_torch_compile_dynamic_shapes(device):
    torch._dynamo.reset()
    fn = torch.compile(_forward, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, T in ((2, 9), (3, 5)):
        inputs = _compile_inputs(device, B=B, T=T, seed=B)
        want = _loss_and_grads(_forward, *inputs)
        got = _loss_and_grads(fn, *inputs)
        for w, o in zip(want, got):
            torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)
