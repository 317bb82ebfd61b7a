"""SelectionCache: hit/miss decided on the device exactly by cos(q_now, q_prev) > threshold,
reuse semantics equal to the reference cache over a multi-step decode, counts, reset."""
import pytest
import torch

from tokenkernels import kv_select as kv
from tokenkernels import variants
from tokenkernels.reference import kv_select as ref

from .cases import make_case


def _with_cos(q: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Per request b, a query whose flattened cosine similarity to q[b] is cos[b] (exactly up to
    fp32 rounding)."""
    B = q.shape[0]
    a = q.reshape(B, -1).double()
    a = a / a.norm(dim=1, keepdim=True)
    r = torch.randn(a.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = r - (r * a).sum(1, keepdim=True) * a
    r = r / r.norm(dim=1, keepdim=True)
    c = cos.double()[:, None]
    return (c * a + (1 - c * c).sqrt() * r).reshape(q.shape).to(q.dtype).to(q.device)


def test_threshold_decides_hits(device):
    c = make_case([500, 500, 500, 500], G=4, D=64, device=device)
    sc = kv.SelectionCache(threshold=0.9)
    kw = dict(k=16, n_sink=4, n_local=8)
    first = kv.select(c.q, c.k, c.seq_lens, cache=sc, **kw)
    assert sc.hits.tolist() == [0, 0, 0, 0] and sc.lookups.tolist() == [1, 1, 1, 1]
    cos = torch.tensor([0.95, 0.85, 0.91, 0.5])
    q2 = _with_cos(c.q, cos)
    second = kv.select(q2, c.k, c.seq_lens, cache=sc, **kw)
    assert sc.last_hit.tolist() == [True, False, True, False]
    assert sc.hits.tolist() == [1, 0, 1, 0] and int(sc.hit_count) == 2 and int(sc.lookup_count) == 8
    # hits reuse the previous picks; misses are scored afresh
    fresh = kv.select(q2, c.k, c.seq_lens, **kw)
    assert torch.equal(second[[0, 2]], first[[0, 2]])
    assert torch.equal(second[[1, 3]], fresh[[1, 3]])
    # the decision matches the reference cache's formula exactly
    rc = ref.SelectionCache(0.9)
    ref.select(c.q.cpu(), c.k.cpu(), c.seq_lens.cpu(), cache=rc, **kw)
    assert rc.decide(q2.float().cpu()).tolist() == [True, False, True, False]


def test_threshold_is_strict(device):
    c = make_case([100], G=1, D=64, device=device)
    sc = kv.SelectionCache(threshold=1.0)
    kv.select(c.q, c.k, c.seq_lens, k=8, n_sink=0, n_local=0, cache=sc)
    kv.select(c.q, c.k, c.seq_lens, k=8, n_sink=0, n_local=0, cache=sc)   # cos == 1 (or 1 - ulp)
    assert int(sc.hit_count) == 0                                          # never > 1.0
    sc = kv.SelectionCache(threshold=-1.5)                                # always hit after the first step
    for _ in range(3):
        kv.select(c.q, c.k, c.seq_lens, k=8, n_sink=0, n_local=0, cache=sc)
    assert int(sc.hit_count) == 2


@pytest.mark.parametrize("impl", variants.impls("kv_select"))
@pytest.mark.parametrize("page", [None, 16])
def test_multi_step_decode_matches_reference(device, page, impl):
    """Growing sequences, a slowly drifting query: the device cache equals the reference cache
    step by step (hits, picks, rebuilt local windows), whatever impl select runs (also
    "reference": the reference select on the device cache's state)."""
    steps, N = 6, 400
    c = make_case([300, 350, 50], G=4, D=64, page_size=page, n_max=N, device=device)
    sc, rc = kv.SelectionCache(0.97), ref.SelectionCache(0.97)
    g = torch.Generator().manual_seed(1)
    q = c.q
    kw = dict(k=24, n_sink=4, n_local=16)
    for t in range(steps):
        sl = c.seq_lens + t
        got = kv.select(q, c.k, sl, block_table=c.block_table, cache=sc, impl=impl, **kw)
        want = ref.select(q.cpu(), c.k.cpu(), sl.cpu(), block_table=None if page is None else c.block_table.cpu(),
                          cache=rc, **kw)
        assert torch.equal(got.cpu(), want), f"step {t}"
        noise = torch.randn(q.shape, generator=g) * (0.05 if t % 2 else 0.6)
        q = q + noise.to(device)
    assert torch.equal(sc.hits.cpu(), rc.hits)
    assert int(sc.hit_count) > 0 and int(sc.hit_count) < 3 * (steps - 1)
    # a hit keeps the sink and rebuilds the local window for the current length
    last = got.cpu()
    for b in range(3):
        L = int(c.seq_lens[b]) + steps - 1
        row = last[b][last[b] >= 0]
        if L > 44:
            assert row[-16:].tolist() == list(range(L - 16, L)) and row[:4].tolist() == [0, 1, 2, 3]


def test_reset_and_resize(device):
    c = make_case([100, 100], G=2, D=64, device=device)
    sc = kv.SelectionCache(0.5)
    kw = dict(k=8, n_sink=2, n_local=4)
    kv.select(c.q, c.k, c.seq_lens, cache=sc, **kw)
    sc.reset(torch.tensor([True, False], device=device))
    kv.select(c.q, c.k, c.seq_lens, cache=sc, **kw)
    assert sc.last_hit.tolist() == [False, True]
    sc.reset()
    kv.select(c.q, c.k, c.seq_lens, cache=sc, **kw)
    assert sc.last_hit.tolist() == [False, False]
    # a different k (or batch) starts afresh
    kv.select(c.q, c.k, c.seq_lens, cache=sc, k=9, n_sink=2, n_local=4)
    assert sc.last_hit.tolist() == [False, False] and sc.prev_mid.shape == (2, 9)


def test_prefill_chunk_uses_mean_query(device):
    c = make_case([300, 200], G=4, D=64, device=device, C=6)
    sc = kv.SelectionCache(0.9)
    a = kv.select(c.q, c.k, c.seq_lens, k=10, n_sink=2, n_local=4, cache=sc)
    assert torch.equal(a, kv.select(c.q.mean(1), c.k, c.seq_lens, k=10, n_sink=2, n_local=4))


@pytest.mark.parametrize("impl", variants.impls("kv_select"))
def test_resize_starts_afresh_with_every_impl(device, impl):
    """A call with another k (same batch and query size) starts afresh -- no hit on stale
    picks -- whichever implementation runs the cache step; the reference cache agrees."""
    c = make_case([100, 100], G=2, D=64, device=device)
    for cache in (kv.SelectionCache(-2.0), ref.SelectionCache(-2.0)):
        run = (lambda **kw: kv.select(c.q, c.k, c.seq_lens, cache=cache, impl=impl, **kw)) \
            if isinstance(cache, kv.SelectionCache) else \
            (lambda **kw: ref.select(c.q.cpu(), c.k.cpu(), c.seq_lens.cpu(), cache=cache, **kw))
        run(k=8, n_sink=2, n_local=4)
        run(k=8, n_sink=2, n_local=4)
        assert cache.last_hit.tolist() == [True, True]
        run(k=9, n_sink=2, n_local=4)
        assert cache.last_hit.tolist() == [False, False] and cache.prev_mid.shape == (2, 9)
        assert cache.lookups.tolist() == [1, 1]
