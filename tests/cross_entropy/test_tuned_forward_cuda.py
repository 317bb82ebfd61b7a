"""impl="tuned" forward on CUDA (the sm_90a TMA + wgmma kernel of
csrc/include/tokenkernels/cross_entropy_sm90.cuh on compute capability 9.0, the WMMA / plain
forward elsewhere, with the same results), straight through the schema op
``cross_entropy_forward`` so that only the forward is under test: every output (lse, target
logit, sum z, arg-max, max z, entropy) against the fp64 truth of the same inputs and against
impl="plain" (cuBLAS logits) on the same device.

The shapes cross every strategy change of the kernel's plan: one masked vocabulary tile (V < 256,
V = 257), V not a multiple of the tile, N = 1 / 7 / 129 / 1000 (one row tile with many splits,
ragged row tiles), several units per CTA (the persistent loop, partial writes between units),
D = 8 * odd (TMA zero fill of the last 64-feature block), D < 64. Options: bias, softcap,
ignore_index, out-of-range targets (check=False), vocab-parallel shards, aux outputs, sum_z.
fp32, D % 8 != 0 and misaligned rows take the documented fallback (plain). All skip without
CUDA (the same checks run on the CPU through the emulation in test_fwd_sm90_host.py).
"""
import math

import pytest
import torch

import tokenkernels as tk  # noqa: F401
from tokenkernels.testing import tol

from ..conftest import HAS_CUDA
from .common import logit_scale, logits64, make_inputs

# tools/gpu_proof.py attributes these tests (no impl parameter) to the tuned variant
GPU_PROOF_IMPL = "tuned"

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")

FWD = torch.ops.tokenkernels.cross_entropy_forward
LOWP = [torch.bfloat16, torch.float16]


def _is_sm90():
    return HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)


def fwd(h, w, t, b=None, *, impl="tuned", ignore_index=-100, softcap=None, vocab_start=0,
        vocab_total=None, sum_z=True, aux=True, check=False):
    vocab_total = w.shape[0] if vocab_total is None else vocab_total
    return FWD(h, w, t, b, ignore_index, softcap, vocab_start, vocab_total, sum_z, aux, check,
               0.0, False, impl)


def truth(h, w, t, b=None, *, ignore_index=-100, softcap=None, vocab_start=0, vocab_total=None):
    """fp64 outputs of cross_entropy_forward for the same (rounded) inputs."""
    z = logits64(h, w, b, softcap)
    V = z.shape[1]
    vocab_total = V if vocab_total is None else vocab_total
    t = t.cpu().long()
    lse = torch.logsumexp(z, -1)
    local = t - vocab_start
    own = (t != ignore_index) & (local >= 0) & (local < V) & (t < vocab_total)
    zt = torch.where(own, z.gather(1, local.clamp(0, V - 1)[:, None])[:, 0], torch.zeros_like(lse))
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab_total))
    zt = torch.where(bad, torch.full_like(zt, math.nan), zt)
    p = torch.softmax(z, -1)
    return dict(lse=lse, zt=zt, sumz=z.sum(-1), amax=z.argmax(-1), maxz=z.max(-1).values,
                ent=lse - (p * z).sum(-1), z=z)


NAMES = ["lse", "zt", "sumz", "amax", "maxz", "ent"]


def _check(out, tr, h, w, b, softcap=None, V=None):
    got = dict(zip(NAMES, [o.cpu() for o in out]))
    zs = max(logit_scale(h, w, b), 1.0)
    lim = tol(torch.float32, "ce_loss") * zs * 4  # fp32 accumulation of a low-precision GEMM
    for k in ("lse", "zt", "maxz", "ent"):
        g, r = got[k].double(), tr[k]
        both_nan = torch.isnan(g) & torch.isnan(r)
        assert bool((both_nan | ((g - r).abs() <= lim * (1 + r.abs()))).all()), (
            k, (g - r).abs().nan_to_num(0).max().item(), lim)
    # sum z: V terms of error lim each
    Vn = tr["z"].shape[1]
    assert (got["sumz"].double() - tr["sumz"]).abs().max().item() <= lim * Vn * 4 + 1e-3
    # arg-max exact but for fp32-rounding ties: the truth's max minus the chosen logit
    z = tr["z"]
    gap = z.max(-1).values - z.gather(1, got["amax"][:, None])[:, 0]
    assert bool((gap <= 2 * lim * (1 + z.abs().max(-1).values)).all()), gap.max().item()
    assert got["amax"].dtype == torch.int64 and got["lse"].dtype == torch.float32


