"""kv_select family: a TokenSelect decode step (``tokenkernels.kv_select``) against dense attention
with torch SDPA over the whole cache, and against the same selection done with plain torch
(einsum + softmax + ``torch.topk`` + gather + SDPA); plus score and top-k alone.

Shape (issue #4): Llama-3-8B heads (H_q 32, H_kv 8, D 128), one request with N = 32768 tokens
(8192 with --quick) in a contiguous (B, N, H_kv, D) cache, budget 128 sink + 2048 top-k + 512
local; fp32 and bf16. Same seeds and shapes as bench/cpp/bench_kv_select.cpp.

Rows: one per case, every implementation against ``torch SDPA full cache (grouped q)``; rates in
GB/s of cache bytes read; metric ``picks=torch``: whether the selection equals the plain-torch
one. The parts (score, topk) against their torch paths are in the notes. On CUDA also top-k
alone at the issue #13 shape (k = 2048 of 131072, B = 1 and 64): ``impl="plain"`` vs
``impl="tuned"`` (the radix top-k) vs torch.topk + sort.
"""
from __future__ import annotations

import time
from typing import List

import torch
import torch.nn.functional as F

from tokenkernels import kv_select as kv

from . import Context, Row

DESCRIPTION = ("TokenSelect decode step (score + top-k + sparse decode, cache hit) vs torch SDPA "
               "over the full cache, Llama-3-8B heads")

H_Q, H_KV, D = 32, 8, 128
N_SINK, TOP_K, N_LOCAL = 128, 2048, 512


def _specs(quick: bool, cuda: bool):
    """(dtype, N) per case."""
    N = 8192 if quick else 32768
    return [(torch.float32, N), (torch.bfloat16, N)]


# CUDA only: the attention core (impl="tuned") beside plain / simt at the issue #13 shapes --
# sparse decode of 2688 selected tokens at B = 1 and 64, sparse prefill of a 512-token chunk
# (bench/roofline/sparse_decode.md, sparse_prefill.md).
CORE_DECODE_B = (1, 64)
CORE_PREFILL_C = 512


def _core_cases(cuda: bool) -> List[str]:
    if not cuda:
        return []
    W = N_SINK + TOP_K + N_LOCAL
    return ([f"sparse_decode bf16 B{B} k{W} H32/8 D128 impls" for B in CORE_DECODE_B]
            + [f"sparse_prefill bf16 C{CORE_PREFILL_C} k{W} H32/8 D128 impls"])


def _core(ctx: Context) -> None:
    """Rows of the CUDA variants of sparse_decode / sparse_prefill (bf16, random selections)."""
    W = N_SINK + TOP_K + N_LOCAL
    labels = _core_cases(ctx.cuda)
    N = 8192 if ctx.quick else 32768
    for B, case in zip(CORE_DECODE_B, labels):
        t0 = time.perf_counter()
        torch.manual_seed(11 + B)
        k = torch.randn(B, N, H_KV, D, dtype=torch.bfloat16, device=ctx.device)
        v = torch.randn_like(k)
        q = torch.randn(B, H_Q, D, dtype=torch.bfloat16, device=ctx.device)
        sl = torch.full((B,), N, dtype=torch.int32, device=ctx.device)
        idx = torch.sort(torch.randperm(N, device=ctx.device)[:W].expand(B, W), dim=1).values.to(torch.int32).contiguous()
        sel_bytes = 2.0 * B * W * H_KV * D * 2
        row = Row("kv_select", case, baselines=("simt",))
        for im in ("plain", "simt", "tuned"):
            row.add(im, ctx.time(lambda im=im: kv.sparse_decode(q, k, v, idx, sl, check=False, impl=im)),
                    work=sel_bytes, bytes=True)
        ctx.add(row, t0)
    t0 = time.perf_counter()
    C = CORE_PREFILL_C
    torch.manual_seed(13)
    k = torch.randn(1, N + C, H_KV, D, dtype=torch.bfloat16, device=ctx.device)
    v = torch.randn_like(k)
    q = torch.randn(1, C, H_Q, D, dtype=torch.bfloat16, device=ctx.device)
    sl = torch.full((1,), N + C, dtype=torch.int32, device=ctx.device)
    idx = torch.sort(torch.randperm(N, device=ctx.device)[:W]).values.to(torch.int32)[None].contiguous()
    flops = 4.0 * C * H_Q * D * (W + (C + 1) / 2)
    row = Row("kv_select", labels[-1], baselines=("simt",))
    for im in ("simt", "tuned"):
        row.add(im, ctx.time(lambda im=im: kv.sparse_prefill(q, k, v, idx, sl, N, check=False, impl=im)),
                work=flops)
    ctx.add(row, t0)


