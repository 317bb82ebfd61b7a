"""cross_entropy family: ``tokenkernels.linear_cross_entropy`` (forward + backward, mean
reduction) against torch's materialised ``F.linear`` + ``F.cross_entropy`` and, when importable,
Cut Cross-Entropy (``cut_cross_entropy``) and Liger-Kernel's fused linear cross-entropy.

Time: median of fwd+bwd (and forward alone). Memory: the peak allocation beyond the inputs during
fwd+bwd; on CPU measured in a fresh subprocess per case by sampling the resident set size every
0.5 ms during the call (a lower bound of the true peak; big buffers live long enough to be
seen), on CUDA from ``torch.cuda.max_memory_allocated``. Both include the gradients (N·D + V·D elements), which
every implementation must return; "extra" subtracts them.

Rows: per case one row of fwd+bwd times (rate on 6·N·D·V flops, metrics ``peak extra MB`` and
``extra - grads MB``) and a ``<case> fwd`` row of forward times (2·N·D·V flops), both against
``torch``. On CUDA also a ``<case> bwd`` row: ``cross_entropy_backward`` alone (dhidden and
dweight, the statistics of one plain forward) for each CUDA variant ``plain`` / ``wmma`` /
``tuned`` (rate on 6·N·D·V flops: the 2·N·D·V recompute and the 4·N·D·V of the two gradient
GEMMs; roofline of "tuned": bench/roofline/cross_entropy_bwd.md), against ``plain``.
On CUDA the columns ``tokenkernels[plain]``, ``tokenkernels[wmma]`` and
``tokenkernels[tuned]`` time each variant beside the op's own choice (``tokenkernels``, impl
"auto"); the ``fwd`` row's ``tokenkernels[tuned]`` is the sm_90a forward of
``bench/roofline/cross_entropy_fwd.md`` on an H100 / H200.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

from . import Context, Row

DESCRIPTION = "fused linear cross-entropy fwd+bwd vs torch materialised logits (and peers on CUDA)"

CPU_SHAPES = [(2048, 1024, 32000), (1024, 2048, 128256)]
CPU_QUICK = [(512, 512, 32000)]
CUDA_SHAPES = [(8192, 2304, 256000), (4096, 4096, 128256)]
CUDA_QUICK = [(2048, 2304, 65536)]


def _specs(quick: bool, cuda: bool):
    """(N, D, V, dtype) per case: CUDA bf16 only; CPU fp32 and bf16."""
    if cuda:
        shapes, dtypes = (CUDA_QUICK if quick else CUDA_SHAPES), [torch.bfloat16]
    else:
        shapes, dtypes = (CPU_QUICK if quick else CPU_SHAPES), [torch.float32, torch.bfloat16]
    return [(N, D, V, dt) for (N, D, V) in shapes for dt in dtypes]


def case_label(N: int, D: int, V: int, dtype: torch.dtype) -> str:
    return f"lce N{N} D{D} V{V} {str(dtype).split('.')[-1]}"


def cases(quick: bool, cuda: bool = False) -> List[str]:
    """The case labels :func:`run` adds, in order (one progress line each: fwd+bwd and fwd)."""
    return [case_label(*sp) for sp in _specs(quick, cuda)]


def make_inputs(N: int, D: int, V: int, dtype: torch.dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)          # drawn in dtype: no fp32 copy
    w = torch.randn(V, D, generator=g, dtype=dtype).div_(math.sqrt(D))
    t = torch.randint(0, V, (N,), generator=g)
    t[::17] = -100
    return (h.to(device).requires_grad_(), w.to(device).requires_grad_(), t.to(device))


def impls(device) -> Dict[str, Callable]:
    import tokenkernels

    def ours(h, w, t):
        return tokenkernels.linear_cross_entropy(h, w, t, check=False)

    def torch_ref(h, w, t):
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), t,
                                                 ignore_index=-100)

    out = {"tokenkernels": ours, "torch": torch_ref}
    if device.type == "cuda":
        # each CUDA variant by name beside "auto" (above): "plain" (cuBLAS logit tiles), "wmma"
        # (the fused WMMA kernels), "tuned" (the sm_90a TMA + wgmma forward on compute
        # capability 9.0, bench/roofline/cross_entropy_fwd.md; its backward is the tuned one too)
        for impl in ("plain", "wmma", "tuned"):
            out[f"tokenkernels[{impl}]"] = (
                lambda h, w, t, impl=impl: tokenkernels.linear_cross_entropy(h, w, t, check=False,
                                                                              impl=impl))
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            out["cut_cross_entropy"] = lambda h, w, t: cce(h, w, t)
        except Exception:  # noqa: BLE001
            pass
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            lig = LigerFusedLinearCrossEntropyLoss()
            out["liger"] = lambda h, w, t: lig(w, h, t)
        except Exception:  # noqa: BLE001
            pass
    return out


def _fwd_bwd(fn, h, w, t):
    def run():
        h.grad = None
        w.grad = None
        fn(h, w, t).backward()
    return run


BWD_IMPLS = ("plain", "wmma", "tuned")


def _bwd_args(h, w, t):
    """cross_entropy_backward's arguments for the mean loss over h, w, t (the forward's lse from
    one plain forward; no bias, no filtering: every tile computed), impl last."""
    op = torch.ops.tokenkernels.cross_entropy_forward
    with torch.no_grad():
        lse = op(h.detach(), w.detach(), t, None, -100, None, 0, w.shape[0], False, False, False,
                 0.0, False, "plain")[0]
    valid = (t != -100)
    g = valid.to(torch.float32) / valid.sum().clamp(min=1).to(torch.float32)
    return (h.detach(), w.detach(), t, None, lse, g, -g, None, -100, None, 0, 0.0, True, True,
            False, False)


def _bwd(args, impl):
    op = torch.ops.tokenkernels.cross_entropy_backward

    def run():
        op(*args, impl)
    return run


def _fwd(fn, h, w, t):
    def run():
        with torch.no_grad():
            fn(h, w, t)
    return run


# ------------------------------------------------------------------------------ CPU memory
_MEM_SNIPPET = r"""
import json, sys, threading, time, torch
sys.path.insert(0, {path!r})
from tokenkernels.bench.cross_entropy import make_inputs, impls
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096
N, D, V, dt, name = {N}, {D}, {V}, getattr(torch, {dt!r}), {name!r}
h, w, t = make_inputs(N, D, V, dt, torch.device('cpu'))
fn = impls(torch.device('cpu'))[name]
base = rss()
peak = [base]
done = threading.Event()
def sample():  # the op releases the GIL inside ATen, so this thread keeps sampling
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
th = threading.Thread(target=sample, daemon=True)
th.start()
fn(h, w, t).backward()
peak[0] = max(peak[0], rss())
done.set()
th.join()
print(json.dumps(dict(base=base, peak=peak[0])))
"""


def cpu_peak_extra(N, D, V, dtype, name) -> float:
    """Peak bytes above the inputs during one fwd+bwd, in a fresh process (nan on failure)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _MEM_SNIPPET.format(path=here, N=N, D=D, V=V, dt=str(dtype).split(".")[-1], name=name)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=900, check=True).stdout.strip().splitlines()[-1]
        d = json.loads(out)
        return max(0, d["peak"] - d["base"])
    except Exception:  # noqa: BLE001
        return math.nan


