"""HF transformers plumbing of :mod:`tokenkernels.spec`: forwards over token trees and KV commits.

A tree forward feeds m new tokens (tree nodes) to a model whose KV cache holds L slots. Token x
attends the prefix slots its ``prefix_mask`` allows and the new tokens its ``anc`` row allows
(itself and its ancestors), at position ``positions[b, x]``. It runs with the model's attention
implementation temporarily set to ``"tokenkernels_tree"`` (registered with HF's
``AttentionInterface``), which

* when every prefix slot is visible to every new token of every row and a bit-packed tree mask is
  given (batch 1, no padding: the common case) calls :func:`tokenkernels.tree.attention` on the
  cache tensors in place (``transpose(1, 2)`` views, no copy, no dense mask);
* otherwise (left padding, holes left by rows that accepted fewer tokens, draft-model levels that
  see only part of the earlier nodes, logit softcapping, attention sinks) builds the
  (B, 1, m, N) boolean mask once per forward and calls HF's SDPA (or the model's eager attention
  where SDPA cannot, e.g. softcap) with it: the 4-D mask fallback.

The model receives a 4-D ``attention_mask`` placeholder, which HF's mask builders return as it
is, so no causal mask is built for a tree forward.

:func:`commit` keeps the KV of the accepted nodes: it moves them (per row) to the slots right
after the prefix and drops the rest, for ``DynamicCache`` and ``StaticCache`` layers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import weakref
from typing import Optional

import torch

NAME = "tokenkernels_tree"
_STATE: Optional["TreeStep"] = None
_REGISTERED = False


@dataclasses.dataclass
class TreeStep:
    """One tree forward (see the module docstring). ``prefix_mask`` (B, L) or (B, m, L) bool;
    ``anc`` (B, m, m) bool, or None to unpack it (with the diagonal) from ``packed`` only if the
    4-D mask path runs; ``packed`` (B, m, W) int32 or None; ``tree_lens`` (B,) or None."""
    L: int
    prefix_mask: torch.Tensor
    anc: Optional[torch.Tensor]
    packed: Optional[torch.Tensor] = None
    tree_lens: Optional[torch.Tensor] = None
    fast: bool = False
    fast_calls: int = 0
    dense_calls: int = 0
    _mask: Optional[torch.Tensor] = None

    def dense_mask(self, N: int) -> torch.Tensor:
        """(B, 1, m, N) bool, True = attend (built once per forward, shared by the layers)."""
        if self._mask is None or self._mask.shape[-1] != N:
            if self.anc is None:
                from ..reference.tree import unpack_bits

                m = self.packed.shape[1]
                self.anc = unpack_bits(self.packed, m) | torch.eye(m, dtype=torch.bool, device=self.packed.device)
            B, m, _ = self.anc.shape
            pm = self.prefix_mask
            if pm.dim() == 2:
                pm = pm[:, None, :].expand(B, m, self.L)
            parts = [pm, self.anc]
            if N > self.L + m:
                parts.append(torch.zeros(B, m, N - self.L - m, dtype=torch.bool, device=pm.device))
            # every query row sees at least itself (padding nodes too): never an all-masked row
            self._mask = torch.cat(parts, -1)[:, None]
        return self._mask


def _eager_for(module):
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def tree_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """HF attention function of a tree forward: query (B, H_q, m, D), key/value the cache after
    the update (B, H_kv, N, D); returns ((B, m, H_q, D), None)."""
    st = _STATE
    if st is None:
        raise RuntimeError("tokenkernels.spec: the tree attention was called outside a tree forward")
    B, Hq, m, D = query.shape
    N = key.shape[2]
    softcap = kwargs.get("softcap")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("tokenkernels.spec: sliding-window attention layers are not supported")
    plain = (softcap is None and kwargs.get("s_aux") is None and value.shape[-1] == D
             and not (dropout > 0.0 and module.training) and not kwargs.get("output_attentions", False))
    if st.fast and plain and st.packed is not None:
        from .. import tree

        prefix = torch.full((B,), st.L, dtype=torch.long, device=query.device)
        out = tree.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), prefix,
                             st.packed, tree_lens=st.tree_lens, scale=scaling, check=False)
        st.fast_calls += 1
        return out, None
    st.dense_calls += 1
    mask = st.dense_mask(N)
    if softcap is not None or kwargs.get("s_aux") is not None:
        eager = _eager_for(module)
        if eager is None:
            raise ValueError("tokenkernels.spec: this attention layer needs the model's eager_attention_forward")
        add = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, add, dropout=dropout, scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from ..integrations._hf_common import require_transformers

    require_transformers()
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, tree_attention_forward)
    _REGISTERED = True


_PER_MODEL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _attn_configs(model):
    """The configs the attention layers read ``_attn_implementation`` from (cached per model)."""
    got = _PER_MODEL.get(model)
    if got is None:
        got = _PER_MODEL[model] = _find_attn_configs(model)
    return got


def _find_attn_configs(model):
    seen = {}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if hasattr(mod, "layer_idx") and cfg is not None and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    cfg = getattr(model, "config", None)
    if cfg is not None:
        seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def _tree_mode(model, step: TreeStep):
    global _STATE
    register()
    cfgs = _attn_configs(model)
    saved = [c.__dict__.get("_attn_implementation_internal") for c in cfgs]
    prev = _STATE
    _STATE = step
    try:
        for c in cfgs:
            c.__dict__["_attn_implementation_internal"] = NAME
        yield step
    finally:
        for c, s in zip(cfgs, saved):
            c.__dict__["_attn_implementation_internal"] = s
        _STATE = prev


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls) -> str:
    from ..integrations._hf_common import forward_cache_name

    return forward_cache_name(cls.forward)


def cache_kwarg(model) -> str:
    """The keyword the model's forward takes its cache by (``cache`` / ``past_key_values``)."""
    return _cache_kwarg_of(type(model))


