"""apply_visual_token_pruning on tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (images, video, batch 2
with left padding): keep=1.0 is the unpatched model exactly; with keep < 1 prefill and greedy
decoding equal the unpatched language model run on the hand-pruned embeddings with the kept
tokens' M-RoPE positions of the full sequence (from the model's own get_rope_index), decode
positions continuing after the full prompt."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

import tokenkernels as tk
from tokenkernels.integrations._hf_common import cache_of, forward_cache_name
from tokenkernels.integrations.transformers import (SUPPORTED_VISUAL_MODELS,
                                                    apply_visual_token_pruning,
                                                    remove_visual_token_pruning,
                                                    visual_pruning_stats)

from .hf_models import (QWEN_IMAGE_TOKEN, QWEN_MERGE, QWEN_VIDEO_TOKEN, QWEN_VL, qwen_vl,
                        qwen_vl_batch)

NEW = 4
torch.set_num_threads(1)


def _available(name):
    try:
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        return True
    except ImportError:
        return False


NAMES = [pytest.param(n, marks=pytest.mark.skipif(not _available(n), reason=f"no {n} in this "
                                                  "transformers")) for n in QWEN_VL]

# batch layouts: (rows of visual items), grids in patches (h, w even; 2x2 merge)
IMAGES = [[("image", 4, 6)], [("image", 4, 4), ("image", 2, 4)]]
VIDEO = [[("video", 3, 4, 4)], [("image", 4, 4)]]          # a 3-frame video and an image
MIXED = [[("image", 4, 6), ("video", 2, 4, 4)], [("image", 4, 4)]]   # image + video in one row
SINGLE = [[("image", 4, 4), ("video", 2, 4, 6)]]                     # batch 1, no attention mask
LAYOUTS = {"images": IMAGES, "video": VIDEO, "mixed": MIXED, "single": SINGLE}


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return request.param, qwen_vl(request.param)


def _batch(name, layout, seed=0):
    return qwen_vl_batch(LAYOUTS[layout], seed=seed, frame_text=name == "qwen3_vl")


def _kw(b, with_types=True):
    return {k: v for k, v in b.items()
            if v is not None and (with_types or k != "mm_token_type_ids")}


def _gen(m, kw, n=NEW):
    out = m.generate(**kw, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                     output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


class _Inner:
    """Records what the inner Qwen-VL model receives (pruned input_ids and position ids)."""

    def __init__(self, m):
        self.calls = []
        self.h = m.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("input_ids", "position_ids", "attention_mask")})

    def close(self):
        self.h.remove()


@pytest.mark.parametrize("layout", ["images", "video", "mixed"])
@pytest.mark.parametrize("with_types", [True, False], ids=["mm_token_type_ids", "no_type_ids"])
def test_keep_all_is_identical(model, layout, with_types):
    name, base = model
    m = copy.deepcopy(base)
    b = _batch(name, layout)
    kw = _kw(b, with_types)
    labels = b["input_ids"].masked_fill((b["mm_token_type_ids"] != 0) | (b["attention_mask"] == 0), -100)
    try:
        with torch.no_grad():
            ref = m(**kw, labels=labels)
    except ValueError as e:
        # without mm_token_type_ids Qwen2-VL / Qwen3-VL refuse a direct call (no M-RoPE)
        assert not with_types and "mm_token_type_ids" in str(e)
        ref = None
    ref_seq, ref_logits = _gen(m, kw)
    ref_deltas = m.model.rope_deltas.clone()
    apply_visual_token_pruning(m, keep=1.0, video_budget="frame" if layout == "video" else "clip")
    try:
        if ref is not None:
            with torch.no_grad():
                out = m(**kw, labels=labels)
            assert torch.equal(out.logits, ref.logits)
            assert torch.equal(out.loss, ref.loss)
        else:
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                m(**kw)
        seq, logits = _gen(m, kw)
        assert torch.equal(seq, ref_seq)
        assert torch.equal(logits, ref_logits)
        assert torch.equal(m.model.rope_deltas, ref_deltas)
        st = visual_pruning_stats(m)
        assert st["kept_per_image"] == st["tokens_per_image"]
        assert st["kept_per_video"] == st["tokens_per_video"]
        assert st["lm_prompt_len"] == b["input_ids"].shape[1]
    finally:
        remove_visual_token_pruning(m)
    assert "forward" not in m.__dict__


def _items(b):
    """Per modality: (grid rows, token counts) in row-major order."""
    out = {}
    for mod, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        g = b[key]
        out[mod] = [] if g is None else [(tuple(int(x) for x in r), int(r.prod()) // QWEN_MERGE ** 2)
                                         for r in g]
    return out


def _features(m, b):
    """The unpatched model's features (and deepstack features, split per item) per modality."""
    inner, res = m.model, {}
    for mod, px, g, fn in (("image", "pixel_values", "image_grid_thw", "get_image_features"),
                           ("video", "pixel_values_videos", "video_grid_thw", "get_video_features")):
        if b[px] is None:
            continue
        out = getattr(inner, fn)(b[px], b[g], return_dict=True)
        feats = list(out.pooler_output)
        Ns = [int(f.shape[0]) for f in feats]
        deep = getattr(out, "deepstack_features", None)
        if deep is not None:
            deep = [list(torch.split(lvl, Ns)) if isinstance(lvl, torch.Tensor) else list(lvl)
                    for lvl in deep]
        res[mod] = (feats, deep)
    return res


