"""Visual token pruning for the Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): images and
video, 3-D M-RoPE positions kept from the unpruned sequence.

How it works (registered in ``_hf_visual._FORWARDS``; ``apply_visual_token_pruning`` installs
:func:`_qwen_pruned_forward` as the instance's ``forward``):

1. Prefill (``pixel_values`` / ``pixel_values_videos`` given): the merged visual features come
   from the model's own ``get_image_features`` / ``get_video_features`` (one block of
   ``t*h*w / merge**2`` rows per image or video; a video's rows are frame-major, ``h*w/merge**2``
   per temporal step). Selection units: each image; each video frame (``video_budget="frame"``)
   or each whole video (``"clip"``); ``_hf_visual._select`` picks ``k`` rows per unit (kcenter:
   DivPrune; coverage: MMTok with the embeddings of that prompt's text tokens).
2. Positions: the 3-D M-RoPE position ids of the FULL unpruned prompt, exactly as the unpatched
   model gets them: the ones ``generate`` passes (its ``_prepare_position_ids_for_generation``:
   ``get_rope_index`` when ``mm_token_type_ids`` is given, plain text positions otherwise), or,
   in a direct call without ``position_ids``, the model's own ``compute_3d_position_ids`` (which
   raises without ``mm_token_type_ids`` on Qwen2-VL / Qwen3-VL and falls back to 0..L-1 on
   Qwen2.5-VL, like the unpatched model); ``model.model.rope_deltas`` is set by those as
   usual. The kept tokens keep their positions (not renumbered).
3. The original forward then runs on the pruned prompt: ``input_ids`` without the dropped
   placeholders (rows left-padded to the longest), attention mask, ``mm_token_type_ids``, labels
   and the gathered position ids; during that call the inner model's ``get_image_features`` /
   ``get_video_features`` return the kept features (Qwen3-VL's deepstack features pruned alike),
   so the model's own code fills the placeholders and adds the deepstack features.
4. Decode steps: the cache holds the pruned prompt; the prompt part of the attention mask is
   replaced by the pruned one; position ids are the unpruned model's (``generate``'s own
   ``position_ids``, which continue from the full prompt, pass unchanged; without them the
   unpruned model's rule is applied: text positions after the full prompt plus ``rope_deltas``).

Limits: visual inputs need an empty cache (no images arriving in a continued conversation);
the attention mask must be 2-D (``generate`` with a compileable cache such as ``StaticCache``
builds 4-D masks for the unpruned prompt: a clear ValueError; use the default DynamicCache).
"""
from __future__ import annotations

import copy
import inspect
import types
import weakref
from typing import List

import torch

from ._hf_common import cache_from_kwargs, cache_of, forward_cache_name
from ._hf_visual import (_ATTR, _FORWARDS, _decode_mask, _locate, _Packing, _Prompt, _select,
                         _VisualPruning)

_FN = "tokenkernels visual pruning (Qwen-VL)"
# modality -> (config token id, pixel kwarg, grid kwarg, the inner model's feature method)
_MODALITIES = {
    "image": ("image_token_id", "pixel_values", "image_grid_thw", "get_image_features"),
    "video": ("video_token_id", "pixel_values_videos", "video_grid_thw", "get_video_features"),
}