def case_label(dtype: torch.dtype, N: int) -> str:
    dn = "fp32" if dtype == torch.float32 else "bf16"
    return f"decode step {dn} N{N} H32/8 D128 k{N_SINK + TOP_K + N_LOCAL}"


# top-k alone on CUDA (issue #13: k = 2048 of N = 131072, small and large batch): the one-block
# radix select ("plain") against the radix top-k ("tuned", several CTAs per row) and torch.topk.
TOPK_SHAPES = [(1, 131072), (64, 131072)]   # (B, N)


def topk_case_label(B: int, N: int) -> str:
    return f"topk k{TOP_K} of N{N} B{B} fp32"


SCORE_IMPLS = ("tuned", "simt", "plain")


def _score_specs(quick: bool, cuda: bool):
    """(dtype, N, B) of the scoring-variant cases: CUDA only (the CPU has one score kernel), the
    issue #13 shape N = 131072 (32768 with --quick), one request and a batch of four."""
    if not cuda:
        return []
    N = 32768 if quick else 131072
    return [(torch.bfloat16, N, 1), (torch.bfloat16, N, 4)]


def score_label(dtype: torch.dtype, N: int, B: int) -> str:
    dn = "fp32" if dtype == torch.float32 else "bf16"
    return f"score variants {dn} B{B} N{N} H32/8 D128"


def cases(quick: bool, cuda: bool = False) -> List[str]:
    """The case labels :func:`run` adds, in order (one progress line each)."""
    labels = [case_label(*sp) for sp in _specs(quick, cuda)] + _core_cases(cuda)
    if cuda:
        labels += [topk_case_label(*sh) for sh in TOPK_SHAPES]
    return labels + [score_label(*sp) for sp in _score_specs(quick, cuda)]


def dense_decode(q, k, v):
    """Full decode attention with torch SDPA, enable_gqa: q (B, H_q, D) over every token of a
    (B, N, H_kv, D) cache (used on the gathered tokens too)."""
    return F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                          enable_gqa=True)[:, :, 0]


