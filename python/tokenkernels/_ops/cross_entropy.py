"""cross_entropy family: fused linear cross-entropy that never materialises the (N, V) logits.

    loss = linear_cross_entropy(hidden, weight, targets)          # hidden (..., D), weight (V, D)

computes ``F.cross_entropy(hidden @ weight.T + bias, targets)`` (plus softcap, label smoothing,
z-loss, shift, ignore_index) block by block: the forward keeps a per-token online log-sum-exp,
the backward recomputes logit blocks and feeds them straight into the gradient GEMMs. Extra
memory is a few logit tiles, never proportional to N x V.

The kernel op (``torch.ops.tokenkernels.cross_entropy_forward``) returns per-token statistics
(lse, target logit, sum of logits, arg-max, entropy) and carries its own autograd formula
(``cross_entropy_backward``); the loss is composed from those statistics here, so every option
gets exact gradients, including ``reduction="none"`` and a differentiable ``lse``.

The wrapper converts Python values (numbers, bools, ``shift``, ``filter_eps="auto"``), checks
the options the schema does not take (reduction, label_smoothing, z_loss, shift,
vocab_parallel) and the flattening of ``hidden`` (..., D) / ``targets`` (...) to (N, D) / (N,),
and picks the implementation (:func:`tokenkernels.variants.choose`); every other check (shapes,
dtypes, devices, softcap, filter_eps >= 0, target values) is the ops' own, in
csrc/cross_entropy/cross_entropy_args.h, the same on every device.
"""
from __future__ import annotations

import dataclasses
import math
import os
import operator
import sys
from typing import Any, Optional, Union

import torch

from .._common import as_bool, as_int
from ..reference import cross_entropy as _reference
from ..variants import REFERENCE, choose

_REDUCTIONS = ("mean", "sum", "none")
# vocab_total given to the kernels of a vocabulary shard: every target >= 0 may lie in some
# shard, so the shard kernels mark none as out of range; the wrapper does that after the
# all-reduce (a target no shard holds is out of range).
_UNBOUNDED_VOCAB = 2 ** 63 - 1


@dataclasses.dataclass(frozen=True)
class VocabParallel:
    """Vocabulary-parallel sharding: this process holds rows [start, stop) of the vocabulary.

    ``group`` is a ``torch.distributed`` process group (None = the default group). Every rank
    passes the same hidden states and targets; max, sum-exp, target logit (and the other
    statistics) are all-reduced over the group, so the loss equals the single-process loss and
    ``hidden.grad`` is the full gradient; ``weight.grad`` / ``bias.grad`` are this shard's rows.
    """

    group: Any
    start: int
    stop: int


def _resolve_shift(shift, targets: torch.Tensor) -> int:
    """``shift`` as an int s >= 0 (True = 1, False = 0), at most the sequence length."""
    op = "tokenkernels.linear_cross_entropy"
    if isinstance(shift, bool):
        s = int(shift)
    else:
        try:
            s = operator.index(shift)
        except TypeError:
            raise TypeError(f"{op}: shift must be a bool or an int, got "
                            f"{type(shift).__name__}") from None
    if s < 0:
        raise ValueError(f"{op}: shift must be >= 0 (position i predicts target i + shift), "
                         f"got {s}")
    if s == 0:
        return 0
    if targets.dim() == 0:
        raise ValueError(f"{op}: shift = {s} needs targets with a sequence dimension, got 0-d "
                         f"targets")
    T = targets.shape[-1]
    if s > T and targets.numel() > 0:
        raise ValueError(f"{op}: shift = {s} exceeds the sequence length {T} (targets.shape[-1])")
    return s


def _auto_filter_eps(dtype: torch.dtype) -> float:
    # eps(dtype) / 32: bf16 2^-7 / 32 = 2^-12, fp16 2^-10 / 32 = 2^-15; fp32 is never filtered.
    if dtype == torch.bfloat16:
        return 2.0 ** -12
    if dtype == torch.float16:
        return 2.0 ** -15
    return 0.0


def _resolve_filter_eps(filter_eps: Union[str, float, None], dtype: torch.dtype) -> float:
    """filter_eps as the float the ops take (they check it is >= 0)."""
    if filter_eps is None:
        return 0.0
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"tokenkernels.linear_cross_entropy: filter_eps must be 'auto', None or a "
                             f"float >= 0, got {filter_eps!r}")
        return _auto_filter_eps(dtype)
    return _real("filter_eps", filter_eps)


