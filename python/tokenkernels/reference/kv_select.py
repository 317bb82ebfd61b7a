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

Every op here has the signature and return type of its public counterpart in
:mod:`tokenkernels.kv_select` (``impl="reference"`` there calls it): ``out=`` / ``lse=`` buffers
are written and returned, ``check`` and ``impl`` are accepted and ignored (the reference does
no value checks of its own: pass valid inputs). :func:`dense_cache` is a layout utility, not an op.

Everything here computes in ``float32`` or in the inputs' dtype if that is wider (pass
``float64`` inputs for an fp64 truth).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

_I32_MAX = 2 ** 31 - 1


def _cdtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _long(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Integer metadata as int64 (saturated into int32's range like the ops' narrowing)."""
    return None if t is None else t.long().clamp(-2 ** 31, _I32_MAX)


def dense_cache(cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """The cache as (B, N_max, H_kv, D), whatever the layout (paged caches are gathered)."""
    if block_table is None:
        return cache
    B, max_pages = block_table.shape
    P = cache.shape[1]
    n = torch.arange(max_pages * P, device=cache.device)
    pages = block_table.long()[:, n // P].clamp_min(0)          # (B, N_max)
    return cache[pages, (n % P).unsqueeze(0).expand(B, -1)]     # (B, N_max, H_kv, D)


def _mean_query(q: torch.Tensor) -> torch.Tensor:
    """(B, H_q, D) decode query as is, or the mean over the chunk of a (B, C, H_q, D) query."""
    q = q.to(_cdtype(q))
    return q.mean(1) if q.dim() == 4 else q


def _write(out: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    return value if out is None else out.copy_(value)


def score(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, *,
          block_table: Optional[torch.Tensor] = None, scale: float = 1.0,
          skip: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
          check: bool = True, impl: str = "auto") -> torch.Tensor:
    """(B, N_max) float32 criticality: sum over q-heads of per-head softmax over the valid tokens
    (n < seq_len and valid[b, n]); -inf for the others and for rows with skip[b]."""
    qm = _mean_query(q)                                       # (B, H_q, D)
    B, Hq, D = qm.shape
    K = dense_cache(k_cache, block_table).to(qm.dtype)       # (B, N, H_kv, D)
    N, Hkv = K.shape[1], K.shape[2]
    G = Hq // Hkv
    K = K.repeat_interleave(G, dim=2)                         # q-head h -> KV head h // G
    logits = torch.einsum("bhd,bnhd->bhn", qm, K) * scale     # (B, H_q, N)
    ok = torch.arange(N, device=q.device)[None, :] < _long(seq_lens).to(q.device)[:, None]
    if valid is not None:
        ok = ok & valid.to(q.device)
    if skip is not None:
        ok = ok & ~skip.to(q.device)[:, None]
    logits = logits.masked_fill(~ok[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)     # empty rows -> 0
    out = probs.sum(1).masked_fill(~ok, float("-inf"))
    return out.float() if qm.dtype != torch.float64 else out


def topk(scores: torch.Tensor, k: int, seq_lens: torch.Tensor, *, n_sink: int = 128,
         n_local: int = 512, reuse: Optional[torch.Tensor] = None,
         reuse_mask: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
         check: bool = True, impl: str = "auto") -> torch.Tensor:
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
    res = torch.full((B, W), -1, dtype=torch.int32, device=scores.device)
    sl = _long(seq_lens)
    for b in range(B):
        L = int(sl[b])
        if L <= W:
            res[b, :L] = torch.arange(L, dtype=torch.int32)
            continue
        lo, hi = n_sink, L - n_local
        if reuse_mask is not None and bool(reuse_mask[b]):
            # in-range entries greater than the last one kept (an ascending list without
            # duplicates as it is; any other list keeps its ascending subsequence greedily)
            kept, last = [], -1
            for v in _long(reuse)[b].tolist():
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
        res[b, :sel.numel()] = sel.to(torch.int32)
    return _write(out, res)


def _attend(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask: Optional[torch.Tensor],
            scale: float):
    """q (M, H_q, D), K/V (T, H_q, D), mask (M, T) bool or None -> out (M, H_q, D), lse (M, H_q).
    Rows with no visible key give out = 0, lse = -inf."""
    logits = torch.einsum("mhd,thd->mht", q, K) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)                      # (M, H_q)
    p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("mht,thd->mhd", p, V), lse


def _finish(out_v: torch.Tensor, lse_v: torch.Tensor, q: torch.Tensor, return_lse: bool,
            out: Optional[torch.Tensor], lse: Optional[torch.Tensor]):
    o = _write(out, out_v.to(q.dtype) if q.dtype != torch.float64 else out_v)
    l = _write(lse, lse_v.float() if lse_v.dtype != torch.float64 else lse_v)
    return (o, l) if return_lse else o


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  indices: torch.Tensor, seq_lens: torch.Tensor, *,
                  block_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                  return_lse: bool = False, out: Optional[torch.Tensor] = None,
                  lse: Optional[torch.Tensor] = None, check: bool = True, impl: str = "auto"):
    """Attention of q (B, H_q, D) over the tokens in ``indices`` (B, K) (-1 skipped)."""
    B, Hq, D = q.shape
    cd = _cdtype(q)
    scale = D ** -0.5 if scale is None else scale
    Kd, Vd = dense_cache(k_cache, block_table), dense_cache(v_cache, block_table)
    G = Hq // Kd.shape[2]
    o = torch.zeros(B, Hq, D, dtype=cd, device=q.device)
    l = torch.full((B, Hq), float("-inf"), dtype=cd, device=q.device)
    ix = _long(indices)
    for b in range(B):
        idx = ix[b]
        idx = idx[idx >= 0]
        if idx.numel() == 0:
            continue
        K = Kd[b, idx].to(cd).repeat_interleave(G, dim=1)
        V = Vd[b, idx].to(cd).repeat_interleave(G, dim=1)
        ob, lb = _attend(q[b:b + 1].to(cd), K, V, None, scale)
        o[b], l[b] = ob[0], lb[0]
    return _finish(o, l, q, return_lse, out, lse)


def sparse_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   indices: torch.Tensor, seq_lens: torch.Tensor,
                   chunk_start: Union[int, torch.Tensor], *,
                   block_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   return_lse: bool = False, out: Optional[torch.Tensor] = None,
                   lse: Optional[torch.Tensor] = None, check: bool = True, impl: str = "auto"):
    """Chunked prefill: q (B, C, H_q, D) holds the queries of positions chunk_start[b] + c.

    The chunk's own keys/values are already in the cache at those positions; request b's chunk
    has ``min(C, seq_lens[b] - chunk_start[b])`` real queries (later rows are padding: out 0,
    lse -inf). Query c attends the selected past tokens (entries of ``indices`` in
    [0, chunk_start[b]), each listed entry once per listing; -1 and later entries are ignored)
    and the chunk positions chunk_start[b] .. chunk_start[b] + c (causal)."""
    B, C, Hq, D = q.shape
    cd = _cdtype(q)
    scale = D ** -0.5 if scale is None else scale
    if isinstance(chunk_start, int):
        chunk_start = torch.full((B,), chunk_start, dtype=torch.long)
    Kd, Vd = dense_cache(k_cache, block_table), dense_cache(v_cache, block_table)
    G = Hq // Kd.shape[2]
    o = torch.zeros(B, C, Hq, D, dtype=cd, device=q.device)
    l = torch.full((B, C, Hq), float("-inf"), dtype=cd, device=q.device)
    cs, sl, ix = _long(chunk_start), _long(seq_lens), _long(indices)
    for b in range(B):
        s0, L = int(cs[b]), int(sl[b])
        c_len = max(0, min(C, L - s0))
        if c_len == 0:
            continue
        idx = ix[b].to(q.device)
        past = idx[(idx >= 0) & (idx < s0)]              # each listed entry counts
        keys = torch.cat([past, torch.arange(s0, s0 + c_len, device=q.device)])
        K = Kd[b, keys].to(cd).repeat_interleave(G, dim=1)
        V = Vd[b, keys].to(cd).repeat_interleave(G, dim=1)
        t = torch.arange(keys.numel(), device=q.device)
        c = torch.arange(c_len, device=q.device)
        mask = (t[None, :] < past.numel()) | (t[None, :] - past.numel() <= c[:, None])
        ob, lb = _attend(q[b, :c_len].to(cd), K, V, mask, scale)
        o[b, :c_len], l[b, :c_len] = ob, lb
    return _finish(o, l, q, return_lse, out, lse)


class SelectionCache:
    """Reference Selection Cache: the state of :class:`tokenkernels.kv_select.SelectionCache`
    (the same attributes; :func:`select` works on either class).

    Per request: the previous step's mean query (H_q * D values, flattened, fp32) and middle
    picks (the k scored tokens). A step is a *hit* when a previous query exists and
    ``cos(q_now, q_prev) > threshold`` (fp32); a hit reuses the previous middle picks (sink and
    local windows are rebuilt for the current length) and skips scoring. The stored query is
    replaced every step (consecutive queries are compared); the stored picks only on a miss. The
    state is sized on first use and starts afresh when the sizes change.
    """

    def __init__(self, threshold: float = 0.9):
        self.threshold = float(threshold)
        self.prev_q: Optional[torch.Tensor] = None     # (B, H_q * D) fp32
        self.prev_mid: Optional[torch.Tensor] = None   # (B, k) int32
        self.has_prev: Optional[torch.Tensor] = None   # (B,) bool
        self.hits: Optional[torch.Tensor] = None       # (B,) int64
        self.lookups: Optional[torch.Tensor] = None    # (B,) int64
        self.last_hit: Optional[torch.Tensor] = None   # (B,) bool

    def reset(self, mask: Optional[torch.Tensor] = None) -> None:
        """Forget every request, or those where ``mask`` (B,) bool is True."""
        if self.has_prev is not None:
            self.has_prev = self.has_prev & ~mask.to(self.has_prev.device) if mask is not None \
                else torch.zeros_like(self.has_prev)

    def decide(self, qm: torch.Tensor) -> torch.Tensor:
        """(B,) bool: would mean queries ``qm`` (B, H_q, D) hit now?"""
        return _hits(self, qm.reshape(qm.shape[0], -1).float())

    @property
    def hit_count(self) -> torch.Tensor:
        return self.hits.sum() if self.hits is not None else torch.zeros((), dtype=torch.long)

    @property
    def lookup_count(self) -> torch.Tensor:
        return self.lookups.sum() if self.lookups is not None else torch.zeros((), dtype=torch.long)


def _hits(cache, a: torch.Tensor) -> torch.Tensor:
    """Per request: a previous query exists (of this size) and cos(a, previous) > threshold."""
    B = a.shape[0]
    if cache.prev_q is None or cache.prev_q.shape != a.shape or cache.has_prev is None:
        return torch.zeros(B, dtype=torch.bool, device=a.device)
    p = cache.prev_q.to(a.device)
    cos = ((a * p).sum(1) / (a.norm(dim=1) * p.norm(dim=1)).clamp_min(1e-12)).clamp(-1.0, 1.0)
    return cache.has_prev.to(a.device) & (cos > cache.threshold)


def _drop_masked(idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Remove the entries of idx (ascending, -1 padded) at tokens with valid False, keeping the
    rest in order; the row is padded with -1 again."""
    res = torch.full_like(idx, -1)
    for b in range(idx.shape[0]):
        kept = [int(n) for n in idx[b].tolist() if n >= 0 and bool(valid[b, n])]
        res[b, :len(kept)] = torch.tensor(kept, dtype=idx.dtype)
    return res


def select(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, *, k: int,
           n_sink: int = 128, n_local: int = 512, block_table: Optional[torch.Tensor] = None,
           scale: float = 1.0, cache=None, valid: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None, check: bool = True, impl: str = "auto") -> torch.Tensor:
    """score + topk, with an optional Selection Cache (this module's or
    :class:`tokenkernels.kv_select.SelectionCache`), then the tokens with ``valid`` False
    removed (the remaining ones ascending, -1 padded). The cache stores topk's own middle picks
    (before the removal)."""
    qm = _mean_query(q)
    B = qm.shape[0]
    if cache is None:
        idx = topk(score(qm, k_cache, seq_lens, block_table=block_table, scale=scale, valid=valid), k,
                   seq_lens, n_sink=n_sink, n_local=n_local)
    else:
        a = (q.float().mean(1) if q.dim() == 4 else q.float()).reshape(B, -1)   # the decision's query
        fresh = cache.prev_mid is None or cache.prev_q is None or cache.prev_q.shape != a.shape \
            or cache.prev_q.device != q.device or cache.prev_mid.shape != (B, k)
        if fresh:   # (re)size the state: no previous query or picks, counters from zero
            cache.prev_q = torch.zeros(a.shape, dtype=torch.float32, device=q.device)
            cache.prev_mid = torch.full((B, k), -1, dtype=torch.int32, device=q.device)
            cache.has_prev = torch.zeros(B, dtype=torch.bool, device=q.device)
            cache.hits = torch.zeros(B, dtype=torch.long, device=q.device)
            cache.lookups = torch.zeros(B, dtype=torch.long, device=q.device)
        hit = _hits(cache, a)
        s = score(qm, k_cache, seq_lens, block_table=block_table, scale=scale, skip=hit, valid=valid)
        idx = topk(s, k, seq_lens, n_sink=n_sink, n_local=n_local, reuse=cache.prev_mid, reuse_mask=hit)
        mid = idx[:, n_sink:n_sink + k]
        cache.prev_mid = torch.where(hit[:, None], cache.prev_mid.to(idx.device), mid)
        cache.prev_q = a.clone()
        cache.has_prev = torch.ones(B, dtype=torch.bool, device=q.device)
        cache.hits = cache.hits + hit.long()
        cache.lookups = cache.lookups + 1
        cache.last_hit = hit
    if valid is not None:
        idx = _drop_masked(idx, valid)
    return _write(out, idx)


__all__ = ["score", "topk", "sparse_decode", "sparse_prefill", "select", "SelectionCache", "dense_cache"]
