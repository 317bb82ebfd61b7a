"""tree.attention(impl="tuned"): the tensor-core attention core (csrc/include/tokenkernels/attn_core.cuh;
fp16 / bf16 with D 64 / 128 -- fp32 and other head sizes run the simt kernels) vs the fp64 truth, at
the sizes where the core changes strategy: trees of 1 / 7 / 129 nodes, G = 1 / 4 / 8 (16-row CTAs
with key groups, or 64-row blocks), prefix 0 (the tree part alone: one part, no workspace), long
prefixes over many splits, paged caches with page size 16 and 1, ragged tree_lens, int32 metadata,
non-contiguous q, out=. On the CPU the same calls run the CPU kernel (impl validated and ignored)."""
from __future__ import annotations

import pytest
import torch

import tokenkernels as tk

from tokenkernels.testing import tol

from .test_attention import check, fp64_truth, make_case

# tools/gpu_proof.py attributes these tests (no impl parameter) to the tuned variant
GPU_PROOF_IMPL = "tuned"

TUNED_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", TUNED_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("n,heads,prefix", [
    pytest.param(1, (4, 1), [0], id="n1-G4-prefix0"),
    pytest.param(1, (8, 1), [3000], id="n1-G8-splits"),
    pytest.param(7, (8, 1), [5000, 3], id="n7-G8-many-splits"),
    pytest.param(7, (4, 4), [0, 0], id="n7-G1-prefix0"),
    pytest.param(129, (4, 4), [200], id="n129-G1-3-row-blocks"),
    pytest.param(37, (8, 2), [1000, 0, 77], id="n37-G4-ragged"),
])
@pytest.mark.parametrize("page", [None, 16, 1])
def test_attention_tuned_sizes(device, dtype, D, n, heads, prefix, page):
    Hq, Hkv = heads
    B = len(prefix)
    lens = torch.tensor([max(1, n - 2 * b) for b in range(B)])
    tree, q, k, v, P, table = make_case(B, n, Hq, Hkv, D, prefix, dtype, n + D, device, page, lens)
    out, lse = check(tree, q, k, v, P, table, impl="tuned")
    for b in range(B):   # padding rows: zeros, -inf
        L = int(lens[b])
        assert (out[b, L:] == 0).all() and torch.isneginf(lse[b, L:]).all()


@pytest.mark.parametrize("dtype", TUNED_DTYPES)
def test_attention_tuned_llama_heads_long_prefix(device, dtype):
    """32 q / 8 kv heads, D 128, a 64-node tree over an 8K paged prefix (4 row blocks per KV head,
    prefix splits + the tree part merged by the last CTA)."""
    tree, q, k, v, P, table = make_case(1, 64, 32, 8, 128, [8000], dtype, 11, device, 16)
    check(tree, q, k, v, P, table, impl="tuned")


@pytest.mark.parametrize("dtype", TUNED_DTYPES)
def test_attention_tuned_int32_metadata_noncontiguous_out(device, dtype):
    lens = torch.tensor([20, 5])
    tree, q, k, v, P, table = make_case(2, 20, 8, 2, 64, [600, 33], dtype, 4, device, 16, lens)
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qn.is_contiguous()
    P32, L32, T32 = P.int(), tree.tree_lens.int(), table.int()
    out = torch.full_like(q, 7.0)
    lse = torch.full(q.shape[:3], 7.0, device=device)
    got = tk.tree.attention(qn, k, v, P32, tree.mask, tree_lens=L32, block_table=T32, out=out, lse_out=lse,
                            impl="tuned")
    assert got is out
    want, want_lse = fp64_truth(tree, q, k, v, P, table)
    assert (out.double().cpu() - want).abs().max().item() <= tol(dtype, "tree_attn")
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    assert (lse.cpu().double()[fin] - want_lse[fin]).abs().max().item() <= tol(dtype, "tree_lse") * max(
        1.0, want_lse[fin].abs().max().item())


def test_attention_tuned_falls_back_to_simt(device):
    """fp32 and D = 32 run the simt kernels under impl="tuned": bit-identical to impl="simt"."""
    for dtype, D in ((torch.float32, 64), (torch.bfloat16, 32)):
        tree, q, k, v, P, table = make_case(2, 9, 4, 2, D, [300, 10], dtype, D, device, 16)
        a = tk.tree.attention(q, k, v, P, tree, block_table=table, return_lse=True, impl="tuned")
        b = tk.tree.attention(q, k, v, P, tree, block_table=table, return_lse=True, impl="simt")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", TUNED_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("n,heads,prefix,scale", [
    # 80 rows = a full and a partial 64-row block, no prefix: the tree part alone (one part: the
    # CTA writes out / lse itself, no workspace)
    pytest.param(20, (8, 2), [0, 0], None, id="n20-G4-one-part"),
    # 256 rows = 4 row blocks per KV head; prefixes ending inside, at and just past a 64-key tile
    # (zero-filled tail keys), one of a single key; logits scaled up (sharp softmax, P in 16 bit)
    pytest.param(64, (8, 2), [1, 63, 64, 129], 0.5, id="n64-G4-tile-edges"),
])
def test_attention_tuned_64_row_blocks(device, dtype, D, n, heads, prefix, scale):
    """The 64-row layout of the core (on sm_90a: attn_core_wgmma_kernel, HGMMA for Q K^T and P V;
    elsewhere attn_core_tc_kernel with kWN = 1) at its own edges."""
    Hq, Hkv = heads
    B = len(prefix)
    lens = torch.tensor([max(1, n - 3 * b) for b in range(B)])
    tree, q, k, v, P, table = make_case(B, n, Hq, Hkv, D, prefix, dtype, 3 * n + D, device, 16, lens)
    out, lse = check(tree, q, k, v, P, table, scale=scale, impl="tuned")
    for b in range(B):
        L = int(lens[b])
        assert (out[b, L:] == 0).all() and torch.isneginf(lse[b, L:]).all()
