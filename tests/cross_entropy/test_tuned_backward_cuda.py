"""impl="tuned" backward on CUDA (skipped without CUDA): the atomic-free chunked backward
(tokenkernels/cross_entropy_bwd.h: a tensor-core recompute kernel writing dZ and the skip mask
per vocabulary chunk, then cuBLAS dhidden += dZ @ W, dweight / dbias written once per chunk).

To test the backward alone, whatever forward "tuned" runs, the forward runs as impl="plain" and
the ``tuned_bwd`` fixture rewrites the impl of every ``cross_entropy_backward`` call to "tuned".
Every comparison is against the fp64 reference (fp16 / bf16: the precision rule), with small
chunks (``TOKENKERNELS_CE_TUNED_VC``) so that several chunks, a last chunk narrower than the
others and V not a multiple of the 128-column tile all occur."""
import pytest
import torch

import tokenkernels as tk

from tokenkernels.reference import cross_entropy as ref
from tokenkernels.testing import tol

from .common import (BIAS_FACTOR, GRAD_KEYS, LOWP, assert_precision_rule, kernel, make_inputs,
                     norm_err, reference)
from .test_forward_backward import _compare, _peaked_inputs, _tiny_gradient_inputs

# tools/gpu_proof.py attributes these tests (no impl parameter) to the tuned variant
GPU_PROOF_IMPL = "tuned"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
F64 = torch.float64


class _Calls(list):
    """The recorded backward calls; ``real`` is the unpatched op."""
    real = None


@pytest.fixture
def tuned_bwd(monkeypatch):
    """cross_entropy_backward runs impl="tuned" (its arguments are recorded)."""
    calls = _Calls()
    calls.real = real = torch.ops.tokenkernels.cross_entropy_backward

    def wrapper(*args):
        args = args[:-1] + ("tuned",)
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(torch.ops.tokenkernels, "cross_entropy_backward", wrapper)
    return calls


def _vc(monkeypatch, vc):
    if vc:
        monkeypatch.setenv("TOKENKERNELS_CE_TUNED_VC", str(vc))
    else:
        monkeypatch.delenv("TOKENKERNELS_CE_TUNED_VC", raising=False)


