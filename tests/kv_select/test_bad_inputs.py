"""Bad arguments raise a clear error naming the argument, never a crash or an OOB read."""
import pytest
import torch

from tokenkernels import kv_select as kv

from .cases import make_case

ERR = (RuntimeError, ValueError, TypeError)


def _c(device, page=None, **kw):
    return make_case([40, 20], G=4, D=64, page_size=page, device=device, **kw)


def test_block_table_out_of_range(device):
    c = _c(device, page=16)
    bt = c.block_table.clone()
    bt[1, 0] = 10_000
    with pytest.raises(RuntimeError, match=r"block_table\[1, 0\] = 10000 is outside"):
        kv.score(c.q, c.k, c.seq_lens, block_table=bt)
    bt[1, 0] = -3
    idx = torch.zeros(2, 4, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"block_table\[1, 0\] = -3"):
        kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=bt)
    with pytest.raises(RuntimeError, match="block_table must have shape"):
        kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table[:1])
    with pytest.raises(TypeError, match="block_table must be an integer tensor"):
        kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table.float())


@pytest.mark.parametrize("page", [None, 16])
def test_seq_len_beyond_capacity(device, page):
    c = _c(device, page=page)
    cap = kv.capacity(c.k, c.block_table)
    sl = torch.tensor([cap + 1, 3], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=rf"seq_lens\[0\] = {cap + 1} is outside \[0, {cap}\]"):
        kv.score(c.q, c.k, sl, block_table=c.block_table)
    with pytest.raises(RuntimeError, match="seq_lens"):
        kv.select(c.q, c.k, sl, k=4, n_sink=1, n_local=1, block_table=c.block_table)
    sl = torch.tensor([-1, 3], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] = -1"):
        kv.score(c.q, c.k, sl, block_table=c.block_table)
    with pytest.raises(RuntimeError, match="seq_lens must have shape"):
        kv.score(c.q, c.k, c.seq_lens[:1], block_table=c.block_table)


def test_gqa_ratio(device):
    c = _c(device)
    q = c.q[:, :7]   # 7 q-heads over 2 KV heads
    with pytest.raises(RuntimeError, match=r"H_q \(7\) must be a multiple of H_kv \(2\)"):
        kv.score(q, c.k, c.seq_lens)
    idx = torch.zeros(2, 3, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"H_q \(7\) must be a multiple of H_kv \(2\)"):
        kv.sparse_decode(q.contiguous(), c.k, c.v, idx, c.seq_lens)


def test_zero_query_heads_or_head_dim(device):
    """H_q = 0 passes the GQA check (0 % H_kv == 0) and would launch a zero-sized CUDA grid, and
    D = 0 is outside the CUDA kernels' limits: every op rejects both, the same on every device."""
    c = _c(device, C=3)                                  # q (2, 3, 8, 64)
    q0, q0d = c.q[:, 0, :0], c.q[:, :, :0]               # (2, 0, 64), chunk (2, 3, 0, 64)
    idx = torch.zeros(2, 3, dtype=torch.int32, device=device)
    heads = r"q must have at least one head \(H_q = q.size\({}\) > 0\)"
    with pytest.raises(RuntimeError, match="kv_select.score: " + heads.format(1)):
        kv.score(q0, c.k, c.seq_lens)
    with pytest.raises(RuntimeError, match="kv_select.score: " + heads.format(2)):
        kv.score(q0d, c.k, c.seq_lens)
    with pytest.raises(RuntimeError, match=heads.format(1)):
        kv.select(q0, c.k, c.seq_lens, k=4, n_sink=1, n_local=1)
    with pytest.raises(RuntimeError, match=heads.format(1)):
        kv.select(q0, c.k, c.seq_lens, k=4, n_sink=1, n_local=1, cache=kv.SelectionCache())
    with pytest.raises(RuntimeError, match="kv_select.sparse_decode: " + heads.format(1)):
        kv.sparse_decode(q0, c.k, c.v, idx, c.seq_lens)
    with pytest.raises(RuntimeError, match="kv_select.sparse_decode: " + heads.format(1)):
        kv.sparse_decode(q0, c.k, c.v, idx, c.seq_lens, out=torch.empty_like(q0),
                         lse=torch.empty(2, 0, device=device))
    with pytest.raises(RuntimeError, match="kv_select.sparse_prefill: " + heads.format(2)):
        kv.sparse_prefill(q0d, c.k, c.v, idx, c.seq_lens, 0)
    with pytest.raises(RuntimeError, match="kv_select.sparse_prefill: " + heads.format(2)):
        kv.sparse_prefill(q0d, c.k, c.v, idx, c.seq_lens, 0, out=torch.empty_like(q0d))
    # head_dim 0 (q and cache alike)
    k0, v0 = c.k[..., :0], c.v[..., :0]
    dim0 = r"head_dim \(q.size\({}\)\) must be > 0"
    with pytest.raises(RuntimeError, match="kv_select.score: " + dim0.format(2)):
        kv.score(c.q[:, 0, :, :0], k0, c.seq_lens)
    with pytest.raises(RuntimeError, match="kv_select.sparse_decode: " + dim0.format(2)):
        kv.sparse_decode(c.q[:, 0, :, :0], k0, v0, idx, c.seq_lens)
    with pytest.raises(RuntimeError, match="kv_select.sparse_prefill: " + dim0.format(3)):
        kv.sparse_prefill(c.q[..., :0], k0, v0, idx, c.seq_lens, 0)