def _picks(feats_mod, b, keep, budget, method="kcenter"):
    """DivPrune picks per item (per frame or per clip for videos), computed one unit at a time."""
    items = _items(b)
    picks = {}
    for mod, (feats, _) in feats_mod.items():
        picks[mod] = []
        for f, (grid, n) in zip(feats, items[mod]):
            if mod == "video" and budget == "frame":
                per = n // grid[0]
                spans = [(s * per, per) for s in range(grid[0])]
            else:
                spans = [(0, n)]
            p = []
            for s, n_u in spans:
                k = max(1, min(n_u, round(keep * n_u)))
                p.append(tk.kcenter(f[s:s + n_u], k, metric="cosine", start="isolated",
                                    sorted=True) + s)
            picks[mod].append(torch.cat(p))
    return picks


def _oracle(m, b, feats_mod, picks, n=NEW, mrope=True, **rope_kw):
    """Unpatched pieces, one row at a time: the hand-pruned embeddings, the kept tokens'
    positions from get_rope_index on the FULL sequence (``mrope=False``: the text positions
    generate uses without mm_token_type_ids), the language model + lm_head; greedy decoding at
    positions max(prompt positions) + 1 + step. Returns per row (prefill logits over the kept
    tokens, generated tokens, per-step logits)."""
    inner = m.model
    ids, am = b["input_ids"], b["attention_mask"]
    if mrope:
        pos, deltas = inner.get_rope_index(ids, mm_token_type_ids=b["mm_token_type_ids"],
                                           image_grid_thw=b["image_grid_thw"],
                                           video_grid_thw=b["video_grid_thw"], attention_mask=am,
                                           **rope_kw)
    else:
        pos = (am.cumsum(1) - 1).clamp(min=0)[None].expand(3, -1, -1)
        deltas = torch.zeros(ids.shape[0], 1, dtype=torch.long)
    emb = m.get_input_embeddings()
    lm = inner.language_model
    cname = forward_cache_name(type(lm).forward)
    used = {"image": 0, "video": 0}
    res = []
    for r in range(ids.shape[0]):
        real = am[r] == 1
        row, pos_r = ids[r][real], pos[:, r][:, real]
        assert int(pos_r.max()) + 1 - len(row) == int(deltas[r])       # rope_deltas' definition
        e = emb(row).clone()
        keep = torch.ones(len(row), dtype=torch.bool)
        kept_deep = {}
        for mod, tok in (("image", QWEN_IMAGE_TOKEN), ("video", QWEN_VIDEO_TOKEN)):
            where = (row == tok).nonzero().squeeze(1)
            start = 0
            kept_deep[mod] = []
            while start < len(where):
                i = used[mod]
                f, deep = feats_mod[mod][0][i], feats_mod[mod][1]
                w = where[start:start + f.shape[0]]
                start += f.shape[0]
                e[w] = f.to(e.dtype)
                drop = torch.ones(f.shape[0], dtype=torch.bool)
                drop[picks[mod][i]] = False
                keep[w[drop]] = False
                if deep is not None:
                    kept_deep[mod].append([lvl[i][picks[mod][i]] for lvl in deep])
                used[mod] += 1
        e, p, row_k = e[keep][None], pos_r[:, keep][:, None], row[keep]
        extra = {}
        if feats_mod and next(iter(feats_mod.values()))[1] is not None:     # Qwen3-VL deepstack
            img_m, vid_m = row_k == QWEN_IMAGE_TOKEN, row_k == QWEN_VIDEO_TOKEN
            vis = img_m | vid_m
            levels = []
            n_lvl = len(next(iter(feats_mod.values()))[1])
            for li in range(n_lvl):
                joint = e.new_zeros((int(vis.sum()), e.shape[-1]))
                for mod, msk in (("image", img_m), ("video", vid_m)):
                    if kept_deep[mod]:
                        joint[msk[vis]] = torch.cat([d[li] for d in kept_deep[mod]]).to(e.dtype)
                levels.append(joint)
            extra = dict(visual_pos_masks=vis[None], deepstack_visual_embeds=levels)
        out = lm(inputs_embeds=e, position_ids=p, use_cache=True, **extra)
        pre = m.lm_head(out.last_hidden_state)[0]
        nxt = int(pos_r.max()) + 1
        toks, logits, last = [], [], pre[-1]
        for step in range(n):
            logits.append(last)
            t = last.argmax()
            toks.append(int(t))
            out = lm(inputs_embeds=emb(t.view(1, 1)), position_ids=torch.full((3, 1, 1), nxt + step),
                     use_cache=True, **{cname: cache_of(out)})
            last = m.lm_head(out.last_hidden_state)[0, -1]
        res.append((pre, toks, torch.stack(logits)))
    return res


