"""Host side of the impl="tuned" sm_90a forward (csrc/include/tokenkernels/cross_entropy_sm90.h),
run on the CPU through the private ops:

* ``_cross_entropy_fwd_plan``: which path runs for which inputs and device (sm_90a kernel, WMMA
  fallback, plain), the split choice, the persistent schedule the kernel walks (every logit tile
  exactly once, units round-robin over the CTAs, concurrent CTAs on the same vocabulary tiles)
  and the workspace size;
* ``_cross_entropy_fwd_emulate``: the kernel's fold of the logit tiles (the TK_HD fold_tile /
  merge_fold / merge_splits code the kernel calls, in the kernel's lane / tile / split order)
  against torch's logsumexp / argmax / entropy, with -inf logits, softcap, bias, exact ties,
  shards, ignored and bad targets, and vocabularies that are not a multiple of the tile.
"""
import math

import pytest
import torch

import tokenkernels  # noqa: F401  (loads the ops)

PLAN = torch.ops.tokenkernels._cross_entropy_fwd_plan
EMULATE = torch.ops.tokenkernels._cross_entropy_fwd_emulate
FIELDS = ["path", "reason", "row_tiles", "vocab_tiles", "k_blocks", "splits", "tiles_per_split",
          "units", "grid", "part_bytes", "workspace_bytes", "smem_bytes", "makespan_tiles",
          "cluster", "row_units"]
SM90, WMMA, PLAIN = 0, 1, 2
R_SM90, R_NOT_TUNED, R_FP32, R_NO_FEATURES, R_UNALIGNED, R_TOO_LARGE, R_NOT_SM90, R_NO_CODE = range(8)
BM, BN, BK, STAGES = 128, 256, 64, 4
H200_SMS = 132


def plan(N, D, V, dtype=torch.bfloat16, aligned=True, cc=(9, 0), sms=H200_SMS, code=True,
         impl="tuned", cluster=1, schedule=False):
    f, s = PLAN(N, D, V, dtype, aligned, cc[0], cc[1], sms, code, impl, cluster, schedule)
    return dict(zip(FIELDS, f.tolist())), s


def pad256(x):
    return (x + 255) // 256 * 256


# ------------------------------------------------------------------------------ which path runs
@pytest.mark.parametrize("kw,path,reason", [
    (dict(), SM90, R_SM90),
    (dict(dtype=torch.float16), SM90, R_SM90),
    (dict(impl="auto"), WMMA, R_NOT_TUNED),
    (dict(impl="wmma"), WMMA, R_NOT_TUNED),
    (dict(impl="plain"), WMMA, R_NOT_TUNED),  # the adapter's own choice then applies
    (dict(dtype=torch.float32), PLAIN, R_FP32),
    (dict(D=0), PLAIN, R_NO_FEATURES),
    (dict(D=2300), PLAIN, R_UNALIGNED),       # D % 8 != 0: neither TMA nor WMMA
    (dict(aligned=False), PLAIN, R_UNALIGNED),
    (dict(N=2**31), WMMA, R_TOO_LARGE),       # TMA coordinates are int32
    (dict(V=2**31), WMMA, R_TOO_LARGE),
    (dict(cc=(8, 0)), WMMA, R_NOT_SM90),      # A100: the WMMA kernels stay the sm_80 path
    (dict(cc=(8, 9)), WMMA, R_NOT_SM90),
    (dict(cc=(10, 0)), WMMA, R_NOT_SM90),     # sm_90a code does not run on Blackwell
    (dict(cc=(9, 0), code=False), WMMA, R_NO_CODE),
])
def test_path_choice(kw, path, reason):
    args = dict(N=8192, D=2304, V=256000)
    args.update(kw)
    p, _ = plan(**args)
    assert (p["path"], p["reason"]) == (path, reason), p
    if path != SM90:
        assert p["workspace_bytes"] == 0 and p["grid"] == 0


def test_plan_bad_arguments():
    with pytest.raises(ValueError, match="_cross_entropy_fwd_plan: impl"):
        plan(8, 8, 8, impl="fast")
    with pytest.raises(ValueError, match="sm_count"):
        plan(8, 8, 8, sms=0)
    with pytest.raises(TypeError, match="dtype"):
        plan(8, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="cluster must be 1 or 2"):
        plan(8, 8, 8, cluster=4)


# ------------------------------------------------------------------------------ split choice
SHAPES = [(1, 8, 1), (1, 2304, 256000), (7, 8, 129), (129, 40, 1000), (1000, 2304, 32000),
          (4096, 4096, 128256), (8192, 2304, 256000), (16384, 2304, 256000), (300, 64, 257)]