def test_negative_budget(device):
    c = _c(device)
    s = kv.score(c.q, c.k, c.seq_lens)
    for name, kw in [("k", dict(k=-1)), ("n_sink", dict(k=4, n_sink=-2)), ("n_local", dict(k=4, n_local=-5))]:
        with pytest.raises(ValueError, match=f"{name} must be >= 0"):
            kv.topk(s, kw.pop("k"), c.seq_lens, **kw)
    with pytest.raises(ValueError, match="k must be >= 0"):
        kv.select(c.q, c.k, c.seq_lens, k=-3)
    with pytest.raises(RuntimeError, match="k must be >= 0"):   # the raw op checks too
        torch.ops.tokenkernels.kv_select_topk(s, -1, c.seq_lens, 0, 0, None, None, True)


def test_dtype_device_mismatch(device):
    c = _c(device)
    idx = torch.zeros(2, 3, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="q dtype .* differs from k_cache dtype"):
        kv.sparse_decode(c.q.half(), c.k, c.v, idx, c.seq_lens)
    with pytest.raises(RuntimeError, match="v_cache dtype .* differs from k_cache dtype"):
        kv.sparse_decode(c.q, c.k, c.v.half(), idx, c.seq_lens)
    with pytest.raises(RuntimeError, match="v_cache must have the shape of k_cache"):
        kv.sparse_decode(c.q, c.k, c.v[:, :10], idx, c.seq_lens)
    with pytest.raises(RuntimeError, match="k_cache must be float32, float16 or bfloat16"):
        kv.score(c.q, c.k.double(), c.seq_lens)
    with pytest.raises(RuntimeError, match="q head_dim 32 differs from k_cache head_dim 64"):
        kv.score(c.q[..., :32], c.k, c.seq_lens)
    with pytest.raises(RuntimeError, match="k_cache must be 4-D"):
        kv.score(c.q, c.k[0], c.seq_lens)
    with pytest.raises(RuntimeError, match="contiguous k_cache must have 2 rows"):
        kv.score(c.q, c.k[:1], c.seq_lens)
    # the op itself accepts any integer dtype (narrowed to int32 in C++) and rejects the rest
    with pytest.raises(TypeError, match="kv_select.sparse_decode: indices must be an integer tensor, got Float"):
        torch.ops.tokenkernels.kv_select_sparse_decode(c.q, c.k, c.v, idx.float(), c.seq_lens, None, 1.0, True,
                                                       "auto")
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        kv.sparse_decode(c.q, c.k, c.v, idx.float(), c.seq_lens)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        kv.score([1, 2], c.k, c.seq_lens)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="seq_lens is on"):
            kv.score(c.q, c.k, c.seq_lens.cuda())


def test_indices_values(device):
    c = _c(device)
    idx = torch.tensor([[0, -1, 39], [0, 20, -1]], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"indices\[1, 1\] = 20 is outside \[-1, seq_lens\[1\] = 20\)"):
        kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens)
    idx = torch.tensor([[0, -2, 39], [0, 2, -1]], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"indices\[0, 1\] = -2"):
        kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens)
    with pytest.raises(RuntimeError, match="indices must have shape"):
        kv.sparse_decode(c.q, c.k, c.v, idx[0], c.seq_lens)


