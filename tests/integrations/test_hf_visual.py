"""apply_visual_token_pruning on a tiny HF LLaVA: keep=1.0 is the unpruned model exactly; with
keep < 1 the language model receives exactly the kept image tokens per image, and generation
equals the unpatched model run on the hand-pruned prompt (DivPrune / MMTok picks)."""
from __future__ import annotations

import copy

import pytest
import torch

import tokenkernels as tk
from tokenkernels.integrations.transformers import (apply_visual_token_pruning,
                                                    remove_visual_token_pruning,
                                                    visual_pruning_stats)

from tokenkernels.integrations._hf_common import cache_of, forward_cache_name

from .hf_models import IMAGE_TOKEN, IMAGE_TOKENS, llava, llava_batch, llava_next, llava_next_batch

NEW = 5


@pytest.fixture(scope="module")
def model():
    return llava()


class _LMInputs:
    """Records what the language model receives (inputs_embeds, attention mask, position ids)."""

    def __init__(self, model):
        self.calls = []
        self.h = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    def close(self):
        self.h.remove()


def _gen(model, ids, am, pix, n=NEW, logits=False):
    out = model.generate(input_ids=ids, attention_mask=am, pixel_values=pix, max_new_tokens=n,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    return (out.sequences, torch.stack(out.logits, 1)) if logits else out.sequences


@pytest.mark.parametrize("method", ["kcenter", "coverage"])
def test_keep_all_is_identical(model, method):
    m = copy.deepcopy(model)
    ids, am, pix = llava_batch([2, 1])
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | (am == 0), -100)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am, pixel_values=pix, labels=labels)
    ref_gen = _gen(m, ids, am, pix)
    apply_visual_token_pruning(m, keep=1.0, method=method)
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=am, pixel_values=pix, labels=labels)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(_gen(m, ids, am, pix), ref_gen)
    assert visual_pruning_stats(m)["kept_per_image"] == [IMAGE_TOKENS] * 3


def _hand_pruned_generation(model, ids, am, feats, picks, n=NEW):
    """Unpatched model, one row at a time: the prompt's embeddings with only the picked image
    tokens, positions 0..len-1, then greedy decoding with the KV cache."""
    emb = model.get_input_embeddings()
    outs, img = [], 0
    for r in range(ids.shape[0]):
        row = ids[r][am[r] == 1]
        e = emb(row)
        keep = torch.ones(len(row), dtype=torch.bool)
        where = (row == IMAGE_TOKEN).nonzero().squeeze(1)
        start = 0
        while start < len(where):
            n_img = feats[img].shape[0]
            pos = where[start:start + n_img]
            start += n_img
            e[pos] = feats[img].to(e.dtype)
            drop = torch.ones(n_img, dtype=torch.bool)
            drop[picks[img]] = False
            keep[pos[drop]] = False
            img += 1
        e = e[keep][None]
        toks, logits = [], []
        out = model(inputs_embeds=e, use_cache=True)
        for _ in range(n):
            logits.append(out.logits[0, -1])
            t = out.logits[:, -1].argmax(-1)
            toks.append(int(t))
            out = model(input_ids=t[None], use_cache=True,
                        **{forward_cache_name(type(model).forward): cache_of(out)})
        outs.append((toks, torch.stack(logits)))
    return outs


@pytest.mark.parametrize("method", ["kcenter", "coverage"])
@pytest.mark.parametrize("counts", [(2, 1), (1, 3), (1,)], ids=["2+1", "1+3", "single"])
def test_pruned_generation(model, method, counts):
    m = copy.deepcopy(model)
    ids, am, pix = llava_batch(list(counts), seed=len(counts) + counts[0])
    keep = 0.25
    k = round(keep * IMAGE_TOKENS)
    apply_visual_token_pruning(m, keep=keep, method=method)
    rec = _LMInputs(m)
    with torch.no_grad():
        out, logits = _gen(m, ids, am, pix, logits=True)
    rec.close()
    st = visual_pruning_stats(m)
    assert st["kept_per_image"] == [k] * sum(counts)
    # the LM's prefill: per row, its text tokens plus exactly k tokens per image
    pre = rec.calls[0]
    text = ((ids != IMAGE_TOKEN) & (am == 1)).sum(1)
    per_row = torch.tensor([c * k for c in counts])
    lm_mask = pre["attention_mask"]
    if lm_mask is None:                      # generate drops an all-ones mask (no padding)
        assert len(counts) == 1
        lm_mask = torch.ones(pre["inputs_embeds"].shape[:2], dtype=torch.long)
    assert torch.equal(lm_mask.sum(1).cpu(), text + per_row)
    # rows keep their own padding and are left-padded to the longest pruned row
    dropped = torch.tensor([c * (IMAGE_TOKENS - k) for c in counts])
    assert pre["inputs_embeds"].shape[1] == int((ids.shape[1] - dropped).max()) == st["lm_prompt_len"]
    # decode steps run on the pruned cache: one new token, mask grows from the pruned prompt
    for step, c in enumerate(rec.calls[1:], 1):
        assert c["inputs_embeds"].shape[1] == 1
        if c["attention_mask"] is not None:
            assert c["attention_mask"].shape[1] == st["lm_prompt_len"] + step
    # the picks are DivPrune's / MMTok's, and the tokens equal the hand-pruned model's
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        feats = m2.model.get_image_features(pixel_values=pix, return_dict=True).pooler_output
        emb = m2.get_input_embeddings()
        picks, img = [], 0
        for r, c in enumerate(counts):
            for _ in range(c):
                f = feats[img]
                if method == "kcenter":
                    p = tk.kcenter(f, k, metric="cosine", start="isolated", sorted=True)
                else:
                    row = ids[r][(am[r] == 1) & (ids[r] != IMAGE_TOKEN)]
                    sim = tk.mmtok_similarity(emb(row), f)
                    p = tk.coverage_select(sim, k).sort().values
                picks.append(p)
                img += 1
        expect = _hand_pruned_generation(m2, ids, am, feats, picks)
    # (positions, mask and cache all enter the logits: a wrong position shift shows here)
    for r, (toks, lg) in enumerate(expect):
        assert out[r, ids.shape[1]:].tolist() == toks
        torch.testing.assert_close(logits[r], lg, rtol=1e-5, atol=1e-5)


