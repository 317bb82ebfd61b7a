"""The tensor-core attention core's host-visible code on the CPU (csrc/include/tokenkernels/attn_core.h,
through the private ops of csrc/attention/attn_core_host.cpp): the planner (grid, splits, workspace),
the per-CTA key ranges, and an emulation of the kernel's split / tile / key-group / merge arithmetic
(the same TK_HD functions attn_core_tc_kernel calls) against torch's softmax attention -- tree masks,
chunk-causal prefill, gathered decode keys, splits without keys and rows with nothing to attend.
The core serves tree.attention, kv_select.sparse_decode and kv_select.sparse_prefill (impl="tuned")."""
from __future__ import annotations

import math

import pytest
import torch

import tokenkernels as tk
from tokenkernels.testing import random_parents

OPS = torch.ops.tokenkernels
KEY_TILE = 64
MIN_SPLIT_KEYS = 2 * KEY_TILE
MAX_SPLITS = 64
FIELDS = ["wn", "rows_per_cta", "row_blocks", "splits", "parts", "ctas", "smem", "ws_o", "ws_lse", "ws_ticket",
          "ws_total"]


def plan(heads, rows, max_keys, extra, D, sms=132, per_sm=None):
    per_sm = per_sm if per_sm is not None else (2 if D > 64 else 4)
    v = OPS._attn_core_plan(torch.tensor([heads, rows, max_keys, extra, D, sms, per_sm]))
    return dict(zip(FIELDS, v.tolist()))


def align(x):
    return (x + 255) // 256 * 256


# ------------------------------------------------------------------------------------ planner
def test_plan_tree_llama_shape():
    """64-node tree, 32 q / 8 kv heads, D 128, 32K cache on 132 SMs: 4 row blocks of 64 rows per KV
    head; prefix splits + the tree part fill at most two waves of 2 CTAs per SM."""
    p = plan(8, 64 * 4, 32768, 1, 128)
    assert (p["wn"], p["rows_per_cta"], p["row_blocks"]) == (1, 64, 4)
    assert p["parts"] == p["splits"] + 1
    assert p["ctas"] == 8 * 4 * p["parts"] <= 2 * 2 * 132
    assert p["ctas"] > 2 * 2 * 132 - 8 * 4   # and not a wave less than that
    assert p["smem"] == 64 * 128 * 2 + 2 * 2 * 64 * 128 * 2 + 2 * 3 * 64 * 8
    assert p["smem"] * 2 <= 228 * 1024
    rows = p["parts"] * 8 * 4 * 64
    assert p["ws_o"] == align(4 * rows * 128) and p["ws_lse"] == align(4 * rows) and p["ws_ticket"] == align(4 * 32)
    assert p["ws_total"] == p["ws_o"] + p["ws_lse"] + p["ws_ticket"]


def test_plan_decode():
    # B = 1, 8 KV heads, G = 4, 2688 selected keys: key groups (wn 4), splits capped by the keys
    p = plan(8, 4, 2688, 0, 128)
    assert (p["wn"], p["rows_per_cta"], p["row_blocks"]) == (4, 16, 1)
    assert p["splits"] == math.ceil(2688 / MIN_SPLIT_KEYS) == p["parts"]
    # B = 64: 512 CTA groups already fill the GPU -> one part, no workspace
    p = plan(64 * 8, 4, 2688, 0, 128)
    assert p["splits"] == p["parts"] == 1 and p["ws_total"] == 0
    # nothing to attend: one CTA per group still writes -inf / zeros
    p = plan(8, 4, 0, 0, 64)
    assert p["splits"] == p["parts"] == 1 and p["ws_total"] == 0


def test_plan_tree_without_prefix_capacity():
    p = plan(2, 7, 0, 1, 64)
    assert p["splits"] == 0 and p["parts"] == 1 and p["ws_total"] == 0


def test_plan_prefill_chunk():
    # 512-token chunk, G = 4: 2048 rows in 32 blocks of 64 per KV head
    p = plan(8, 512 * 4, 2688 + 512, 0, 128)
    assert (p["wn"], p["rows_per_cta"], p["row_blocks"]) == (1, 64, 32)
    assert p["ctas"] == 8 * 32 * p["parts"]


