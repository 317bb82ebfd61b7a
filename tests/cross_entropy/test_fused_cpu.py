"""The CPU gradients-in-forward op (tokenkernels::_cross_entropy_fused) and the wrapper's path
through it: every engine against the fp64 truth (fp32: the fp32 tolerances; bf16/fp16: no worse
than the same-dtype torch reference), at odd sizes and at the block edges of the bf16 engine's
two passes, the backward's scaling (g = 1, a power of two, any other g, create_graph), the
HF-style divisor, bad inputs, opcheck, and the extra memory against the 5% budget."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tokenkernels as tk
from tokenkernels.testing import tol

from .common import BIAS_FACTOR, assert_close_fp32, assert_precision_rule, make_inputs, reference

F64 = torch.float64
OP = torch.ops.tokenkernels._cross_entropy_fused
BRGEMM = bool(torch.ops.tokenkernels._cross_entropy_cpu_brgemm())
needs_brgemm = pytest.mark.skipif(not BRGEMM, reason="this CPU has no bf16 brgemm (AVX512-BF16/AMX)")

# (engine, dtype): "brgemm" runs where the CPU has it, else the op raises (tested below)
ENGINES = [("chunk", torch.float32), ("chunk_mkl", torch.float32), ("chunk", torch.float64),
           ("brgemm", torch.bfloat16),
           ("composite", torch.bfloat16), ("composite", torch.float16),
           ("composite", torch.float32)]
OPTS = [
    ("plain", dict(), dict()),
    ("bias", dict(bias=True), dict()),
    ("smoothing_zloss", dict(), dict(label_smoothing=0.1, z_loss=1e-3)),
    ("softcap", dict(wscale=4.0), dict(softcap=3.0)),
    ("softcap_smoothing", dict(wscale=4.0), dict(softcap=3.0, label_smoothing=0.2)),
    ("ignored", dict(ignore_frac=0.3), dict()),
]
SIZES = [(1, 2, 1), (7, 16, 129), (129, 64, 1000), (1000, 34, 77), (300, 128, 3001)]


def _fused(h, w, t, b, engine, reduction="mean", scale=1.0, label_smoothing=0.0, z_loss=0.0,
           softcap=None, ignore_index=-100):
    loss, lse, dh, dw, db = OP(h, w, t, b, ignore_index, softcap, label_smoothing, z_loss,
                               reduction == "mean", scale, True, 0.0, True, True, b is not None,
                               engine)
    return dict(out=loss, dh=dh, dw=dw, db=db if b is not None else None, lse=lse)


def _truth(h, w, t, b, reduction, dtype=None, scale=1.0, **opts):
    """The reference's loss (times scale) and its gradients for g = 1."""
    r = reference(h, w, t, b, dtype=dtype, reduction=reduction, **opts)
    # run() seeds the backward with a random weight: undo it by recomputing for g = 1
    hh = h.detach().to(dtype or h.dtype).requires_grad_()
    ww = w.detach().to(dtype or w.dtype).requires_grad_()
    bb = None if b is None else b.detach().to(dtype or b.dtype).requires_grad_()
    loss = tk.reference.cross_entropy.linear_cross_entropy(hh, ww, t, bb, reduction=reduction,
                                                           **opts) * scale
    loss.backward()
    r.update(out=loss.detach(), dh=hh.grad, dw=ww.grad, db=None if bb is None else bb.grad)
    return r


