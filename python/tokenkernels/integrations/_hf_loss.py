"""HF causal-LM loss through :func:`tokenkernels.linear_cross_entropy` (logits never materialised).

``patch_causal_lm_loss(model)`` replaces the *instance's* ``forward`` (the class is untouched, so
other instances keep HF's code) with one that runs the decoder, then computes the loss from the
last hidden states and ``lm_head.weight`` block by block. Same semantics as HF's
``ForCausalLMLoss``:

* labels are shifted inside (position i predicts label i + 1; the last position is ignored),
  or ``shift_labels=`` (already shifted) is used as is;
* ``ignore_index`` (default -100) tokens contribute nothing;
* mean over the tokens not ignored, or, when the Trainer passes ``num_items_in_batch``, the sum
  divided by it (gradient accumulation across micro-batches);
* Gemma 2's ``final_logit_softcapping`` is applied inside the kernel (``softcap``).

FSDP2 (``torch.distributed.fsdp.fully_shard``): when ``lm_head`` is sharded as its own unit the
loss runs as ``lm_head``'s forward (its FSDP hooks gather the weight and reduce-scatter its
gradient); when ``lm_head`` belongs to the root unit, the root's forward (this one) already
holds the unsharded weight. Any other sharded (DTensor) weight is gathered by
``linear_cross_entropy`` itself.

Differences: with every label ignored HF's mean is 0/0 = NaN, here it is 0. Logits are returned
(``outputs.logits``) only when the patch or the call asks for them (``return_logits=True``);
without labels the model behaves exactly as HF's (logits computed as usual).
"""
from __future__ import annotations

import dataclasses
import sys
import types
from typing import Optional, Union

import torch

from ._hf_common import (cache_of, current_forward, forward_cache_name, model_type,
                         output_cache_field, require_transformers, restore_forward, slice_hidden,
                         wants_tuple)

# model_type -> where the softcap lives (None: no final-logit softcapping)
SUPPORTED_LOSS_MODELS = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "gemma2": "final_logit_softcapping",
}

_ATTR = "_tokenkernels_loss_patch"


@dataclasses.dataclass
class _LossPatch:
    original_forward: Optional[object]   # the instance attribute we replaced (None: the class's)
    return_logits: bool
    filter_eps: Union[str, float, None]
    accum_fp32: bool
    impl: str
    check: bool


def _softcap(model) -> Optional[float]:
    key = SUPPORTED_LOSS_MODELS.get(model_type(model))
    if key is None:
        return getattr(model.config, "final_logit_softcapping", None)
    return getattr(model.config, key, None)


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(hidden)
    cap = _softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _is_fsdp_module(module) -> bool:
    """Is ``module`` sharded by FSDP2's ``fully_shard`` on its own (not only inside a parent)?"""
    mod = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(mod, "FSDPModule", None) if mod is not None else None
    return cls is not None and isinstance(module, cls)


