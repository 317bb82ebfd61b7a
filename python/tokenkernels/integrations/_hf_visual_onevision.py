"""Visual token pruning for HF LLaVA-OneVision (``llava_onevision``) and LLaVA-NeXT-Video
(``llava_next_video``): images and video, both in one batch too.

Registered in :data:`._hf_visual._FORWARDS`; the selection (``_select``: DivPrune's ``kcenter``
or MMTok's ``coverage_select``), the budgets (``_k_for``) and the decode-step mapping
(``_map_decode``) are LLaVA / LLaVA-NeXT's, from ``_hf_visual``.

What the model feeds its language model, and what is selectable here:

* image ``i`` (``pixel_values``, ``image_sizes``, ``batch_num_images``): the model's own
  ``get_image_features`` block (anyres packing: the base tile, then the unpadded grid with one
  ``image_newline`` embedding closing each row; a single-tile image ends with one newline), one
  ``image_token_id`` placeholder per row of it.
* video ``v`` (``pixel_values_videos``): ``get_video_features``' pooled tokens of every frame
  (``ceil(g/2)^2`` per frame, ``g`` patches per side), then one ``image_newline``; the newline
  occupies a ``video_token_id`` placeholder too (transformers 5.17 appends it in the forward,
  5.24 in ``get_video_features``: both layouts are recognised by the placeholder count).
  LLaVA-NeXT-Video: the same images (LLaVA-NeXT's packing), video frames pooled by its
  ``vision_resampler`` (``(g // spatial_pool_stride)^2`` per frame) and no newline after a video.
* ``mm_encoder_outputs`` (transformers >= 5.24) are pruned like the pixels they came from; the
  frames of a video are then counted from the pooled size per frame (else from
  ``pixel_values_videos``' frame axis).

The newline tokens (an image block's rows equal to ``image_newline``; a OneVision video's last
token) are **always kept** and are not part of the budget: they mark the end of each grid row
(and of each OneVision video), so the kept tokens between two newlines are still one row of the
image, in order; dropping them (DivPrune would, as all newlines are one identical vector) would
leave a sequence whose row markers fall at random places. The budget applies to the other
tokens: per image ``round(keep * n)`` (``n`` = its non-newline tokens, or ``k``); per video frame
(``video_budget="frame"``: each frame keeps ``round(keep * n_frame)``, selected within the frame)
or per video (``"clip"``: one selection over all the video's frame tokens). The statistics count
placeholders (newlines included): ``tokens_per_image`` / ``kept_per_image`` and the video ones are
what the language model would receive / receives.
"""
from __future__ import annotations

import dataclasses
import math
import types
import weakref
from typing import Callable, Tuple

import torch

from ._hf_common import cache_from_kwargs, cache_of, forward_cache_name
from ._hf_visual import (_ATTR, _FORWARDS, _pack_prompt, _Packing, _Prompt, _select, _text_step,
                         _VisualPruning)

@dataclasses.dataclass(frozen=True)
class _Family:
    name: str
    video_newline: bool               # a newline closes each video (OneVision)
    image_kw: Tuple[str, ...]         # get_image_features' extra arguments the forward passes
    vision_kw: Tuple[str, ...]        # the forward's vision-only arguments (not for the LM)
    per_frame: Callable               # config -> pooled tokens per video frame


def _onevision_per_frame(cfg) -> int:
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return math.ceil(g / 2) ** 2          # LlavaOnevisionModel.apply_pooling (bilinear, ceil)