def _cases():
    """(sizes, option, engine) combinations the engines take: brgemm neither combines softcap
    with label smoothing nor takes an odd D (both raise: test_bad_inputs)."""
    out = []
    for (N, D, V) in SIZES:
        for (name, inp, opts) in OPTS:
            for (engine, dtype) in ENGINES:
                if engine == "brgemm" and (D % 2 or (opts.get("softcap") and opts.get("label_smoothing"))):
                    continue
                out.append(pytest.param(N, D, V, inp, opts, engine, dtype,
                                        id=f"N{N}-D{D}-V{V}-{name}-{engine}-{str(dtype)[6:]}",
                                        marks=[needs_brgemm] if engine == "brgemm" else []))
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N,D,V,inp,opts,engine,dtype", _cases())
def test_engine_vs_reference(N, D, V, inp, opts, engine, dtype, reduction):
    h, w, t, b = make_inputs((N,), D, V, dtype, seed=N + V, **inp)
    k = _fused(h, w, t, b, engine, reduction, **opts)
    truth = _truth(h, w, t, b, reduction, dtype=F64, **opts)
    for key in ("dh", "dw", "db"):
        if k[key] is not None:
            assert k[key].dtype == dtype and k[key].shape == truth[key].shape
    assert k["out"].dtype == (F64 if dtype == F64 else torch.float32) and k["out"].dim() == 0
    if dtype in (torch.float32, F64):
        assert_close_fp32(k, truth, zscale=max(1.0, float((h.double().abs() @ w.double().abs().T).max())),
                          keys=("out", "dh", "dw", "db"),
                          fp32_reference=lambda: _truth(h, w, t, b, reduction, **opts))
    else:
        r = _truth(h, w, t, b, reduction, **opts)
        assert_precision_rule(k, r, truth, dtype, keys=("out", "dh", "dw", "db"),
                              factor=1.0 if b is None else BIAS_FACTOR)


@needs_brgemm
@pytest.mark.parametrize("env", [
    dict(TOKENKERNELS_CE_R1="64", TOKENKERNELS_CE_R2="64", TOKENKERNELS_CE_BV1="64",
         TOKENKERNELS_CE_BV2="32"),
    dict(TOKENKERNELS_CE_R1="128", TOKENKERNELS_CE_R2="192", TOKENKERNELS_CE_BV1="250",
         TOKENKERNELS_CE_BV2="126"),
], ids=["small", "odd"])
@pytest.mark.parametrize("name,inp,opts", OPTS[:4] + OPTS[5:], ids=[o[0] for o in OPTS[:4] + OPTS[5:]])
def test_brgemm_block_edges(monkeypatch, env, name, inp, opts):
    """Several token chunks in both passes (the dweight accumulator added over chunks, H packed
    per chunk), vocabulary blocks that do not divide V, odd rows per chunk (zero-padded pairs)."""
    for k_, v_ in env.items():
        monkeypatch.setenv(k_, v_)
    h, w, t, b = make_inputs((301,), 48, 1001, torch.bfloat16, seed=3, **dict(dict(ignore_frac=0.1), **inp))
    k = _fused(h, w, t, b, "brgemm", "mean", **opts)
    truth = _truth(h, w, t, b, "mean", dtype=F64, **opts)
    r = _truth(h, w, t, b, "mean", **opts)
    assert_precision_rule(k, r, truth, torch.bfloat16, keys=("out", "dh", "dw", "db"),
                          factor=1.0 if b is None else BIAS_FACTOR)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_confident_target_no_cancellation(dtype):
    """Softmax mass ~1 on the target (a trained model): dZ_target = p_t - 1 is tiny and must keep
    its relative precision (the bf16 engine adds the target's term in fp32, never rounds p_t)."""
    if dtype == torch.bfloat16 and not BRGEMM:
        pytest.skip("no brgemm")
    h, w, t, _ = make_inputs((64,), 32, 500, torch.float32, seed=5)
    b = torch.full((500,), -8.0)
    b[t] = 8.0  # targets distinct per row are not needed: the bias lifts every target column
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    engine = "chunk" if dtype == torch.float32 else "brgemm"
    k = _fused(h, w, t, b, engine, "sum")
    truth = _truth(h, w, t, b, "sum", dtype=F64)
    if dtype == torch.float32:
        assert_close_fp32(k, truth, zscale=20.0, keys=("out", "dh", "dw", "db"))
    else:
        r = _truth(h, w, t, b, "sum")
        assert_precision_rule(k, r, truth, dtype, keys=("out", "dh", "dw", "db"),
                              factor=BIAS_FACTOR)


REPRO = [pytest.param("chunk", torch.float32, dict(TOKENKERNELS_CE_FUSED_ROWS="64"), id="chunk-f32"),
         pytest.param("chunk", torch.float64, dict(TOKENKERNELS_CE_FUSED_ROWS="64"), id="chunk-f64"),
         pytest.param("brgemm", torch.bfloat16, dict(TOKENKERNELS_CE_R1="64"), id="brgemm-bf16",
                      marks=[needs_brgemm])]


