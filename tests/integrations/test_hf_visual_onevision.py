"""apply_visual_token_pruning on a tiny HF LLaVA-OneVision (images with anyres packing and
newline tokens, video with pooled frames and a trailing newline) and LLaVA-NeXT-Video (the same
images, pooled video frames without a newline), batch 2 with left padding.

keep=1.0 is the unpatched model exactly; keep<1 equals the unpatched model run row by row on
the hand-pruned inputs_embeds (the model's own features, the kept indices from tk.kcenter /
tk.coverage_select called directly, every newline kept, positions 0..n-1), prefill logits and
greedy decode steps."""
from __future__ import annotations

import copy

import pytest
import torch

import tokenkernels as tk
from tokenkernels.integrations._hf_common import cache_of, forward_cache_name
from tokenkernels.integrations.transformers import (apply_visual_token_pruning,
                                                    remove_visual_token_pruning,
                                                    visual_pruning_stats)

from .hf_models import (IMAGE_TOKEN, OV_TILE, VIDEO_TOKEN, llava_next_video, llava_onevision,
                        onevision_batch)

NEW = 4
FRAMES = 3
GRID = OV_TILE // 8                  # patches per tile side
POOLED = ((GRID + 1) // 2) ** 2      # tokens per pooled video frame
BASE = GRID * GRID                   # tokens of the base tile

MIXED = [["image", "video"], ["video"]]         # images and video in one batch
IMAGES = [["image"], ["image", "image"]]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_BUILD = {"llava_onevision": llava_onevision, "llava_next_video": llava_next_video}
_MODELS = {}
OV, NV = "llava_onevision", "llava_next_video"


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = _BUILD[family]()
    return _MODELS[family]


def _video_newline(m):
    return m.config.model_type == OV


def _gen(m, inp, n=NEW):
    out = m.generate(**inp, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                     output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family,rows,bni", [
    (OV, MIXED, False), (OV, IMAGES, False), (OV, IMAGES, True), (NV, MIXED, False),
    (NV, IMAGES, False)], ids=["ov-image+video", "ov-images", "ov-images-batch_num_images",
                               "nv-image+video", "nv-images"])
@pytest.mark.parametrize("method", ["kcenter", "coverage"])
def test_keep_all_is_identical(family, rows, bni, method):
    m = copy.deepcopy(_model(family))
    inp, img_n, vid_n = onevision_batch(m, rows, frames=FRAMES, batch_num_images=bni)
    ids, am = inp["input_ids"], inp["attention_mask"]
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN) | (am == 0), -100)
    with torch.no_grad():
        ref = m(**inp, labels=labels)
        ref_seq, ref_lg = _gen(m, inp)
        apply_visual_token_pruning(m, keep=1.0, method=method, video_budget="clip")
        out = m(**inp, labels=labels)
        seq, lg = _gen(m, inp)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(seq, ref_seq) and torch.equal(lg, ref_lg)
    st = visual_pruning_stats(m)
    assert st["tokens_per_image"] == st["kept_per_image"] == img_n
    assert st["tokens_per_video"] == st["kept_per_video"] == vid_n
    assert st["lm_prompt_len"] == ids.shape[1]


# ---- the oracle: hand-pruned inputs for the unpatched model --------------------------------

def _features(m, inp):
    """The model's own image blocks and video blocks (video: frames x POOLED, then one newline
    for OneVision)."""
    nl = m.model.image_newline
    imgs, vids = [], []
    if "pixel_values" in inp:
        kw = {"batch_num_images": inp["batch_num_images"]} if "batch_num_images" in inp else {}
        imgs = list(m.model.get_image_features(inp["pixel_values"], inp["image_sizes"],
                                               return_dict=True, **kw).pooler_output)
    if "pixel_values_videos" in inp:
        v = m.model.get_video_features(inp["pixel_values_videos"], return_dict=True).pooler_output
        vids = [f.reshape(-1, f.shape[-1]) for f in v]   # NeXT-Video 5.17: (frames, P, D) each
        if _video_newline(m):
            if vids[0].shape[0] == FRAMES * POOLED:      # transformers 5.17: appended later
                vids = [torch.cat([f, nl[None]]) for f in vids]
            assert all(f.shape[0] == FRAMES * POOLED + 1 for f in vids)
        else:
            assert all(f.shape[0] == FRAMES * POOLED for f in vids)
    return imgs, vids


