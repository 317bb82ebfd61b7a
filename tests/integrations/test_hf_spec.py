"""HF ``model.generate`` running ``tokenkernels.spec.generate``: ``custom_generate=speculative_generate``
and ``enable_speculative_decoding``. Greedy output equals HF's own greedy ``generate`` token for
token (tiny Llama and Qwen2 targets; drafts: a noisy copy of the target -- high but not total
acceptance -- and an unrelated 1-layer model), with eos inside the output, max_length, a
left-padded batch and a static cache; the generation config maps onto the loop (warp values,
HF's top_k=50 default); sampling is reproducible under ``torch.manual_seed`` (the loop draws from
the global RNG), top_k=1 sampling is greedy, and sampled tokens follow the target's warped
distribution (chi-square, SpecInfer and RSD); spec_stats agrees with the output; every option
the loop cannot honour raises a ValueError naming it. Public transformers API only (CI runs it
on both ends of the supported range)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

import tokenkernels.spec as spec
from tokenkernels.integrations.transformers import (disable_speculative_decoding,
                                                    enable_speculative_decoding, reset_spec_stats,
                                                    spec_stats, speculative_generate)

from .hf_models import causal_lm

PROMPT, NEW = 12, 24
MODELS = ("llama", "qwen2")


def _noisy(model, noise=0.1, seed=1):
    """A copy of ``model`` with Gaussian noise of ``noise`` x each tensor's std added."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return d


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    """(target, noisy draft, 1-layer random draft)"""
    tgt = causal_lm(request.param)
    return tgt, _noisy(tgt), causal_lm(request.param, seed=7, num_hidden_layers=1)


@pytest.fixture(scope="module")
def llama():
    tgt = causal_lm("llama")
    return tgt, _noisy(tgt)


def _ids(batch=1, seed=0, length=PROMPT):
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, **kw):
    return model.generate(ids, do_sample=False, pad_token_id=0, **kw)


def _spec(model, ids, **kw):
    return model.generate(ids, pad_token_id=0, custom_generate=speculative_generate, **kw)


class _ChainDrafter:
    """A deterministic 3-node chain (root, root, root) that records every DraftContext."""

    def __init__(self):
        self.contexts = []

    def reset(self, input_ids, attention_mask):
        self.contexts.clear()

    def draft(self, ctx):
        self.contexts.append(ctx)
        B = ctx.root.shape[0]
        tokens = ctx.root[:, None].expand(B, 3).clone()
        parents = torch.tensor([-1, 0, 1]).expand(B, 3).clone()
        return spec.DraftTree(tokens=tokens, parents=parents)

    def update(self, ctx, tree, result):
        pass


# ---------------------------------------------------------------- greedy == HF greedy

@pytest.mark.parametrize("draft_kind", ["noisy", "random"])
@pytest.mark.parametrize("tree", [None, spec.chain(4)], ids=["dynamic", "chain4"])
def test_greedy_equals_hf(pair, draft_kind, tree):
    tgt, noisy, rand = pair
    draft = noisy if draft_kind == "noisy" else rand
    ids = _ids()
    ref = _greedy(tgt, ids, max_new_tokens=NEW, eos_token_id=None)
    assert ref.shape == (1, PROMPT + NEW)
    out = _spec(tgt, ids, do_sample=False, max_new_tokens=NEW, eos_token_id=None, draft_model=draft,
                spec_tree=tree)
    assert torch.equal(out, ref)
    st = spec_stats(tgt)
    assert st["new_tokens"] == NEW and st["target_forwards"] == st["steps"] + 1
    depth = 5 if tree is None else 4
    if draft_kind == "noisy":     # high but not total acceptance
        assert 0.5 < st["mean_accepted"] < depth
        assert st["steps"] < NEW - 1
    else:
        assert st["mean_accepted"] < depth


