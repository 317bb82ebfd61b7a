"""kv_select family: token-level top-k KV selection, gathering and sparse attention
(TokenSelect), for contiguous and paged KV caches, varlen batches and GQA, on CPU and CUDA.

KV layouts (every op supports both):

* contiguous: ``k_cache``, ``v_cache`` (B, N_max, H_kv, D), ``block_table=None``;
* paged: ``k_cache``, ``v_cache`` (num_pages, page_size, H_kv, D) with ``block_table``
  (B, max_pages) int32; token n of request b lives at page ``block_table[b, n // page_size]``,
  slot ``n % page_size``.

``seq_lens`` (B,) gives each request's valid length. Any strides on the cache dims are read in
place (e.g. HF's (B, H_kv, N, D) cache passed as ``cache.transpose(1, 2)``). fp32/fp16/bf16;
q-head ``h`` reads KV head ``h // (H_q // H_kv)``. Arithmetic is fp32.

A decode step::

    idx = kv_select.select(q, k_cache, seq_lens, k=2048, n_sink=128, n_local=512, cache=sc)
    o = kv_select.sparse_decode(q, k_cache, v_cache, idx, seq_lens, scale=D ** -0.5)

``check=True`` (default) validates value-dependent arguments (seq_lens within the cache
capacity, page numbers in range, indices < seq_len); on CUDA that costs one host sync, so pass
``check=False`` in CUDA-graph captured decode loops (the kernels then skip out-of-range tokens
instead of reading out of bounds). With ``out=`` buffers and ``check=False`` nothing
syncs the host or changes shape.

Integer metadata (``seq_lens``, ``block_table``, ``indices``, ``chunk_start``, ``reuse``) may
be int64 (or int8, int16, uint8); the ops narrow it to int32 on the device, saturating: a value
beyond int32 is out of range for every argument and is rejected by the value checks (or,
unchecked, skipped) like any out-of-range value -- never wrapped (2**32 + 1 to 1). Pass int32 to
avoid the conversion.

Every op takes ``impl=``: ``"auto"``, the CUDA variants ``"plain"`` / ``"simt"`` / ``"tuned"`` (see
:mod:`tokenkernels.variants` for what ``"auto"`` runs on CUDA; the CPU has one implementation
and ignores the name) or ``"reference"`` (:mod:`tokenkernels.reference.kv_select`, the same
signature). Shape, dtype, device and value checks live in the C++ contract layer
(csrc/kv_select/kv_select_args.h); these wrappers convert Python values (bools must be ``True``
/ ``False``, ints must fit int64, tensors must be tensors: a TypeError / ValueError naming the
argument otherwise), fill defaults and pick the implementation.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import variants as _variants
from .._common import _is_bool, as_bool, as_int
from ..reference import kv_select as _ref

_FAMILY = "kv_select"
_I32_MIN, _I32_MAX = -2 ** 31, 2 ** 31 - 1


# the widest output row accepted beyond the cache capacity (kMaxPaddedWidth in
# csrc/kv_select/kv_select_args.h)
_MAX_PADDED_WIDTH = 2 ** 20


def _tensor(t, name: str, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tokenkernels.kv_select.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _opt_tensor(t, name: str, op: str) -> Optional[torch.Tensor]:
    """A ``Tensor?`` argument: None or a tensor (anything else would reach the schema parser)."""
    return None if t is None else _tensor(t, name, op)


def _flag(v, name: str, op: str) -> bool:
    return as_bool(v, name, f"kv_select.{op}")


def _nonneg(v: int, name: str, op: str) -> int:
    """A Python int argument (the schema's ``int``), within int64 and >= 0. The ops check the
    sign too (a RuntimeError); the wrappers raise ValueError before anything runs."""
    v = as_int(v, name, f"kv_select.{op}")
    if v < 0:
        raise ValueError(f"tokenkernels.kv_select.{op}: {name} must be >= 0, got {v}")
    return v


def _budget(k: int, n_sink: int, n_local: int, op: str, capacity: Optional[Tuple[int, str]]) -> None:
    """The output width n_sink + k + n_local: it must fit int64 (a Python int may not; the op's
    own check raises a RuntimeError), fit int32 (the indices are int32) and -- a row holds at
    most ``capacity`` real entries, the rest is -1 padding -- be at most ``max(capacity,
    2**20)``: the op's checks (check_topk_width in csrc/kv_select/kv_select_args.h), made here
    before anything is allocated (the Selection Cache's state, the reference's output).
    ``capacity``: (N_max, what it is), or None where the shapes are malformed (the op reports
    them; only 2**20 applies)."""
    w = n_sink + k + n_local
    name = f"tokenkernels.kv_select.{op}: n_sink + k + n_local"
    if w > 2 ** 63 - 1:
        raise ValueError(f"{name} ({n_sink} + {k} + {n_local}) overflows int64")
    if w > _I32_MAX:
        raise ValueError(f"{name} = {w} must fit in int32 (the indices are int32)")
    if capacity is None and w > _MAX_PADDED_WIDTH:
        raise ValueError(f"{name} = {w} exceeds {_MAX_PADDED_WIDTH} (the widest row of -1 padding "
                         f"accepted beyond the cache capacity)")
    if capacity is not None and w > max(capacity[0], _MAX_PADDED_WIDTH):
        raise ValueError(f"{name} = {w} exceeds both the capacity N_max = {capacity[0]} ({capacity[1]}) and "
                         f"{_MAX_PADDED_WIDTH} (the widest row of -1 padding accepted beyond it)")


def _capacity_of(k_cache: torch.Tensor, block_table) -> Optional[Tuple[int, str]]:
    """(:func:`capacity`, what it is) where the shapes allow it, else None (the op reports them)."""
    if k_cache.dim() != 4 or not (block_table is None or
                                  (isinstance(block_table, torch.Tensor) and block_table.dim() == 2)):
        return None
    return capacity(k_cache, block_table), "k_cache.size(1)" if block_table is None else "max_pages * page_size"


def _choose(impl, device, op: str) -> str:
    return _variants.choose(_FAMILY, impl, device, f"kv_select.{op}")


def _real(v, name: str, op: str) -> float:
    """A real number (a Python / numpy int or float, or a one-element real tensor) as a float;
    anything else -- a str, a bool, None, a (2,) tensor -- is a TypeError naming ``name``."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool:
            return float(v)
        raise TypeError(f"tokenkernels.kv_select.{op}: {name} must be a real number or a one-element "
                        f"tensor, got a {v.dtype} tensor of shape {tuple(v.shape)}")
    if _is_bool(v) or isinstance(v, (str, bytes)) or v is None:
        raise TypeError(f"tokenkernels.kv_select.{op}: {name} must be a real number, got {type(v).__name__}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"tokenkernels.kv_select.{op}: {name} must be a real number, "
                        f"got {type(v).__name__}") from None


def _scale(q: torch.Tensor, scale: Optional[float], op: str) -> float:
    """The logit scale: 1/sqrt(D) by default (head_dim 0 is left to the op's own check)."""
    if scale is not None:
        return _real(scale, "scale", op)
    D = q.shape[-1] if q.dim() > 0 else 0
    return D ** -0.5 if D > 0 else 1.0


def capacity(k_cache: torch.Tensor, block_table: Optional[torch.Tensor] = None) -> int:
    """Token capacity per request (N_max): k_cache.size(1), or max_pages * page_size."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def score(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, *,
          block_table: Optional[torch.Tensor] = None, scale: float = 1.0,
          skip: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
          check: bool = True, impl: str = "auto") -> torch.Tensor:
    """TokenSelect criticality of every cached token.

    For each q-head h with KV head g = h // (H_q / H_kv): ``s_h = softmax_n(scale * q_h . k_n)``
    over the request's valid tokens; ``score_n = sum_h s_h,n`` (soft voting across heads).

    Args:
        q: (B, H_q, D) decode queries, or (B, C, H_q, D) a prefill chunk (its mean query is used).
        k_cache, seq_lens, block_table: see the module docstring.
        scale: logit scale (TokenSelect uses 1.0, i.e. no 1/sqrt(D)).
        skip: (B,) bool; rows to leave unscored (set to -inf), e.g. Selection Cache hits.
        valid: (B, N_max) bool or None; False marks a token that takes no part (e.g. padding):
            it is left out of every head's softmax (the other tokens' probabilities are
            normalised without it) and scored -inf.
        check: validate seq_lens / block_table values (one host sync on CUDA).
        impl: "auto" (the kernels' own choice: simt where the cache allows 16-byte vector loads;
            see :mod:`tokenkernels.variants`), "plain", "simt", "tuned" (CUDA variants; the CPU
            ignores the name) or "reference". "tuned" is the bandwidth-bound scoring of issue #13
            (persistent blocks, q in registers, multi-stage cp.async, fused softmax statistics;
            bench/roofline/kv_select_score.md) for fp16 / bf16 caches with head_dim 64 / 128 / 256
            and at most 8 q-heads per KV head; other shapes and fp32 caches run "simt".

    Returns:
        (B, N_max) float32, -inf past each seq_len and where ``valid`` is False.
    """
    op = "score"
    q, k_cache, seq_lens = _tensor(q, "q", op), _tensor(k_cache, "k_cache", op), _tensor(seq_lens, "seq_lens", op)
    block_table, skip = _opt_tensor(block_table, "block_table", op), _opt_tensor(skip, "skip", op)
    valid = _opt_tensor(valid, "valid", op)
    scale, check = _real(scale, "scale", op), _flag(check, "check", op)
    run = _choose(impl, k_cache.device, op)
    if run == _variants.REFERENCE:
        return _ref.score(q, k_cache, seq_lens, block_table=block_table, scale=scale, skip=skip,
                          valid=valid, check=check)
    return torch.ops.tokenkernels.kv_select_score(q, k_cache, seq_lens, block_table, scale, skip, valid,
                                                  check, run)


def topk(scores: torch.Tensor, k: int, seq_lens: torch.Tensor, *, n_sink: int = 128,
         n_local: int = 512, reuse: Optional[torch.Tensor] = None,
         reuse_mask: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
         check: bool = True, impl: str = "auto") -> torch.Tensor:
    """Token indices to attend: sink + top-k + local window.

    Always the first ``n_sink`` and last ``n_local`` valid tokens, plus the ``k`` highest scores
    among the tokens in between (ties: lowest index). A request with seq_len <= n_sink + k +
    n_local gets all its tokens.

    Args:
        scores: (B, N_max) float32 (from :func:`score`).
        reuse, reuse_mask: (B, k) ascending middle picks and (B,) bool: rows with
            ``reuse_mask`` take their middle tokens from ``reuse`` instead of from ``scores``
            (the Selection Cache hit path): in order, the entries inside the current middle
            region that exceed the last entry kept -- duplicates and entries outside the region
            are dropped, and a list that is not ascending keeps an ascending subsequence
            (``[5, 9, -1, 7]`` keeps 5, 9), so the output stays ascending.
        out: (B, n_sink + k + n_local) int32 buffer to write into (CUDA-graph friendly).
        check: validate that seq_lens lie in [0, scores.size(1)] (always on the CPU; one host
            sync on CUDA, where unchecked lengths are clamped).
        impl: "auto" (on CUDA the proof-gated choice of :mod:`tokenkernels.variants`), "plain" /
            "simt" (CUDA: one block per request, a 4-pass radix select over the whole row),
            "tuned" (CUDA: the radix top-k of ``tokenkernels/radix_topk.h`` -- several blocks per
            row when the batch is small, 16-byte loads, warp-aggregated 11-bit histograms, the
            candidates compacted after the first pass; opt-in until proven on a GPU), or
            "reference". The result is the same for every impl (the CPU has one kernel).

    Returns:
        (B, n_sink + k + n_local) int32, ascending, padded with -1. When seq_len exceeds the
        budget, ``out[:, n_sink:n_sink + k]`` are exactly the k scored picks. The width must fit
        int32 and be at most ``max(scores.size(1), 2**20)`` (beyond the capacity a row is only
        -1 padding): a ValueError naming ``n_sink + k + n_local`` otherwise.
    """
    op = "topk"
    scores, seq_lens = _tensor(scores, "scores", op), _tensor(seq_lens, "seq_lens", op)
    k, n_sink, n_local = _nonneg(k, "k", op), _nonneg(n_sink, "n_sink", op), _nonneg(n_local, "n_local", op)
    _budget(k, n_sink, n_local, op, (scores.shape[1], "scores.size(1)") if scores.dim() == 2 else None)
    reuse, reuse_mask = _opt_tensor(reuse, "reuse", op), _opt_tensor(reuse_mask, "reuse_mask", op)
    out, check = _opt_tensor(out, "out", op), _flag(check, "check", op)
    run = _choose(impl, scores.device, op)
    if run == _variants.REFERENCE:
        return _ref.topk(scores, k, seq_lens, n_sink=n_sink, n_local=n_local, reuse=reuse,
                         reuse_mask=reuse_mask, out=out, check=check, impl=impl)
    if out is None:
        return torch.ops.tokenkernels.kv_select_topk(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, check,
                                                     run)
    torch.ops.tokenkernels.kv_select_topk_out(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, check, out,
                                              run)
    return out


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  indices: torch.Tensor, seq_lens: torch.Tensor, *,
                  block_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                  return_lse: bool = False, out: Optional[torch.Tensor] = None,
                  lse: Optional[torch.Tensor] = None, check: bool = True,
                  impl: str = "auto") -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Exact decode attention over the listed tokens, gathered straight from the cache.

    Args:
        q: (B, H_q, D), same dtype as the caches.
        indices: (B, K) token positions (-1 entries are skipped), e.g. from :func:`select`.
        scale: logit scale, default 1/sqrt(D).
        return_lse: also return the (B, H_q) float32 log-sum-exp of the scaled logits
            (-inf for a request with nothing to attend, whose output is 0).
        out, lse: preallocated (B, H_q, D) / (B, H_q) float32 buffers.
        impl: "auto", "plain" (CUDA: one block per request and KV head), "simt" (CUDA:
            split-KV), "tuned" (CUDA: the tensor-core attention core for fp16 / bf16 with D 64 or
            128 and 16-byte-aligned caches with unit stride on D, else simt; unproven; see
            :mod:`tokenkernels.variants` for what ``"auto"`` runs on CUDA; the CPU ignores the
            name) or "reference".
    """
    op = "sparse_decode"
    q, k_cache, v_cache = _tensor(q, "q", op), _tensor(k_cache, "k_cache", op), _tensor(v_cache, "v_cache", op)
    indices, seq_lens = _tensor(indices, "indices", op), _tensor(seq_lens, "seq_lens", op)
    block_table = _opt_tensor(block_table, "block_table", op)
    out, lse = _opt_tensor(out, "out", op), _opt_tensor(lse, "lse", op)
    return_lse, check = _flag(return_lse, "return_lse", op), _flag(check, "check", op)
    scale = _scale(q, scale, op)
    run = _choose(impl, k_cache.device, op)
    if run == _variants.REFERENCE:
        return _ref.sparse_decode(q, k_cache, v_cache, indices, seq_lens, block_table=block_table, scale=scale,
                                  return_lse=return_lse, out=out, lse=lse, check=check)
    if out is None and lse is None:
        o, l = torch.ops.tokenkernels.kv_select_sparse_decode(q, k_cache, v_cache, indices, seq_lens, block_table,
                                                              scale, check, run)
    else:
        o = out if out is not None else torch.empty_like(q)
        l = lse if lse is not None else q.new_empty(q.shape[:2], dtype=torch.float32)
        torch.ops.tokenkernels.kv_select_sparse_decode_out(q, k_cache, v_cache, indices, seq_lens, block_table,
                                                           scale, check, run, o, l)
    return (o, l) if return_lse else o


