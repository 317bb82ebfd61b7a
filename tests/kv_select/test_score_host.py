"""kv_select.score(impl="tuned") without a GPU: the CUDA kernel's host plan
(``_kv_select_score_plan`` = score_tuned_plan in csrc/include/tokenkernels/kv_select_score.h), its
32-bit page division (``_kv_select_score_fastdiv``) and a CPU emulation of the three passes
(``_kv_select_score_emulate``) that runs the kernel's own TK_HD code -- work list, token -> (page,
slot) offsets, reduce-scatter and owner map, online (max, sum) per owner, chunk-end merge, pass-2
merge, pass 3 -- against torch."""
import math

import pytest
import torch

from tokenkernels.reference import kv_select as ref
from tokenkernels.testing import tol
from .cases import cpu, f64, make_case

FIELDS = ["ok", "R", "maxg", "U", "tp", "threads", "tile", "stages", "smem_bytes", "tiles_per_req",
          "chunk_tiles", "chunks_per_req", "chunks", "blocks_per_sm", "grid", "workspace_bytes"]
CPT = 8


def plan(B, N, H_kv, H_q, D, elt=2, sms=132, bps=2):
    f = torch.ops.tokenkernels._kv_select_score_plan(B, N, H_kv, H_q, D, elt, sms, bps)
    assert len(f) == len(FIELDS)
    return dict(zip(FIELDS, f))


def align256(v):
    return (v + 255) // 256 * 256