OPTS = [
    ("plain", {}, {}),
    ("bias", dict(bias=True), {}),
    ("ignore", dict(ignore_frac=0.3), {}),
    ("ignore_index_in_vocab", dict(ignore_frac=0.3, ignore_index=3), dict(ignore_index=3)),
    ("softcap", dict(wscale=6.0), dict(softcap=4.0)),
    ("smoothing", {}, dict(label_smoothing=0.1)),
    ("z_loss_lse", dict(wscale=3.0), dict(z_loss=0.05, return_lse=True)),
    ("all", dict(bias=True, ignore_frac=0.25, wscale=5.0),
     dict(softcap=3.0, label_smoothing=0.2, z_loss=0.01, shift=True, return_lse=True)),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("name,inp,opts", OPTS, ids=[o[0] for o in OPTS])
def test_tuned_backward_options(tuned_bwd, monkeypatch, dtype, name, inp, opts, reduction):
    """Every option, three chunks of 128 columns (V = 300: the last has 44), D = 40 (a partial
    32-feature k-tile), ragged N."""
    _vc(monkeypatch, 128)
    shape = (4, 10) if opts.get("shift") else (40,)
    _compare(dtype, "cuda", shape, 40, 300, inp, dict(opts, reduction=reduction),
             dict(impl="plain"))
    assert tuned_bwd and tuned_bwd[0][-1] == "tuned"


SIZES = [(1, 64, 7), (7, 32, 129), (129, 24, 1000), (1000, 64, 300), (257, 136, 2049),
         (130, 8, 128)]


@pytest.mark.parametrize("vc", [0, 128, 384])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("N,D,V", SIZES, ids=[f"N{n}-D{d}-V{v}" for n, d, v in SIZES])
def test_tuned_backward_sizes(tuned_bwd, monkeypatch, dtype, N, D, V, vc):
    """Odd sizes (1, 7, 129, 1000), one chunk (vc 0 = the default plan) and several (128, 384:
    V not a multiple of the chunk), token tiles past N, features not a multiple of 32."""
    _vc(monkeypatch, vc)
    _compare(dtype, "cuda", (N,), D, V, dict(bias=True, wscale=2.0, ignore_frac=0.1),
             dict(reduction="none", label_smoothing=0.1, return_lse=True), dict(impl="plain"))


def test_tuned_backward_fp32_runs_plain(tuned_bwd):
    """fp32 (and shapes the tensor-core kernel does not take: D % 8 != 0) run the plain path:
    bitwise equal to impl="plain"."""
    for dtype, D in ((torch.float32, 32), (torch.bfloat16, 12)):
        h, w, t, b = make_inputs(50, D, 300, dtype, bias=True, device="cuda")
        tuned_bwd.clear()
        kernel(h, w, t, b, impl="plain", filter_eps=None, label_smoothing=0.1)
        args = tuned_bwd[0]
        got = tuned_bwd.real(*args)
        plain = tuned_bwd.real(*(args[:-1] + ("plain",)))
        for x, y in zip(got, plain):
            assert torch.equal(x, y), dtype


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tuned_backward_bitwise_deterministic(tuned_bwd, monkeypatch, dtype):
    """No atomics: run-to-run bitwise equal gradients (several chunks, filtering on)."""
    _vc(monkeypatch, 256)
    h, w, t, b = make_inputs(300, 64, 1000, dtype, bias=True, ignore_frac=0.1, wscale=3.0,
                             device="cuda")
    runs = [kernel(h, w, t, b, impl="plain", label_smoothing=0.1, filter_eps="auto")
            for _ in range(3)]
    for r in runs[1:]:
        for key in GRAD_KEYS:
            assert torch.equal(r[key], runs[0][key]), key


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tuned_backward_chunking(monkeypatch, tuned_bwd, dtype):
    """The chunk size changes only the order of the fp32 sums (dhidden over chunks; cuBLAS's
    kernel choice for dweight / dbias): every chunking is as accurate as one chunk."""
    h, w, t, b = make_inputs(200, 48, 1000, dtype, bias=True, wscale=3.0, device="cuda")
    res = {}
    for vc in (128, 512, 0):
        _vc(monkeypatch, vc)
        res[vc] = kernel(h, w, t, b, impl="plain", filter_eps=None)
    truth = reference(h.cpu(), w.cpu(), t.cpu(), b.cpu(), dtype=F64)
    for vc in (128, 512):
        for key in GRAD_KEYS:
            e, e0 = norm_err(res[vc][key], truth[key]), norm_err(res[0][key], truth[key])
            assert e <= 1.5 * e0 + tol(dtype, "ce_rule"), (vc, key, e, e0)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tuned_backward_filter_skips(tuned_bwd, monkeypatch, dtype):
    """filter_eps="auto" drops the 64 x 128 sub-tiles of vocabulary rows >= 2048 (their softmax
    is below the threshold): their weight / bias gradients are exactly 0, the other rows equal
    the exact run's bitwise, dhidden within ce_filter."""
    _vc(monkeypatch, 1024)
    h, w, t, b = _peaked_inputs(dtype, "cuda")
    filt = kernel(h, w, t, b, filter_eps="auto", impl="plain")
    exact = kernel(h, w, t, b, filter_eps=None, impl="plain")
    assert exact["dw"][2048:].abs().sum() > 0 and exact["db"][2048:].abs().sum() > 0
    assert not filt["dw"][2048:].abs().any() and not filt["db"][2048:].abs().any()
    assert torch.equal(filt["dw"][:2048], exact["dw"][:2048])
    assert torch.equal(filt["db"][:2048], exact["db"][:2048])
    truth = reference(*(x.cpu() for x in (h, w, t, b)), dtype=F64)
    for key in GRAD_KEYS:
        assert norm_err(filt[key], truth[key]) <= norm_err(exact[key], truth[key]) + tol(dtype, "ce_filter")


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tuned_backward_matches_cpu_emulation_mask(tuned_bwd, monkeypatch, dtype):
    """The dZ the kernel used equals the CPU emulation's (the same epilogue code on the CPU),
    through dweight = dZ^T @ H: with filtering at a threshold far from every |dZ| the dropped
    sub-tiles agree, and the rows of dropped tiles are exactly zero in both."""
    _vc(monkeypatch, 512)
    h, w, t, b = _peaked_inputs(dtype, "cuda")
    feps = 0.1  # far from every softmax value here (< 1e-2) and from every |p - 1| (~1)
    k = kernel(h, w, t, b, filter_eps=feps, impl="plain", reduction="sum")
    args = tuned_bwd[0]
    logits = (h.float() @ w.float().T).cpu()
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    dz, mask = torch.ops.tokenkernels._cross_entropy_bwd_emulate(
        logits, *cpu_args[2:11], feps, 1.0, 512)
    assert mask.any() and not mask.all()
    rows_kept = mask.bool().any(0).repeat_interleave(128)[: w.shape[0]]
    assert torch.equal((k["dw"].cpu() != 0).any(1), rows_kept)
    dw_emul = (dz.double().T @ h.cpu().double())
    assert norm_err(k["dw"], dw_emul) <= 2.0 ** -7


def test_tuned_backward_vocab_shard(tuned_bwd, monkeypatch):
    """A vocabulary shard (vocab_start > 0, targets in other shards): the shard's dweight rows
    and its part of dhidden equal the corresponding parts of the single-process gradients."""
    _vc(monkeypatch, 128)
    dtype = torch.bfloat16
    h, w, t, b = make_inputs(120, 32, 700, dtype, bias=True, ignore_frac=0.1, device="cuda")
    kernel(h, w, t, b, impl="plain", filter_eps=None, label_smoothing=0.1)
    (H, W, T, B, lse, cp, ct, c1, ii, sc, vs, fe, *_rest) = tuned_bwd[0]
    full = tuned_bwd.real(H, W, T, B, lse, cp, ct, c1, ii, sc, 0, 0.0, True, True, True, False,
                          "plain")
    dh_sum = torch.zeros_like(full[0], dtype=torch.float32)
    for start, stop in ((0, 300), (300, 429), (429, 700)):
        dh, dw, db = tuned_bwd.real(H, W[start:stop], T, B[start:stop], lse, cp, ct, c1, ii, sc,
                                    start, 0.0, True, True, True, False, "tuned")
        assert norm_err(dw, full[1][start:stop]) <= 2.0 ** -7
        assert norm_err(db, full[2][start:stop]) <= 2.0 ** -7
        dh_sum += dh.float()
    assert norm_err(dh_sum, full[0]) <= 2.0 ** -6


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tuned_backward_non_contiguous(tuned_bwd, dtype):
    """Strided views (copied to contiguous inside) give the contiguous inputs' gradients."""
    N, D, V = 37, 24, 150
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(D, N, generator=g).to(dtype).cuda().t()
    weight = (torch.randn(V, 2 * D, generator=g) / D ** 0.5).to(dtype).cuda()[:, ::2]
    targets = torch.randint(0, V, (N, 2), generator=g).cuda()[:, 1]
    bias = torch.randn(2 * V, generator=g).to(dtype).cuda()[1::2]
    opts = dict(label_smoothing=0.1, softcap=5.0, filter_eps=None, impl="plain")
    k = kernel(hidden, weight, targets, bias, **opts)
    c = kernel(hidden.contiguous(), weight.contiguous(), targets.contiguous(), bias.contiguous(),
               **opts)
    for key in GRAD_KEYS:
        assert torch.equal(k[key], c[key]), key


def test_tuned_backward_fp16_tiny_gradients(tuned_bwd):
    """fp16 dZ is scaled by a power of two before rounding (gscale), as in the other paths."""
    N, D, V, g, h, w, t = _tiny_gradient_inputs()
    hk = h.half().cuda().requires_grad_()
    (tk.linear_cross_entropy(hk, w.half().cuda(), t.cuda(), reduction="sum", impl="plain",
                             filter_eps=None) * g).backward()
    hr = h.half().double().requires_grad_()
    (ref.linear_cross_entropy(hr, w.half().double(), t, reduction="sum") * g).backward()
    assert norm_err(hk.grad, hr.grad) <= 2.0 ** -8


def test_tuned_backward_nan_not_dropped(tuned_bwd):
    h, w, t, b = make_inputs(8, 16, 300, torch.bfloat16, bias=True, device="cuda")
    h = h.clone()
    h[0] = float("nan")
    t = torch.full_like(t, -100)
    t[0] = 5
    k = kernel(h, w, t, b, reduction="sum", filter_eps=1e-3, impl="plain")
    assert torch.isnan(k["dh"][0]).all()
    assert not torch.isnan(k["dh"][1:]).any() and not k["dh"][1:].abs().any()
    assert torch.isnan(k["dw"]).any() and torch.isnan(k["db"]).all()


def test_tuned_backward_public_impl(monkeypatch):
    """impl="tuned" end to end (whatever forward it runs) against the reference."""
    _vc(monkeypatch, 256)
    for dtype in LOWP:
        h, w, t, b = make_inputs(150, 64, 700, dtype, bias=True, ignore_frac=0.1)
        opts = dict(reduction="mean", label_smoothing=0.1, softcap=20.0, return_lse=True)
        k = kernel(h.cuda(), w.cuda(), t.cuda(), b.cuda(), impl="tuned", filter_eps=None, **opts)
        truth = reference(h, w, t, b, dtype=F64, **opts)
        r = reference(h, w, t, b, **opts)
        assert_precision_rule(k, r, truth, dtype, keys=GRAD_KEYS, factor=BIAS_FACTOR)


def test_tuned_backward_bad_inputs_same_errors():
    """Bad arguments give impl="tuned" the same error (type and message) as impl="plain"."""
    bwd = torch.ops.tokenkernels.cross_entropy_backward
    h, w, t, b = make_inputs(20, 16, 300, torch.bfloat16, bias=True, device="cuda")
    f32 = dict(device="cuda", dtype=torch.float32)
    lse, cp, ct = torch.zeros(20, **f32), torch.ones(20, **f32), -torch.ones(20, **f32)
    good = [h, w, t, b, lse, cp, ct, None, -100, None, 0, 0.0, True, True, True, False]
    cases = {4: torch.zeros(19, **f32), 5: cp.double(), 3: None, 11: -1.0, 9: 0.0, 10: -3,
             1: w[:, :8], 2: t.float()}
    for pos, bad in cases.items():
        args = list(good)
        args[pos] = bad
        errs = []
        for impl in ("plain", "tuned"):
            with pytest.raises((ValueError, TypeError, RuntimeError, IndexError)) as ei:
                bwd(*args, impl)
            errs.append((type(ei.value), str(ei.value).split("\n")[0]))
        assert errs[0] == errs[1], (pos, errs)
        assert "linear_cross_entropy_backward" in errs[0][1], errs[0]