SHAPES = [(1, 8, 1), (1, 24, 129), (7, 40, 256), (7, 64, 257), (129, 136, 1000),
          (1000, 72, 4099), (300, 520, 12345), (2048, 64, 20000)]


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("N,D,V", SHAPES, ids=[f"N{n}-D{d}-V{v}" for n, d, v in SHAPES])
def test_tuned_forward_vs_truth(N, D, V, dtype):
    h, w, t, _ = make_inputs(N, D, V, dtype, ignore_frac=0.1, wscale=4.0, device="cuda",
                             seed=N + V)
    out = fwd(h, w, t)
    _check(out, truth(h, w, t), h, w, None)
    # and against the plain path (cuBLAS logits) on the same device: rounding only
    ref = fwd(h, w, t, impl="plain")
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tuned_forward_options(dtype, softcap, with_bias):
    N, D, V = 257, 88, 3001
    h, w, t, b = make_inputs(N, D, V, dtype, bias=with_bias, ignore_frac=0.2, wscale=6.0,
                             device="cuda", seed=7)
    t[3] = V + 5                      # out of range (check=False): NaN target logit
    t[4] = -7                         # negative, not ignore_index: NaN
    out = fwd(h, w, t, b, softcap=softcap)
    _check(out, truth(h, w, t, b, softcap=softcap), h, w, b, softcap)
    assert torch.isnan(out[1][3]) and torch.isnan(out[1][4])


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tuned_forward_ignore_index_and_shards(dtype):
    """A vocab-parallel shard [start, start + V) of a larger vocabulary; a custom ignore_index;
    targets in other shards give 0; arg-max is shard-local."""
    N, D, V, start, total = 300, 48, 1500, 3000, 9000
    h, w, _, _ = make_inputs(N, D, V, dtype, device="cuda", wscale=3.0, seed=2)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, total, (N,), generator=g)
    t[:20] = start + torch.arange(20)
    t[20:40] = -1
    t = t.cuda()
    out = fwd(h, w, t, ignore_index=-1, vocab_start=start, vocab_total=total)
    tr = truth(h, w, t, ignore_index=-1, vocab_start=start, vocab_total=total)
    _check(out, tr, h, w, None)
    assert bool((out[1][20:40] == 0).all())


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tuned_forward_without_aux_or_sumz(dtype):
    h, w, t, _ = make_inputs(100, 32, 700, dtype, device="cuda")
    full = fwd(h, w, t)
    lean = fwd(h, w, t, aux=False, sum_z=False)
    assert lean[2].numel() == 0 and lean[3].numel() == 0 and lean[5].numel() == 0
    torch.testing.assert_close(lean[0], full[0], rtol=0, atol=1e-6)
    assert torch.equal(lean[1], full[1])


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tuned_forward_non_contiguous_and_misaligned(dtype):
    N, D, V = 129, 64, 1000
    h, w, t, _ = make_inputs(N, D, V, dtype, device="cuda", wscale=3.0)
    base = fwd(h, w, t)
    hv = h.t().contiguous().t()                            # transposed strides
    wv = torch.stack([w, torch.zeros_like(w)], 2).reshape(V, -1)[:, ::2]
    out = fwd(hv, wv, t)
    for a, b_ in zip(out, base):
        assert torch.equal(a, b_)
    # a 2-byte offset base: neither TMA nor WMMA applies, the plain path runs
    buf = torch.empty(N * D + 1, dtype=dtype, device="cuda")
    hm = buf[1:].view(N, D)
    hm.copy_(h)
    mis = fwd(hm, w, t)
    _check(mis, truth(h, w, t), h, w, None)


@pytest.mark.parametrize("D", [33, 0])
def test_tuned_forward_unsupported_shapes_fall_back(D):
    """D % 8 != 0 (no TMA / WMMA) and D = 0 (logits = bias): the plain path, same results as
    impl="plain"."""
    h, w, t, b = make_inputs(50, D, 300, torch.bfloat16, bias=True, device="cuda")
    a, p = fwd(h, w, t, b), fwd(h, w, t, b, impl="plain")
    for x, y in zip(a, p):
        assert torch.equal(x, y)


def test_tuned_forward_fp32_documented_fallback():
    """fp32 has no wgmma path: impl="tuned" runs the plain forward (as impl="wmma" does)."""
    h, w, t, b = make_inputs(77, 40, 900, torch.float32, bias=True, device="cuda")
    a, p = fwd(h, w, t, b), fwd(h, w, t, b, impl="plain")
    for x, y in zip(a, p):
        assert torch.equal(x, y)


def test_tuned_forward_ties_and_minus_inf_bias():
    """Exact ties (duplicate weight rows: the lower id wins) and -inf bias entries (masked
    vocabulary; the reference's entropy is NaN then, and so is the kernel's)."""
    N, D, V = 64, 32, 600
    h, w, t, _ = make_inputs(N, D, V, torch.bfloat16, device="cuda", wscale=3.0)
    w[5] = w[5] * 2                                       # |row 5| dominates the others
    w[300] = w[5]
    w[599] = w[5]
    h[:] = w[5].float().sign().to(h.dtype)                # row 5's logit is the max for all
    b = torch.zeros(V, dtype=torch.bfloat16, device="cuda")
    out = fwd(h, w, t, b)
    assert bool((out[3] == 5).all())
    b[::7] = -math.inf
    out = fwd(h, w, t, b)
    tr = truth(h, w, t, b)
    torch.testing.assert_close(out[0].cpu().double(), tr["lse"], rtol=1e-5, atol=1e-4)
    assert bool((out[3] == 5).all())
    if _is_sm90():  # the sm_90a fold follows the reference's sum(p * z) (the fallbacks differ)
        assert bool(torch.isnan(out[5]).all()) and bool(torch.isnan(tr["ent"]).all())


