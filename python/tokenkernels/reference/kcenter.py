"""Pure-PyTorch reference for the kcenter family: clear code, the test oracle, and one
implementation of every public op (``impl="reference"``).

:func:`kcenter`, :func:`coverage_select` and :func:`mmtok_similarity` have the signatures and
return types of ``tokenkernels.kcenter`` / ``coverage_select`` / ``mmtok_similarity``
(``mmtok_similarity`` *is* the public function: it has no kernel). They compute in fp32 like the
kernels; the private ``_select`` / ``_coverage`` take a ``dtype`` (float64 for a ground truth).

The greedy is the textbook O(k·N) loop over a precomputed distance matrix; distances are
computed from the Gram matrix exactly as the kernels define them:

    cosine: d(i, j) = 1 - <x_i, x_j> / (max(|x_i|, 1e-8) · max(|x_j|, 1e-8))
    l2:     d(i, j) = sqrt(max(|x_i|² + |x_j|² - 2<x_i, x_j>, 0))
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import variants
from .._common import (IntOrTensor, as_batch, as_bool, mask_2d, per_item, require_shape, resolve_start,
                       split_k, valid_mask)

EPS = 1e-8
_METRICS = ("cosine", "l2")


def _pairwise_distance(x: torch.Tensor, metric: str = "cosine",
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, D) -> (N, N) distances computed in ``dtype`` (float32 like the kernels, or float64
    for a ground truth)."""
    x = x.to(dtype)
    g = x @ x.T
    if metric == "cosine":
        inv = 1.0 / x.norm(dim=1).clamp_min(EPS)
        return 1.0 - g * inv[:, None] * inv[None, :]
    if metric == "l2":
        sq = (x * x).sum(1)
        return (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min(0.0).sqrt()
    raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")


def _greedy_kcenter(d: torch.Tensor, valid: torch.Tensor, k: int,
                    start: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-center on one item's distance matrix ``d`` (N, N) over the ``valid`` tokens.

    ``start=None`` applies the isolated rule. Returns (k,) indices and radii, padded -1 / NaN.
    """
    N = d.shape[0]
    idx = torch.full((k,), -1, dtype=torch.long)
    radii = torch.full((k,), float("nan"), dtype=torch.float32)
    if k == 0 or not bool(valid.any()):
        return idx, radii
    inf = torch.tensor(float("inf"), dtype=d.dtype)
    if start is None:
        # nearest-neighbour distance of each valid token to the other valid tokens
        dd = d.clone()
        dd[:, ~valid] = inf
        dd.fill_diagonal_(inf)
        nn = dd.min(dim=1).values
        nn[~valid] = -inf
        p = int(torch.argmax(nn))            # first maximum -> lowest index on ties
        r0 = float(nn[p])
    else:
        p, r0 = int(start), float("inf")
    mind = torch.full((N,), float("inf"), dtype=d.dtype)
    mind[~valid] = -inf                       # never picked
    for s in range(k):
        idx[s] = p
        radii[s] = r0 if s == 0 else float(mind[p])
        mind[p] = -inf                        # selected
        mind = torch.minimum(mind, d[p])      # distance to the nearest selected token
        p = int(torch.argmax(mind))
        if mind[p] == -inf:                   # nothing left to pick
            break
    return idx, radii



def _check_features(t: torch.Tensor, name: str, op: str) -> None:
    """What the kernels' argument checks say about x / sim (csrc/kcenter/kcenter_args.h)."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"tokenkernels.{op}: {name} must be float32, float16 or bfloat16, "
                           f"got {t.dtype}")


def _check_per_item_values(k_items, kmax: int, counts, op: str, what: str) -> None:
    """k (per item) in [0, k_max] and at most the valid count: the kernels' check=True."""
    ks = [kmax] * len(counts) if k_items is None else [int(v) for v in k_items.cpu()]
    for b, (kb, c) in enumerate(zip(ks, counts)):
        if op == "kcenter":
            if kb < 0:
                raise RuntimeError(f"tokenkernels.{op}: k must be >= 0, got k[{b}] = {kb}")
            if kb > kmax:
                raise RuntimeError(f"tokenkernels.{op}: k[{b}] = {kb} exceeds k_max = {kmax}")
        elif not 0 <= kb <= kmax:
            raise RuntimeError(f"tokenkernels.{op}: k[{b}] = {kb} must lie in [0, k_max = {kmax}]")
        if kb > c:
            raise RuntimeError(f"tokenkernels.{op}: k = {kb} exceeds the number of valid {what} "
                               f"({c}) of item {b}" + (" (after lengths/exclude)" if op == "kcenter" else ""))


def _check_lengths(lengths, N: int, op: str, name: str = "lengths", bound: str = "N") -> None:
    if lengths is not None and bool(((lengths < 0) | (lengths > N)).any()):
        raise RuntimeError(f"tokenkernels.{op}: {name} must lie in [0, {bound}={N}], got {lengths.cpu()}")


def _select(x, k, *, lengths=None, metric="cosine", start="isolated", exclude=None,
            sorted=False, generator=None, k_max=None, check=True,
            dtype: torch.dtype = torch.float32):
    """:func:`kcenter` with distances in ``dtype``; returns (idx, radii) (batched like x)."""
    op = "kcenter"
    x3, squeeze = as_batch(x, "x", op)
    _check_features(x3, "x", op)
    if not isinstance(metric, str):
        raise TypeError(f"tokenkernels.{op}: metric must be a str, got {type(metric).__name__}")
    if metric not in _METRICS:
        raise ValueError(f"tokenkernels.{op}: metric must be one of 'cosine', 'l2', got {metric!r}")
    B, N, D = x3.shape
    if D < 1 and N > 0:
        raise RuntimeError(f"tokenkernels.{op}: x must have D >= 1 features, got D = {D}")
    kmax, k_items = split_k(k, B, x3.device, op, k_max)
    require_shape(k_items, (B,), "k", op, "be an int or have shape")
    lengths = require_shape(per_item(lengths, B, "lengths", op), (B,), "lengths", op)
    exclude = require_shape(mask_2d(exclude, B, N, squeeze, "exclude", op), (B, N), "exclude", op)
    starts = resolve_start(start, x3, lengths, exclude, generator)
    require_shape(starts, (B,), "start", op)
    if check:
        _check_lengths(lengths, N, op)
    valid = valid_mask(B, N, lengths, exclude, x3.device).cpu()
    counts = [int(c) for c in valid.sum(1)]
    if check:
        _check_per_item_values(k_items, kmax, counts, op, "tokens")
    idx = torch.full((B, kmax), -1, dtype=torch.long)
    radii = torch.full((B, kmax), float("nan"), dtype=torch.float32)
    for b in range(B):
        kb = kmax if k_items is None else min(max(int(k_items[b]), 0), kmax)
        kb = min(kb, counts[b])           # check=False: missing picks stay -1 / NaN
        if kb == 0:
            continue
        st = None
        if starts is not None:
            st = int(starts[b])
            if not (0 <= st < N and bool(valid[b, st])):
                if check:
                    raise RuntimeError(f"tokenkernels.{op}: start index {st} of item {b} is not a "
                                       f"valid token (out of range, beyond lengths, or excluded)")
                st = int(valid[b].to(torch.int8).argmax())   # like the CPU kernel: first valid
        d = _pairwise_distance(x3[b].cpu(), metric, dtype)
        i_b, r_b = _greedy_kcenter(d, valid[b], kb, st)
        if sorted:
            order = torch.argsort(i_b[:kb])
            i_b[:kb], r_b[:kb] = i_b[:kb][order], r_b[:kb][order]
        idx[b, :kb], radii[b, :kb] = i_b, r_b
    idx, radii = idx.to(x3.device), radii.to(x3.device)
    if squeeze:
        idx, radii = idx[0], radii[0]
    return idx, radii


def kcenter(
    x: torch.Tensor,
    k: IntOrTensor,
    *,
    lengths: Optional[torch.Tensor] = None,
    metric: str = "cosine",
    start: Union[str, int, torch.Tensor] = "isolated",
    exclude: Optional[torch.Tensor] = None,
    sorted: bool = False,
    return_radii: bool = False,
    generator: Optional[torch.Generator] = None,
    k_max: Optional[int] = None,
    check: bool = True,
    impl: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Reference of :func:`tokenkernels.kcenter` (same arguments and results, fp32 distances).
    ``impl`` is validated like the op's and otherwise ignored: this is one implementation.
    Random starts draw the same numbers as the op for the same generator state."""
    variants.choose("kcenter", impl, x.device if isinstance(x, torch.Tensor) else "cpu", "kcenter")
    sorted, return_radii, check = (as_bool(v, name, "kcenter") for v, name in
                                   ((sorted, "sorted"), (return_radii, "return_radii"), (check, "check")))
    idx, radii = _select(x, k, lengths=lengths, metric=metric, start=start, exclude=exclude,
                         sorted=sorted, generator=generator, k_max=k_max, check=check)
    return (idx, radii) if return_radii else idx


def divprune_style(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's loop as its paper's code runs it (written here from that description): a full
    1 - cos matrix, first pick by the second-smallest entry of each column (nearest neighbour
    but itself), then every step re-gathers *all* picked rows and takes a column minimum
    (O(k²·N)). Used by the parity test and as the bench's baseline. x: (N, D)."""
    xn = x.float() / x.float().norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.T
    picks = torch.empty(k, dtype=torch.long, device=x.device)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(dist, 0, picks[:i]), dim=0).values
        picks[i] = torch.argmax(scores)
    return picks


def _coverage(sim, k, *, lengths=None, row_lengths=None, exclude=None, k_max=None, check=True,
              dtype: torch.dtype = torch.float32):
    """:func:`coverage_select` with gains in ``dtype``: the plain greedy, recomputing every
    candidate's marginal gain at every step (O(k·M·N)). Returns (idx, gains)."""
    op = "coverage_select"
    s3, squeeze = as_batch(sim, "sim", op)
    _check_features(s3, "sim", op)
    B, M, N = s3.shape
    kmax, k_items = split_k(k, B, s3.device, op, k_max)
    require_shape(k_items, (B,), "k", op, "be an int or have shape")
    lengths = require_shape(per_item(lengths, B, "lengths", op), (B,), "lengths", op)
    row_lengths = require_shape(per_item(row_lengths, B, "row_lengths", op), (B,), "row_lengths", op)
    exclude = require_shape(mask_2d(exclude, B, N, squeeze, "exclude", op), (B, N), "exclude", op)
    if check:
        if bool((s3 < 0).any()):
            raise RuntimeError(f"tokenkernels.{op}: sim must be non-negative (coverage of a row is "
                               f"the max similarity of its selected candidates)")
        _check_lengths(row_lengths, M, op, "row_lengths", "M")
        _check_lengths(lengths, N, op)
    valid = valid_mask(B, N, lengths, exclude, s3.device).cpu()
    counts = [int(c) for c in valid.sum(1)]
    if check:
        _check_per_item_values(k_items, kmax, counts, op, "candidates")
    idx = torch.full((B, kmax), -1, dtype=torch.long)
    gains = torch.full((B, kmax), float("nan"), dtype=torch.float32)
    for b in range(B):
        R = M if row_lengths is None else min(max(int(row_lengths[b]), 0), M)
        S = s3[b, :R].cpu().to(dtype)                     # (R, N)
        cur = torch.zeros(R, dtype=dtype)                 # coverage of each row so far
        avail = valid[b].clone()
        kb = kmax if k_items is None else min(max(int(k_items[b]), 0), kmax)
        kb = min(kb, counts[b])
        for s in range(kb):
            g = (S - cur[:, None]).clamp_min(0).sum(0)    # marginal gain of every candidate
            g[~avail] = -float("inf")
            p = int(torch.argmax(g))
            idx[b, s], gains[b, s] = p, float(g[p])
            avail[p] = False
            cur = torch.maximum(cur, S[:, p])
    idx, gains = idx.to(s3.device), gains.to(s3.device)
    if squeeze:
        idx, gains = idx[0], gains[0]
    return idx, gains


def coverage_select(
    sim: torch.Tensor,
    k: IntOrTensor,
    *,
    lengths: Optional[torch.Tensor] = None,
    row_lengths: Optional[torch.Tensor] = None,
    exclude: Optional[torch.Tensor] = None,
    return_gains: bool = False,
    k_max: Optional[int] = None,
    check: bool = True,
    impl: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Reference of :func:`tokenkernels.coverage_select` (same arguments and results, fp32
    gains); ``impl`` is validated like the op's and otherwise ignored."""
    variants.choose("kcenter", impl, sim.device if isinstance(sim, torch.Tensor) else "cpu",
                    "coverage_select")
    return_gains = as_bool(return_gains, "return_gains", "coverage_select")
    check = as_bool(check, "check", "coverage_select")
    idx, gains = _coverage(sim, k, lengths=lengths, row_lengths=row_lengths, exclude=exclude,
                           k_max=k_max, check=check)
    return (idx, gains) if return_gains else idx


# ------------------------------------------------------------------ mmtok_similarity
# Pure PyTorch with no kernel: this function is tokenkernels.mmtok_similarity itself.
def _tau(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"tokenkernels.mmtok_similarity: {name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not (v > 0.0 and v < float("inf")):
        raise ValueError(f"tokenkernels.mmtok_similarity: {name} must be a finite temperature > 0, got {v}")
    return v


def mmtok_similarity(
    text: torch.Tensor,
    vision: torch.Tensor,
    *,
    alpha: float = 0.5,
    tau_tv: float = 0.02,
    tau_vv: Optional[float] = None,
    text_lengths: Optional[torch.Tensor] = None,
    vision_lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Build MMTok's coverage matrix from text and vision embeddings.

    Rows = text tokens then vision tokens, columns = vision candidates:
    ``alpha * softmax(t·vᵀ / tau_tv)`` (each text token's distribution over vision tokens) on
    top of ``(1 - alpha) * softmax(v·vᵀ / tau_vv)``; embeddings are L2-normalised first and
    ``tau_vv`` defaults to ``tau_tv``. Ragged inputs: text rows past ``text_lengths`` are zero
    (cover nothing) and vision columns past ``vision_lengths`` get zero probability; pass
    ``row_lengths``/``lengths`` to :func:`coverage_select` as well. Returns (B, T + V, V) fp32
    (or (T + V, V) for 2-D inputs), ready for :func:`coverage_select`.
    """
    t3, squeeze = as_batch(text, "text", "mmtok_similarity")
    v3, _ = as_batch(vision, "vision", "mmtok_similarity")
    if v3.device != t3.device:   # (a meta one would give a shape-only or a wrong result)
        raise ValueError(f"tokenkernels.mmtok_similarity: vision is on {v3.device} but text is on {t3.device}")
    if t3.shape[0] != v3.shape[0] or t3.shape[2] != v3.shape[2]:
        raise ValueError(f"tokenkernels.mmtok_similarity: text {tuple(text.shape)} and vision "
                         f"{tuple(vision.shape)} must share batch and feature sizes")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"tokenkernels.mmtok_similarity: alpha must be a float, got {type(alpha).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"tokenkernels.mmtok_similarity: alpha must lie in [0, 1], got {alpha}")
    # (tau = 0 or NaN made NaN scores; a negative tau inverted the softmax)
    tau_tv = _tau(tau_tv, "tau_tv")
    tau_vv = tau_tv if tau_vv is None else _tau(tau_vv, "tau_vv")
    B, T, V = t3.shape[0], t3.shape[1], v3.shape[1]
    t = torch.nn.functional.normalize(t3.float(), dim=-1)
    v = torch.nn.functional.normalize(v3.float(), dim=-1)
    op = "mmtok_similarity"
    # tensors on text's device, like the kcenter ops' lengths (ints / lists are made there)
    for name, lens in (("vision_lengths", vision_lengths), ("text_lengths", text_lengths)):
        if isinstance(lens, torch.Tensor) and lens.device != t3.device:
            raise ValueError(f"tokenkernels.{op}: {name} is on {lens.device} but text is on {t3.device}")
    vision_lengths, text_lengths = (None if lens is None else per_item(lens, B, name, op).to(t3.device)
                                    for lens, name in ((vision_lengths, "vision_lengths"),
                                                       (text_lengths, "text_lengths")))
    require_shape(vision_lengths, (B,), "vision_lengths", op)
    require_shape(text_lengths, (B,), "text_lengths", op)
    col_ok = valid_mask(B, V, vision_lengths, None, v.device)
    neg = torch.finfo(torch.float32).min
    s_tv = torch.softmax((t @ v.transpose(1, 2) / tau_tv).masked_fill(~col_ok[:, None, :], neg), -1)
    s_vv = torch.softmax((v @ v.transpose(1, 2) / tau_vv).masked_fill(~col_ok[:, None, :], neg), -1)
    row_t = valid_mask(B, T, text_lengths, None, v.device)
    s_tv = s_tv * row_t[:, :, None]
    s_vv = s_vv * col_ok[:, :, None]
    out = torch.cat([alpha * s_tv, (1.0 - alpha) * s_vv], dim=1)
    return out[0] if squeeze else out