@pytest.mark.parametrize("engine,dtype,env", REPRO)
def test_bitwise_reproducible(monkeypatch, engine, dtype, env):
    """The threads claim vocabulary work from a counter, yet every sum runs in an order fixed by
    the segment count alone: repeated runs, and runs on 1 or 2 threads with the same
    TOKENKERNELS_CE_SEGMENTS (where every GEMM is our micro-kernel call), give bitwise the same
    loss, lse and gradients (the HF patch's loss must not change between two identical
    forwards)."""
    for k_, v_ in dict(env, TOKENKERNELS_CE_SEGMENTS="5").items():
        monkeypatch.setenv(k_, v_)
    h, w, t, b = make_inputs((301,), 64, 3001, dtype, bias=True, seed=4, ignore_frac=0.1)
    threads = torch.get_num_threads()
    # fp64 (and fp32 without the micro-kernel) runs its GEMMs on MKL, whose results may depend on
    # its thread count: run to run at 2 threads there
    ours = dtype != torch.float64 and BRGEMM
    try:
        outs = []
        for nt in ((1, 2, 2, 2, 1) if ours else (2, 2, 2)):
            torch.set_num_threads(nt)
            outs.append(_fused(h, w, t, b, engine, "mean", label_smoothing=0.1, z_loss=1e-4))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        for key in ("out", "lse", "dh", "dw", "db"):
            assert torch.equal(o[key], outs[0][key]), key
    monkeypatch.delenv("TOKENKERNELS_CE_SEGMENTS")  # the default (2 per thread): run to run
    again = [_fused(h, w, t, b, engine, "mean") for _ in range(3)]
    for o in again[1:]:
        for key in ("out", "lse", "dh", "dw", "db"):
            assert torch.equal(o[key], again[0][key]), key


def test_scale_and_noncontiguous():
    """scale multiplies the loss and every gradient; non-contiguous inputs give the contiguous
    results."""
    h, w, t, b = make_inputs((50,), 24, 300, torch.float32, bias=True, seed=9, ignore_frac=0.2)
    a = _fused(h, w, t, b, "chunk", "sum", scale=0.3)
    c = _fused(h, w, t, b, "chunk", "sum")
    for key in ("out", "dh", "dw", "db"):
        torch.testing.assert_close(a[key], c[key] * 0.3, rtol=1e-5, atol=1e-7)
    hn = h.t().contiguous().t()  # same values, column-major
    wn = torch.stack([w, w], -1)[..., 0]  # strided view
    assert not hn.is_contiguous() and not wn.is_contiguous()
    torch.testing.assert_close(wn, w)
    d = _fused(hn, wn, t, b, "chunk", "sum")
    for key in ("out", "dh", "dw", "db"):
        torch.testing.assert_close(d[key], c[key], rtol=1e-6, atol=1e-7)


def test_all_ignored_and_empty():
    h, w, t, _ = make_inputs((5,), 8, 11, torch.float32)
    t[:] = -100
    k = _fused(h, w, t, None, "chunk", "mean")
    assert k["out"].item() == 0.0 and not k["dh"].any() and not k["dw"].any()
    e = _fused(h[:0], w, t[:0], None, "chunk", "mean")
    assert e["out"].item() == 0.0 and e["dh"].shape == (0, 8) and not e["dw"].any()


