"""kv_select kernels vs the PyTorch reference (fp64 truth on the same upcast inputs):
both layouts (contiguous, paged with page size 1 and 16), GQA ratios 1/4/8, head_dim 64/128/256,
fp32/fp16/bf16, varlen batches with odd lengths, strided (HF-transposed) caches. Tests marked by
an ``impl`` parameter run every implementation (variants.impls: the CUDA variants and
"reference") against the fp64 reference or an independent oracle (SDPA, torch.topk)."""
import pytest
import torch
import torch.nn.functional as F

from tokenkernels import kv_select as kv
from tokenkernels.reference import kv_select as ref

from tokenkernels import variants
from tokenkernels.testing import DTYPES, tol
from .cases import cpu, f64, make_case

IMPLS = list(variants.impls("kv_select"))   # auto, plain, tuned, reference

LAYOUTS = [None, 1, 16]                 # page size; None = contiguous
SEQ = [129, 1, 7, 100]                  # varlen batch, odd sizes


def _close(got, want, atol, what):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: -inf pattern differs"
    fin = torch.isfinite(want)
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g}"


@pytest.mark.parametrize("page", LAYOUTS)
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_score(device, page, G, D, dtype):
    c = make_case(SEQ, G=G, D=D, dtype=dtype, page_size=page, device=device, seed=D + G)
    scale = D ** -0.5 if G == 4 else 1.0
    got = kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table, scale=scale)
    want = ref.score(f64(c.q), f64(c.k), cpu(c.seq_lens), block_table=cpu(c.block_table), scale=scale)
    assert got.dtype == torch.float32 and got.shape == (4, kv.capacity(c.k, c.block_table))
    _close(got, want, tol(dtype, "kv_score") * c.q.shape[1], "score")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page", [None, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_unscaled_logits_relative_precision(device, dtype, page, impl):
    """TokenSelect's unscaled logits (scale 1: max logits 30-55 here): the probabilities of the
    dominant tokens keep fp32 relative precision. Inputs are small integers and halves, so every
    logit is exact in fp32 and only the softmax arithmetic is measured. Computing them as
    exp(l - lse) with lse = m + log(s) rounded to fp32 costs up to ulp(m) / 2 ~ 1.9e-6 relative
    (an fp32 torch emulation of that form: 1.94e-6 on this case); exp(l - m) / s: 2.4e-7 in the
    same emulation, the CPU kernel 5.0e-7."""
    g = torch.Generator().manual_seed(21)
    B, N, H_kv, G, D = 4, 300, 8, 4, 64
    q = torch.randint(-4, 5, (B, H_kv * G, D), generator=g).float()
    k = torch.randint(-2, 3, (B, N, H_kv, D), generator=g).float() * 0.5
    sl = torch.tensor([300, 299, 257, 180], dtype=torch.int32)
    bt = None
    if page is not None:   # the same tokens through a shuffled block table
        P = N // page + 1
        k = torch.cat([k, torch.zeros(B, P * page - N, H_kv, D)], 1).view(B * P, page, H_kv, D)
        perm = torch.randperm(B * P, generator=g)
        k = k[torch.argsort(perm)]
        bt = perm.view(B, P).to(torch.int32)   # page p of request b is k[argsort(perm)][perm[b, p]]
    kd = ref.dense_cache(k, bt)[:, :N]
    want = ref.score(q.double(), kd.double(), sl, scale=1.0)
    got = kv.score(q.to(dtype).to(device), k.to(dtype).to(device), sl.to(device),
                   block_table=None if bt is None else bt.to(device), scale=1.0, impl=impl).cpu()
    got = got[:, :N]
    m = torch.einsum("bhd,bnhd->bhn", q.double(), kd.repeat_interleave(G, 2).double()).amax(-1)
    assert m.min() > 25 and m.max() < 64
    _close(got, want, tol(dtype, "kv_score") * H_kv * G, "score")
    big = want > 0.1
    rel = ((got.double() - want).abs()[big] / want[big]).max().item()
    assert rel <= 1e-6, f"relative error {rel:.3g} of the dominant tokens' scores"


@pytest.mark.parametrize("page", LAYOUTS)
@pytest.mark.parametrize("strided", [False, True])
def test_score_chunk_mean_query(device, page, strided):
    c = make_case([300, 41], G=4, D=64, page_size=page, strided=strided, device=device, C=5)
    got = kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table)
    want = ref.score(f64(c.q), f64(c.k), cpu(c.seq_lens), block_table=cpu(c.block_table))
    _close(got, want, tol(torch.float32, "kv_score") * 8, "score(chunk)")
    # the chunk's mean query gives the same scores as passing the mean itself
    got2 = kv.score(c.q.mean(1), c.k, c.seq_lens, block_table=c.block_table)
    _close(got2, want, tol(torch.float32, "kv_score") * 8, "score(mean)")


