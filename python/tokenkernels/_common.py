"""Small argument helpers of the wrappers and references: Python-type guards shared by every
family (:func:`as_bool`, :func:`as_int`), and the kcenter family's type conversions (ints,
lists, 2-D inputs, start rules -> what the schema takes). Shapes are checked by the ops
themselves (csrc/kcenter/kcenter_args.h); the pure-PyTorch references check them with
:func:`require_shape`, with the same messages."""
from __future__ import annotations

import operator
from typing import Optional, Tuple, Union

import torch

IntOrTensor = Union[int, torch.Tensor]

_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1


def _is_bool(value) -> bool:
    """A Python bool or a numpy bool (numpy.bool_), without importing numpy."""
    return isinstance(value, bool) or (type(value).__name__ in ("bool_", "bool")
                                       and type(value).__module__ == "numpy")


def as_bool(value, name: str, op: str) -> bool:
    """A bool option (check, sorted, return_*) as a Python bool. ``True`` / ``False`` (or a numpy
    bool) only: anything else -- 1, "yes", None, a tensor -- is a TypeError naming the argument
    (``bool("no")`` would silently be True)."""
    if _is_bool(value):
        return bool(value)
    raise TypeError(f"tokenkernels.{op}: {name} must be a bool, got {type(value).__name__}")


def as_int(value, name: str, op: str) -> int:
    """An int argument (the schema's ``int``) as a Python int: a Python or numpy integer or a 0-d
    integer tensor (read on the host: a sync for a CUDA tensor), not a bool -- else a TypeError;
    a value outside int64 is a ValueError naming the argument (the schema cannot take it)."""
    if _is_bool(value) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"tokenkernels.{op}: {name} must be an integer, got {type(value).__name__} {value!r}")
    try:
        v = operator.index(value)
    except (TypeError, RuntimeError, ValueError):
        raise TypeError(f"tokenkernels.{op}: {name} must be an integer, got {type(value).__name__} "
                        f"{value!r}") from None
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"tokenkernels.{op}: {name} must fit in int64, got {v}")
    return v


def as_int_min(value, lo: int, name: str, op: str, *, none_ok: bool = False) -> Optional[int]:
    """:func:`as_int`, and at least ``lo`` (else a ValueError naming the argument); None passes
    through when ``none_ok``."""
    if value is None and none_ok:
        return None
    v = as_int(value, name, op)
    if v < lo:
        raise ValueError(f"tokenkernels.{op}: {name} must be >= {lo}{' or None' if none_ok else ''}, got {v}")
    return v


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
    if k_max is not None:
        k_max = as_int(k_max, "k_max", op)
    if _is_bool(k):
        raise TypeError(f"tokenkernels.{op}: k must be an int or an integer tensor, got {type(k).__name__}")
    if not isinstance(k, torch.Tensor) and hasattr(k, "__index__"):   # int, NumPy integer
        k = as_int(k, "k", op)
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
    k = k.to(device=device, dtype=torch.long)   # (its shape: checked by the op)
    if k_max is None:
        k_max = int(k.max()) if k.numel() > 0 else 0
        if k_max < 0:
            raise ValueError(f"tokenkernels.{op}: k must be >= 0, got {k.tolist()}")
    return int(k_max), k


def per_item(t: Optional[torch.Tensor], B: int, name: str, op: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):   # an int or a sequence of ints
        if _is_bool(t) or isinstance(t, (str, bytes)):
            raise TypeError(f"tokenkernels.{op}: {name} must be an integer tensor, got {type(t).__name__}")
        if hasattr(t, "__index__"):
            t = as_int(t, name, op)
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            if "verflow" in str(e):
                raise ValueError(f"tokenkernels.{op}: {name} must fit in int64, got {t!r}") from None
            raise TypeError(f"tokenkernels.{op}: {name} must be an integer tensor, got "
                            f"{type(t).__name__}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"tokenkernels.{op}: {name} must be an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1)
    return t.to(torch.long)


def mask_2d(t: Optional[torch.Tensor], B: int, N: int, squeeze: bool, name: str, op: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
        raise TypeError(f"tokenkernels.{op}: {name} must be a bool tensor")
    if squeeze and t.dim() == 1:
        t = t.unsqueeze(0)
    return t


def require_shape(t: Optional[torch.Tensor], shape: Tuple[int, ...], name: str, op: str,
                  what: str = "have shape") -> Optional[torch.Tensor]:
    """The ops' shape check (csrc/kcenter/kcenter_args.h), for the pure-PyTorch references."""
    if t is not None and tuple(t.shape) != tuple(shape):
        want = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"tokenkernels.{op}: {name} must {what} {want}, got {list(t.shape)}")
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


def resolve_start(start, x3: torch.Tensor, lengths: Optional[torch.Tensor],
                  exclude: Optional[torch.Tensor], generator: Optional[torch.Generator]):
    """kcenter's start rule -> None (isolated) or a (B,) int64 tensor of forced first picks on
    x3's device (the op and its reference draw the same random starts from one generator)."""
    B, N = x3.shape[0], x3.shape[1]
    if isinstance(start, str):
        if start == "isolated":
            return None
        if start in ("first", "random") and (
                (lengths is not None and tuple(lengths.shape) != (B,))
                or (exclude is not None and tuple(exclude.shape) != (B, N))):
            # no valid-token mask to draw from: the op rejects these shapes, naming them
            return torch.zeros(B, dtype=torch.long, device=x3.device)
        if start == "first":
            # index 0 of the valid tokens: with `exclude`, the first token not excluded
            if exclude is None or N == 0:   # (argmax over no tokens is an error; any start is)
                return torch.zeros(B, dtype=torch.long, device=x3.device)
            return valid_mask(B, N, lengths, exclude, x3.device).to(torch.int8).argmax(1)
        if start == "random":
            # uniform over valid tokens: arg-max of i.i.d. uniforms, invalid tokens masked out.
            u = torch.rand((B, N), generator=generator, device=x3.device)
            u = u.masked_fill(~valid_mask(B, N, lengths, exclude, x3.device), -1.0)
            return u.argmax(1) if N > 0 else torch.zeros(B, dtype=torch.long, device=x3.device)
        raise ValueError(f"tokenkernels.kcenter: start must be 'isolated', 'first', 'random' or an "
                         f"index tensor, got {start!r}")
    if not isinstance(start, torch.Tensor) and not _is_bool(start) and hasattr(start, "__index__"):
        start = torch.full((B,), as_int(start, "start", "kcenter"), dtype=torch.long, device=x3.device)
    if not isinstance(start, torch.Tensor):
        raise TypeError(f"tokenkernels.kcenter: start must be a str or an index tensor, got {type(start).__name__}")
    return per_item(start.to(x3.device), B, "start", "kcenter")
