"""Small helpers shared by the HF transformers integrations (no transformers import at module load)."""
from __future__ import annotations

from typing import Any, Optional

import torch


def require_transformers():
    """Import transformers or raise a clear error."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("tokenkernels.integrations.transformers needs the `transformers` package "
                          "(pip install 'transformers>=5.23,<6')") from e
    return transformers


def current_forward(model: torch.nn.Module, attr: str):
    """The instance-level forward a patch stored under ``attr`` replaces: the one saved by an
    earlier patch of the same kind, else the instance's own (None = the class's forward)."""
    prev = getattr(model, attr, None)
    return prev.original_forward if prev is not None else model.__dict__.get("forward")


def restore_forward(model: torch.nn.Module, attr: str) -> torch.nn.Module:
    """Undo a forward patch whose state (with ``original_forward``) is stored under ``attr``."""
    st = model.__dict__.get(attr)
    if st is None:
        return model
    if st.original_forward is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = st.original_forward
    delattr(model, attr)
    return model


def slice_hidden(hidden: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    """HF's ``logits_to_keep`` slicing of the last hidden states (int: the last n positions,
    0 = all; a 1-D tensor: these positions; a 2-D bool mask: the True positions, flattened)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() == 2 and logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        if logits_to_keep.dim() == 2:
            return torch.gather(hidden, 1, logits_to_keep[..., None].expand(-1, -1, hidden.shape[-1]))
        return hidden[:, logits_to_keep, :]
    raise TypeError(f"logits_to_keep must be an int or a tensor, got {type(logits_to_keep).__name__}")


def wants_tuple(model: torch.nn.Module, return_dict: Optional[bool]) -> bool:
    """HF's return_dict rule: the call's value, else the config's."""
    if return_dict is not None:
        return not return_dict
    cfg = getattr(model, "config", None)
    return not getattr(cfg, "return_dict", True)


def model_type(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", "") or ""
