"""Pure-PyTorch reference of :func:`tokenkernels.linear_cross_entropy` (the test oracle, and
``impl="reference"``).

It materialises the (N, V) logits, so it is only for checking and small shapes. Every step is
written out so the semantics can be read off directly:

    z      = hidden @ weight.T + bias                       (N, V), in hidden's dtype
    z      = softcap * tanh(z / softcap)                    if softcap
    lse    = logsumexp_v z                                  (float32; float64 for float64)
    loss_i = (1 - eps) (lse - z[t_i]) + eps (lse - mean_v z) + z_loss * lse^2
    loss_i = 0 where t_i == ignore_index

``reduction="mean"`` divides by the number of tokens not ignored (0 when there are none).
``shift=s`` (an int; True = 1) makes position i predict target i + s along the last target
dimension, i.e. ``hidden[..., :-s, :]`` predicts ``targets[..., s:]`` (the last s positions of
each row are ignored). Autograd through this function gives the reference gradients; computed
on float64 inputs it is the ground truth, on fp16/bf16 inputs it is what a plain ``F.linear`` +
``F.cross_entropy`` pipeline in that dtype computes.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch


def _shift_targets(targets: torch.Tensor, ignore_index: int, shift: int = 1) -> torch.Tensor:
    """Targets for ``shift=s``: out[..., i] = targets[..., i + s]; the last s columns ignored.
    ``0 <= s <= targets.shape[-1]`` (checked by the callers)."""
    s = int(shift)
    if s == 0 or targets.dim() == 0 or targets.shape[-1] == 0:
        return targets.clone()
    s = min(s, targets.shape[-1])
    pad = torch.full_like(targets[..., :s], ignore_index)
    return torch.cat([targets[..., s:], pad], dim=-1)


class _GatherShards(torch.autograd.Function):
    """The full (V_total, ...) tensor from every rank's vocabulary rows [start, stop). Every rank
    computes the same loss from it, so the gradient of a rank's shard is its rows of the full
    gradient (no reduction)."""

    @staticmethod
    def forward(ctx, x, start, stop, group):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        rng = torch.tensor([start, stop], dtype=torch.long, device=x.device)
        rngs = [torch.empty_like(rng) for _ in range(world)]
        dist.all_gather(rngs, rng, group=group)
        rngs = [tuple(int(v) for v in r) for r in rngs]
        rows = max(b - a for a, b in rngs)
        pad = x.new_zeros((rows,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad, group=group)
        total = sum(b - a for a, b in rngs)
        ends = [0] + [b for _, b in sorted(rngs)]
        if any(a != e for (a, _), e in zip(sorted(rngs), ends)):
            raise ValueError(f"tokenkernels.reference.linear_cross_entropy: the vocab_parallel "
                             f"shards {rngs} do not tile [0, {total})")
        full = x.new_empty((total,) + tuple(x.shape[1:]))
        for (a, b), p in zip(rngs, parts):
            full[a:b] = p[: b - a]
        ctx.rows = (start, stop)
        return full

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.rows
        return g[a:b], None, None, None


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
    vocab_parallel: Optional[Any] = None,
    check: bool = True,
):
    """Reference of :func:`tokenkernels.linear_cross_entropy`: the same arguments (but ``impl``:
    this is the implementation ``impl="reference"`` runs) and the same outputs, ``loss`` or
    ``(loss, lse?, argmax?, entropy?)``.

    The logits are computed in hidden's dtype (float64 inputs give the ground truth), the
    statistics and the loss in float32 (float64 for float64 inputs). ``filter_eps`` and
    ``accum_fp32`` are accepted and have no effect: the reference is exact (no gradient
    filtering) and its gradients are whatever autograd computes in the inputs' dtype.
    ``vocab_parallel``: ``weight`` / ``bias`` hold this rank's rows [start, stop); the shards
    are all-gathered into the full vocabulary (every rank passes the same hidden and targets),
    so the loss is the single-process loss, ``hidden.grad`` the full gradient and
    ``weight.grad`` / ``bias.grad`` this shard's rows. ``check``: a target neither
    ``ignore_index`` nor in [0, V) raises (one host sync); with ``check=False`` its token's loss
    is NaN. A token without any logit > -inf (all -inf or NaN) has arg-max 0.
    """
    del filter_eps, accum_fp32  # no effect on the exact reference
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"tokenkernels.reference.linear_cross_entropy: reduction must be "
                         f"'mean', 'sum' or 'none', got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"tokenkernels.reference.linear_cross_entropy: softcap must be > 0 "
                         f"(inf = no softcap) or None, got {softcap}")
    if softcap is not None and softcap == float("inf"):
        softcap = None
    if vocab_parallel is not None:
        vp = vocab_parallel
        weight = _GatherShards.apply(weight, vp.start, vp.stop, vp.group)
        if bias is not None:
            bias = _GatherShards.apply(bias, vp.start, vp.stop, vp.group)
    if shift:
        targets = _shift_targets(targets, ignore_index, int(shift))
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    D = hidden.shape[-1]
    V = weight.shape[0]
    t = targets.reshape(-1).long()
    h = hidden.reshape(t.shape[0], D)  # not (-1, D): D = 0 is valid
    z = torch.nn.functional.linear(h, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.to(out_dtype)  # (N, V)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= V))
    if check and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"tokenkernels.linear_cross_entropy: targets[{i}] = {int(t[i])} is "
                           f"outside [0, V={V}) and is not ignore_index ({ignore_index})")
    lse = torch.logsumexp(z, dim=-1)
    zt = z.gather(1, torch.where(valid & ~bad, t, 0).unsqueeze(1)).squeeze(1)
    zt = torch.where(bad, torch.full_like(zt, float("nan")), zt)
    loss = (1.0 - label_smoothing) * (lse - zt)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - z.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        out = loss.sum() / valid.sum().clamp(min=1).to(loss.dtype)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.reshape(targets.shape)
    extras = []
    if return_lse:
        extras.append(lse.reshape(targets.shape))
    if return_aux:
        with torch.no_grad():
            zn = torch.where(torch.isnan(z), torch.full_like(z, float("-inf")), z)
            am = torch.where((zn > float("-inf")).any(-1), zn.argmax(-1), torch.zeros_like(t))
            p = torch.softmax(z, dim=-1)
            ent = lse - (p * z).sum(-1)
            extras.append(am.reshape(targets.shape))
            extras.append(ent.reshape(targets.shape).to(out_dtype))
    return (out, *extras) if extras else out