@pytest.mark.parametrize("heads", [1, 3, 8, 64, 1000])
@pytest.mark.parametrize("rows", [1, 16, 17, 64, 65, 256, 2048])
@pytest.mark.parametrize("keys", [0, 1, 127, 128, 129, 5000, 10 ** 6])
@pytest.mark.parametrize("extra", [0, 1])
def test_plan_invariants(heads, rows, keys, extra):
    for D in (64, 128):
        for sms in (1, 108, 132):
            p = plan(heads, rows, keys, extra, D, sms)
            assert p["wn"] == (4 if rows <= 16 else 1) and p["rows_per_cta"] == 16 * 4 // p["wn"]
            assert p["row_blocks"] == -(-rows // p["rows_per_cta"])
            assert p["parts"] == p["splits"] + extra >= 1
            if keys == 0:
                assert p["splits"] == (0 if extra else 1)
            else:
                assert 1 <= p["splits"] <= min(MAX_SPLITS, -(-keys // MIN_SPLIT_KEYS))
            per_sm = 2 if D > 64 else 4
            if p["splits"] > 1:   # split only to fill waves: never more than two of them
                assert p["ctas"] <= 2 * per_sm * sms
            assert p["ctas"] == heads * p["row_blocks"] * p["parts"]
            assert (p["ws_total"] == 0) == (p["parts"] == 1)


# ------------------------------------------------------------------------------------ ranges
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 17, 64])
def test_split_ranges_cover_each_key_once(splits):
    lens = torch.tensor([0, 1, 63, 64, 65, 127, 1000, 4097, 32768])
    r = OPS._attn_core_ranges(lens, splits)
    for i, n in enumerate(lens.tolist()):
        k0, k1 = r[i, :, 0].tolist(), r[i, :, 1].tolist()
        assert k0[0] == 0 and k1[-1] == n
        for s in range(splits):
            assert 0 <= k0[s] <= k1[s] <= n
            if s:
                assert k0[s] == k1[s - 1]   # contiguous, no key twice
            if k0[s] < n:
                assert k0[s] % KEY_TILE == 0   # tiles start on the tile grid
        assert sum(b - a for a, b in zip(k0, k1)) == n


# ------------------------------------------------------------------------------------ emulation
def truth(q, k, v, allowed, scale):
    """fp64 softmax attention over the allowed keys; rows with none: zeros, lse -inf."""
    s = (q.double() @ k.double().T) * scale
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=1)
    p = torch.where(allowed, torch.exp(s - lse[:, None].clamp(min=-1e300)), torch.zeros((), dtype=torch.float64))
    p = torch.nan_to_num(p)
    return p @ v.double(), lse


def compare(got, want):
    out, lse = got
    wo, wl = want
    assert (out.double() - wo).abs().max().item() <= 2e-5, (out.double() - wo).abs().max().item()
    fin = torch.isfinite(wl)
    assert torch.equal(torch.isfinite(lse), fin)
    if fin.any():
        assert (lse.double()[fin] - wl[fin]).abs().max().item() <= 2e-5 * max(1.0, wl[fin].abs().max().item())
    assert (out[~fin] == 0).all()


@pytest.mark.parametrize("wn", [1, 4])
@pytest.mark.parametrize("splits", [1, 2, 5, 9])
@pytest.mark.parametrize("N", [1, 63, 200, 700])
def test_emulate_decode(wn, splits, N):
    g = torch.Generator().manual_seed(N * 10 + splits)
    G, D = (4, 32) if wn == 4 else (24, 16)
    q, k, v = torch.randn(G, D, generator=g), torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    ok = torch.rand(N, generator=g) > 0.2   # -1 indices, bad pages
    got = OPS._attn_core_emulate(q, k, v, ok, torch.empty(0, 0, dtype=torch.int32), 0, G, splits, wn, 0.3, "decode")
    compare(got, truth(q, k, v, ok[None, :].expand(G, N), 0.3))


@pytest.mark.parametrize("wn", [1, 4])
def test_emulate_decode_nothing_to_attend(wn):
    q, k, v = torch.randn(4, 16), torch.randn(100, 16), torch.randn(100, 16)
    ok = torch.zeros(100, dtype=torch.bool)
    out, lse = OPS._attn_core_emulate(q, k, v, ok, torch.empty(0, 0, dtype=torch.int32), 0, 4, 3, wn, 1.0, "decode")
    assert torch.isneginf(lse).all() and (out == 0).all()


def tree_allowed(mask_rows, P, n, G, L):
    """(n * G, P + n) allowed matrix: the prefix for real rows, the ancestor bits for tree keys."""
    bits = ((mask_rows[:, :, None] >> torch.arange(32)) & 1).reshape(mask_rows.shape[0], -1)[:, :n].bool()
    rows = torch.cat([torch.ones(n, P, dtype=torch.bool), bits], dim=1)
    rows[L:] = False
    return rows.repeat_interleave(G, dim=0)