def test_greedy_eos_inside_output(llama):
    tgt, draft = llama
    ids = _ids(seed=3)
    free = _greedy(tgt, ids, max_new_tokens=NEW, eos_token_id=None)[0, PROMPT:].tolist()
    # the first generated token that is new at index >= 6: it ends the output there
    k = next(i for i in range(6, NEW) if free[i] not in free[:i])
    eos = free[k]
    ref = _greedy(tgt, ids, max_new_tokens=NEW, eos_token_id=eos)
    out = _spec(tgt, ids, do_sample=False, max_new_tokens=NEW, eos_token_id=eos, draft_model=draft)
    assert ref.shape[1] == PROMPT + k + 1 and ref[0, -1] == eos
    assert torch.equal(out, ref)
    assert spec_stats(tgt)["new_tokens"] == k + 1
    # a batch where one row stops at eos: pad after it, as HF
    ids2 = torch.cat([ids, _ids(seed=4)])
    ref2 = _greedy(tgt, ids2, max_new_tokens=NEW, eos_token_id=eos)
    out2 = _spec(tgt, ids2, do_sample=False, max_new_tokens=NEW, eos_token_id=eos, draft_model=draft)
    assert torch.equal(out2, ref2)
    gen = out2[:, PROMPT:]
    real = sum(int((row == eos).nonzero()[0, 0]) + 1 if (row == eos).any() else len(row) for row in gen)
    assert spec_stats(tgt)["new_tokens"] == real