def test_tuned_forward_bad_inputs_same_errors():
    h, w, t, _ = make_inputs(8, 16, 40, torch.bfloat16, device="cuda")
    for impl in ("tuned", "plain"):
        with pytest.raises(ValueError, match="weight has D = 8 columns but hidden has D = 16"):
            fwd(h, w[:, :8], t, impl=impl)
        with pytest.raises(TypeError, match="weight dtype"):
            fwd(h, w.float(), t, impl=impl)


@pytest.mark.skipif(not _is_sm90(), reason="the sm_90a kernel runs on compute capability 9.0")
def test_tuned_forward_runs_the_sm90_kernel():
    """On an H100 / H200 impl="tuned" launches ce_fwd_sm90_tma_wgmma_kernel (not the WMMA
    kernel), impl="auto" does not (it stays the WMMA forward until the kernel is proven)."""
    from torch.profiler import ProfilerActivity, profile

    h, w, t, _ = make_inputs(256, 64, 2000, torch.bfloat16, device="cuda")

    def names(impl):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd(h, w, t, impl=impl)
            torch.cuda.synchronize()
        return " ".join(e.key for e in prof.key_averages())

    tuned, auto = names("tuned"), names("auto")
    assert "ce_fwd_sm90_tma_wgmma_kernel" in tuned and "fwd_fused_kernel" not in tuned
    assert "ce_fwd_sm90_merge_kernel" in tuned
    assert "ce_fwd_sm90" not in auto and "fwd_fused_kernel" in auto


def test_tuned_forward_plan_for_this_device():
    """The device's plan as the adapter computes it: sm_90a path exactly on 9.0."""
    cc = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    f, _ = torch.ops.tokenkernels._cross_entropy_fwd_plan(8192, 2304, 256000, torch.bfloat16, True,
                                                          cc[0], cc[1], sms, True, "tuned", 1,
                                                          False)
    assert (int(f[0]) == 0) == (cc == (9, 0))


@pytest.mark.parametrize("N,V", [(4096, 40000), (3000, 70001)])
def test_tuned_forward_many_units_per_cta(N, V):
    """Enough (row tile, split) units that every CTA of the persistent grid runs several, with
    partials written between them (and D = 8 * 9: the last 64-feature block zero-filled)."""
    h, w, t, _ = make_inputs(N, 72, V, torch.bfloat16, device="cuda", wscale=4.0, seed=5)
    out = fwd(h, w, t, sum_z=False)
    ref = fwd(h, w, t, impl="plain", sum_z=False)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(out[4], ref[4], rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(out[5], ref[5], rtol=1e-4, atol=1e-3)
    mism = out[3] != ref[3]  # arg-max: only where the two logits tie to fp32 rounding
    if bool(mism.any()):
        z = logits64(h[mism.cpu()], w)
        top2 = z.topk(2, -1).values
        assert bool(((top2[:, 0] - top2[:, 1]) < 1e-3).all())


@pytest.mark.skipif(not _is_sm90(), reason="clusters of the sm_90a kernel")
@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("N,V", [(1, 300), (129, 1000), (300, 3001), (2000, 20000)])
def test_tuned_forward_cluster_pairs(monkeypatch, N, V, aux):
    """TOKENKERNELS_CE_SM90_CLUSTER=2: CTA pairs share each weight tile by TMA multicast (odd row
    tile counts pad the pair); same results as the single-CTA schedule up to the split order."""
    h, w, t, b = make_inputs(N, 72, V, torch.bfloat16, bias=True, ignore_frac=0.1, wscale=4.0,
                             device="cuda", seed=N)
    one = fwd(h, w, t, b, aux=aux)
    monkeypatch.setenv("TOKENKERNELS_CE_SM90_CLUSTER", "2")
    two = fwd(h, w, t, b, aux=aux)
    torch.testing.assert_close(two[0], one[0], rtol=1e-6, atol=1e-5)
    assert torch.equal(two[1], one[1])  # one accumulator, the same wgmma sequence either way
    torch.testing.assert_close(two[2], one[2], rtol=1e-5, atol=1e-3)
    if aux:
        assert torch.equal(two[3], one[3]) and torch.equal(two[4], one[4])
        torch.testing.assert_close(two[5], one[5], rtol=1e-5, atol=1e-4)
        _check(two, truth(h, w, t, b), h, w, b)
