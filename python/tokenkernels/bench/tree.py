"""tree family: ``tokenkernels.tree`` ops against the PyTorch reference
(``tokenkernels.reference.tree``) and, for attention, the dense-mask SDPA baseline (one padded
``scaled_dot_product_attention`` call with a (B, n, prefix + n) bool mask, GQA via enable_gqa)
and an unmasked SDPA of the same n queries over the same keys (the floor: a plain n-query decode).

Trees: Medusa's 63-node default tree (64 nodes with the root) for verify/attention; random trees
(uniform attachment, fixed seed) for build. Shapes: Llama-3-8B attention heads (32 query heads,
8 KV heads, head dim 128).

Rows: build and verify against ``reference`` (verify_sampling: SpecInfer's rule, the default, and
``tokenkernels (rsd)``, mode="rsd", on the same inputs); attention against ``sdpa_dense_mask`` and
``sdpa_no_mask_decode`` (the floor), rates in GB/s of K and V read once (tokenkernels' rows only).

One attention row at speculative-decoding shapes (``attention spec ...``: small heads, Hq = Hkv =
4, D = 48, a 41-node tree over a 330-token prefix, the target forward of ``tokenkernels.spec``):
``tokenkernels`` reads the caches in HF's layout, (B, H_kv, N, D) passed as ``transpose(1, 2)``
views (what the spec loop's attention function does); ``tokenkernels_contiguous`` contiguous (B,
N, H_kv, D) caches; baselines ``sdpa_dense_mask`` (as above, the mask built per call) and
``sdpa_premasked`` (one SDPA call on the (B, H_kv, N, D) caches with the dense (n, prefix + n) bool
mask built once: HF's "sdpa" attention with a 4-D tree mask).
"""
from __future__ import annotations

import time
from typing import List

import torch

import tokenkernels as tk
from tokenkernels.reference import tree as ref
from tokenkernels.testing import MEDUSA_63, random_parents

from . import Context, Row

DESCRIPTION = "token trees: build, verify (greedy / sampling), tree attention vs dense-mask SDPA"

HQ, HKV, HD = 32, 8, 128      # Llama-3-8B attention heads
VERIFY_B = (1, 16)
SAMPLING_B, SAMPLING_V = 4, 32000
ATTN_DTYPES = (torch.float32, torch.bfloat16)
SPEC_HQ, SPEC_HKV, SPEC_D, SPEC_N, SPEC_PREFIX = 4, 4, 48, 41, 330   # the speculative-decoding row


def _builds(quick: bool):
    """(B, n) of the build cases."""
    return [(1, 64), (1, 256)] if quick else [(1, 64), (1, 256), (1, 1024), (16, 256)]


def _prefixes(quick: bool, cuda: bool = False):
    # (CUDA, full run: also the issue #13 shape, a 32K prefix)
    return [1024] if quick else ([4096, 32768] if cuda else [4096])


def attention_label(prefix: int, dtype: torch.dtype) -> str:
    return f"attention medusa63 prefix{prefix} B1 Hq{HQ} Hkv{HKV} D{HD} {str(dtype)[6:]}"


def spec_attention_label() -> str:
    return (f"attention spec n{SPEC_N} prefix{SPEC_PREFIX} B1 Hq{SPEC_HQ} Hkv{SPEC_HKV} D{SPEC_D} float32 "
            "hf-view")


def cases(quick: bool, cuda: bool = False) -> List[str]:
    """The case labels :func:`run` adds, in order (one progress line each)."""
    return ([f"build B{B} n{n}" for B, n in _builds(quick)]
            + [f"verify_greedy medusa63 B{B}" for B in VERIFY_B]
            + [f"verify_sampling medusa63 B{SAMPLING_B} V{SAMPLING_V}"]
            + [attention_label(p, dt) for p in _prefixes(quick, cuda) for dt in ATTN_DTYPES]
            + [spec_attention_label()])


_CUDA_VARIANT_ROWS = ("tokenkernels_plain", "tokenkernels_simt", "tokenkernels_tuned", "tokenkernels_tuned_paged16")


def _rows(ctx: Context, case: str, fns, work=0.0, bytes_=False, baselines=("reference",)):
    started = time.perf_counter()
    row = Row("tree", case, baselines=baselines)
    for impl, fn, slow in fns:
        t = ctx.time(fn, slow=slow)
        rated = impl == "tokenkernels" or impl in _CUDA_VARIANT_ROWS   # (the CUDA-only variant rows too)
        row.add(impl, t, work=work if rated else 0.0, bytes=bytes_)
    ctx.add(row, started)
    return row