def _features(inner, modality: str, pixels, grid, mm_encoder_outputs):
    """The modality's encoder output (pooler_output: one (N_i, D) block per item)."""
    if mm_encoder_outputs is not None and mm_encoder_outputs.get(modality) is not None:
        out = mm_encoder_outputs[modality]
    else:
        if grid is None:
            raise ValueError(f"{_FN}: {_MODALITIES[modality][1]} needs {_MODALITIES[modality][2]}")
        out = getattr(inner, _MODALITIES[modality][3])(pixels, grid, return_dict=True)
    pooled = out.pooler_output
    if isinstance(pooled, torch.Tensor):            # one concatenated block: split per item
        merge = inner.config.vision_config.spatial_merge_size
        pooled = torch.split(pooled, (grid.prod(-1) // merge ** 2).tolist())
    return out, list(pooled)


def _prune_output(out, feats: List[torch.Tensor], picks: List[torch.Tensor]):
    """A copy of the encoder output with only the kept rows (per item; deepstack levels too)."""
    kept = copy.copy(out)
    kept.pooler_output = tuple(f[p.to(f.device)] for f, p in zip(feats, picks))
    deep = getattr(out, "deepstack_features", None)
    if deep is not None:
        offs, flat = 0, []
        for f, p in zip(feats, picks):
            flat.append(p.to(f.device) + offs)
            offs += int(f.shape[0])
        flat = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long)
        levels = []
        for lvl in deep:
            if isinstance(lvl, torch.Tensor):          # concatenated over items (5.17)
                levels.append(lvl[flat.to(lvl.device)])
            else:                                      # split per item (5.24)
                levels.append(tuple(x[p.to(x.device)] for x, p in zip(lvl, picks)))
        kept.deepstack_features = levels
    return kept


class _FeatureOverride:
    """During the pruned prefill the inner model's feature methods return the kept features."""

    def __init__(self, inner, outputs: dict):
        self.inner, self.outputs, self.saved = inner, outputs, {}

    def __enter__(self):
        for modality, out in self.outputs.items():
            name = _MODALITIES[modality][3]
            self.saved[name] = self.inner.__dict__.get(name)
            setattr(self.inner, name, lambda *a, _out=out, **k: _out)
        return self

    def __exit__(self, *exc):
        for name, prev in self.saved.items():
            if prev is None:
                self.inner.__dict__.pop(name, None)
            else:
                setattr(self.inner, name, prev)
        return False


def _full_positions(inner, input_ids, attention_mask, mm_token_type_ids, grids, kwargs):
    """The unpatched model's position ids for the full prompt of a direct call (no
    ``position_ids`` given): its own ``compute_3d_position_ids`` (sets ``rope_deltas``)."""
    fn = inner.compute_3d_position_ids
    params = inspect.signature(fn).parameters
    ckw = dict(input_ids=input_ids, inputs_embeds=None, attention_mask=attention_mask,
               mm_token_type_ids=mm_token_type_ids, image_grid_thw=grids.get("image"),
               video_grid_thw=grids.get("video"))
    ckw[forward_cache_name(fn)] = None                  # a prefill: the cache is empty
    for key in ("second_per_grid_ts",):
        if key in params and kwargs.get(key) is not None:
            ckw[key] = kwargs[key]
    B, L = input_ids.shape
    # only the shape / device of inputs_embeds are read (the rope_deltas branch)
    ckw["inputs_embeds"] = torch.empty((B, L, 0), device=input_ids.device)
    return fn(**ckw)


def _prefill(self, st: _VisualPruning, input_ids, attention_mask, position_ids, labels,
             mm_token_type_ids, pixels: dict, grids: dict, mm_encoder_outputs, kwargs):
    if input_ids is None:
        raise ValueError(f"{_FN}: pass input_ids (the placeholders are located by "
                         f"config.image_token_id / video_token_id), not inputs_embeds")
    cache = cache_from_kwargs(kwargs)
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"{_FN}: visual inputs with a non-empty KV cache (a continued "
                         f"conversation) are not supported; start from an empty cache")
    inner, cfg = self.model, self.config
    B, L = input_ids.shape
    dev = input_ids.device
    am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)

    # 1. features and selection units
    is_vis = torch.zeros_like(input_ids, dtype=torch.bool)
    units, unit_rows, per_mod = [], [], {}
    for modality, (tok_attr, _, _, _) in _MODALITIES.items():
        px = pixels.get(modality)
        if px is None and (mm_encoder_outputs or {}).get(modality) is None:
            continue
        out, feats = _features(inner, modality, px, grids.get(modality), mm_encoder_outputs)
        tok = getattr(cfg, tok_attr)
        is_tok = input_ids == tok
        is_vis |= is_tok
        flat_pos, Ns, offsets, rows = _locate(is_tok, feats, _FN, modality)
        # per item: the (start, length) of its selection units within the item's rows
        item_units = []
        grid = grids.get(modality)
        for i, n in enumerate(Ns):
            if modality == "video" and st.video_budget == "frame":
                if grid is None:
                    raise ValueError(f"{_FN}: video_budget='frame' needs video_grid_thw (the "
                                     f"frames of each video)")
                t = int(grid[i][0])
                if t < 1 or n % t:
                    raise ValueError(f"{_FN}: video {i} has {n} tokens, not a multiple of its "
                                     f"{t} temporal steps")
                per = n // t
                spans = [(s * per, per) for s in range(t)]
            else:
                spans = [(0, n)]
            first = len(units)
            for s, n_u in spans:
                units.append(feats[i][s:s + n_u])
                unit_rows.append(rows[i])
            item_units.append((first, spans))
        per_mod[modality] = dict(out=out, feats=feats, flat_pos=flat_pos, offsets=offsets,
                                 rows=rows, item_units=item_units, Ns=Ns)
    # 2. positions of the full prompt, as the unpatched model has them
    if position_ids is None:
        position_ids = _full_positions(inner, input_ids, attention_mask, mm_token_type_ids, grids,
                                       kwargs)
        if position_ids is None:
            # the model could not build M-RoPE positions (Qwen2.5-VL without mm_token_type_ids):
            # its language model then numbers the full prompt 0..L-1
            position_ids = torch.arange(L, device=dev).view(1, 1, L).expand(3, B, L)

    embeds = self.get_input_embeddings()
    text = []
    if st.method == "coverage":
        with torch.no_grad():
            emb = embeds(input_ids)
        text_rows = {}
        for r in set(unit_rows):
            text_rows[r] = emb[r][(~is_vis[r]) & (am[r] != 0)]
        text = [text_rows[r].to(units[0].dtype) for r in unit_rows]
    picks_u = _select(st, [u.to(units[0].dtype) for u in units], text) if units else []

    # 3. keep mask over the original positions, per-item picks
    keep = (~is_vis).clone()
    pruned_outputs = {}
    for modality, d in per_mod.items():
        picks_item = []
        for first, spans in d["item_units"]:
            picks_item.append(torch.cat([picks_u[first + j].to(dev) + s
                                         for j, (s, _) in enumerate(spans)]))
        keep_tok = torch.zeros(d["flat_pos"].numel(), dtype=torch.bool, device=dev)
        for i, p in enumerate(picks_item):
            keep_tok[d["offsets"][i] + p] = True
        keep.view(-1)[d["flat_pos"][keep_tok]] = True
        pruned_outputs[modality] = _prune_output(d["out"], d["feats"], picks_item)
        d["picks"] = picks_item

    # 4. compress the prompt (rows left-padded to the longest)
    pk = _Packing.of(keep)
    Lp, removed = pk.Lp, pk.removed
    pad_id = 0
    vis_ids = {getattr(cfg, a[0]) for a in _MODALITIES.values()}
    while pad_id in vis_ids:
        pad_id += 1
    new_ids = pk.cols(input_ids, pad_id)
    new_mask = pk.cols(am, 0)
    new_tt = pk.cols(mm_token_type_ids, 0) if mm_token_type_ids is not None else None
    new_labels = pk.cols(labels.to(dev), -100) if labels is not None else None
    pos = position_ids.to(dev)
    if pos.dim() == 2:
        pos = pos.expand(B, L)
    new_pos = pk.cols(pos, 0)
    if new_pos.dim() == 3 and new_pos.shape[0] == 4:
        # generate's packed text row: contiguous text positions of the pruned prompt
        new_pos[0, pk.b, pk.d] = pos[0, pk.b, pk.j] - pk.removed_before[pk.b, pk.j]

    padded = bool((new_mask == 0).any())
    st.prompt = _Prompt(L=L, Lp=Lp, mask=new_mask, removed=removed, padded=padded)
    for modality, attr in (("image", "image"), ("video", "video")):
        d = per_mod.get(modality)
        setattr(st, f"last_tokens_per_{attr}", list(d["Ns"]) if d else [])
        setattr(st, f"last_kept_per_{attr}", [int(p.numel()) for p in d["picks"]] if d else [])
        setattr(st, f"last_{attr}_rows", list(d["rows"]) if d else [])
    st.last_seq_len = Lp
    pass_mask = new_mask if (attention_mask is not None or padded) else None
    call = dict(input_ids=new_ids, attention_mask=pass_mask, position_ids=new_pos,
                labels=new_labels, mm_token_type_ids=new_tt)
    return call, pruned_outputs