@pytest.mark.parametrize("seq", [pytest.param([5, 22, 23, 100, 0, 1000], id="varlen6"), pytest.param([1], id="1"),
                                 pytest.param([7, 129], id="7-129")])
@pytest.mark.parametrize("budget", [pytest.param((4, 10, 8), id="sink4-k10-local8"),
                                    pytest.param((0, 3, 0), id="k3-only"),
                                    pytest.param((2, 0, 5), id="k0"),
                                    pytest.param((128, 20, 512), id="sink128-k20-local512")])
def test_topk_vs_reference(device, seq, budget):
    n_sink, k, n_local = budget
    c = make_case(seq, G=2, D=64, device=device, seed=len(seq))
    s = kv.score(c.q, c.k, c.seq_lens)
    got = kv.topk(s, k, c.seq_lens, n_sink=n_sink, n_local=n_local)
    want = ref.topk(s.cpu(), k, c.seq_lens.cpu(), n_sink=n_sink, n_local=n_local)
    assert got.dtype == torch.int32 and got.shape == (len(seq), n_sink + k + n_local)
    assert torch.equal(got.cpu(), want)
    for b, L in enumerate(seq):   # structural properties
        row = got[b].cpu()
        n = int((row >= 0).sum())
        assert n == min(L, n_sink + k + n_local)
        assert torch.all(row[n:] == -1) and torch.all(row[:n].diff() > 0)
        if L > n_sink + k + n_local:
            assert torch.equal(row[:n_sink], torch.arange(n_sink, dtype=torch.int32))
            assert torch.equal(row[n - n_local:n], torch.arange(L - n_local, L, dtype=torch.int32))


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_ties_lowest_index(device, impl):
    # integer-valued scores with many ties: the lowest index wins among equal scores
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 4, (3, 1000), generator=g).float()
    sl = torch.tensor([1000, 777, 129], dtype=torch.int32)
    got = kv.topk(s.to(device), 37, sl.to(device), n_sink=3, n_local=11, impl=impl)
    assert torch.equal(got.cpu(), ref.topk(s, 37, sl, n_sink=3, n_local=11))
    # and against torch.topk's set where there are no ties
    s = torch.randn(2, 513, generator=g)
    sl = torch.tensor([513, 400], dtype=torch.int32)
    got = kv.topk(s.to(device), 50, sl.to(device), n_sink=0, n_local=0, impl=impl).cpu()
    for b in range(2):
        want = torch.topk(s[b, :int(sl[b])], 50).indices.sort().values.int()
        assert torch.equal(got[b], want)


def test_topk_reuse(device):
    s = torch.randn(3, 200)
    sl = torch.tensor([200, 150, 20], dtype=torch.int32)
    reuse = torch.tensor([[5, 9, 60, 150, 199], [4, 4, 100, 140, 145], [1, 2, 3, 4, 5]], dtype=torch.int32)
    mask = torch.tensor([True, True, True])
    got = kv.topk(s.to(device), 5, sl.to(device), n_sink=4, n_local=10, reuse=reuse.to(device),
                  reuse_mask=mask.to(device)).cpu()
    want = ref.topk(s, 5, sl, n_sink=4, n_local=10, reuse=reuse, reuse_mask=mask)
    assert torch.equal(got, want)
    # row 0: 199 lies in the local window, dropped from the middle; row 1: duplicate 4 once,
    assert got[0].tolist()[:8] == [0, 1, 2, 3, 5, 9, 60, 150]
    assert got[1].tolist()[:8] == [0, 1, 2, 3, 4, 100, 140, 141]   # 140, 145 are local now


def test_topk_reuse_not_ascending(device):
    """A reuse list that is not ascending keeps, in order, the in-range entries above the last
    one kept -- the output stays ascending. (CUDA used to compare with the previous *raw*
    entry: [5, 9, -1, 7] gave 5, 9, 7.)"""
    s = torch.randn(4, 100)
    sl = torch.full((4,), 100, dtype=torch.int32)
    reuse = torch.tensor([[5, 9, -1, 7], [50, 10, 20, 60], [97, 3, 4, 1], [1, 2, 2, 95]], dtype=torch.int32)
    mask = torch.tensor([True, True, True, True])
    got = kv.topk(s.to(device), 4, sl.to(device), n_sink=2, n_local=4, reuse=reuse.to(device),
                  reuse_mask=mask.to(device)).cpu()
    sink, local = [0, 1], [96, 97, 98, 99]
    mids = [[5, 9], [50, 60], [3, 4], [2, 95]]   # middle region [2, 96)
    for b, mid in enumerate(mids):
        row = sink + mid + local
        assert got[b].tolist() == row + [-1] * (10 - len(row)), f"row {b}"
    assert torch.equal(got, ref.topk(s, 4, sl, n_sink=2, n_local=4, reuse=reuse, reuse_mask=mask))


