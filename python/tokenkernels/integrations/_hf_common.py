"""Small helpers shared by the HF transformers integrations (no transformers import at module load).

Version independence: the integrations use only public extension points (an instance's
``forward``, ``AttentionInterface`` / ``AttentionMaskInterface``, ``Cache.get_seq_length``,
``ModelOutput``) and pass every keyword they do not use through unchanged. The one name that
moved inside the supported range is the KV cache's: ``past_key_values`` up to 5.23, ``cache``
from 5.24 on (``past_key_values`` deprecated until 5.40). :func:`cache_from_kwargs`,
:func:`cache_of` and :func:`output_cache_field` read and write it under whichever name the
installed release uses.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import torch

# The supported transformers releases (README, pyproject's ``hf`` extra and CI test both ends).
MIN_TRANSFORMERS = (5, 17)
MAX_TRANSFORMERS_EXCLUSIVE = (6, 0)
TRANSFORMERS_RANGE = ">=5.17,<6"
CACHE_NAMES = ("cache", "past_key_values")   # newest first


def _version_tuple(v: str) -> Tuple[int, ...]:
    """(major, minor) of a version string such as '5.24.0', '5.25.0.dev0' or '6.0.0rc1'."""
    import re

    m = re.match(r"\s*(\d+)\.(\d+)", v)
    if m is None:
        raise RuntimeError(f"tokenkernels: cannot read the transformers version {v!r}")
    return int(m.group(1)), int(m.group(2))


def require_transformers():
    """Import transformers or raise a clear error; releases outside the supported range raise too."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("tokenkernels.integrations.transformers needs the `transformers` package "
                          f"(pip install 'transformers{TRANSFORMERS_RANGE}')") from e
    check_transformers_version(transformers.__version__)
    return transformers


def check_transformers_version(version: str) -> None:
    v = _version_tuple(version)
    if v < MIN_TRANSFORMERS:
        raise RuntimeError(f"tokenkernels.integrations.transformers needs transformers >= "
                           f"{'.'.join(map(str, MIN_TRANSFORMERS))} (found {version}; older releases are "
                           f"not tested and may differ in the attention-mask and cache APIs it uses); "
                           f"pip install 'transformers{TRANSFORMERS_RANGE}'")
    if v >= MAX_TRANSFORMERS_EXCLUSIVE:
        raise RuntimeError(f"tokenkernels.integrations.transformers supports transformers "
                           f"{TRANSFORMERS_RANGE} (found {version}), a major release it has not been "
                           f"tested with; pip install 'transformers{TRANSFORMERS_RANGE}'")


def cache_from_kwargs(kwargs: dict):
    """The KV cache a forward received, under either name (None when none was passed)."""
    for name in CACHE_NAMES:
        c = kwargs.get(name)
        if c is not None:
            return c
    return None


def cache_of(outputs) -> Any:
    """The KV cache of a model output (``outputs.cache`` from 5.24, ``past_key_values`` before),
    read without triggering transformers' deprecation warnings."""
    if outputs is None:
        return None
    if isinstance(outputs, dict):          # ModelOutput is an OrderedDict of its non-None fields
        for name in CACHE_NAMES:
            if name in outputs:
                return outputs[name]
        return None
    for name in CACHE_NAMES:
        c = getattr(outputs, name, None)
        if c is not None:
            return c
    return None


@functools.lru_cache(maxsize=None)
def output_cache_field(output_cls: type) -> str:
    """The field a ModelOutput class keeps the cache in (``cache`` or ``past_key_values``)."""
    fields = getattr(output_cls, "__dataclass_fields__", {})
    for name in CACHE_NAMES:
        if name in fields:
            return name
    raise TypeError(f"tokenkernels: {output_cls.__name__} has no cache field (looked for {CACHE_NAMES})")


def forward_cache_name(fn) -> str:
    """The keyword a model's forward takes the cache by (``cache`` from 5.24, else
    ``past_key_values``), from its signature (decorators that use functools.wraps are followed)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins / C callables
        return "past_key_values"
    for name in CACHE_NAMES:
        if name in params:
            return name
    return "past_key_values"


def current_forward(model: torch.nn.Module, attr: str):
    """The instance-level forward a patch stored under ``attr`` replaces: the one saved by an
    earlier patch of the same kind, else the instance's own (None = the class's forward)."""
    prev = getattr(model, attr, None)
    return prev.original_forward if prev is not None else model.__dict__.get("forward")


def restore_method(model: torch.nn.Module, attr: str, method: str) -> torch.nn.Module:
    """Undo an instance-level patch of ``model.<method>`` whose state (with
    ``original_<method>``: the instance's own attribute it replaced, None = the class's) is
    stored under ``attr``; a no-op when there is none."""
    st = model.__dict__.get(attr)
    if st is None:
        return model
    original = getattr(st, f"original_{method}")
    if original is None:
        model.__dict__.pop(method, None)
    else:
        setattr(model, method, original)
    delattr(model, attr)
    return model


def restore_forward(model: torch.nn.Module, attr: str) -> torch.nn.Module:
    """Undo a forward patch whose state (with ``original_forward``) is stored under ``attr``."""
    return restore_method(model, attr, "forward")


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