# ---------------------------------------------------------------------------------------------
# fake (meta) kernels: shapes only, for torch.compile / FakeTensor tracing. They also run for
# tensors on the meta device mixed with real ones (the dispatcher picks Meta over CPU), where the
# C++ checks never run: so they refuse mixed devices with the C++ message (check_tensors in
# csrc/cross_entropy/cross_entropy_args.h); every other check is the kernels'.
def _fake_same_device(op, hidden, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(f"tokenkernels.{op}: {name} is on {t.device} but hidden is on "
                             f"{hidden.device}")


@torch.library.register_fake("tokenkernels::cross_entropy_forward")
def _forward_fake(hidden, weight, targets, bias, ignore_index, softcap, vocab_start,
                  vocab_total, sum_z, aux, check, filter_eps, accum_fp32, impl):
    _fake_same_device("linear_cross_entropy", hidden, weight=weight, targets=targets, bias=bias)
    N = hidden.shape[0]
    sd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    na = N if aux else 0
    return (hidden.new_empty((N,), dtype=sd), hidden.new_empty((N,), dtype=sd),
            hidden.new_empty((N if sum_z else 0,), dtype=sd),
            hidden.new_empty((na,), dtype=torch.long),
            hidden.new_empty((na,), dtype=sd),
            hidden.new_empty((na,), dtype=sd))


@torch.library.register_fake("tokenkernels::cross_entropy_backward")
def _backward_fake(hidden, weight, targets, bias, lse, coef_p, coef_t, coef_1, ignore_index,
                   softcap, vocab_start, filter_eps, need_dhidden, need_dweight, need_dbias,
                   accum_fp32, impl):
    _fake_same_device("linear_cross_entropy_backward", hidden, weight=weight, targets=targets,
                      bias=bias, lse=lse, coef_p=coef_p, coef_t=coef_t, coef_1=coef_1)
    dh = hidden.new_empty(tuple(hidden.shape) if need_dhidden else (0,))
    dw = weight.new_empty(tuple(weight.shape) if need_dweight else (0,))
    if need_dbias:
        db = bias.new_empty(tuple(bias.shape))
    else:
        db = hidden.new_empty((0,), dtype=torch.float64 if hidden.dtype == torch.float64
                              else torch.float32)
    return dh, dw, db


# ---------------------------------------------------------------------------------------------
# autograd of cross_entropy_forward: the loss is a function of (lse, z_target, sum_z) per token,
#   dL/dz_v = g_lse * softmax_v + g_zt * [v == target] + g_sumz
# which cross_entropy_backward turns into dhidden / dweight / dbias by recomputing the logits.
def _setup_context(ctx, inputs, output):
    (hidden, weight, targets, bias, ignore_index, softcap, vocab_start, vocab_total, sum_z, aux,
     check, filter_eps, accum_fp32, impl) = inputs
    ctx.save_for_backward(hidden, weight, targets, bias, output[0])
    ctx.opts = (ignore_index, softcap, vocab_start, filter_eps, accum_fp32, impl)


def _backward(ctx, g_lse, g_zt, g_sumz, g_amax, g_maxz, g_ent):
    hidden, weight, targets, bias, lse = ctx.saved_tensors
    ignore_index, softcap, vocab_start, filter_eps, accum_fp32, impl = ctx.opts
    need = ctx.needs_input_grad
    need_dh, need_dw, need_db = bool(need[0]), bool(need[1]), bool(need[3]) and bias is not None
    zeros = None
    if g_lse is None or g_zt is None:
        zeros = torch.zeros_like(lse)
    sd = lse.dtype  # fp32 (fp64 for fp64 inputs)
    coef_p = (g_lse if g_lse is not None else zeros).to(sd).contiguous()
    coef_t = (g_zt if g_zt is not None else zeros).to(sd).contiguous()
    coef_1 = g_sumz.to(sd).contiguous() if (g_sumz is not None and g_sumz.numel() > 0) else None
    dh, dw, db = torch.ops.tokenkernels.cross_entropy_backward(
        hidden, weight, targets, bias, lse, coef_p, coef_t, coef_1, ignore_index, softcap,
        vocab_start, filter_eps, need_dh, need_dw, need_db, accum_fp32, impl)
    return (dh if need_dh else None, dw if need_dw else None, None,
            db if need_db else None, None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("tokenkernels::cross_entropy_forward", _backward,
                                setup_context=_setup_context)


def _backward_setup(ctx, inputs, output):
    pass


def _double_backward(ctx, *grads):
    raise NotImplementedError(
        "tokenkernels.linear_cross_entropy: second derivatives (double backward) are not "
        "supported; the first derivative under create_graph=True is exact")


# Without this, a double backward would silently drop the path through cross_entropy_backward.
torch.library.register_autograd("tokenkernels::cross_entropy_backward", _double_backward,
                                setup_context=_backward_setup)


# ---------------------------------------------------------------------------------------------
# vocabulary parallel: statistics all-reduced over the group
class _VocabParallelStats(torch.autograd.Function):
    """Statistics of a vocabulary shard, all-reduced over the group. Every collective runs on
    tensors on hidden's device (NCCL groups take CUDA tensors only) and nothing is read back to
    the host unless ``check`` is set, so the call is sync-free with ``check=False``. Returns
    lse, z_target, sum_z, arg-max, entropy and the total vocabulary size (a 0-d tensor: the sum
    of the shards' rows)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, softcap, start, sum_z, aux,
                check, filter_eps, accum_fp32, impl, group):
        import torch.distributed as dist

        op = torch.ops.tokenkernels.cross_entropy_forward
        V = weight.shape[0]
        lse_l, zt, sz, am, mz, ent_l = op(hidden, weight, targets, bias, ignore_index, softcap,
                                          start, _UNBOUNDED_VOCAB, sum_z, aux, False, filter_eps,
                                          accum_fp32, impl)
        m = lse_l.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = torch.exp(lse_l - m)
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        lse = m + torch.log(s)
        # one SUM all-reduce for z_target, the number of shards holding each target, sum_z and
        # the vocabulary size
        N = zt.shape[0]
        t = targets.to(torch.long)
        held = ((t >= start) & (t < start + V)).to(zt.dtype)
        parts = [zt, held] + ([sz] if sum_z else []) + [zt.new_full((1,), float(V))]
        buf = torch.cat(parts)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        zt, held = buf[:N], buf[N:2 * N]
        sz = buf[2 * N:3 * N].clone() if sum_z else sz
        v_total = buf[-1].clone()
        bad = (t != ignore_index) & (held == 0)  # no shard holds the target (or it is < 0)
        if check and N and bool(bad.any()):  # the check's host sync
            i = int(bad.nonzero()[0, 0])
            raise RuntimeError(
                f"tokenkernels.linear_cross_entropy: targets[{i}] = {int(t[i])} is outside "
                f"[0, V={int(v_total)}) (no vocab_parallel shard holds it) and is not "
                f"ignore_index ({ignore_index})")
        zt = torch.where(bad, torch.full_like(zt, float("nan")), zt)
        argmax, ent = am, ent_l
        if aux:
            # arg-max: the shard with the largest max logit (ties: the lowest shard = index)
            world = dist.get_world_size(group)
            mzs = [torch.empty_like(mz) for _ in range(world)]
            ams = [torch.empty_like(am) for _ in range(world)]
            dist.all_gather(mzs, mz, group=group)
            dist.all_gather(ams, am + start, group=group)
            mzs, ams = torch.stack(mzs), torch.stack(ams)
            best = mzs.argmax(0, keepdim=True)  # first maximum = lowest rank
            argmax = ams.gather(0, best).squeeze(0)
            # no logit > -inf in any shard: 0, as without vocab_parallel
            argmax = torch.where(mzs.gather(0, best).squeeze(0) > float("-inf"), argmax,
                                 torch.zeros_like(argmax))
            # entropy = lse - E_p[z]; E_p[z] = sum_shards exp(lse_r - lse) * (lse_r - ent_r)
            ez = torch.exp(lse_l - lse) * (lse_l - ent_l)
            ez = torch.nan_to_num(ez)
            dist.all_reduce(ez, op=dist.ReduceOp.SUM, group=group)
            ent = lse - ez
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.opts = (ignore_index, softcap, start, filter_eps, accum_fp32, impl, group)
        ctx.mark_non_differentiable(argmax, ent, v_total)
        return lse, zt, sz, argmax, ent, v_total

    @staticmethod
    def backward(ctx, g_lse, g_zt, g_sumz, g_am, g_ent, g_vtotal):
        import torch.distributed as dist

        hidden, weight, bias, targets, lse = ctx.saved_tensors
        ignore_index, softcap, start, filter_eps, accum_fp32, impl, group = ctx.opts
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        sd = lse.dtype
        coef_1 = g_sumz.to(sd).contiguous() if g_sumz is not None and g_sumz.numel() else None
        dh, dw, db = torch.ops.tokenkernels.cross_entropy_backward(
            hidden, weight, targets, bias, lse, g_lse.to(sd).contiguous(),
            g_zt.to(sd).contiguous(), coef_1, ignore_index, softcap, start, filter_eps,
            True, need_dw, need_db, accum_fp32, impl)
        # hidden is replicated: its gradient is the sum of every shard's part
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# CPU, scalar loss: gradients computed in the forward (csrc/cross_entropy/cross_entropy_fused_cpu.cpp)
@torch.library.register_fake("tokenkernels::_cross_entropy_fused")
def _fused_fake(hidden, weight, targets, bias, ignore_index, softcap, label_smoothing, z_loss,
                mean, scale, check, filter_eps, need_dhidden, need_dweight, need_dbias,
                engine="auto"):
    _fake_same_device("linear_cross_entropy", hidden, weight=weight, targets=targets, bias=bias)
    sd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (hidden.new_empty((), dtype=sd), hidden.new_empty((hidden.shape[0],), dtype=sd),
            hidden.new_empty(tuple(hidden.shape) if need_dhidden else (0,)),
            weight.new_empty(tuple(weight.shape) if need_dweight else (0,)),
            bias.new_empty(tuple(bias.shape)) if need_dbias else hidden.new_empty((0,), dtype=sd))


_BRGEMM = []


def _cpu_bf16_fast() -> bool:
    """Whether this CPU runs the fused op's bf16 engine (oneDNN's bf16 micro-kernel)."""
    if not _BRGEMM:
        _BRGEMM.append(bool(torch.ops.tokenkernels._cross_entropy_cpu_brgemm()))
    return _BRGEMM[0]


def _fused_applies(hidden, weight, bias, reduction, return_lse, return_aux, vp, softcap,
                   eps) -> bool:
    """Whether linear_cross_entropy takes the fused op: CPU tensors, a scalar reduction, no
    returned lse or aux outputs (their gradients / values need the forward statistics path), no
    vocab_parallel (with gradients wanted they are computed in the forward; without, the op
    computes the loss alone on the same GEMM engines); fp32 / fp64, or bf16 where the bf16 engine runs (even D, not softcap with
    label smoothing). fp16 keeps the forward + recompute path: CPUs without AVX512-FP16 have no
    fast fp16 GEMM, so computing gradients early buys nothing there.
    ``TOKENKERNELS_CE_FUSED=0`` turns it off."""
    if vp is not None or return_lse or return_aux or reduction == "none":
        return False
    if hidden.device.type != "cpu":
        return False
    if os.environ.get("TOKENKERNELS_CE_FUSED", "1") == "0":
        return False
    dt = hidden.dtype
    if dt in (torch.float32, torch.float64):
        return True
    D = hidden.shape[-1]
    return (dt == torch.bfloat16 and D > 0 and D % 2 == 0
            and not (softcap is not None and math.isfinite(softcap) and eps > 0)
            and _cpu_bf16_fast())


def _exact_scale(g: float) -> bool:
    """Scaling by g is exact in floating point (a power of two, away from the range ends)."""
    m, e = math.frexp(g)
    return m in (0.5, -0.5) and -100 < e < 100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The loss (mean / sum, times ``scale``) with dhidden, dweight, dbias computed in the forward
    (tokenkernels::_cross_entropy_fused); the backward scales them by the incoming gradient g.
    fp16/bf16 gradients are already rounded to their dtype, so a g that is not a power of two
    (which would round them a second time), and ``create_graph=True`` (the gradients as a
    differentiable function of g), run the recompute op instead (cross_entropy_backward, whose
    own double backward raises as on the other path). Pass the loss's divisor as ``_divisor``
    to linear_cross_entropy (the HF patch does) to keep g = 1."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, softcap, eps, zl, mean, scale,
                check, feps):
        need = ctx.needs_input_grad
        need_db = bias is not None and bool(need[3])
        loss, lse, dh, dw, db = torch.ops.tokenkernels._cross_entropy_fused(
            hidden, weight, targets, bias, ignore_index, softcap, eps, zl, mean, scale, check,
            feps, bool(need[0]), bool(need[1]), need_db)
        ctx.save_for_backward(hidden, weight, targets, bias, lse, dh, dw, db)
        ctx.opts = (ignore_index, softcap, eps, zl, mean, scale, need_db)
        return loss

    @staticmethod
    def backward(ctx, g):
        hidden, weight, targets, bias, lse, dh, dw, db = ctx.saved_tensors
        ignore_index, softcap, eps, zl, mean, scale, need_db = ctx.opts
        need = ctx.needs_input_grad
        lowp = hidden.dtype in (torch.float16, torch.bfloat16)
        recompute = torch.is_grad_enabled()
        one = False
        if not recompute:
            if torch.compiler.is_compiling():  # no data-dependent branch while tracing
                recompute = lowp
            else:
                gv = float(g)  # a CPU scalar: no device sync
                one = gv == 1.0
                recompute = lowp and not one and not _exact_scale(gv)
        if recompute:  # the gradients as a function of g, from the forward's lse
            valid = (targets != ignore_index).to(lse.dtype)
            w = valid / valid.sum().clamp(min=1) if mean else valid
            w = w * (g.to(lse.dtype) * scale)
            cp = (w * (1.0 + 2.0 * zl * lse)).contiguous()
            ct = (w * -(1.0 - eps)).contiguous()
            c1 = (w * (-eps / weight.shape[0])).contiguous() if eps > 0 else None
            gh, gw, gb = torch.ops.tokenkernels.cross_entropy_backward(
                hidden, weight, targets, bias, lse, cp, ct, c1, ignore_index, softcap, 0, 0.0,
                bool(need[0]), bool(need[1]), need_db, False, "plain")
        elif one:
            gh, gw, gb = dh, dw, db
        else:
            gh, gw, gb = dh * g, dw * g, db * g
        return (gh if need[0] else None, gw if need[1] else None, None,
                gb if need_db else None, None, None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# DTensor weights (FSDP2 / tensor parallel): gathered here, with a data-parallel gradient
def _dtensor_type():
    """torch's DTensor class, or None when torch.distributed.tensor was never imported (then no
    DTensor can exist, and the check costs a dict look-up)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _gather_dtensor(t):
    """The full tensor of a DTensor parameter, differentiable: all-gathered in the forward; in the
    backward every rank's gradient of the full tensor is summed over the mesh (reduce-scatter
    into a Shard placement, all-reduce into a Replicate one) and divided by the mesh size. That
    is the data-parallel gradient FSDP2 / DDP compute with their default averaging; when every
    rank sees the same tokens (tensor parallel) it equals the single-rank gradient."""
    from torch.distributed.tensor import Partial, Replicate

    mesh = t.device_mesh
    full = t.redistribute(placements=[Replicate()] * mesh.ndim)
    local = full.to_local(grad_placements=[Partial()] * mesh.ndim)
    if not local.requires_grad:
        return local
    return _ScaleGrad.apply(local, 1.0 / mesh.size())


