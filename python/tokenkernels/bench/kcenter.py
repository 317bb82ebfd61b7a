"""kcenter family: ``tokenkernels.kcenter`` / ``tokenkernels.coverage_select`` against the Python
reference (``tokenkernels.reference.kcenter``), the DivPrune-style loop, one fp32 GEMM and, when
importable, farthest-point-sampling peers (torch_cluster, pytorch3d).

On CUDA each case also gets a ``<case> bf16`` sub-row timing the Gram-path variants ``plain``,
``simt`` and ``tuned`` (issue #13's symmetric tensor-core Gram + REDUX greedy) on bf16 input,
and the issue's B=8, N=2880, k=288 shape is added.

Inputs are synthetic token-like features (a shared mean direction + one of N/18 cluster centres +
noise), fp32, built with the same recipe and seeds as the C++ bench (bench/cpp/bench_kcenter.cpp).

Rows: baselines ``divprune_style`` and ``gemm x@x.T`` (one fp32 GEMM of the same input: the floor
of the isolated start); the coverage case against ``reference``. Rate: GFLOP/s (``2·N²·D`` for the
isolated start, ``2·k·N·D`` otherwise, per item) or GB/s (coverage: bytes of ``sim``). Metric
``picks=ref``: how many leading picks equal the reference's (worst item).
"""
from __future__ import annotations

import time
from typing import List, Optional

import torch

import tokenkernels
from tokenkernels.reference import kcenter as ref

from . import Context, Row, Timing

DESCRIPTION = "greedy k-center (isolated / first start) and coverage_select, fp32 cosine"

D = 4096
# (B, N, k) per start rule
SHAPES = [(1, 576, 56), (1, 2880, 288), (8, 576, 56)]
STARTS = ["isolated", "first"]
COVERAGE = (50, 576, 56)   # text rows, vision tokens (rows and candidates), k


def kcenter_label(start: str, B: int, N: int, k: int) -> str:
    return f"kcenter {start} B{B} N{N} D{D} k{k}"


def coverage_label() -> str:
    T, V, k = COVERAGE
    return f"coverage_select B1 M{T + V} N{V} k{k}"   # sim is (text + vision, vision)


# CUDA only: the batch-8 shape (#13: N=2880 k=288 D=4096, B=1 <= 0.3 ms, B=8 <= 0.8 ms)
CUDA_SHAPES = [(8, 2880, 288)]
# CUDA only: the Gram-path variants timed side by side on bf16 input (a "<case> bf16" sub-row):
# the tuned kernels run on tensor cores for fp16 / bf16 only (fp32 takes the simt path).
CUDA_VARIANTS = ("plain", "simt", "tuned")


def _specs(quick: bool, cuda: bool):
    """(start, B, N, k) per k-center case, then None for the coverage case; the same shapes in
    quick and full runs (quick only times fewer repeats). CUDA runs add CUDA_SHAPES."""
    shapes = SHAPES + (CUDA_SHAPES if cuda else [])
    return [(start, B, N, k) for start in STARTS for B, N, k in shapes] + [None]


def cases(quick: bool, cuda: bool = False) -> List[str]:
    """The case labels :func:`run` adds, in order (one progress line each)."""
    return [coverage_label() if sp is None else kcenter_label(*sp) for sp in _specs(quick, cuda)]


def make_tokens(B: int, N: int, D: int, seed: int) -> torch.Tensor:
    """(B, N, D) fp32 on the CPU; same draws as make_tokens() in bench_kcenter.cpp."""
    torch.manual_seed(seed)
    C = max(8, N // 18)
    common = torch.randn(1, 1, D)
    centres = torch.randn(B, C, D)
    assign = torch.randint(C, (B, N), dtype=torch.long)
    xc = torch.gather(centres, 1, assign.unsqueeze(-1).expand(B, N, D))
    return 0.5 * common + xc + 0.7 * torch.randn(B, N, D)


def prefix_match(a: torch.Tensor, b: torch.Tensor) -> str:
    """'s/k': the smallest number, over items, of leading picks that agree."""
    a = a.detach().cpu().reshape(-1, a.shape[-1])
    b = b.detach().cpu().reshape(-1, b.shape[-1])
    k = a.shape[1]
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)}"
    worst = k
    for i in range(a.shape[0]):
        neq = (a[i] != b[i]).nonzero()
        worst = min(worst, int(neq[0]) if len(neq) else k)
    return f"{worst}/{k}"


def _peers():
    """Importable farthest-point-sampling peers: name -> fn(xn (B, N, D) unit rows, k) -> picks."""
    peers, missing = {}, []
    try:
        from torch_cluster import fps as _fps

        def tc_fps(xn, k):
            B, N, Dd = xn.shape
            batch = torch.arange(B, device=xn.device).repeat_interleave(N)
            out = _fps(xn.reshape(B * N, Dd), batch, ratio=k / N, random_start=False)
            return (out.reshape(B, -1) - torch.arange(B, device=xn.device)[:, None] * N)[:, :k]

        peers["torch_cluster.fps"] = tc_fps
    except Exception:  # ImportError, or a broken binary build
        missing.append("torch_cluster.fps")
    try:
        from pytorch3d.ops import sample_farthest_points as _sfp

        def p3d_fps(xn, k):
            return _sfp(xn, K=k, random_start_point=False)[1]

        peers["pytorch3d.sample_farthest_points"] = p3d_fps
    except Exception:
        missing.append("pytorch3d.ops.sample_farthest_points")
    return peers, missing