def test_topk_reuse_random_lists(device):
    """Long reuse lists (several 512-entry tiles of the CUDA kernel, whose scan carries the
    running maximum across tiles): unsorted, duplicated, out-of-range and sorted rows, against
    the reference and the CPU kernel."""
    g = torch.Generator().manual_seed(4)
    B, N, k = 6, 4000, 1500
    s = torch.randn(B, N, generator=g)
    sl = torch.tensor([4000, 3999, 2500, 1800, 4000, 3000], dtype=torch.int32)
    reuse = torch.randint(-3, N + 3, (B, k), generator=g, dtype=torch.int32)   # row 0: unsorted
    reuse[1] = torch.randint(0, N, (k,), generator=g).sort().values             # sorted, duplicates
    reuse[2] = torch.arange(k, 0, -1)                                            # descending
    reuse[3] = torch.arange(k) * 2 + 5                                           # ascending, runs out of range
    reuse[3, 600] = 1700                                  # drops the next entries up to 1700 (tile 1)
    reuse[4] = torch.arange(k) + 10
    reuse[4, 3] = N - 700                              # tile 0 sets a maximum that tiles 1, 2 never pass
    reuse[5] = torch.randint(0, 600, (k,), generator=g, dtype=torch.int32)       # dense duplicates
    mask = torch.tensor([True, True, True, True, True, False])
    got = kv.topk(s.to(device), k, sl.to(device), n_sink=7, n_local=64, reuse=reuse.to(device),
                  reuse_mask=mask.to(device)).cpu()
    want = ref.topk(s, k, sl, n_sink=7, n_local=64, reuse=reuse, reuse_mask=mask)
    assert torch.equal(got, want)
    assert torch.equal(got, kv.topk(s, k, sl, n_sink=7, n_local=64, reuse=reuse, reuse_mask=mask))
    for b in range(B):
        row = got[b][got[b] >= 0]
        assert torch.all(row.diff() > 0), f"row {b} not ascending"
    # row 4: nothing after N - 700 exceeds it; the local window and the padding follow
    assert got[4, 7:12].tolist() == [10, 11, 12, N - 700, N - 64]
    assert torch.all(got[4, 7 + 4 + 64:] == -1)
    # row 3: 7, 9, ..., 1203 (5 is a sink token), 1700, then 1701 .. 1735 (the middle ends at 1736)
    mid3 = list(range(7, 1205, 2)) + [1700] + list(range(1701, 1736, 2))
    assert got[3, 7:7 + len(mid3)].tolist() == mid3


@pytest.mark.parametrize("page", LAYOUTS)
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_decode(device, page, G, D, dtype):
    c = make_case(SEQ, G=G, D=D, dtype=dtype, page_size=page, device=device, seed=7 * D + G)
    s = kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table)
    idx = kv.topk(s, 20, c.seq_lens, n_sink=3, n_local=9)
    out, lse = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table, return_lse=True)
    wo, wl = ref.sparse_decode(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens),
                               block_table=cpu(c.block_table), return_lse=True)
    assert out.dtype == dtype and out.shape == c.q.shape and lse.dtype == torch.float32
    _close(out, wo, tol(dtype, "kv_out"), "out")
    _close(lse, wl, tol(dtype, "kv_lse"), "lse")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page", LAYOUTS + [64])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_sparse_decode_full_budget_equals_sdpa(device, page, G, impl):
    """Exactness anchor: with the budget >= seq_len, select + sparse_decode is full attention."""
    seq = [129, 1, 64, 1000]
    c = make_case(seq, G=G, D=64, page_size=page, device=device, seed=G)
    idx = kv.select(c.q, c.k, c.seq_lens, k=1000, n_sink=4, n_local=8, block_table=c.block_table, impl=impl)
    out = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table, impl=impl)
    K = ref.dense_cache(c.k, c.block_table)
    V = ref.dense_cache(c.v, c.block_table)
    for b, L in enumerate(seq):
        Kb = K[b, :L].transpose(0, 1).repeat_interleave(G, 0)   # (H_q, L, D)
        Vb = V[b, :L].transpose(0, 1).repeat_interleave(G, 0)
        want = F.scaled_dot_product_attention(c.q[b][:, None], Kb, Vb)[:, 0]
        torch.testing.assert_close(out[b], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("page", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_hf_cache(device, page, dtype):
    """HF's (B, H_kv, N, D) cache passed as transpose(1, 2): read in place, same results."""
    c = make_case([300, 77], G=4, D=128, dtype=dtype, page_size=page, strided=True, device=device)
    assert page == 1 or not c.k.is_contiguous()   # (a size-1 page dim leaves it contiguous)
    kc, vc = c.k.contiguous(), c.v.contiguous()
    s1 = kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table)
    s2 = kv.score(c.q, kc, c.seq_lens, block_table=c.block_table)
    assert torch.equal(s1, s2)
    idx = kv.topk(s1, 30, c.seq_lens, n_sink=4, n_local=16)
    o1 = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table)
    o2 = kv.sparse_decode(c.q, kc, vc, idx, c.seq_lens, block_table=c.block_table)
    assert torch.equal(o1, o2)


