"""Tiny randomly initialised HF models for the integration tests (no downloads)."""
from __future__ import annotations

import torch
import transformers as T

_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=256)

CAUSAL_LMS = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


def causal_lm(name: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer GQA model of type ``name`` (fp32, eval mode so dropout is off)."""
    kw = dict(_COMMON, **overrides)
    if name == "llama":
        cfg, cls = T.LlamaConfig(**kw), T.LlamaForCausalLM
    elif name == "mistral":
        cfg, cls = T.MistralConfig(**kw), T.MistralForCausalLM
    elif name == "qwen2":
        cfg, cls = T.Qwen2Config(**kw), T.Qwen2ForCausalLM
    elif name == "qwen3":
        cfg, cls = T.Qwen3Config(**kw), T.Qwen3ForCausalLM
    elif name == "gemma2":
        kw.setdefault("final_logit_softcapping", 0.5)   # small: the cap really bends the logits
        kw.setdefault("query_pre_attn_scalar", kw["head_dim"])
        kw.setdefault("sliding_window", 8)
        cfg, cls = T.Gemma2Config(**kw), T.Gemma2ForCausalLM
    else:
        raise ValueError(name)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    return model


IMAGE_TOKEN = 500
IMAGE_TOKENS = 16          # 32x32 image, 8x8 patches, CLS dropped ("default" strategy)


def llava(*, seed: int = 0) -> torch.nn.Module:
    """LLaVA-1.5 layout: CLIP vision tower (2 layers), 2-layer MLP projector, Llama LM."""
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    tc = T.LlamaConfig(**_COMMON, pad_token_id=0)
    cfg = T.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                        image_seq_length=IMAGE_TOKENS)
    torch.manual_seed(seed)
    return T.LlavaForConditionalGeneration(cfg).eval()


def llava_batch(image_counts, *, seed: int = 0, text_after=(4, 7)):
    """Left-padded prompts: [text, (image placeholders, text) * n, text] per row, pixel values of
    all images in row-major order."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for r, n in enumerate(image_counts):
        parts = [torch.randint(1, IMAGE_TOKEN, (3,), generator=g)]
        for _ in range(n):
            parts += [torch.full((IMAGE_TOKENS,), IMAGE_TOKEN),
                      torch.randint(1, IMAGE_TOKEN, (2,), generator=g)]
        parts.append(torch.randint(1, IMAGE_TOKEN, (text_after[r % len(text_after)],), generator=g))
        prompts.append(torch.cat(parts))
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = p
        am[i, L - len(p):] = 1
    pix = torch.randn(sum(image_counts), 3, 32, 32, generator=g)
    return ids, am, pix


def llava_next(*, seed: int = 0) -> torch.nn.Module:
    """LLaVA-NeXT layout (anyres tiles of 32x32, image_newline tokens)."""
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    tc = T.LlamaConfig(**_COMMON, pad_token_id=0)
    cfg = T.LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    torch.manual_seed(seed)
    return T.LlavaNextForConditionalGeneration(cfg).eval()


def llava_next_batch(model, *, seed: int = 0):
    """Two left-padded prompts with one image each (32x64 and 64x64): the placeholder counts
    are the model's own feature counts. Returns ids, mask, pixel values, image sizes, counts."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[32, 64], [64, 64]])
    pix = torch.randn(2, 5, 3, 32, 32, generator=g)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pix, image_sizes=sizes,
                                               return_dict=True).pooler_output
    Ns = [int(f.shape[0]) for f in feats]
    rows = [torch.cat([torch.randint(1, IMAGE_TOKEN, (3,), generator=g),
                       torch.full((n,), IMAGE_TOKEN),
                       torch.randint(1, IMAGE_TOKEN, (4,), generator=g)]) for n in Ns]
    L = max(len(r) for r in rows)
    ids = torch.zeros(2, L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r
        am[i, L - len(r):] = 1
    return ids, am, pix, sizes, Ns


# LLaVA-OneVision (SigLIP tower, Qwen2 LM): 48x48 tiles of 8x8 patches (6x6 = 36 tokens per tile,
# 3x3 = 9 per pooled video frame); anyres packing with image_newline tokens.
VIDEO_TOKEN = 501
OV_TILE = 48


def llava_onevision(*, seed: int = 0, **overrides) -> torch.nn.Module:
    vc = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=OV_TILE, patch_size=8)
    tc = T.Qwen2Config(**_COMMON, pad_token_id=0)
    kw = dict(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
              video_token_index=VIDEO_TOKEN,
              image_grid_pinpoints=[[48, 48], [48, 96], [96, 48], [96, 96]])
    kw.update(overrides)
    cfg = T.LlavaOnevisionConfig(**kw)
    torch.manual_seed(seed)
    return T.LlavaOnevisionForConditionalGeneration(cfg).eval()


def onevision_batch(model, rows, *, seed: int = 0, frames: int = 3, batch_num_images=False):
    """Left-padded prompts built by hand (LLaVA-OneVision or LLaVA-NeXT-Video). ``rows``: per row
    a list of items, ``"image"`` (anyres; sizes cycle through 48x96, 96x96, 96x48 over all images)
    or ``"video"`` (``frames`` frames); text tokens around each item. ``batch_num_images=True``
    passes the images per row (OneVision: rows with several images then get one tile per image).
    The placeholder counts are the model's own feature counts (image: its packed features,
    newlines included; video: frames x pooled tokens, + one newline for OneVision). Returns a dict
    of model inputs (input_ids, attention_mask and, where present, pixel_values, image_sizes,
    batch_num_images, pixel_values_videos) and the per-image / per-video counts."""
    g = torch.Generator().manual_seed(seed)
    sizes_cycle = [[48, 96], [96, 96], [96, 48]]
    n_img = sum(r.count("image") for r in rows)
    n_vid = sum(r.count("video") for r in rows)
    sizes = torch.tensor([sizes_cycle[i % 3] for i in range(n_img)])
    pix = torch.randn(n_img, 5, 3, OV_TILE, OV_TILE, generator=g) if n_img else None
    vid = torch.randn(n_vid, frames, 3, OV_TILE, OV_TILE, generator=g) if n_vid else None
    bni = torch.tensor([r.count("image") for r in rows if "image" in r]) if batch_num_images else None
    with torch.no_grad():
        ikw = {} if bni is None else dict(batch_num_images=bni)
        img_n = [int(f.shape[0]) for f in model.model.get_image_features(
            pix, sizes, return_dict=True, **ikw).pooler_output] if n_img else []
        vid_n = []
        if n_vid:
            vf = model.model.get_video_features(vid, return_dict=True).pooler_output
            per = sum(int(f.numel()) for f in vf) // (n_vid * int(vf[0].shape[-1]))
            pooled = frames * 9                   # 6x6 patches pooled to 3x3 (both families)
            if model.config.model_type == "llava_onevision":
                vid_n = [pooled + 1] * n_vid      # the newline occupies one placeholder
                assert per in (pooled, pooled + 1)
            else:
                vid_n = [pooled] * n_vid
                assert per == pooled
    prompts, i_img, i_vid = [], 0, 0
    for r, items in enumerate(rows):
        parts = [torch.randint(1, IMAGE_TOKEN, (3 + r,), generator=g)]
        for it in items:
            if it == "image":
                parts.append(torch.full((img_n[i_img],), IMAGE_TOKEN))
                i_img += 1
            else:
                parts.append(torch.full((vid_n[i_vid],), VIDEO_TOKEN))
                i_vid += 1
            parts.append(torch.randint(1, IMAGE_TOKEN, (2,), generator=g))
        parts.append(torch.randint(1, IMAGE_TOKEN, (4,), generator=g))
        prompts.append(torch.cat(parts))
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = p
        am[i, L - len(p):] = 1
    inputs = dict(input_ids=ids, attention_mask=am)
    if n_img:
        inputs.update(pixel_values=pix, image_sizes=sizes)
        if bni is not None:
            inputs.update(batch_num_images=bni)
    if n_vid:
        inputs.update(pixel_values_videos=vid)
    return inputs, img_n, vid_n


def llava_next_video(*, seed: int = 0) -> torch.nn.Module:
    """LLaVA-NeXT-Video layout: CLIP tower on 48x48 tiles of 8x8 patches (CLS dropped: 36 tokens),
    anyres images with image_newline tokens, video frames average-pooled 2x2 (9 tokens a frame,
    no newline)."""
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=OV_TILE, patch_size=8, projection_dim=32)
    tc = T.LlamaConfig(**_COMMON, pad_token_id=0)
    cfg = T.LlavaNextVideoConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                                 video_token_index=VIDEO_TOKEN,
                                 image_grid_pinpoints=[[48, 48], [48, 96], [96, 48], [96, 96]])
    torch.manual_seed(seed)
    return T.LlavaNextVideoForConditionalGeneration(cfg).eval()


# ---- Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): 3-D M-RoPE, images and video ----
QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, QWEN_VSTART, QWEN_VEND = 500, 501, 502, 503
QWEN_PATCH, QWEN_TPATCH, QWEN_MERGE = 4, 2, 2
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def qwen_vl(name: str, *, seed: int = 0) -> torch.nn.Module:
    """A tiny ``<name>ForConditionalGeneration``: 2-layer vision tower (patch 4, temporal patch 2,
    2x2 merge), 2-layer GQA text model (D64, head_dim 16, mrope_section [2, 3, 3])."""
    ids = dict(image_token_id=QWEN_IMAGE_TOKEN, video_token_id=QWEN_VIDEO_TOKEN,
               vision_start_token_id=QWEN_VSTART, vision_end_token_id=QWEN_VEND)
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=0)
    vis = dict(depth=2, num_heads=2, in_channels=3, patch_size=QWEN_PATCH,
               temporal_patch_size=QWEN_TPATCH, spatial_merge_size=QWEN_MERGE)
    if name == "qwen2_vl":
        rope = dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0)
        cfg = T.Qwen2VLConfig(text_config=dict(text, rope_parameters=rope),
                              vision_config=dict(vis, embed_dim=32, hidden_size=64, mlp_ratio=2), **ids)
        cls = T.Qwen2VLForConditionalGeneration
    elif name == "qwen2_5_vl":
        rope = dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0)
        cfg = T.Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=rope),
                                 vision_config=dict(vis, hidden_size=32, intermediate_size=64,
                                                    out_hidden_size=64, window_size=16,
                                                    fullatt_block_indexes=[1], tokens_per_second=2),
                                 **ids)
        cls = T.Qwen2_5_VLForConditionalGeneration
    elif name == "qwen3_vl":
        rope = dict(rope_type="default", mrope_section=[2, 3, 3], mrope_interleaved=True,
                    rope_theta=10000.0)
        cfg = T.Qwen3VLConfig(text_config=dict(text, head_dim=16, rope_parameters=rope),
                              vision_config=dict(vis, hidden_size=32, intermediate_size=64,
                                                 out_hidden_size=64, num_position_embeddings=64,
                                                 deepstack_visual_indexes=[0]), **ids)
        cls = T.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(name)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def qwen_vl_batch(rows, *, seed: int = 0, frame_text: bool = False, pad_to: int = 0):
    """Left-padded Qwen-VL prompts built by hand. ``rows``: per batch row a list of visual items
    ``("image", h, w)`` / ``("video", t, h, w)`` (grid in patches; h, w even; t = temporal
    patches). Each item is ``<vision_start> placeholders <vision_end>`` between random text;
    ``frame_text`` (Qwen3-VL's layout) puts a text token before each video frame's placeholders.
    Returns a dict with input_ids, attention_mask, mm_token_type_ids, pixel_values,
    image_grid_thw, pixel_values_videos, video_grid_thw (None where absent)."""
    g = torch.Generator().manual_seed(seed)
    D = 3 * QWEN_TPATCH * QWEN_PATCH * QWEN_PATCH
    m2 = QWEN_MERGE * QWEN_MERGE
    seqs, types, img_grid, vid_grid, img_pix, vid_pix = [], [], [], [], [], []
    txt = lambda n: torch.randint(1, QWEN_IMAGE_TOKEN, (n,), generator=g)
    for r, items in enumerate(rows):
        parts, tparts = [txt(3 + r)], [torch.zeros(3 + r, dtype=torch.long)]
        for it in items:
            if it[0] == "image":
                _, h, w = it
                n = h * w // m2
                parts += [torch.tensor([QWEN_VSTART]), torch.full((n,), QWEN_IMAGE_TOKEN),
                          torch.tensor([QWEN_VEND])]
                tparts += [torch.zeros(1, dtype=torch.long), torch.ones(n, dtype=torch.long),
                           torch.zeros(1, dtype=torch.long)]
                img_grid.append([1, h, w])
                img_pix.append(torch.randn(h * w, D, generator=g))
            else:
                _, t, h, w = it
                n = h * w // m2
                frames = t if frame_text else 1
                per = n if frame_text else t * n
                for _ in range(frames):
                    if frame_text:
                        parts.append(txt(1))
                        tparts.append(torch.zeros(1, dtype=torch.long))
                    parts += [torch.tensor([QWEN_VSTART]), torch.full((per,), QWEN_VIDEO_TOKEN),
                              torch.tensor([QWEN_VEND])]
                    tparts += [torch.zeros(1, dtype=torch.long), torch.full((per,), 2, dtype=torch.long),
                               torch.zeros(1, dtype=torch.long)]
                vid_grid.append([t, h, w])
                vid_pix.append(torch.randn(t * h * w, D, generator=g))
            parts.append(txt(2))
            tparts.append(torch.zeros(2, dtype=torch.long))
        parts.append(txt(4 + 2 * r))
        tparts.append(torch.zeros(4 + 2 * r, dtype=torch.long))
        seqs.append(torch.cat(parts))
        types.append(torch.cat(tparts))
    L = max(max(len(s) for s in seqs), pad_to)
    B = len(rows)
    ids = torch.zeros(B, L, dtype=torch.long)
    am = torch.zeros_like(ids)
    tt = torch.zeros_like(ids)
    for i, (s, t) in enumerate(zip(seqs, types)):
        ids[i, L - len(s):] = s
        am[i, L - len(s):] = 1
        tt[i, L - len(s):] = t
    out = dict(input_ids=ids, attention_mask=am, mm_token_type_ids=tt, pixel_values=None,
               image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None)
    if img_grid:
        out.update(pixel_values=torch.cat(img_pix), image_grid_thw=torch.tensor(img_grid))
    if vid_grid:
        out.update(pixel_values_videos=torch.cat(vid_pix), video_grid_thw=torch.tensor(vid_grid))
    return out
