"""Randomised cases (hypothesis): select + sparse_decode + sparse_prefill vs the reference over
random layouts, GQA ratios, page sizes, lengths and budgets."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenkernels import kv_select as kv
from tokenkernels.reference import kv_select as ref

from .cases import cpu, f64, make_case


@settings(max_examples=40)
@given(
    seq=st.lists(st.integers(0, 90), min_size=1, max_size=4),
    H_kv=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 2, 4, 8]),
    D=st.sampled_from([8, 12, 64, 72]),   # 12: no 8-wide vector path
    page=st.sampled_from([None, 1, 5, 16]),
    strided=st.booleans(),
    budget=st.tuples(st.integers(0, 6), st.integers(0, 20), st.integers(0, 9)),
    seed=st.integers(0, 1000),
)
def test_random_decode_step(seq, H_kv, G, D, page, strided, budget, seed):
    n_sink, k, n_local = budget
    c = make_case(seq, H_kv=H_kv, G=G, D=D, page_size=page, strided=strided, seed=seed)
    scale = D ** -0.5
    s = kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table, scale=scale)
    sr = ref.score(f64(c.q), f64(c.k), c.seq_lens, block_table=c.block_table, scale=scale)
    fin = torch.isfinite(sr)
    assert torch.equal(fin, torch.isfinite(s))
    assert torch.allclose(s.double()[fin], sr[fin], atol=1e-5 * G * H_kv)
    idx = kv.topk(s, k, c.seq_lens, n_sink=n_sink, n_local=n_local)
    assert torch.equal(idx, ref.topk(s, k, c.seq_lens, n_sink=n_sink, n_local=n_local))
    out, lse = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table, return_lse=True)
    wo, wl = ref.sparse_decode(f64(c.q), f64(c.k), f64(c.v), idx, c.seq_lens, block_table=c.block_table,
                               return_lse=True)
    assert torch.allclose(out.double(), wo, atol=2e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(wl))
    fin = torch.isfinite(wl)
    assert torch.allclose(lse.double()[fin], wl[fin], atol=5e-5)


@settings(max_examples=25)
@given(
    starts=st.lists(st.integers(0, 60), min_size=1, max_size=3),
    C=st.integers(1, 7),
    G=st.sampled_from([1, 4]),
    page=st.sampled_from([None, 1, 16]),
    k=st.integers(0, 30),
    seed=st.integers(0, 1000),
)
def test_random_prefill_chunk(starts, C, G, page, k, seed):
    g = torch.Generator().manual_seed(seed)
    lens = [int(torch.randint(0, C + 1, (1,), generator=g)) for _ in starts]
    seq = [s + n for s, n in zip(starts, lens)]
    c = make_case(seq, G=G, D=64, page_size=page, seed=seed, C=C, n_max=max(seq) + 1)
    cs = torch.tensor(starts, dtype=torch.int32)
    idx = torch.randint(-1, 70, (len(seq), k), generator=g, dtype=torch.int32)   # may include chunk / -1
    out, lse = kv.sparse_prefill(c.q, c.k, c.v, idx, c.seq_lens, cs, block_table=c.block_table, return_lse=True)
    wo, wl = ref.sparse_prefill(f64(c.q), f64(c.k), f64(c.v), idx, c.seq_lens, cs, block_table=c.block_table,
                                return_lse=True)
    assert torch.allclose(out.double(), wo, atol=2e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(wl))
    fin = torch.isfinite(wl)
    assert torch.allclose(lse.double()[fin], wl[fin], atol=5e-5)