def test_strided_head_dim(device):
    """A non-unit stride on D itself (every other element of a wider tensor) is accepted."""
    c = make_case([50, 9], G=2, D=64, device=device)
    wide_k = torch.stack([c.k, torch.full_like(c.k, float("nan"))], -1).flatten(-2)
    wide_v = torch.stack([c.v, torch.full_like(c.v, float("nan"))], -1).flatten(-2)
    k2, v2 = wide_k[..., ::2], wide_v[..., ::2]
    assert k2.stride(-1) == 2
    idx = kv.select(c.q, k2, c.seq_lens, k=10, n_sink=2, n_local=4)
    assert torch.equal(idx, kv.select(c.q, c.k, c.seq_lens, k=10, n_sink=2, n_local=4))
    assert torch.equal(kv.sparse_decode(c.q, k2, v2, idx, c.seq_lens),
                       kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens))


def test_decode_minus_one_and_empty(device):
    c = make_case([40, 40, 0], G=4, D=64, device=device)
    idx = torch.tensor([[3, -1, 7, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]], dtype=torch.int32, device=device)
    out, lse = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, return_lse=True)
    wo, wl = ref.sparse_decode(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens), return_lse=True)
    _close(out, wo, 2e-5, "out")
    assert torch.all(out[1:] == 0) and torch.all(torch.isneginf(lse[1:]))
    idx2 = torch.tensor([[3, 7]] + [[-1, -1]] * 2, dtype=torch.int32, device=device)
    assert torch.equal(out[0], kv.sparse_decode(c.q, c.k, c.v, idx2, c.seq_lens)[0])