def _image_newlines(size, tiled):
    """Newline indices in an image block, from the anyres layout: the base tile, then H rows of
    W tokens + newline (tile-aligned sizes: nothing unpadded, nothing interpolated); a single
    tile ends with one newline."""
    if not tiled:
        return [BASE]
    H, W = int(size[0]) // 8, int(size[1]) // 8
    return [BASE + r * (W + 1) + W for r in range(H)]


def _k(n, keep=None, k=None):
    return max(1, min(n, k if k is not None else round(keep * n)))


def _pick(method, f, k, text):
    if method == "kcenter":
        return tk.kcenter(f, k, metric="cosine", start="isolated", sorted=True)
    sim = tk.mmtok_similarity(text, f)
    return tk.coverage_select(sim, k).sort().values


def _hand_pruned(m, inp, rows, method, budget, keep=None, k=None):
    """Per row: the pruned inputs_embeds (1, n, D), and the per-item kept counts."""
    ids, am = inp["input_ids"], inp["attention_mask"]
    emb = m.get_input_embeddings()
    imgs, vids = _features(m, inp)
    nl = m.model.image_newline
    bni = inp.get("batch_num_images")
    tiled = [True] * len(imgs) if bni is None else [int(n) == 1 for n in bni for _ in range(int(n))]
    out, kept_img, kept_vid, i_img, i_vid = [], [], [], 0, 0
    for r, items in enumerate(rows):
        row = ids[r][am[r] == 1]
        e = emb(row)
        text = e[(row != IMAGE_TOKEN) & (row != VIDEO_TOKEN)]
        keep_tok = torch.ones(len(row), dtype=torch.bool)
        where = {IMAGE_TOKEN: (row == IMAGE_TOKEN).nonzero().squeeze(1).tolist(),
                 VIDEO_TOKEN: (row == VIDEO_TOKEN).nonzero().squeeze(1).tolist()}
        used = {IMAGE_TOKEN: 0, VIDEO_TOKEN: 0}
        for it in items:
            if it == "image":
                f = imgs[i_img]
                nls = _image_newlines(inp["image_sizes"][i_img], tiled[i_img])
                assert all(torch.equal(f[j], nl) for j in nls)
                sel = torch.tensor([j for j in range(f.shape[0]) if j not in nls])
                segs = [sel]
                tok = IMAGE_TOKEN
                i_img += 1
            else:
                f = vids[i_vid]
                nls = [f.shape[0] - 1] if _video_newline(m) else []
                assert all(torch.equal(f[j], nl) for j in nls)
                if budget == "frame":
                    segs = [torch.arange(s, s + POOLED) for s in range(0, FRAMES * POOLED, POOLED)]
                else:
                    segs = [torch.arange(FRAMES * POOLED)]
                tok = VIDEO_TOKEN
                i_vid += 1
            km = torch.zeros(f.shape[0], dtype=torch.bool)
            km[nls] = True
            for s in segs:
                km[s[_pick(method, f[s], _k(len(s), keep, k), text)]] = True
            pos = torch.tensor(where[tok][used[tok]:used[tok] + f.shape[0]])
            used[tok] += f.shape[0]
            e[pos] = f
            keep_tok[pos[~km]] = False
            (kept_img if it == "image" else kept_vid).append(int(km.sum()))
        out.append(e[keep_tok][None])
    return out, kept_img, kept_vid


def _decode(m, e, n=NEW):
    toks, logits = [], []
    out = m(inputs_embeds=e, use_cache=True)
    prefill = out.logits[0]
    for _ in range(n):
        logits.append(out.logits[0, -1])
        t = out.logits[:, -1].argmax(-1)
        toks.append(int(t))
        out = m(input_ids=t[None], use_cache=True,
                **{forward_cache_name(type(m).forward): cache_of(out)})
    return prefill, toks, torch.stack(logits)


class _LMInputs:
    def __init__(self, m):
        self.calls = []
        self.h = m.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    def close(self):
        self.h.remove()


@pytest.mark.parametrize("family,method,budget,rows,bni", [
    (OV, "kcenter", "frame", MIXED, False), (OV, "kcenter", "clip", MIXED, False),
    (OV, "coverage", "frame", MIXED, False), (OV, "coverage", "clip", MIXED, False),
    (OV, "kcenter", "frame", IMAGES, True), (OV, "coverage", "frame", IMAGES, False),
    (OV, "kcenter", "clip", [["video"], []], False),            # a row without media
    (NV, "kcenter", "frame", MIXED, False), (NV, "coverage", "clip", MIXED, False)])