def _unwrap_dtensors(hidden, weight, targets, bias, vocab_parallel):
    """weight / bias as plain full tensors when they are DTensors (e.g. FSDP2's sharded
    parameters read outside their module's forward); hidden / targets must be this rank's
    local tensors."""
    dt = _dtensor_type()
    if dt is None:
        return weight, bias
    op = "tokenkernels.linear_cross_entropy"
    for name, t in (("hidden", hidden), ("targets", targets)):
        if isinstance(t, dt):
            raise TypeError(f"{op}: {name} is a DTensor (placements {tuple(t.placements)}); pass "
                            f"this rank's local tensor ({name}.to_local()): the loss is over "
                            f"this rank's tokens")
    out = []
    for name, t in (("weight", weight), ("bias", bias)):
        if isinstance(t, dt):
            if vocab_parallel is not None:
                _check_not_vocab_split(name, t, vocab_parallel)
            t = _gather_dtensor(t)
        out.append(t)
    return out[0], out[1]


def _check_not_vocab_split(name, t, vocab_parallel):
    """With vocab_parallel a DTensor weight / bias is this rank's vocabulary shard, itself
    sharded over data-parallel ranks (FSDP2 on a data-parallel mesh): gathered, it is the shard.
    A DTensor split over the vocab_parallel group itself already holds the whole vocabulary:
    used with vocab_parallel it would be counted once per rank, so it raises."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    group = vocab_parallel.group if vocab_parallel.group is not None else dist.group.WORLD
    vp_ranks = sorted(dist.get_process_group_ranks(group))
    mesh = t.device_mesh
    for i, p in enumerate(t.placements):
        if isinstance(p, Shard) and sorted(dist.get_process_group_ranks(mesh.get_group(i))) == vp_ranks:
            raise ValueError(
                f"tokenkernels.linear_cross_entropy: {name} is a DTensor sharded over the "
                f"vocab_parallel group (placements {tuple(t.placements)}); pass it without "
                f"vocab_parallel (it is gathered), or pass this rank's rows "
                f"({name}.to_local()) with vocab_parallel")


# ---------------------------------------------------------------------------------------------
def _real(name, v):
    """A Python / 0-d tensor real number as a float, else a TypeError naming ``name``."""
    op = "tokenkernels.linear_cross_entropy"
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
        return float(v)
    if isinstance(v, (bool, str, bytes)) or v is None:
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}") from None


def _flag(name, v):
    return as_bool(v, name, "linear_cross_entropy")   # bool / numpy bool only


def _check_ignore_index(ignore_index) -> int:
    return as_int(ignore_index, "ignore_index", "linear_cross_entropy")


def _check_args(hidden, weight, targets, bias, reduction, softcap, label_smoothing, z_loss):
    """Converts and checks what the ops cannot see: that the inputs are tensors, the flattening
    of hidden (..., D) and targets (...) to (N, D) / (N,), and the options the schema does not
    take. Returns (softcap, label_smoothing, z_loss) as floats (softcap: None or a float the ops
    check)."""
    op = "tokenkernels.linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must be (..., D), got a 0-d tensor")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{op}: targets must have shape {tuple(hidden.shape[:-1])} (hidden's "
                         f"leading dims), got {tuple(targets.shape)}")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if softcap is not None:
        softcap = _real("softcap", softcap)
    label_smoothing = _real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must lie in [0, 1], got {label_smoothing}")
    z_loss = _real("z_loss", z_loss)
    if not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"{op}: z_loss must be finite and >= 0, got {z_loss}")
    return softcap, label_smoothing, z_loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    shift: Union[bool, int] = False,
    return_lse: bool = False,
    return_aux: bool = False,
    filter_eps: Union[str, float, None] = "auto",
    accum_fp32: bool = False,
    vocab_parallel: Optional[VocabParallel] = None,
    check: bool = True,
    impl: str = "auto",
    _divisor=None,
):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without the logits.

    Per token, with z = hidden·weightᵀ + bias (then ``softcap·tanh(z/softcap)`` if ``softcap``),
    lse = logsumexp(z) and ε = ``label_smoothing``::

        loss = (1 - ε)(lse - z[target]) + ε(lse - mean(z)) + z_loss · lse²

    Tokens whose target is ``ignore_index`` contribute 0 and are left out of the mean's
    denominator (the mean over zero tokens is 0, not NaN).

    Args:
        hidden: (..., D) float32/float16/bfloat16 hidden states.
        weight: (V, D) classifier (LM head) weight, same dtype and device.
        targets: (...) int64/int32 target ids in [0, V) or ``ignore_index``. Out-of-range
            targets raise (``check=True``, a host sync on CUDA) or give a NaN loss.
        bias: optional (V,) bias.
        reduction: ``"mean"`` (over tokens not ignored), ``"sum"`` or ``"none"`` (per-token
            losses of shape ``targets.shape``, with exact per-token gradients).
        softcap: final-logit soft capping (Gemma 2), or None. ``float("inf")`` is the limit
            (no capping, same as None); NaN or <= 0 raises.
        label_smoothing: ε in [0, 1].
        z_loss: weight of the lse² auxiliary loss (PaLM), finite and >= 0.
        shift: an int s >= 0 (True = 1, False = 0; Cut Cross-Entropy's semantics): position i
            predicts target i + s along the last dimension, i.e. ``hidden[..., :-s, :]``
            predicts ``targets[..., s:]`` (s = 1: HF causal-LM labels); the last s positions of
            each sequence are ignored (loss 0, shapes unchanged). A negative s, or one above
            ``targets.shape[-1]``, raises.
        return_lse: also return lse (fp32, ``targets.shape``), differentiable.
        return_aux: also return the arg-max prediction (int64) and the entropy of softmax(z)
            (fp32), both ``targets.shape`` and not differentiable. Ties go to the lowest index;
            a token without any logit > -inf (all -inf or NaN) gets arg-max 0 on every device
            and path.
        filter_eps: gradient filtering: skip backward blocks where every |softmax - onehot| is
            below this (relative to the token's gradient weight); a NaN is never skipped. Blocks:
            CPU tiles (256 x 2048 by default), CUDA 64 x 128 logit tiles (every path and dtype).
            ``"auto"`` = eps(dtype)/32 for bf16/fp16 and no filtering for fp32; None = exact.
        accum_fp32: fp16/bf16 gradients are always accumulated in fp32 and rounded once. By
            default the CPU path does so with tile-sized buffers and a second pass over the
            logits for ``weight``'s gradient; ``accum_fp32=True`` keeps one (V, D) fp32 buffer
            instead (one pass: faster, V·D·4 bytes more). CUDA always uses fp32 accumulators.
        vocab_parallel: a :class:`VocabParallel` when ``weight``/``bias`` hold a vocabulary
            shard; see there.

            A ``weight`` / ``bias`` that is a ``DTensor`` (FSDP2's sharded parameter read outside
            its module's forward, or a tensor-parallel shard) is all-gathered here, never
            computed on as a shard; its gradient is every rank's gradient summed over the mesh
            (reduce-scatter) and divided by the mesh size -- FSDP2's and DDP's default
            data-parallel average (a custom FSDP gradient divide factor is not applied).
            ``hidden`` / ``targets`` must be this rank's local tensors. With ``vocab_parallel``
            a DTensor ``weight`` / ``bias`` is taken as this rank's vocabulary rows sharded over
            other (data-parallel) ranks and gathered likewise; one sharded over the
            ``vocab_parallel`` group itself raises.
        check: validate target values (a host sync on CUDA). With ``check=False`` the call and
            its backward never sync the host (vocab_parallel included).
        impl: ``"auto"``, ``"plain"`` (tiles through ATen GEMMs), ``"wmma"`` (CUDA fp16/bf16
            with D % 8 == 0 and 16-byte aligned rows, else the plain path: fused WMMA kernels;
            the backward accumulates with atomics, so it is not bitwise deterministic) or
            ``"tuned"`` (sm_90a: a CUTLASS TMA + wgmma forward with the log-sum-exp in its
            epilogue; WMMA elsewhere. Backward (sm_80 and later): atomic-free and bitwise
            deterministic, by vocabulary chunks: a tensor-core kernel recomputes the logits and
            writes dZ, then cuBLAS adds dZ @ W to dhidden and writes the chunk's dweight / dbias
            once; fp32, D % 8 != 0 or unaligned rows run the plain backward; unproven).
            ``"auto"`` picks ``"plain"`` (deterministic) when
            ``torch.use_deterministic_algorithms(True)`` is on; torch releases that still demand
            ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS then raise an error naming it
            (set it before the process starts). Until every CUDA variant has passed its tests on
            a GPU, ``"auto"`` on CUDA runs ``"plain"`` (see :mod:`tokenkernels.variants` for what ``"auto"`` runs on CUDA).
            ``"reference"``: :func:`tokenkernels.reference.cross_entropy.linear_cross_entropy`
            (pure PyTorch, materialises the logits; same arguments and outputs, every device).

        _divisor: internal (the HF loss patch): the loss divided by this number (a Python
            number or a one-element tensor; Trainer's ``num_items_in_batch``). On the CPU
            gradients-in-forward path it is folded into the per-token weights, so fp16/bf16
            gradients are rounded once.

    On the CPU, with reduction ``"mean"`` / ``"sum"``, gradients wanted (grad mode on, an input
    that requires grad) and no ``return_lse`` / ``return_aux`` / ``vocab_parallel``, fp32/fp64
    and bf16 (where oneDNN's bf16 micro-kernel runs: AVX512-BF16 or AMX) compute the gradients
    during the forward (csrc/cross_entropy/cross_entropy_fused_cpu.cpp), exactly (``filter_eps``
    and ``accum_fp32`` do not apply there); the backward then only scales them. The forward then
    costs what forward + backward cost (a loss computed with gradients enabled but never
    backpropagated pays for them: compute it under ``torch.no_grad()``).

    Returns:
        ``loss`` (fp32; fp64 for fp64 inputs, CPU only) alone, or a tuple ``(loss, lse?, argmax?, entropy?)`` with the parts
        asked for by ``return_lse`` / ``return_aux``, in that order.
    """
    softcap, eps, zl = _check_args(hidden, weight, targets, bias, reduction, softcap,
                                   label_smoothing, z_loss)
    ignore_index = _check_ignore_index(ignore_index)
    return_lse = _flag("return_lse", return_lse)
    return_aux = _flag("return_aux", return_aux)
    accum_fp32 = _flag("accum_fp32", accum_fp32)
    check = _flag("check", check)
    if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"tokenkernels.linear_cross_entropy: vocab_parallel must be a "
                        f"tokenkernels.VocabParallel or None, got {type(vocab_parallel).__name__}")
    weight, bias = _unwrap_dtensors(hidden, weight, targets, bias, vocab_parallel)
    if impl == "auto" and torch.are_deterministic_algorithms_enabled():
        impl = "plain"
    run = choose("cross_entropy", impl, hidden.device, "linear_cross_entropy")
    feps = _resolve_filter_eps(filter_eps, hidden.dtype)
    s = _resolve_shift(shift, targets)
    V = weight.shape[0]
    vp = vocab_parallel
    if vp is not None:
        for name in ("start", "stop"):
            x = getattr(vp, name)
            if isinstance(x, bool) or not isinstance(x, int) and not hasattr(x, "__index__"):
                raise TypeError(f"tokenkernels.linear_cross_entropy: vocab_parallel.{name} must "
                                f"be an int, got {type(x).__name__}")
        vp = VocabParallel(vp.group, operator.index(vp.start), operator.index(vp.stop))
        if vp.stop - vp.start != V or vp.start < 0 or vp.stop >= 2 ** 63:
            raise ValueError(f"tokenkernels.linear_cross_entropy: vocab_parallel covers "
                             f"[{vp.start}, {vp.stop}) but weight has {V} rows")
    if run == REFERENCE:
        res = _reference.linear_cross_entropy(
            hidden, weight, targets, bias, ignore_index=ignore_index, reduction=reduction,
            softcap=softcap, label_smoothing=eps, z_loss=zl, shift=s, return_lse=return_lse,
            return_aux=return_aux, filter_eps=feps, accum_fp32=accum_fp32, vocab_parallel=vp,
            check=check)
        if _divisor is None:
            return res
        return (res[0] / _divisor, *res[1:]) if isinstance(res, tuple) else res / _divisor
    if s:
        targets = _reference._shift_targets(targets, ignore_index, s)
    D = hidden.shape[-1]
    t1 = targets.reshape(-1)
    h2 = hidden.reshape(t1.shape[0], D)  # not (-1, D): D = 0 is valid (logits = bias)
    want_sumz = eps > 0.0

    if _fused_applies(h2, weight, bias, reduction, return_lse, return_aux, vp, softcap, eps):
        scale = 1.0 if _divisor is None else 1.0 / float(_divisor)  # CPU: no sync
        if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))):
            return torch.ops.tokenkernels._cross_entropy_fused(
                h2, weight, t1, bias, ignore_index, softcap, eps, zl, reduction == "mean",
                scale, check, feps, False, False, False)[0]
        # CPU, scalar loss, gradients wanted: loss and gradients in one call (fp32: 6·N·D·V
        # flops instead of 8; bf16: oneDNN's bf16 micro-kernel), the backward only scales them
        return _FusedLinearCrossEntropy.apply(h2, weight, t1, bias, ignore_index, softcap, eps,
                                              zl, reduction == "mean", scale, check, feps)
    if vp is None:
        lse, zt, sumz, argmax, _, ent = torch.ops.tokenkernels.cross_entropy_forward(
            h2, weight, t1, bias, ignore_index, softcap, 0, V, want_sumz, return_aux, check,
            feps, accum_fp32, run)
        v_total = V
    else:
        lse, zt, sumz, argmax, ent, v_total = _VocabParallelStats.apply(
            h2, weight, bias, t1, ignore_index, softcap, vp.start, want_sumz,
            return_aux, check, feps, accum_fp32, run, vp.group)

    valid = t1 != ignore_index
    loss = (lse - zt) if eps == 0.0 else (1.0 - eps) * (lse - zt) + eps * (lse - sumz / v_total)
    if zl:
        loss = loss + zl * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        out = loss.sum() / valid.sum().clamp(min=1).to(loss.dtype)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.reshape(targets.shape)
    if _divisor is not None:
        out = out / _divisor
    extras = []
    if return_lse:
        extras.append(lse.reshape(targets.shape))
    if return_aux:
        extras.append(argmax.reshape(targets.shape))
        extras.append(ent.reshape(targets.shape))
    return (out, *extras) if extras else out


class LinearCrossEntropy(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``forward(hidden, weight, targets, bias=None)``
    with the options fixed at construction (same keyword names and defaults)."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean",
                 softcap: Optional[float] = None, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, shift: Union[bool, int] = False, return_lse: bool = False,
                 return_aux: bool = False, filter_eps: Union[str, float, None] = "auto",
                 accum_fp32: bool = False, vocab_parallel: Optional[VocabParallel] = None,
                 check: bool = True, impl: str = "auto"):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                            label_smoothing=label_smoothing, z_loss=z_loss, shift=shift,
                            return_lse=return_lse, return_aux=return_aux, filter_eps=filter_eps,
                            accum_fp32=accum_fp32, vocab_parallel=vocab_parallel, check=check,
                            impl=impl)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return linear_cross_entropy(hidden, weight, targets, bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items()
                         if k != "vocab_parallel" or v is not None)
