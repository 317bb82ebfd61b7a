"""torch.library.opcheck of lce_forward / lce_backward, and torch.compile(fullgraph=True) of
linear_cross_entropy (forward + backward) against eager."""
import pytest
import torch

import tokenkernels as tk

FWD = torch.ops.tokenkernels.lce_forward.default
BWD = torch.ops.tokenkernels.lce_backward.default


def _fwd_samples(device):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 8, generator=g).to(device).requires_grad_()
    w = (torch.randn(13, 8, generator=g) / 3).to(device).requires_grad_()
    b = torch.randn(13, generator=g).to(device).requires_grad_()
    t = torch.randint(0, 13, (9,), generator=g)
    t[2] = -100
    t = t.to(device)
    hb = torch.randn(5, 16, generator=g).to(torch.bfloat16).to(device)
    wb = torch.randn(7, 16, generator=g).to(torch.bfloat16).to(device)
    tb = torch.randint(0, 7, (5,), generator=g).to(torch.int32).to(device)
    hh = torch.randn(4, 6, generator=g).to(torch.float16).to(device).requires_grad_()
    wh = torch.randn(11, 6, generator=g).to(torch.float16).to(device).requires_grad_()
    bh = torch.randn(11, generator=g).to(torch.float16).to(device)
    th = torch.randint(0, 11, (4,), generator=g).to(device)
    # (hidden, weight, targets, bias, ignore_index, softcap, vocab_start, vocab_total, sum_z,
    #  aux, check, filter_eps, accum_fp32, impl)
    return [
        (h, w, t, None, -100, None, 0, 13, False, False, True, 0.0, False, 0),
        (h, w, t, b, -100, 3.0, 0, 13, True, True, True, 0.0, False, 0),
        (h, w, torch.where(t < 0, 5, t), b, 5, None, 0, 13, True, False, False, 0.0, False, 1),
        (h, w, t.clamp(min=0) + 4, b, -100, None, 4, 20, True, True, True, 0.0, False, 0),  # shard
        (hb, wb, tb, None, -100, 30.0, 0, 7, False, True, True, 2.0 ** -12, False, 0),
        (hh, wh, th, bh, -100, None, 0, 11, True, False, True, 0.0, True, 2),
    ]


def _bwd_samples(device):
    out = []
    g = torch.Generator().manual_seed(1)
    for s in _fwd_samples(device):
        h, w, t, b, ii, cap, v0, vt, sz, aux, chk, feps, acc, impl = s
        lse = FWD(*s)[0].detach()
        N = h.shape[0]
        cp = torch.randn(N, generator=g).to(device)
        ct = -torch.rand(N, generator=g).to(device)
        c1 = torch.randn(N, generator=g).to(device) if sz else None
        h, w = h.detach(), w.detach()
        b = None if b is None else b.detach()
        for need in ((True, True, b is not None), (True, False, False), (False, True, False)):
            out.append((h, w, t, b, lse, cp, ct, c1, ii, cap, v0, feps, *need, acc, impl))
    return out


# test_autograd_registration needs a grad-requiring input; the others apply to every sample
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
         "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("i", range(len(_fwd_samples("cpu"))))
def test_opcheck_lce_forward(device, i):
    torch.library.opcheck(FWD, _fwd_samples(device)[i], test_utils=UTILS)


@pytest.mark.parametrize("i", range(len(_bwd_samples("cpu"))))
def test_opcheck_lce_backward(device, i):
    # lce_backward has no autograd formula of its own (no double backward)
    torch.library.opcheck(BWD, _bwd_samples(device)[i],
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


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