def _map_decode(self, st: _VisualPruning, cache, input_ids, inputs_embeds, attention_mask,
                position_ids):
    """A decode step's mask onto the pruned cache; position ids stay the unpruned model's."""
    p = st.prompt
    mask, s, past = _decode_mask(p, cache, input_ids, inputs_embeds, attention_mask, _FN)
    B = p.mask.shape[0]
    if position_ids is None:
        # the unpatched model's rule (compute_3d_position_ids with a cache): text positions
        # after the FULL prompt, plus rope_deltas
        dev = p.mask.device
        if attention_mask is not None:
            pos = attention_mask.long().cumsum(-1) - 1
            pos = pos.masked_fill(attention_mask == 0, 0)[:, -s:].to(dev)
        else:
            start = p.L + past - p.Lp
            pos = (start + torch.arange(s, device=dev))[None, :].expand(B, s)
        deltas = getattr(self.model, "rope_deltas", None)
        if deltas is not None:
            pos = pos + deltas.to(dev).repeat_interleave(B // deltas.shape[0], dim=0)
        position_ids = pos[None].expand(3, B, s)
    return mask, position_ids


def _qwen_pruned_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                         _cache_positional=None, inputs_embeds=None, labels=None, *,
                         logits_to_keep=0, pixel_values=None, pixel_values_videos=None,
                         image_grid_thw=None, video_grid_thw=None, mm_token_type_ids=None,
                         second_per_grid_ts=None, **kwargs):
    # (every named argument of the three families' forwards is named here too: generate
    # rejects model kwargs the instance's forward does not name)
    st: _VisualPruning = getattr(self, _ATTR)
    if second_per_grid_ts is not None:                              # Qwen2.5-VL video timing
        kwargs["second_per_grid_ts"] = second_per_grid_ts
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.dim() != 2):
        raise ValueError(f"{_FN}: attention_mask must be a 2-D (batch, length) tensor, got "
                         f"{type(attention_mask).__name__} (generate builds 4-D masks for "
                         f"compileable caches such as StaticCache: use the default DynamicCache)")
    if _cache_positional is not None:
        kwargs[forward_cache_name(type(self).forward)] = _cache_positional
    cache = cache_from_kwargs(kwargs)
    original = st.original_forward if st.original_forward is not None else \
        types.MethodType(type(self).forward, self)
    mm_out = kwargs.pop("mm_encoder_outputs", None)
    has_visual = (pixel_values is not None or pixel_values_videos is not None
                  or (mm_out is not None and (mm_out.get("image") is not None
                                              or mm_out.get("video") is not None)))
    grids = dict(image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)
    if has_visual:
        call, pruned = _prefill(self, st, input_ids, attention_mask, position_ids, labels,
                                mm_token_type_ids, {"image": pixel_values, "video": pixel_values_videos},
                                {"image": image_grid_thw, "video": video_grid_thw}, mm_out, kwargs)
        # the model's own code fills the placeholders from the (overridden) feature methods;
        # the pixel arguments only make it call them
        dummy = torch.zeros(1)
        with _FeatureOverride(self.model, pruned):
            out = original(logits_to_keep=logits_to_keep,
                           pixel_values=dummy if "image" in pruned else None,
                           pixel_values_videos=dummy if "video" in pruned else None,
                           **grids, **call, **kwargs)
        c = cache_of(out)
        st.prompt.cache_ref = weakref.ref(c) if c is not None else None
        return out
    p = st.prompt
    if (p is not None and cache is not None and p.cache_ref is not None
            and p.cache_ref() is cache and cache.get_seq_length() > 0):
        attention_mask, position_ids = _map_decode(self, st, cache, input_ids, inputs_embeds,
                                                   attention_mask, position_ids)
    elif cache is None or cache.get_seq_length() == 0:
        st.prompt = None                                            # a text-only prefill
    if mm_out is not None:
        kwargs["mm_encoder_outputs"] = mm_out
    return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    inputs_embeds=inputs_embeds, labels=labels, logits_to_keep=logits_to_keep,
                    mm_token_type_ids=mm_token_type_ids, **grids, **kwargs)


# every family exists in the whole supported range (5.17 .. 5.x); model_type is read from the
# config, so nothing here imports transformers
_FORWARDS.update({"qwen2_vl": _qwen_pruned_forward, "qwen2_5_vl": _qwen_pruned_forward,
                  "qwen3_vl": _qwen_pruned_forward})