def forward_tree(model, cache, step: TreeStep, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Run ``model`` over ``tokens`` (B, m) as a tree forward; returns fp32 logits (B, m, V).
    The cache gains m slots (L .. L + m - 1)."""
    B, m = tokens.shape
    placeholder = torch.ones(B, 1, m, 1, dtype=torch.bool, device=tokens.device)
    with _tree_mode(model, step):
        out = model(input_ids=tokens, position_ids=positions, attention_mask=placeholder,
                    use_cache=True, **{cache_kwarg(model): cache})
    return out.logits.float()


def forward_prefill(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    all_positions: bool = False) -> torch.Tensor:
    """The prompt through ``model`` with its own attention (HF's masks, left padding as in
    ``generate``); returns fp32 logits of the last position (B, V), or of every position
    (B, L, V) with ``all_positions``."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
                logits_to_keep=0 if all_positions else 1, **{cache_kwarg(model): cache})
    return out.logits.float() if all_positions else out.logits[:, -1].float()


def cache_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"tokenkernels.spec: cache {type(cache).__name__} has no layers (a transformers >= 5 Cache)")
    return layers


def check_cache(cache) -> None:
    """Only full-attention DynamicCache / StaticCache layers can be committed."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    for i, layer in enumerate(cache_layers(cache)):
        if getattr(layer, "is_sliding", False) or not isinstance(layer, (DynamicLayer, StaticLayer)):
            raise ValueError(f"tokenkernels.spec: cache layer {i} is a {type(layer).__name__}; only full-attention "
                             f"DynamicCache / StaticCache layers are supported (no sliding-window, quantized or "
                             f"linear-attention layers)")


def cache_len(cache) -> int:
    return int(cache.get_seq_length())


def crop_layer(layer, remove: int) -> None:
    """Drop the last ``remove`` slots of a cache layer. The ``StaticLayer`` of transformers
    5.17 / 5.18 has no ``crop`` (later releases add it): there the layer's length is the
    ``cumulative_length`` counter that the later ``crop`` lowers."""
    if hasattr(layer, "crop"):
        layer.crop(-remove)
    elif hasattr(layer, "cumulative_length"):
        layer.cumulative_length.sub_(remove)
    else:
        raise TypeError(f"tokenkernels.spec: cannot crop a cache layer of type {type(layer).__name__}")


def commit(cache, L: int, keep: torch.Tensor) -> None:
    """Keep, per row b, the slots ``L + keep[b, j]`` (j = 0 .. A-1; ``keep`` (B, A) int64 offsets
    into the slots after the prefix, any valid offset for a row's unused entries) at slots
    ``L + j``, and shorten every layer to ``L + A`` slots."""
    A = keep.shape[1]
    identity = A == 0 or bool((keep == torch.arange(A, device=keep.device)).all())
    for layer in cache_layers(cache):
        if not getattr(layer, "is_initialized", True) or getattr(layer, "keys", None) is None:
            continue
        cur = int(layer.get_seq_length())
        if not identity:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                Bt, H, _, D = t.shape
                idx = (L + keep).to(t.device)[:, None, :, None].expand(Bt, H, A, D)
                t[:, :, L:L + A] = torch.gather(t, 2, idx)
        remove = cur - (L + A)
        if remove > 0:
            crop_layer(layer, remove)
        elif remove < 0:
            raise RuntimeError(f"tokenkernels.spec: cache holds {cur} slots, cannot commit {L} + {A}")
