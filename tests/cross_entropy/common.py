"""Shared helpers of the cross_entropy tests: inputs, one forward+backward pass of either the
kernel or the reference, and the error measures used by the tolerance / precision-rule checks."""
from __future__ import annotations

from typing import Optional

import torch

import tokenkernels as tk
from tokenkernels.reference import cross_entropy as ref

from tokenkernels.testing import tol

LOWP = (torch.float16, torch.bfloat16)  # the dtypes of tokenkernels.testing.DTYPES held to the precision rule


def make_inputs(shape, D: int, V: int, dtype=torch.float32, *, bias: bool = False, seed: int = 0,
                ignore_frac: float = 0.0, ignore_index: int = -100, int32: bool = False,
                wscale: float = 1.0, device="cpu"):
    """hidden (*shape, D) ~ N(0, 1), weight (V, D) ~ N(0, wscale^2 / D) (logits of order wscale),
    bias (V,) ~ N(0, 1), targets (*shape) uniform in [0, V), a fraction ignored."""
    if isinstance(shape, int):
        shape = (shape,)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * (wscale / max(D, 1) ** 0.5)).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    t = torch.randint(0, V, tuple(shape), generator=g)
    if ignore_frac > 0:
        t = torch.where(torch.rand(tuple(shape), generator=g) < ignore_frac,
                        torch.full_like(t, ignore_index), t)
    if int32:
        t = t.to(torch.int32)
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return mv(h), mv(w), mv(t), mv(b)


def run(fn, hidden, weight, targets, bias=None, *, cast: Optional[torch.dtype] = None,
        grad_seed: int = 1, **kw):
    """Forward + backward of ``fn`` (kernel or reference) on leaf copies of the inputs (cast to
    ``cast`` if given). The backward seeds are random per output element (so per-token gradients
    of reduction="none" and the gradient through lse are really tested). Returns a dict with
    ``out`` (loss), the extras (``lse``, ``argmax``, ``entropy`` as asked) and the gradients
    ``dh``, ``dw``, ``db`` (None where not applicable), all detached."""
    def leaf(x):
        if x is None:
            return None
        x = x.detach()
        if cast is not None:
            x = x.to(cast)
        return x.clone().requires_grad_(True)

    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    res = fn(h, w, targets, b, **kw)
    res = res if isinstance(res, tuple) else (res,)
    names = ["out"]
    if kw.get("return_lse"):
        names.append("lse")
    if kw.get("return_aux"):
        names += ["argmax", "entropy"]
    out = dict(zip(names, res))
    g = torch.Generator().manual_seed(grad_seed)
    obj = 0.0
    for name in ("out", "lse"):
        if name in out and out[name].requires_grad:
            seed = torch.rand(out[name].shape, generator=g, dtype=torch.float64) + 0.5
            obj = obj + (out[name] * seed.to(out[name].device, out[name].dtype)).sum()
    if isinstance(obj, torch.Tensor):
        obj.backward()
    out = {k: v.detach() for k, v in out.items()}
    out["dh"] = None if h.grad is None else h.grad.detach()
    out["dw"] = None if w.grad is None else w.grad.detach()
    out["db"] = None if b is None or b.grad is None else b.grad.detach()
    return out


def kernel(hidden, weight, targets, bias=None, **kw):
    return run(tk.linear_cross_entropy, hidden, weight, targets, bias, **kw)


def reference(hidden, weight, targets, bias=None, *, dtype=None, **kw):
    """The reference on leaf copies of the inputs: ``dtype=torch.float64`` -> fp64 ground truth
    on the same inputs upcast; None -> computed in the inputs' own dtype (what plain F.linear +
    F.cross_entropy does). ``impl`` is dropped (the reference is an implementation)."""
    assert dtype in (None, torch.float64), dtype
    kw.pop("impl", None)
    return run(ref.linear_cross_entropy, hidden, weight, targets, bias, cast=dtype, **kw)


def logits64(hidden, weight, bias=None, softcap=None) -> torch.Tensor:
    """The fp64 logits softcap(hidden @ weight.T + bias), (N, V) for hidden (..., D)."""
    h = hidden.detach().cpu().double().reshape(-1, hidden.shape[-1])
    z = torch.nn.functional.linear(h, weight.detach().cpu().double(),
                                   None if bias is None else bias.detach().cpu().double())
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def logit_scale(hidden, weight, bias=None) -> float:
    """max over tokens and vocabulary of sum_d |h_d w_d| + |b|: the natural scale of the
    rounding error of a logit (and so of lse / loss) computed by an fp32 dot product."""
    h = hidden.detach().cpu().double().reshape(-1, hidden.shape[-1]).abs()
    s = h @ weight.detach().cpu().double().abs().T
    if bias is not None:
        s = s + bias.detach().cpu().double().abs()
    return s.max().item() if s.numel() else 0.0