def test_greedy_max_length_and_static_cache(llama):
    tgt, draft = llama
    ids = _ids(seed=5)
    ref = _greedy(tgt, ids, max_length=PROMPT + 9, eos_token_id=None)
    out = _spec(tgt, ids, do_sample=False, max_length=PROMPT + 9, eos_token_id=None, draft_model=draft)
    assert ref.shape[1] == PROMPT + 9 and torch.equal(out, ref)
    res = _spec(tgt, ids, do_sample=False, max_new_tokens=9, eos_token_id=None, draft_model=draft,
                cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(res.sequences, ref)
    from transformers import DynamicCache, StaticCache

    cache = res["cache"] if "cache" in res else res["past_key_values"]
    assert isinstance(cache, StaticCache)
    res = _spec(tgt, ids, do_sample=False, max_new_tokens=9, eos_token_id=None, draft_model=draft,
                return_dict_in_generate=True)
    cache = res["cache"] if "cache" in res else res["past_key_values"]
    # HF's layout: every token but the last; its next-token logits continue the greedy output
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == PROMPT + 8
    with torch.no_grad():
        nxt = tgt(input_ids=res.sequences[:, -1:], position_ids=torch.tensor([[PROMPT + 8]]),
                  use_cache=True, **{"cache" if "cache" in res else "past_key_values": cache}).logits[0, -1]
    ref10 = _greedy(tgt, ids, max_new_tokens=10, eos_token_id=None)
    assert int(nxt.argmax()) == int(ref10[0, -1])


def test_greedy_left_padded_batch(pair):
    tgt, noisy, rand = pair
    ids = _ids(batch=3, seed=6)
    am = torch.ones_like(ids)
    am[1, :4] = 0
    am[2, :7] = 0
    ids = ids * am
    ref = _greedy(tgt, ids, attention_mask=am, max_new_tokens=16, eos_token_id=None)
    for draft in (noisy, rand):
        out = _spec(tgt, ids, attention_mask=am, do_sample=False, max_new_tokens=16, eos_token_id=None,
                    draft_model=draft)
        assert torch.equal(out, ref)
        assert spec_stats(tgt)["new_tokens"] == 3 * 16
        # the returned cache: HF's layout (cropped to every token but the last), or None when
        # rows that accepted fewer tokens left holes in the loop's cache
        res = _spec(tgt, ids, attention_mask=am, do_sample=False, max_new_tokens=16, eos_token_id=None,
                    draft_model=draft, return_dict_in_generate=True)
        direct = spec.generate(tgt, ids, attention_mask=am, draft=draft, max_new_tokens=16, eos_token_id=[])
        holes = not bool(direct.cache_valid[:, PROMPT:PROMPT + 15].all())
        cache = res["cache"] if "cache" in res else res.get("past_key_values")
        assert torch.equal(res.sequences, ref) and (cache is None) == holes
        if cache is not None:
            assert cache.get_seq_length() == PROMPT + 15


# ---------------------------------------------------------------- enable / disable

def test_enable_plain_generate_and_undo(llama):
    tgt, draft = llama
    m = causal_lm("llama")            # the target's weights, no statistics yet
    ids = _ids(seed=8)
    ref = _greedy(m, ids, max_new_tokens=NEW, eos_token_id=None)
    with pytest.raises(ValueError, match="spec_stats"):
        spec_stats(m)
    enable_speculative_decoding(m, draft)
    assert "generate" in m.__dict__ and "generate" not in tgt.__dict__
    out = _greedy(m, ids, max_new_tokens=NEW, eos_token_id=None)
    assert torch.equal(out, ref)
    st = spec_stats(m)
    assert st["calls"] == 1 and st["new_tokens"] == NEW and st["steps"] < NEW - 1
    # per-call options override the enabled ones
    out = _greedy(m, ids, max_new_tokens=NEW, eos_token_id=None, spec_tree=spec.chain(2))
    assert torch.equal(out, ref) and spec_stats(m)["tree_tokens"] == 3.0
    # explicit assistant_model= is HF's own assisted generation (the patch steps aside)
    out = _greedy(m, ids, max_new_tokens=NEW, eos_token_id=None, assistant_model=draft)
    assert torch.equal(out, ref) and spec_stats(m)["calls"] == 2
    with pytest.raises(ValueError, match="streamer"):
        _greedy(m, ids, max_new_tokens=4, streamer=_Streamer())
    disable_speculative_decoding(m)
    assert "generate" not in m.__dict__
    out = _greedy(m, ids, max_new_tokens=NEW, eos_token_id=None)
    assert torch.equal(out, ref) and spec_stats(m)["calls"] == 2     # HF's generate ran
    disable_speculative_decoding(m)                                   # a no-op now


def test_enable_keeps_an_instance_generate(llama):
    tgt, draft = llama
    m = causal_lm("llama")            # the target's weights, no statistics yet
    calls = []
    cls_generate = type(m).generate

    def own(*a, **k):
        calls.append(k.get("custom_generate"))
        return cls_generate(m, *a, **k)

    m.generate = own
    enable_speculative_decoding(m, draft)
    enable_speculative_decoding(m, draft, tree=spec.chain(3))       # re-enable: options replaced
    ids = _ids(seed=9)
    _greedy(m, ids, max_new_tokens=6)
    assert calls == [speculative_generate] and spec_stats(m)["tree_tokens"] == 4.0
    disable_speculative_decoding(m)
    assert m.generate is own


def test_enable_bad_arguments(llama):
    tgt, draft = llama
    m = causal_lm("llama")            # the target's weights, no statistics yet
    with pytest.raises(ValueError, match="enable_speculative_decoding: drafter"):
        enable_speculative_decoding(m, draft, drafter="ngram")
    with pytest.raises(ValueError, match='drafter="model" needs a draft'):
        enable_speculative_decoding(m, drafter="model")
    with pytest.raises(ValueError, match="enable_speculative_decoding: verify"):
        enable_speculative_decoding(m, draft, verify="greedy")
    with pytest.raises(TypeError, match="enable_speculative_decoding: drafter"):
        enable_speculative_decoding(m, drafter=object())
    with pytest.raises(TypeError, match="enable_speculative_decoding: draft"):
        enable_speculative_decoding(m, draft="small")
    assert "generate" not in m.__dict__
    with pytest.raises(ValueError, match="reset_spec_stats"):
        reset_spec_stats(m)


# ---------------------------------------------------------------- spec_stats

def test_spec_stats_totals_and_reset(llama):
    tgt, draft = llama
    m = causal_lm("llama")            # the target's weights, no statistics yet
    enable_speculative_decoding(m, draft)
    st0 = spec_stats(m)
    assert st0["calls"] == 0 and st0["new_tokens"] == 0 and st0["total"]["target_forwards"] == 0
    ids = _ids(batch=2, seed=10)
    _greedy(m, ids, max_new_tokens=10, eos_token_id=None)
    a = spec_stats(m)
    _greedy(m, ids[:1], max_new_tokens=7, eos_token_id=None)
    b = spec_stats(m)
    assert a["new_tokens"] == 20 and b["new_tokens"] == 7 and b["calls"] == 2
    t = b["total"]
    assert t["new_tokens"] == 27
    assert t["target_forwards"] == a["target_forwards"] + b["target_forwards"]
    assert t["steps"] == a["steps"] + b["steps"]
    assert t["tokens_per_forward"] == pytest.approx(27 / (2 * a["target_forwards"] + b["target_forwards"]))
    # mean accepted over both calls: every step emits accepted + 1 tokens per active row, the
    # prefill one (a row's last step may be cut by max_new_tokens, hence <=)
    row_steps_a = a["new_tokens"] / (a["mean_accepted"] + 1)
    assert row_steps_a <= 2 * a["steps"]
    assert min(a["mean_accepted"], b["mean_accepted"]) <= t["mean_accepted"] <= max(a["mean_accepted"],
                                                                                    b["mean_accepted"])
    reset_spec_stats(m)
    assert spec_stats(m)["calls"] == 0 and spec_stats(m)["total"]["new_tokens"] == 0


# ---------------------------------------------------------------- sampling

def test_sampling_config_maps_to_the_loop(llama):
    tgt, _ = llama
    ids = _ids(seed=11)
    d = _ChainDrafter()
    _spec(tgt, ids, do_sample=True, max_new_tokens=6, drafter=d)
    c = d.contexts[0]
    assert (c.verify, c.temperature, c.top_k, c.top_p) == ("specinfer", 1.0, 50, None)   # HF's default top_k
    _spec(tgt, ids, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6, drafter=d,
          verify="rsd")
    c = d.contexts[0]
    assert (c.verify, c.temperature, c.top_k, c.top_p) == ("rsd", 0.7, 20, 0.9)
    _spec(tgt, ids, generation_config=GenerationConfig(do_sample=True, top_k=0, top_p=0.8, max_new_tokens=6),
          drafter=d)
    c = d.contexts[0]
    assert (c.temperature, c.top_k, c.top_p) == (1.0, None, 0.8)
    _spec(tgt, ids, do_sample=False, temperature=0.5, max_new_tokens=6, drafter=d)
    assert d.contexts[0].verify == "greedy" and d.contexts[0].generator is None


def test_sampling_seeded_and_top_k_1_is_greedy(pair):
    tgt, noisy, _ = pair
    ids = _ids(seed=12)
    kw = dict(do_sample=True, temperature=1.3, max_new_tokens=16, eos_token_id=None, draft_model=noisy)
    torch.manual_seed(0)
    a = _spec(tgt, ids, **kw)
    torch.manual_seed(0)
    b = _spec(tgt, ids, **kw)
    torch.manual_seed(1)
    c = _spec(tgt, ids, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, PROMPT + 16) and bool(((a >= 0) & (a < 512)).all())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(_spec(tgt, ids, generator=g1, **kw), _spec(tgt, ids, generator=g2, **kw))
    ref = _greedy(tgt, ids, max_new_tokens=16, eos_token_id=None)
    out = _spec(tgt, ids, do_sample=True, top_k=1, max_new_tokens=16, eos_token_id=None, draft_model=noisy)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("verify", ["specinfer", "rsd"])
def test_sampling_matches_the_targets_distribution(verify):
    """The first two generated tokens of 1000 sampled rows (one batch of the same prompt) against
    the target's own warped joint distribution p(t1) p(t2 | t1), top_k=3, T=0.7 (t2 goes through
    the tree verification: accepted draft token or residual draw). A target with peaked logits
    (lm_head x 10) so that the warp matters; chi-square at p = 1e-6."""
    from ..tree.test_verify import chi2, chi2_crit

    tgt = causal_lm("llama")
    with torch.no_grad():
        tgt.lm_head.weight.mul_(10.0)
    draft = _noisy(tgt, 0.3)
    ids = _ids(seed=13, length=8)
    T, K, N = 0.7, 3, 1000
    with torch.no_grad():
        p0 = spec.sampling_probs(tgt(ids).logits[0, -1], T, K, None)
        first = p0.nonzero()[:, 0]
        p1 = spec.sampling_probs(tgt(torch.cat([ids.expand(len(first), -1), first[:, None]], 1)).logits[:, -1],
                                 T, K, None)
    joint = (p0[first][:, None] * p1).reshape(-1)                    # (|first| * V,) cells (a, b)
    torch.manual_seed(0)
    out = _spec(tgt, ids.expand(N, -1), do_sample=True, temperature=T, top_k=K, max_new_tokens=2,
                eos_token_id=None, draft_model=draft, verify=verify)
    t1, t2 = out[:, 8], out[:, 9]
    row = (t1[:, None] == first[None]).float().argmax(1)
    assert bool(torch.isin(t1, first).all())
    counts = torch.bincount(row * 512 + t2, minlength=joint.numel()).double()
    assert counts[joint == 0].sum() == 0                              # nothing outside the warp's support
    stat, df = chi2(counts[joint > 0], joint[joint > 0])
    assert df >= 4 and stat < chi2_crit(df), (stat, df)
    assert spec_stats(tgt)["mean_accepted"] > 0.2                      # the draft was used


# ---------------------------------------------------------------- unsupported options

class _Streamer(BaseStreamer):
    def put(self, value):
        pass

    def end(self):
        pass


class _Proc(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores


class _Stop(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


UNSUPPORTED = [
    pytest.param(dict(repetition_penalty=1.3), "repetition_penalty", id="repetition_penalty"),
    pytest.param(dict(min_new_tokens=5), "min_new_tokens", id="min_new_tokens"),
    pytest.param(dict(bad_words_ids=[[5]]), "bad_words_ids", id="bad_words_ids"),
    pytest.param(dict(no_repeat_ngram_size=2), "no_repeat_ngram_size", id="no_repeat_ngram_size"),
    pytest.param(dict(do_sample=True, min_p=0.1), "min_p", id="min_p"),
    pytest.param(dict(logits_processor=[_Proc()]), "_Proc", id="logits_processor"),
    pytest.param(dict(max_time=30.0), "max_time", id="max_time"),
    pytest.param(dict(stopping_criteria=[_Stop()]), "_Stop", id="stopping_criteria"),
    pytest.param(dict(streamer=_Streamer()), "streamer", id="streamer"),
    pytest.param(dict(num_beams=2), "num_beams", id="num_beams"),
    pytest.param(dict(do_sample=True, num_return_sequences=2), "num_return_sequences", id="num_return_sequences"),
    pytest.param(dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens", id="prompt_lookup"),
    pytest.param(dict(return_dict_in_generate=True, output_scores=True), "output_scores", id="output_scores"),
    pytest.param(dict(return_dict_in_generate=True, output_logits=True), "output_logits", id="output_logits"),
    pytest.param(dict(verify="fast"), "verify", id="verify"),
]


@pytest.mark.parametrize("kw,name", UNSUPPORTED)
def test_unsupported_options_raise(llama, kw, name):
    tgt, draft = llama
    with pytest.raises(ValueError, match=f"speculative_generate: .*{name}"):
        _spec(tgt, _ids(), max_new_tokens=8, draft_model=draft, **kw)


def test_unsupported_inputs_raise(llama):
    tgt, draft = llama
    ids = _ids()
    with pytest.raises(ValueError, match="speculative_generate: assistant_model"):
        _spec(tgt, ids, max_new_tokens=8, draft_model=draft, assistant_model=draft)
    with pytest.raises(ValueError, match="speculative_generate: .*inputs_embeds"):
        tgt.generate(inputs_embeds=tgt.get_input_embeddings()(ids), max_new_tokens=4, pad_token_id=0,
                     custom_generate=speculative_generate, draft_model=draft)
    from transformers import DynamicCache

    cache = DynamicCache(config=tgt.config)
    with torch.no_grad():
        tgt(input_ids=ids[:, :-1], use_cache=True, **{_cache_kw(tgt): cache})
    with pytest.raises(ValueError, match="speculative_generate: .*holding 11 tokens"):
        _spec(tgt, ids, max_new_tokens=4, draft_model=draft, **{_cache_kw(tgt): cache})


def test_encoder_decoder_raises():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   decoder_start_token_id=0)
    m = T5ForConditionalGeneration(cfg).eval()
    with pytest.raises(ValueError, match="speculative_generate: encoder-decoder"):
        m.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, custom_generate=speculative_generate)
    with pytest.raises(ValueError, match="enable_speculative_decoding: encoder-decoder"):
        enable_speculative_decoding(m, m)


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
