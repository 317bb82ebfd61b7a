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
    with pytest.raises(ValueError, match=r"kv_select\.score: impl must be one of 'auto', 'plain', 'simt', 'tuned', got 'fast'"):
        torch.ops.tokenkernels.kv_select_score(c.q, c.k, c.seq_lens, None, 1.0, None, None, True, "fast")
    with pytest.raises(ValueError, match=r"kv_select\.sparse_decode: impl must be one of 'auto', 'plain', 'simt', 'tuned'"):
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


# ---- regressions of the fuzz's known defects found by tests/fuzz (issue #16 item 0) -----------
# kv-budget-int32: the output width n_sink + k + n_local must fit int32 (the indices are int32)
# and, beyond the capacity, at most 2**20 (pure -1 padding): never gigabytes for a tiny input.
@pytest.mark.parametrize("k,n_sink,n_local,match", [
    pytest.param(1, 2 ** 31, 0, "must fit in int32", id="sink-2^31"),
    pytest.param(2 ** 31 - 1, 0, 1, "must fit in int32", id="k-plus-local-2^31"),
    pytest.param(0, 2 ** 31 - 1, 0, "exceeds both the capacity", id="sink-int32-max"),
    pytest.param(2 ** 20, 0, 1, "exceeds both the capacity", id="k-2^20-plus-1"),
])
def test_topk_budget_beyond_int32_or_capacity(device, k, n_sink, n_local, match):
    c = _c(device)
    s = kv.score(c.q, c.k, c.seq_lens)
    pat = rf"n_sink \+ k \+ n_local = {n_sink + k + n_local} {match}"
    for impl in ("auto", "reference"):
        with pytest.raises(ValueError, match=rf"^tokenkernels\.kv_select\.topk: {pat}"):
            kv.topk(s, k, c.seq_lens, n_sink=n_sink, n_local=n_local, impl=impl)
        with pytest.raises(ValueError, match=rf"^tokenkernels\.kv_select\.select: {pat}"):
            kv.select(c.q, c.k, c.seq_lens, k=k, n_sink=n_sink, n_local=n_local, impl=impl)
    # before the Selection Cache sizes its (B, k) state
    sc = kv.SelectionCache()
    with pytest.raises(ValueError, match=pat):
        kv.select(c.q, c.k, c.seq_lens, k=k, n_sink=n_sink, n_local=n_local, cache=sc)
    assert sc.prev_mid is None
    # the direct ops (the shared C++ check, the same on CPU and CUDA)
    with pytest.raises(ValueError, match=rf"^tokenkernels\.kv_select\.topk: {pat}"):
        torch.ops.tokenkernels.kv_select_topk(s, k, c.seq_lens, n_sink, n_local, None, None, True)
    out = torch.empty(2, 3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=rf"^tokenkernels\.kv_select\.topk: {pat}"):
        torch.ops.tokenkernels.kv_select_topk_out(s, k, c.seq_lens, n_sink, n_local, None, None, False, out)


def test_topk_budget_up_to_the_padding_limit_still_accepted(device):
    """A width beyond the capacity (40 here) is -1 padding, accepted up to 2**20."""
    c = _c(device)
    s = kv.score(c.q, c.k, c.seq_lens)
    got = kv.topk(s, 2 ** 20 - 2, c.seq_lens, n_sink=1, n_local=1)
    assert got.shape == (2, 2 ** 20)
    assert torch.equal(got[:, :40].cpu(), kv.topk(s, 38, c.seq_lens, n_sink=1, n_local=1).cpu())
    assert bool((got[:, 40:] == -1).all())


# kv-wrapper-types: every argument of the wrong Python type is an error naming the op and the
# argument (bools must be bools, ints ints within int64, tensors tensors, scale a real number),
# never torch's schema-parser message nor a bare float() error.
def _wrapper_calls(c, s, idx, op, **bad):
    """A valid call of public op ``op`` (all arguments by keyword) with ``bad`` replacing some."""
    base = dict(k_cache=c.k, seq_lens=c.seq_lens)
    if op == "score":
        return lambda: kv.score(**dict(base, q=c.q, **bad))
    if op == "topk":
        return lambda: kv.topk(**dict(dict(scores=s, k=4, seq_lens=c.seq_lens, n_sink=1, n_local=1), **bad))
    if op == "select":
        return lambda: kv.select(**dict(dict(base, q=c.q, k=4, n_sink=1, n_local=1), **bad))
    if op == "sparse_decode":
        return lambda: kv.sparse_decode(**dict(dict(base, q=c.q, v_cache=c.v, indices=idx), **bad))
    return lambda: kv.sparse_prefill(**dict(dict(base, q=c.q.unsqueeze(1), v_cache=c.v, indices=idx,
                                                 chunk_start=0), **bad))