@pytest.mark.parametrize("wn", [1, 4])
@pytest.mark.parametrize("n", [1, 7, 40, 129])
@pytest.mark.parametrize("P,splits", [(0, 0), (0, 1), (0, 3), (5, 1), (5, 3), (5, 16), (300, 1), (300, 3), (300, 16)])
def test_emulate_tree(wn, n, P, splits):
    """(splits 0 only without a prefix: the planner gives 0 splits only for a cache of no capacity;
    a short prefix over many splits leaves most of them empty)"""
    G = 1 if wn == 4 else 4
    D = 16
    g = torch.Generator().manual_seed(n * 1000 + P + splits)
    tree = tk.tree.build(random_parents(1, n, n + P))
    mask = tree.mask[0]
    L = max(1, n - 2) if n > 3 else n   # padding rows past tree_len
    R = n * G
    q, k, v = torch.randn(R, D, generator=g), torch.randn(P + n, D, generator=g), torch.randn(P + n, D, generator=g)
    ok = torch.ones(P + n, dtype=torch.bool)
    ok[L + P:] = False   # tree keys past the tree length
    allowed = tree_allowed(mask, P, n, G, L) & ok[None, :]
    got = OPS._attn_core_emulate(q, k, v, ok, mask, P, G, splits, wn, 0.25, "tree")
    want = truth(q, k, v, allowed, 0.25)
    out, lse = got
    real = torch.arange(R) // G < L
    compare((out[real], lse[real]), (want[0][real], want[1][real]))


@pytest.mark.parametrize("wn", [1, 4])
@pytest.mark.parametrize("K,C", [(0, 1), (10, 3), (70, 40), (300, 129)])
@pytest.mark.parametrize("splits", [1, 2, 6])
def test_emulate_prefill(wn, K, C, splits):
    G = 1 if wn == 4 else 2
    D = 32
    g = torch.Generator().manual_seed(K + C + splits)
    R = C * G
    N = K + C
    q, k, v = torch.randn(R, D, generator=g), torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    ok = torch.rand(N, generator=g) > 0.1
    ok[K:] = True   # the chunk's own keys are always there
    c = torch.arange(R) // G
    j = torch.arange(N)
    allowed = ((j[None, :] < K) | (j[None, :] - K <= c[:, None])) & ok[None, :]
    got = OPS._attn_core_emulate(q, k, v, ok, torch.empty(0, 0, dtype=torch.int32), K, G, splits, wn, 0.5, "prefill")
    compare(got, truth(q, k, v, allowed, 0.5))


def test_emulate_large_logits_and_empty_splits():
    """Scores far apart (the max moves by hundreds across tiles) and more splits than keys: the
    rescales and the merge weights stay finite and exact."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 16, generator=g) * 8
    k = torch.randn(300, 16, generator=g) * 8
    v = torch.randn(300, 16, generator=g)
    ok = torch.ones(300, dtype=torch.bool)
    for splits in (1, 2, 64):
        got = OPS._attn_core_emulate(q, k, v, ok, torch.empty(0, 0, dtype=torch.int32), 0, 4, splits, 4, 1.0, "decode")
        compare(got, truth(q, k, v, ok[None].expand(4, 300), 1.0))


# ------------------------------------------------------------------------------ fragment layouts
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("n", [16, 64])   # keys per warp per tile: kWN = 4 / kWN = 1
def test_fragment_addressing_computes_the_tile(D, n):
    """The kernel's swizzle, ldmatrix addresses, accumulator and P-repacking maps (attn_core.h), run
    on a model of ldmatrix / ldmatrix.trans / mma.sync m16n8k16: S = Q K^T and O = S V come out
    element for element (a wrong lane -> row / column map scrambles them)."""
    g = torch.Generator().manual_seed(D + n)
    q, k, v = torch.randn(16, D, generator=g), torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    S, O = OPS._attn_core_fragments(q, k, v)
    torch.testing.assert_close(S, q @ k.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(O, S @ v, atol=1e-3, rtol=1e-5)


def test_fragment_model_is_not_the_identity():
    """The model really moves elements (a distinct value per element, exact in fp32)."""
    q = torch.zeros(16, 64)
    q[3, 17] = 1.0
    k = torch.zeros(16, 64)
    k[9, 17] = 2.0
    v = torch.arange(16 * 64, dtype=torch.float32).view(16, 64)
    S, O = OPS._attn_core_fragments(q, k, v)
    want = torch.zeros(16, 16)
    want[3, 9] = 2.0
    assert torch.equal(S, want)
    assert torch.equal(O[3], 2.0 * v[9]) and (O[torch.arange(16) != 3] == 0).all()