def _kcenter_case(ctx: Context, B: int, N: int, k: int, start: str, peers) -> Timing:
    t_start = time.perf_counter()
    x = make_tokens(B, N, D, 1234 + N + B).to(ctx.device)
    xs = x[0] if B == 1 else x             # 2-D for a single item, as callers pass it
    case = kcenter_label(start, B, N, k)
    work = 2.0 * B * N * N * D if start == "isolated" else 2.0 * B * k * N * D
    gemm_flops = 2.0 * B * N * N * D

    def op():
        return tokenkernels.kcenter(xs, k, start=start, check=False)

    def reference():
        return ref.kcenter(xs, k, start=start)

    def divprune():
        return torch.stack([ref.divprune_style(x[b], k) for b in range(B)])

    def gemm():
        return xs @ xs.T if B == 1 else torch.bmm(x, x.transpose(1, 2))

    picks_ref = reference().reshape(B, k)
    case_row = Row("kcenter", case, baselines=("divprune_style", "gemm x@x.T"))

    def row(impl, fn, slow, w, picks=None):
        out = fn() if picks is not None else None
        t = ctx.time(fn, slow=slow)
        m = {} if out is None else {"picks=ref": prefix_match(out.reshape(B, -1), picks_ref)}
        return case_row.add(impl, t, work=w, metrics=m)

    row("tokenkernels", op, False, work, picks=True)
    row("reference", reference, True, work)
    # DivPrune's own first pick is the isolated rule, so its picks compare only there.
    row("divprune_style", divprune, True, work, picks=True if start == "isolated" else None)
    row("gemm x@x.T", gemm, False, gemm_flops)
    if start == "first":
        # FPS peers: Euclidean FPS on unit rows picks like cosine k-center (|a-b|^2 = 2 - 2cos),
        # starting at index 0.
        xn = torch.nn.functional.normalize(x, dim=-1)
        for name, fn in peers.items():
            row(name, lambda fn=fn: fn(xn, k), False, work, picks=True)
    rows = [case_row]
    if ctx.cuda:
        # bf16 sub-row: plain / simt / tuned against each other (baseline plain); picks are
        # compared with plain's (bf16 distances differ from the fp32 reference's).
        xb = xs.to(torch.bfloat16)
        var_row = Row("kcenter", case + " bf16", baselines=("plain",))
        base = tokenkernels.kcenter(xb, k, start=start, check=False, impl="plain").reshape(B, k)
        for impl in CUDA_VARIANTS:
            fn = lambda impl=impl: tokenkernels.kcenter(xb, k, start=start, check=False, impl=impl)  # noqa: E731
            out = fn()
            var_row.add(impl, ctx.time(fn), work=work,
                        metrics={"picks=plain": prefix_match(out.reshape(B, -1), base)})
        rows.append(var_row)
    ctx.add(rows, t_start)
    return case_row.results["tokenkernels"].timing


def _coverage_case(ctx: Context) -> None:
    t_start = time.perf_counter()
    T, V, k = COVERAGE
    emb = make_tokens(1, T + V, D, 99)
    sim = tokenkernels.mmtok_similarity(emb[:, :T], emb[:, T:])[0].to(ctx.device)   # (T+V, V)
    M, N = sim.shape
    case = coverage_label()
    assert (M, N) == (T + V, V), sim.shape
    work = float(M * N * 4)   # bytes of sim, read once
    picks_ref = ref.coverage_select(sim, k)
    out = tokenkernels.coverage_select(sim, k)
    row = Row("kcenter", case, baselines=("reference",))
    row.add("tokenkernels", ctx.time(lambda: tokenkernels.coverage_select(sim, k, check=False)), work=work,
            bytes=True, metrics={"picks=ref": prefix_match(out, picks_ref)})
    row.add("reference", ctx.time(lambda: ref.coverage_select(sim, k), slow=True), work=work, bytes=True)
    ctx.add(row, t_start)
    gap = prefix_match(out, picks_ref)
    if gap != f"{k}/{k}":
        cover = lambda idx: float(sim[:, idx].max(1).values.double().sum())   # noqa: E731
        ctx.note(f"coverage_select picks leave the reference's after {gap.split('/')[0]} picks "
                 f"(near-tied gains); covered mass op {cover(out):.6f} vs reference "
                 f"{cover(picks_ref):.6f}")


def _one_thread(ctx: Context, B: int, N: int, k: int, start: str) -> Optional[Timing]:
    if ctx.cuda:
        return None
    x = make_tokens(B, N, D, 1234 + N + B)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ctx.time(lambda: tokenkernels.kcenter(x, k, start=start, check=False))
    finally:
        torch.set_num_threads(threads)


def run(ctx: Context) -> None:
    peers, missing = _peers()
    specs = _specs(ctx.quick, ctx.cuda)
    ctx.total_cases = len(specs)
    b1, b8 = {}, {}
    for sp in specs:
        if sp is None:
            _coverage_case(ctx)
            continue
        start, B, N, k = sp
        t = _kcenter_case(ctx, B, N, k, start, peers)
        if N == 576:
            (b1 if B == 1 else b8)[start] = t
    for start in STARTS:
        eight = 8 * b1[start].ms
        line = (f"batch scaling ({start}, N576 D{D} k56): batch 8 {b8[start].ms:.2f} ms vs "
                f"8 x batch 1 {eight:.2f} ms -> {eight / b8[start].ms:.2f}x")
        one = _one_thread(ctx, 8, 576, 56, start)
        if one is not None:
            line += (f"; batch 8 on 1 thread {one.ms:.2f} ms -> {one.ms / b8[start].ms:.2f}x "
                     f"from {torch.get_num_threads()} threads")
        ctx.note(line)
    for name in missing:
        ctx.note(f"peer {name}: not importable here, skipped")