@pytest.mark.parametrize("layout,budget", [("images", "frame"), ("video", "frame"), ("video", "clip"),
                                           ("mixed", "frame"), ("single", "clip")])
def test_pruned_equals_hand_pruned(model, layout, budget):
    name, base = model
    m = copy.deepcopy(base)
    b = _batch(name, layout, seed=3)
    kw = _kw(b)
    if layout == "single":
        del kw["attention_mask"]
    keep = 0.4
    with torch.no_grad():
        feats = _features(m, b)
        picks = _picks(feats, b, keep, budget)
        expect = _oracle(m, b, feats, picks)
    apply_visual_token_pruning(m, keep=keep, video_budget=budget)
    rec = _Inner(m)
    with torch.no_grad():
        out = m(**kw)
        seq, logits = _gen(m, kw)
    rec.close()
    L = b["input_ids"].shape[1]
    st = visual_pruning_stats(m)
    assert st["kept_per_image"] == [int(p.numel()) for p in picks.get("image", [])]
    assert st["kept_per_video"] == [int(p.numel()) for p in picks.get("video", [])]
    for r, (pre, toks, lg) in enumerate(expect):
        # prefill: the row's kept tokens sit at the end of the (left-padded) pruned prompt
        torch.testing.assert_close(out.logits[r, -pre.shape[0]:], pre, rtol=1e-5, atol=1e-5)
        assert seq[r, L:].tolist() == toks
        torch.testing.assert_close(logits[r], lg, rtol=1e-5, atol=1e-5)
    # rows keep their own padding, shortened by their dropped tokens, left-padded to the longest
    removed = [0] * len(expect)
    for mod in ("image", "video"):
        for r, n, k in zip(st[f"{mod}_rows"], st[f"tokens_per_{mod}"], st[f"kept_per_{mod}"]):
            removed[r] += n - k
    assert out.logits.shape[1] == st["lm_prompt_len"] == L - min(removed)
    # the inner model saw the pruned prompt with the kept tokens' full-sequence positions
    pre_call = rec.calls[1]                     # [0]: the direct forward, [1]: generate's prefill
    assert pre_call["input_ids"].shape[1] == st["lm_prompt_len"]
    for c in rec.calls[2:]:                     # decode steps: one token, unpruned positions
        assert c["input_ids"].shape[1] == 1

    # a manual decode loop without position_ids (the model's rope_deltas rule) gives the same
    cname = forward_cache_name(type(m).forward)
    with torch.no_grad():
        o = m(**kw, use_cache=True)
        am = kw.get("attention_mask")
        steps = [o.logits[:, -1]]
        for step in range(NEW - 1):
            t = steps[-1].argmax(-1, keepdim=True)
            mask = {}
            if am is not None:
                am = torch.cat([am, torch.ones_like(t)], 1)
                mask = dict(attention_mask=am)
            o = m(input_ids=t, use_cache=True, **mask, **{cname: cache_of(o)})
            steps.append(o.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-5, atol=1e-5)
    remove_visual_token_pruning(m)


