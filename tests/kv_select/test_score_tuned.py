"""kv_select.score(impl="tuned") -- the bandwidth-bound scoring kernels
(csrc/include/tokenkernels/kv_select_score.cuh) -- against the fp64 reference, on every device
(the CPU kernel ignores the variant name; the CUDA cases skip only without CUDA): fp16 / bf16 (the
tuned kernel) and fp32 (its documented fallback, the simt kernel); B = 1 / 3, N = 1 / 7 / 129 /
1000 / 131072, ragged batches, contiguous, paged (page 16, 1 and 7) and HF-strided caches, skip /
valid, G = 1 / 4 / 8, D = 64 / 128 (and D = 256, and shapes the plan refuses, which fall back),
non-contiguous q, many chunks per block (long requests) and one chunk per request (short ones)."""
import pytest
import torch

from tokenkernels import kv_select as kv
from tokenkernels.reference import kv_select as ref
from tokenkernels.testing import tol
from .cases import cpu, f64, make_case

# tools/gpu_proof.py attributes these tests (no impl parameter) to the tuned variant
GPU_PROOF_IMPL = "tuned"


def _close(got, want, atol, what):
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, what
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: -inf pattern differs"
    fin = torch.isfinite(want)
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g}"


def _check(c, dtype, *, scale=1.0, skip=None, valid=None, q=None, what="score(tuned)"):
    q = c.q if q is None else q
    got = kv.score(q, c.k, c.seq_lens, block_table=c.block_table, scale=scale, skip=skip, valid=valid,
                   impl="tuned")
    want = ref.score(f64(c.q), f64(c.k), cpu(c.seq_lens), block_table=cpu(c.block_table), scale=scale,
                     skip=cpu(skip), valid=cpu(valid))
    assert got.dtype == torch.float32 and got.device.type == c.k.device.type
    _close(got, want, tol(dtype, "kv_score") * c.q.shape[-2], what)
    return got


LAYOUTS = [pytest.param(None, False, id="contiguous"), pytest.param(16, False, id="paged16"),
           pytest.param(1, False, id="paged1"), pytest.param(None, True, id="hf-strided"),
           pytest.param(16, True, id="paged16-strided")]