# ------------------------------------------------------------------------- through the wrapper
def _wrapper_grads(h, w, t, b, g, create_graph=False, **opts):
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    bb = None if b is None else b.detach().clone().requires_grad_()
    loss = tk.linear_cross_entropy(hh, ww, t, bb, **opts)
    grads = torch.autograd.grad(loss * g, [x for x in (hh, ww, bb) if x is not None],
                                create_graph=create_graph)
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("g", [1.0, 0.25, 0.37])
def test_wrapper_backward_scaling(monkeypatch, dtype, g):
    """The wrapper's gradients for g = 1 (the fused op's, as computed), a power of two (scaled
    exactly) and any other g (recomputed, so fp16/bf16 gradients are rounded once): fp32 equal to
    the forward + recompute path's (TOKENKERNELS_CE_FUSED=0); fp16/bf16 no worse against the
    fp64 truth than the same-dtype torch reference."""
    h, w, t, b = make_inputs((2, 40), 32, 257, dtype, bias=True, seed=11, ignore_frac=0.1)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, shift=1)
    lf, gf = _wrapper_grads(h, w, t, b, g, **opts)
    monkeypatch.setenv("TOKENKERNELS_CE_FUSED", "0")
    lr, gr = _wrapper_grads(h, w, t, b, g, **opts)
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    for a in gf:
        assert a.dtype == dtype
    if dtype == torch.float32:
        for a, c in zip(gf, gr):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
        return
    _, g64 = _wrapper_grads(h.double(), w.double(), t, b.double(), g, impl="reference", **opts)
    _, gref = _wrapper_grads(h, w, t, b, g, impl="reference", **opts)
    keys = ("dh", "dw", "db")
    assert_precision_rule(dict(zip(keys, gf)), dict(zip(keys, gref)), dict(zip(keys, g64)), dtype,
                          keys=keys, factor=BIAS_FACTOR)


def test_wrapper_takes_the_fused_path(monkeypatch):
    """fp32 and bf16 (where brgemm runs) scalar losses use the op, with or without gradients;
    reduction='none', return_lse, fp16 do not."""
    calls = []
    real = torch.ops.tokenkernels._cross_entropy_fused

    def spy(*a):
        calls.append(a[0].dtype)
        return real(*a)

    monkeypatch.setattr(torch.ops.tokenkernels, "_cross_entropy_fused", spy)
    h, w, t, _ = make_inputs((8,), 16, 50, torch.float32)
    h.requires_grad_()
    tk.linear_cross_entropy(h, w, t).backward()
    assert calls == [torch.float32]
    with torch.no_grad():  # the loss alone, on the same engines
        loss = tk.linear_cross_entropy(h, w, t)
    assert calls == [torch.float32] * 2 and not loss.requires_grad
    torch.testing.assert_close(loss, tk.linear_cross_entropy(h, w, t, impl="reference"))
    tk.linear_cross_entropy(h, w, t, reduction="none").sum().backward()
    tk.linear_cross_entropy(h, w, t, return_lse=True)[0].backward()
    tk.linear_cross_entropy(h.detach().half().requires_grad_(), w.half(), t).backward()
    assert calls == [torch.float32] * 2
    tk.linear_cross_entropy(h.detach().bfloat16().requires_grad_(), w.bfloat16(), t).backward()
    assert calls == ([torch.float32] * 2 + [torch.bfloat16] if BRGEMM else [torch.float32] * 2)


