"""kv_select.sparse_decode / sparse_prefill with impl="tuned" (the tensor-core attention core,
csrc/include/tokenkernels/attn_core.cuh, for fp16 / bf16 with D 64 / 128; fp32 and other head
sizes run the simt kernels) vs the fp64 reference, at the sizes where the core changes strategy:
index counts 1 / 7 / 129 / 1000 / 2688 (one to many splits; the planner caps splits at one per 128
keys), GQA 1 / 4 / 8 (the CTA's key groups), batch 1 (many splits) and 64 (one part, no
workspace), paged page sizes 1 and 16, the HF-strided layout, -1 entries, int64 metadata, out=,
chunks of 1 / 7 / 129 rows (row blocks of 16 or 64 rows, chunk-causal tails). On the CPU the
same calls run the CPU kernel (impl is validated and ignored there)."""
import pytest
import torch

from tokenkernels import kv_select as kv
from tokenkernels.reference import kv_select as ref
from tokenkernels.testing import tol

from .cases import cpu, f64, make_case
from .test_kv_select import _close

# tools/gpu_proof.py attributes these tests (no impl parameter) to the tuned variant
GPU_PROOF_IMPL = "tuned"

TUNED_DTYPES = [torch.float16, torch.bfloat16]




def _indices(seq, K, device, seed, minus_one=True):
    """(B, K) int32 indices into each request's [0, seq_len) (with repeats when K > seq_len), some -1."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for L in seq:
        r = torch.randint(0, max(L, 1), (K,), generator=g) if L > 0 else torch.full((K,), -1)
        if minus_one and K > 2:
            r[torch.randperm(K, generator=g)[: K // 7]] = -1
        rows.append(r)
    return torch.stack(rows).to(torch.int32).to(device)


@pytest.mark.parametrize("dtype", TUNED_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("K", [1, 7, 129, 1000, 2688])
@pytest.mark.parametrize("page", [None, 1, 16])
def test_decode_tuned(device, dtype, D, G, K, page):
    seq = [3000, 1, 129]
    c = make_case(seq, H_kv=2, G=G, D=D, dtype=dtype, page_size=page, device=device, seed=K + G + D)
    idx = _indices(seq, K, device, K)
    out, lse = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table, return_lse=True,
                                impl="tuned")
    wo, wl = ref.sparse_decode(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens),
                               block_table=cpu(c.block_table), return_lse=True)
    assert out.dtype == dtype and out.shape == c.q.shape
    _close(out, wo, tol(dtype, "kv_out"), "out")
    _close(lse, wl, tol(dtype, "kv_lse"), "lse")


@pytest.mark.parametrize("dtype", TUNED_DTYPES)
@pytest.mark.parametrize("B", [1, 64])
def test_decode_tuned_batch_and_strided(device, dtype, B):
    """Batch 1 (many splits) and 64 (one part); the HF layout read in place; int64 indices;
    out= / lse= buffers; a request with nothing to attend."""
    seq = [(37 * b) % 900 + (0 if b == 1 else 1) for b in range(B)]
    if B > 1:
        seq[1] = 0
    c = make_case(seq, H_kv=2, G=4, D=128, dtype=dtype, strided=True, device=device, seed=B)
    idx = _indices(seq, 300, device, B).long()
    out = torch.full_like(c.q, 7.0)
    lse = torch.full(c.q.shape[:2], 7.0, device=device)
    kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, out=out, lse=lse, impl="tuned")
    wo, wl = ref.sparse_decode(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens), return_lse=True)
    _close(out, wo, tol(dtype, "kv_out"), "out")
    _close(lse, wl, tol(dtype, "kv_lse"), "lse")
    if B > 1:
        assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))


def test_decode_tuned_fp32_and_odd_head_dim_fall_back(device):
    """fp32 and D = 32 run the simt kernel under impl="tuned": the same results as impl="simt"."""
    for dtype, D in ((torch.float32, 64), (torch.bfloat16, 32)):
        c = make_case([200, 50], G=4, D=D, dtype=dtype, page_size=16, device=device, seed=D)
        idx = _indices([200, 50], 64, device, D)
        a = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table, impl="tuned")
        b = kv.sparse_decode(c.q, c.k, c.v, idx, c.seq_lens, block_table=c.block_table, impl="simt")
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", TUNED_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("C", [1, 7, 129])
@pytest.mark.parametrize("page", [None, 16])
def test_prefill_tuned(device, dtype, D, G, C, page):
    starts = [700, 0, 31]
    chunk = [C, max(1, C - 3), 1]          # ragged chunks: padding rows past them
    seq = [s + n for s, n in zip(starts, chunk)]
    c = make_case(seq, H_kv=2, G=G, D=D, dtype=dtype, page_size=page, device=device, seed=C * G + D, C=C)
    cs = torch.tensor(starts, dtype=torch.int32, device=device)
    idx = _indices(starts, 160, device, C)
    out, lse = kv.sparse_prefill(c.q, c.k, c.v, idx, c.seq_lens, cs, block_table=c.block_table, return_lse=True,
                                 impl="tuned")
    wo, wl = ref.sparse_prefill(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens), cs.cpu(),
                                block_table=cpu(c.block_table), return_lse=True)
    assert out.shape == c.q.shape and out.dtype == dtype
    _close(out, wo, tol(dtype, "kv_out"), "out")
    _close(lse, wl, tol(dtype, "kv_lse"), "lse")


@pytest.mark.parametrize("dtype", TUNED_DTYPES)
def test_prefill_tuned_out_int64_noncontiguous(device, dtype):
    """512-token chunk over 2688 selected keys (the issue's shape, 2 KV heads), int64 chunk_start
    and indices, a non-contiguous q, out= / lse= buffers."""
    C, s0 = 512, 3000
    c = make_case([s0 + C], H_kv=2, G=4, D=128, dtype=dtype, device=device, seed=3, C=C)
    q = c.q.transpose(1, 2).contiguous().transpose(1, 2)   # same values, strides (B, H, C, D)
    assert not q.is_contiguous()
    idx = _indices([s0], 2688, device, 9).long()
    cs = torch.tensor([s0], device=device)
    out = torch.empty_like(c.q)
    lse = torch.empty(c.q.shape[:3], device=device)
    kv.sparse_prefill(q, c.k, c.v, idx, c.seq_lens, cs, out=out, lse=lse, impl="tuned")
    wo, wl = ref.sparse_prefill(f64(c.q), f64(c.k), f64(c.v), idx.cpu(), cpu(c.seq_lens), cs.cpu(), return_lse=True)
    _close(out, wo, tol(dtype, "kv_out"), "out")
    _close(lse, wl, tol(dtype, "kv_lse"), "lse")
