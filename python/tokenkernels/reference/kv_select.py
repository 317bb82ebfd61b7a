"""kv_select family, pure-PyTorch reference (readable; the test oracle).

TokenSelect-style token-level KV selection for long-context decoding:

* ``score``: per q-head criticality ``softmax_n(scale * q_h . k_n)`` over the valid tokens of the
  request, summed over the q-heads (soft voting). GQA maps q-head ``h`` to KV head
  ``h // (H_q // H_kv)`` (the standard mapping; TokenSelect's release uses ``h % H_kv``).
* ``topk``: the first ``n_sink`` and last ``n_local`` valid tokens plus the ``k`` best-scoring
  tokens in between, ascending, padded with -1 (ties: lowest index first).
* ``sparse_decode``: exact attention of one query per head over the listed tokens.
* ``sparse_prefill``: a chunk of queries attends the selected past tokens plus the chunk itself,
  causally.
* ``select`` / ``SelectionCache``: score + topk, with reuse of the previous selection when
  consecutive mean queries are similar.

KV layouts (both everywhere):
* contiguous: cache (B, N_max, H_kv, D); token n of request b is ``cache[b, n]``;
* paged: cache (num_pages, page_size, H_kv, D) with ``block_table`` (B, max_pages);
  token n of request b is ``cache[block_table[b, n // page_size], n % page_size]``.
``seq_lens`` (B,) gives the number of valid tokens of each request.

Everything here computes in ``float32`` or in the inputs' dtype if that is wider (pass
``float64`` inputs for an fp64 truth).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def _cdtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def dense_cache(cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """The cache as (B, N_max, H_kv, D), whatever the layout (paged caches are gathered)."""
    if block_table is None:
        return cache
    B, max_pages = block_table.shape
    P = cache.shape[1]
    n = torch.arange(max_pages * P, device=cache.device)
    pages = block_table.long()[:, n // P].clamp_min(0)          # (B, N_max)
    return cache[pages, (n % P).unsqueeze(0).expand(B, -1)]     # (B, N_max, H_kv, D)


def n_max(cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> int:
    return cache.shape[1] if block_table is None else block_table.shape[1] * cache.shape[1]


def mean_query(q: torch.Tensor) -> torch.Tensor:
    """(B, H_q, D) decode query as is, or the mean over the chunk of a (B, C, H_q, D) query."""
    q = q.to(_cdtype(q))
    return q.mean(1) if q.dim() == 4 else q


def score(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, *,
          block_table: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """(B, N_max) float32 criticality: sum over q-heads of per-head softmax over valid tokens."""
    qm = mean_query(q)                                        # (B, H_q, D)
    B, Hq, D = qm.shape
    K = dense_cache(k_cache, block_table).to(qm.dtype)       # (B, N, H_kv, D)
    N, Hkv = K.shape[1], K.shape[2]
    G = Hq // Hkv
    K = K.repeat_interleave(G, dim=2)                         # q-head h -> KV head h // G
    logits = torch.einsum("bhd,bnhd->bhn", qm, K) * scale     # (B, H_q, N)
    valid = torch.arange(N, device=q.device)[None, :] < seq_lens.to(q.device).long()[:, None]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)     # empty rows -> 0
    out = probs.sum(1).masked_fill(~valid, float("-inf"))
    return out.float() if qm.dtype != torch.float64 else out


def topk(scores: torch.Tensor, k: int, seq_lens: torch.Tensor, *, n_sink: int = 128,
         n_local: int = 512, reuse: Optional[torch.Tensor] = None,
         reuse_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, n_sink + k + n_local) int32, ascending, padded with -1.

    A request with seq_len <= n_sink + k + n_local gets all its tokens. Otherwise: tokens
    [0, n_sink), [L - n_local, L), and the k highest scores among [n_sink, L - n_local) (ties:
    lowest index). Rows with ``reuse_mask`` take their middle tokens from ``reuse`` (B, k) instead
    -- the Selection Cache hit path: in order, the entries in [n_sink, L - n_local) that exceed
    the last entry kept (for an ascending list: its entries in range, duplicates dropped; the
    result is ascending whatever the list, e.g. [5, 9, -1, 7] keeps 5, 9).
    """
    B = scores.shape[0]
    W = n_sink + k + n_local
    out = torch.full((B, W), -1, dtype=torch.int32, device=scores.device)
    for b in range(B):
        L = int(seq_lens[b])
        if L <= W:
            out[b, :L] = torch.arange(L, dtype=torch.int32)
            continue
        lo, hi = n_sink, L - n_local
        if reuse_mask is not None and bool(reuse_mask[b]):
            # in-range entries greater than the last one kept (an ascending list without
            # duplicates as it is; any other list keeps its ascending subsequence greedily)
            kept, last = [], -1
            for v in reuse[b].tolist():
                if lo <= v < hi and v > last:
                    kept.append(v)
                    last = v
            mid = torch.tensor(kept, dtype=torch.long)
        else:
            s = scores[b, lo:hi]
            order = torch.sort(s, descending=True, stable=True).indices[:k]
            mid = torch.sort(order + lo).values
        sel = torch.cat([torch.arange(0, lo, device=scores.device), mid.to(scores.device),
                         torch.arange(hi, L, device=scores.device)])
        out[b, :sel.numel()] = sel.to(torch.int32)
    return out