def _chunk_start(chunk_start, B: int, device: torch.device):
    """An int chunk start -> a (B,) int32 tensor (an int beyond int32 saturates, so the op's
    value check rejects it as out of range; beyond int64 it is a ValueError); a tensor as is."""
    if isinstance(chunk_start, torch.Tensor):
        return chunk_start
    try:
        v = as_int(chunk_start, "chunk_start", "kv_select.sparse_prefill")
    except TypeError:
        raise TypeError(f"tokenkernels.kv_select.sparse_prefill: chunk_start must be an int or an integer "
                        f"tensor, got {type(chunk_start).__name__}") from None
    return torch.full((B,), max(min(v, _I32_MAX), _I32_MIN), dtype=torch.int32, device=device)


def sparse_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   indices: torch.Tensor, seq_lens: torch.Tensor,
                   chunk_start: Union[int, torch.Tensor], *,
                   block_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   return_lse: bool = False, out: Optional[torch.Tensor] = None,
                   lse: Optional[torch.Tensor] = None, check: bool = True,
                   impl: str = "auto") -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Chunked sparse prefill (TokenSelect): a chunk attends the selected past plus itself.

    ``q`` (B, C, H_q, D) holds the queries of positions ``chunk_start[b] + c``; the chunk's own
    keys/values must already be in the cache at those positions. Request b's chunk has
    ``min(C, seq_lens[b] - chunk_start[b])`` real queries (rows past it are padding: output 0,
    lse -inf). Query c attends the entries of ``indices[b]`` in ``[0, chunk_start[b])`` (others
    and -1 are ignored; like :func:`sparse_decode`, every listed entry counts, so pass
    indices without duplicates, as :func:`topk` writes them) plus chunk positions ``chunk_start[b] .. + c``
    (causal) -- one softmax over both, i.e. the two partial attentions merged by log-sum-exp.
    ``impl``: "auto" / "plain" / "simt" run the device's prefill kernel (CUDA: one block per query
    row and KV head); "tuned" on CUDA the tensor-core attention core (fp16 / bf16 with D 64 or 128
    and 16-byte-aligned caches with unit stride on D; otherwise the same kernel as "simt"; unproven,
    see :mod:`tokenkernels.variants`); "reference" the PyTorch reference. The CPU has one kernel.

    Returns (B, C, H_q, D) in q's dtype (and lse (B, C, H_q) float32 with ``return_lse``).
    """
    op = "sparse_prefill"
    q, k_cache, v_cache = _tensor(q, "q", op), _tensor(k_cache, "k_cache", op), _tensor(v_cache, "v_cache", op)
    indices, seq_lens = _tensor(indices, "indices", op), _tensor(seq_lens, "seq_lens", op)
    block_table = _opt_tensor(block_table, "block_table", op)
    out, lse = _opt_tensor(out, "out", op), _opt_tensor(lse, "lse", op)
    return_lse, check = _flag(return_lse, "return_lse", op), _flag(check, "check", op)
    chunk_start = _chunk_start(chunk_start, q.shape[0] if q.dim() > 0 else 0, k_cache.device)
    scale = _scale(q, scale, op)
    run = _choose(impl, k_cache.device, op)
    if run == _variants.REFERENCE:
        return _ref.sparse_prefill(q, k_cache, v_cache, indices, seq_lens, chunk_start, block_table=block_table,
                                   scale=scale, return_lse=return_lse, out=out, lse=lse, check=check)
    if out is None and lse is None:
        o, l = torch.ops.tokenkernels.kv_select_sparse_prefill(q, k_cache, v_cache, indices, seq_lens, chunk_start,
                                                               block_table, scale, check, run)
    else:
        o = out if out is not None else torch.empty_like(q)
        l = lse if lse is not None else q.new_empty(q.shape[:3], dtype=torch.float32)
        torch.ops.tokenkernels.kv_select_sparse_prefill_out(q, k_cache, v_cache, indices, seq_lens, chunk_start,
                                                            block_table, scale, check, o, l, run)
    return (o, l) if return_lse else o


class SelectionCache:
    """TokenSelect's Selection Cache, decided on the device per request (no host sync).

    Per request it keeps the previous step's mean query (all heads, flattened, fp32) and the k
    middle picks of the last scored step. A step is a **hit** for request b when a previous
    query exists and ``cos(q_now, q_prev) > threshold`` (in fp32): the previous middle picks are
    reused (sink and local windows are rebuilt for the current length) and scoring is skipped
    for that request (the scoring kernels exit early for it). The stored query is replaced every
    step (consecutive queries are compared); the stored picks only on a miss.

    One cache per layer, passed to :func:`select` (any ``impl``, ``"reference"`` included: the
    state below is all there is). Its state is sized on first use (batch B, H_q * D, k); a call
    with other sizes starts afresh. ``reset(mask)`` forgets some requests (e.g. a finished slot).

    Attributes (device tensors, None until the first :func:`select`; read-only):
        hits, lookups: (B,) int64 per-request hit and lookup counts.
        last_hit: (B,) bool, the last step's decisions.
        prev_mid: (B, k) int32, the stored middle picks (what a hit reuses).
        prev_q: (B, H_q * D) fp32, the previous step's mean query.
        has_prev: (B,) bool, whether a request has a previous query.
    """

    def __init__(self, threshold: float = 0.9):
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise TypeError("tokenkernels.kv_select.SelectionCache: threshold must be a float")
        self.threshold = float(threshold)
        self.prev_q: Optional[torch.Tensor] = None     # (B, H_q * D) fp32
        self.prev_mid: Optional[torch.Tensor] = None   # (B, k) int32
        self.has_prev: Optional[torch.Tensor] = None   # (B,) bool
        self.hits: Optional[torch.Tensor] = None       # (B,) int64
        self.lookups: Optional[torch.Tensor] = None    # (B,) int64
        self.last_hit: Optional[torch.Tensor] = None   # (B,) bool, the last step's decision

    def _ensure(self, B: int, HD: int, k: int, device: torch.device) -> None:
        ok = (self.prev_q is not None and self.prev_q.shape == (B, HD) and self.prev_q.device == device
              and self.prev_mid.shape == (B, k))
        if not ok:
            self.prev_q = torch.zeros(B, HD, dtype=torch.float32, device=device)
            self.prev_mid = torch.full((B, k), -1, dtype=torch.int32, device=device)
            self.has_prev = torch.zeros(B, dtype=torch.bool, device=device)
            self.hits = torch.zeros(B, dtype=torch.long, device=device)
            self.lookups = torch.zeros(B, dtype=torch.long, device=device)

    def reset(self, mask: Optional[torch.Tensor] = None) -> None:
        """Forget every request, or those where ``mask`` (B,) bool is True (no host sync)."""
        if self.has_prev is None:
            return
        if mask is None:
            self.has_prev.zero_()
        else:
            self.has_prev &= ~mask.to(self.has_prev.device)

    def _decide(self, qm: torch.Tensor) -> torch.Tensor:
        """(B,) bool hit decision for mean queries ``qm`` (B, H_q, D) fp32 (state must exist)."""
        a = qm.reshape(qm.shape[0], -1).float()
        p = self.prev_q
        cos = ((a * p).sum(1) / (a.norm(dim=1) * p.norm(dim=1)).clamp_min(1e-12)).clamp(-1.0, 1.0)
        return self.has_prev & (cos > self.threshold)

    def _update(self, qm: torch.Tensor, idx: torch.Tensor, hit: torch.Tensor, n_sink: int, k: int) -> None:
        mid = idx[:, n_sink:n_sink + k]
        torch.where(hit[:, None], self.prev_mid, mid, out=self.prev_mid)
        self.prev_q.copy_(qm.reshape(qm.shape[0], -1))
        self.has_prev.fill_(True)
        self.hits += hit
        self.lookups += 1
        self.last_hit = hit

    @property
    def hit_count(self) -> torch.Tensor:
        """Total hits over all requests (a device scalar; reading it is the caller's sync)."""
        return self.hits.sum() if self.hits is not None else torch.zeros((), dtype=torch.long)

    @property
    def lookup_count(self) -> torch.Tensor:
        return self.lookups.sum() if self.lookups is not None else torch.zeros((), dtype=torch.long)


def _drop_masked(idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Remove the entries of idx (B, W) int32 (ascending, -1 padded) where valid (B, N) is
    False, keeping the rest ascending and -1 padded (on the device, no host sync)."""
    keep = (idx >= 0) & valid.gather(1, idx.clamp(min=0).long())
    key = torch.where(keep, idx, torch.full_like(idx, _I32_MAX)).sort(dim=1).values
    return torch.where(key == _I32_MAX, torch.full_like(key, -1), key)


def select(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, *, k: int,
           n_sink: int = 128, n_local: int = 512, block_table: Optional[torch.Tensor] = None,
           scale: float = 1.0, cache: Optional[SelectionCache] = None,
           valid: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
           check: bool = True, impl: str = "auto") -> torch.Tensor:
    """:func:`score` + :func:`topk` in one call, optionally through a :class:`SelectionCache`.

    ``valid`` (B, N_max) bool or None: False marks a token that is never selected (padding, or
    outside a sliding window). Masked tokens are left out of the criticality softmax (see
    :func:`score`) and removed from the result: the sink and local windows stay positional (the
    first ``n_sink`` / last ``n_local`` positions below seq_len, minus their masked tokens) and
    the middle is the ``k`` best *unmasked* tokens in between (fewer when fewer are unmasked).
    The Selection Cache stores and reuses the middle picks as :func:`topk` made them, so a hit
    drops masked tokens again under the current mask.

    ``impl``: as for :func:`score` ("reference": every step in the PyTorch reference, the cache
    included).

    Returns (B, n_sink + k + n_local) int32 indices, ascending, -1 padded (see :func:`topk`),
    ready for :func:`sparse_decode` / :func:`sparse_prefill`.
    """
    op = "select"
    q, k_cache, seq_lens = _tensor(q, "q", op), _tensor(k_cache, "k_cache", op), _tensor(seq_lens, "seq_lens", op)
    k, n_sink, n_local = _nonneg(k, "k", op), _nonneg(n_sink, "n_sink", op), _nonneg(n_local, "n_local", op)
    block_table = _opt_tensor(block_table, "block_table", op)
    _budget(k, n_sink, n_local, op, _capacity_of(k_cache, block_table))
    valid, out = _opt_tensor(valid, "valid", op), _opt_tensor(out, "out", op)
    scale, check = _real(scale, "scale", op), _flag(check, "check", op)
    if cache is not None and not isinstance(cache, SelectionCache):
        raise TypeError(f"tokenkernels.kv_select.select: cache must be a SelectionCache, got {type(cache).__name__}")
    # scoring runs what impl resolves to ("auto": proof-gated, see tokenkernels.variants), not
    # the op-level "auto" (the kernels' own heuristic, which would pick the unproven tuned kernel)
    # (topk runs unchecked below: score has validated seq_lens against the same capacity when
    # check is set, so a second host sync would buy nothing)
    run = _choose(impl, k_cache.device, op)
    if run == _variants.REFERENCE:
        return _ref.select(q, k_cache, seq_lens, k=k, n_sink=n_sink, n_local=n_local, block_table=block_table,
                           scale=scale, cache=cache, valid=valid, out=out, check=check)
    masked = valid is not None
    if cache is None:
        s = torch.ops.tokenkernels.kv_select_score(q, k_cache, seq_lens, block_table, scale, None, valid,
                                                   check, run)
        idx = topk(s, k, seq_lens, n_sink=n_sink, n_local=n_local, out=out, check=False, impl=run)
    else:
        if q.dim() not in (3, 4):
            raise ValueError(f"tokenkernels.kv_select.select: q must be (B, H_q, D) or (B, C, H_q, D), "
                             f"got {tuple(q.shape)}")
        qm = q.float().mean(1) if q.dim() == 4 else q.float()
        cache._ensure(qm.shape[0], qm.shape[1] * qm.shape[2], k, q.device)
        hit = cache._decide(qm)
        s = torch.ops.tokenkernels.kv_select_score(qm, k_cache, seq_lens, block_table, scale, hit, valid,
                                                   check, run)
        idx = topk(s, k, seq_lens, n_sink=n_sink, n_local=n_local, reuse=cache.prev_mid, reuse_mask=hit,
                   out=out, check=False, impl=run)
        cache._update(qm, idx, hit, n_sink, k)
    if not masked:
        return idx
    kept = _drop_masked(idx, valid)   # (after the cache stored topk's own middle picks)
    return kept if out is None else out.copy_(kept)


# ------------------------------------------------------------------ fake (meta) implementations
# Shapes only, for torch.compile / FakeTensor tracing (every tensor on one device there). They
# also run when a meta tensor is mixed with real ones (the dispatcher picks Meta over CPU / CUDA),
# where the C++ checks never run: so they refuse mixed devices with the C++ message (check_device
# in csrc/check.h, a ValueError; the reference tensor as in csrc/kv_select/kv_select_args.h),
# instead of returning a shape-only or uninitialised result. Every other check is the kernels'.
def _fake_same_device(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"tokenkernels.kv_select.{op}: {name} is on {t.device} but {ref_name} is on "
                             f"{ref.device}")


@torch.library.register_fake("tokenkernels::kv_select_score")
def _score_fake(q, k_cache, seq_lens, block_table, scale, skip, valid, check, impl):
    _fake_same_device("score", "k_cache", k_cache, q=q, seq_lens=seq_lens, block_table=block_table, skip=skip,
                      valid=valid)
    n = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    return q.new_empty((q.shape[0], n), dtype=torch.float32)


@torch.library.register_fake("tokenkernels::kv_select_topk")
def _topk_fake(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, check, impl="auto"):
    _fake_same_device("topk", "scores", scores, seq_lens=seq_lens, reuse=reuse, reuse_mask=reuse_mask)
    return scores.new_empty((scores.shape[0], n_sink + k + n_local), dtype=torch.int32)


@torch.library.register_fake("tokenkernels::kv_select_topk_out")
def _topk_out_fake(scores, k, seq_lens, n_sink, n_local, reuse, reuse_mask, check, out, impl="auto"):
    _fake_same_device("topk", "scores", scores, seq_lens=seq_lens, reuse=reuse, reuse_mask=reuse_mask, out=out)
    return None


@torch.library.register_fake("tokenkernels::kv_select_sparse_decode")
def _decode_fake(q, k_cache, v_cache, indices, seq_lens, block_table, scale, check, impl):
    _fake_same_device("sparse_decode", "k_cache", k_cache, q=q, v_cache=v_cache, indices=indices,
                      seq_lens=seq_lens, block_table=block_table)
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.register_fake("tokenkernels::kv_select_sparse_decode_out")
def _decode_out_fake(q, k_cache, v_cache, indices, seq_lens, block_table, scale, check, impl, out, lse):
    _fake_same_device("sparse_decode", "k_cache", k_cache, q=q, v_cache=v_cache, indices=indices,
                      seq_lens=seq_lens, block_table=block_table, out=out, lse=lse)
    return None


@torch.library.register_fake("tokenkernels::kv_select_sparse_prefill")
def _prefill_fake(q, k_cache, v_cache, indices, seq_lens, chunk_start, block_table, scale, check, impl="auto"):
    _fake_same_device("sparse_prefill", "k_cache", k_cache, q=q, v_cache=v_cache, indices=indices,
                      seq_lens=seq_lens, chunk_start=chunk_start, block_table=block_table)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("tokenkernels::kv_select_sparse_prefill_out")
def _prefill_out_fake(q, k_cache, v_cache, indices, seq_lens, chunk_start, block_table, scale, check, out, lse,
                      impl="auto"):
    _fake_same_device("sparse_prefill", "k_cache", k_cache, q=q, v_cache=v_cache, indices=indices,
                      seq_lens=seq_lens, chunk_start=chunk_start, block_table=block_table, out=out, lse=lse)
    return None


__all__ = ["score", "topk", "sparse_decode", "sparse_prefill", "select", "SelectionCache", "capacity"]
