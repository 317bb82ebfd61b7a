"""Visual token pruning for HF LLaVA-style models (DivPrune via ``kcenter``, MMTok via
``coverage_select``), with the language model really receiving fewer tokens.

How it works (``apply_visual_token_pruning`` replaces the instance's ``forward``):

1. Prefill (``pixel_values`` or ``mm_encoder_outputs`` given): the image features after the
   projector are computed with the model's own ``get_image_features`` (one (N_i, D) block per
   image, LLaVA-NeXT's packed blocks included), and per image ``k_i`` of them are kept:
   ``kcenter`` (cosine, isolated start: DivPrune's rule) or ``coverage_select`` over
   ``mmtok_similarity(text, vision)`` where ``text`` are the embeddings of that prompt's text
   tokens (MMTok). Kept tokens stay in their original order.
2. The prompt is rebuilt without the dropped placeholders: embeddings (placeholders filled with
   the kept features), attention mask, position ids (each kept token's original position minus
   the number of tokens dropped before it, so positions stay contiguous) and labels (if given).
   Rows that lose different numbers of tokens are left-padded to the longest row (mask 0,
   label -100).
3. Decode steps of ``generate`` arrive in the original coordinates (``input_ids``/mask grow from
   the unpruned prompt length); they are mapped onto the pruned cache: the prompt part of the
   mask is replaced by the pruned one and position ids are shifted by each row's dropped count.

The language model therefore runs its prefill, keeps its KV cache and decodes over
``L - dropped`` tokens. ``keep=1.0`` reproduces the unpruned model exactly.
"""
from __future__ import annotations

import dataclasses
import types
import weakref
from typing import Callable, Dict, List, Optional

import torch

from ._hf_common import (cache_from_kwargs, cache_of, current_forward, forward_cache_name,
                         model_type, require_transformers, restore_forward)

_ATTR = "_tokenkernels_visual_pruning"
_METHODS = ("kcenter", "coverage")
# "frame": each video frame (a temporal step of the vision grid) keeps its own share, selected
# within the frame; "clip": each video keeps one budget, selected across all of its frames
_VIDEO_BUDGETS = ("frame", "clip")


@dataclasses.dataclass
class _Prompt:
    """Bookkeeping of the last pruned prefill, used to map decode steps."""
    L: int                        # original prompt length
    Lp: int                       # pruned prompt length
    mask: torch.Tensor            # (B, Lp) pruned prompt attention mask (long)
    removed: torch.Tensor         # (B,) tokens dropped per row
    padded: bool                  # whether the pruned prompt has any masked position
    cache_ref: Optional[weakref.ref] = None


@dataclasses.dataclass
class _VisualPruning:
    original_forward: Optional[object]
    keep: Optional[float]
    k: Optional[int]
    method: str
    alpha: float
    tau: float
    video_budget: str = "frame"
    prompt: Optional[_Prompt] = None
    # statistics of the last pruned prefill (for inspection / tests)
    last_tokens_per_image: List[int] = dataclasses.field(default_factory=list)
    last_kept_per_image: List[int] = dataclasses.field(default_factory=list)
    last_image_rows: List[int] = dataclasses.field(default_factory=list)
    last_tokens_per_video: List[int] = dataclasses.field(default_factory=list)
    last_kept_per_video: List[int] = dataclasses.field(default_factory=list)
    last_video_rows: List[int] = dataclasses.field(default_factory=list)
    last_seq_len: int = 0


def _k_for(st: _VisualPruning, n: int) -> int:
    if st.k is not None:
        return max(1, min(int(st.k), n))
    return max(1, min(n, int(round(st.keep * n))))


def _image_features(self, pixel_values, image_sizes, mm_encoder_outputs, kwargs):
    if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
        feats = mm_encoder_outputs["image"].pooler_output
    else:
        fkw = dict(pixel_values=pixel_values, return_dict=True)
        for key in ("vision_feature_layer", "vision_feature_select_strategy"):
            if kwargs.get(key) is not None:
                fkw[key] = kwargs[key]
        if image_sizes is not None:
            fkw["image_sizes"] = image_sizes
        feats = self.model.get_image_features(**fkw).pooler_output
    if isinstance(feats, torch.Tensor):
        feats = list(feats) if feats.dim() == 3 else [feats]
    return list(feats)


