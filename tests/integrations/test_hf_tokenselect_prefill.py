"""Chunked TokenSelect sparse prefill (``enable_tokenselect_attention(..., prefill_chunk=C)``) on
tiny random Llama / Mistral / Qwen2 models (GQA 4/2), CPU:

* full budget (every chunk's prefix selected whole, the sparse kernels forced on every chunk with
  ``sparse_min_len=0``): prefill logits equal SDPA's (fp32 to rounding, bf16 within bf16's) and
  greedy generation equals SDPA's token for token -- batch 2, left padding, DynamicCache and
  StaticCache;
* a real sparse budget: one layer's attention output against a pure-PyTorch oracle of the
  algorithm (per chunk: mean query, per-head softmax summed over heads, sink + top-k + local,
  then causal attention over the picks and the chunk), exact indices, with left padding, a cached
  prefix and a StaticCache's masked tail;
* one call with all chunks == feeding the prompt to the model chunk by chunk (the docstring's
  claim), and generate end to end with a small budget;
* stats, reset, ``prefill_chunk=None`` unchanged, bad ``prefill_chunk`` / ``prefill_impl`` values.

Both ways a sparse chunk attends are tested: ``prefill_impl="kernel"`` (``kv_select.sparse_prefill``)
and ``"gather"`` (SDPA over the gathered picks, the CPU default).
"""
from __future__ import annotations

import copy

import pytest
import torch

import tokenkernels.kv_select as kv_select
from tokenkernels.integrations import _hf_tokenselect as hts
from tokenkernels.integrations.transformers import (enable_tokenselect_attention,
                                                    reset_tokenselect_stats, tokenselect_stats)

from .hf_models import causal_lm

PROMPT, NEW, LAYERS, PAD = 40, 6, 2, 9


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _prompts(padded: bool = True, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (batch, PROMPT), generator=g)
    am = torch.ones_like(ids)
    if padded:
        am[1, :PAD] = 0
        ids[1, :PAD] = 0
    return ids, am


def _gen_kwargs(cache_impl):
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)
    if cache_impl == "static":
        kw["cache_implementation"] = "static"
    return kw


# ------------------------------------------------------------------------------ full budget
@pytest.mark.parametrize("impl", ["gather", "kernel"])
@pytest.mark.parametrize("cache_impl", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_full_budget_equals_sdpa(name, cache_impl, impl):
    ref_model = causal_lm(name)
    ref_model.set_attn_implementation("sdpa")
    m = copy.deepcopy(ref_model)
    ids, am = _prompts()
    with torch.no_grad():
        ref_logits = ref_model(input_ids=ids, attention_mask=am).logits
        ref = ref_model.generate(input_ids=ids, attention_mask=am, **_gen_kwargs(cache_impl))
        # budget 4 + 64 + 8 >= the context: every prefix is selected whole; sparse_min_len=0 runs
        # the sparse kernels on every chunk after the first
        enable_tokenselect_attention(m, k=64, n_sink=4, n_local=8, sparse_min_len=0, prefill_chunk=4,
                                     prefill_impl=impl)
        logits = m(input_ids=ids, attention_mask=am).logits
        st = tokenselect_stats(m)
        # 10 chunks per layer: the first (empty prefix) and the one where row 1's padding ends
        # (positions 8..11) run dense, the rest sparse
        assert (st["prefill_sparse_chunks"], st["prefill_dense_chunks"]) == (LAYERS * 8, LAYERS * 2)
        reset_tokenselect_stats(m)
        out = m.generate(input_ids=ids, attention_mask=am, **_gen_kwargs(cache_impl))
    assert torch.isfinite(logits).all()                       # padding rows too
    valid = am.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    st = tokenselect_stats(m)
    assert st["prefill_sparse_chunks"] == LAYERS * 8 and st["prefill_dense_chunks"] == LAYERS * 2


@pytest.mark.parametrize("impl", ["gather", "kernel"])
def test_full_budget_bf16_close_to_sdpa(impl):
    ref_model = causal_lm("llama").to(torch.bfloat16)
    ref_model.set_attn_implementation("sdpa")
    m = copy.deepcopy(ref_model)
    ids, am = _prompts()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=am).logits.float()
        enable_tokenselect_attention(m, k=64, n_sink=4, n_local=8, sparse_min_len=0, prefill_chunk=8,
                                     prefill_impl=impl)
        got = m(input_ids=ids, attention_mask=am).logits.float()
        # the same model in fp32: ours is not further from it than SDPA's bf16 rounding allows
        exact = causal_lm("llama")(input_ids=ids, attention_mask=am).logits
    assert tokenselect_stats(m)["prefill_sparse_chunks"] > 0
    assert torch.isfinite(got).all()
    valid = am.bool()
    ref_err = (ref[valid] - exact[valid]).abs().max()
    got_err = (got[valid] - exact[valid]).abs().max()
    assert got_err <= 2 * ref_err + 1e-2, (got_err, ref_err)
    torch.testing.assert_close(got[valid], ref[valid], rtol=0, atol=4 * float(ref_err) + 2e-2)