@pytest.mark.parametrize("page", LAYOUTS)
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_prefill(device, page, G, dtype):
    C = 9
    starts = [120, 0, 30, 64]
    chunk = [9, 5, 1, 9]                  # varlen chunks (padding rows past them)
    seq = [s + n for s, n in zip(starts, chunk)]
    c = make_case(seq, G=G, D=64, dtype=dtype, page_size=page, device=device, seed=G, C=C)
    cs = torch.tensor(starts, dtype=torch.int32, device=device)
    idx = kv.select(c.q, c.k, cs, k=12, n_sink=2, n_local=6, block_table=c.block_table)
    out, lse = kv.sparse_prefill(c.q, c.k, c.v, idx, c.seq_lens, cs, block_table=c.block_table,
                                 return_lse=True)
    wo, wl = ref.sparse_prefill(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens), cs.cpu(),
                                block_table=cpu(c.block_table), return_lse=True)
    assert out.shape == c.q.shape and out.dtype == dtype and lse.shape == c.q.shape[:3]
    _close(out, wo, tol(dtype, "kv_out"), "out")
    _close(lse, wl, tol(dtype, "kv_lse"), "lse")
    assert torch.all(out[1, 5:] == 0) and torch.all(torch.isneginf(lse[2, 1:]))


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_prefill_full_budget_is_causal_attention(device, impl):
    """With every past token selected, the chunk's output is ordinary causal attention."""
    C, s0 = 16, 50
    c = make_case([s0 + C], G=4, D=64, device=device, C=C)
    idx = torch.arange(s0, dtype=torch.int32, device=device)[None]
    out = kv.sparse_prefill(c.q, c.k, c.v, idx, c.seq_lens, s0, impl=impl)
    K = c.k[0].transpose(0, 1).repeat_interleave(4, 0)    # (H_q, N, D)
    V = c.v[0].transpose(0, 1).repeat_interleave(4, 0)
    Q = c.q[0].transpose(0, 1)                             # (H_q, C, D)
    mask = torch.arange(s0 + C, device=device)[None, :] <= (s0 + torch.arange(C, device=device))[:, None]
    want = F.scaled_dot_product_attention(Q, K, V, attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(out[0], want, atol=2e-5, rtol=1e-4)


def test_out_variants(device):
    c = make_case([200, 33, 90], G=4, D=64, page_size=16, device=device)
    W = 4 + 20 + 8
    buf = torch.full((3, W), 123, dtype=torch.int32, device=device)
    r = kv.select(c.q, c.k, c.seq_lens, k=20, n_sink=4, n_local=8, block_table=c.block_table, out=buf)
    assert r is buf
    assert torch.equal(buf, kv.select(c.q, c.k, c.seq_lens, k=20, n_sink=4, n_local=8, block_table=c.block_table))
    o = torch.empty_like(c.q)
    l = torch.empty(3, c.q.shape[1], device=device)
    r = kv.sparse_decode(c.q, c.k, c.v, buf, c.seq_lens, block_table=c.block_table, out=o, lse=l,
                         return_lse=True)
    assert r[0] is o and r[1] is l
    wo, wl = kv.sparse_decode(c.q, c.k, c.v, buf, c.seq_lens, block_table=c.block_table, return_lse=True)
    assert torch.equal(o, wo) and torch.equal(l, wl)
    c2 = make_case([40, 12], G=2, D=64, device=device, C=4)
    cs = torch.tensor([36, 10], dtype=torch.int32, device=device)
    idx = torch.arange(8, dtype=torch.int32, device=device).expand(2, 8).contiguous()
    o = torch.full_like(c2.q, 7.0)
    r = kv.sparse_prefill(c2.q, c2.k, c2.v, idx, c2.seq_lens, cs, out=o)
    assert r is o and torch.equal(o, kv.sparse_prefill(c2.q, c2.k, c2.v, idx, c2.seq_lens, cs))


def test_int64_metadata_accepted(device):
    c = make_case([60, 20], G=2, D=64, page_size=16, device=device)
    a = kv.select(c.q, c.k, c.seq_lens.long(), k=8, n_sink=2, n_local=4, block_table=c.block_table.long())
    b = kv.select(c.q, c.k, c.seq_lens, k=8, n_sink=2, n_local=4, block_table=c.block_table)
    assert torch.equal(a, b)


def test_select_scores_with_the_proof_gated_auto_variant(device, monkeypatch):
    """select(impl="auto") scores with what variants.choose resolves "auto" to (the safe variant
    on CUDA until all are proven), not the op-level "auto" (the kernels' own heuristic, i.e.
    the unproven tuned kernel where eligible)."""
    from tokenkernels import variants

    seen, passed = [], []
    real_choose, real_ns = variants.choose, torch.ops.tokenkernels

    def spy(family, impl, dev, op):
        r = real_choose(family, impl, dev, op)
        seen.append((family, impl, torch.device(dev).type, op, r))
        return r

    class Ops:   # records the impl string the scoring op receives
        def __getattr__(self, name):
            return getattr(real_ns, name)

        def kv_select_score(self, *args):
            passed.append(args[-1])
            return real_ns.kv_select_score(*args)

    from tokenkernels._ops import kv_select as mod
    monkeypatch.setattr(variants, "choose", spy)
    monkeypatch.setattr(mod.torch.ops, "tokenkernels", Ops(), raising=False)
    c = make_case([40, 17], device=device)
    dev = torch.device(device).type
    want = variants.resolve("kv_select", "auto", device)
    for cache in (None, kv.SelectionCache()):
        seen.clear()
        kv.select(c.q, c.k, c.seq_lens, k=4, n_sink=2, n_local=2, cache=cache)
        assert seen[0] == ("kv_select", "auto", dev, "kv_select.select", want)
    assert passed == [want, want]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_decode_step_has_no_host_sync():
    """Whole TokenSelect decode (and chunked-prefill) steps with check=False and out= buffers
    never sync the host (torch.cuda.set_sync_debug_mode("error") turns any sync into an
    error): score, topk (every impl, with and without reuse / out=), select with and without a
    SelectionCache (decide, reuse, update, reset, counters), sparse_decode (every impl, with and
    without out=/lse=),
    sparse_prefill (int and tensor chunk_start, with and without out=/lse=)."""
    B, H_kv, G, D, k, n_sink, n_local = 2, 2, 4, 128, 32, 4, 16
    W = n_sink + k + n_local
    c = make_case([300, 120], H_kv=H_kv, G=G, D=D, page_size=16, device="cuda")
    p = make_case([300, 120], H_kv=H_kv, G=G, D=D, page_size=16, device="cuda", C=8)
    cs = c.seq_lens - 8
    H_q = H_kv * G
    sc = kv.SelectionCache(0.9)
    out, lse = torch.empty_like(c.q), torch.empty(B, H_q, device="cuda")
    pout, plse = torch.empty_like(p.q), torch.empty(B, 8, H_q, device="cuda")
    idx = torch.empty(B, W, dtype=torch.int32, device="cuda")
    idx2, idx3 = torch.empty_like(idx), torch.empty_like(idx)
    kw = dict(block_table=c.block_table, check=False)

    def step():
        s = kv.score(c.q, c.k, c.seq_lens, skip=sc.last_hit, **kw)
        kv.topk(s, k, c.seq_lens, n_sink=n_sink, n_local=n_local, reuse=sc.prev_mid,
                reuse_mask=sc.last_hit, out=idx2, check=False)
        kv.select(c.q, c.k, c.seq_lens, k=k, n_sink=n_sink, n_local=n_local, out=idx2, **kw)
        kv.select(c.q, c.k, c.seq_lens, k=k, n_sink=n_sink, n_local=n_local, cache=sc, out=idx, **kw)
        kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, out=out, lse=lse, **kw)
        for impl in ("auto", "plain", "simt", "tuned"):
            kv.score(c.q, c.k, c.seq_lens, impl=impl, **kw)
            kv.topk(s, k, c.seq_lens, n_sink=n_sink, n_local=n_local, reuse=sc.prev_mid,
                    reuse_mask=sc.last_hit, out=idx3, check=False, impl=impl)
            kv.topk(s, k, c.seq_lens, n_sink=n_sink, n_local=n_local, check=False, impl=impl)
            kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, impl=impl, return_lse=True, **kw)
        pidx = kv.select(p.q, p.k, cs, k=k, n_sink=n_sink, n_local=n_local, cache=sc, **kw)
        kv.sparse_prefill(p.q, p.k, p.v, pidx, p.seq_lens, cs, out=pout, lse=plse, **kw)
        kv.sparse_prefill(p.q, p.k, p.v, pidx, p.seq_lens, 5, return_lse=True, **kw)
        sc.reset(torch.zeros(B, dtype=torch.bool, device="cuda"))
        return sc.hit_count, sc.lookup_count

    step()   # sizes the cache state (and lets every lazy initialisation happen)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # the decode query alternates with the prefill chunk's mean query in the one cache: whatever
    # the hits, the unchecked results equal the checked ones
    want = kv.select(c.q, c.k, c.seq_lens, k=k, n_sink=n_sink, n_local=n_local, block_table=c.block_table)
    assert torch.equal(idx2, want)
    o, l = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table, return_lse=True)
    assert torch.equal(out, o) and torch.equal(lse, l)
    assert int(sc.lookup_count) == 2 * 2 * 3


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_impls_agree(device, impl):
    """The CUDA plain (one block per request and KV head) and tuned (split-KV) variants, "auto"
    and the reference; the CPU kernel ignores the variant name."""
    c = make_case([1000, 3, 513], G=8, D=128, page_size=16, device=device)
    idx = kv.select(c.q, c.k, c.seq_lens, k=300, n_sink=4, n_local=64, block_table=c.block_table)
    got = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table, impl=impl)
    want = ref.sparse_decode(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens),
                             block_table=cpu(c.block_table))
    _close(got, want, tol(torch.float32, "kv_out"), "out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [None, 16])
def test_precision_no_worse_than_same_dtype_reference(device, dtype, page):
    """Decode output error vs the fp64 truth is no worse than the same-dtype torch
    reference's (which computes in fp32 and rounds the output to the dtype), plus a tiny tol."""
    c = make_case([700, 33], G=4, D=128, dtype=dtype, page_size=page, device=device, seed=11)
    idx = kv.select(c.q, c.k, c.seq_lens, k=200, n_sink=4, n_local=32, block_table=c.block_table)
    truth = ref.sparse_decode(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens),
                              block_table=cpu(c.block_table))
    same = ref.sparse_decode(c.q.cpu(), c.k.cpu(), c.v.cpu(), idx.cpu(), cpu(c.seq_lens),
                             block_table=cpu(c.block_table))
    got = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table)
    e_got = (got.double().cpu() - truth).abs().max().item()
    e_ref = (same.double() - truth).abs().max().item()
    # tiny tol: 1e-6 in fp32; in fp16/bf16 one output ulp (an fp32 difference in the last bit
    # can flip the final rounding, e.g. under CUDA's summation order)
    tiny = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps * truth.abs().max().item()
    assert e_got <= e_ref + tiny, f"kernel {e_got:.3g} vs same-dtype reference {e_ref:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,D,strided", [pytest.param(torch.bfloat16, 128, False, id="bf16-D128"),
                                             pytest.param(torch.float32, 64, False, id="fp32-D64"),
                                             pytest.param(torch.float16, 256, False, id="fp16-D256"),
                                             pytest.param(torch.float32, 256, False, id="fp32-D256"),
                                             pytest.param(torch.bfloat16, 128, True, id="bf16-D128-strided")])