def _next_video_per_frame(cfg) -> int:
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return (g // cfg.spatial_pool_stride) ** 2   # LlavaNextVideoPooler (kernel = stride, floor)


_ONEVISION = _Family("llava_onevision", True, ("batch_num_images",),
                     ("vision_feature_layer", "vision_feature_select_strategy",
                      "vision_aspect_ratio", "batch_num_images", "image_sizes_videos"),
                     _onevision_per_frame)
_NEXT_VIDEO = _Family("llava_next_video", False, (),
                      ("vision_feature_layer", "vision_feature_select_strategy"),
                      _next_video_per_frame)


def _err(fam, msg):
    return ValueError(f"tokenkernels visual pruning ({fam.name}): {msg}")


def _media_features(self, fam, pixel_values, image_sizes, pixel_values_videos, mm, vkw, n_vid_tokens):
    """(image blocks, video blocks): lists of (N, D) tensors exactly as the model scatters them
    into its placeholders (OneVision's video blocks end with their newline)."""
    inner = self.model
    fkw = dict(vision_feature_layer=vkw.get("vision_feature_layer"),
               vision_feature_select_strategy=vkw.get("vision_feature_select_strategy"))
    imgs, vids = [], []
    if mm is not None and mm.get("image") is not None:
        imgs = list(mm["image"].pooler_output)
    elif pixel_values is not None:
        ikw = {key: vkw.get(key) for key in fam.image_kw}
        imgs = list(inner.get_image_features(pixel_values, image_sizes, return_dict=True,
                                             **ikw, **fkw).pooler_output)
    if mm is not None and mm.get("video") is not None:
        v = mm["video"].pooler_output
    elif pixel_values_videos is not None:
        v = inner.get_video_features(pixel_values_videos, return_dict=True, **fkw).pooler_output
    else:
        v = None
    if v is not None:
        # (n_videos, S, D) or, LLaVA-NeXT-Video in 5.17, one (frames, P, D) block per video
        vids = [f.flatten(0, 1) if f.dim() == 3 else f for f in v]
        n = sum(int(f.shape[0]) for f in vids)
        if fam.video_newline and n + len(vids) == n_vid_tokens:    # 5.17: the forward appends it
            nl = inner.image_newline.to(vids[0].device, vids[0].dtype)[None]
            vids = [torch.cat((f, nl), 0) for f in vids]
    return imgs, vids


def _media_prefill(self, fam: _Family, st: _VisualPruning, input_ids, pixel_values, image_sizes,
                   pixel_values_videos, attention_mask, position_ids, labels, mm, vkw):
    if input_ids is None:
        raise _err(fam, "pass input_ids (the placeholders are located by config.image_token_id / "
                   "video_token_id), not inputs_embeds")
    cfg = self.config
    B, L = input_ids.shape
    dev = input_ids.device
    inputs_embeds = self.get_input_embeddings()(input_ids)
    is_img = input_ids == cfg.image_token_id
    is_vid = input_ids == cfg.video_token_id
    img_pos = is_img.reshape(-1).nonzero().squeeze(1)             # row-major placeholder order
    vid_pos = is_vid.reshape(-1).nonzero().squeeze(1)
    imgs, vids = _media_features(self, fam, pixel_values, image_sizes, pixel_values_videos, mm, vkw,
                                 vid_pos.numel())
    imgs = [f.to(inputs_embeds.device, inputs_embeds.dtype) for f in imgs]
    vids = [f.to(inputs_embeds.device, inputs_embeds.dtype) for f in vids]
    for name, feats, pos in (("image", imgs, img_pos), ("video", vids, vid_pos)):
        n = sum(int(f.shape[0]) for f in feats)
        if feats and pos.numel() != n:
            raise _err(fam, f"{name} features and {name} tokens do not match: {pos.numel()} placeholder "
                       f"tokens, {n} features ({len(feats)} {name}s)")
    newline = self.model.image_newline.detach()
    am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)

    def rows_of(feats, pos):
        out, o = [], 0
        for f in feats:
            out.append(int(pos[o]) // L)
            o += int(f.shape[0])
        return out

    img_rows, vid_rows = rows_of(imgs, img_pos), rows_of(vids, vid_pos)
    text_of = {}
    if st.method == "coverage":
        txt = (~is_img) & (~is_vid) & (am != 0)
        for r in set(img_rows + vid_rows):
            text_of[r] = inputs_embeds[r][txt[r]]

    # selectable segments: per image its non-newline tokens; per video its frames (or the clip)
    segs, seg_text, seg_owner = [], [], []       # owner: (kind, item, index of each seg row in item)
    keeps = {"image": [], "video": []}
    for i, f in enumerate(imgs):
        nl = (f == newline.to(f.dtype)).all(-1)
        keeps["image"].append(nl.clone())
        idx = (~nl).nonzero().squeeze(1)
        segs.append(f[idx])
        seg_text.append(text_of.get(img_rows[i]))
        seg_owner.append(("image", i, idx))
    n_nl = 1 if fam.video_newline else 0
    frames = pixel_values_videos.shape[1] if pixel_values_videos is not None else None
    for v, f in enumerate(vids):
        body = int(f.shape[0]) - n_nl
        km = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
        km[body:] = True                                           # the video's newline
        keeps["video"].append(km)
        if st.video_budget == "clip":
            bounds = [(0, body)]
        else:
            # frames from pixel_values_videos; from the pooling's size with mm_encoder_outputs
            per_frame = body // frames if frames else fam.per_frame(cfg)
            if per_frame < 1 or body % per_frame:
                raise _err(fam, f"video {v}: {body} frame tokens do not split into frames of "
                                f"{per_frame} tokens (video_budget='frame')")
            bounds = [(s, s + per_frame) for s in range(0, body, per_frame)]
        for s, e in bounds:
            idx = torch.arange(s, e, device=f.device)
            segs.append(f[s:e])
            seg_text.append(text_of.get(vid_rows[v]))
            seg_owner.append(("video", v, idx))
    if segs:
        picks = _select(st, segs, seg_text)
        for (kind, item, idx), p in zip(seg_owner, picks):
            keeps[kind][item][idx[p.to(idx.device)]] = True

    keep = (~(is_img | is_vid)).reshape(-1).clone()
    if imgs:
        keep[img_pos[torch.cat(keeps["image"]).to(dev)]] = True
    if vids:
        keep[vid_pos[torch.cat(keeps["video"]).to(dev)]] = True
    keep = keep.view(B, L)

    merged = inputs_embeds
    if imgs:
        merged = merged.masked_scatter(is_img.unsqueeze(-1), torch.cat(imgs, 0))
    if vids:
        merged = merged.masked_scatter(is_vid.unsqueeze(-1), torch.cat(vids, 0))

    # the rebuild (as _hf_visual._prefill): kept tokens left-packed per row, contiguous positions
    pk = _Packing.of(keep)
    Lp, removed = pk.Lp, pk.removed
    new_embeds, new_mask, new_pos, new_labels = _pack_prompt(pk, merged, am, position_ids, labels)

    padded = bool((new_mask == 0).any()) or attention_mask is not None and bool((am == 0).any())
    st.prompt = _Prompt(L=L, Lp=Lp, mask=new_mask, removed=removed, padded=padded)
    st.last_tokens_per_image = [int(f.shape[0]) for f in imgs]
    st.last_kept_per_image = [int(km.sum()) for km in keeps["image"]]
    st.last_image_rows = img_rows
    st.last_tokens_per_video = [int(f.shape[0]) for f in vids]
    st.last_kept_per_video = [int(km.sum()) for km in keeps["video"]]
    st.last_video_rows = vid_rows
    st.last_seq_len = Lp
    pass_mask = new_mask if (attention_mask is not None or padded) else None
    kept = {kind: [f[km.to(f.device)] for f, km in zip(feats, keeps[kind])]
            for kind, feats in (("image", imgs), ("video", vids))}
    return dict(inputs_embeds=new_embeds, attention_mask=pass_mask, position_ids=new_pos,
                labels=new_labels), kept


def _onevision_forward(self, input_ids=None, pixel_values=None, image_sizes=None,
                       pixel_values_videos=None, image_sizes_videos=None, attention_mask=None,
                       position_ids=None, _cache_positional=None, inputs_embeds=None,
                       vision_feature_layer=None, vision_feature_select_strategy=None,
                       vision_aspect_ratio=None, batch_num_images=None, labels=None,
                       logits_to_keep=0, mm_encoder_outputs=None, **kwargs):
    # (LlavaOnevisionForConditionalGeneration.forward's order; the vision arguments are named
    # because generate checks its kwargs against this signature)
    named = dict(image_sizes_videos=image_sizes_videos, vision_feature_layer=vision_feature_layer,
                 vision_feature_select_strategy=vision_feature_select_strategy,
                 vision_aspect_ratio=vision_aspect_ratio, batch_num_images=batch_num_images)
    return _forward(self, _ONEVISION, input_ids, pixel_values, image_sizes, pixel_values_videos,
                    attention_mask, position_ids, _cache_positional, inputs_embeds, labels,
                    logits_to_keep, mm_encoder_outputs, named, kwargs)


def _next_video_forward(self, input_ids=None, pixel_values=None, pixel_values_videos=None,
                        image_sizes=None, attention_mask=None, position_ids=None,
                        _cache_positional=None, inputs_embeds=None, vision_feature_layer=None,
                        vision_feature_select_strategy=None, labels=None, logits_to_keep=0,
                        mm_encoder_outputs=None, **kwargs):
    # (LlavaNextVideoForConditionalGeneration.forward's order)
    named = dict(vision_feature_layer=vision_feature_layer,
                 vision_feature_select_strategy=vision_feature_select_strategy)
    return _forward(self, _NEXT_VIDEO, input_ids, pixel_values, image_sizes, pixel_values_videos,
                    attention_mask, position_ids, _cache_positional, inputs_embeds, labels,
                    logits_to_keep, mm_encoder_outputs, named, kwargs)


def _forward(self, fam, input_ids, pixel_values, image_sizes, pixel_values_videos, attention_mask,
             position_ids, _cache_positional, inputs_embeds, labels, logits_to_keep,
             mm_encoder_outputs, named, kwargs):
    st: _VisualPruning = getattr(self, _ATTR)
    kwargs.update({key: val for key, val in named.items() if val is not None})
    if _cache_positional is not None:
        kwargs[forward_cache_name(type(self).forward)] = _cache_positional
    past_key_values = cache_from_kwargs(kwargs)
    original = st.original_forward if st.original_forward is not None else \
        types.MethodType(type(self).forward, self)
    mm = mm_encoder_outputs
    has_media = (pixel_values is not None or pixel_values_videos is not None
                 or (mm is not None and (mm.get("image") is not None or mm.get("video") is not None)))
    if has_media:
        vkw = {key: kwargs.pop(key, None) for key in fam.vision_kw}
        extra, kept = _media_prefill(self, fam, st, input_ids, pixel_values, image_sizes,
                                     pixel_values_videos, attention_mask, position_ids, labels,
                                     mm, vkw)
        out = original(input_ids=None, logits_to_keep=logits_to_keep, **extra, **kwargs)
        cache = cache_of(out)
        st.prompt.cache_ref = weakref.ref(cache) if cache is not None else None
        # transformers 5.17's outputs carry the features as fields: report the kept ones
        fields = getattr(out, "__dataclass_fields__", {})
        if "image_hidden_states" in fields and kept["image"]:
            out.image_hidden_states = torch.cat(kept["image"], 0)
        if "video_hidden_states" in fields and kept["video"]:
            out.video_hidden_states = torch.cat(kept["video"], 0)
        return out
    return _text_step(st, original, past_key_values, input_ids, attention_mask, position_ids,
                      inputs_embeds, labels, logits_to_keep, image_sizes=image_sizes, **kwargs)


_FORWARDS["llava_onevision"] = _onevision_forward
_FORWARDS["llava_next_video"] = _next_video_forward
