"""Pure-PyTorch reference of the fused linear cross-entropy (the test oracle).

It materialises the (N, V) logits, so it is only for checking and small shapes. Every step is
written out so the semantics can be read off directly:

    z      = hidden @ weight.T + bias                       (N, V)
    z      = softcap * tanh(z / softcap)                    if softcap
    lse    = logsumexp_v z
    loss_i = (1 - eps) (lse - z[t_i]) + eps (lse - mean_v z) + z_loss * lse^2
    loss_i = 0 where t_i == ignore_index

``reduction="mean"`` divides by the number of tokens not ignored (0 when there are none).
``shift=s`` (an int; True = 1) makes position i predict target i + s along the last target
dimension, i.e. ``hidden[..., :-s, :]`` predicts ``targets[..., s:]`` (the last s positions of
each row are ignored). Autograd through this function gives the reference gradients.
"""
from __future__ import annotations

from typing import Optional, Union

import torch


def shift_targets(targets: torch.Tensor, ignore_index: int, shift: int = 1) -> torch.Tensor:
    """Targets for ``shift=s``: out[..., i] = targets[..., i + s]; the last s columns ignored.
    ``0 <= s <= targets.shape[-1]`` (checked by the callers)."""
    s = int(shift)
    if s == 0 or targets.dim() == 0 or targets.shape[-1] == 0:
        return targets.clone()
    s = min(s, targets.shape[-1])
    pad = torch.full_like(targets[..., :s], ignore_index)
    return torch.cat([targets[..., s:], pad], dim=-1)


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           softcap: Optional[float] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """z = softcap(hidden @ weight.T + bias) in ``dtype`` (default: hidden's dtype)."""
    dtype = dtype or hidden.dtype
    z = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype),
                                   None if bias is None else bias.to(dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


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
    dtype: Optional[torch.dtype] = None,
):
    """Reference of :func:`tokenkernels.linear_cross_entropy` (same arguments and outputs).

    ``dtype`` is the compute dtype of the logits (default: hidden's dtype, i.e. what a plain
    ``F.linear`` + ``F.cross_entropy`` pipeline computes; ``torch.float64`` gives ground truth).
    The loss and lse are returned in float32 (float64 when dtype is float64).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if shift:
        targets = shift_targets(targets, ignore_index, int(shift))
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    D = hidden.shape[-1]
    V = weight.shape[0]
    t = targets.reshape(-1).long()
    h = hidden.reshape(t.shape[0], D)  # not (-1, D): D = 0 is valid
    z = logits(h, weight, bias, softcap, dtype).to(out_dtype)  # (N, V)
    valid = t != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    zt = z.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
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
            p = torch.softmax(z, dim=-1)
            ent = lse - (p * z).sum(-1)
            extras.append(z.argmax(-1).reshape(targets.shape))
            extras.append(ent.reshape(targets.shape).to(out_dtype))
    return (out, *extras) if extras else out
