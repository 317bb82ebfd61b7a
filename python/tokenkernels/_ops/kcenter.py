"""kcenter family: greedy k-center selection of tokens (DivPrune / ToDRE) and greedy coverage
maximisation (MMTok), batched and ragged, on CPU and CUDA.

Both ops return indices, never gradients: selection is a discrete choice. The wrappers convert
types (ints, 2-D inputs, start rules, int32 index tensors), fill defaults, pick the impl and
document; the ops check shapes, dtypes, devices, options and (``check=True``) values
themselves, the same on every device (csrc/kcenter/kcenter_args.h).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import variants
from .._common import IntOrTensor, as_batch, as_bool, mask_2d, per_item, resolve_start, split_k
from ..reference import kcenter as _reference
from ..reference.kcenter import mmtok_similarity  # noqa: F401  (pure PyTorch: one function)


def _on_device(t: Optional[torch.Tensor], name: str, ref_name: str, device: torch.device,
               op: str) -> Optional[torch.Tensor]:
    """Every tensor argument lives on the features' device. A meta tensor with CPU / CUDA
    features makes the dispatcher pick the shape-only fake kernel, so the fakes refuse mixed
    devices here (the C++ ops check the others)."""
    if t is not None and t.device != device:
        raise ValueError(f"tokenkernels.{op}: {name} is on {t.device} but {ref_name} is on {device}")
    return t


def _host_or_on_device(t, name: str, ref_name: str, device: torch.device, op: str):
    """k / start tensors may also be host (CPU) tensors: the wrapper copies them over (any
    other device cannot be copied from, e.g. meta)."""
    if isinstance(t, torch.Tensor) and t.device != device and t.device.type != "cpu":
        raise ValueError(f"tokenkernels.{op}: {name} is on {t.device} but {ref_name} is on {device}")
    return t


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
        impl: ``"auto"``; the CUDA kernel variants ``"plain"`` / ``"simt"`` (greedy over the
            full Gram, running minimum in global memory / in registers), ``"tuned"`` (fp16 /
            bf16 with N <= 8192: symmetric tensor-core Gram with the nearest-neighbour minimum
            fused in its epilogue, REDUX + ballot arg-max greedy; fp32 and larger N run as
            ``"simt"``; unproven) and ``"stream"`` (the
            large-N path that computes one distance row per pick from x and never holds
            N x N); or ``"reference"`` (:func:`tokenkernels.reference.kcenter.kcenter`, pure
            PyTorch, fp32). The CPU kernel has one implementation (the variant names all run
            it); see :mod:`tokenkernels.variants` for what ``"auto"`` runs on CUDA.

    Returns:
        (B, k) or (k,) int64 indices (pick order unless ``sorted``), plus radii if asked.

    Ties go to the lowest index. Each next pick is the valid unselected token with the largest
    distance to its nearest selected token.
    """
    x3, squeeze = as_batch(x, "x", "kcenter")
    sorted, return_radii, check = (as_bool(v, name, "kcenter") for v, name in
                                   ((sorted, "sorted"), (return_radii, "return_radii"), (check, "check")))
    if not isinstance(metric, str):   # (a str option in the schema: its parser's message otherwise)
        raise TypeError(f"tokenkernels.kcenter: metric must be a str, got {type(metric).__name__}")
    run = variants.choose("kcenter", impl, x3.device, "kcenter")
    if run == variants.REFERENCE:
        return _reference.kcenter(x, k, lengths=lengths, metric=metric, start=start,
                                  exclude=exclude, sorted=sorted, return_radii=return_radii,
                                  generator=generator, k_max=k_max, check=check)
    B, N = x3.shape[0], x3.shape[1]
    dev = x3.device
    _host_or_on_device(k, "k", "x", dev, "kcenter")
    _host_or_on_device(start, "start", "x", dev, "kcenter")
    kmax, k_items = split_k(k, B, dev, "kcenter", k_max)
    lengths = per_item(lengths, B, "lengths", "kcenter")
    exclude = mask_2d(exclude, B, N, squeeze, "exclude", "kcenter")
    start_index = resolve_start(start, x3, lengths, exclude, generator)
    idx, radii = torch.ops.tokenkernels.kcenter_select(
        x3, kmax, k_items, lengths, exclude, start_index, metric, sorted, check, run)
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
    impl: str = "auto",
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
        impl: ``"reference"`` runs :func:`tokenkernels.reference.kcenter.coverage_select`
            (pure PyTorch, fp32); every other name of the family (``"auto"``, ``"plain"``,
            ``"tuned"``, ``"stream"``) runs the one coverage kernel of the device.

    Ties go to the lowest index. Picks are in greedy order.
    """
    s3, squeeze = as_batch(sim, "sim", "coverage_select")
    return_gains = as_bool(return_gains, "return_gains", "coverage_select")
    check = as_bool(check, "check", "coverage_select")
    if variants.choose("kcenter", impl, s3.device, "coverage_select") == variants.REFERENCE:
        return _reference.coverage_select(sim, k, lengths=lengths, row_lengths=row_lengths,
                                          exclude=exclude, return_gains=return_gains,
                                          k_max=k_max, check=check)
    B, N = s3.shape[0], s3.shape[2]
    dev, op = s3.device, "coverage_select"
    _host_or_on_device(k, "k", "sim", dev, op)
    kmax, k_items = split_k(k, B, dev, op, k_max)
    lengths = per_item(lengths, B, "lengths", op)
    row_lengths = per_item(row_lengths, B, "row_lengths", op)
    exclude = mask_2d(exclude, B, N, squeeze, "exclude", op)
    idx, gains = torch.ops.tokenkernels.kcenter_coverage_select(
        s3, kmax, k_items, lengths, row_lengths, exclude, check)
    if squeeze:
        idx, gains = idx[0], gains[0]
    return (idx, gains) if return_gains else idx


# ------------------------------------------------------------------ fake (meta) implementations
@torch.library.register_fake("tokenkernels::kcenter_select")
def _select_fake(x, k, k_per_item, lengths, exclude, start_index, metric, sorted, check, impl):
    # reached directly when one argument is a meta tensor and x is not: refuse, don't fake it
    for t, name in ((k_per_item, "k"), (lengths, "lengths"), (exclude, "exclude"), (start_index, "start")):
        _on_device(t, name, "x", x.device, "kcenter")
    B = x.shape[0]
    return x.new_empty((B, k), dtype=torch.long), x.new_empty((B, k), dtype=torch.float32)


@torch.library.register_fake("tokenkernels::kcenter_coverage_select")
def _coverage_select_fake(sim, k, k_per_item, lengths, row_lengths, exclude, check):
    for t, name in ((k_per_item, "k"), (lengths, "lengths"), (row_lengths, "row_lengths"), (exclude, "exclude")):
        _on_device(t, name, "sim", sim.device, "coverage_select")
    B = sim.shape[0]
    return sim.new_empty((B, k), dtype=torch.long), sim.new_empty((B, k), dtype=torch.float32)