def test_qwen2_5_video_time_interval():
    """Qwen2.5-VL's temporal positions scale with second_per_grid_ts (tokens_per_second * s per
    temporal step): kept video tokens keep those positions, direct call and generate."""
    if not _available("qwen2_5_vl"):
        pytest.skip("no qwen2_5_vl in this transformers")
    m = qwen_vl("qwen2_5_vl")
    b = _batch("qwen2_5_vl", "video", seed=13)
    kw = dict(_kw(b), second_per_grid_ts=torch.tensor([1.5]))
    with torch.no_grad():
        feats = _features(m, b)
        picks = _picks(feats, b, 0.4, "frame")
        expect = _oracle(m, b, feats, picks, second_per_grid_ts=kw["second_per_grid_ts"])
    apply_visual_token_pruning(m, keep=0.4)
    with torch.no_grad():
        out = m(**kw)
        seq, logits = _gen(m, kw)
    L = b["input_ids"].shape[1]
    for r, (pre, toks, lg) in enumerate(expect):
        torch.testing.assert_close(out.logits[r, -pre.shape[0]:], pre, rtol=1e-5, atol=1e-5)
        assert seq[r, L:].tolist() == toks
        torch.testing.assert_close(logits[r], lg, rtol=1e-5, atol=1e-5)


def test_pruned_generate_without_type_ids(model):
    """generate without mm_token_type_ids: HF falls back to text positions (rope_deltas 0); the
    pruned model keeps those positions for the kept tokens and decodes after the full prompt."""
    name, base = model
    m = copy.deepcopy(base)
    b = _batch(name, "video", seed=11)
    with torch.no_grad():
        feats = _features(m, b)
        picks = _picks(feats, b, 0.3, "frame")
        expect = _oracle(m, b, feats, picks, mrope=False)
    apply_visual_token_pruning(m, keep=0.3, video_budget="frame")
    with torch.no_grad():
        seq, logits = _gen(m, _kw(b, with_types=False))
    L = b["input_ids"].shape[1]
    for r, (_, toks, lg) in enumerate(expect):
        assert seq[r, L:].tolist() == toks
        torch.testing.assert_close(logits[r], lg, rtol=1e-5, atol=1e-5)
    remove_visual_token_pruning(m)