def test_prefill_chunk_none_is_dense_sdpa():
    ref_model = causal_lm("llama")
    ref_model.set_attn_implementation("sdpa")
    m = copy.deepcopy(ref_model)
    ids, am = _prompts()
    enable_tokenselect_attention(m, k=4, n_sink=2, n_local=2)       # tiny budget, prefill_chunk=None
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, attention_mask=am).logits,
                           ref_model(input_ids=ids, attention_mask=am).logits)
    st = tokenselect_stats(m)
    assert st["prefill_chunk"] is None and st["prefill_ms"] is None
    assert st["prefill_sparse_chunks"] == st["prefill_dense_chunks"] == 0


# ------------------------------------------------------------------------------ oracle
def _oracle_indices(q, K, valid, s, k, n_sink, n_local, score_scale):
    """TokenSelect's picks for one request's chunk: q (C, H_q, D), K (N, H_kv, D), valid (N,)
    bool, prefix [0, s). Returns the ascending positions."""
    G = q.shape[1] // K.shape[1]
    qm = q.double().mean(0)                                       # (H_q, D)
    keys = K[:s].double().repeat_interleave(G, dim=1)             # (s, H_q, D)
    logits = score_scale * torch.einsum("hd,nhd->hn", qm, keys)
    logits = logits.masked_fill(~valid[:s][None], float("-inf"))
    score = torch.softmax(logits, dim=1).nan_to_num(0.0).sum(0)   # (s,)
    pos = torch.arange(s)
    if s <= n_sink + k + n_local:
        picked = pos
    else:
        sink, local = pos[:n_sink], pos[s - n_local:]
        mid = pos[n_sink:s - n_local]
        cand = mid[valid[mid]]
        # highest score first, ties: the lowest index
        order = sorted(cand.tolist(), key=lambda i: (-float(score[i]), i))[:k]
        picked = torch.cat([sink, torch.tensor(sorted(order), dtype=torch.long), local])
    return picked[valid[picked]]


def _oracle_attend(q, K, V, keys, scale):
    """Exact attention of q (C, H_q, D) over K/V rows ``keys[c]`` (a list of index tensors)."""
    G = q.shape[1] // K.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for c, kk in enumerate(keys):
        Kc = K[kk].double().repeat_interleave(G, dim=1)            # (n, H_q, D)
        Vc = V[kk].double().repeat_interleave(G, dim=1)
        p = torch.softmax(scale * torch.einsum("hd,nhd->hn", q[c].double(), Kc), dim=1)
        out[c] = torch.einsum("hn,nhd->hd", p, Vc)
    return out