def rel_err(got: torch.Tensor, truth: torch.Tensor, floor: float = 0.0) -> float:
    """max |got - truth| / max(|truth|, floor, tiny), in fp64 on the CPU."""
    got = got.detach().cpu().double()
    truth = truth.detach().cpu().double()
    assert got.shape == truth.shape, (got.shape, truth.shape)
    if truth.numel() == 0:
        return 0.0
    scale = max(truth.abs().max().item(), floor, 1e-12)
    return (got - truth).abs().max().item() / scale


GRAD_KEYS = ("dh", "dw", "db")


def assert_close_fp32(k: dict, t: dict, keys=("out", "lse", "entropy") + GRAD_KEYS,
                      dtype=torch.float32, zscale: float = 0.0, exact_argmax: bool = True,
                      fp32_reference=None):
    """fp32 kernel vs fp64 truth: relative errors within the table's ``loss`` / ``grad``.
    Per-token quantities (loss, lse, entropy) are relative to max(|truth|, ``zscale``), the
    logits' rounding scale (see :func:`logit_scale`; a loss near 0 cannot be relative to 0).
    A mean/sum loss uses zscale too (its error is that of the per-token losses).

    ``fp32_reference``: optional callable giving the same-dtype (fp32) reference's outputs, for
    ill-conditioned data (e.g. a saturated softcap, whose derivative 1 - tanh^2 cancels in any
    fp32 evaluation): an output outside the tolerance passes if its error is within twice the
    fp32 reference's."""
    ref32 = None
    for key in keys:
        if key not in t or t[key] is None:
            assert key not in k or k[key] is None, key
            continue
        kind = "grad" if key in GRAD_KEYS else "loss"
        floor = 0.0 if kind == "grad" else zscale
        e = rel_err(k[key], t[key], floor=floor)
        limit = tol(dtype, "ce_" + kind)
        if e > limit and fp32_reference is not None:
            ref32 = fp32_reference() if ref32 is None else ref32
            limit = max(limit, 2 * rel_err(ref32[key], t[key], floor=floor))
        assert e <= limit, f"{key}: relative error {e:.3g} > {limit:.3g}"
    if "argmax" in t and exact_argmax:
        assert_argmax(k["argmax"], t)


def assert_argmax(argmax: torch.Tensor, t: dict):
    """The arg-max must equal the fp64 one (the data are drawn continuous: no exact ties)."""
    assert argmax.dtype == torch.int64
    assert torch.equal(argmax.cpu(), t["argmax"].cpu())


def norm_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Normwise relative error ||got - truth||_2 / ||truth||_2 in fp64 (0 for an all-zero truth
    matched exactly)."""
    got = got.detach().cpu().double()
    truth = truth.detach().cpu().double()
    assert got.shape == truth.shape, (got.shape, truth.shape)
    d = (got - truth).norm().item()
    n = truth.norm().item()
    return d / n if n > 0 else (0.0 if d == 0 else float("inf"))


# With a bias, the kernel adds it in fp32 to the fp16/bf16-rounded hidden @ weight.T, while the
# same-dtype reference rounds hidden @ weight.T + bias once: two independent roundings of the
# logits of the same size, whose propagated errors only agree statistically. Over >= ~10^4
# logits the measured normwise ratios kernel/reference lie in 0.6 - 1.3, hence this factor.
BIAS_FACTOR = 1.5


def assert_precision_rule(k: dict, r: dict, t: dict, dtype,
                          keys=("out", "lse", "entropy") + GRAD_KEYS,
                          slack: float = 0.0, factor: float = 1.0):
    """fp16/bf16: the kernel's normwise error vs the fp64 truth (on the same low-precision values
    upcast) is no worse than the same-dtype reference's (x ``factor``) + ``ce_rule`` (1/8 ulp of
    the dtype) + ``slack``. Normwise (not max-abs) errors: a max over a few elements that are
    rounded independently is noise, the norm over all of them is stable."""
    tiny = tol(dtype, "ce_rule")
    msgs = []
    for key in keys:
        if key not in t or t[key] is None:
            continue
        ek, er = norm_err(k[key], t[key]), norm_err(r[key], t[key])
        if not ek <= factor * er + tiny + slack:
            msgs.append(f"{key}: kernel error {ek:.3g} > reference's {er:.3g}"
                        + (f" x {factor}" if factor != 1.0 else "") + f" + {tiny:.2g}"
                        + (f" + {slack:.2g}" if slack else ""))
    assert not msgs, "; ".join(msgs)
