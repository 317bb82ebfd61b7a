"""tokenkernels.spec.generate: greedy equality with HF's generate (every tree shape, eos inside an
accepted path, max_new_tokens mid-path, left-padded batches, DynamicCache / StaticCache), the KV
cache after k steps against plain decoding, losslessness of sampling (both verify modes, with
the power to reject a lossy combination), custom drafters and bad inputs."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import tokenkernels.spec as spec
from tokenkernels.integrations._hf_common import forward_cache_name

from ..integrations.hf_models import causal_lm
from ..tree.test_verify import chi2, chi2_crit
from .models import noisy_copy, pair, prompt

DYNAMIC = dict(top_k=4, depth=4, total_tokens=16)
MEDUSA = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0, 0, 0)]
TREES = {"dynamic": DYNAMIC, "dynamic_default": None, "chain": spec.chain(4), "medusa": MEDUSA}


_ON = {}


def on(models, device):
    """The models moved to ``device`` (copies, cached per device)."""
    key = (id(models), device)
    if key not in _ON:
        _ON[key] = models if device == "cpu" else tuple(copy.deepcopy(m).to(device) for m in models)
    return _ON[key]


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(0)
    return pair("llama", 0.2)


def hf_greedy(model, ids, am, n, eos=None):
    return model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=n,
                          eos_token_id=eos, pad_token_id=0)


@pytest.mark.parametrize("tree", list(TREES), ids=list(TREES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_hf(llama_pair, tree, seed, device):
    tgt, dft = on(llama_pair, device)
    ids, am = (t.to(device) for t in prompt(1, 5 + 4 * seed, seed))
    ref = hf_greedy(tgt, ids, am, 30)
    out = spec.generate(tgt, ids, draft=dft, tree=TREES[tree], max_new_tokens=30)
    assert torch.equal(out.sequences, ref)
    st = out.stats
    assert st.target_forwards == st.steps + 1
    assert st.new_tokens == 30
    assert st.mean_accepted > 0.3          # the correlated draft is accepted (it would be ~0 if broken)
    assert st.fast_attention_calls > 0 and st.dense_attention_calls == 0     # batch 1: tree.attention


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral"])
def test_greedy_other_models(name):
    overrides = dict(sliding_window=None) if name == "mistral" else {}
    tgt, dft = pair(name, 0.2, **overrides)
    ids, am = prompt(1, 9, 3)
    ref = hf_greedy(tgt, ids, am, 24)
    out = spec.generate(tgt, ids, draft=dft, tree=DYNAMIC, max_new_tokens=24)
    assert torch.equal(out.sequences, ref)
    assert out.stats.mean_accepted > 0.3


def test_greedy_self_draft_accepts_whole_chain(llama_pair):
    tgt, _ = llama_pair
    ids, am = prompt(1, 8, 4)
    out = spec.generate(tgt, ids, draft=tgt, tree=spec.chain(5), max_new_tokens=36)
    assert torch.equal(out.sequences, hf_greedy(tgt, ids, am, 36))
    assert out.stats.steps == 6 and out.stats.mean_accepted == 5.0     # 1 (prefill) + 6 * (5 + 1)


@pytest.mark.parametrize("pos", [1, 3, 6, 10, 17])
def test_eos_inside_accepted_path(llama_pair, pos):
    """eos = the greedy token at generated position ``pos``: the output stops there as HF's does,
    also when eos was accepted in the middle of a path (tokens after it are dropped)."""
    tgt, dft = llama_pair
    ids, am = prompt(1, 10, 5)
    free = hf_greedy(tgt, ids, am, 30)[0, 10:]
    eos = int(free[pos])
    ref = hf_greedy(tgt, ids, am, 30, eos=eos)
    out = spec.generate(tgt, ids, draft=dft, tree=DYNAMIC, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    assert int(out.sequences[0, -1]) == eos


def test_eos_mid_path_is_exercised(llama_pair):
    """With the target as its own draft every chain is accepted whole, so an eos at generated
    position 3 lies inside the first step's accepted path (positions 1..6)."""
    tgt, _ = llama_pair
    ids, am = prompt(1, 10, 5)
    free = hf_greedy(tgt, ids, am, 12)[0, 10:]
    eos = int(free[3])
    if eos in free[:3].tolist():
        pytest.fail("test prompt: pick another position (eos occurs earlier)")
    out = spec.generate(tgt, ids, draft=tgt, tree=spec.chain(5), max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out.sequences, hf_greedy(tgt, ids, am, 12, eos=eos))
    assert out.stats.steps == 1 and out.stats.accept_lengths == [[5]]
    assert out.sequences.shape[1] == 10 + 4