SEQS = [pytest.param([1], id="1"), pytest.param([7], id="7"), pytest.param([129], id="129"),
        pytest.param([1000], id="1000"), pytest.param([129, 1, 7], id="ragged-129-1-7"),
        pytest.param([1000, 0, 129], id="ragged-1000-0-129")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page,strided", LAYOUTS)
@pytest.mark.parametrize("seq", SEQS)
def test_tuned_sizes_layouts(device, dtype, page, strided, seq):
    c = make_case(seq, H_kv=8, G=4, D=128, dtype=dtype, page_size=page, strided=strided, device=device,
                  seed=sum(seq) + (page or 0))
    _check(c, dtype, scale=128 ** -0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("page", [None, 16])
def test_tuned_gqa_head_dims(device, dtype, G, D, page):
    c = make_case([1000, 129, 7], H_kv=2, G=G, D=D, dtype=dtype, page_size=page, device=device, seed=G * D)
    _check(c, dtype, scale=1.0 if G == 1 else D ** -0.5)


@pytest.mark.parametrize("H_kv,G,D,dtype", [
    pytest.param(8, 4, 256, torch.bfloat16, id="D256"),
    pytest.param(3, 3, 64, torch.float16, id="G3-Hkv3"),        # padded q-heads, 96-thread blocks
    pytest.param(5, 8, 64, torch.bfloat16, id="G8-Hkv5"),       # 256-thread cap of 8 q-heads
    pytest.param(32, 1, 128, torch.bfloat16, id="MHA-32"),      # 512-thread blocks, tp = 1
    pytest.param(2, 16, 64, torch.bfloat16, id="G16-fallback"), # plan refuses: simt
    pytest.param(2, 4, 96, torch.float16, id="D96-fallback"),   # plan refuses: simt
    pytest.param(2, 4, 64, torch.float32, id="fp32-fallback"),  # fp32 K: simt
])
def test_tuned_shapes_and_fallbacks(device, H_kv, G, D, dtype):
    c = make_case([700, 64, 5], H_kv=H_kv, G=G, D=D, dtype=dtype, page_size=16, device=device, seed=H_kv + G)
    _check(c, dtype, scale=D ** -0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [None, 16])
def test_tuned_skip_valid(device, dtype, page):
    c = make_case([1000, 300, 129], H_kv=8, G=4, D=128, dtype=dtype, page_size=page, device=device, seed=11)
    g = torch.Generator().manual_seed(4)
    N = kv.capacity(c.k, c.block_table)
    valid = (torch.rand(3, N, generator=g) > 0.25).to(device)
    valid[2] = False                       # a request with no valid token at all
    skip = torch.tensor([False, True, False], device=device)
    _check(c, dtype, skip=skip, what="score(tuned, skip)")
    _check(c, dtype, valid=valid, what="score(tuned, valid)")
    s = _check(c, dtype, skip=skip, valid=valid, what="score(tuned, skip+valid)")
    assert torch.isinf(s[1]).all() and torch.isinf(s[2]).all()


def test_tuned_noncontiguous_query_and_chunk_mean(device):
    c = make_case([1000, 129, 7], H_kv=8, G=4, D=128, dtype=torch.bfloat16, page_size=16, strided=True,
                  device=device, seed=9)
    D = c.q.shape[-1]
    q = torch.cat([c.q, torch.full_like(c.q, float("nan"))], -1)[..., :D]
    assert not q.is_contiguous()
    _check(c, torch.bfloat16, q=q, what="score(tuned, non-contiguous q)")
    cc = make_case([1000, 129], H_kv=8, G=4, D=128, dtype=torch.bfloat16, page_size=16, device=device, seed=2, C=5)
    _check(cc, torch.bfloat16, what="score(tuned, chunk mean)")


def _ref_score_lowmem(q, k, seq_lens, block_table, scale):
    """The reference's scores computed per (request, KV head) in fp64 -- a few hundred MB at
    N = 131072 instead of ref.score's tens of GB."""
    B, H_q, D = q.shape
    H_kv = k.shape[2]
    G = H_q // H_kv
    N = kv.capacity(k, block_table)
    out = torch.full((B, N), float("-inf"), dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        if block_table is None:
            rows = k[b, :n]
        else:
            t = torch.arange(n)
            rows = k[block_table[b].long()[t // k.shape[1]], t % k.shape[1]]      # (n, H_kv, D)
        acc = torch.zeros(n, dtype=torch.float64)
        for g in range(H_kv):
            lg = rows[:, g].double() @ (q[b, g * G:(g + 1) * G].double().T * scale)   # (n, G)
            acc += torch.softmax(lg, 0).sum(1)
        out[b, :n] = acc
    return out


@pytest.mark.parametrize("B,page", [pytest.param(1, None, id="B1-contiguous"), pytest.param(3, 16, id="B3-paged16")])
def test_tuned_llama_131072(device, B, page):
    """The issue's shape: N = 131072, 32 q / 8 KV heads, D 128, bf16 -- many chunks, all blocks of
    the persistent grid busy; with B = 3 ragged (131072, 70001, 1) through a block table over a
    shared pool of pages (entries repeat: scoring only reads)."""
    g = torch.Generator().manual_seed(B)
    N, H_kv, G, D = 131072, 8, 4, 128
    seq = [N] if B == 1 else [N, 70001, 1]
    q = torch.randn(B, H_kv * G, D, generator=g)
    if page is None:
        k = torch.randn(B, N, H_kv, D, generator=g, dtype=torch.bfloat16)
        bt = None
    else:
        pool = 2053
        k = torch.randn(pool, page, H_kv, D, generator=g, dtype=torch.bfloat16)
        bt = torch.randint(0, pool, (B, N // page), generator=g, dtype=torch.int32)
    sl = torch.tensor(seq, dtype=torch.int32)
    scale = D ** -0.5
    got = kv.score(q.to(device), k.to(device), sl.to(device), block_table=None if bt is None else bt.to(device),
                   scale=scale, impl="tuned")
    want = _ref_score_lowmem(q, k, sl, bt, scale)
    _close(got, want, tol(torch.bfloat16, "kv_score") * H_kv * G, "score(tuned, N=131072)")
    for b, n in enumerate(seq):   # the scores of a request are a sum of H_q distributions
        assert abs(got[b, :n].double().sum().item() - H_kv * G) <= 1e-3


def test_tuned_unscaled_relative_precision(device):
    """TokenSelect's unscaled logits (max 30-60): the fused one-exp online statistics keep the
    dominant tokens' scores at fp32 relative precision (as test_kv_select's test for every impl)."""
    g = torch.Generator().manual_seed(21)
    B, N, H_kv, G, D = 3, 5000, 8, 4, 64
    q = torch.randint(-4, 5, (B, H_kv * G, D), generator=g).float()
    k = torch.randint(-2, 3, (B, N, H_kv, D), generator=g).float() * 0.5
    sl = torch.tensor([5000, 4321, 257], dtype=torch.int32)
    want = ref.score(q.double(), k.double(), sl, scale=1.0)
    got = kv.score(q.to(device), k.to(torch.bfloat16).to(device), sl.to(device), scale=1.0, impl="tuned").cpu()
    _close(got, want, tol(torch.bfloat16, "kv_score") * H_kv * G, "score")
    big = want > 0.1
    assert big.any()
    rel = ((got.double() - want).abs()[big] / want[big]).max().item()
    assert rel <= 1e-6, f"relative error {rel:.3g} of the dominant tokens' scores"


def test_tuned_bad_pages_unchecked(device):
    """check=False with page numbers out of range: the tuned kernel skips those rows like the other
    impls (their logits -inf: weight 0), never reads out of bounds, and agrees with "simt"."""
    c = make_case([300, 200], H_kv=8, G=4, D=128, dtype=torch.bfloat16, page_size=16, device=device, seed=3)
    bt = c.block_table.clone()
    bt[0, 2] = 10 ** 6
    bt[1, 0] = -3
    if device == "cpu":   # the CPU always validates the block table
        with pytest.raises(RuntimeError, match="block_table"):
            kv.score(c.q, c.k, c.seq_lens, block_table=bt, check=False, impl="tuned")
        return
    a = kv.score(c.q, c.k, c.seq_lens, block_table=bt, check=False, impl="tuned")
    b = kv.score(c.q, c.k, c.seq_lens, block_table=bt, check=False, impl="simt")
    _close(a, b, tol(torch.bfloat16, "kv_score") * 32, "tuned vs simt (bad pages)")


def test_tuned_bad_inputs_same_errors(device):
    """Bad input: the tuned variant raises what every impl raises (checks in kv_select_args.h)."""
    c = make_case([10], H_kv=2, G=4, D=64, dtype=torch.bfloat16, device=device)
    for impl in ("tuned", "simt"):
        with pytest.raises(RuntimeError, match="seq_lens"):
            kv.score(c.q, c.k, torch.tensor([11], dtype=torch.int32, device=device), impl=impl)
        with pytest.raises((ValueError, RuntimeError), match="q"):
            kv.score(c.q[:, :7], c.k, c.seq_lens, impl=impl)