def test_prefill_args(device):
    c = _c(device, C=4)
    idx = torch.zeros(2, 3, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"chunk_start\[1\] = 25 is outside \[0, seq_lens\[1\] = 20\]"):
        kv.sparse_prefill(c.q, c.k, c.v, idx, c.seq_lens, torch.tensor([0, 25], device=device))
    with pytest.raises(RuntimeError, match="chunk_start must be a"):
        kv.sparse_prefill(c.q, c.k, c.v, idx, c.seq_lens, torch.tensor([0, 1, 2], device=device))
    with pytest.raises(RuntimeError, match=r"q must be \(B, C, H_q, D\)"):
        kv.sparse_prefill(c.q[:, 0], c.k, c.v, idx, c.seq_lens, 0)


def test_out_buffers(device):
    c = _c(device)
    s = kv.score(c.q, c.k, c.seq_lens)
    with pytest.raises(RuntimeError, match="out must have shape"):
        kv.topk(s, 4, c.seq_lens, n_sink=1, n_local=1, out=torch.empty(2, 5, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="out must be Int"):
        kv.topk(s, 4, c.seq_lens, n_sink=1, n_local=1, out=torch.empty(2, 6, dtype=torch.long, device=device))
    idx = torch.zeros(2, 3, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, lse=torch.empty(2, 3, device=device))
    with pytest.raises(RuntimeError, match="reuse must have shape"):
        kv.topk(s, 4, c.seq_lens, reuse=torch.zeros(2, 3, dtype=torch.int32, device=device),
                reuse_mask=torch.zeros(2, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="cache must be a SelectionCache"):
        kv.select(c.q, c.k, c.seq_lens, k=4, cache=object())


def test_unchecked_bad_values_do_not_read_out_of_bounds(device):
    """check=False skips the host-side validation; out-of-range pages and indices are skipped
    by the kernels (CPU always validates, so there the error is still raised)."""
    c = _c(device, page=16)
    bt = c.block_table.clone()
    bt[0, 1] = 1 << 30
    idx = torch.tensor([[0, 30, 500], [1, 2, 3]], dtype=torch.int32, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="block_table"):
            kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=bt, check=False)
    else:
        out = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=bt, check=False)
        assert torch.isfinite(out).all()


BIG = 2 ** 32 + 1   # a plain int64 -> int32 cast wraps it to 1, a valid token


def test_int64_metadata_beyond_int32_is_not_wrapped(device):
    """int64 metadata is narrowed saturating (no host sync): 2**32 + 1 is rejected as out of
    range naming the argument, never wrapped to 1 and attended."""
    c = _c(device)
    L = lambda v: torch.tensor(v, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] = 2147483647 is outside"):
        kv.score(c.q, c.k, L([BIG, 20]))
    idx = L([[BIG, 0], [1, 2]])
    with pytest.raises(RuntimeError, match=r"indices\[0, 0\] = 2147483647 is outside"):
        kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens)
    with pytest.raises(RuntimeError, match=r"indices\[0, 0\] = -2147483648"):
        kv.sparse_decode(c.q, c.k, c.v, L([[-BIG, 0], [1, 2]]), c.seq_lens)
    qp = torch.randn(2, 2, c.q.shape[1], c.q.shape[2], device=device, dtype=c.q.dtype)
    ix = L([[0, 1], [0, 1]])
    for cs in (L([BIG, 3]), BIG):
        with pytest.raises(RuntimeError, match=r"chunk_start\[0\] = 2147483647 is outside"):
            kv.sparse_prefill(qp, c.k, c.v, ix, c.seq_lens, cs)
    p = _c(device, page=16)
    bt = p.block_table.long().clone()
    bt[0, 0] = BIG
    with pytest.raises(RuntimeError, match=r"block_table\[0, 0\] = 2147483647 is outside"):
        kv.score(p.q, p.k, p.seq_lens, block_table=bt)
    # topk's reuse: entries outside the middle region are dropped by definition; BIG is
    # dropped, not read as 1
    s = kv.score(c.q, c.k, c.seq_lens)
    reuse = L([[BIG, BIG + 1], [5, 6]])
    out = kv.topk(s, 2, c.seq_lens, n_sink=1, n_local=1, reuse=reuse,
                  reuse_mask=torch.tensor([True, True], device=device))
    assert 1 not in out[0, 1:3].tolist()
    assert out[1].tolist() == [0, 5, 6, 19]