def _cost(row_tiles, vocab_tiles, sms, want):
    want = max(1, min(want, vocab_tiles))
    per = -(-vocab_tiles // want)
    s = -(-vocab_tiles // per)
    return -(-(row_tiles * s) // sms) * per, s, per


@pytest.mark.parametrize("cluster", [1, 2])
@pytest.mark.parametrize("sms", [1, 7, 132])
@pytest.mark.parametrize("N,D,V", SHAPES, ids=[f"N{n}-D{d}-V{v}" for n, d, v in SHAPES])
def test_split_plan(N, D, V, sms, cluster):
    p, _ = plan(N, D, V, sms=sms, cluster=cluster)
    assert p["path"] == SM90 and p["cluster"] == cluster
    vt = p["vocab_tiles"]
    assert p["row_tiles"] == -(-N // BM) and vt == -(-V // BN) and p["k_blocks"] == -(-D // BK)
    # cluster 2: a unit is a pair of row tiles, one per CTA; a cluster slot is 2 SMs
    rt = p["row_units"]
    assert rt == -(-p["row_tiles"] // cluster)
    slots = max(1, sms // cluster)
    per, s = p["tiles_per_split"], p["splits"]
    # the splits cover the vocabulary tiles, none is empty
    assert 1 <= s <= vt and (s - 1) * per < vt <= s * per
    assert p["units"] == rt * s and p["grid"] == cluster * min(p["units"], slots)
    sms = slots
    assert p["part_bytes"] == pad256(N * s * 5 * 4)
    assert p["workspace_bytes"] == p["part_bytes"] + pad256(N * s * 4)
    assert p["smem_bytes"] == STAGES * (BM + BN) * BK * 2 + 2048 <= 227 * 1024
    # the makespan is the cost of the choice, within 1% of the best over every split count
    # the plan considers (1 .. min(vt, 4 sms)); no choice with fewer splits is within 1%
    cands = [_cost(rt, vt, sms, w) for w in range(1, min(vt, 4 * sms) + 1)]
    best = min(c for c, _, _ in cands)
    assert p["makespan_tiles"] == _cost(rt, vt, sms, s)[0]
    assert p["makespan_tiles"] * 100 <= best * 101
    assert all(c * 100 > best * 101 for c, s2, _ in cands if s2 < s)
    # and it is never worse than a lower bound by more than one unit per CTA
    assert p["makespan_tiles"] <= -(-(rt * vt) // (p["grid"] // cluster)) + per


@pytest.mark.parametrize("cluster", [1, 2])
def test_issue_shape_balance(cluster):
    """N=8192, V=256000 on 132 SMs: >= 99% of the CTAs' time is useful work, and the workspace
    stays a small fraction of the (never materialised) fp32 logits."""
    p, _ = plan(8192, 2304, 256000, cluster=cluster)
    useful = p["row_tiles"] * p["vocab_tiles"] / (p["grid"] * p["makespan_tiles"])
    assert useful >= 0.99, p
    assert p["workspace_bytes"] < 0.005 * 8192 * 256000 * 4, p


# ------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("cluster", [1, 2])
@pytest.mark.parametrize("sms", [1, 5, 132])
@pytest.mark.parametrize("N,V", [(1, 1), (7, 129), (129, 1000), (1000, 32000), (8192, 256000),
                                 (300, 3000)])
def test_schedule_covers_each_tile_once(N, V, sms, cluster):
    p, s = plan(N, 64, V, sms=sms, cluster=cluster, schedule=True)
    rt, vt, per = p["row_tiles"], p["vocab_tiles"], p["tiles_per_split"]
    ru, clusters = p["row_units"], p["grid"] // cluster
    cta, unit, r, sp, v = s.unbind(1)
    # the padding of an odd pair (cluster 2): row tile == row_tiles, nothing else
    pad = r >= rt
    assert bool((r[pad] == rt).all()) and (int(pad.sum()) == 0 or (cluster == 2 and rt % 2 == 1))
    # every real (row tile, vocabulary tile) exactly once
    key = (r * vt + v)[~pad]
    assert key.numel() == rt * vt
    assert torch.equal(torch.sort(key).values, torch.arange(rt * vt))
    # units round-robin over the clusters, each unit = (row unit, split), its tiles in order;
    # the CTAs of a cluster run the same units on the row tiles 2 u, 2 u + 1
    assert torch.equal(cta // cluster, unit % clusters)
    assert torch.equal(r, (unit % ru) * cluster + cta % cluster) and torch.equal(sp, unit // ru)
    assert bool(((v >= sp * per) & (v < (sp + 1) * per)).all())
    if cluster == 2:  # the two CTAs of a cluster walk identical (unit, vocab tile) sequences
        for c in range(clusters):
            a, b = s[cta == 2 * c], s[cta == 2 * c + 1]
            assert torch.equal(a[:, [1, 3, 4]], b[:, [1, 3, 4]])
    # per CTA: units increasing, tiles increasing within a unit, load <= the makespan
    for c in range(p["grid"]):
        m = cta == c
        u, vv = unit[m], v[m]
        assert bool((u[1:] >= u[:-1]).all())
        same = u[1:] == u[:-1]
        assert bool((vv[1:][same] == vv[:-1][same] + 1).all())
        assert int(m.sum()) <= p["makespan_tiles"]


@pytest.mark.parametrize("cluster", [1, 2])
def test_schedule_weight_locality(cluster):
    """The units of one wave (the grid's CTAs at the same time) cover all row tiles of a few
    consecutive splits: each weight tile is read from HBM about once, then from L2."""
    p, s = plan(8192, 2304, 256000, cluster=cluster, schedule=True)
    rt, g = p["row_units"], p["grid"] // cluster
    units = torch.arange(p["units"])
    for w in range(-(-p["units"] // g)):
        wave = units[w * g:(w + 1) * g]
        splits = torch.unique(wave // rt)
        assert splits.numel() <= -(-g // rt) + 1
        assert int(splits.max() - splits.min()) + 1 == splits.numel()  # consecutive


# ------------------------------------------------------------------------------ emulation
def _torch_stats(z, t, ignore_index, vocab_start, vocab_total):
    """torch's view of cross_entropy_forward's outputs for logits z (already capped/biased)."""
    lse = torch.logsumexp(z, -1)
    V = z.shape[1]
    zn = torch.where(torch.isnan(z), torch.full_like(z, -math.inf), z)
    am = torch.where((zn > -math.inf).any(-1), zn.argmax(-1), torch.zeros_like(t))
    maxz = zn.max(-1).values
    p = torch.softmax(z, -1)
    ent = lse - (p * z).sum(-1)
    local = t - vocab_start
    own = (t != ignore_index) & (local >= 0) & (local < V) & (t < vocab_total)
    zt = torch.where(own, z.gather(1, local.clamp(0, V - 1)[:, None])[:, 0], torch.zeros_like(lse))
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab_total))
    zt = torch.where(bad, torch.full_like(zt, math.nan), zt)
    return lse, zt, z.sum(-1), am, maxz, ent


def _emulate(logits, t, bias=None, softcap=None, ignore_index=-100, vocab_start=0,
             vocab_total=None, splits=1, aux=True):
    vocab_total = logits.shape[1] if vocab_total is None else vocab_total
    return EMULATE(logits, t, bias, softcap, ignore_index, vocab_start, vocab_total, splits,
                   True, aux)


def _check(out, ref, rtol=2e-5, atol=2e-5, ent_atol=1e-4):
    lse, zt, sz, am, mx, ent = out
    rlse, rzt, rsz, ram, rmx, rent = ref
    torch.testing.assert_close(lse, rlse, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(zt, rzt, rtol=0, atol=0, equal_nan=True)  # the same float
    torch.testing.assert_close(sz, rsz, rtol=1e-4, atol=1e-3, equal_nan=True)
    assert torch.equal(am, ram)
    torch.testing.assert_close(mx, rmx, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ent, rent, rtol=1e-4, atol=ent_atol, equal_nan=True)


@pytest.mark.parametrize("splits", [1, 2, 3, 1000])
@pytest.mark.parametrize("N,V", [(1, 1), (7, 129), (5, 256), (9, 257), (33, 1000), (4, 2049)])
def test_emulated_fold_matches_torch(N, V, splits):
    g = torch.Generator().manual_seed(N * 10007 + V)
    z = torch.randn(N, V, generator=g) * 4
    t = torch.randint(0, V, (N,), generator=g)
    t[0] = -100
    out = _emulate(z, t, splits=splits)
    _check(out, _torch_stats(z, t, -100, 0, V))


def test_emulated_fold_large_logits():
    """Logits around 1e4 (cancellation in z - m): lse relative error stays at fp32 level."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 3000, generator=g) * 30 + 1e4
    t = torch.randint(0, 3000, (16,), generator=g)
    _check(_emulate(z, t, splits=4), _torch_stats(z, t, -100, 0, 3000), ent_atol=2e-3)


@pytest.mark.parametrize("splits", [1, 4])
def test_emulated_ties_and_argmax(splits):
    """Exact ties inside a lane, across the lanes of a row, across tiles and across splits: the
    lowest column wins, as torch.argmax (first occurrence)."""
    V = 256 * 5 + 3
    z = torch.zeros(6, V)
    z[0, [5, 7]] = 3.0                 # two lanes of a row (acc_col: 5 -> lane 2, 7 -> lane 3)
    z[1, [4, 5]] = 3.0                 # two values of one lane (lane 2, j = 0 and 1)
    z[2, [300, 40]] = 2.0              # two tiles: the earlier tile's column wins
    z[3, [1100, 1281]] = 9.0           # the masked last tile against an earlier one
    z[4, :] = 1.0                      # everything tied: column 0
    z[5, [255, 256]] = 1.0             # tile boundary
    t = torch.arange(6) * 7
    _check(_emulate(z, t, splits=splits), _torch_stats(z, t, -100, 0, V))


@pytest.mark.parametrize("splits", [1, 3])
def test_emulated_minus_inf(splits):
    """-inf logits (e.g. a -inf bias masking tokens), whole -inf tiles, an all -inf row (lse
    -inf, arg-max 0, as every path) and a row that is -inf but for one column."""
    V = 256 * 3 + 17
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, V, generator=g)
    z[0, ::3] = -math.inf
    z[1, :512] = -math.inf             # the first two tiles: tiles without a finite value
    z[2, :] = -math.inf
    z[3, :] = -math.inf
    z[3, V - 1] = 0.5                  # only the masked last tile's last column
    t = torch.tensor([1, 2, 3, V - 1, 4])
    out = _emulate(z, t, splits=splits)
    ref = _torch_stats(z, t, -100, 0, V)
    _check(out, ref)
    assert out[0][2] == -math.inf and out[3][2] == 0 and out[4][2] == -math.inf
    assert torch.isnan(out[5][0]) and torch.isnan(ref[5][0])  # 0 * -inf in sum p*z, both


def test_emulated_nan_logit():
    z = torch.randn(2, 300)
    z[0, 17] = math.nan
    t = torch.tensor([17, 3])
    out = _emulate(z, t, splits=2)
    ref = _torch_stats(z, t, -100, 0, 300)
    assert torch.isnan(out[0][0]) and torch.isnan(ref[0][0])
    assert torch.equal(out[3], ref[3])  # NaN never wins the arg-max
    torch.testing.assert_close(out[0][1], ref[0][1])


@pytest.mark.parametrize("softcap", [None, 5.0, math.inf])
@pytest.mark.parametrize("with_bias", [False, True])
def test_emulated_softcap_bias(softcap, with_bias):
    g = torch.Generator().manual_seed(11)
    N, V = 9, 700
    acc = torch.randn(N, V, generator=g) * 8
    b = torch.randn(V, generator=g) if with_bias else None
    z = acc + (b if with_bias else 0)
    if softcap is not None and math.isfinite(softcap):
        z = softcap * torch.tanh(z / softcap)
    t = torch.randint(0, V, (N,), generator=g)
    out = _emulate(acc, t, bias=b, softcap=softcap, splits=2)
    lse, zt, sz, am, mx, ent = _torch_stats(z, t, -100, 0, V)
    # the target logit / max go through host tanhf vs torch.tanh: a few ulps
    torch.testing.assert_close(out[0], lse, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out[1], zt, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[2], sz, rtol=1e-4, atol=1e-3)
    assert torch.equal(out[3], am)
    torch.testing.assert_close(out[4], mx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[5], ent, rtol=1e-4, atol=1e-4)


def test_emulated_shard_and_targets():
    """Vocab-parallel shard [vocab_start, vocab_start + V) of vocab_total: targets in another
    shard give zt = 0, ignored ones 0, out-of-range ones NaN; arg-max is shard-local."""
    g = torch.Generator().manual_seed(5)
    V, start, total = 300, 1000, 5000
    z = torch.randn(6, V, generator=g)
    t = torch.tensor([1000, 1299, 999, 1300, -100, 5000])
    out = _emulate(z, t, vocab_start=start, vocab_total=total, splits=2)
    ref = _torch_stats(z, t, -100, start, total)
    _check(out, ref)
    assert out[1][0] == z[0, 0] and out[1][1] == z[1, V - 1]
    assert out[1][2] == 0 and out[1][3] == 0 and out[1][4] == 0 and torch.isnan(out[1][5])


def test_emulated_no_aux_and_split_invariance():
    """aux=False folds the same lse / sum z (no arg-max / entropy tracking); the split count
    changes lse by rounding only."""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(4, 5000, generator=g) * 3
    t = torch.randint(0, 5000, (4,), generator=g)
    a = EMULATE(z, t, None, None, -100, 0, 5000, 1, True, False)
    b = _emulate(z, t, splits=7)
    assert a[3].numel() == 0 and a[5].numel() == 0
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-4)


def test_emulate_bad_arguments():
    z = torch.zeros(2, 3)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="_cross_entropy_fwd_emulate: splits"):
        EMULATE(z, t, None, None, -100, 0, 3, 0, False, False)
    with pytest.raises(TypeError, match="logits must be float32"):
        EMULATE(z.double(), t, None, None, -100, 0, 3, 1, False, False)
    with pytest.raises(ValueError, match="vocabulary shard"):
        EMULATE(z, t, None, None, -100, 2, 3, 1, False, False)