def test_score_impls_agree(device, impl, dtype, D, strided):
    """The CUDA plain and tuned (16-byte vector loads; falls back to plain where the layout does
    not allow it: fp32 D=256, strided) scoring variants, "auto" and the reference; the CPU
    kernel ignores the variant name."""
    c = make_case([700, 64, 5], G=4, D=D, dtype=dtype, page_size=16, strided=strided, device=device)
    got = kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table, impl=impl)
    want = ref.score(f64(c.q), f64(c.k), cpu(c.seq_lens), block_table=cpu(c.block_table))
    _close(got, want, tol(dtype, "kv_score") * c.q.shape[1], "score")


@pytest.mark.parametrize("D", [3, 12, 20])
@pytest.mark.parametrize("page", [None, 16])
def test_odd_head_dim(device, D, page):
    """head_dim not a multiple of the 8-wide vectors (scalar tails / staging path)."""
    c = make_case([100, 37], G=4, D=D, page_size=page, device=device, seed=D)
    s = kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table)
    _close(s, ref.score(f64(c.q), f64(c.k), cpu(c.seq_lens), block_table=cpu(c.block_table)),
           tol(torch.float32, "kv_score") * 8, "score")
    idx = kv.topk(s, 10, c.seq_lens, n_sink=2, n_local=4)
    out = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table)
    want = ref.sparse_decode(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens),
                             block_table=cpu(c.block_table))
    _close(out, want, tol(torch.float32, "kv_out"), "out")


