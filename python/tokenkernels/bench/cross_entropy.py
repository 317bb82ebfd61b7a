"""cross_entropy family: ``tokenkernels.linear_cross_entropy`` (forward + backward, mean
reduction) against its peers, side by side in one run, per case:

* ``torch``: materialised ``F.linear`` + ``F.cross_entropy`` on fp32 logits (the baseline);
* ``torch lce``: torch's own ``F.linear_cross_entropy`` reference path (``options=None``: the
  materialised logits in the input dtype);
* ``torch chunked``: the same with ``options=torch.nn.LinearCrossEntropyOptions()`` (chunked,
  gradients precomputed in the forward); both only where torch has them (2.13+);
* ``cut_cross_entropy[torch_compile]`` (CPU) / ``cut_cross_entropy`` (CUDA, its Triton "cce"
  impl): Cut Cross-Entropy's package when importable (it imports triton even for its
  ``torch_compile`` impl; on CPU torch.compile needs a C++ compiler);
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` when importable (Triton only:
  on CPU it fails, "0 active drivers", and is reported as a note).

A peer that is not importable is left out with a note; one that fails on a case is noted and
the table goes on. Compiled peers (CCE's torch_compile), and every impl whose schedule has no
warm-up (the quick run's peers), get one untimed fwd+bwd and forward first: no compile or
first-call cost is timed.

Time: median of fwd+bwd (and forward alone). Memory: the peak allocation beyond the inputs during
fwd+bwd; on CPU measured in a fresh subprocess per case and impl as the peak resident set
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, together with an RSS sampler
thread every 0.5 ms where that is unavailable; glibc's mmap threshold fixed at 64 KiB so freed
buffers leave the resident set), after an untimed warm-up on 64 rows (compiles, thread pools);
on CUDA from ``torch.cuda.max_memory_allocated``. Both include the gradients (N·D + V·D
elements), which every implementation must return; "extra" subtracts them.

Precision: ``abs(loss - fp64)``, the absolute difference between the implementation's loss (from
its first fwd+bwd) and the loss of the same inputs upcast to fp64 (computed once per case, in
vocabulary chunks, so no (N, V) fp64 tensor is held).

Rows: per case one row of fwd+bwd times (rate on 6·N·D·V flops, metrics ``abs(loss - fp64)``,
``peak extra MB`` and ``extra - grads MB``) and a ``<case> fwd`` row of forward times
(2·N·D·V flops), both against ``torch`` and ``torch chunked`` (columns ``vs torch``,
``vs torch chunked``: the peer's median / this one's, > 1 = faster). On CUDA also a ``<case> bwd`` row:
``cross_entropy_backward`` alone (dhidden and
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
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import Context, Row
from .harness import schedule

DESCRIPTION = ("fused linear cross-entropy fwd+bwd vs torch materialised logits, torch's "
               "F.linear_cross_entropy (reference, chunked), Cut Cross-Entropy and Liger")

CPU_SHAPES = [(2048, 1024, 32000), (1024, 2048, 128256)]
CPU_QUICK = [(512, 512, 32000)]
CUDA_SHAPES = [(8192, 2304, 256000), (4096, 4096, 128256)]
CUDA_QUICK = [(2048, 2304, 65536)]

BASELINES = ("torch", "torch chunked")
# peers that compile on their first call: one untimed fwd+bwd and forward before timing
COMPILED = ("cut_cross_entropy[torch_compile]",)


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


def fp64_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, ignore_index: int = -100,
              chunk: Optional[int] = None) -> float:
    """The mean cross-entropy of ``h @ w.T`` against ``t`` computed in fp64 from the same inputs
    upcast, over vocabulary chunks (``chunk`` rows of ``w``; default: ~128 MB of fp64 logits) with
    a running log-sum-exp and the target logit; tokens whose target is ``ignore_index`` are left
    out, as in the ops."""
    with torch.no_grad():
        valid = t != ignore_index
        hd = h.detach()[valid].double()
        tv = t[valid]
        n, V = hd.shape[0], w.shape[0]
        if n == 0:
            return 0.0
        lse = torch.full((n,), -math.inf, dtype=torch.float64, device=h.device)
        tgt = torch.zeros(n, dtype=torch.float64, device=h.device)
        step = chunk or max(256, (16 * 2**20) // n)
        rows = torch.arange(n, device=h.device)
        for v0 in range(0, V, step):
            lg = hd @ w.detach()[v0:v0 + step].double().T
            lse = torch.logaddexp(lse, torch.logsumexp(lg, dim=1))
            here = (tv >= v0) & (tv < v0 + lg.shape[1])
            tgt[here] = lg[rows[here], tv[here] - v0]
        return float((lse - tgt).mean())


def impls(device, notes: Optional[List[str]] = None,
          only: Optional[str] = None) -> Dict[str, Callable]:
    """name -> fn(h, w, t) returning the mean loss, for every implementation importable here
    (a peer that is not: a line in ``notes``, when given). ``only``: the memory subprocess's
    one name; the peer packages (slow imports) are then imported only when it is theirs."""
    import tokenkernels

    notes = [] if notes is None else notes
    want = lambda prefix: only is None or only.startswith(prefix)  # noqa: E731
    F = torch.nn.functional

    def ours(h, w, t):
        return tokenkernels.linear_cross_entropy(h, w, t, check=False)

    def torch_ref(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)

    out = {"tokenkernels": ours, "torch": torch_ref}
    if device.type == "cuda":
        # each CUDA variant by name beside "auto" (above): "plain" (cuBLAS logit tiles), "wmma"
        # (the fused WMMA kernels), "tuned" (the sm_90a TMA + wgmma forward on compute
        # capability 9.0, bench/roofline/cross_entropy_fwd.md; its backward is the tuned one too)
        for impl in ("plain", "wmma", "tuned"):
            out[f"tokenkernels[{impl}]"] = (
                lambda h, w, t, impl=impl: tokenkernels.linear_cross_entropy(h, w, t, check=False,
                                                                              impl=impl))
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        # torch >= 2.13: the reference path (logits in the input dtype) and the chunked one
        out["torch lce"] = lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=-100,
                                                                   options=None)
        opts = torch.nn.LinearCrossEntropyOptions()
        out["torch chunked"] = lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=-100,
                                                                       options=opts)
    else:
        notes.append(f"torch {torch.__version__} has no F.linear_cross_entropy / "
                     "nn.LinearCrossEntropyOptions: 'torch lce' and 'torch chunked' left out")
    if want("cut_cross_entropy"):
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except Exception as e:  # noqa: BLE001  (e.g. no triton: CCE imports it at import time)
            notes.append(f"cut_cross_entropy not importable ({_short(e)}): left out")
        else:
            if device.type == "cuda":
                out["cut_cross_entropy"] = lambda h, w, t: cce(h, w, t)
            else:   # its Triton "cce" impl needs a GPU; "torch_compile" is its portable one
                out["cut_cross_entropy[torch_compile]"] = (
                    lambda h, w, t: cce(h, w, t, impl="torch_compile"))
    if want("liger"):
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            lig = LigerFusedLinearCrossEntropyLoss()
        except Exception as e:  # noqa: BLE001
            notes.append(f"liger_kernel not importable ({_short(e)}): left out")
        else:
            out["liger"] = lambda h, w, t: lig(w, h, t)
    return out


def _short(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}" + ("..." if len(msg) > limit else "")


def _fwd_bwd(fn, h, w, t, last: Optional[dict] = None):
    """fwd+bwd of ``fn``; the last loss goes to ``last["loss"]`` when given."""
    def run():
        h.grad = None
        w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        if last is not None:
            last["loss"] = loss.detach()
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
def status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096
def reset_hwm():  # VmHWM := VmRSS (Linux >= 4.0); False where it cannot be reset
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return status('VmHWM') is not None
    except OSError:
        return False
N, D, V, dt, name = {N}, {D}, {V}, getattr(torch, {dt!r}), {name!r}
fn = impls(torch.device('cpu'), only=name)[name]
h, w, t = make_inputs(N, D, V, dt, torch.device('cpu'))
hw = h.detach()[:64].clone().requires_grad_()
fn(hw, w, t[:64]).backward()  # warm-up on 64 rows: compiles, thread pools, lazy inits
del hw
w.grad = None
hwm = reset_hwm()
base = rss()
peak = [base]
done = threading.Event()
def sample():  # ATen releases the GIL, so this thread keeps sampling (VmHWM needs no GIL)
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
th = threading.Thread(target=sample, daemon=True)
th.start()
fn(h, w, t).backward()
peak[0] = max(peak[0], rss())
done.set()
th.join()
if hwm:
    peak[0] = max(peak[0], status('VmHWM'))
print(json.dumps(dict(base=base, peak=peak[0], hwm=hwm)))
"""