def run(ctx: Context) -> None:
    dev = ctx.device
    specs = _specs(ctx.quick, ctx.cuda)
    fns = impls(dev)
    ctx.total_cases = len(specs)
    logits = []
    for (N, D, V, dt) in specs:
        h, w, t = make_inputs(N, D, V, dt, dev)
        case = case_label(N, D, V, dt)
        flops = 6.0 * N * D * V
        logits_mb = N * V * h.element_size() / 2**20
        grads_mb = (N * D + V * D) * h.element_size() / 2**20
        started = time.perf_counter()
        both = Row("cross_entropy", case, baselines=("torch",))
        fwd = Row("cross_entropy", case + " fwd", baselines=("torch",))
        for name, fn in fns.items():
            try:
                ours = name.startswith("tokenkernels")
                tb = ctx.time(_fwd_bwd(fn, h, w, t), slow=not ours)
                tf = ctx.time(_fwd(fn, h, w, t), slow=not ours)
            except Exception as e:  # noqa: BLE001  (a peer failing must not stop the table)
                ctx.note(f"{case}: {name} failed: {type(e).__name__}: {e}")
                continue
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                _fwd_bwd(fn, h, w, t)()
                torch.cuda.synchronize(dev)
                h.grad = None
                w.grad = None
                peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
            else:
                peak = cpu_peak_extra(N, D, V, dt, name) / 2**20
            both.add(name, tb, work=flops,
                     metrics={"peak extra MB": round(peak, 1), "extra - grads MB": round(peak - grads_mb, 1)})
            fwd.add(name, tf, work=flops / 3)
        rows = [both, fwd]
        if ctx.cuda:  # the backward alone, per CUDA variant
            bwd = Row("cross_entropy", case + " bwd", baselines=("plain",))
            args = _bwd_args(h, w, t)
            for impl in BWD_IMPLS:
                try:
                    bwd.add(impl, ctx.time(_bwd(args, impl)), work=flops)
                except Exception as e:  # noqa: BLE001
                    ctx.note(f"{case} bwd: {impl} failed: {type(e).__name__}: {e}")
            del args
            rows.append(bwd)
        ctx.add(rows, started)
        logits.append(f"{case} {logits_mb:.0f} MB")
        del h, w, t
    ctx.note("peak extra MB = peak allocation above the inputs during fwd+bwd (includes the returned "
             "gradients); extra - grads MB removes the N*D + V*D gradient elements every implementation "
             "returns. The materialised logits alone (N*V in the input dtype): " + ", ".join(logits) + ".")
