"""TokenSelect decode attention for HF transformers, registered as ``"tokenselect"`` with HF's
``AttentionInterface`` (and ``AttentionMaskInterface``, with SDPA's mask).

Per attention call:

* prefill / chunks (q_len > 1), caches no longer than the budget (n_sink + k + n_local), training
  with dropout, and features the sparse kernels do not have (attention-logit softcapping,
  attention sinks, paged caches; on CUDA head_dim > 256 or more than 16 query heads per KV
  head) -> HF's SDPA (or eager where SDPA cannot, e.g. softcap);
* a decode step (q_len == 1) over a longer cache -> ``kv_select`` scoring + top-k (through a
  per-layer :class:`~tokenkernels.kv_select.SelectionCache`) and ``sparse_decode`` over the
  selected tokens, reading HF's (B, H_kv, N, D) cache tensors in place through a
  ``transpose(1, 2)`` view (no copy).

Padding (a 4-D mask on a decode step): masked positions are passed to ``kv_select.select`` as
``valid=False``: they take no part in the criticality softmax and are never selected, so a
left-padded row attends only its own tokens (its sink slots may fall on padding and then stay
unused). Sliding-window layers keep their window the same way.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Dict, Optional

import torch

from ._hf_common import require_transformers

NAME = "tokenselect"
# keywords with which HF's paged / continuous-batching path (packed varlen queries) calls an
# attention function: ``cache`` (<= 5.23), ``read_index``/``write_index``, ``cu_seq_lens_q``
_PAGED_KWARGS = ("cache", "read_index", "write_index", "cu_seq_lens_q")
# limits of the CUDA sparse kernels (csrc/include/tokenkernels/kv_select.h): beyond them a CUDA
# decode step falls back to dense attention instead of raising
CUDA_MAX_HEAD_DIM = 256
CUDA_MAX_GROUP = 16
_ATTR = "_tokenkernels_tokenselect"


@dataclasses.dataclass
class _LayerStats:
    sparse_steps: int = 0
    dense_steps: int = 0
    last_attended: Optional[torch.Tensor] = None   # (B,) tokens attended at the last sparse step


@dataclasses.dataclass
class _TokenSelect:
    k: int
    n_sink: int
    n_local: int
    cache_threshold: float
    score_scale: float
    sparse_min_len: int                       # decode steps with N > this use the sparse path
    previous_impl: object
    caches: Dict[int, object] = dataclasses.field(default_factory=dict)
    stats: Dict[int, _LayerStats] = dataclasses.field(default_factory=dict)

    @property
    def budget(self) -> int:
        return self.n_sink + self.k + self.n_local


def _dense(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("softcap") is not None:
        # SDPA has no logit softcapping (Gemma 2): the model's own eager attention does
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise ValueError("tokenselect attention: softcap needs the model's eager_attention_forward")
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # our masks are SDPA's (bool, True = attend); eager adds the mask to the logits
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device
                                         ).masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _valid_from_mask(attention_mask: torch.Tensor, B: int, N: int) -> torch.Tensor:
    """(B, N) bool: positions the single decode query may attend, from HF's 4-D mask."""
    m = attention_mask[:, 0, -1, :N] if attention_mask.dim() == 4 else attention_mask[..., :N]
    if m.dtype != torch.bool:
        m = m == 0                      # additive mask: 0 = attend, a large negative = masked
    return m.expand(B, N)


def tokenselect_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                  scaling=None, **kwargs):
    """HF attention function (``query`` (B, H_q, q_len, D), ``key``/``value`` the full cache
    (B, H_kv, N, D)); returns ``(attn_output (B, q_len, H_q, D), None)``."""
    st: Optional[_TokenSelect] = getattr(module, _ATTR, None)
    B, Hq, q_len, D = query.shape
    N = key.shape[2]
    layer = getattr(module, "layer_idx", 0)
    if st is not None and q_len > 1:
        c = st.caches.get(layer)          # a new prompt (or chunk): forget the previous queries
        if c is not None:
            c.reset()
    sparse = (st is not None and q_len == 1 and N > max(st.sparse_min_len, 0)
              and not (dropout > 0.0 and module.training)
              and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
              and not any(kwargs.get(name) is not None for name in _PAGED_KWARGS)
              and value.shape[-1] == D
              and not kwargs.get("output_attentions", False)
              and (query.device.type != "cuda"
                   or (D <= CUDA_MAX_HEAD_DIM and Hq <= CUDA_MAX_GROUP * key.shape[1])))
    if not sparse:
        if st is not None:
            st.stats.setdefault(layer, _LayerStats()).dense_steps += int(q_len == 1)
        return _dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    from .. import kv_select

    q = query[:, :, 0, :].contiguous()                          # (B, H_q, D)
    kc = key.transpose(1, 2)                                    # (B, N, H_kv, D) view of the cache
    vc = value.transpose(1, 2)
    seq_lens = torch.full((B,), N, dtype=torch.int32, device=query.device)
    cache = st.caches.get(layer)
    if cache is None:
        cache = st.caches[layer] = kv_select.SelectionCache(threshold=st.cache_threshold)
    # check=False: seq_lens is the cache length itself and the indices come from topk, so the
    # value checks could not fail -- on CUDA they would cost a host sync per layer and step
    # (and rule out CUDA graphs). The CPU validates anyway.
    # Padding / windows (a mask): masked tokens are neither in the criticality softmax nor
    # selected (select's valid=).
    valid = None if attention_mask is None else _valid_from_mask(attention_mask, B, N)
    idx = kv_select.select(q, kc, seq_lens, k=st.k, n_sink=st.n_sink, n_local=st.n_local,
                           scale=st.score_scale, cache=cache, valid=valid, check=False)
    out = kv_select.sparse_decode(q, kc, vc, idx, seq_lens, scale=scaling, check=False)   # (B, H_q, D)
    ls = st.stats.setdefault(layer, _LayerStats())
    ls.sparse_steps += 1
    ls.last_attended = (idx >= 0).sum(1)
    return out.unsqueeze(1), None


