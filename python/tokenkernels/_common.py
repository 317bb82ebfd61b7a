"""Small argument helpers shared by the op wrappers and the references."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

IntOrTensor = Union[int, torch.Tensor]


def as_batch(x: torch.Tensor, name: str, op: str) -> Tuple[torch.Tensor, bool]:
    """(N, D) -> (1, N, D); (B, N, D) unchanged. Returns the 3-D tensor and whether to squeeze."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tokenkernels.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        return x.unsqueeze(0), True
    if x.dim() == 3:
        return x, False
    raise ValueError(f"tokenkernels.{op}: {name} must be 2-D (N, D) or 3-D (B, N, D), got shape {tuple(x.shape)}")


def split_k(k: IntOrTensor, B: int, device: torch.device, op: str,
            k_max: Optional[int] = None) -> Tuple[int, Optional[torch.Tensor]]:
    """k as an int, or a (B,) tensor of per-item counts -> (k_max, per-item tensor or None).

    With a tensor k and no ``k_max`` this reads k.max() back to the host (one sync)."""
    if isinstance(k, bool):
        raise TypeError(f"tokenkernels.{op}: k must be an int or an integer tensor, got bool")
    if isinstance(k, int):
        if k < 0:
            raise ValueError(f"tokenkernels.{op}: k must be >= 0, got {k}")
        return k, None
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"tokenkernels.{op}: k must be an int or an integer tensor, got {type(k).__name__}")
    if k.dtype.is_floating_point or k.dtype == torch.bool:
        raise TypeError(f"tokenkernels.{op}: k must be an integer tensor, got {k.dtype}")
    if k.dim() == 0:
        if k_max is None:
            return split_k(int(k), B, device, op, k_max)
        # with k_max given, a 0-d tensor stays on its device (no host sync): one k for every item
        k = k.reshape(1).expand(B)
    if k.shape != (B,):
        raise ValueError(f"tokenkernels.{op}: k must be an int or have shape ({B},), got {tuple(k.shape)}")
    k = k.to(device=device, dtype=torch.long)
    if k_max is None:
        k_max = int(k.max()) if B > 0 else 0
        if k_max < 0:
            raise ValueError(f"tokenkernels.{op}: k must be >= 0, got {k.tolist()}")
    return int(k_max), k


def per_item(t: Optional[torch.Tensor], B: int, name: str, op: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"tokenkernels.{op}: {name} must be an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1)
    if t.shape != (B,):
        raise ValueError(f"tokenkernels.{op}: {name} must have shape ({B},), got {tuple(t.shape)}")
    return t.to(torch.long)


def mask_2d(t: Optional[torch.Tensor], B: int, N: int, squeeze: bool, name: str, op: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
        raise TypeError(f"tokenkernels.{op}: {name} must be a bool tensor")
    if squeeze and t.dim() == 1:
        t = t.unsqueeze(0)
    if t.shape != (B, N):
        raise ValueError(f"tokenkernels.{op}: {name} must have shape ({B}, {N}), got {tuple(t.shape)}")
    return t


def valid_mask(B: int, N: int, lengths: Optional[torch.Tensor], exclude: Optional[torch.Tensor],
               device: torch.device) -> torch.Tensor:
    """valid[b, j] = j < lengths[b] and not exclude[b, j]."""
    valid = torch.ones(B, N, dtype=torch.bool, device=device)
    if lengths is not None:
        valid &= torch.arange(N, device=device).unsqueeze(0) < lengths.to(device).unsqueeze(1)
    if exclude is not None:
        valid &= ~exclude.to(device)
    return valid