def test_k_int_labels_and_remove(model):
    m = copy.deepcopy(model)
    ids, am, pix = llava_batch([1, 2])
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | (am == 0), -100)
    apply_visual_token_pruning(m, k=3)
    out = m(input_ids=ids, attention_mask=am, pixel_values=pix, labels=labels)
    st = visual_pruning_stats(m)
    assert st["kept_per_image"] == [3, 3, 3] and out.logits.shape[1] == st["lm_prompt_len"]
    assert torch.isfinite(out.loss)
    out.loss.backward()                     # trains through the pruned sequence
    assert m.model.multi_modal_projector.linear_1.weight.grad is not None
    apply_visual_token_pruning(m, k=100)    # capped at the image's token count
    with torch.no_grad():
        m(input_ids=ids, attention_mask=am, pixel_values=pix)
    assert visual_pruning_stats(m)["kept_per_image"] == [IMAGE_TOKENS] * 3
    remove_visual_token_pruning(m)
    assert "forward" not in m.__dict__


def test_bad_arguments(model):
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="keep"):
        apply_visual_token_pruning(m, keep=0.0)
    with pytest.raises(ValueError, match="method"):
        apply_visual_token_pruning(m, method="random")
    with pytest.raises(ValueError, match="k must"):
        apply_visual_token_pruning(m, k=0)
    from .hf_models import causal_lm
    with pytest.raises(ValueError, match="not supported"):
        apply_visual_token_pruning(causal_lm("llama"))
    apply_visual_token_pruning(m, keep=0.5)
    ids, am, pix = llava_batch([1, 1])
    with pytest.raises(ValueError, match="do not match"):
        m(input_ids=ids, attention_mask=am, pixel_values=pix[:1])


def test_llava_next_anyres():
    """LLaVA-NeXT: per-image token counts differ (anyres tiles + newline tokens); keep=1.0 is
    identical, keep=0.2 prunes each image to round(0.2 * N_i) and equals the hand-pruned model."""
    m = llava_next()
    ids, am, pix, sizes, Ns = llava_next_batch(m)
    kw = dict(image_sizes=sizes, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    with torch.no_grad():
        ref = m.generate(input_ids=ids, attention_mask=am, pixel_values=pix, **kw).sequences
        apply_visual_token_pruning(m, keep=1.0)
        assert torch.equal(m.generate(input_ids=ids, attention_mask=am, pixel_values=pix, **kw).sequences, ref)
        apply_visual_token_pruning(m, keep=0.2)
        out = m.generate(input_ids=ids, attention_mask=am, pixel_values=pix, **kw)
        ks = [round(0.2 * n) for n in Ns]
        assert visual_pruning_stats(m)["kept_per_image"] == ks
        remove_visual_token_pruning(m)
        feats = m.model.get_image_features(pixel_values=pix, image_sizes=sizes, return_dict=True).pooler_output
        picks = [tk.kcenter(f, k, sorted=True) for f, k in zip(feats, ks)]
        expect = _hand_pruned_generation(m, ids, am, feats, picks)
    logits = torch.stack(out.logits, 1)
    for r, (toks, lg) in enumerate(expect):
        assert out.sequences[r, ids.shape[1]:].tolist() == toks
        torch.testing.assert_close(logits[r], lg, rtol=1e-5, atol=1e-5)