def run(ctx: Context) -> None:
    dev = ctx.device
    quick = ctx.quick
    ctx.total_cases = len(cases(quick, ctx.cuda))

    # ---- build
    for B, n in _builds(quick):
        par = random_parents(B, n, seed=n + B, bushy=1.0).to(dev)
        t0 = tk.tree.build(par)
        md, ml = t0.max_depth, t0.paths.shape[1]
        _rows(ctx, f"build B{B} n{n}", [
            ("tokenkernels", lambda: tk.tree.build(par), False),
            # sizes of paths given: no read-back of depth/leaf counts (CUDA: no host sync)
            ("tokenkernels_sizes_given", lambda: tk.tree.build(par, max_depth=md, max_leaves=ml, check=False), False),
            ("reference", lambda: ref.build(par.cpu()), True),   # = tk.tree.build(..., impl="reference") on CPU
        ])

    # ---- verify
    medusa = tk.tree.from_paths(MEDUSA_63)
    for B in VERIFY_B:
        par = medusa[None].expand(B, 64).contiguous().to(dev)
        tree = tk.tree.build(par)
        g = torch.Generator().manual_seed(B)
        draft = torch.randint(0, 4, (B, 64), generator=g).to(dev)
        am = torch.randint(0, 4, (B, 64), generator=g).to(dev)
        _rows(ctx, f"verify_greedy medusa63 B{B}", [
            ("tokenkernels", lambda: tk.tree.verify_greedy(tree, draft, am), False),
            ("reference", lambda: ref.verify_greedy(tree, draft, am), True),
        ])
    V = SAMPLING_V
    B = SAMPLING_B
    par = medusa[None].expand(B, 64).contiguous().to(dev)
    tree = tk.tree.build(par)
    g = torch.Generator().manual_seed(0)
    tp = torch.softmax(torch.randn(B, 64, V, generator=g) * 3, -1).to(dev)
    dp = torch.softmax(torch.randn(B, 64, V, generator=g) * 3, -1).to(dev)
    draft = torch.multinomial(dp[:, 0].cpu(), 64, replacement=True, generator=g).to(dev)
    coins, bu = torch.rand(B, 64, generator=g).to(dev), torch.rand(B, generator=g).to(dev)
    _rows(ctx, f"verify_sampling medusa63 B{B} V{V}", [
        ("tokenkernels", lambda: tk.tree.verify_sampling(tree, draft, tp, draft_probs=dp, coins=coins,
                                                          bonus_u=bu, check=False), False),
        ("tokenkernels (rsd)", lambda: tk.tree.verify_sampling(tree, draft, tp, draft_probs=dp, coins=coins,
                                                                bonus_u=bu, check=False, mode="rsd"), False),
        ("reference", lambda: ref.verify_sampling(tree, draft, tp, draft_probs=dp, coins=coins, bonus_u=bu,
                                                  check=False), True),
    ])

    # ---- attention: 64-node tree over a long prefix, Llama-3-8B heads
    Hq, Hkv, D = HQ, HKV, HD
    n = 64
    for prefix in _prefixes(quick, ctx.cuda):
        for dtype in ATTN_DTYPES:
            B = 1
            tree = tk.tree.build(medusa[None].to(dev))
            g = torch.Generator().manual_seed(prefix)
            N = prefix + n
            q = torch.randn(B, n, Hq, D, generator=g).to(dtype).to(dev)
            k = torch.randn(B, N, Hkv, D, generator=g).to(dtype).to(dev)
            v = torch.randn(B, N, Hkv, D, generator=g).to(dtype).to(dev)
            P = torch.full((B,), prefix, device=dev)
            page = 16
            table = torch.arange(N // page, device=dev).view(1, -1)
            kp, vp = k.view(-1, page, Hkv, D), v.view(-1, page, Hkv, D)
            out = torch.empty_like(q)
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            kv_bytes = 2 * N * Hkv * D * q.element_size()
            # CUDA: every variant side by side ("tuned": the tensor-core attention core for bf16,
            # simt for fp32; bench/roofline/tree_attention.md has the floor it is measured against)
            variants = [] if not ctx.cuda else [
                (f"tokenkernels_{im}", lambda im=im: tk.tree.attention(q, k, v, P, tree, out=out, check=False, impl=im),
                 False) for im in ("plain", "simt", "tuned")] + [
                ("tokenkernels_tuned_paged16", lambda: tk.tree.attention(q, kp, vp, P, tree, block_table=table,
                                                                        check=False, impl="tuned"), False)]
            _rows(ctx, attention_label(prefix, dtype), [
                ("tokenkernels", lambda: tk.tree.attention(q, k, v, P, tree, out=out, check=False), False),
                ("tokenkernels_paged16", lambda: tk.tree.attention(q, kp, vp, P, tree, block_table=table, check=False), False),
            ] + variants + [
                ("sdpa_dense_mask", lambda: ref.attention_sdpa(q, k, v, P, tree.mask), False),
                ("sdpa_no_mask_decode", lambda: torch.nn.functional.scaled_dot_product_attention(
                    qt, kt, vt, enable_gqa=True), False),
            ], work=kv_bytes, bytes_=True, baselines=("sdpa_dense_mask", "sdpa_no_mask_decode"))

    # ---- attention at speculative-decoding shapes: small heads, HF-layout cache views
    Hq, Hkv, D, n, prefix = SPEC_HQ, SPEC_HKV, SPEC_D, SPEC_N, SPEC_PREFIX
    parents = torch.tensor([-1] + [max(0, i - 1 - (i % 3 == 0)) for i in range(1, n)])
    tree = tk.tree.build(parents[None].to(dev))
    g = torch.Generator().manual_seed(n)
    N = prefix + n
    q = torch.randn(1, n, Hq, D, generator=g).to(dev)
    k_hf = torch.randn(1, Hkv, N, D, generator=g).to(dev)   # HF's cache layout
    v_hf = torch.randn(1, Hkv, N, D, generator=g).to(dev)
    k, v = k_hf.transpose(1, 2), v_hf.transpose(1, 2)
    kc, vc = k.contiguous(), v.contiguous()
    P = torch.full((1,), prefix, device=dev)
    dense = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=dev),
                       ref.unpack_bits(tree.mask, n)[0]], 1)
    qt = q.transpose(1, 2)
    _rows(ctx, spec_attention_label(), [
        ("tokenkernels", lambda: tk.tree.attention(q, k, v, P, tree, check=False), False),
        ("tokenkernels_contiguous", lambda: tk.tree.attention(q, kc, vc, P, tree, check=False), False),
        ("sdpa_dense_mask", lambda: ref.attention_sdpa(q, kc, vc, P, tree.mask), False),
        ("sdpa_premasked", lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, k_hf, v_hf, attn_mask=dense), False),
    ], work=2 * N * Hkv * D * q.element_size(), bytes_=True, baselines=("sdpa_dense_mask", "sdpa_premasked"))