def test_pruned_equals_hand_pruned(family, method, budget, rows, bni):
    keep = 0.3
    model = _model(family)
    m = copy.deepcopy(model)
    inp, img_n, vid_n = onevision_batch(m, rows, frames=FRAMES, batch_num_images=bni, seed=3)
    with torch.no_grad():
        expect, kept_img, kept_vid = _hand_pruned(model, inp, rows, method, budget, keep=keep)
        oracle = [_decode(model, e) for e in expect]
        apply_visual_token_pruning(m, keep=keep, method=method, video_budget=budget)
        pre = m(**inp)
        st = visual_pruning_stats(m)
        rec = _LMInputs(m)
        seq, lg = _gen(m, inp)
        rec.close()
    assert st["tokens_per_image"] == img_n and st["tokens_per_video"] == vid_n
    assert st["kept_per_image"] == kept_img and st["kept_per_video"] == kept_vid
    lens = [e.shape[1] for e in expect]
    # rows keep their own left padding (as LLaVA's): the pruned prompt is L minus the fewest drops
    L = inp["input_ids"].shape[1]
    dropped = [int(inp["attention_mask"][r].sum()) - n for r, n in enumerate(lens)]
    Lp = L - min(dropped)
    assert st["lm_prompt_len"] == Lp == pre.logits.shape[1]
    for r, (prefill, toks, logits) in enumerate(oracle):
        # prefill: the row's valid (left-padded) part, token for token
        torch.testing.assert_close(pre.logits[r, -lens[r]:], prefill, rtol=1e-5, atol=1e-5)
        assert seq[r, L:].tolist() == toks
        torch.testing.assert_close(lg[r], logits, rtol=1e-5, atol=1e-5)
    # the LM's prefill had the pruned length; decode steps one token on the pruned cache
    assert rec.calls[0]["inputs_embeds"].shape[1] == Lp
    assert torch.equal(rec.calls[0]["attention_mask"].sum(1), torch.tensor(lens))
    for step, c in enumerate(rec.calls[1:], 1):
        assert c["inputs_embeds"].shape[1] == 1
        assert c["attention_mask"].shape[1] == Lp + step


@pytest.mark.parametrize("family", [OV, NV])
@pytest.mark.parametrize("budget", ["frame", "clip"])
@pytest.mark.parametrize("k", [2, 5, 100])
def test_video_budget_counts(family, budget, k):
    """k per frame ("frame": each frame keeps exactly min(k, POOLED) of its own tokens) or per
    video ("clip": min(k, frames x POOLED) in all); the newline always; the LM sees exactly that."""
    model = _model(family)
    nl = 1 if _video_newline(model) else 0
    m = copy.deepcopy(model)
    inp, _, vid_n = onevision_batch(m, MIXED, frames=FRAMES)
    _, vids = _features(model, inp)
    apply_visual_token_pruning(m, k=k, video_budget=budget)
    rec = _LMInputs(m)
    with torch.no_grad():
        m(**inp)
    rec.close()
    st = visual_pruning_stats(m)
    per_video = FRAMES * min(k, POOLED) if budget == "frame" else min(k, FRAMES * POOLED)
    assert st["tokens_per_video"] == vid_n == [FRAMES * POOLED + nl] * 2
    assert st["kept_per_video"] == [per_video + nl] * 2
    assert st["video_rows"] == [0, 1] and st["image_rows"] == [0]
    # which frame each of the LM's rows came from (the features are all distinct)
    lm = rec.calls[0]["inputs_embeds"]
    for v, f in enumerate(vids):
        row = lm[st["video_rows"][v]]
        hit = (row[:, None, :] == f[None, :, :]).all(-1)        # (Lp, tokens of the video)
        found = hit.any(0)
        if nl:
            assert bool(found[-1])                              # its newline
        per_frame = found[:FRAMES * POOLED].view(FRAMES, POOLED).sum(1)
        assert int(per_frame.sum()) == per_video
        if budget == "frame":
            assert per_frame.tolist() == [min(k, POOLED)] * FRAMES
    assert lm.shape[1] == st["lm_prompt_len"]