@pytest.mark.parametrize("n", [1, 2, 5, 7, 13])
def test_max_new_tokens_mid_path(llama_pair, n):
    tgt, _ = llama_pair
    ids, am = prompt(1, 6, 6)
    out = spec.generate(tgt, ids, draft=tgt, tree=spec.chain(5), max_new_tokens=n, eos_token_id=[])
    assert torch.equal(out.sequences, hf_greedy(tgt, ids, am, n, eos=None))
    assert out.stats.new_tokens == n


@pytest.mark.parametrize("tree", ["dynamic", "chain"])
def test_left_padded_batch(llama_pair, tree, device):
    tgt, dft = on(llama_pair, device)
    ids, am = (t.to(device) for t in prompt(4, 11, 7, pad_left=(0, 3, 7, 1)))
    ref = hf_greedy(tgt, ids, am, 20)
    out = spec.generate(tgt, ids, attention_mask=am, draft=dft, tree=TREES[tree], max_new_tokens=20)
    assert torch.equal(out.sequences, ref)
    lens = [[a for a in step if a >= 0] for step in out.stats.accept_lengths]
    assert any(len(set(s)) > 1 for s in lens)          # rows accepted different lengths
    assert out.stats.dense_attention_calls > 0          # padding / holes: the 4-D mask path


def test_batch_rows_finish_at_different_steps(llama_pair):
    tgt, dft = llama_pair
    ids, am = prompt(3, 8, 8, pad_left=(2, 0, 0))
    free = hf_greedy(tgt, ids, am, 20)[:, 8:]
    eos = int(free[1, 4])
    ref = hf_greedy(tgt, ids, am, 20, eos=eos)
    out = spec.generate(tgt, ids, attention_mask=am, draft=dft, tree=DYNAMIC, max_new_tokens=20,
                        eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    assert any(-1 in step for step in out.stats.accept_lengths)       # a row finished before the others


@pytest.mark.parametrize("batch", [False, True])
def test_static_cache_equals_dynamic(llama_pair, batch, device):
    tgt, dft = on(llama_pair, device)
    ids, am = (t.to(device) for t in prompt(3 if batch else 1, 9, 9, pad_left=(0, 4, 2) if batch else ()))
    a = spec.generate(tgt, ids, attention_mask=am, draft=dft, tree=DYNAMIC, max_new_tokens=18, cache="dynamic")
    b = spec.generate(tgt, ids, attention_mask=am, draft=dft, tree=DYNAMIC, max_new_tokens=18, cache="static")
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.sequences, hf_greedy(tgt, ids, am, 18))
    from transformers import StaticCache

    assert isinstance(b.cache, StaticCache)