def _select(st: _VisualPruning, feats: List[torch.Tensor], text: List[torch.Tensor]) -> List[torch.Tensor]:
    """Per image, the sorted indices of the kept feature rows."""
    from .._ops.kcenter import coverage_select, kcenter, mmtok_similarity

    n_img = len(feats)
    Ns = [int(f.shape[0]) for f in feats]
    ks = [_k_for(st, n) for n in Ns]
    if all(k == n for k, n in zip(ks, Ns)):
        return [torch.arange(n, device=f.device) for f, n in zip(feats, Ns)]
    dev, D = feats[0].device, feats[0].shape[-1]
    Nmax = max(Ns)
    x = feats[0].new_zeros((n_img, Nmax, D))
    for i, f in enumerate(feats):
        x[i, :Ns[i]] = f
    lengths = torch.tensor(Ns, dtype=torch.long, device=dev)
    k_t = torch.tensor(ks, dtype=torch.long, device=dev)
    with torch.no_grad():
        if st.method == "kcenter":
            idx = kcenter(x.detach(), k_t, lengths=lengths, metric="cosine", start="isolated",
                          sorted=True, k_max=max(ks))
        else:
            Ts = [int(t.shape[0]) for t in text]
            Tmax = max(max(Ts), 1)
            tx = x.new_zeros((n_img, Tmax, D))
            for i, t in enumerate(text):
                tx[i, :Ts[i]] = t
            sim = mmtok_similarity(tx.detach(), x.detach(), alpha=st.alpha, tau_tv=st.tau,
                                   text_lengths=torch.tensor(Ts, dtype=torch.long, device=dev),
                                   vision_lengths=lengths)
            idx = coverage_select(sim, k_t, lengths=lengths, k_max=max(ks))
            idx = torch.where(idx < 0, torch.full_like(idx, Nmax), idx).sort(dim=1).values
    return [idx[i, :ks[i]] for i in range(n_img)]


