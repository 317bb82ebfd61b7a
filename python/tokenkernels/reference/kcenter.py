"""Pure-PyTorch reference for the kcenter family: clear code, the test oracle.

The greedy is the textbook O(k·N) loop over a precomputed distance matrix; distances are
computed from the Gram matrix exactly as the kernels define them (fp32 by default):

    cosine: d(i, j) = 1 - <x_i, x_j> / (max(|x_i|, 1e-8) · max(|x_j|, 1e-8))
    l2:     d(i, j) = sqrt(max(|x_i|² + |x_j|² - 2<x_i, x_j>, 0))
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._common import IntOrTensor, as_batch, mask_2d, per_item, split_k, valid_mask

EPS = 1e-8


def pairwise_distance(x: torch.Tensor, metric: str = "cosine",
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


def greedy_kcenter(d: torch.Tensor, valid: torch.Tensor, k: int,
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
    dtype: torch.dtype = torch.float32,
):
    """Reference of :func:`tokenkernels.kcenter` (same arguments; ``dtype`` sets the precision
    of the distance matrix). Random starts draw the same numbers as the op for the same
    generator state."""
    from .._ops.kcenter import _resolve_start

    x3, squeeze = as_batch(x, "x", "kcenter")
    B, N = x3.shape[0], x3.shape[1]
    kmax, k_items = split_k(k, B, x3.device, "kcenter")
    lengths = per_item(lengths, B, "lengths", "kcenter")
    exclude = mask_2d(exclude, B, N, squeeze, "exclude", "kcenter")
    starts = _resolve_start(start, x3, squeeze, lengths, exclude, generator)
    valid = valid_mask(B, N, lengths, exclude, x3.device).cpu()
    idx = torch.full((B, kmax), -1, dtype=torch.long)
    radii = torch.full((B, kmax), float("nan"), dtype=torch.float32)
    for b in range(B):
        kb = kmax if k_items is None else int(k_items[b])
        kb = min(kb, int(valid[b].sum()))
        d = pairwise_distance(x3[b].cpu(), metric, dtype)
        st = None if starts is None else int(starts[b])
        i_b, r_b = greedy_kcenter(d, valid[b], kb, st)
        if sorted:
            order = torch.argsort(i_b[:kb])
            i_b[:kb], r_b[:kb] = i_b[:kb][order], r_b[:kb][order]
        idx[b, :kb], radii[b, :kb] = i_b, r_b
    idx, radii = idx.to(x.device), radii.to(x.device)
    if squeeze:
        idx, radii = idx[0], radii[0]
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


def coverage_select(
    sim: torch.Tensor,
    k: IntOrTensor,
    *,
    lengths: Optional[torch.Tensor] = None,
    row_lengths: Optional[torch.Tensor] = None,
    exclude: Optional[torch.Tensor] = None,
    return_gains: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """Reference of :func:`tokenkernels.coverage_select`: the plain greedy, recomputing every
    candidate's marginal gain at every step (O(k·M·N))."""
    s3, squeeze = as_batch(sim, "sim", "coverage_select")
    B, M, N = s3.shape
    kmax, k_items = split_k(k, B, s3.device, "coverage_select")
    lengths = per_item(lengths, B, "lengths", "coverage_select")
    row_lengths = per_item(row_lengths, B, "row_lengths", "coverage_select")
    exclude = mask_2d(exclude, B, N, squeeze, "exclude", "coverage_select")
    valid = valid_mask(B, N, lengths, exclude, s3.device).cpu()
    idx = torch.full((B, kmax), -1, dtype=torch.long)
    gains = torch.full((B, kmax), float("nan"), dtype=torch.float32)
    for b in range(B):
        R = M if row_lengths is None else int(row_lengths[b])
        S = s3[b, :R].cpu().to(dtype)                     # (R, N)
        cur = torch.zeros(R, dtype=dtype)                 # coverage of each row so far
        avail = valid[b].clone()
        kb = min(kmax if k_items is None else int(k_items[b]), int(avail.sum()))
        for s in range(kb):
            g = (S - cur[:, None]).clamp_min(0).sum(0)    # marginal gain of every candidate
            g[~avail] = -float("inf")
            p = int(torch.argmax(g))
            idx[b, s], gains[b, s] = p, float(g[p])
            avail[p] = False
            cur = torch.maximum(cur, S[:, p])
    idx, gains = idx.to(sim.device), gains.to(sim.device)
    if squeeze:
        idx, gains = idx[0], gains[0]
    return (idx, gains) if return_gains else idx