def test_int64_metadata_in_range_still_accepted(device):
    c = _c(device)
    a = kv.score(c.q, c.k, c.seq_lens)
    b = kv.score(c.q, c.k, c.seq_lens.long())
    assert torch.equal(a, b)


@pytest.mark.parametrize("k,n_sink,n_local", [pytest.param(2 ** 63 - 1, 1, 1, id="k-max"),
                                              pytest.param(2 ** 62, 2 ** 62, 0, id="k-plus-sink"),
                                              pytest.param(0, 2 ** 63 - 1, 1, id="sink-max")])
def test_topk_budget_overflow(device, k, n_sink, n_local):
    c = _c(device)
    s = kv.score(c.q, c.k, c.seq_lens)
    with pytest.raises(ValueError, match="n_sink \\+ k \\+ n_local .* overflows int64"):
        kv.topk(s, k, c.seq_lens, n_sink=n_sink, n_local=n_local)
    with pytest.raises(ValueError, match="overflows int64"):
        kv.select(c.q, c.k, c.seq_lens, k=k, n_sink=n_sink, n_local=n_local)
    # the direct op (shared C++ check, CPU and CUDA)
    with pytest.raises(RuntimeError, match="n_sink \\+ k \\+ n_local .* overflows int64"):
        torch.ops.tokenkernels.kv_select_topk(s, k, c.seq_lens, n_sink, n_local, None, None, True)
    out = torch.empty(2, 3, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="overflows int64"):
        torch.ops.tokenkernels.kv_select_topk_out(s, k, c.seq_lens, n_sink, n_local, None, None, True, out)


def test_unknown_impl(device):
    """impl names are checked by the wrappers (variants.choose) and by the ops themselves
    (parse_option in kv_select_args.h), naming the op and the accepted names."""
    c = _c(device)
    idx = torch.zeros(2, 3, dtype=torch.int32, device=device)
    for call in (lambda: kv.score(c.q, c.k, c.seq_lens, impl="fast"),
                 lambda: kv.select(c.q, c.k, c.seq_lens, k=4, impl="fast"),
                 lambda: kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, impl=2)):
        with pytest.raises(ValueError, match=r"tokenkernels\.kv_select\.\w+: impl must be one of .*'reference'"):
            call()
    with pytest.raises(ValueError, match=r"kv_select\.score: impl must be one of 'auto', 'plain', 'tuned', got 'fast'"):
        torch.ops.tokenkernels.kv_select_score(c.q, c.k, c.seq_lens, None, 1.0, None, None, True, "fast")
    with pytest.raises(ValueError, match=r"kv_select\.sparse_decode: impl must be one of 'auto', 'plain', 'tuned'"):
        torch.ops.tokenkernels.kv_select_sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, None, 1.0, True, "reference")


def test_valid_mask_args(device):
    c = _c(device)
    N = kv.capacity(c.k)
    ok = torch.ones(2, N, dtype=torch.bool, device=device)
    for bad in (ok[:, :-1], ok[:1], ok.int()):
        with pytest.raises(RuntimeError, match=rf"kv_select\.score: valid must be a \(2, {N}\) bool tensor"):
            kv.score(c.q, c.k, c.seq_lens, valid=bad)
        with pytest.raises(RuntimeError, match=r"valid must be a \(2, \d+\) bool tensor"):
            kv.select(c.q, c.k, c.seq_lens, k=4, n_sink=1, n_local=1, valid=bad, cache=kv.SelectionCache())


def test_topk_checks_seq_lens(device):
    """topk's check=True (default) rejects lengths past scores.size(1) on every device (one host
    sync on CUDA); with check=False CUDA clamps them (the CPU validates anyway)."""
    c = _c(device)
    s = kv.score(c.q, c.k, c.seq_lens)
    bad = torch.tensor([41, 3], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"kv_select\.topk: seq_lens\[0\] = 41 is outside \[0, 40\]"):
        kv.topk(s, 4, bad, n_sink=1, n_local=1)
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] = 2147483647 is outside \[0, 40\]"):
        kv.topk(s, 4, torch.tensor([BIG, 3], device=device), n_sink=1, n_local=1)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"seq_lens\[0\] = 41"):
            kv.topk(s, 4, bad, n_sink=1, n_local=1, check=False)
    else:
        got = kv.topk(s, 4, bad, n_sink=1, n_local=1, check=False)
        assert torch.equal(got[0], kv.topk(s, 4, torch.tensor([40, 3], device=device), n_sink=1, n_local=1)[0])