@dataclasses.dataclass
class _Packing:
    """Where the kept tokens of a (B, L) keep mask go in the pruned (B, Lp) prompt: left-packed per
    row in their order, rows left-padded to the longest. Token (b[i], j[i]) moves to column d[i]."""
    Lp: int
    removed: torch.Tensor          # (B,) tokens dropped per row
    removed_before: torch.Tensor   # (B, L) tokens dropped at or before each column
    b: torch.Tensor
    j: torch.Tensor
    d: torch.Tensor

    @staticmethod
    def of(keep: torch.Tensor) -> "_Packing":
        B, L = keep.shape
        n_keep = keep.sum(1)
        Lp = int(n_keep.max())
        csum = keep.long().cumsum(1)
        dest = (Lp - n_keep)[:, None] + csum - 1                     # left padding + rank in row
        b, j = keep.nonzero(as_tuple=True)
        before = (torch.arange(L, device=keep.device)[None, :] + 1) - csum
        return _Packing(Lp=Lp, removed=L - n_keep, removed_before=before, b=b, j=j, d=dest[b, j])

    def cols(self, x: torch.Tensor, fill) -> torch.Tensor:
        """x (..., B, L) -> (..., B, Lp): kept columns moved, the rest ``fill``."""
        out = x.new_full(x.shape[:-2] + (x.shape[-2], self.Lp), fill)
        out[..., self.b, self.d] = x[..., self.b, self.j]
        return out

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, E) -> (B, Lp, E): kept rows moved, the rest zeros."""
        out = x.new_zeros((x.shape[0], self.Lp, x.shape[-1]))
        out[self.b, self.d] = x[self.b, self.j]
        return out


def _pack_prompt(pk: _Packing, merged, am, position_ids, labels):
    """The pruned embeddings, attention mask, contiguous 1-D position ids (each kept token's
    position minus the tokens dropped at or before it) and labels (-100 on padding)."""
    B, L = am.shape
    if position_ids is None:
        pos = torch.arange(L, device=am.device).expand(B, L)
    else:
        pos = position_ids.expand(B, L) if position_ids.dim() == 2 else position_ids
    new_pos = pk.cols((pos.to(am.device) - pk.removed_before).long(), 0)
    new_labels = None if labels is None else pk.cols(labels.to(am.device), -100)
    return pk.rows(merged), pk.cols(am, 0), new_pos, new_labels


def _locate(is_tok: torch.Tensor, feats: List[torch.Tensor], fn: str, what: str):
    """The placeholders of one modality: their flat (row-major) positions, the feature count per
    item, each item's first index into them, each item's batch row."""
    flat_pos = is_tok.reshape(-1).nonzero().squeeze(1)            # row-major placeholder order
    Ns = [int(f.shape[0]) for f in feats]
    if flat_pos.numel() != sum(Ns):
        raise ValueError(f"{fn}: {what} features and {what} tokens do not match: "
                         f"{flat_pos.numel()} placeholder tokens, {sum(Ns)} features "
                         f"({len(Ns)} {what}s)")
    offsets = [0]
    for n in Ns:
        offsets.append(offsets[-1] + n)
    L = is_tok.shape[-1]
    return flat_pos, Ns, offsets, [int(flat_pos[o]) // L for o in offsets[:-1]]


def _prefill(self, st: _VisualPruning, input_ids, pixel_values, attention_mask, position_ids,
             labels, image_sizes, mm_encoder_outputs, kwargs):
    """Prune and rebuild the prompt; returns the kwargs for the original forward."""
    if input_ids is None:
        raise ValueError("tokenkernels visual pruning: pass input_ids (the image placeholders are "
                         "located by config.image_token_id), not inputs_embeds")
    cfg = self.config
    tok = cfg.image_token_id
    B, L = input_ids.shape
    dev = input_ids.device
    embed = self.get_input_embeddings()
    inputs_embeds = embed(input_ids)
    feats = _image_features(self, pixel_values, image_sizes, mm_encoder_outputs, kwargs)
    feats = [f.to(inputs_embeds.device, inputs_embeds.dtype) for f in feats]
    is_img = input_ids == tok
    flat_pos, Ns, offsets, rows = _locate(is_img, feats, "tokenkernels visual pruning", "image")
    am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    text = []
    if st.method == "coverage":
        for r in rows:
            sel = (~is_img[r]) & (am[r] != 0)
            text.append(inputs_embeds[r][sel])
    picks = _select(st, feats, text)

    # keep mask over the original positions: every non-image token, and the picked image tokens
    keep_img = torch.zeros(flat_pos.numel(), dtype=torch.bool, device=dev)
    for i, p in enumerate(picks):
        keep_img[offsets[i] + p.to(dev)] = True
    keep = (~is_img).reshape(-1).clone()
    keep[flat_pos[keep_img]] = True
    keep = keep.view(B, L)

    # embeddings with every placeholder filled (as HF does), then compressed
    merged = inputs_embeds.masked_scatter(is_img.unsqueeze(-1), torch.cat(feats, 0))
    pk = _Packing.of(keep)
    Lp, removed = pk.Lp, pk.removed
    new_embeds, new_mask, new_pos, new_labels = _pack_prompt(pk, merged, am, position_ids, labels)

    padded = bool((new_mask == 0).any()) or attention_mask is not None and bool((am == 0).any())
    st.prompt = _Prompt(L=L, Lp=Lp, mask=new_mask, removed=removed, padded=padded)
    st.last_tokens_per_image = Ns
    st.last_kept_per_image = [int(p.numel()) for p in picks]
    st.last_image_rows = rows
    st.last_seq_len = Lp
    pass_mask = new_mask if (attention_mask is not None or padded) else None
    kept_feats = torch.cat([f[p.to(f.device)] for f, p in zip(feats, picks)], 0)
    return dict(inputs_embeds=new_embeds, attention_mask=pass_mask, position_ids=new_pos,
                labels=new_labels), kept_feats


def _decode_mask(p: _Prompt, cache, input_ids, inputs_embeds, attention_mask, fn: str):
    """A decode step's attention mask (original coordinates: the unpruned prompt plus the
    generated tokens) onto the pruned cache: the prompt part replaced by the pruned prompt's mask.
    Returns (mask or None, the step's length, the cache's length)."""
    s = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    past = cache.get_seq_length()
    extra = past - p.Lp + s                                         # tokens after the prompt
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != p.L + extra:
            raise ValueError(f"{fn}: a decode step's attention_mask has shape "
                             f"{tuple(attention_mask.shape)}, expected (B, {p.L + extra}) (the unpruned "
                             f"prompt of {p.L} tokens plus {extra} generated)")
        mask = torch.cat([p.mask.to(attention_mask.dtype), attention_mask[:, p.L:]], 1)
    elif p.padded:
        mask = torch.cat([p.mask, p.mask.new_ones((p.mask.shape[0], extra))], 1)
    else:
        mask = None
    return mask, s, past


def _map_decode(st: _VisualPruning, past_key_values, input_ids, inputs_embeds, attention_mask,
                position_ids):
    """Map a decode step's (original-coordinate) mask / position ids onto the pruned cache."""
    p = st.prompt
    mask, s, past = _decode_mask(p, past_key_values, input_ids, inputs_embeds, attention_mask,
                                 "tokenkernels visual pruning")
    if position_ids is None:
        position_ids = (p.L + past - p.Lp + torch.arange(s, device=p.mask.device))[None, :]
    position_ids = position_ids - p.removed.to(position_ids.device)[:, None]
    return mask, position_ids