def _frame_of_video_tokens(call, r):
    """Kept video tokens of row r grouped by their temporal M-RoPE position (one per frame)."""
    ids, pos = call["input_ids"][r], call["position_ids"]
    pos = pos[-3:, r] if pos.dim() == 3 else pos[r][None]
    t = pos[0][ids == QWEN_VIDEO_TOKEN]
    return torch.unique(t, return_counts=True)[1].tolist()


@pytest.mark.parametrize("budget", ["frame", "clip"])
def test_video_budgets(model, budget):
    name, base = model
    m = copy.deepcopy(base)
    b = _batch(name, "video", seed=5)          # row 0: a 3-frame video of 4 tokens per frame
    kw = _kw(b)
    apply_visual_token_pruning(m, keep=0.4, video_budget=budget)
    rec = _Inner(m)
    with torch.no_grad():
        m(**kw)
    st = visual_pruning_stats(m)
    assert st["tokens_per_video"] == [12] and st["video_rows"] == [0]
    assert st["tokens_per_image"] == [4] and st["image_rows"] == [1]
    assert st["kept_per_image"] == [2]                                  # round(0.4 * 4)
    per_frame = _frame_of_video_tokens(rec.calls[-1], 0)
    if budget == "frame":
        assert per_frame == [2, 2, 2]                                   # round(0.4 * 4) each
        assert st["kept_per_video"] == [6]
    else:
        assert sum(per_frame) == 5 and st["kept_per_video"] == [5]      # round(0.4 * 12)
    # k= is per frame / per clip
    apply_visual_token_pruning(m, k=3, video_budget=budget)
    with torch.no_grad():
        m(**kw)
    rec.close()
    per_frame = _frame_of_video_tokens(rec.calls[-1], 0)
    st = visual_pruning_stats(m)
    if budget == "frame":
        assert per_frame == [3, 3, 3] and st["kept_per_video"] == [9]
    else:
        assert sum(per_frame) == 3 and st["kept_per_video"] == [3]
    assert st["kept_per_image"] == [3]
    text = int(((b["mm_token_type_ids"] == 0) & (b["attention_mask"] == 1)).sum(1).max())
    assert st["lm_prompt_len"] >= text
    remove_visual_token_pruning(m)


def test_coverage_and_bad_arguments(model):
    name, base = model
    m = copy.deepcopy(base)
    b = _batch(name, "video", seed=7)
    kw = _kw(b)
    with pytest.raises(ValueError, match="video_budget"):
        apply_visual_token_pruning(m, video_budget="scene")
    apply_visual_token_pruning(m, keep=0.25, method="coverage", video_budget="clip")
    with torch.no_grad():
        seq, logits = _gen(m, kw)
        out = m(**kw)
    st = visual_pruning_stats(m)
    assert st["kept_per_video"] == [3] and st["kept_per_image"] == [1]
    assert torch.isfinite(logits).all() and out.logits.shape[1] == st["lm_prompt_len"]
    assert seq.shape == (2, b["input_ids"].shape[1] + NEW)
    # training through the pruned prompt: the loss reaches the vision tower
    labels = b["input_ids"].masked_fill((b["mm_token_type_ids"] != 0) | (b["attention_mask"] == 0), -100)
    out = m(**kw, labels=labels)
    assert out.logits.shape[1] == visual_pruning_stats(m)["lm_prompt_len"] and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in m.model.visual.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    # placeholders and features must match
    bad = dict(kw, video_grid_thw=torch.tensor([[2, 4, 4]]),
               pixel_values_videos=kw["pixel_values_videos"][:32])
    with pytest.raises(ValueError, match="do not match"):
        m(**bad)
    with pytest.raises(ValueError, match="2-D"):        # generate's 4-D masks (StaticCache)
        m.generate(**kw, max_new_tokens=2, cache_implementation="static")
    remove_visual_token_pruning(m)
    assert name in SUPPORTED_VISUAL_MODELS