@pytest.mark.parametrize("impl", ["gather", "kernel"])
@pytest.mark.parametrize("layout", ["prompt", "cached-prefix", "static-tail"])
def test_sparse_chunks_match_oracle(monkeypatch, layout, impl):
    """One attention call of a real layer module (GQA 4/2, D 16), batch 2 with row 1
    left-padded: q_len 40 queries; ``cached-prefix``: 10 keys already cached before them (a
    later prefill call); ``static-tail``: 12 unfilled (masked) key slots after them."""
    mod = causal_lm("llama").model.layers[0].self_attn
    B, Hq, Hkv, D, Q, C = 2, 4, 2, 16, PROMPT, 8
    k, n_sink, n_local, score_scale = 6, 2, 4, 0.5
    prefix, tail = {"prompt": (0, 0), "cached-prefix": (10, 0), "static-tail": (0, 12)}[layout]
    end = prefix + Q
    N = end + tail
    g = torch.Generator().manual_seed(3)
    query = torch.randn(B, Hq, Q, D, generator=g)
    key = torch.randn(B, Hkv, N, D, generator=g)
    value = torch.randn(B, Hkv, N, D, generator=g)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[:, end:] = False
    valid[1, :PAD] = False
    qpos = prefix + torch.arange(Q)
    mask = (torch.arange(N)[None, :] <= qpos[:, None])[None, None] & valid[:, None, None, :]
    st = hts._TokenSelect(k=k, n_sink=n_sink, n_local=n_local, cache_threshold=0.9,
                          score_scale=score_scale, sparse_min_len=n_sink + k + n_local,
                          previous_impl=None, prefill_chunk=C, prefill_impl=impl)
    mod.__dict__[hts._ATTR] = st
    seen, kernel_calls = [], []
    real = kv_select.select

    def spy(q, k_cache, seq_lens, **kw):
        idx = real(q, k_cache, seq_lens, **kw)
        seen.append((int(seq_lens[0]), idx.clone()))
        return idx

    monkeypatch.setattr(kv_select, "select", spy)
    real_prefill = kv_select.sparse_prefill

    def spy_prefill(*a, **kw):
        kernel_calls.append(1)
        return real_prefill(*a, **kw)

    monkeypatch.setattr(kv_select, "sparse_prefill", spy_prefill)
    scale = D ** -0.5
    with torch.no_grad():
        out, _ = hts.tokenselect_attention_forward(mod, query, key, value, mask, scaling=scale)
    assert out.shape == (B, Q, Hq, D) and torch.isfinite(out).all()
    q_bchd = query.transpose(1, 2)
    K, V = key.transpose(1, 2), value.transpose(1, 2)             # (B, N, H_kv, D)
    budget = n_sink + k + n_local
    sparse_starts, want_attended = [], []
    for r0 in range(0, Q, C):
        s, e = prefix + r0, prefix + r0 + C
        v_chunk = valid[:, s:e]
        mixed = bool((v_chunk.any(1) & ~v_chunk.all(1)).any())
        sparse = s > budget and not mixed
        if sparse:
            sparse_starts.append(s)
            got_idx = dict(seen)[s]
            # the chunk's last row attends the picks plus the chunk
            want_attended.append([len(_oracle_indices(q_bchd[b, r0:r0 + C], K[b], valid[b], s, k, n_sink,
                                                      n_local, score_scale)) + C for b in range(B)])
        else:                                 # the valid keys up to the chunk's end
            want_attended.append(valid[:, :e].sum(1).tolist())
        for b in range(B):
            if not valid[b, e - 1]:
                continue                      # a padding-only chunk of this row
            if sparse:
                picks = _oracle_indices(q_bchd[b, r0:r0 + C], K[b], valid[b], s, k, n_sink, n_local,
                                        score_scale)
                got = got_idx[b][got_idx[b] >= 0].long()
                assert torch.equal(got, picks), (layout, s, b)
                keys = [torch.cat([picks, torch.arange(s, s + c + 1)]) for c in range(C)]
            else:                             # dense: every valid key up to the query
                keys = [torch.arange(s + c + 1)[valid[b, :s + c + 1]] for c in range(C)]
            want = _oracle_attend(q_bchd[b, r0:r0 + C], K[b], V[b], keys, scale)
            rows = valid[b, s:e]
            torch.testing.assert_close(out[b, r0:r0 + C][rows].double(), want[rows], rtol=1e-5, atol=1e-5)
    assert sorted(s for s, _ in seen) == sparse_starts and len(sparse_starts) >= 2
    assert len(kernel_calls) == (len(sparse_starts) if impl == "kernel" else 0)
    ls = st.stats[0]
    assert ls.prefill_sparse_chunks == len(sparse_starts)
    assert ls.prefill_dense_chunks == Q // C - len(sparse_starts)
    assert [a.tolist() for a in ls.prefill_attended] == want_attended
    assert want_attended[-1] == [budget + C, budget - n_sink + C]      # row 1's sink slots: padding


def test_static_tail_without_mask_is_top_left():
    """A StaticCache's first prefill without padding: HF passes no mask and max_cache_len keys
    (SDPA's top-left causal alignment); the tail is never attended."""
    mod = causal_lm("llama").model.layers[0].self_attn
    g = torch.Generator().manual_seed(5)
    Q, N, D = 24, 40, 16
    query = torch.randn(1, 4, Q, D, generator=g)
    key, value = torch.randn(1, 2, N, D, generator=g), torch.randn(1, 2, N, D, generator=g)
    st = hts._TokenSelect(k=64, n_sink=2, n_local=2, cache_threshold=0.9, score_scale=1.0,
                          sparse_min_len=0, previous_impl=None, prefill_chunk=8)
    mod.__dict__[hts._ATTR] = st
    with torch.no_grad():
        out, _ = hts.tokenselect_attention_forward(mod, query, key, value, None, scaling=D ** -0.5)
        ref = torch.nn.functional.scaled_dot_product_attention(
            query, key[:, :, :Q].repeat_interleave(2, 1), value[:, :, :Q].repeat_interleave(2, 1),
            is_causal=True).transpose(1, 2)
    assert st.stats[0].prefill_sparse_chunks == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ model level