def test_wrapper_create_graph_first_derivative_exact():
    """create_graph=True: the first derivative is exact and differentiable in g's path; a second
    derivative raises as on the recompute path."""
    h, w, t, _ = make_inputs((6,), 8, 40, torch.float64, seed=2)
    hh = h.clone().requires_grad_()
    loss = tk.linear_cross_entropy(hh, w, t, z_loss=1e-2)
    (gh,) = torch.autograd.grad(loss, hh, create_graph=True)
    truth = _truth(h, w, t, None, "mean", z_loss=1e-2)
    torch.testing.assert_close(gh, truth["dh"], rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(gh.sum(), hh)


def test_divisor_folds_into_the_op():
    """_divisor (the HF patch's num_items_in_batch) = the loss divided by it, with the same
    gradients as dividing outside, on the fused path and the recompute path."""
    h, w, t, _ = make_inputs((30,), 16, 99, torch.float32, seed=4)
    for fused in ("1", "0"):
        os.environ["TOKENKERNELS_CE_FUSED"] = fused
        try:
            a, ga = _wrapper_grads(h, w, t, None, 1.0, reduction="sum", _divisor=torch.tensor(7))
            c, gc = _wrapper_grads(h, w, t, None, 1.0 / 7, reduction="sum")
        finally:
            del os.environ["TOKENKERNELS_CE_FUSED"]
        torch.testing.assert_close(a, c / 7, rtol=1e-6, atol=1e-7)
        for x, y in zip(ga, gc):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    h, w, t, _ = make_inputs((4,), 6, 10, torch.float32)
    args = (h, w, t, None, -100, None, 0.0, 0.0, True, 1.0, True, 0.0, True, True, False)
    with pytest.raises(ValueError, match="linear_cross_entropy: engine must be one of"):
        OP(*args, "fast")
    with pytest.raises(ValueError, match="engine 'chunk' takes float32"):
        OP(h.bfloat16(), w.bfloat16(), *args[2:], "chunk")
    with pytest.raises(ValueError, match="engine 'brgemm' takes bfloat16"):
        OP(*args, "brgemm")
    with pytest.raises(ValueError, match="engine 'brgemm' needs an even D"):
        OP(h[:, :5].bfloat16(), w[:, :5].bfloat16(), *args[2:], "brgemm")
    with pytest.raises(ValueError, match="does not combine softcap with label_smoothing"):
        OP(h.bfloat16(), w.bfloat16(), t, None, -100, 5.0, 0.1, 0.0, True, 1.0, True, 0.0, True,
           True, False, "brgemm")
    with pytest.raises(ValueError, match="scale must be finite"):
        OP(h, w, t, None, -100, None, 0.0, 0.0, True, float("inf"), True, 0.0, True, True, False)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        OP(h, w, t, None, -100, None, 1.5, 0.0, True, 1.0, True, 0.0, True, True, False)
    with pytest.raises(ValueError, match="need_dbias without a bias"):
        OP(h, w, t, None, -100, None, 0.0, 0.0, True, 1.0, True, 0.0, True, True, True)
    with pytest.raises(ValueError, match="filter_eps must be >= 0"):
        OP(h, w, t, None, -100, None, 0.0, 0.0, True, 1.0, True, -1.0, True, True, False)
    with pytest.raises(ValueError, match="weight has D = 5 columns"):
        OP(h, w[:, :5].contiguous(), *args[2:])
    bad = t.clone()
    bad[2] = 10
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 10 is outside"):
        OP(h, w, bad, *args[3:])
    # check=False: NaN loss, no error
    loss = OP(h, w, bad, None, -100, None, 0.0, 0.0, True, 1.0, False, 0.0, True, True, False)[0]
    assert torch.isnan(loss)


def test_opcheck():
    h, w, t, b = make_inputs((9,), 8, 33, torch.float32, bias=True, seed=1)
    for engine in ("chunk", "composite"):
        torch.library.opcheck(OP, (h, w, t, b, -100, 3.0, 0.1, 1e-3, True, 1.0, True, 0.0, True,
                                   True, True, engine))
    if BRGEMM:
        torch.library.opcheck(OP, (h.bfloat16(), w.bfloat16(), t, b.bfloat16(), -100, None, 0.1,
                                   0.0, False, 0.5, True, 0.0, True, True, True, "brgemm"))


# ------------------------------------------------------------------------------------ memory
_MEM = textwrap.dedent(r"""
    import gc, json, sys, torch
    import tokenkernels as tk
    torch.set_num_threads(1)
    N, D, V = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    dtype = getattr(torch, sys.argv[4])
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    tk.linear_cross_entropy(h[:64], w[:4096], t[:64] % 4096).backward()
    h.grad = None; w.grad = None
    gc.collect()
    base = reset()
    tk.linear_cross_entropy(h, w, t, label_smoothing=0.1).backward()
    peak = status("VmHWM")
    grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
    print(json.dumps(dict(extra=peak - base - grads)))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self (Linux)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_extra_memory_within_budget(dtype):
    """The gradients-in-forward path's extra peak (above the inputs and the returned gradients)
    stays within 5% of the N x V logits in the input dtype (+ 2 MiB of heap and vectors)."""
    if dtype == "bfloat16" and not BRGEMM:
        pytest.skip("no brgemm")
    N, D, V = 4096, 64, 65536
    elt = 4 if dtype == "float32" else 2
    bound = 0.05 * N * V * elt + (2 << 20)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 20), MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _MEM, str(N), str(D), str(V), dtype],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    extra = json.loads(r.stdout.strip().splitlines()[-1])["extra"]
    assert extra <= bound, (f"extra {extra / 2**20:.1f} MiB > 5% of the logits + 2 MiB "
                            f"({bound / 2**20:.1f} MiB)")