def check_invariants(p, B, N, H_kv, H_q, D, sms, bps):
    G = H_q // H_kv
    assert p["ok"] == 1
    assert p["R"] == D // 8 and p["maxg"] >= G and p["maxg"] & (p["maxg"] - 1) == 0 and p["maxg"] < 2 * G
    V = p["U"] * p["maxg"]
    assert V <= p["R"] and V <= 16 and CPT % p["U"] == 0
    assert p["threads"] == p["R"] * H_kv * p["tp"] and p["threads"] % 32 == 0
    assert p["threads"] <= (256 if p["maxg"] >= 8 else 512)
    assert p["tile"] == CPT * p["tp"] and p["tp"] in (1, 2, 4)
    assert 2 <= p["stages"] <= 4
    # ring + row masks + merge buffer (16-byte aligned), within the 227 KB a block may use
    ring = p["stages"] * CPT * p["threads"] * 16
    part = (ring + p["stages"] * p["threads"] + 15) // 16 * 16
    assert p["smem_bytes"] == part + 2 * p["threads"] * 8 <= 227 * 1024
    tpr = p["tiles_per_req"]
    assert tpr == -(-N // p["tile"])
    ct, cpr = p["chunk_tiles"], p["chunks_per_req"]
    # the chunks tile the request exactly: none empty, none missing
    assert cpr == -(-tpr // ct) and (cpr - 1) * ct < tpr <= cpr * ct
    # at most ceil(N / 64) chunks per request: the partials fit score_workspace_bytes' layout
    assert cpr == 1 or ct * p["tile"] >= 64
    assert cpr <= max(1, -(-N // 64))
    assert p["chunks"] == B * cpr
    assert p["blocks_per_sm"] == bps
    assert p["grid"] == min(p["chunks"], bps * sms) >= 1
    assert p["workspace_bytes"] == align256(4 * B * H_q * N) + align256(8 * B * H_q * cpr) + align256(8 * B * H_q)
    assert p["workspace_bytes"] <= (align256(4 * B * H_q * N) + align256(8 * B * H_q * max(1, -(-N // 64)))
                                    + align256(8 * B * H_q))


def test_plan_llama_131072():
    """The issue's shape: one request, 131072 tokens, 32 q / 8 KV heads, D 128, bf16, 132 SMs at
    two resident blocks each."""
    p = plan(1, 131072, 8, 32, 128, sms=132, bps=2)
    check_invariants(p, 1, 131072, 8, 32, 128, 132, 2)
    assert (p["R"], p["maxg"], p["U"], p["tp"], p["threads"], p["tile"], p["stages"]) == (16, 4, 4, 2, 256, 16, 2)
    assert p["tiles_per_req"] == 8192 and 0.95 * 264 <= p["grid"] <= 264
    # static grid-stride list: every block busy, the last round nearly full
    rounds = -(-p["chunks"] // p["grid"])
    assert p["tiles_per_req"] / (p["grid"] * rounds * p["chunk_tiles"]) >= 0.95
    assert p["smem_bytes"] <= 227 * 1024 // 2   # two blocks fit an SM's shared memory


@pytest.mark.parametrize("B,N", [(1, 1), (1, 7), (3, 129), (2, 1000), (1, 131072), (64, 131072), (300, 4096),
                                 (7, 100003)])
@pytest.mark.parametrize("H_kv,H_q,D", [(8, 32, 128), (2, 8, 64), (1, 8, 256), (32, 32, 128), (4, 28, 128),
                                        (3, 9, 64), (5, 40, 64), (64, 64, 64)])
@pytest.mark.parametrize("sms,bps", [(132, 2), (108, 3), (3, 1)])
def test_plan_invariants(B, N, H_kv, H_q, D, sms, bps):
    check_invariants(plan(B, N, H_kv, H_q, D, sms=sms, bps=bps), B, N, H_kv, H_q, D, sms, bps)


def test_plan_balances_the_static_list():
    """The chunk size minimises rounds * (chunk_tiles + 1) of the grid-stride list: for long
    requests the blocks' work differs by at most one chunk and the last round is >= 90% full."""
    for B, N in [(1, 131072), (3, 131072), (8, 32768), (64, 131072), (1, 65536)]:
        p = plan(B, N, 8, 32, 128)
        rounds = -(-p["chunks"] // p["grid"])
        work = B * p["tiles_per_req"]
        assert work / (p["grid"] * rounds * p["chunk_tiles"]) >= 0.9, (B, N, p)


@pytest.mark.parametrize("args", [
    dict(elt=4),                        # fp32 cache: the simt kernel
    dict(D=96), dict(D=32), dict(D=512),
    dict(H_q=48, H_kv=3),               # G = 16 > 8
    dict(H_q=30, H_kv=8),               # H_q not a multiple of H_kv
    dict(H_kv=64, H_q=64, D=256),       # R * H_kv = 2048 lanes > 512
    dict(H_kv=32, H_q=256, D=128),      # G = 8: 256-thread cap, 16 * 32 = 512 lanes
])
def test_plan_refuses(args):
    kw = dict(B=2, N=1000, H_kv=8, H_q=32, D=128, elt=2)
    kw.update(args)
    p = plan(kw["B"], kw["N"], kw["H_kv"], kw["H_q"], kw["D"], kw["elt"])
    assert p["ok"] == 0


def test_plan_estimates_occupancy_when_not_given():
    p = plan(1, 131072, 8, 32, 128, bps=0)
    assert p["ok"] == 1 and 1 <= p["blocks_per_sm"] <= 2048 // p["threads"]
    assert p["blocks_per_sm"] * p["smem_bytes"] <= 220 * 1024


@pytest.mark.parametrize("d", [1, 2, 3, 7, 16, 17, 100, 255, 256, 1000, 4095, 65535, 65536, 65537,
                               2 ** 20 + 1, 10 ** 9 + 7, 2 ** 30, 2 ** 30 + 3, 2 ** 31 - 1])
def test_fastdiv_u32(d):
    """The kernel's page index n / page_size (FastDivU32) for every n < 2^31."""
    g = torch.Generator().manual_seed(d % 1000)
    edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, 2 ** 31 - 1, 2 ** 31 - 2, 2 ** 31 - d, 2 ** 30]
    n = torch.cat([torch.tensor([e for e in edges if 0 <= e < 2 ** 31], dtype=torch.long),
                   torch.randint(0, 2 ** 31, (20000,), generator=g),
                   torch.randint(0, 4 * d + 1, (2000,), generator=g).clamp_max(2 ** 31 - 1),
                   (torch.arange(1, 200) * d).clamp_max(2 ** 31 - 1),
                   (torch.arange(1, 200) * d - 1).clamp(0, 2 ** 31 - 1)])
    got = torch.ops.tokenkernels._kv_select_score_fastdiv(n, d)
    assert torch.equal(got, n // d)


def test_fastdiv_exhaustive_small():
    n = torch.arange(0, 1 << 16)
    for d in range(1, 300):
        assert torch.equal(torch.ops.tokenkernels._kv_select_score_fastdiv(n, d), n // d), d


# --------------------------------------------------------------------------- emulation
def emulate(c, q, sms, bps, skip=None, valid=None):
    return torch.ops.tokenkernels._kv_select_score_emulate(q, c.k, c.seq_lens, c.block_table, skip, valid, sms, bps)


def torch_logits(c, q):
    """fp64 logits (B, H_q, N_max) of the (already scaled) fp32 q against the upcast cache."""
    K = ref.dense_cache(f64(c.k), cpu(c.block_table))
    G = q.shape[1] // K.shape[2]
    return torch.einsum("bhd,bnhd->bhn", q.double(), K.repeat_interleave(G, 2))


def ok_mask(c, N, skip=None, valid=None):
    ok = torch.arange(N)[None, :] < c.seq_lens.long()[:, None]
    if valid is not None:
        ok &= valid
    if skip is not None:
        ok &= ~skip[:, None]
    return ok


EMU_CASES = [
    # seq_lens, page, strided, G, D, dtype, (sms, bps)
    pytest.param([129, 1, 7], None, False, 4, 64, torch.bfloat16, (132, 2), id="ragged-contig-G4-D64-bf16"),
    pytest.param([1000, 0, 129], 16, False, 4, 128, torch.float16, (3, 1), id="ragged-paged16-G4-D128-fp16-fewSMs"),
    pytest.param([300, 77], 1, False, 8, 64, torch.bfloat16, (2, 1), id="paged1-G8-D64"),
    pytest.param([257, 19], 16, True, 1, 128, torch.float16, (5, 2), id="paged16-HFstrided-G1-D128"),
    pytest.param([1000, 129], None, True, 2, 64, torch.bfloat16, (4, 3), id="contig-HFstrided-G2-D64"),
    pytest.param([513, 7, 64], 7, False, 3, 128, torch.bfloat16, (1, 1), id="paged7-G3-D128-oneblock"),
    pytest.param([1], None, False, 4, 128, torch.bfloat16, (132, 2), id="N1"),
]
# The heads (H_kv 8, D 128: 16-token tiles): paged 16 / 32 take the producer's one-offset-
# per-tile fast path, paged 8 the per-row path.
EMU_CASES_HKV8 = [
    pytest.param([1000, 129, 7], 16, False, 4, 128, torch.bfloat16, (5, 2), id="Hkv8-paged16-fast"),
    pytest.param([700, 33], 32, True, 4, 128, torch.float16, (3, 1), id="Hkv8-paged32-strided-fast"),
    pytest.param([300, 1], 8, False, 4, 128, torch.bfloat16, (2, 2), id="Hkv8-paged8-per-row"),
    pytest.param([513], None, False, 1, 128, torch.bfloat16, (4, 1), id="Hkv8-contig-G1-fast"),
]


@pytest.mark.parametrize("seq,page,strided,G,D,dtype,occ,H_kv",
                         [pytest.param(*c.values, 2, id=c.id) for c in EMU_CASES] +
                         [pytest.param(*c.values, 8, id=c.id) for c in EMU_CASES_HKV8])
def test_emulation_matches_torch(seq, page, strided, G, D, dtype, occ, H_kv):
    """Every logit of a valid token is written exactly once (the rest stay NaN) and equals q . k;
    the per-chunk partials, the merged per-head (max, sum) and the scores equal torch's."""
    c = make_case(seq, H_kv=H_kv, G=G, D=D, dtype=dtype, page_size=page, strided=strided, seed=sum(seq) + D)
    q = c.q.float() * (D ** -0.5)
    sms, bps = occ
    logits, pstat, stat, out = emulate(c, q, sms, bps)
    B, H_q, N = logits.shape
    p = plan(B, N, H_kv, H_q, D, sms=sms, bps=bps)
    assert pstat.shape == (B, H_q, p["chunks_per_req"], 2)
    ok = ok_mask(c, N)
    want = torch_logits(c, q)
    okh = ok[:, None, :].expand(-1, H_q, -1)
    assert not torch.isnan(logits[okh]).any(), "a valid token's logit was never written"
    assert torch.isnan(logits[~okh]).all(), "a logit past seq_len was written"
    assert (logits[okh].double() - want[okh]).abs().max().item() <= 1e-4
    # per-chunk partials: (max, sum exp(l - max)) of the chunk's valid tokens, (-inf, 0) if none
    ct = p["chunk_tiles"] * p["tile"]
    lg = logits.double().masked_fill(~okh, float("-inf"))
    for ch in range(p["chunks_per_req"]):
        part = lg[:, :, ch * ct:(ch + 1) * ct]
        m = part.amax(-1)
        s = torch.where(m > float("-inf"), (part - m[..., None]).exp().sum(-1), torch.zeros_like(m))
        assert torch.equal(pstat[:, :, ch, 0].double(), m), ch       # the max is exact
        assert torch.allclose(pstat[:, :, ch, 1].double(), s, rtol=1e-5, atol=0), ch
    m = lg.amax(-1)
    s = (lg - m[..., None]).exp().nan_to_num(0.0).sum(-1)
    empty = m == float("-inf")
    assert torch.equal(stat[..., 0][~empty].double(), m[~empty])
    assert torch.allclose(stat[..., 1][~empty].double(), s[~empty], rtol=1e-5, atol=0)
    assert (stat[..., 0][empty] == float("inf")).all() and (stat[..., 1][empty] == 1).all()
    want_out = ref.score(q.double(), f64(c.k), cpu(c.seq_lens), block_table=cpu(c.block_table))
    assert torch.equal(torch.isinf(out), torch.isinf(want_out))
    fin = torch.isfinite(want_out)
    assert (out[fin].double() - want_out[fin]).abs().max().item() <= tol(dtype, "kv_score") * H_q


def test_emulation_skip_valid_and_bad_pages():
    """valid=False tokens: logit -inf, out of the softmax; skip: nothing written, all partials
    empty; a page number out of range (unchecked input): its rows are never read, logit -inf."""
    c = make_case([300, 200, 150], H_kv=2, G=4, D=64, dtype=torch.bfloat16, page_size=16, seed=5)
    q = c.q.float()
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(3, 304, generator=g) > 0.3
    skip = torch.tensor([False, True, False])
    bt = c.block_table.clone()
    bt[2, 3] = 10 ** 6          # tokens 48..63 of request 2
    bt[0, 0] = -5               # tokens 0..15 of request 0
    c.block_table = bt
    logits, pstat, stat, out = emulate(c, q, 4, 2, skip=skip, valid=valid)
    B, H_q, N = logits.shape
    assert torch.isnan(logits[1]).all() and torch.isinf(out[1]).all()
    assert (pstat[1, :, :, 0] == float("-inf")).all() and (pstat[1, :, :, 1] == 0).all()
    ok = ok_mask(c, N, skip=skip, valid=valid)
    bad = torch.zeros(B, N, dtype=torch.bool)
    bad[2, 48:64] = True
    bad[0, 0:16] = True
    good = ok & ~bad
    lgood = logits.permute(0, 2, 1)[good]
    assert torch.isfinite(lgood).all()
    assert (logits.permute(0, 2, 1)[ok & bad] == float("-inf")).all()
    # valid=False inside seq_len: -inf logit; out -inf
    inside = (torch.arange(N)[None, :] < c.seq_lens.long()[:, None]) & ~skip[:, None]
    assert (logits.permute(0, 2, 1)[inside & ~valid] == float("-inf")).all()
    assert torch.isinf(out[~ok]).all() and torch.isfinite(out[ok]).all()
    # the scores of the good tokens: softmax over the good tokens only (bad rows weigh 0)
    cg = make_case([300, 200, 150], H_kv=2, G=4, D=64, dtype=torch.bfloat16, page_size=16, seed=5)
    want = ref.score(q.double(), f64(cg.k), cpu(cg.seq_lens), block_table=cpu(cg.block_table),
                     valid=valid & ~bad, skip=skip)
    assert (out[good].double() - want[good]).abs().max().item() <= tol(torch.bfloat16, "kv_score") * H_q
    assert (out[ok & bad] == 0).all()


def test_emulation_bad_pages_fast_path():
    """Out-of-range page numbers on the fast path (H_kv 8, D 128, page 16 = one tile per page, no
    valid mask): the whole tile is skipped, logits -inf, weight 0; the other tokens' scores are
    the softmax over the good tokens."""
    c = make_case([200, 100], H_kv=8, G=4, D=128, dtype=torch.bfloat16, page_size=16, seed=8)
    q = c.q.float()
    good_bt = c.block_table.clone()
    bt = c.block_table.clone()
    bt[0, 1] = 10 ** 6
    bt[1, 6] = -1               # tokens 96..99 of request 1 (its last, partial page)
    c.block_table = bt
    logits, _, _, out = emulate(c, q, 3, 2)
    B, H_q, N = logits.shape
    bad = torch.zeros(B, N, dtype=torch.bool)
    bad[0, 16:32] = True
    bad[1, 96:100] = True
    ok = ok_mask(c, N)
    assert (logits.permute(0, 2, 1)[ok & bad] == float("-inf")).all()
    assert torch.isfinite(logits.permute(0, 2, 1)[ok & ~bad]).all()
    assert (out[ok & bad] == 0).all()
    want = ref.score(q.double(), f64(c.k), cpu(c.seq_lens), block_table=good_bt, valid=~bad)
    good = ok & ~bad
    assert (out[good].double() - want[good]).abs().max().item() <= tol(torch.bfloat16, "kv_score") * H_q


def test_online_stats_unscaled_logits():
    """TokenSelect's unscaled logits (max 30-60): the emulated one-exp online push and the merges
    keep the dominant tokens' scores at fp32 relative precision (as the fused kernels must)."""
    g = torch.Generator().manual_seed(21)
    B, N, H_kv, G, D = 2, 700, 2, 4, 64
    q = torch.randint(-4, 5, (B, H_kv * G, D), generator=g).float()
    k = (torch.randint(-2, 3, (B, N, H_kv, D), generator=g).float() * 0.5).to(torch.bfloat16)
    sl = torch.tensor([700, 613], dtype=torch.int32)

    class C:
        pass
    c = C()
    c.k, c.seq_lens, c.block_table = k, sl, None
    _, _, _, out = emulate(c, q, 3, 1)
    want = ref.score(q.double(), k.double(), sl, scale=1.0)
    big = want > 0.1
    assert big.any()
    rel = ((out.double() - want).abs()[big] / want[big]).max().item()
    assert rel <= 1e-6, rel


# --------------------------------------------------------------------------- random shapes
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300)
@given(B=st.integers(1, 70), N=st.integers(1, 300000), H_kv=st.integers(1, 70), G=st.integers(1, 17),
       D=st.sampled_from([8, 32, 64, 96, 128, 256, 512]), elt=st.sampled_from([2, 4]),
       sms=st.integers(1, 200), bps=st.integers(0, 8))
def test_plan_random_shapes(B, N, H_kv, G, D, elt, sms, bps):
    """Every shape the plan accepts satisfies the invariants; it refuses exactly the documented
    cases (fp32, D not 64/128/256, G > 8, or no whole-warp block within the thread cap)."""
    H_q = H_kv * G
    p = plan(B, N, H_kv, H_q, D, elt, sms, bps)
    R = D // 8
    maxg = 1 << (G - 1).bit_length()
    cap = 256 if maxg >= 8 else 512
    eligible = elt == 2 and D in (64, 128, 256) and G <= 8 and R * H_kv <= cap
    if eligible:   # whole warps reachable with tp <= 4 and within the cap?
        tp = 1
        while tp < 4 and R * H_kv * tp * 2 <= 256:
            tp *= 2
        while (R * H_kv * tp) % 32 and tp < 4:
            tp *= 2
        eligible = (R * H_kv * tp) % 32 == 0 and R * H_kv * tp <= cap
    assert p["ok"] == int(eligible), p
    if eligible:
        if bps <= 0:
            bps = p["blocks_per_sm"]
        check_invariants(p, B, N, H_kv, H_q, D, sms, bps)


@settings(max_examples=25)
@given(seq=st.lists(st.integers(0, 700), min_size=1, max_size=3), H_kv=st.integers(1, 5), G=st.integers(1, 8),
       D=st.sampled_from([64, 128]), page=st.sampled_from([None, 1, 3, 16, 32]), strided=st.booleans(),
       sms=st.integers(1, 8), bps=st.integers(1, 3), seed=st.integers(0, 10 ** 6))
def test_emulation_random_shapes(seq, H_kv, G, D, page, strided, sms, bps, seed):
    """The emulated kernel writes exactly the valid tokens' logits, each equal to q . k, for
    random GQA shapes, page sizes and grids (odd H_kv, padded q-heads, 1..4 token phases)."""
    c = make_case(seq, H_kv=H_kv, G=G, D=D, dtype=torch.bfloat16, page_size=page, strided=strided,
                  seed=seed)
    q = c.q.float()
    logits, pstat, stat, out = emulate(c, q, sms, bps)
    B, H_q, N = logits.shape
    okh = ok_mask(c, N)[:, None, :].expand(-1, H_q, -1)
    assert not torch.isnan(logits[okh]).any() and torch.isnan(logits[~okh]).all()
    want = torch_logits(c, q)
    assert (logits[okh].double() - want[okh]).abs().max().item() <= 1e-3 if okh.any() else True
    want_out = ref.score(q.double(), f64(c.k), cpu(c.seq_lens), block_table=cpu(c.block_table))
    assert torch.equal(torch.isinf(out), torch.isinf(want_out))
    fin = torch.isfinite(want_out)
    if fin.any():
        assert (out[fin].double() - want_out[fin]).abs().max().item() <= tol(torch.bfloat16, "kv_score") * H_q