def _register() -> None:
    require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, tokenselect_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _attention_modules(model):
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "num_key_value_groups"):
            yield mod


def enable_tokenselect_attention(model: torch.nn.Module, *, k: int = 2048, n_sink: int = 128,
                                 n_local: int = 512, cache_threshold: float = 0.9,
                                 score_scale: float = 1.0,
                                 sparse_min_len: Optional[int] = None) -> torch.nn.Module:
    """Switch ``model``'s attention to TokenSelect decoding (in place).

    Args:
        k, n_sink, n_local: per decode step and layer, attend the first ``n_sink`` and last
            ``n_local`` cached tokens plus the ``k`` most critical ones in between
            (``kv_select.select``: per-head softmax of ``score_scale * q.k``, summed over heads).
        cache_threshold: Selection Cache threshold (reuse the previous step's picks when the
            cosine similarity of consecutive queries exceeds it; > 1 disables reuse).
        sparse_min_len: decode steps over caches longer than this use the sparse path (default:
            the budget ``n_sink + k + n_local``, below which sparse attention would attend every
            token anyway). ``0`` forces the sparse kernels for every decode step.

    Returns the model. :func:`tokenselect_stats` reports hit rates and attended-token counts;
    :func:`disable_tokenselect_attention` restores the previous attention implementation.
    """
    for name, v in (("k", k), ("n_sink", n_sink), ("n_local", n_local)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"tokenkernels.enable_tokenselect_attention: {name} must be an int >= 0, got {v!r}")
    _register()
    mods = list(_attention_modules(model))
    if not mods:
        raise ValueError(f"tokenkernels.enable_tokenselect_attention: no HF attention layers (modules with "
                         f"layer_idx and num_key_value_groups) found in {type(model).__name__}")
    prev = getattr(model, _ATTR, None)
    previous_impl = prev.previous_impl if prev is not None else model.config._attn_implementation
    budget = n_sink + k + n_local
    st = _TokenSelect(k=k, n_sink=n_sink, n_local=n_local, cache_threshold=float(cache_threshold),
                      score_scale=float(score_scale),
                      sparse_min_len=budget if sparse_min_len is None else int(sparse_min_len),
                      previous_impl=previous_impl)
    for mod in mods:
        setattr(mod, _ATTR, st)
    setattr(model, _ATTR, st)
    model.set_attn_implementation(NAME)
    return model


def disable_tokenselect_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable_tokenselect_attention` (a no-op if it is not enabled)."""
    st = model.__dict__.get(_ATTR)
    if st is None:
        return model
    for mod in _attention_modules(model):
        mod.__dict__.pop(_ATTR, None)
    delattr(model, _ATTR)
    model.set_attn_implementation(st.previous_impl or "sdpa")
    return model


def tokenselect_stats(model: torch.nn.Module) -> dict:
    """Selection Cache hits / lookups (summed over layers and requests), the hit rate, sparse and
    dense decode steps (summed over layers), and per layer the tokens each request attended at
    its last sparse step. Reading it syncs the device."""
    st = model.__dict__.get(_ATTR)
    if st is None:
        raise ValueError("tokenkernels.tokenselect_stats: TokenSelect attention is not enabled on this model")
    hits = sum(int(c.hit_count) for c in st.caches.values())
    lookups = sum(int(c.lookup_count) for c in st.caches.values())
    return dict(hits=hits, lookups=lookups, hit_rate=(hits / lookups) if lookups else 0.0,
                sparse_steps=sum(s.sparse_steps for s in st.stats.values()),
                dense_steps=sum(s.dense_steps for s in st.stats.values()),
                budget=st.budget,
                last_attended={l: s.last_attended.tolist() for l, s in sorted(st.stats.items())
                               if s.last_attended is not None})


def reset_tokenselect_stats(model: torch.nn.Module) -> None:
    """Zero the counters and forget the Selection Caches' previous queries."""
    st = model.__dict__.get(_ATTR)
    if st is None:
        return
    st.caches.clear()
    st.stats.clear()
