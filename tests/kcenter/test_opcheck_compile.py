"""torch.library.opcheck of both ops, and torch.compile(fullgraph=True) of the wrappers."""
import pytest
import torch

import tokenkernels as tk

from .samples import op_samples

SAMPLE_NAMES = [s.name for s in op_samples("cpu")]

ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")


def _sample(device, name):
    return next(s for s in op_samples(device) if s.name == name)


def _opcheck(sample):
    """opcheck's test_aot_dispatch_dynamic compares outputs with assert_close(equal_nan=False),
    so it cannot accept the NaN padding of radii/gains: samples whose output is padded run the
    other checks here, and test_torch_compile_aot_eager_dynamic covers AOT dispatch for them."""
    padded = bool(torch.isnan(sample()[1]).any())
    utils = ALL_UTILS[:3] if padded else ALL_UTILS
    torch.library.opcheck(sample.op, sample.args, test_utils=utils)
    return padded


def test_samples_are_named_and_cover_every_op():
    samples = op_samples("cpu")
    assert len(set(SAMPLE_NAMES)) == len(SAMPLE_NAMES)
    schema_ops = {n.split("::")[1] for n in tk.op_names()
                  if n.split("::")[1].startswith("kcenter_")}
    assert {s.op.name().split("::")[1] for s in samples} == schema_ops
    assert all(s.name.startswith(s.op.name().split("::")[1] + "-") for s in samples)


def test_opcheck_samples_cover_both_cases():
    pads = [bool(torch.isnan(s()[1]).any()) for s in op_samples("cpu")]
    assert any(pads) and not all(pads)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_opcheck(device, name):
    _opcheck(_sample(device, name))


def _select(x, sim, lengths, exclude, kk):
    a, ra = tk.kcenter(x, 6, lengths=lengths, exclude=exclude, start="first", return_radii=True)
    b, rb = tk.kcenter(x, kk, lengths=lengths, metric="l2", start="isolated", sorted=True,
                       return_radii=True, k_max=6)
    c, gc = tk.coverage_select(sim, kk, lengths=lengths, exclude=exclude, return_gains=True, k_max=6)
    return a, ra, b, rb, c, gc


def _compile_inputs(device):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 16, generator=g).to(device)
    sim = torch.rand(2, 10, 30, generator=g).to(device)
    lengths = torch.tensor([30, 17], device=device)
    exclude = torch.zeros(2, 30, dtype=torch.bool, device=device)
    exclude[:, 0] = True
    kk = torch.tensor([6, 4], device=device)
    return x, sim, lengths, exclude, kk


def _compile_or_fallback(fn, inputs):
    """Inductor first; fall back to aot_eager only if inductor itself cannot run here (e.g. no
    working C++ toolchain)."""
    try:
        return torch.compile(fn, fullgraph=True)(*inputs), "inductor"
    except Exception as e:  # pragma: no cover - depends on the machine's toolchain
        if "InductorError" not in type(e).__name__ and "CppCompileError" not in repr(e):
            raise
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs), "aot_eager"


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    inputs = _compile_inputs(device)
    want = _select(*inputs)
    got, backend = _compile_or_fallback(_select, inputs)
    for w, o in zip(want, got):
        assert w.shape == o.shape and w.dtype == o.dtype
        torch.testing.assert_close(o, w, rtol=0, atol=0, equal_nan=True)


def test_torch_compile_aot_eager_dynamic(device):
    """aot_eager with dynamic shapes exercises the fake implementations with symbolic B / N."""
    torch._dynamo.reset()
    fn = torch.compile(_select, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, N in ((2, 30), (3, 41)):
        g = torch.Generator().manual_seed(B)
        x = torch.randn(B, N, 16, generator=g).to(device)
        sim = torch.rand(B, 10, N, generator=g).to(device)
        lengths = torch.full((B,), N - 3, device=device)
        exclude = torch.zeros(B, N, dtype=torch.bool, device=device)
        kk = torch.full((B,), 4, device=device)
        want = _select(x, sim, lengths, exclude, kk)
        got = fn(x, sim, lengths, exclude, kk)
        for w, o in zip(want, got):
            torch.testing.assert_close(o, w, rtol=0, atol=0, equal_nan=True)