def dense_decode_grouped(q, kh, vh):
    """The fastest dense form found on CPU: the G queries of a KV head as G query rows of one
    SDPA head, against an HF-layout (B, H_kv, N, D) contiguous cache (K/V read once)."""
    B = q.shape[0]
    return F.scaled_dot_product_attention(q.view(B, H_KV, H_Q // H_KV, D), kh, vh).reshape(B, H_Q, D)


def torch_select(q, k, N):
    """TokenSelect selection in plain torch (per-head softmax, soft vote, torch.topk)."""
    kf = k.float().repeat_interleave(H_Q // H_KV, dim=2)
    s = torch.softmax(torch.einsum("bhd,bnhd->bhn", q.float(), kf), -1).sum(1)
    mid = torch.topk(s[:, N_SINK:N - N_LOCAL], TOP_K).indices + N_SINK
    dev = q.device
    B = q.shape[0]
    return torch.cat([torch.arange(N_SINK, device=dev).expand(B, -1), mid.sort(1).values,
                      torch.arange(N - N_LOCAL, N, device=dev).expand(B, -1)], 1)


def torch_sparse_decode(q, k, v, idx):
    """Gather the selected tokens and run SDPA over them."""
    b = torch.arange(q.shape[0], device=q.device)[:, None]
    ks, vs = k[b, idx], v[b, idx]                    # (B, W, H_kv, D)
    return dense_decode(q, ks, vs)


def _case(ctx: Context, dtype: torch.dtype, N: int) -> Row:
    t0 = time.perf_counter()
    torch.manual_seed(7)
    k = torch.randn(1, N, H_KV, D, dtype=dtype, device=ctx.device)
    v = torch.randn(1, N, H_KV, D, dtype=dtype, device=ctx.device)
    q = torch.randn(1, H_Q, D, dtype=dtype, device=ctx.device)
    sl = torch.full((1,), N, dtype=torch.int32, device=ctx.device)
    kh, vh = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()   # SDPA's own layout
    elt = q.element_size()
    W = N_SINK + TOP_K + N_LOCAL
    sel_bytes = 2.0 * W * H_KV * D * elt
    k_bytes = float(N * H_KV * D * elt)
    case = case_label(dtype, N)
    idx = kv.select(q, k, sl, k=TOP_K, n_sink=N_SINK, n_local=N_LOCAL, check=False)
    ti = torch_select(q, k, N)
    agree = "equal" if torch.equal(idx.long(), ti) else "differ (ties)"

    def ours():
        i = kv.select(q, k, sl, k=TOP_K, n_sink=N_SINK, n_local=N_LOCAL, check=False)
        return kv.sparse_decode(q, k, v, i, sl, check=False)

    row = Row("kv_select", case, baselines=("torch SDPA full cache (grouped q)",))
    row.add("tokenkernels select+sparse_decode", ctx.time(ours), work=k_bytes + sel_bytes,
            bytes=True, metrics={"picks=torch": agree})
    row.add("tokenkernels sparse_decode (cache hit)",
            ctx.time(lambda: kv.sparse_decode(q, k, v, idx, sl, check=False)), work=sel_bytes, bytes=True)
    row.add("torch SDPA full cache (grouped q)",
            ctx.time(lambda: dense_decode_grouped(q, kh, vh), slow=True), work=2 * k_bytes, bytes=True)
    row.add("torch SDPA full cache (enable_gqa)",
            ctx.time(lambda: dense_decode(q, k, v), slow=True), work=2 * k_bytes, bytes=True)
    row.add("torch select (topk) + gathered SDPA",
            ctx.time(lambda: torch_sparse_decode(q, k, v, torch_select(q, k, N)), slow=True),
            work=k_bytes + sel_bytes, bytes=True)
    row.add("tokenkernels score", ctx.time(lambda: kv.score(q, k, sl, check=False)),
            work=k_bytes, bytes=True)
    row.add("torch score (einsum+softmax)",
            ctx.time(lambda: torch.softmax(torch.einsum(
                "bhd,bnhd->bhn", q.float(), k.float().repeat_interleave(H_Q // H_KV, dim=2)), -1).sum(1),
                slow=True), work=k_bytes, bytes=True)
    s = kv.score(q, k, sl)
    row.add("tokenkernels topk", ctx.time(lambda: kv.topk(s, TOP_K, sl, n_sink=N_SINK, n_local=N_LOCAL, check=False)),
            work=4.0 * N, bytes=True)
    row.add("torch.topk + sort",
            ctx.time(lambda: torch.topk(s[:, N_SINK:N - N_LOCAL], TOP_K).indices.sort(1)),
            work=4.0 * N, bytes=True)
    ctx.add(row, t0)
    t = {impl: r.timing.ms for impl, r in row.results.items()}
    full = t["torch SDPA full cache (grouped q)"]
    ctx.note(f"{case}: select+sparse_decode {full / t['tokenkernels select+sparse_decode']:.2f}x and "
             f"cache hit {full / t['tokenkernels sparse_decode (cache hit)']:.2f}x vs torch SDPA over the "
             f"full cache with grouped queries ({full:.2f} ms; with enable_gqa "
             f"{t['torch SDPA full cache (enable_gqa)']:.2f} ms); vs torch select+gathered SDPA "
             f"{t['torch select (topk) + gathered SDPA'] / t['tokenkernels select+sparse_decode']:.2f}x; "
             f"score {t['torch score (einsum+softmax)'] / t['tokenkernels score']:.2f}x, "
             f"topk {t['torch.topk + sort'] / t['tokenkernels topk']:.2f}x vs torch "
             f"(targets: >= 2x select+decode, >= 10x cache hit)")
    return row


def _topk_case(ctx: Context, B: int, N: int) -> Row:
    """kv_select.topk alone, CUDA only: scores spread like criticality sums (softmax over N,
    summed over 32 heads), every row full length; rates in GB/s of score bytes read once."""
    t0 = time.perf_counter()
    torch.manual_seed(11)
    s = (torch.randn(B, N, device=ctx.device) * 2).softmax(-1) * H_Q
    sl = torch.full((B,), N, dtype=torch.int32, device=ctx.device)
    case = topk_case_label(B, N)
    plain = kv.topk(s, TOP_K, sl, n_sink=N_SINK, n_local=N_LOCAL, check=False, impl="plain")
    tuned = kv.topk(s, TOP_K, sl, n_sink=N_SINK, n_local=N_LOCAL, check=False, impl="tuned")
    agree = "equal" if torch.equal(plain, tuned) else "DIFFER"
    row = Row("kv_select", case, baselines=("tokenkernels topk plain",))
    work = 4.0 * B * N
    for impl in ("plain", "tuned"):
        row.add(f"tokenkernels topk {impl}",
                ctx.time(lambda impl=impl: kv.topk(s, TOP_K, sl, n_sink=N_SINK, n_local=N_LOCAL, check=False,
                                                   impl=impl)),
                work=work, bytes=True, metrics={"tuned=plain": agree})
    row.add("torch.topk + sort",
            ctx.time(lambda: torch.topk(s[:, N_SINK:N - N_LOCAL], TOP_K).indices.sort(1)), work=work, bytes=True)
    ctx.add(row, t0)
    t = {impl: r.timing.ms for impl, r in row.results.items()}
    ctx.note(f"{case}: tuned {t['tokenkernels topk tuned'] * 1e3 / B:.2f} us per row "
             f"({t['tokenkernels topk tuned'] * 1e3:.1f} us), plain {t['tokenkernels topk plain'] * 1e3:.1f} us, "
             f"torch.topk + sort {t['torch.topk + sort'] * 1e3:.1f} us (goal: <= 12 us per row at small batch; "
             f"bench/roofline/kv_select_topk.md)")
    return row


def _score_case(ctx: Context, dtype: torch.dtype, N: int, B: int) -> Row:
    """kv_select.score's CUDA variants side by side (impl="tuned": the bandwidth-bound kernels of
    issue #13, bench/roofline/kv_select_score.md). Rate: K-cache bytes read; the roofline note
    counts the logits' write and re-read too (+12.5% at these heads)."""
    t0 = time.perf_counter()
    torch.manual_seed(11)
    k = torch.randn(B, N, H_KV, D, dtype=dtype, device=ctx.device)
    q = torch.randn(B, H_Q, D, dtype=dtype, device=ctx.device)
    sl = torch.full((B,), N, dtype=torch.int32, device=ctx.device)
    k_bytes = float(B * N * H_KV * D * k.element_size())
    base = kv.score(q, k, sl, check=False, impl="simt")
    row = Row("kv_select", score_label(dtype, N, B), baselines=("tokenkernels score impl=simt",))
    for impl in SCORE_IMPLS:
        s = kv.score(q, k, sl, check=False, impl=impl)
        err = (s - base).abs().max().item()
        row.add(f"tokenkernels score impl={impl}",
                ctx.time(lambda impl=impl: kv.score(q, k, sl, check=False, impl=impl)),
                work=k_bytes, bytes=True, metrics={"max|d| vs simt": f"{err:.2g}"})
    ctx.add(row, t0)
    t = {impl: row.results[f"tokenkernels score impl={impl}"].timing.ms for impl in SCORE_IMPLS}
    floor_us = (k_bytes + 2 * 4.0 * B * H_Q * N) / 4.3e12 * 1e6
    ctx.note(f"{score_label(dtype, N, B)}: tuned {t['tuned'] * 1e3:.1f} us (roofline floor {floor_us:.1f} us "
             f"at 4.3 TB/s for K + logits write/read); tuned is {t['simt'] / t['tuned']:.2f}x simt's "
             f"speed and {t['plain'] / t['tuned']:.2f}x plain's")
    return row


def run(ctx: Context) -> None:
    specs = _specs(ctx.quick, ctx.cuda)
    topk_shapes = TOPK_SHAPES if ctx.cuda else []
    sspecs = _score_specs(ctx.quick, ctx.cuda)
    ctx.total_cases = len(specs) + len(_core_cases(ctx.cuda)) + len(topk_shapes) + len(sspecs)
    for dtype, N in specs:
        _case(ctx, dtype, N)
    if ctx.cuda:
        _core(ctx)
    for B, N in topk_shapes:
        _topk_case(ctx, B, N)
    for dtype, N, B in sspecs:
        _score_case(ctx, dtype, N, B)