def _attend(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask: Optional[torch.Tensor],
            scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (M, H_q, D), K/V (T, H_q, D), mask (M, T) bool or None -> out (M, H_q, D), lse (M, H_q).
    Rows with no visible key give out = 0, lse = -inf."""
    logits = torch.einsum("mhd,thd->mht", q, K) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)                      # (M, H_q)
    p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("mht,thd->mhd", p, V), lse


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  indices: torch.Tensor, seq_lens: torch.Tensor, *,
                  block_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                  return_lse: bool = False):
    """Attention of q (B, H_q, D) over the tokens in ``indices`` (B, K) (-1 skipped)."""
    B, Hq, D = q.shape
    cd = _cdtype(q)
    scale = D ** -0.5 if scale is None else scale
    Kd, Vd = dense_cache(k_cache, block_table), dense_cache(v_cache, block_table)
    G = Hq // Kd.shape[2]
    out = torch.zeros(B, Hq, D, dtype=cd, device=q.device)
    lse = torch.full((B, Hq), float("-inf"), dtype=cd, device=q.device)
    for b in range(B):
        idx = indices[b].long()
        idx = idx[idx >= 0]
        if idx.numel() == 0:
            continue
        K = Kd[b, idx].to(cd).repeat_interleave(G, dim=1)
        V = Vd[b, idx].to(cd).repeat_interleave(G, dim=1)
        o, l = _attend(q[b:b + 1].to(cd), K, V, None, scale)
        out[b], lse[b] = o[0], l[0]
    out = out.to(q.dtype) if q.dtype != torch.float64 else out
    lse = lse.float() if cd != torch.float64 else lse
    return (out, lse) if return_lse else out


def sparse_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   indices: torch.Tensor, seq_lens: torch.Tensor, chunk_start: torch.Tensor, *,
                   block_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   return_lse: bool = False):
    """Chunked prefill: q (B, C, H_q, D) holds the queries of positions chunk_start[b] + c.

    The chunk's own keys/values are already in the cache at those positions; request b's chunk
    has ``min(C, seq_lens[b] - chunk_start[b])`` real queries (later rows are padding: out 0,
    lse -inf). Query c attends the selected past tokens (entries of ``indices`` in
    [0, chunk_start[b]), each listed entry once per listing; -1 and later entries are ignored)
    and the chunk positions
    chunk_start[b] .. chunk_start[b] + c (causal)."""
    B, C, Hq, D = q.shape
    cd = _cdtype(q)
    scale = D ** -0.5 if scale is None else scale
    Kd, Vd = dense_cache(k_cache, block_table), dense_cache(v_cache, block_table)
    G = Hq // Kd.shape[2]
    out = torch.zeros(B, C, Hq, D, dtype=cd, device=q.device)
    lse = torch.full((B, C, Hq), float("-inf"), dtype=cd, device=q.device)
    for b in range(B):
        s0, L = int(chunk_start[b]), int(seq_lens[b])
        c_len = max(0, min(C, L - s0))
        if c_len == 0:
            continue
        idx = indices[b].long()
        past = idx[(idx >= 0) & (idx < s0)]              # each listed entry counts
        keys = torch.cat([past, torch.arange(s0, s0 + c_len, device=q.device)])
        K = Kd[b, keys].to(cd).repeat_interleave(G, dim=1)
        V = Vd[b, keys].to(cd).repeat_interleave(G, dim=1)
        t = torch.arange(keys.numel(), device=q.device)
        c = torch.arange(c_len, device=q.device)
        mask = (t[None, :] < past.numel()) | (t[None, :] - past.numel() <= c[:, None])
        o, l = _attend(q[b, :c_len].to(cd), K, V, mask, scale)
        out[b, :c_len], lse[b, :c_len] = o, l
    out = out.to(q.dtype) if q.dtype != torch.float64 else out
    lse = lse.float() if cd != torch.float64 else lse
    return (out, lse) if return_lse else out


def full_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                seq_lens: torch.Tensor, *, block_table: Optional[torch.Tensor] = None,
                scale: Optional[float] = None) -> torch.Tensor:
    """Dense decode attention over every valid token (the exactness anchor of sparse_decode)."""
    B = q.shape[0]
    N = n_max(k_cache, block_table)
    n = torch.arange(N, device=q.device, dtype=torch.int32)
    idx = torch.where(n[None, :] < seq_lens.to(q.device)[:, None].int(), n[None, :], -1)
    return sparse_decode(q, k_cache, v_cache, idx.expand(B, -1), seq_lens,
                         block_table=block_table, scale=scale)


class SelectionCache:
    """Reference Selection Cache (host-side decisions, readable).

    Per request: the previous step's mean query (H_q * D values, flattened) and middle picks
    (the k scored tokens). A step is a *hit* when a previous query exists and
    ``cos(q_now, q_prev) > threshold``; a hit reuses the previous middle picks (sink and local
    windows are rebuilt for the current length) and skips scoring. The stored query is replaced
    every step (consecutive queries are compared); the stored picks only on a miss.
    """

    def __init__(self, threshold: float = 0.9):
        self.threshold = threshold
        self.prev_q: Optional[torch.Tensor] = None
        self.prev_mid: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        self.hits: Optional[torch.Tensor] = None
        self.lookups: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.prev_q = None

    def decide(self, qm: torch.Tensor) -> torch.Tensor:
        B = qm.shape[0]
        if self.prev_q is None or self.prev_q.shape != qm.reshape(B, -1).shape:
            return torch.zeros(B, dtype=torch.bool, device=qm.device)
        a, p = qm.reshape(B, -1).float(), self.prev_q.float()
        cos = ((a * p).sum(1) / (a.norm(dim=1) * p.norm(dim=1)).clamp_min(1e-12)).clamp(-1.0, 1.0)
        return cos > self.threshold


def select(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, *, k: int,
           n_sink: int = 128, n_local: int = 512, block_table: Optional[torch.Tensor] = None,
           scale: float = 1.0, cache: Optional[SelectionCache] = None) -> torch.Tensor:
    """score + topk, with an optional (reference) Selection Cache."""
    qm = mean_query(q)
    B = qm.shape[0]
    if cache is None:
        return topk(score(qm, k_cache, seq_lens, block_table=block_table, scale=scale), k,
                    seq_lens, n_sink=n_sink, n_local=n_local)
    hit = cache.decide(qm)
    s = score(qm, k_cache, seq_lens, block_table=block_table, scale=scale)
    out = topk(s, k, seq_lens, n_sink=n_sink, n_local=n_local, reuse=cache.prev_mid,
               reuse_mask=hit)
    mid = out[:, n_sink:n_sink + k]
    cache.prev_mid = mid.clone() if cache.prev_mid is None else torch.where(hit[:, None], cache.prev_mid, mid)
    cache.prev_q = qm.reshape(B, -1).float().clone()
    cache.hits = hit.long() if cache.hits is None else cache.hits + hit.long()
    cache.lookups = (torch.ones(B, dtype=torch.long) if cache.lookups is None
                     else cache.lookups + 1)
    return out


__all__ = ["score", "topk", "sparse_decode", "sparse_prefill", "select", "SelectionCache",
           "full_decode", "dense_cache", "mean_query", "n_max"]