_TYPE_CASES = [
    ("score", "check", "yes", TypeError), ("score", "check", 1, TypeError), ("score", "check", None, TypeError),
    ("score", "scale", "x", TypeError), ("score", "scale", "tensor2", TypeError), ("score", "scale", True, TypeError),
    ("score", "seq_lens", [40, 20], TypeError), ("score", "block_table", "x", TypeError),
    ("score", "skip", 3, TypeError), ("score", "valid", "x", TypeError),
    ("topk", "check", "yes", TypeError), ("topk", "k", 2 ** 64, ValueError), ("topk", "k", 1.5, TypeError),
    ("topk", "n_sink", 2 ** 64, ValueError), ("topk", "n_local", "3", TypeError), ("topk", "n_local", True, TypeError),
    ("topk", "seq_lens", 3, TypeError), ("topk", "reuse", "x", TypeError), ("topk", "reuse_mask", [True], TypeError),
    ("topk", "out", "x", TypeError),
    ("select", "check", "yes", TypeError), ("select", "scale", "x", TypeError),
    ("select", "scale", "tensor2", TypeError), ("select", "k", 2 ** 64, ValueError),
    ("select", "n_sink", -2 ** 64, ValueError), ("select", "valid", 1, TypeError), ("select", "out", [1], TypeError),
    ("sparse_decode", "check", "yes", TypeError), ("sparse_decode", "return_lse", "yes", TypeError),
    ("sparse_decode", "scale", "x", TypeError), ("sparse_decode", "indices", [[0]], TypeError),
    ("sparse_decode", "lse", "x", TypeError),
    ("sparse_prefill", "check", "no", TypeError), ("sparse_prefill", "return_lse", 0, TypeError),
    ("sparse_prefill", "scale", "tensor2", TypeError), ("sparse_prefill", "chunk_start", 2 ** 64, ValueError),
    ("sparse_prefill", "chunk_start", "x", TypeError), ("sparse_prefill", "chunk_start", 1.0, TypeError),
]


@pytest.mark.parametrize("op,name,value,exc", [pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]!r}")
                                               for case in _TYPE_CASES])
def test_wrapper_argument_types(device, op, name, value, exc):
    c = _c(device)
    s = kv.score(c.q, c.k, c.seq_lens)
    idx = torch.zeros(2, 4, dtype=torch.int32, device=device)
    if isinstance(value, str) and value == "tensor2":
        value = torch.ones(2, device=device)
    with pytest.raises(exc, match=rf"^tokenkernels\.kv_select\.{op}: {name} must "):
        _wrapper_calls(c, s, idx, op, **{name: value})()


def test_wrapper_bools_and_numbers_still_accepted(device):
    np = pytest.importorskip("numpy")
    c = _c(device)
    a = kv.score(c.q, c.k, c.seq_lens, scale=0.5)
    assert torch.equal(a, kv.score(c.q, c.k, c.seq_lens, scale=np.float32(0.5), check=np.bool_(True)))
    assert torch.equal(a, kv.score(c.q, c.k, c.seq_lens, scale=torch.tensor(0.5)))
    s = kv.score(c.q, c.k, c.seq_lens)
    assert torch.equal(kv.topk(s, 4, c.seq_lens, n_sink=1, n_local=1),
                       kv.topk(s, np.int64(4), c.seq_lens, n_sink=np.int32(1), n_local=1))


# check-h-prefix: the shared checks of csrc/check.h name the public op, not just "tokenkernels:".
@pytest.mark.parametrize("which", [pytest.param("k_cache", id="k_cache-int8"), pytest.param("q", id="q-float64")])
def test_shared_dtype_check_names_the_op(device, which):
    c = _c(device)
    q, k = (c.q, c.k.to(torch.int8)) if which == "k_cache" else (c.q.double(), c.k)
    pat = rf"^tokenkernels\.kv_select\.score: {which} must be float32, float16 or bfloat16, got"
    with pytest.raises(RuntimeError, match=pat):
        kv.score(q, k, c.seq_lens)
    with pytest.raises(RuntimeError, match=pat):
        torch.ops.tokenkernels.kv_select_score(q, k, c.seq_lens, None, 1.0, None, None, True, "auto")