def _call_as_forward(module, fn, *args):
    """``module(*args)`` with ``fn`` as its forward: the module's hooks run around ``fn``. For an
    FSDP2 module that is the unshard (all-gather) before, the reshard after, and the backward
    hooks that all-gather again and reduce-scatter the gradients -- what FSDP2 does for a
    standalone head call (chunked losses)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def _patched_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                     _cache_positional=None, inputs_embeds=None, labels=None, use_cache=None,
                     logits_to_keep=0, **kwargs):
    # The KV cache comes as ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (older) and
    # stays in kwargs under the caller's name; a positional one (HF's 4th parameter) is passed
    # on under the name the decoder takes.
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .._ops.cross_entropy import linear_cross_entropy

    st: _LossPatch = getattr(self, _ATTR)
    return_dict = kwargs.pop("return_dict", None)
    return_logits = kwargs.pop("return_logits", None)
    return_logits = st.return_logits if return_logits is None else bool(return_logits)
    # loss-only keyword arguments (HF forwards them to the decoder too, which ignores them)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)

    if _cache_positional is not None:
        kwargs[forward_cache_name(self.model.forward)] = _cache_positional
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    hidden = slice_hidden(hidden, logits_to_keep)

    loss = None
    logits = None
    if labels is not None:
        if shift_labels is not None:
            targets, shift = shift_labels.to(hidden.device), False
        else:
            targets, shift = labels.to(hidden.device), True
        reduction = "mean" if num_items_in_batch is None else "sum"
        head = self.lm_head
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(hidden.device)

        def fused_loss(h, t):
            # lm_head.weight read here: under FSDP2 the call below runs this as lm_head's
            # forward, where the parameters are the unsharded ones. The division by
            # num_items_in_batch happens inside the op: on the CPU gradients-in-forward path it
            # is folded into the per-token weights (bf16 gradients rounded once)
            return linear_cross_entropy(h, head.weight, t, getattr(head, "bias", None),
                                        ignore_index=ignore_index, reduction=reduction,
                                        softcap=_softcap(self), shift=shift,
                                        filter_eps=st.filter_eps, accum_fp32=st.accum_fp32,
                                        check=st.check, impl=st.impl,
                                        _divisor=num_items_in_batch)

        if _is_fsdp_module(head):
            loss = _call_as_forward(head, fused_loss, hidden, targets)
        else:
            loss = fused_loss(hidden, targets)
        if return_logits:
            logits = _logits(self, hidden)
    else:
        logits = _logits(self, hidden)

    out = CausalLMOutputWithPast(loss=loss, logits=logits,
                                 hidden_states=getattr(outputs, "hidden_states", None),
                                 attentions=getattr(outputs, "attentions", None),
                                 **{output_cache_field(CausalLMOutputWithPast): cache_of(outputs)})
    return out.to_tuple() if wants_tuple(self, return_dict) else out


def patch_causal_lm_loss(model: torch.nn.Module, *, return_logits: bool = False,
                         filter_eps: Union[str, float, None] = "auto", accum_fp32: bool = False,
                         impl: str = "auto", check: bool = True, force: bool = False) -> torch.nn.Module:
    """Compute ``model(..., labels=...)``'s loss with the fused linear cross-entropy.

    Args:
        model: an HF ``*ForCausalLM`` (Llama, Mistral, Qwen2, Qwen3, Gemma 2) -- it needs
            ``.model`` (the decoder), ``.lm_head`` (``nn.Linear``) and ``.config``.
        return_logits: also compute ``outputs.logits`` when labels are given (costs the
            (B, L, V) logits again; the default returns ``logits=None`` with a loss). A call can
            override it with ``model(..., return_logits=True)``.
        filter_eps, accum_fp32, impl, check: passed to
            :func:`tokenkernels.linear_cross_entropy` (``filter_eps="auto"`` skips backward tiles
            whose gradient is below eps(dtype)/32 for bf16/fp16, exact for fp32; ``None`` = exact).
        force: patch a model type not in :data:`SUPPORTED_LOSS_MODELS` that has the same layout
            (at your own risk: its own loss extras, e.g. MoE auxiliary losses, are dropped).

    Returns the model (patched in place). Patching twice updates the options;
    :func:`unpatch_causal_lm_loss` restores HF's forward.

    Works before or after FSDP2's ``fully_shard`` (decoder layers + root, tied or untied
    embeddings, or the lm_head as its own unit, as accelerate's FSDP2 plugin wraps it): loss and
    gradients equal the single-process ones (see the module docstring).
    """
    require_transformers()
    mt = model_type(model)
    if mt not in SUPPORTED_LOSS_MODELS and not force:
        raise ValueError(f"tokenkernels.patch_causal_lm_loss: model type {mt!r} is not supported "
                         f"(supported: {sorted(SUPPORTED_LOSS_MODELS)}; force=True to try anyway)")
    lm_head = getattr(model, "lm_head", None)
    if not isinstance(lm_head, torch.nn.Linear) or not isinstance(getattr(model, "model", None), torch.nn.Module):
        raise ValueError("tokenkernels.patch_causal_lm_loss: the model needs `.model` (the decoder) and an "
                         f"nn.Linear `.lm_head`; got {type(model).__name__}")
    original = current_forward(model, _ATTR)
    setattr(model, _ATTR, _LossPatch(original_forward=original, return_logits=bool(return_logits),
                                     filter_eps=filter_eps, accum_fp32=bool(accum_fp32), impl=impl,
                                     check=bool(check)))
    model.forward = types.MethodType(_patched_forward, model)
    return model


def unpatch_causal_lm_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_causal_lm_loss` (a no-op on an unpatched model)."""
    return restore_forward(model, _ATTR)


def is_loss_patched(model: torch.nn.Module) -> bool:
    return _ATTR in model.__dict__