@pytest.mark.parametrize("family", [OV, NV])
def test_k_labels_train_and_remove(family):
    model = _model(family)
    nl = 1 if _video_newline(model) else 0
    m = copy.deepcopy(model)
    inp, img_n, _ = onevision_batch(m, MIXED, frames=FRAMES)
    ids, am = inp["input_ids"], inp["attention_mask"]
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN) | (am == 0), -100)
    apply_visual_token_pruning(m, k=3)
    out = m(**inp, labels=labels)
    st = visual_pruning_stats(m)
    n_nl = len(_image_newlines(inp["image_sizes"][0], True))
    assert st["kept_per_image"] == [3 + n_nl] and st["kept_per_video"] == [3 * FRAMES + nl] * 2
    assert out.logits.shape[1] == st["lm_prompt_len"] and torch.isfinite(out.loss)
    out.loss.backward()                     # trains through the pruned sequence
    assert m.model.multi_modal_projector.linear_1.weight.grad is not None
    # a text-only prompt after a pruned one runs unpruned
    with torch.no_grad():
        txt = m(input_ids=ids[:, :3], attention_mask=am[:, :3]).logits
        ref = model(input_ids=ids[:, :3], attention_mask=am[:, :3]).logits
    assert torch.equal(txt, ref)
    remove_visual_token_pruning(m)
    assert "forward" not in m.__dict__


@pytest.mark.parametrize("family", [OV, NV])
def test_bad_inputs(family):
    m = copy.deepcopy(_model(family))
    apply_visual_token_pruning(m, keep=0.5)
    inp, _, _ = onevision_batch(m, MIXED, frames=FRAMES)
    bad = dict(inp, pixel_values_videos=inp["pixel_values_videos"][:1])
    with pytest.raises(ValueError, match="video features and video tokens do not match"):
        m(**bad)
    bad = dict(inp, input_ids=inp["input_ids"].masked_fill(inp["input_ids"] == IMAGE_TOKEN, 7))
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        m(**bad)
    emb = m.get_input_embeddings()(inp["input_ids"])
    with pytest.raises(ValueError, match="input_ids"):
        m(inputs_embeds=emb, attention_mask=inp["attention_mask"],
          pixel_values_videos=inp["pixel_values_videos"])


@pytest.mark.parametrize("family", [OV, NV])
@pytest.mark.parametrize("budget", ["frame", "clip"])
def test_mm_encoder_outputs(family, budget):
    """Precomputed encoder outputs (transformers >= 5.24's mm_encoder_outputs) prune like pixels:
    the frames of a video then come from the pooling's size (no pixel_values_videos to count)."""
    import inspect

    model = _model(family)
    if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
        pytest.skip("this transformers release has no mm_encoder_outputs (5.24 has)")
    m = copy.deepcopy(model)
    inp, _, _ = onevision_batch(m, MIXED, frames=FRAMES)
    with torch.no_grad():
        kw = {"batch_num_images": inp["batch_num_images"]} if "batch_num_images" in inp else {}
        mm = {"image": m.model.get_image_features(inp["pixel_values"], inp["image_sizes"],
                                                  return_dict=True, **kw),
              "video": m.model.get_video_features(inp["pixel_values_videos"], return_dict=True)}
        text = dict(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
        apply_visual_token_pruning(m, keep=0.3, video_budget=budget)
        ref, ref_seq = m(**inp).logits, _gen(m, inp)[0]
        st = visual_pruning_stats(m)
        out = m(**text, mm_encoder_outputs=dict(mm)).logits
        assert visual_pruning_stats(m) == st
        seq = _gen(m, dict(text, mm_encoder_outputs=dict(mm)))[0]
    assert torch.equal(out, ref)
    assert torch.equal(seq, ref_seq)


def test_onevision_interpolated_grid():
    """vision_aspect_ratio="anyres_max_1": a grid larger than one tile is interpolated down (the
    96x96 image's 12x12 grid to 6x6, the 48x96's 6x12 to 4x8) and each of its rows still ends with
    a newline; those stay, the budget is round(keep * the rest)."""
    model = llava_onevision(vision_aspect_ratio="anyres_max_1")
    inp, img_n, _ = onevision_batch(model, [["image"], ["image"]], frames=FRAMES)
    rows = [4, 6]                                   # 48x96 -> 4x8 + newlines, 96x96 -> 6x6
    assert img_n == [BASE + 4 * 9, BASE + 6 * 7]
    m = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(**inp).logits
        apply_visual_token_pruning(m, keep=1.0)
        assert torch.equal(m(**inp).logits, ref)
        apply_visual_token_pruning(m, keep=0.25)
        m(**inp)
    st = visual_pruning_stats(m)
    assert st["tokens_per_image"] == img_n
    assert st["kept_per_image"] == [round(0.25 * (n - h)) + h for n, h in zip(img_n, rows)]