def _noncontig(c):
    """The case's q, seq_lens (int64) and block_table as non-contiguous views of the same values
    (the cache itself is the HF-transposed view, make_case(strided=True))."""
    D = c.q.shape[-1]
    q = torch.cat([c.q, torch.full_like(c.q, float("nan"))], -1)[..., :D]
    sl = torch.stack([c.seq_lens.long(), c.seq_lens.long()], 1)[:, 0]
    bt = None if c.block_table is None else torch.stack([c.block_table, c.block_table], -1)[..., 0]
    assert not q.is_contiguous() and (sl.numel() == 1 or not sl.is_contiguous())
    assert bt is None or not bt.is_contiguous() or bt.shape[1] == 1
    return q, sl, bt


SIZES = [pytest.param([1], id="1"), pytest.param([7], id="7"), pytest.param([129, 1, 7], id="129-1-7"),
         pytest.param([1000, 129], id="1000-129")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page", [pytest.param(None, id="contiguous"), pytest.param(16, id="paged16")])
@pytest.mark.parametrize("seq", SIZES)
def test_decode_ops_odd_sizes_noncontiguous_out(device, impl, page, seq):
    """score, topk, select and sparse_decode of every impl vs the fp64 reference: odd lengths
    1 / 7 / 129 / 1000, non-contiguous q / seq_lens (int64) / block_table / cache, out= buffers."""
    c = make_case(seq, G=4, D=64, page_size=page, strided=True, device=device, seed=sum(seq))
    q, sl, bt = _noncontig(c)
    B, H_q = q.shape[:2]
    s = kv.score(q, c.k, sl, block_table=bt, impl=impl)
    want = ref.score(f64(c.q), f64(c.k), cpu(c.seq_lens), block_table=cpu(c.block_table))
    _close(s, want, tol(torch.float32, "kv_score") * H_q, "score")
    budget = dict(n_sink=3, n_local=5)
    W = 3 + 11 + 5
    idx = torch.full((B, W), 77, dtype=torch.int32, device=device)
    r = kv.topk(s, 11, sl, out=idx, impl=impl, **budget)
    assert r is idx and torch.equal(idx.cpu(), ref.topk(s.cpu(), 11, c.seq_lens.cpu(), **budget))
    sel = torch.full_like(idx, 5)
    r = kv.select(q, c.k, sl, k=11, block_table=bt, out=sel, impl=impl, **budget)
    assert r is sel and torch.equal(sel, idx)
    out, lse = torch.full_like(c.q, 3.0), torch.full((B, H_q), 3.0, device=device)
    r = kv.sparse_decode(q, c.k, c.v, idx, sl, block_table=bt, out=out, lse=lse, return_lse=True, impl=impl)
    assert r[0] is out and r[1] is lse
    wo, wl = ref.sparse_decode(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens),
                               block_table=cpu(c.block_table), return_lse=True)
    _close(out, wo, tol(torch.float32, "kv_out"), "out")
    _close(lse, wl, tol(torch.float32, "kv_lse"), "lse")
    o2 = kv.sparse_decode(q, c.k, c.v, idx, sl, block_table=bt, impl=impl)
    assert torch.equal(o2, out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page", [pytest.param(None, id="contiguous"), pytest.param(16, id="paged16")])
@pytest.mark.parametrize("chunk", [pytest.param([1], id="1"), pytest.param([7, 1], id="7-1"),
                                   pytest.param([9, 5, 0], id="9-5-0")])
def test_prefill_odd_sizes_noncontiguous_out(device, impl, page, chunk):
    """sparse_prefill of every impl vs the fp64 reference: odd chunk lengths (a padded chunk, an
    empty one), a 1000-token past, non-contiguous inputs, int and tensor chunk_start, out=."""
    C = max(chunk)
    starts = [1000, 129, 7][:len(chunk)]
    seq = [s0 + n for s0, n in zip(starts, chunk)]
    c = make_case(seq, G=2, D=64, page_size=page, strided=True, device=device, seed=C, C=C)
    q, sl, bt = _noncontig(c)
    cs = torch.tensor(starts, device=device)   # int64
    idx = kv.select(q, c.k, cs, k=37, n_sink=2, n_local=6, block_table=bt, impl=impl)
    out, lse = torch.full_like(c.q, 3.0), torch.full(c.q.shape[:3], 3.0, device=device)
    r = kv.sparse_prefill(q, c.k, c.v, idx, sl, cs, block_table=bt, out=out, lse=lse, return_lse=True, impl=impl)
    assert r[0] is out and r[1] is lse
    wo, wl = ref.sparse_prefill(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens), cs.cpu(),
                                block_table=cpu(c.block_table), return_lse=True)
    _close(out, wo, tol(torch.float32, "kv_out"), "out")
    _close(lse, wl, tol(torch.float32, "kv_lse"), "lse")
    if len(set(starts)) == 1:
        assert torch.equal(kv.sparse_prefill(q, c.k, c.v, idx, sl, starts[0], block_table=bt, impl=impl), out)