@pytest.mark.parametrize("padded", [False, True], ids=["no-pad", "left-pad"])
def test_one_call_equals_chunk_by_chunk(padded):
    """The docstring's claim: one forward over the prompt == the prompt fed C tokens at a time
    through the model with a DynamicCache (each call then has one chunk, at the cache's offset)."""
    from transformers import DynamicCache

    from tokenkernels.integrations._hf_common import cache_of, forward_cache_name

    m = causal_lm("qwen2")
    C = 8
    enable_tokenselect_attention(m, k=6, n_sink=2, n_local=4, prefill_chunk=C)
    ids, am = _prompts(padded)
    with torch.no_grad():
        whole = m(input_ids=ids, attention_mask=am).logits
        n_sparse = tokenselect_stats(m)["prefill_sparse_chunks"]
        cache, parts = DynamicCache(config=m.config), []
        name = forward_cache_name(m.forward)
        for s in range(0, PROMPT, C):
            o = m(input_ids=ids[:, s:s + C], attention_mask=am[:, :s + C], use_cache=True, **{name: cache})
            cache = cache_of(o)
            parts.append(o.logits)
    assert n_sparse == LAYERS * 3      # chunks at 16, 24, 32 (prefix > budget 12); 8..15 mixed anyway
    valid = am.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[valid], whole[valid], rtol=1e-5, atol=1e-5)
    assert tokenselect_stats(m)["prefill_sparse_chunks"] == 2 * n_sparse


@pytest.mark.parametrize("cache_impl", ["dynamic", "static"])
def test_generate_sparse_prefill_end_to_end(cache_impl):
    ref_model = causal_lm("mistral")
    m = copy.deepcopy(ref_model)
    ids, am = _prompts()
    with torch.no_grad():
        ref = ref_model.generate(input_ids=ids, attention_mask=am, **_gen_kwargs(cache_impl))
        enable_tokenselect_attention(m, k=6, n_sink=2, n_local=4, prefill_chunk=8)
        out = m.generate(input_ids=ids, attention_mask=am, **_gen_kwargs(cache_impl))
    st = tokenselect_stats(m)
    assert out.sequences.shape == ref.sequences.shape == (2, PROMPT + NEW)
    logits = torch.stack(out.logits, 1)
    assert torch.isfinite(logits).all()
    # prefill: chunks at 16, 24, 32 sparse (8..15 has row 1's last padding: dense), 0 dense
    assert st["prefill_sparse_chunks"] == LAYERS * 3 and st["prefill_dense_chunks"] == LAYERS * 2
    assert st["prefill_ms"] > 0 and st["prefill_mean_attended"] > 0
    assert set(st["prefill_attended"]) == set(range(LAYERS))
    assert all(len(v) == PROMPT // 8 for v in st["prefill_attended"].values())
    assert st["sparse_steps"] == LAYERS * (NEW - 1)            # decode continues sparse
    assert not torch.allclose(logits[:, 0], torch.stack(ref.logits, 1)[:, 0])   # a sparse prefill


def test_stats_reset_and_bad_prefill_chunk():
    m = causal_lm("llama")
    ids, am = _prompts(padded=False)
    enable_tokenselect_attention(m, k=6, n_sink=2, n_local=4, prefill_chunk=8)
    with torch.no_grad():
        m(input_ids=ids, attention_mask=am)
    st = tokenselect_stats(m)
    # no padding: chunks at 0, 8 dense (prefix <= 12), 16, 24, 32 sparse
    assert (st["prefill_sparse_chunks"], st["prefill_dense_chunks"]) == (LAYERS * 3, LAYERS * 2)
    assert st["prefill_attended"] == {l: [[8, 8], [16, 16], [20, 20], [20, 20], [20, 20]] for l in range(LAYERS)}
    assert st["prefill_mean_attended"] == pytest.approx((8 + 16 + 3 * 20) / 5)
    assert st["prefill_chunk"] == 8 and st["prefill_ms"] > 0
    reset_tokenselect_stats(m)
    st = tokenselect_stats(m)
    assert st["prefill_sparse_chunks"] == st["prefill_dense_chunks"] == 0
    assert st["prefill_attended"] == {} and st["prefill_ms"] is None and st["prefill_mean_attended"] is None
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="enable_tokenselect_attention: prefill_chunk must be"):
            enable_tokenselect_attention(m, prefill_chunk=bad)
    with pytest.raises(ValueError, match="enable_tokenselect_attention: prefill_impl must be one of"):
        enable_tokenselect_attention(m, prefill_chunk=8, prefill_impl="flash")
