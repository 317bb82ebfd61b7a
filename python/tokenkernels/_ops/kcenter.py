"""kcenter family: greedy k-center selection of tokens (DivPrune / ToDRE) and greedy coverage
maximisation (MMTok), batched and ragged, on CPU and CUDA.

Both ops return indices, never gradients: selection is a discrete choice.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._common import IntOrTensor, as_batch, mask_2d, per_item, split_k, valid_mask
from ..variants import impl_code as _impl_code

_METRICS = {"cosine": 0, "l2": 1}


def _on_device(t: Optional[torch.Tensor], name: str, ref_name: str, device: torch.device,
               op: str) -> Optional[torch.Tensor]:
    """Every tensor argument lives on the features' device: a mismatch (e.g. a meta `lengths`
    with CPU features, which the dispatcher would route to the shape-only fake kernel) is an
    error here, the same on every device, instead of a silent dispatch."""
    if t is not None and t.device != device:
        raise ValueError(f"tokenkernels.{op}: {name} is on {t.device} but {ref_name} is on {device}")
    return t


def _host_or_on_device(t, name: str, ref_name: str, device: torch.device, op: str):
    """k / start tensors may also be host (CPU) tensors (the wrapper copies them over)."""
    if isinstance(t, torch.Tensor) and t.device != device and t.device.type != "cpu":
        raise ValueError(f"tokenkernels.{op}: {name} is on {t.device} but {ref_name} is on {device}")
    return t


def _tau(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"tokenkernels.mmtok_similarity: {name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not (v > 0.0 and v < float("inf")):
        raise ValueError(f"tokenkernels.mmtok_similarity: {name} must be a finite temperature > 0, got {v}")
    return v
_IMPLS = {"auto": 0, "plain": 1, "tuned": 2, "stream": 3}


def _resolve_start(start, x3: torch.Tensor, squeeze: bool, lengths, exclude, generator):
    """Start rule -> None (isolated) or a (B,) int64 tensor of forced first picks."""
    B, N = x3.shape[0], x3.shape[1]
    if isinstance(start, str):
        if start == "isolated":
            return None
        if start == "first":
            # index 0 of the valid tokens: with `exclude`, the first token not excluded
            if exclude is None or N == 0:   # (argmax over no tokens is an error; any start is)
                return torch.zeros(B, dtype=torch.long, device=x3.device)
            return valid_mask(B, N, lengths, exclude, x3.device).to(torch.int8).argmax(1)
        if start == "random":
            # uniform over valid tokens: arg-max of i.i.d. uniforms, invalid tokens masked out.
            u = torch.rand((B, N), generator=generator, device=x3.device)
            u = u.masked_fill(~valid_mask(B, N, lengths, exclude, x3.device), -1.0)
            return u.argmax(1) if N > 0 else torch.zeros(B, dtype=torch.long, device=x3.device)
        raise ValueError(f"tokenkernels.kcenter: start must be 'isolated', 'first', 'random' or an "
                         f"index tensor, got {start!r}")
    if isinstance(start, int) and not isinstance(start, bool):
        start = torch.full((B,), start, dtype=torch.long, device=x3.device)
    if not isinstance(start, torch.Tensor):
        raise TypeError(f"tokenkernels.kcenter: start must be a str or an index tensor, got {type(start).__name__}")
    return per_item(start.to(x3.device), B, "start", "kcenter")


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
    """Greedy k-center (farthest-point) selection of tokens.

    Args:
        x: (N, D) or (B, N, D) token features, float32/float16/bfloat16. Distances use fp32
            accumulation.
        k: number of tokens to keep: an int, or a (B,) integer tensor per item (output padded
            with -1 to ``k_max``, by default ``k.max()``, which costs one host sync on CUDA).
        lengths: (B,) valid prefix length of each item (ragged batch); tokens past it are ignored.
        metric: ``"cosine"`` (distance 1 - cos, DivPrune) or ``"l2"`` (Euclidean).
        start: ``"isolated"`` (the token whose nearest neighbour is farthest, DivPrune's rule),
            ``"first"`` (the first valid token), ``"random"`` (uniform over valid tokens, from
            ``generator``), or an int / (B,) tensor of start indices.
        exclude: (B, N) bool; True tokens are never picked and are not neighbours.
        sorted: return each item's picks in ascending index order instead of pick order.
        return_radii: also return (B, k) float32: the distance of each pick to its nearest
            earlier pick (the max-min distance at that step); for the first pick, its
            nearest-neighbour distance under ``"isolated"`` and +inf otherwise. NaN where padded.
        generator: random generator for ``start="random"``.
        k_max: output width when ``k`` is a tensor (avoids the host sync).
        check: validate value-dependent arguments (k <= valid tokens, lengths <= N, start valid).
            On CUDA this costs one host sync; with ``check=False`` impossible picks are -1.
        impl: CUDA kernel variant: ``"auto"``; ``"plain"`` / ``"tuned"`` greedy over the full
            Gram (global- / shared-memory running minimum); ``"stream"`` the large-N path that
            computes one distance row per pick from x and never holds N x N. CPU ignores it;
            see :mod:`tokenkernels.variants` for what ``"auto"`` runs on CUDA.

    Returns:
        (B, k) or (k,) int64 indices (pick order unless ``sorted``), plus radii if asked.

    Ties go to the lowest index. Each next pick is the valid unselected token with the largest
    distance to its nearest selected token.
    """
    x3, squeeze = as_batch(x, "x", "kcenter")
    B, N = x3.shape[0], x3.shape[1]
    if metric not in _METRICS:
        raise ValueError(f"tokenkernels.kcenter: metric must be 'cosine' or 'l2', got {metric!r}")
    if impl not in _IMPLS:
        raise ValueError(f"tokenkernels.kcenter: impl must be one of {list(_IMPLS)}, got {impl!r}")
    dev = x3.device
    _host_or_on_device(k, "k", "x", dev, "kcenter")
    _host_or_on_device(start, "start", "x", dev, "kcenter")
    kmax, k_items = split_k(k, B, dev, "kcenter", k_max)
    lengths = _on_device(per_item(lengths, B, "lengths", "kcenter"), "lengths", "x", dev, "kcenter")
    exclude = _on_device(mask_2d(exclude, B, N, squeeze, "exclude", "kcenter"), "exclude", "x", dev, "kcenter")
    start_index = _resolve_start(start, x3, squeeze, lengths, exclude, generator)
    idx, radii = torch.ops.tokenkernels.kcenter(
        x3, kmax, k_items, lengths, exclude, start_index, _METRICS[metric], sorted, check,
        _impl_code("kcenter", impl, _IMPLS, x3.device))
    if squeeze:
        idx, radii = idx[0], radii[0]
    return (idx, radii) if return_radii else idx


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
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Greedy maximum coverage (MMTok): pick k candidate columns maximising
    ``sum_rows max_{j in S} sim[row, j]``.

    Args:
        sim: (M, N) or (B, M, N) non-negative similarities; rows are what must be covered,
            columns are the candidates. float32/float16/bfloat16 (gains accumulate in fp32).
        k: int or (B,) integer tensor (output padded with -1).
        lengths: (B,) number of valid candidate columns per item.
        row_lengths: (B,) number of valid rows per item.
        exclude: (B, N) bool: candidates never picked.
        return_gains: also return each pick's marginal gain (B, k) float32, NaN where padded.
        k_max, check: as in :func:`kcenter`.

    Ties go to the lowest index. Picks are in greedy order.
    """
    s3, squeeze = as_batch(sim, "sim", "coverage_select")
    B, N = s3.shape[0], s3.shape[2]
    dev, op = s3.device, "coverage_select"
    _host_or_on_device(k, "k", "sim", dev, op)
    kmax, k_items = split_k(k, B, dev, op, k_max)
    lengths = _on_device(per_item(lengths, B, "lengths", op), "lengths", "sim", dev, op)
    row_lengths = _on_device(per_item(row_lengths, B, "row_lengths", op), "row_lengths", "sim", dev, op)
    exclude = _on_device(mask_2d(exclude, B, N, squeeze, "exclude", op), "exclude", "sim", dev, op)
    idx, gains = torch.ops.tokenkernels.coverage_select(
        s3, kmax, k_items, lengths, row_lengths, exclude, check)
    if squeeze:
        idx, gains = idx[0], gains[0]
    return (idx, gains) if return_gains else idx


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
    col_ok = valid_mask(B, V, per_item(vision_lengths, B, "vision_lengths", "mmtok_similarity"),
                        None, v.device)
    neg = torch.finfo(torch.float32).min
    s_tv = torch.softmax((t @ v.transpose(1, 2) / tau_tv).masked_fill(~col_ok[:, None, :], neg), -1)
    s_vv = torch.softmax((v @ v.transpose(1, 2) / tau_vv).masked_fill(~col_ok[:, None, :], neg), -1)
    row_t = valid_mask(B, T, per_item(text_lengths, B, "text_lengths", "mmtok_similarity"), None, v.device)
    s_tv = s_tv * row_t[:, :, None]
    s_vv = s_vv * col_ok[:, :, None]
    out = torch.cat([alpha * s_tv, (1.0 - alpha) * s_vv], dim=1)
    return out[0] if squeeze else out


# ------------------------------------------------------------------ fake (meta) implementations
@torch.library.register_fake("tokenkernels::kcenter")
def _kcenter_fake(x, k, k_per_item, lengths, exclude, start_index, metric, sorted, check, impl):
    # reached directly when one argument is a meta tensor and x is not: refuse, don't fake it
    for t, name in ((k_per_item, "k"), (lengths, "lengths"), (exclude, "exclude"), (start_index, "start_index")):
        _on_device(t, name, "x", x.device, "kcenter")
    B = x.shape[0]
    return x.new_empty((B, k), dtype=torch.long), x.new_empty((B, k), dtype=torch.float32)


@torch.library.register_fake("tokenkernels::coverage_select")
def _coverage_fake(sim, k, k_per_item, lengths, row_lengths, exclude, check):
    for t, name in ((k_per_item, "k"), (lengths, "lengths"), (row_lengths, "row_lengths"), (exclude, "exclude")):
        _on_device(t, name, "sim", sim.device, "coverage_select")
    B = sim.shape[0]
    return sim.new_empty((B, k), dtype=torch.long), sim.new_empty((B, k), dtype=torch.float32)
