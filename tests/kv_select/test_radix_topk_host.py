"""The radix top-k of kv_select.topk(impl="tuned") without a GPU: its host planner
(_kv_select_radix_topk_plan, the plan the CUDA adapter launches with) and the CPU emulation of its
two kernels (_kv_select_radix_topk_emulate: the kernels' own digit / bucket / compaction / emission
functions of tokenkernels/radix_topk.h, run CTA by CTA and thread by thread), compared with the
reference and torch.topk over random, constant (all ties), -inf-heavy, tiny and k = N inputs,
ragged lengths, reuse rows and every split count."""
import pytest
import torch

from tokenkernels.reference import kv_select as ref

OPS = torch.ops.tokenkernels
THREADS, BINS, MIN_CHUNK, MAX_SPLITS, SMEM_CAP = 512, 2048, 4096, 512, 8192


def plan(B, N, sms):
    splits, chunk, cap, ws, zeroed, smem = OPS._kv_select_radix_topk_plan(B, N, sms)
    return dict(splits=splits, chunk=chunk, cap=cap, ws=ws, zeroed=zeroed, smem=smem)


def _align(v):
    return (v + 255) // 256 * 256


@pytest.mark.parametrize("B", [0, 1, 2, 7, 64, 132, 1000])
@pytest.mark.parametrize("N", [0, 1, 7, 129, 1000, 4096, 4097, 131072, 1 << 20])
@pytest.mark.parametrize("sms", [1, 108, 132])
def test_plan_covers_the_row(B, N, sms):
    p = plan(B, N, sms)
    n = max(N, 1)
    assert 1 <= p["splits"] <= MAX_SPLITS
    assert p["chunk"] % 4 == 0 and p["chunk"] >= 4
    assert p["splits"] * p["chunk"] >= n                     # every element has a CTA
    assert (p["splits"] - 1) * p["chunk"] < n                # and no CTA is empty for a full row
    if p["splits"] > 1:
        assert p["chunk"] >= MIN_CHUNK                      # worth a CTA
    # one wave of 2 CTAs per SM: never more CTAs than that (unless one per row already is), and
    # as many as fit unless the row is too short or the cap binds
    b = max(B, 1)
    if p["splits"] > 1:
        assert b * p["splits"] <= 2 * sms
    if b * (p["splits"] + 1) <= 2 * sms:
        assert p["splits"] == min(MAX_SPLITS, max(1, n // MIN_CHUNK))
    assert p["cap"] == min(n, SMEM_CAP) and p["smem"] == 8 * p["cap"]
    assert p["zeroed"] == _align(8 * B * BINS) + _align(4 * B)
    assert p["ws"] == p["zeroed"] + _align(4 * B * p["splits"]) + _align(8 * B * p["splits"] * p["chunk"])


def test_plan_small_batch_uses_many_ctas():
    assert plan(1, 131072, 132)["splits"] == 32          # 4096 elements per CTA
    assert plan(64, 131072, 132)["splits"] == 4          # 256 CTAs: one wave at 2 per SM
    assert plan(1024, 131072, 132)["splits"] == 1


def emulate(s, k, sl, n_sink, n_local, reuse=None, mask=None, sms=132, cap=0):
    return OPS._kv_select_radix_topk_emulate(s, k, sl, n_sink, n_local, reuse, mask, sms, cap)


def check(s, k, sl, n_sink, n_local, sms=(1, 8, 132, 100000), reuse=None, mask=None):
    want = ref.topk(s, k, sl, n_sink=n_sink, n_local=n_local, reuse=reuse, reuse_mask=mask)
    for m in sms:
        out, stats = emulate(s, k, sl, n_sink, n_local, reuse, mask, sms=m)
        assert torch.equal(out, want), f"sm_count={m}"
        assert torch.equal(out, OPS.kv_select_topk(s, k, sl, n_sink, n_local, reuse, mask, True))
    return stats


def _sl(*v):
    return torch.tensor(v, dtype=torch.int32)


@pytest.mark.parametrize("dist", ["randn", "rand", "exp", "softmax"])
def test_random_rows_vs_reference_and_torch_topk(dist):
    g = torch.Generator().manual_seed(1)
    N = 20011   # odd: head and tail elements outside the 16-byte steps
    s = {"randn": lambda: torch.randn(3, N, generator=g),
         "rand": lambda: torch.rand(3, N, generator=g),
         "exp": lambda: torch.randn(3, N, generator=g).mul(8).exp(),
         "softmax": lambda: torch.randn(3, N, generator=g).mul(3).softmax(-1) * 32}[dist]()
    sl = _sl(N, 15003, 9001)
    stats = check(s, 301, sl, 5, 17)
    for b in range(3):
        L = int(sl[b])
        mid = torch.topk(s[b, 5:L - 17], 301).indices + 5
        out, _ = emulate(s, 301, sl, 5, 17)
        assert torch.equal(out[b, 5:306], mid.sort().values.int())
        assert stats[b, 1] >= 301   # the compacted entries hold the winners


def test_compaction_keeps_few_entries_for_spread_scores():
    """Scores spread over several octaves (softmax sums): after pass 0 the finishing CTA sees
    about k entries, not N."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 131072, generator=g).mul(2).softmax(-1) * 32
    sl = _sl(131072, 131072)
    stats = check(s, 2048, sl, 128, 512, sms=(132,))
    assert torch.all(stats[:, 1] >= 2048) and torch.all(stats[:, 1] < 4 * 2048), stats
    assert torch.all(stats[:, 0] == 32)


def test_constant_rows_all_ties():
    s = torch.full((2, 9000), 0.25)
    sl = _sl(9000, 8003)
    stats = check(s, 1000, sl, 3, 7)
    # every middle entry ties: all are compacted (beyond the shared-memory capacity for none
    # here) and the first 1000 by index are taken
    assert torch.all(stats[:, 3] == 1000)
    out, _ = emulate(s, 1000, sl, 3, 7)
    assert torch.equal(out[0, 3:1003], torch.arange(3, 1003, dtype=torch.int32))


def test_minus_inf_heavy_rows():
    g = torch.Generator().manual_seed(3)
    s = torch.full((3, 12000), float("-inf"))
    s[0, torch.randperm(12000, generator=g)[:50]] = torch.randn(50, generator=g)   # fewer finite than k
    s[1, ::7] = torch.rand(s[1, ::7].shape, generator=g)
    s[2, -3:] = 1.0
    check(s, 200, _sl(12000, 11999, 12000), 2, 3)


def test_mixed_signs_zeros_and_infinities():
    s = torch.tensor([[0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-38, -1e-38, 3.0e38, -3.0e38] * 500])
    check(s, 777, _sl(5000), 1, 1)


def test_tiny_rows_and_k_equal_n():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 9, generator=g)
    check(s, 4, _sl(9, 1, 0, 5, 7), 1, 1)                 # N < W, N = 1, N = 0
    check(s, 9, _sl(9, 8, 3, 9, 9), 0, 0)                 # k = N: every token
    check(s, 8, _sl(9, 9, 9, 9, 9), 0, 0)                 # k = N - 1: one dropped
    check(s, 1, _sl(9, 9, 3, 2, 9), 0, 7)                 # k = 1, M = 2
    check(s[:, :1], 1, _sl(1, 0, 1, 1, 1), 0, 0)          # N = 1
    check(s, 0, _sl(9, 9, 4, 9, 9), 2, 3)                 # k = 0: sinks + locals only


@pytest.mark.parametrize("k", [1, 7, 2048])
def test_k_and_odd_lengths_across_splits(k):
    g = torch.Generator().manual_seed(5)
    N = 40007
    s = torch.randn(4, N, generator=g)
    sl = _sl(N, 4097, 2 * k + 4, 33333)
    check(s, k, sl, 3, 5, sms=(1, 3, 64, 132, 10 ** 6))


def test_reuse_rows():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(3, 5000, generator=g)
    sl = _sl(5000, 4000, 100)
    reuse = torch.randint(-3, 5200, (3, 64), generator=g, dtype=torch.int32).sort(1).values
    reuse[1] = reuse[1].flip(0)   # not ascending: the ascending subsequence is kept
    mask = torch.tensor([True, True, False])
    check(s, 64, sl, 4, 9, reuse=reuse, mask=mask)


def test_cap_override_same_result():
    """cap only chooses where the finishing CTA reads its entries (shared memory or the
    workspace): the result is the same."""
    g = torch.Generator().manual_seed(7)
    s = torch.rand(2, 30000, generator=g)   # uniform [0, 1): many entries share the top digit
    sl = _sl(30000, 29999)
    want = ref.topk(s, 500, sl, n_sink=2, n_local=2)
    for cap in (1, 100, 8192, 10 ** 6):
        out, stats = emulate(s, 500, sl, 2, 2, cap=cap)
        assert torch.equal(out, want)
    assert torch.all(stats[:, 1] > 500)


def test_stats_threshold_is_the_kth_key():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(1, 10000, generator=g)
    _, stats = emulate(s, 100, _sl(10000), 0, 0)
    kth = torch.topk(s[0], 100).values[-1]
    u = kth.view(torch.int32).item() & 0xFFFFFFFF
    key = (~u & 0xFFFFFFFF) if u & 0x80000000 else (u | 0x80000000)
    assert stats[0, 2].item() == key and stats[0, 3].item() == 1