def cpu_peak_extra(N, D, V, dtype, name) -> float:
    """Peak bytes above the inputs during one fwd+bwd, in a fresh process (nan on failure)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _MEM_SNIPPET.format(path=here, N=N, D=D, V=V, dt=str(dtype).split(".")[-1], name=name)
    # a fixed mmap threshold: every large buffer is its own mapping, returned to the system
    # when freed (the warm-up's buffers do not stay resident, nor hide the call's)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=900, check=True, env=env).stdout.strip().splitlines()[-1]
        d = json.loads(out)
        return max(0, d["peak"] - d["base"])
    except Exception:  # noqa: BLE001
        return math.nan


def run(ctx: Context) -> None:
    dev = ctx.device
    specs = _specs(ctx.quick, ctx.cuda)
    fns = impls(dev, ctx.notes)
    ctx.total_cases = len(specs)
    logits = []
    warned = set()
    for (N, D, V, dt) in specs:
        h, w, t = make_inputs(N, D, V, dt, dev)
        case = case_label(N, D, V, dt)
        flops = 6.0 * N * D * V
        logits_mb = N * V * h.element_size() / 2**20
        grads_mb = (N * D + V * D) * h.element_size() / 2**20
        started = time.perf_counter()
        truth = fp64_loss(h, w, t)
        both = Row("cross_entropy", case, baselines=BASELINES)
        fwd = Row("cross_entropy", case + " fwd", baselines=BASELINES)
        for name, fn in fns.items():
            ours = name.startswith("tokenkernels")
            last: dict = {}
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    cold = schedule(ctx.cuda, ctx.quick, not ours, ctx.repeats).warmup == 0
                    if name in COMPILED or cold:   # compile / first-call costs outside the timing
                        _fwd_bwd(fn, h, w, t, last)()
                        _fwd(fn, h, w, t)()
                    tb = ctx.time(_fwd_bwd(fn, h, w, t, last), slow=not ours)
                    tf = ctx.time(_fwd(fn, h, w, t), slow=not ours)
                    if "loss" not in last:     # a timer that ran nothing (tests)
                        _fwd_bwd(fn, h, w, t, last)()
            except Exception as e:  # noqa: BLE001  (a peer failing must not stop the table)
                ctx.note(f"{case}: {name} failed: {_short(e)}")
                continue
            finally:
                h.grad = None
                w.grad = None
            for m in caught:
                if issubclass(m.category, (DeprecationWarning, FutureWarning)):
                    continue
                msg = f"{name} warned: {' '.join(str(m.message).split())[:200]}"
                if msg not in warned:
                    warned.add(msg)
                    ctx.note(f"{case}: {msg}")
            err = abs(float(last["loss"].double()) - truth)
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
                     metrics={"abs(loss - fp64)": err, "peak extra MB": round(peak, 1),
                              "extra - grads MB": round(peak - grads_mb, 1)})
            fwd.add(name, tf, work=flops / 3)
        rows = [both, fwd]
        if ctx.cuda:  # the backward alone, per CUDA variant
            bwd = Row("cross_entropy", case + " bwd", baselines=("plain",))
            args = _bwd_args(h, w, t)
            for impl in BWD_IMPLS:
                try:
                    bwd.add(impl, ctx.time(_bwd(args, impl)), work=flops)
                except Exception as e:  # noqa: BLE001
                    ctx.note(f"{case} bwd: {impl} failed: {_short(e)}")
            del args
            rows.append(bwd)
        ctx.add(rows, started)
        logits.append(f"{case} {logits_mb:.0f} MB (fp64 loss {truth:.6f})")
        del h, w, t
    ctx.note("abs(loss - fp64) = |this loss - the loss of the same inputs upcast to fp64|. "
             "peak extra MB = peak allocation above the inputs during fwd+bwd (includes the returned "
             "gradients); extra - grads MB removes the N*D + V*D gradient elements every implementation "
             "returns. The materialised logits alone (N*V in the input dtype): " + ", ".join(logits) + ".")