def _pruned_forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                    _cache_positional=None, inputs_embeds=None, labels=None, logits_to_keep=0,
                    image_sizes=None, mm_encoder_outputs=None, **kwargs):
    st: _VisualPruning = getattr(self, _ATTR)
    # The KV cache arrives as ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (older):
    # it stays in kwargs under the caller's name and is only read here.
    if _cache_positional is not None:
        kwargs[forward_cache_name(type(self).forward)] = _cache_positional
    past_key_values = cache_from_kwargs(kwargs)
    original = st.original_forward if st.original_forward is not None else \
        types.MethodType(type(self).forward, self)
    has_images = pixel_values is not None or (mm_encoder_outputs is not None
                                              and mm_encoder_outputs.get("image") is not None)
    if has_images:
        extra, kept_feats = _prefill(self, st, input_ids, pixel_values, attention_mask, position_ids,
                                     labels, image_sizes, mm_encoder_outputs, kwargs)
        for key in ("vision_feature_layer", "vision_feature_select_strategy"):
            kwargs.pop(key, None)
        out = original(input_ids=None, logits_to_keep=logits_to_keep, **extra, **kwargs)
        cache = cache_of(out)
        st.prompt.cache_ref = weakref.ref(cache) if cache is not None else None
        if hasattr(out, "image_hidden_states"):
            out.image_hidden_states = kept_feats
        return out
    return _text_step(st, original, past_key_values, input_ids, attention_mask, position_ids,
                      inputs_embeds, labels, logits_to_keep, image_sizes=image_sizes, **kwargs)


def _text_step(st: _VisualPruning, original, step_cache, input_ids, attention_mask,
               position_ids, inputs_embeds, labels, logits_to_keep, **kwargs):
    """A call without visual inputs: a decode step on the last pruned prompt's cache (mapped onto
    it), or a text-only prefill (forgets the pruned prompt); then the original forward. The cache
    itself stays in ``kwargs`` under the caller's name (``cache=`` / ``past_key_values=``);
    ``step_cache`` is the same object, only read."""
    p = st.prompt
    if (p is not None and step_cache is not None and p.cache_ref is not None
            and p.cache_ref() is step_cache and step_cache.get_seq_length() > 0):
        attention_mask, position_ids = _map_decode(st, step_cache, input_ids, inputs_embeds,
                                                   attention_mask, position_ids)
    elif step_cache is None or step_cache.get_seq_length() == 0:
        st.prompt = None                                            # a text-only prefill
    return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    inputs_embeds=inputs_embeds, labels=labels, logits_to_keep=logits_to_keep,
                    **kwargs)


# model_type -> the instance forward that prunes for that family. LLaVA / LLaVA-NeXT: here;
# other families register theirs from their own modules (imported at the end of this file).
_FORWARDS: Dict[str, Callable] = {"llava": _pruned_forward, "llava_next": _pruned_forward}


