"""fp64 replay oracles for the kcenter family.

Exact equality of picks with the (fp32) reference is only meaningful without near-ties, so every
test checks *validity* instead: the kernel's own picks are replayed against an fp64 distance
(or coverage) matrix, and at each step the picked token must be within tolerance of the best
available candidate. Exact equality is added on top where the fp64 greedy's margins show the
data are tie-free (see :func:`kcenter_margin` / :func:`coverage_margin`).

All tolerances come from ``tokenkernels.testing``; distances are compared in normalised key space
(cosine: d; l2: d² / max squared norm), gains normalised by (valid rows x max similarity).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from tokenkernels.reference import kcenter as ref

from tokenkernels.testing import tol

INF = float("inf")


# ------------------------------------------------------------------------------------ basics
def as3(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t


def as2(t: torch.Tensor) -> torch.Tensor:
    """(k,) -> (1, k) for outputs of a 2-D call."""
    return t.unsqueeze(0) if t.dim() == 1 else t


def per_item_list(v, B: int, default: int) -> List[int]:
    if v is None:
        return [default] * B
    if isinstance(v, int):
        return [v] * B
    v = torch.as_tensor(v).reshape(-1).cpu()
    if v.numel() == 1 and B != 1:
        return [int(v)] * B
    return [int(a) for a in v]


def valid_mask(B: int, N: int, lengths=None, exclude=None) -> torch.Tensor:
    """(B, N) bool on CPU: j < lengths[b] and not exclude[b, j]."""
    valid = torch.ones(B, N, dtype=torch.bool)
    if lengths is not None:
        L = torch.tensor(per_item_list(lengths, B, N))
        valid &= torch.arange(N)[None, :] < L[:, None]
    if exclude is not None:
        ex = exclude.cpu()
        if ex.dim() == 1:
            ex = ex.unsqueeze(0)
        valid &= ~ex
    return valid


def expected_counts(B: int, k, valid: torch.Tensor) -> List[int]:
    """Number of real picks per item: min(k_b, valid tokens) (what check=False pads to)."""
    ks = per_item_list(k, B, 0)
    return [min(kb, int(valid[b].sum())) for b, kb in enumerate(ks)]


def _key(d: torch.Tensor, metric: str) -> torch.Tensor:
    return d if metric == "cosine" else d * d


def _kc_scale(xv: torch.Tensor, metric: str) -> float:
    """Normalisation of keys: 1 for cosine, max squared norm for l2 (fp32 Gram error ~ eps*|x|²)."""
    if metric == "cosine" or xv.shape[0] == 0:
        return 1.0
    return max(float((xv * xv).sum(1).max()), 1e-30)


def _check_padding(idx_b: torch.Tensor, aux_b: torch.Tensor, n: int, what: str, b: int):
    assert (idx_b[n:] == -1).all(), f"item {b}: {what} indices after the first {n} must be -1, got {idx_b.tolist()}"
    assert torch.isnan(aux_b[n:]).all(), f"item {b}: {what} values after the first {n} must be NaN, got {aux_b.tolist()}"


def _check_picks_valid(p: Sequence[int], valid_b: torch.Tensor, b: int):
    N = valid_b.shape[0]
    for j in p:
        assert 0 <= j < N, f"item {b}: pick {j} out of range [0, {N})"
        assert bool(valid_b[j]), f"item {b}: pick {j} is not a valid token (beyond lengths or excluded)"
    assert len(set(p)) == len(p), f"item {b}: picks are not distinct: {list(p)}"


# ----------------------------------------------------------------------------------- kcenter
def replay_kcenter(x: torch.Tensor, idx: torch.Tensor, radii: torch.Tensor, *, k, metric: str,
                   start, lengths=None, exclude=None, dtype: Optional[torch.dtype] = None):
    """Validity of kcenter output (pick order, i.e. sorted=False) against fp64 distances.

    start: "isolated", "any" (first pick is any valid token with radius +inf: random starts), or
    a list / (B,) tensor of forced first picks ("first" and index starts).
    """
    x3 = as3(x).detach().cpu()
    idx, radii = as2(idx).cpu(), as2(radii).cpu()
    B, N = x3.shape[0], x3.shape[1]
    dtype = dtype or x.dtype
    atol = tol(dtype, "dist")
    valid = valid_mask(B, N, lengths, exclude)
    counts = expected_counts(B, k, valid)
    assert idx.shape[0] == B and radii.shape == idx.shape
    assert idx.dtype == torch.int64 and radii.dtype == torch.float32
    if isinstance(start, str) and start not in ("isolated", "any"):
        raise ValueError(start)
    starts = None if isinstance(start, str) else per_item_list(start, B, 0)
    for b in range(B):
        n = counts[b]
        _check_padding(idx[b], radii[b], n, "kcenter", b)
        p = [int(j) for j in idx[b, :n]]
        _check_picks_valid(p, valid[b], b)
        if n == 0:
            continue
        vids = torch.nonzero(valid[b]).flatten()
        xv = x3[b, vids].double()                       # the same low-precision values, upcast
        scale = _kc_scale(xv, metric)
        K = _key(ref._pairwise_distance(xv, metric, torch.float64), metric) / scale
        pos = {int(j): t for t, j in enumerate(vids)}   # original index -> compact index
        c = [pos[j] for j in p]
        r = radii[b, :n].double()
        rk = _key(r, metric) / scale                    # reported radii in key space
        M = len(vids)
        # first pick
        if start == "isolated":
            KK = K.clone()
            KK.fill_diagonal_(INF)
            nn = KK.min(1).values                        # +inf when M == 1
            best = float(nn.max())
            got = float(nn[c[0]])
            if math.isinf(best):
                assert math.isinf(got) and math.isinf(float(r[0])) and r[0] > 0, \
                    f"item {b}: single valid token must have radius +inf, got {float(r[0])}"
            else:
                assert got >= best - atol, (f"item {b}: isolated first pick {p[0]} has nn-key {got:.8g}, "
                                            f"best available {best:.8g} (normalised, tol {atol})")
                assert abs(float(rk[0]) - got) <= atol + atol * abs(got), \
                    f"item {b}: radius[0] {float(r[0]):.8g} vs fp64 nn-distance (key {got:.8g})"
        else:
            if starts is not None:
                assert p[0] == starts[b], f"item {b}: first pick {p[0]} != forced start {starts[b]}"
            assert math.isinf(float(r[0])) and float(r[0]) > 0, \
                f"item {b}: radius of a forced first pick must be +inf, got {float(r[0])}"
        # later picks
        mind = K[c[0]].clone()
        avail = torch.ones(M, dtype=torch.bool)
        avail[c[0]] = False
        for s in range(1, n):
            cand = mind.masked_fill(~avail, -INF)
            best = float(cand.max())
            got = float(mind[c[s]])
            assert bool(avail[c[s]])
            assert got >= best - atol, (f"item {b}, step {s}: pick {p[s]} has min-key {got:.8g}, best "
                                        f"available {best:.8g} (normalised, tol {atol}); picks {p}")
            assert abs(float(rk[s]) - got) <= atol + atol * abs(got), \
                (f"item {b}, step {s}: radius {float(r[s]):.8g} (key {float(rk[s]):.8g}) vs fp64 "
                 f"key {got:.8g}")
            avail[c[s]] = False
            mind = torch.minimum(mind, K[c[s]])


def kcenter_margin(x: torch.Tensor, *, k, metric: str, start, lengths=None,
                   exclude=None) -> List[float]:
    """Per item: the smallest normalised fp64 margin (best - second best key) over the steps of
    the fp64 greedy that choose picks (the isolated first pick included). +inf when no step
    involves a choice. start: "isolated" or a list / tensor of forced first picks."""
    x3 = as3(x).detach().cpu()
    B, N = x3.shape[0], x3.shape[1]
    valid = valid_mask(B, N, lengths, exclude)
    counts = expected_counts(B, k, valid)
    starts = None if isinstance(start, str) else per_item_list(start, B, 0)
    out = []
    for b in range(B):
        n = counts[b]
        vids = torch.nonzero(valid[b]).flatten()
        if n == 0:
            out.append(INF)
            continue
        xv = x3[b, vids].double()
        K = _key(ref._pairwise_distance(xv, metric, torch.float64), metric) / _kc_scale(xv, metric)
        M = len(vids)
        margin = INF

        def top2(v):
            if v.numel() < 2:
                return INF
            t = torch.topk(v, 2).values
            return float(t[0] - t[1]) if not math.isinf(float(t[1])) else INF

        if starts is None:
            KK = K.clone()
            KK.fill_diagonal_(INF)
            nn = KK.min(1).values
            margin = min(margin, top2(nn))
            c0 = int(torch.argmax(nn))
        else:
            c0 = int((vids == starts[b]).nonzero().flatten()[0])
        mind = K[c0].clone()
        avail = torch.ones(M, dtype=torch.bool)
        avail[c0] = False
        for s in range(1, n):
            cand = mind[avail]
            margin = min(margin, top2(cand))
            best = int(torch.argmax(mind.masked_fill(~avail, -INF)))
            avail[best] = False
            mind = torch.minimum(mind, K[best])
        out.append(margin)
    return out


def check_sorted_matches(idx_sorted, rad_sorted, idx_order, rad_order):
    """sorted=True output == the pick-order output sorted by index (radii follow, -1 last)."""
    a, ra = as2(idx_sorted).cpu(), as2(rad_sorted).cpu()
    o, ro = as2(idx_order).cpu(), as2(rad_order).cpu()
    assert a.shape == o.shape
    N_big = 1 << 62
    keyed = torch.where(o < 0, torch.full_like(o, N_big), o)
    perm = torch.argsort(keyed, dim=1, stable=True)
    torch.testing.assert_close(a, o.gather(1, perm), rtol=0, atol=0)
    torch.testing.assert_close(ra, ro.gather(1, perm), rtol=0, atol=0, equal_nan=True)


def assert_equal_where_tie_free(out_idx, ref_idx, margins: List[float], threshold: float) -> int:
    """Per item with margin > threshold, picks must equal the reference exactly. Returns the
    number of items compared."""
    o, r = as2(out_idx).cpu(), as2(ref_idx).cpu()
    assert o.shape == r.shape, (o.shape, r.shape)
    n = 0
    for b, m in enumerate(margins):
        if m > threshold:
            assert torch.equal(o[b], r[b]), (f"item {b} is tie-free (fp64 margin {m:.3g} > {threshold}) "
                                             f"but picks differ:\n op  {o[b].tolist()}\n ref {r[b].tolist()}")
            n += 1
    return n


# ---------------------------------------------------------------------------------- coverage
def _cov_item(sim3: torch.Tensor, b: int, vids: torch.Tensor, R: int):
    S = sim3[b, :R][:, vids].double()                   # (R, M) valid rows x valid candidates
    mx = float(S.max()) if S.numel() else 0.0
    scale = max(R * mx, 1e-30)
    return S, scale


def replay_coverage(sim: torch.Tensor, idx: torch.Tensor, gains: torch.Tensor, *, k,
                    lengths=None, row_lengths=None, exclude=None,
                    dtype: Optional[torch.dtype] = None):
    """Validity of coverage_select output against fp64 marginal gains."""
    s3 = as3(sim).detach().cpu()
    idx, gains = as2(idx).cpu(), as2(gains).cpu()
    B, Mrows, N = s3.shape
    dtype = dtype or sim.dtype
    atol = tol(dtype, "gain")
    valid = valid_mask(B, N, lengths, exclude)
    counts = expected_counts(B, k, valid)
    rls = per_item_list(row_lengths, B, Mrows)
    assert idx.shape[0] == B and gains.shape == idx.shape
    assert idx.dtype == torch.int64 and gains.dtype == torch.float32
    for b in range(B):
        n = counts[b]
        _check_padding(idx[b], gains[b], n, "coverage", b)
        p = [int(j) for j in idx[b, :n]]
        _check_picks_valid(p, valid[b], b)
        if n == 0:
            continue
        vids = torch.nonzero(valid[b]).flatten()
        pos = {int(j): t for t, j in enumerate(vids)}
        S, scale = _cov_item(s3, b, vids, rls[b])
        cur = torch.zeros(S.shape[0], dtype=torch.float64)
        avail = torch.ones(S.shape[1], dtype=torch.bool)
        for s, j in enumerate(p):
            c = pos[j]
            g = (S - cur[:, None]).clamp_min(0).sum(0) / scale
            best = float(g.masked_fill(~avail, -INF).max())
            got = float(g[c])
            assert got >= best - atol, (f"item {b}, step {s}: pick {j} has normalised gain {got:.8g}, "
                                        f"best available {best:.8g} (tol {atol}); picks {p}")
            rep = float(gains[b, s]) / scale
            assert abs(rep - got) <= atol, (f"item {b}, step {s}: gain {float(gains[b, s]):.8g} vs fp64 "
                                            f"{got * scale:.8g}")
            avail[c] = False
            cur = torch.maximum(cur, S[:, c])


def coverage_margin(sim: torch.Tensor, *, k, lengths=None, row_lengths=None,
                    exclude=None) -> List[float]:
    """Per item: smallest normalised margin of the fp64 plain greedy over its k steps."""
    s3 = as3(sim).detach().cpu()
    B, Mrows, N = s3.shape
    valid = valid_mask(B, N, lengths, exclude)
    counts = expected_counts(B, k, valid)
    rls = per_item_list(row_lengths, B, Mrows)
    out = []
    for b in range(B):
        vids = torch.nonzero(valid[b]).flatten()
        S, scale = _cov_item(s3, b, vids, rls[b])
        cur = torch.zeros(S.shape[0], dtype=torch.float64)
        avail = torch.ones(S.shape[1], dtype=torch.bool)
        margin = INF
        for s in range(counts[b]):
            g = (S - cur[:, None]).clamp_min(0).sum(0) / scale
            g = g.masked_fill(~avail, -INF)
            if int(avail.sum()) >= 2:
                t = torch.topk(g, 2).values
                margin = min(margin, float(t[0] - t[1]))
            c = int(torch.argmax(g))
            avail[c] = False
            cur = torch.maximum(cur, S[:, c])
        out.append(margin)
    return out
