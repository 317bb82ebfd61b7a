"""kv_select.topk(impl="tuned") -- the radix top-k (tokenkernels/radix_topk.h) on CUDA; on the CPU
the same calls run the one CPU kernel -- against the reference: B = 1 and B = 64 (one CTA per
row vs several), N = 1 / 7 / 129 / 1000 / 131072, k = 1 / 2048, ragged lengths, sink and local
windows, reuse rows (Selection Cache hits), out=, non-contiguous and unaligned score rows (the
scalar-load path), many candidates past the shared-memory capacity (the workspace path), all
ties, -inf-heavy rows, and bad input."""
import pytest
import torch

from tokenkernels import kv_select as kv
from tokenkernels.reference import kv_select as ref

# tools/gpu_proof.py attributes these tests (no impl parameter) to the tuned variant
GPU_PROOF_IMPL = "tuned"



def _scores(B, N, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "spread":      # softmax sums: several octaves
        return torch.randn(B, N, generator=g).mul(2).softmax(-1) * 32
    if kind == "uniform":     # uniform [0, 1): many keys share the top digit (workspace path)
        return torch.rand(B, N, generator=g)
    if kind == "ties":
        return torch.randint(0, 3, (B, N), generator=g).float()
    if kind == "const":
        return torch.full((B, N), 0.5)
    if kind == "ninf":        # mostly -inf (masked tokens)
        s = torch.full((B, N), float("-inf"))
        keep = torch.rand(B, N, generator=g) < 0.01
        s[keep] = torch.randn(int(keep.sum()), generator=g)
        return s
    return torch.randn(B, N, generator=g)


def _run(device, s, k, sl, n_sink, n_local, impl="tuned", **kw):
    got = kv.topk(s.to(device), k, sl.to(device), n_sink=n_sink, n_local=n_local, impl=impl,
                  **{a: (v.to(device) if isinstance(v, torch.Tensor) else v) for a, v in kw.items()})
    want = ref.topk(s, k, sl, n_sink=n_sink, n_local=n_local, **kw)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got.cpu(), want)
    return got


@pytest.mark.parametrize("N", [1, 7, 129, 1000, 131072])
@pytest.mark.parametrize("k", [1, 2048])
@pytest.mark.parametrize("B", [1, 64])
def test_tuned_sizes(device, N, k, B):
    """B = 1: up to 32 CTAs per row; B = 64: up to 4 per row (ragged lengths, the first full;
    B = 64 at N = 131072: test_tuned_b64_ragged_131072)."""
    if B == 64 and N == 131072:
        N = 40000
    s = _scores(B, N, "randn", N + k + B)
    g = torch.Generator().manual_seed(N + k)
    sl = torch.randint(0, N + 1, (B,), generator=g, dtype=torch.int32)
    sl[0] = N
    _run(device, s, k, sl, 4, 16)
    _run(device, s, k, sl, 0, 0)


@pytest.mark.parametrize("kind", ["randn", "spread", "uniform", "ties", "ninf"])
def test_tuned_b64_ragged_131072(device, kind):
    """B = 64 (several CTAs per row), ragged lengths: full, odd, below the budget, empty."""
    B, N = 64, 131072
    s = _scores(B, N, kind, 11)
    g = torch.Generator().manual_seed(12)
    sl = torch.randint(0, N + 1, (B,), generator=g, dtype=torch.int32)
    sl[:4] = torch.tensor([N, N - 1, 2048 + 128 + 512, 0], dtype=torch.int32)
    _run(device, s, 2048, sl, 128, 512)
    if kind == "randn":
        _run(device, s, 1, sl, 128, 512)


@pytest.mark.parametrize("kind", ["const", "uniform", "ties"])
def test_tuned_b1_large_candidate_sets(device, kind):
    """One row over many CTAs whose compacted entries exceed the finishing CTA's shared memory."""
    N = 131072
    _run(device, _scores(1, N, kind, 13), 2048, torch.tensor([N], dtype=torch.int32), 128, 512)


@pytest.mark.parametrize("B", [1, 3, 64])
def test_tuned_k_equals_budget_edges(device, B):
    g = torch.Generator().manual_seed(14)
    s = torch.randn(B, 1000, generator=g)
    W = 3 + 100 + 5
    sl = torch.tensor([W, W + 1, 1000, 0, 1][:B] + [999] * max(0, B - 5), dtype=torch.int32)
    _run(device, s, 100, sl, 3, 5)
    _run(device, s, 0, sl, 3, 5)                    # k = 0: sinks and locals only
    _run(device, s, 992, sl, 3, 5)                  # k = N - n_sink - n_local


