"""TokenSelect attention for HF transformers, registered as ``"tokenselect"`` with HF's
``AttentionInterface`` (and ``AttentionMaskInterface``, with SDPA's mask).

Per attention call:

* prefill / chunks (q_len > 1) -> HF's SDPA, unless ``prefill_chunk`` is set (chunked sparse
  prefill, below); caches no longer than the budget (n_sink + k + n_local), training
  with dropout, and features the sparse kernels do not have (attention-logit softcapping,
  attention sinks, paged caches; on CUDA head_dim > 256 or more than 16 query heads per KV
  head) -> HF's SDPA (or eager where SDPA cannot, e.g. softcap);
* a decode step (q_len == 1) over a longer cache -> ``kv_select`` scoring + top-k (through a
  per-layer :class:`~tokenkernels.kv_select.SelectionCache`) and ``sparse_decode`` over the
  selected tokens, reading HF's (B, H_kv, N, D) cache tensors in place through a
  ``transpose(1, 2)`` view (no copy).

Chunked sparse prefill (``prefill_chunk=C``): a call with q_len > 1 splits its queries into
chunks of C rows. The query rows are the last q_len keys (with a cache: after the cached
prefix; a StaticCache hands max_cache_len keys with the unfilled tail masked, and HF's mask
gives where the filled part ends; without a mask SDPA's top-left causal alignment holds). For a
chunk at absolute positions [s, e): if its visible prefix s is at most ``sparse_min_len``
(default: the budget) it runs dense (SDPA over keys [0, e) with HF's own mask rows: exact);
else the keys [0, s) are scored with the chunk's mean query (``kv_select.select``: per-head
softmax of q.k summed over heads, sink + top-k + local) and the chunk attends the selected keys
plus its own keys causally (``kv_select.sparse_prefill``, or on the CPU by default the same
attention through SDPA over the gathered picks: ``prefill_impl``). A causal layer's output for token i
depends only on tokens <= i, so running all chunks inside one attention call per layer gives
the same result as feeding the prompt to the model C tokens at a time.

Padding (a 4-D mask): masked positions are passed to ``kv_select.select`` as ``valid=False``:
they take no part in the criticality softmax and are never selected, so a left-padded row
attends only its own tokens (its sink slots may fall on padding and then stay unused). On a
decode step sliding-window layers keep their window the same way; a prefill whose keys reach
past a layer's window runs dense. A prefill chunk in which some row has both padding and real
tokens runs dense (the chunk's own keys are attended causally by the sparse kernel, which has
no mask); rows that are padding only get finite values that no real token attends.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Dict, List, Optional

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
    prefill_sparse_chunks: int = 0
    prefill_dense_chunks: int = 0
    # the last prefill call: per chunk, (B,) keys its last query row attended
    prefill_attended: List[torch.Tensor] = dataclasses.field(default_factory=list)
    prefill_ms: Optional[float] = None             # wall time of the last prefill call (chunked mode)


@dataclasses.dataclass
class _TokenSelect:
    k: int
    n_sink: int
    n_local: int
    cache_threshold: float
    score_scale: float
    sparse_min_len: int                       # decode steps with N > this use the sparse path
    previous_impl: object
    prefill_chunk: Optional[int] = None       # chunked sparse prefill (None: dense prefill)
    prefill_impl: str = "auto"                # "kernel" (sparse_prefill) / "gather" (+ SDPA) / "auto"
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


def _kernels_can(module, query, key, value, dropout, kwargs) -> bool:
    """Whether the sparse kernels can compute this call (else it runs dense)."""
    D, Hq = query.shape[-1], query.shape[1]
    return (not (dropout > 0.0 and module.training)
            and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
            and not any(kwargs.get(name) is not None for name in _PAGED_KWARGS)
            and value.shape[-1] == D
            and not kwargs.get("output_attentions", False)
            and (query.device.type != "cuda"
                 or (D <= CUDA_MAX_HEAD_DIM and Hq <= CUDA_MAX_GROUP * key.shape[1])))


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
        if st.prefill_chunk is not None:
            return _prefill(st, module, query, key, value, attention_mask, dropout, scaling, kwargs)
    sparse = (st is not None and q_len == 1 and N > max(st.sparse_min_len, 0)
              and _kernels_can(module, query, key, value, dropout, kwargs))
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


def _prefill_plan(st: _TokenSelect, module, query, key, value, attention_mask, dropout, kwargs):
    """(offset, valid, chunks) of a chunked prefill call, or None when it runs dense as a whole.

    ``offset``: the absolute position of query row 0; ``valid``: (B, N) bool key validity
    (padding, a StaticCache's unfilled tail) or None; ``chunks``: (r0, r1, sparse) query row
    ranges. With a mask, two host syncs (where the filled keys end, the padding flags)."""
    B, Hq, Q, D = query.shape
    N = key.shape[2]
    if not (_kernels_can(module, query, key, value, dropout, kwargs) and getattr(module, "is_causal", True)):
        return None
    C = st.prefill_chunk
    if attention_mask is None:
        # no mask: SDPA's causal alignment is top-left (also a StaticCache's first prefill,
        # whose keys past q_len are unfilled)
        offset, valid, mixed = 0, None, None
        if Q > N:
            return None
    else:
        if attention_mask.dim() != 4 or attention_mask.shape[2] != Q:
            return None                      # not a per-query mask (the chunks slice its rows)
        m = attention_mask[:, 0, -1, :N]
        if m.dtype != torch.bool:
            m = m == 0                       # additive mask: 0 = attend
        valid = m.expand(B, N)
        # the last query row sees every filled key up to itself: the filled part ends after the
        # last key any row attends (HF caches hold one length for the whole batch)
        col = valid.any(0)
        end = int(torch.where(col, torch.arange(1, N + 1, device=col.device), 0).max())
        offset = end - Q
        if offset < 0:
            return None
        # a chunk where some row has padding and real tokens runs dense (the kernel's own-chunk
        # part has no mask)
        n_ch = -(-Q // C)
        v = torch.nn.functional.pad(valid[:, offset:end], (0, n_ch * C - Q), value=True).reshape(B, n_ch, C)
        mixed = (v.any(2) & ~v.all(2)).any(0).tolist()
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window is not None and offset + Q > window:
        return None                          # the keys reach past the window: dense
    chunks = []
    for i, r0 in enumerate(range(0, Q, C)):
        r1 = min(r0 + C, Q)
        chunks.append((r0, r1, offset + r0 > st.sparse_min_len and not (mixed is not None and mixed[i])))
    return offset, valid, chunks


def _prefill(st: _TokenSelect, module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """A q_len > 1 call in chunked mode (see the module docstring)."""
    from .. import kv_select

    t0 = time.perf_counter()
    B, Hq, Q, D = query.shape
    N = key.shape[2]
    layer = getattr(module, "layer_idx", 0)
    ls = st.stats.setdefault(layer, _LayerStats())
    ls.prefill_attended = []
    plan = _prefill_plan(st, module, query, key, value, attention_mask, dropout, kwargs)
    dev = query.device
    if plan is None or not any(sp for _, _, sp in plan[2]):
        res = _dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if plan is None:
            n_ch = -(-Q // st.prefill_chunk)
            ls.prefill_dense_chunks += n_ch
        else:
            offset, valid, chunks = plan
            ls.prefill_dense_chunks += len(chunks)
            for r0, r1, _ in chunks:
                e = offset + r1
                ls.prefill_attended.append(torch.full((B,), e, device=dev) if valid is None
                                           else valid[:, :e].sum(1))
        _finish_timing(ls, t0, dev)
        return res
    offset, valid, chunks = plan
    out = query.new_empty(B, Q, Hq, value.shape[-1])
    kc, vc = key.transpose(1, 2), value.transpose(1, 2)          # (B, N, H_kv, D) views, no copy
    i = 0
    while i < len(chunks):
        r0, r1, sparse = chunks[i]
        s, e = offset + r0, offset + r1
        if sparse:
            qc = query[:, :, r0:r1].transpose(1, 2).contiguous()   # (B, C, H_q, D)
            start = torch.full((B,), s, dtype=torch.int32, device=dev)
            lens = torch.full((B,), e, dtype=torch.int32, device=dev)
            # check=False: the lengths are the call's own and the indices come from topk
            idx = kv_select.select(qc, kc, start, k=st.k, n_sink=st.n_sink, n_local=st.n_local,
                                   scale=st.score_scale, valid=valid, check=False)
            if _use_gather(st, dev):
                out[:, r0:r1] = _gather_attend(query[:, :, r0:r1], key, value, idx, s, e, scaling)
            else:
                out[:, r0:r1] = kv_select.sparse_prefill(qc, kc, vc, idx, lens, start, scale=scaling, check=False)
            ls.prefill_sparse_chunks += 1
            ls.prefill_attended.append((idx >= 0).sum(1) + (r1 - r0))
            i += 1
            continue
        j = i                                 # consecutive dense chunks: one SDPA call
        while j + 1 < len(chunks) and not chunks[j + 1][2]:
            j += 1
        r1 = chunks[j][1]
        e = offset + r1
        if attention_mask is not None:
            mask = attention_mask[:, :, r0:r1, :e]
        elif r0 == 0:
            mask = None                       # SDPA's is_causal over keys [0, e)
        else:
            mask = torch.ones(r1 - r0, e, dtype=torch.bool, device=dev).tril(diagonal=s)[None, None]
        o, _ = _dense(module, query[:, :, r0:r1], key[:, :, :e], value[:, :, :e], mask, dropout=dropout,
                      scaling=scaling, **kwargs)
        out[:, r0:r1] = o
        for c0, c1, _ in chunks[i:j + 1]:
            ce = offset + c1
            ls.prefill_attended.append(torch.full((B,), ce, device=dev) if valid is None
                                       else valid[:, :ce].sum(1))
        ls.prefill_dense_chunks += j + 1 - i
        i = j + 1
    _finish_timing(ls, t0, dev)
    return out, None


PREFILL_IMPLS = ("auto", "kernel", "gather")


def _use_gather(st: _TokenSelect, dev: torch.device) -> bool:
    """"auto": the gather path on the CPU, where SDPA's blocked kernel attends a chunk's ~3K
    gathered keys faster than the CPU ``sparse_prefill`` kernel (bench/hf_tokenselect_prefill.py
    times both); the ``sparse_prefill`` kernel elsewhere (no copy of the picks)."""
    return st.prefill_impl == "gather" or (st.prefill_impl == "auto" and dev.type == "cpu")


def _gather_attend(q, key, value, idx, s: int, e: int, scale):
    """What ``kv_select.sparse_prefill`` computes, through SDPA: the chunk's queries q (B, H_q, C,
    D) at positions [s, e) attend the keys ``idx`` (B, W) int32 (all < s; -1 = none) plus the
    chunk's own keys causally, one softmax over both. key / value: HF's (B, H_kv, N, D) cache.
    Gathers W + C keys per request into SDPA's layout (a copy of a few thousand rows per chunk
    and layer). Returns (B, C, H_q, D)."""
    B, Hq, C, D = q.shape
    Hkv, W = key.shape[1], idx.shape[1]
    g = idx.clamp(min=0).long()[:, None, :, None]
    kk = torch.cat([key.gather(2, g.expand(B, Hkv, W, key.shape[3])), key[:, :, s:e]], 2)   # (B, H_kv, W + C, D)
    vv = torch.cat([value.gather(2, g.expand(B, Hkv, W, value.shape[3])), value[:, :, s:e]], 2)
    own = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([(idx >= 0)[:, None, :].expand(B, C, W), own[None].expand(B, C, C)], 2)[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale,
                                                         enable_gqa=Hq != Hkv)
    return o.transpose(1, 2)


def _finish_timing(ls: _LayerStats, t0: float, dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    ls.prefill_ms = (time.perf_counter() - t0) * 1e3


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
                                 sparse_min_len: Optional[int] = None,
                                 prefill_chunk: Optional[int] = None,
                                 prefill_impl: str = "auto") -> torch.nn.Module:
    """Switch ``model``'s attention to TokenSelect decoding (in place), and optionally its
    prefill to TokenSelect's chunked sparse prefill.

    Args:
        k, n_sink, n_local: per decode step and layer, attend the first ``n_sink`` and last
            ``n_local`` cached tokens plus the ``k`` most critical ones in between
            (``kv_select.select``: per-head softmax of ``score_scale * q.k``, summed over heads).
        cache_threshold: Selection Cache threshold (reuse the previous step's picks when the
            cosine similarity of consecutive queries exceeds it; > 1 disables reuse).
        sparse_min_len: decode steps over caches longer than this use the sparse path (default:
            the budget ``n_sink + k + n_local``, below which sparse attention would attend every
            token anyway). ``0`` forces the sparse kernels for every decode step. Chunked
            prefill uses the same threshold for a chunk's visible prefix.
        prefill_chunk: None (default): the prompt (every call with q_len > 1) runs HF's dense
            SDPA. An int >= 1: chunked sparse prefill -- each attention call splits its queries
            into chunks of ``prefill_chunk`` rows; a chunk whose prefix (the keys before it) is
            longer than ``sparse_min_len`` scores that prefix with its mean query
            (``kv_select.select``, the decode criterion: sink + top-k + local) and attends the
            selected keys plus itself causally (``kv_select.sparse_prefill``); shorter prefixes
            run dense (exact). As a causal layer's output for token i depends only on tokens
            <= i, this equals feeding the prompt ``prefill_chunk`` tokens at a time. With the
            budget >= the prompt the result equals SDPA's (to rounding). Works with
            ``generate``, batches, left padding (a chunk with padding and real tokens in one
            row runs dense), DynamicCache and StaticCache; a prompt reaching past a layer's
            sliding window, softcapping, attention sinks and paged caches run dense.
        prefill_impl: how a sparse chunk attends its picks and itself: ``"kernel"``
            (``kv_select.sparse_prefill``, reads the cache in place), ``"gather"`` (copies the
            picked K/V rows and runs SDPA with a mask: the same result to rounding) or ``"auto"``
            (default: ``"gather"`` on the CPU, where it is faster, ``"kernel"`` elsewhere).

    Returns the model. :func:`tokenselect_stats` reports hit rates and attended-token counts;
    :func:`disable_tokenselect_attention` restores the previous attention implementation.
    """
    for name, v in (("k", k), ("n_sink", n_sink), ("n_local", n_local)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"tokenkernels.enable_tokenselect_attention: {name} must be an int >= 0, got {v!r}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"tokenkernels.enable_tokenselect_attention: prefill_chunk must be None or an int >= 1, "
                         f"got {prefill_chunk!r}")
    if prefill_impl not in PREFILL_IMPLS:
        raise ValueError(f"tokenkernels.enable_tokenselect_attention: prefill_impl must be one of "
                         f"{', '.join(map(repr, PREFILL_IMPLS))}, got {prefill_impl!r}")
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
                      previous_impl=previous_impl, prefill_chunk=prefill_chunk,
                      prefill_impl=prefill_impl)
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
    its last sparse step. Reading it syncs the device.

    Chunked prefill (``prefill_chunk``): ``prefill_sparse_chunks`` / ``prefill_dense_chunks``
    (summed over layers and calls), ``prefill_attended`` (per layer, per chunk of its last
    prefill call: the keys each request's last query row of the chunk attended, padding not
    counted on dense chunks), ``prefill_mean_attended`` (their mean over layers, chunks and
    requests) and ``prefill_ms`` (wall time of the last prefill call's attention, summed over
    layers; CUDA: synchronised; None before a chunked prefill)."""
    st = model.__dict__.get(_ATTR)
    if st is None:
        raise ValueError("tokenkernels.tokenselect_stats: TokenSelect attention is not enabled on this model")
    hits = sum(int(c.hit_count) for c in st.caches.values())
    lookups = sum(int(c.lookup_count) for c in st.caches.values())
    attended = {l: [a.tolist() for a in s.prefill_attended] for l, s in sorted(st.stats.items())
                if s.prefill_attended}
    flat = [x for chunks in attended.values() for a in chunks for x in a]
    times = [s.prefill_ms for s in st.stats.values() if s.prefill_ms is not None]
    return dict(hits=hits, lookups=lookups, hit_rate=(hits / lookups) if lookups else 0.0,
                sparse_steps=sum(s.sparse_steps for s in st.stats.values()),
                dense_steps=sum(s.dense_steps for s in st.stats.values()),
                budget=st.budget,
                last_attended={l: s.last_attended.tolist() for l, s in sorted(st.stats.items())
                               if s.last_attended is not None},
                prefill_chunk=st.prefill_chunk,
                prefill_sparse_chunks=sum(s.prefill_sparse_chunks for s in st.stats.values()),
                prefill_dense_chunks=sum(s.prefill_dense_chunks for s in st.stats.values()),
                prefill_attended=attended,
                prefill_mean_attended=(sum(flat) / len(flat)) if flat else None,
                prefill_ms=sum(times) if times else None)


def reset_tokenselect_stats(model: torch.nn.Module) -> None:
    """Zero the counters (the prefill ones too) and forget the Selection Caches' previous queries."""
    st = model.__dict__.get(_ATTR)
    if st is None:
        return
    st.caches.clear()
    st.stats.clear()