def apply_visual_token_pruning(model: torch.nn.Module, *, keep: Optional[float] = 0.098,
                               k: Optional[int] = None, method: str = "kcenter",
                               alpha: float = 0.5, tau: float = 0.02,
                               video_budget: str = "frame") -> torch.nn.Module:
    """Prune each image's visual tokens before the language model (in place).

    Args:
        model: a ``*ForConditionalGeneration`` of LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video,
            LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL or Qwen3-VL (``SUPPORTED_VISUAL_MODELS``).
        keep: fraction of each image's tokens to keep (default 0.098, DivPrune's 56 of 576);
            ignored when ``k`` is given. ``keep=1.0`` keeps everything (outputs identical to the
            unpruned model).
        k: number of tokens to keep per image (capped at the image's token count).
        method: ``"kcenter"`` (DivPrune: greedy max-min diversity, cosine distance) or
            ``"coverage"`` (MMTok: greedy maximum coverage of the prompt's text embeddings and
            of the image's own tokens, ``alpha`` / ``tau`` as in :func:`mmtok_similarity`).
        video_budget: for video inputs, ``"frame"`` (each frame keeps ``keep`` of its tokens,
            selected within the frame) or ``"clip"`` (each video keeps ``keep`` of all its
            tokens, selected across its frames). ``k`` is per frame / per clip accordingly.

    Returns the model. ``model.generate(...)`` and ``model(...)`` (with ``labels`` too) then run
    the language model on the pruned sequence; ``outputs.logits`` covers the pruned sequence.
    :func:`visual_pruning_stats` reports the last prefill's per-image token counts;
    :func:`remove_visual_token_pruning` undoes the patch.
    """
    require_transformers()
    mt = model_type(model)
    if mt not in _FORWARDS:
        raise ValueError(f"tokenkernels.apply_visual_token_pruning: model type {mt!r} is not supported "
                         f"(supported: {list(_FORWARDS)})")
    if method not in _METHODS:
        raise ValueError(f"tokenkernels.apply_visual_token_pruning: method must be 'kcenter' or "
                         f"'coverage', got {method!r}")
    if video_budget not in _VIDEO_BUDGETS:
        raise ValueError(f"tokenkernels.apply_visual_token_pruning: video_budget must be 'frame' or "
                         f"'clip', got {video_budget!r}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"tokenkernels.apply_visual_token_pruning: k must be an int >= 1, got {k!r}")
        keep = None
    else:
        if keep is None or not 0.0 < float(keep) <= 1.0:
            raise ValueError(f"tokenkernels.apply_visual_token_pruning: keep must lie in (0, 1], got {keep!r}")
        keep = float(keep)
    original = current_forward(model, _ATTR)
    setattr(model, _ATTR, _VisualPruning(original_forward=original, keep=keep, k=k, method=method,
                                         alpha=float(alpha), tau=float(tau),
                                         video_budget=video_budget))
    model.forward = types.MethodType(_FORWARDS[mt], model)
    return model


def remove_visual_token_pruning(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_visual_token_pruning` (a no-op on an unpatched model)."""
    return restore_forward(model, _ATTR)


def visual_pruning_stats(model: torch.nn.Module) -> dict:
    """The last pruned prefill: tokens per image (and per video) before/after, each image's (and
    video's) batch row, and the language model's (pruned) prompt length."""
    st = model.__dict__.get(_ATTR)
    if st is None:
        raise ValueError("tokenkernels.visual_pruning_stats: visual pruning is not applied to this model")
    return dict(tokens_per_image=list(st.last_tokens_per_image),
                kept_per_image=list(st.last_kept_per_image),
                image_rows=list(st.last_image_rows),
                tokens_per_video=list(st.last_tokens_per_video),
                kept_per_video=list(st.last_kept_per_video),
                video_rows=list(st.last_video_rows), lm_prompt_len=st.last_seq_len)


# the other families' modules register their forwards in _FORWARDS (one import line each)
from . import _hf_visual_onevision  # noqa: E402,F401
from . import _hf_visual_qwen  # noqa: E402,F401

SUPPORTED_VISUAL_MODELS = tuple(_FORWARDS)