# fakes-accept-mixed-meta (kv_select part): one meta tensor among real ones dispatches to the
# fake kernel, which must refuse it like the C++ check (naming the argument), not return a
# shape-only (meta) or uninitialised result.
def _direct_calls(device):
    c = _c(device)
    OPS = torch.ops.tokenkernels
    s = OPS.kv_select_score(c.q, c.k, c.seq_lens, None, 1.0, None, None, True, "auto")
    idx = torch.zeros(2, 4, dtype=torch.int32, device=device)
    cs = torch.zeros(2, dtype=torch.int32, device=device)
    q4 = c.q.unsqueeze(1).contiguous()
    skip = torch.zeros(2, dtype=torch.bool, device=device)
    o, l2, l3 = torch.empty_like(c.q), torch.empty(2, 8, device=device), torch.empty(2, 1, 8, device=device)
    return [
        ("score", OPS.kv_select_score, ["q", "k_cache", "seq_lens", None, 1.0, "skip", None, True, "auto"],
         dict(q=c.q, k_cache=c.k, seq_lens=c.seq_lens, skip=skip), "k_cache"),
        ("topk", OPS.kv_select_topk, ["scores", 4, "seq_lens", 1, 1, None, None, True],
         dict(scores=s, seq_lens=c.seq_lens), "scores"),
        ("topk", OPS.kv_select_topk_out, ["scores", 4, "seq_lens", 1, 1, None, None, True, "out"],
         dict(scores=s, seq_lens=c.seq_lens, out=torch.empty(2, 6, dtype=torch.int32, device=device)), "scores"),
        ("sparse_decode", OPS.kv_select_sparse_decode,
         ["q", "k_cache", "v_cache", "indices", "seq_lens", None, 0.125, True, "auto"],
         dict(q=c.q, k_cache=c.k, v_cache=c.v, indices=idx, seq_lens=c.seq_lens), "k_cache"),
        ("sparse_decode", OPS.kv_select_sparse_decode_out,
         ["q", "k_cache", "v_cache", "indices", "seq_lens", None, 0.125, True, "auto", "out", "lse"],
         dict(q=c.q, k_cache=c.k, v_cache=c.v, indices=idx, seq_lens=c.seq_lens, out=o, lse=l2), "k_cache"),
        ("sparse_prefill", OPS.kv_select_sparse_prefill,
         ["q", "k_cache", "v_cache", "indices", "seq_lens", "chunk_start", None, 0.125, True],
         dict(q=q4, k_cache=c.k, v_cache=c.v, indices=idx, seq_lens=c.seq_lens, chunk_start=cs), "k_cache"),
        ("sparse_prefill", OPS.kv_select_sparse_prefill_out,
         ["q", "k_cache", "v_cache", "indices", "seq_lens", "chunk_start", None, 0.125, True, "out", "lse"],
         dict(q=q4, k_cache=c.k, v_cache=c.v, indices=idx, seq_lens=c.seq_lens, chunk_start=cs,
              out=torch.empty_like(q4), lse=l3), "k_cache"),
    ]


_DIRECT_IDS = ["kv_select_score", "kv_select_topk", "kv_select_topk_out", "kv_select_sparse_decode",
               "kv_select_sparse_decode_out", "kv_select_sparse_prefill", "kv_select_sparse_prefill_out"]


@pytest.mark.parametrize("n", [pytest.param(i, id=name) for i, name in enumerate(_DIRECT_IDS)])
def test_fakes_refuse_one_meta_argument(device, n):
    name, op, template, tensors, ref = _direct_calls(device)[n]
    assert op._qualified_op_name == f"tokenkernels::{_DIRECT_IDS[n]}"
    for meta in tensors:
        args = [(tensors[a].to("meta") if a == meta else tensors[a]) if isinstance(a, str) and a in tensors else a
                for a in template]
        if meta == ref:   # the reference tensor on meta: the first other tensor is named
            with pytest.raises(ValueError, match=rf"^tokenkernels\.kv_select\.{name}: \w+ is on {device}\S* but "
                                                 rf"{ref} is on meta"):
                op(*args)
        else:
            with pytest.raises(ValueError, match=rf"^tokenkernels\.kv_select\.{name}: {meta} is on meta but "
                                                 rf"{ref} is on {device}"):
                op(*args)


def test_public_ops_refuse_one_meta_argument(device):
    c = _c(device)
    s = kv.score(c.q, c.k, c.seq_lens)
    idx = torch.zeros(2, 4, dtype=torch.int32, device=device)
    m = lambda t: t.to("meta")  # noqa: E731
    with pytest.raises(ValueError, match=r"^tokenkernels\.kv_select\.score: seq_lens is on meta"):
        kv.score(c.q, c.k, m(c.seq_lens))
    with pytest.raises(ValueError, match=r"^tokenkernels\.kv_select\.score: q is on meta"):
        kv.select(m(c.q), c.k, c.seq_lens, k=4, n_sink=1, n_local=1)
    with pytest.raises(ValueError, match=r"^tokenkernels\.kv_select\.topk: seq_lens is on meta"):
        kv.topk(s, 4, m(c.seq_lens), n_sink=1, n_local=1)
    with pytest.raises(ValueError, match=r"^tokenkernels\.kv_select\.sparse_decode: indices is on meta"):
        kv.sparse_decode(c.q, c.k, c.v, m(idx), c.seq_lens)
    with pytest.raises(ValueError, match=r"^tokenkernels\.kv_select\.sparse_prefill: v_cache is on meta"):
        kv.sparse_prefill(c.q.unsqueeze(1), c.k, m(c.v), idx, c.seq_lens, 0)