def _valid_mask(seq, n_max, device, seed):
    """Left padding on request 1, a masked run and every 5th token masked on request 0."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(len(seq), n_max, generator=g) > 0.2
    v[0, 40:60] = False
    if len(seq) > 1:
        v[1, :9] = False
    return v.to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page", [pytest.param(None, id="contiguous"), pytest.param(16, id="paged16")])
def test_valid_vs_reference(device, impl, page):
    """score(valid=) / select(valid=) vs the fp64 reference, and the definition itself: masked
    tokens score -inf and take no part in the softmax (the valid tokens' scores of every head
    sum to 1, so a row sums to H_q), select never returns one, the rest stays ascending."""
    seq = [300, 129, 7]
    c = make_case(seq, G=4, D=64, page_size=page, device=device, seed=3)
    N = kv.capacity(c.k, c.block_table)
    valid = _valid_mask(seq, N, device, seed=4)
    H_q = c.q.shape[1]
    s = kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table, valid=valid, impl=impl)
    want = ref.score(f64(c.q), f64(c.k), cpu(c.seq_lens), block_table=cpu(c.block_table), valid=valid.cpu())
    _close(s, want, tol(torch.float32, "kv_score") * H_q, "score(valid)")
    inside = torch.arange(N, device=device)[None, :] < c.seq_lens[:, None].long()
    assert torch.all(torch.isneginf(s[~valid | ~inside]))
    sums = torch.where(torch.isfinite(s), s, torch.zeros_like(s)).double().sum(1).cpu()
    assert torch.allclose(sums, torch.full((3,), float(H_q), dtype=torch.float64), atol=1e-4)
    kw = dict(k=40, n_sink=4, n_local=16, block_table=c.block_table)
    idx = kv.select(c.q, c.k, c.seq_lens, valid=valid, impl=impl, **kw)
    widx = ref.select(f64(c.q), f64(c.k), cpu(c.seq_lens), valid=valid.cpu(), k=40, n_sink=4, n_local=16,
                      block_table=cpu(c.block_table))
    assert torch.equal(idx.cpu(), widx)
    for b in range(3):
        row = idx[b].cpu()
        n = int((row >= 0).sum())
        assert torch.all(row[n:] == -1) and torch.all(row[:n].diff() > 0)
        assert bool(valid[b].cpu()[row[:n].long()].all())
    # request 1 (129 tokens, 9 padded): the sinks fell on padding, the local window keeps its
    # unmasked tokens, the middle is the 40 best unmasked tokens of [4, 113)
    v1 = valid[1].cpu()
    assert idx[1, 0].item() >= 9
    assert int((idx[1] >= 0).sum()) == 40 + int(v1[113:129].sum()) and int(v1[4:113].sum()) > 40
    # out= and an all-valid mask equal the unmasked call
    buf = torch.empty_like(idx)
    assert kv.select(c.q, c.k, c.seq_lens, valid=valid, out=buf, impl=impl, **kw) is buf
    assert torch.equal(buf, idx)
    ones = torch.ones_like(valid)
    assert torch.equal(kv.select(c.q, c.k, c.seq_lens, valid=ones, impl=impl, **kw),
                       kv.select(c.q, c.k, c.seq_lens, impl=impl, **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_valid_with_selection_cache_vs_reference(device, impl):
    """Several decode steps through a SelectionCache with a mask: equal to the reference select
    and reference cache step by step (hits reuse topk's own picks, masked again)."""
    c = make_case([300, 200], G=4, D=64, n_max=310, device=device, seed=8)
    valid = _valid_mask([300, 200], 310, device, seed=9)
    sc, rc = kv.SelectionCache(0.6), ref.SelectionCache(0.6)
    g = torch.Generator().manual_seed(2)
    q = c.q
    kw = dict(k=24, n_sink=4, n_local=16)
    for t in range(4):
        sl = c.seq_lens + t
        got = kv.select(q, c.k, sl, cache=sc, valid=valid, impl=impl, **kw)
        want = ref.select(q.cpu(), c.k.cpu(), sl.cpu(), cache=rc, valid=valid.cpu(), **kw)
        assert torch.equal(got.cpu(), want), f"step {t}"
        q = q + (torch.randn(q.shape, generator=g) * (0.05 if t % 2 else 0.8)).to(device)
    assert torch.equal(sc.hits.cpu(), rc.hits) and int(sc.hit_count) > 0


def test_reference_has_the_public_signatures():
    """impl="reference" runs tokenkernels.reference.kv_select: the same parameters and defaults."""
    import inspect

    for name in ("score", "topk", "sparse_decode", "sparse_prefill", "select"):
        pub, rf = inspect.signature(getattr(kv, name)), inspect.signature(getattr(ref, name))
        assert [(p.name, p.kind, p.default) for p in pub.parameters.values()] == \
               [(p.name, p.kind, p.default) for p in rf.parameters.values()], name