def _layer_kv(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("batch", [False, True])
def test_cache_equals_plain_decoding(llama_pair, batch, device):
    """After k steps the committed KV (every valid slot) equals the KV plain decoding of the same
    tokens gives: HF's forward over the prompt + every emitted token but the last."""
    from transformers import DynamicCache

    tgt, dft = on(llama_pair, device)
    pad = (0, 3, 5) if batch else ()
    ids, am = (t.to(device) for t in prompt(len(pad) or 1, 10, 10, pad_left=pad))
    out = spec.generate(tgt, ids, attention_mask=am, draft=dft, tree=DYNAMIC, max_new_tokens=16, eos_token_id=[])
    seq = out.sequences[:, :-1]
    full_am = torch.cat([am, torch.ones(seq.shape[0], seq.shape[1] - am.shape[1], dtype=am.dtype, device=device)], 1)
    plain = DynamicCache(config=tgt.config)
    pos = (full_am.cumsum(-1) - 1).masked_fill(full_am == 0, 1)
    with torch.no_grad():
        tgt(input_ids=seq, attention_mask=full_am, position_ids=pos, use_cache=True,
            **{forward_cache_name(type(tgt).forward): plain})
    valid = out.cache_valid
    for b in range(seq.shape[0]):
        assert int(valid[b].sum()) == int(full_am[b].sum())
    for (k1, v1), (k2, v2) in zip(_layer_kv(out.cache), _layer_kv(plain)):
        for b in range(seq.shape[0]):
            real = full_am[b].bool()
            torch.testing.assert_close(k1[b][:, valid[b]], k2[b][:, real], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v1[b][:, valid[b]], v2[b][:, real], rtol=1e-5, atol=1e-5)
    if batch:
        assert not bool(valid[:, am.shape[1]:].all())      # the batch left unused (masked) slots


# ------------------------------------------------------------------ losslessness
SMALL_V = 16
N_SAMPLES = 3000
WARP = dict(temperature=0.7, top_k=8, top_p=0.9)


@pytest.fixture(scope="module")
def small_pair():
    t = causal_lm("llama", seed=3, vocab_size=SMALL_V)
    with torch.no_grad():          # sharper distributions than the init's near-uniform ones
        t.lm_head.weight.mul_(3.0)
    return t, noisy_copy(t, 0.6, seed=4)


def _exact(tgt, ids):
    dev = ids.device
    """Exact joint of the first two generated tokens (V, V) and marginal of the third (V,) under
    WARP, from forwards over every continuation."""
    V = SMALL_V
    with torch.no_grad():
        p1 = spec.sampling_probs(tgt(ids).logits[0, -1].double(), **WARP).double()
        c1 = torch.cat([ids.expand(V, -1), torch.arange(V, device=dev)[:, None]], 1)
        p2 = spec.sampling_probs(tgt(c1).logits[:, -1], **WARP).double()                 # (V, V)
        c2 = torch.cat([c1.repeat_interleave(V, 0), torch.arange(V, device=dev).repeat(V)[:, None]], 1)
        p3 = spec.sampling_probs(tgt(c2).logits[:, -1], **WARP).double().reshape(V, V, V)
    joint = p1[:, None] * p2
    return joint.cpu(), (joint[:, :, None] * p3).sum((0, 1)).cpu()


class _Lossy:
    """Draft children without replacement (RSD's drafting) but verify them with SpecInfer's
    rule: a lossy combination the test must reject."""

    def __init__(self, inner):
        self.inner = inner

    def reset(self, *a):
        self.inner.reset(*a)

    def draft(self, ctx):
        return self.inner.draft(dataclasses.replace(ctx, verify="rsd"))

    def update(self, ctx, tree, result):
        self.inner.update(dataclasses.replace(ctx, verify="rsd"), tree, result)

    def max_nodes(self, verify):
        return self.inner.max_nodes(verify)


def _sample_counts(tgt, dft, ids, verify, drafter=None, tree=None, seed=0):
    V = SMALL_V
    B = N_SAMPLES
    g = torch.Generator(device=ids.device).manual_seed(seed)
    torch.manual_seed(seed)
    dr = drafter if drafter is not None else spec.ModelDrafter(dft, **(tree or dict(top_k=4, depth=3)))
    out = spec.generate(tgt, ids.expand(B, -1).contiguous(), drafter=dr, max_new_tokens=3, verify=verify,
                        generator=g, eos_token_id=[], **WARP)
    gen = out.sequences[:, ids.shape[1]:].cpu()
    joint = torch.bincount(gen[:, 0] * V + gen[:, 1], minlength=V * V).reshape(V, V)
    return joint, torch.bincount(gen[:, 2], minlength=V), out.stats


@pytest.mark.parametrize("verify", ["specinfer", "rsd"])
def test_sampling_lossless(small_pair, verify, device):
    tgt, dft = on(small_pair, device)
    ids = prompt(1, 6, 11, vocab=SMALL_V)[0].to(device)
    pj, p3 = _exact(tgt, ids)
    joint, c3, st = _sample_counts(tgt, dft, ids, verify)
    assert st.mean_accepted > 0.5                    # verification really accepts drafted tokens
    s, df = chi2(joint.reshape(-1), pj.reshape(-1))
    assert s < chi2_crit(df), (s, df)
    s3, df3 = chi2(c3, p3)
    assert s3 < chi2_crit(df3), (s3, df3)


def test_sampling_static_template_lossless(small_pair):
    tgt, dft = small_pair
    ids, _ = prompt(1, 6, 12, vocab=SMALL_V)
    pj, p3 = _exact(tgt, ids)
    dr = spec.ModelDrafter(dft, tree=[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    joint, c3, _ = _sample_counts(tgt, dft, ids, "rsd", drafter=dr, seed=1)
    s, df = chi2(joint.reshape(-1), pj.reshape(-1))
    assert s < chi2_crit(df), (s, df)


def test_sampling_power_against_lossy_rule(small_pair):
    """The same test rejects SpecInfer's rule on siblings drawn without replacement."""
    tgt, dft = small_pair
    ids, _ = prompt(1, 6, 11, vocab=SMALL_V)
    pj, _ = _exact(tgt, ids)
    lossy = _Lossy(spec.ModelDrafter(dft, tree=[(0,), (1,), (2,), (3,), (4,), (5,)]))
    joint, _, _ = _sample_counts(tgt, dft, ids, "specinfer", drafter=lossy)
    s, df = chi2(joint.reshape(-1), pj.reshape(-1))
    assert s > chi2_crit(df), (s, df)


def test_sampling_seeded_reproducible(small_pair):
    tgt, dft = small_pair
    ids, _ = prompt(1, 6, 13, vocab=SMALL_V)
    runs = [spec.generate(tgt, ids, draft=dft, max_new_tokens=12, temperature=0.8, verify="rsd",
                          generator=torch.Generator().manual_seed(5)).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------ custom drafters
class OracleChain:
    """A user drafter: the target's own greedy continuation as a chain (always accepted)."""

    def __init__(self, target, k):
        self.target, self.k = target, k

    def reset(self, input_ids, attention_mask):
        pass

    def draft(self, ctx):
        toks = [ctx.row(0)]
        with torch.no_grad():
            for _ in range(self.k):
                toks.append(self.target(toks[-1][None] if len(toks) == 1 else torch.cat(toks)[None]
                                        ).logits[0, -1].argmax()[None])
        chain_tok = torch.cat([ctx.root] + toks[1:])[None]
        parents = torch.arange(-1, self.k)[None]
        return spec.DraftTree(tokens=chain_tok, parents=parents)

    def update(self, ctx, tree, result):
        self.last = result


def test_custom_drafter(llama_pair):
    tgt, _ = llama_pair
    ids, am = prompt(1, 7, 14)
    d = OracleChain(tgt, 3)
    assert isinstance(d, spec.Drafter)
    out = spec.generate(tgt, ids, drafter=d, max_new_tokens=13, eos_token_id=[])
    assert torch.equal(out.sequences, hf_greedy(tgt, ids, am, 13))
    assert out.stats.mean_accepted == 3.0


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs(llama_pair):
    tgt, dft = llama_pair
    ids, _ = prompt(1, 5, 15)
    with pytest.raises(ValueError, match=r"tokenkernels.spec.generate: drafter=\"model\" needs a draft model"):
        spec.generate(tgt, ids, drafter="model")
    other = causal_lm("llama", seed=1, vocab_size=300)
    with pytest.raises(ValueError, match=r"draft model's vocabulary \(300\) differs from the target's \(512\)"):
        spec.generate(tgt, ids, draft=other)
    with pytest.raises(ValueError, match=r"verify must be"):
        spec.generate(tgt, ids, draft=dft, verify="medusa")
    with pytest.raises(ValueError, match=r"tokenkernels.spec.generate: max_new_tokens must be >= 1"):
        spec.generate(tgt, ids, draft=dft, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, L\) int64 tensor"):
        spec.generate(tgt, ids[0], draft=dft)
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape"):
        spec.generate(tgt, ids, draft=dft, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"drafter must be"):
        spec.generate(tgt, ids, drafter="medusa")
    with pytest.raises(TypeError, match=r"reset/draft/update"):
        spec.generate(tgt, ids, drafter=object())
    with pytest.raises(ValueError, match=r"temperature must be a number >= 0"):
        spec.generate(tgt, ids, draft=dft, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        spec.generate(tgt, ids, draft=dft, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"bad tree template"):
        spec.generate(tgt, ids, draft=dft, tree=[(0, 0)])
    with pytest.raises(ValueError, match=r"cache must be"):
        spec.generate(tgt, ids, draft=dft, cache="paged")


def test_tree_larger_than_positions():
    tgt = causal_lm("llama", seed=0, max_position_embeddings=32)
    ids, _ = prompt(1, 5, 16)
    with pytest.raises(ValueError, match=r"the drafter's tree has up to 41 nodes, more than max_tree_tokens=32"):
        spec.generate(tgt, ids, draft=tgt, tree=dict(top_k=8, depth=5, total_tokens=48))   # 1 + 5 * 8 nodes
    with pytest.raises(ValueError, match=r"max_tree_tokens=64 is larger than the target's max_position_embeddings=32"):
        spec.generate(tgt, ids, draft=tgt, max_tree_tokens=64)


def test_drafter_returning_a_bad_tree(llama_pair):
    tgt, _ = llama_pair
    ids, _ = prompt(1, 5, 17)

    class WrongRoot(OracleChain):
        def draft(self, ctx):
            t = super().draft(ctx)
            t.tokens[0, 0] += 1
            return t

    with pytest.raises(ValueError, match=r"root token \(ctx.root\) at node 0"):
        spec.generate(tgt, ids, drafter=WrongRoot(tgt, 2), max_new_tokens=4)

    class TooBig(OracleChain):
        def draft(self, ctx):
            return spec.DraftTree(tokens=ctx.root.repeat(1, 40), parents=torch.arange(-1, 39)[None])

    with pytest.raises(ValueError, match=r"has 40 nodes, more than max_tree_tokens=16"):
        spec.generate(tgt, ids, drafter=TooBig(tgt, 2), max_new_tokens=4, max_tree_tokens=16)


def test_sliding_window_model_is_refused():
    tgt = causal_lm("mistral", seed=0, sliding_window=4)
    ids, _ = prompt(1, 5, 18)
    with pytest.raises(ValueError, match=r"sliding-window"):
        spec.generate(tgt, ids, draft=tgt, max_new_tokens=4)


# ------------------------------------------------------------------ model-free drafters
def _repetitive(B, seed, pad_left=()):
    """Prompts that repeat an 8-token phrase (lookup / recycling have matches to use)."""
    ids, am = prompt(B, 8, seed)
    ids = ids.repeat(1, 3)
    am = torch.cat([am, torch.ones(B, 16, dtype=am.dtype)], 1)
    for b, p in enumerate(pad_left):
        am[b, :p] = 0
    return ids * am, am


@pytest.mark.parametrize("drafter", ["recycling", "lookup"])
@pytest.mark.parametrize("B", [1, 3])
def test_model_free_drafters_greedy(llama_pair, drafter, B, device):
    tgt, _ = on(llama_pair, device)
    ids, am = (t.to(device) for t in _repetitive(B, 20 + B, pad_left=(0, 5, 2)[:B] if B > 1 else ()))
    ref = hf_greedy(tgt, ids, am, 32)
    out = spec.generate(tgt, ids, attention_mask=am, drafter=drafter, max_new_tokens=32)
    assert torch.equal(out.sequences, ref)
    assert out.stats.mean_accepted > 0.2           # the (cyclic) continuation is found and accepted


@pytest.mark.parametrize("drafter", ["recycling", "lookup"])
def test_model_free_drafters_sampling_lossless(small_pair, drafter):
    tgt, _ = small_pair
    ids = prompt(1, 6, 11, vocab=SMALL_V)[0]
    pj, p3 = _exact(tgt, ids)
    dr = spec.RecyclingDrafter(SMALL_V, k=4) if drafter == "recycling" else spec.LookupDrafter(max_ngram=2)
    joint, c3, st = _sample_counts(tgt, None, ids, "specinfer", drafter=dr)
    assert st.mean_accepted > 0.01                 # some drafted tokens are accepted (not only bonuses)
    s, df = chi2(joint.reshape(-1), pj.reshape(-1))
    assert s < chi2_crit(df), (s, df)
    s3, df3 = chi2(c3, p3)
    assert s3 < chi2_crit(df3), (s3, df3)