def test_tuned_reuse_rows(device):
    g = torch.Generator().manual_seed(15)
    B, N, k = 8, 50000, 2048
    s = torch.randn(B, N, generator=g)
    sl = torch.tensor([N, 40000, 3000, N, 10, N, 30001, 2700], dtype=torch.int32)
    reuse = torch.randint(-5, N, (B, k), generator=g, dtype=torch.int32).sort(1).values
    reuse[2] = reuse[2].flip(0)
    mask = torch.tensor([True, False, True, False, True, True, False, False])
    _run(device, s, k, sl, 64, 256, reuse=reuse, reuse_mask=mask)


def test_tuned_non_contiguous_and_unaligned_rows(device):
    g = torch.Generator().manual_seed(16)
    base = torch.randn(5, 20011, generator=g)
    sl = torch.tensor([20000, 19999, 7777, 20000, 4097], dtype=torch.int32)
    _run(device, base[:, 3:20003], 500, sl, 5, 9)                          # row stride 20011, offset 3
    _run(device, base.t().contiguous().t()[:, :20000], 500, sl, 5, 9)      # column-major (copied)
    s = base.to(device)[:, 1:20001]                                         # unaligned row starts
    got = kv.topk(s, 500, sl.to(device), n_sink=5, n_local=9, impl="tuned")
    assert torch.equal(got.cpu(), ref.topk(s.cpu(), 500, sl, n_sink=5, n_local=9))


def test_tuned_out_and_select(device):
    g = torch.Generator().manual_seed(17)
    s = torch.randn(3, 4000, generator=g).to(device)
    sl = torch.tensor([4000, 1234, 99], dtype=torch.int32, device=device)
    buf = torch.full((3, 2 + 300 + 7), 123, dtype=torch.int32, device=device)
    r = kv.topk(s, 300, sl, n_sink=2, n_local=7, out=buf, impl="tuned")
    assert r is buf
    assert torch.equal(buf.cpu(), ref.topk(s.cpu(), 300, sl.cpu(), n_sink=2, n_local=7))
    # the op-level schema: impl is the last argument, default "auto"
    ops = torch.ops.tokenkernels
    a = ops.kv_select_topk(s, 300, sl, 2, 7, None, None, True, "tuned")
    assert torch.equal(a, ops.kv_select_topk(s, 300, sl, 2, 7, None, None, True))
    ops.kv_select_topk_out(s, 300, sl, 2, 7, None, None, False, buf, "tuned")
    assert torch.equal(buf, a)


def test_tuned_unchecked_lengths_are_clamped(device):
    """check=False on CUDA: lengths are clamped into [0, N] (the CPU always checks)."""
    s = torch.randn(2, 5000).to(device)
    bad = torch.tensor([6000, -3], dtype=torch.int32, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"kv_select\.topk: seq_lens\[0\] = 6000 is outside"):
            kv.topk(s, 100, bad, n_sink=1, n_local=1, check=False, impl="tuned")
        return
    got = kv.topk(s, 100, bad, n_sink=1, n_local=1, check=False, impl="tuned").cpu()
    want = ref.topk(s.cpu(), 100, torch.tensor([5000, 0]), n_sink=1, n_local=1)
    assert torch.equal(got, want)


def test_tuned_bad_input_same_errors(device):
    s = torch.randn(2, 40, device=device)
    sl = torch.tensor([40, 3], dtype=torch.int32, device=device)
    for impl in ("tuned", "plain"):
        with pytest.raises(RuntimeError, match=r"kv_select\.topk: k must be >= 0"):
            torch.ops.tokenkernels.kv_select_topk(s, -1, sl, 0, 0, None, None, True, impl)
        with pytest.raises(RuntimeError, match=r"kv_select\.topk: scores must be float32"):
            kv.topk(s.double(), 4, sl, impl=impl)
    with pytest.raises(ValueError, match=r"^tokenkernels\.kv_select\.topk: impl must be one of"):
        kv.topk(s, 4, sl, impl="radix")
    with pytest.raises(ValueError, match=r"kv_select\.topk.*impl"):
        torch.ops.tokenkernels.kv_select_topk(s, 4, sl, 1, 1, None, None, True, "radix")
    with pytest.raises(ValueError, match=r"kv_select\.topk.*impl"):
        torch.ops.tokenkernels.kv_select_topk_out(s, 4, sl, 1, 1, None, None, True,
                                                  torch.empty(2, 6, dtype=torch.int32, device=device), "radix")
