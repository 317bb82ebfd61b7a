"""TokenSelect attention ("tokenselect" in HF's AttentionInterface) on a tiny HF Llama (GQA 4/2):
with the budget >= the context, greedy generation equals SDPA's exactly (also when the sparse
kernels are forced to run); with a smaller budget generation runs, every sparse step attends
exactly the budget, and Selection Cache hits are counted."""
from __future__ import annotations

import copy

import pytest
import torch

import tokenkernels.kv_select as kv_select
from tokenkernels.integrations.transformers import (disable_tokenselect_attention,
                                                    enable_tokenselect_attention,
                                                    tokenselect_stats)

from .hf_models import causal_lm

PROMPT, NEW, LAYERS = 40, 8, 2


@pytest.fixture(scope="module")
def model():
    return causal_lm("llama")


def _prompts(batch: int, padded: bool):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, 512, (batch, PROMPT), generator=g)
    am = torch.ones_like(ids)
    if padded:
        am[1, :9] = 0
        ids[1, :9] = 0
    return ids, am


def _gen(m, ids, am):
    out = m.generate(input_ids=ids, attention_mask=am, max_new_tokens=NEW, do_sample=False,
                     return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("batch,padded", [(1, False), (2, False), (2, True)],
                         ids=["B1", "B2", "B2-leftpad"])
def test_full_budget_equals_sdpa(model, batch, padded):
    m = copy.deepcopy(model)
    m.set_attn_implementation("sdpa")
    ids, am = _prompts(batch, padded)
    with torch.no_grad():
        ref, ref_logits = _gen(m, ids, am)
        # budget >= context: decode dispatches to SDPA
        enable_tokenselect_attention(m, k=64, n_sink=4, n_local=8)
        assert m.config._attn_implementation == "tokenselect"
        seq, _ = _gen(m, ids, am)
        assert torch.equal(seq, ref)
        assert tokenselect_stats(m)["sparse_steps"] == 0
        # the sparse kernels forced on every decode step, selecting every token
        enable_tokenselect_attention(m, k=64, n_sink=4, n_local=8, sparse_min_len=0)
        seq, logits = _gen(m, ids, am)
    st = tokenselect_stats(m)
    assert st["sparse_steps"] == LAYERS * (NEW - 1)
    assert torch.equal(seq, ref)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # every valid token attended: the context at the last step, minus a row's padding
    ctx = PROMPT + NEW - 1
    want = [ctx - int((am[b] == 0).sum()) for b in range(batch)]
    assert all(v == want for v in st["last_attended"].values())


def test_small_budget_attends_the_budget(model):
    m = copy.deepcopy(model)
    ids, am = _prompts(2, False)
    with torch.no_grad():
        ref, ref_logits = _gen(m, ids, am)
        enable_tokenselect_attention(m, k=8, n_sink=4, n_local=8, cache_threshold=0.9)
        seq, logits = _gen(m, ids, am)
    st = tokenselect_stats(m)
    assert st["budget"] == 20 and st["sparse_steps"] == LAYERS * (NEW - 1)
    assert st["last_attended"] == {layer: [20, 20] for layer in range(LAYERS)}
    assert st["lookups"] == LAYERS * (NEW - 1) * 2 and 0 <= st["hits"] <= st["lookups"]
    assert seq.shape == ref.shape
    assert not torch.allclose(logits[:, 1:], ref_logits[:, 1:])   # really sparse
    assert torch.equal(logits[:, 0], ref_logits[:, 0])             # prefill is SDPA


@pytest.mark.parametrize("threshold", [-1.0, 1.5])
def test_selection_cache_hits_counted(model, threshold):
    """threshold -1: every step after a layer's first is a hit; > 1: never a hit."""
    m = copy.deepcopy(model)
    ids, am = _prompts(2, True)
    enable_tokenselect_attention(m, k=8, n_sink=4, n_local=8, cache_threshold=threshold)
    with torch.no_grad():
        _gen(m, ids, am)
    st = tokenselect_stats(m)
    lookups = LAYERS * (NEW - 1) * 2
    assert st["lookups"] == lookups
    assert st["hits"] == (lookups - LAYERS * 2 if threshold < 0 else 0)
    # the padded row attends the budget minus its sink slots that fell on padding
    assert all(v == [20, 20 - 4] for v in st["last_attended"].values())


def test_reads_hf_cache_in_place(model, monkeypatch):
    """sparse_decode gets a (B, N, H_kv, D) transposed view of HF's (B, H_kv, N, D) cache."""
    m = copy.deepcopy(model)
    seen = []
    real = kv_select.sparse_decode

    def spy(q, k_cache, v_cache, *a, **kw):
        seen.append((k_cache.shape, k_cache.stride(), k_cache.is_contiguous(), k_cache._base is not None))
        return real(q, k_cache, v_cache, *a, **kw)

    monkeypatch.setattr(kv_select, "sparse_decode", spy)
    ids, am = _prompts(1, False)
    enable_tokenselect_attention(m, k=8, n_sink=4, n_local=8)
    with torch.no_grad():
        _gen(m, ids, am)
    assert len(seen) == LAYERS * (NEW - 1)
    (B, N, H, D), stride, contiguous, is_view = seen[0]
    assert (B, N, H, D) == (1, PROMPT + 1, 2, 16)
    assert stride == (H * N * D, D, N * D, 1) and not contiguous and is_view


def test_disable_and_bad_args(model):
    from transformers import AttentionInterface

    m = copy.deepcopy(model)
    prev = m.config._attn_implementation
    enable_tokenselect_attention(m, k=8, n_sink=4, n_local=8)
    assert "tokenselect" in AttentionInterface._global_mapping
    disable_tokenselect_attention(m)
    assert m.config._attn_implementation == prev
    with pytest.raises(ValueError, match="tokenselect_stats"):
        tokenselect_stats(m)
    with pytest.raises(ValueError, match="k must"):
        enable_tokenselect_attention(m, k=-1)


@pytest.mark.parametrize("cache_impl", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["qwen3", "mistral-window", "gemma2"])
def test_other_models_full_budget(name, cache_impl):
    """Qwen3; Mistral with a 16-token sliding window (its mask restricts the sparse picks);
    Gemma 2 (attention-logit softcap: every step falls back to dense eager attention); HF's
    DynamicCache and StaticCache (whose unfilled slots are masked)."""
    m = causal_lm("mistral", sliding_window=16) if name == "mistral-window" else causal_lm(name)
    ids, am = _prompts(2, True)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)
    if cache_impl == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = m.generate(input_ids=ids, attention_mask=am, **kw)
        enable_tokenselect_attention(m, k=64, n_sink=4, n_local=8, sparse_min_len=0)
        out = m.generate(input_ids=ids, attention_mask=am, **kw)
    st = tokenselect_stats(m)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    if name == "gemma2":
        assert st["sparse_steps"] == 0 and st["dense_steps"] == LAYERS * (NEW - 1)
    else:
        assert st["sparse_steps"] == LAYERS * (NEW - 1)
        if name == "mistral-window":      # the window, not the budget, bounds what is attended
            assert all(v == [16, 16] for v in st["last_attended"].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_cuda_decode_steps_do_not_sync(masked):
    """The sparse decode path of the attention function (select through the layer's Selection
    Cache, or score + mask + topk with a padding mask, then sparse_decode) runs on CUDA without
    a host sync (set_sync_debug_mode("error")), as CUDA graphs need."""
    from tokenkernels.integrations import _hf_tokenselect as hts

    B, H_q, H_kv, N, D = 2, 8, 2, 200, 64
    mod = torch.nn.Module().eval()
    mod.layer_idx = 0
    st = hts._TokenSelect(k=16, n_sink=4, n_local=8, cache_threshold=0.9, score_scale=1.0,
                          sparse_min_len=0, previous_impl=None)
    setattr(mod, hts._ATTR, st)
    g = torch.Generator().manual_seed(0)
    key = torch.randn(B, H_kv, N, D, generator=g).cuda()
    value = torch.randn(B, H_kv, N, D, generator=g).cuda()
    mask = None
    if masked:   # SDPA's bool mask (True = attend); row 1 left-padded by 30 tokens
        m = torch.ones(B, 1, 1, N, dtype=torch.bool)
        m[1, ..., :30] = False
        mask = m.cuda()
    queries = [torch.randn(B, H_q, 1, D, generator=g).cuda() for _ in range(3)]
    out, _ = hts.tokenselect_attention_forward(mod, queries[0], key, value, mask, scaling=D ** -0.5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for q in queries[1:]:
            out, _ = hts.tokenselect_attention_forward(mod, q, key, value, mask, scaling=D ** -0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (B, 1, H_q, D) and torch.isfinite(out).all()
    assert st.stats[0].sparse_steps == 3
    assert st.stats[0].last_attended.tolist() == [28, 28 - 4 if masked else 28]


def test_cuda_limits_match_the_kernels():
    import re
    from pathlib import Path

    from tokenkernels.integrations import _hf_tokenselect as ts

    h = (Path(__file__).resolve().parents[2] / "csrc" / "include" / "tokenkernels" / "kv_select.h").read_text()
    assert int(re.search(r"kCudaMaxHeadDim = (\d+)", h).group(1)) == ts.CUDA_MAX_HEAD_DIM
    assert int(re.search(r"kCudaMaxGroup = (\d+)", h).group(1)) == ts.CUDA_MAX_GROUP


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_beyond_kernel_limits_falls_back_to_dense():
    # 34 query heads over 2 KV heads: a GQA group of 17 > the CUDA kernels' 16
    m = causal_lm("llama", num_attention_heads=34, num_key_value_heads=2, hidden_size=68,
                  head_dim=16).cuda()
    ids, am = _prompts(1, False)
    ids, am = ids.cuda(), am.cuda()
    ref, _ = _gen(m, ids, am)
    enable_tokenselect_attention(m, k=4, n_sink=2, n_local=2, sparse_min_len=0)
    out, _ = _gen(m, ids, am)
    st = tokenselect_stats(m)
    assert st["sparse_steps"] == 0 and st["dense_steps"] > 0
    assert torch.equal(out, ref)
