"""HF ``model.generate(...)`` running :func:`tokenkernels.spec.generate` (speculative decoding over
token trees), and the statistics of those calls.

Two ways in, both through transformers' public ``generate``:

* ``model.generate(ids, custom_generate=speculative_generate, draft_model=..., drafter=...,
  spec_tree=..., verify=..., generator=...)`` -- HF prepares the generation config, the logits
  processors and the stopping criteria as for its own decoding and calls
  :func:`speculative_generate` in place of ``_sample`` (the keywords its signature adds to
  ``_sample``'s are passed through to it);
* :func:`enable_speculative_decoding` -- an instance-level ``generate`` that adds
  ``custom_generate=speculative_generate`` and the options given at enable time to every call,
  so plain ``model.generate(ids, max_new_tokens=..., do_sample=...)`` runs speculative decoding;
  :func:`disable_speculative_decoding` puts the previous ``generate`` back.

The generation config maps onto the loop exactly or not at all: greedy (``do_sample=False``) or
sampling with HF's own temperature / top-k / top-p warpers (their values, HF's defaults included:
``top_k=50`` when sampling unless the config says otherwise), ``max_new_tokens`` /
``max_length`` (HF's max-length criterion), the eos ids of HF's eos criterion, the pad id,
``attention_mask`` (left padding), ``cache_implementation="static"``. Every other logits
processor or stopping criterion HF built for the call, beams, assisted / contrastive / DoLa
modes, ``num_return_sequences > 1``, a streamer, per-step outputs (``output_scores``,
``output_logits``, attentions, hidden states), encoder-decoder models, a non-empty cache or
other model inputs raise a ``ValueError`` naming the option: nothing is silently ignored.

Sampling draws from ``generator`` (default None: torch's global RNG, so ``torch.manual_seed``
makes a call reproducible); the draws differ from HF's own sampling (the outputs have the same
distribution, not the same values).
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from typing import Any, List, Optional

import torch

from ._hf_common import CACHE_NAMES, output_cache_field, require_transformers, restore_method

_OP = "tokenkernels.speculative_generate"
_ENABLE = "tokenkernels.enable_speculative_decoding"
_PATCH = "_tokenkernels_spec_patch"      # instance attribute: the enable_speculative_decoding state
_STATS = "_tokenkernels_spec_stats"      # instance attribute: the statistics of the calls

_DRAFTER_NAMES = ("model", "recycling", "lookup")
_VERIFY = ("specinfer", "rsd")

# HF's logits processors / stopping criteria -> the generation option that adds them (messages)
_PROCESSOR_OPTIONS = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids",
    "SequenceBiasLogitsProcessor": "sequence_bias",
    "MinLengthLogitsProcessor": "min_length / min_new_tokens",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale / negative_prompt_ids",
    "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "WatermarkLogitsProcessor": "watermarking_config",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
    "LogitNormalization": "renormalize_logits",
    "MinPLogitsWarper": "min_p",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
    "TopHLogitsWarper": "top_h",
}
_CRITERIA_OPTIONS = {
    "MaxTimeCriteria": "max_time",
    "StopStringCriteria": "stop_strings",
    "ConfidenceCriteria": "assistant_confidence_threshold",
}
_MODE_OPTIONS = {
    "beam_search": "num_beams > 1",
    "beam_sample": "num_beams > 1",
    "group_beam_search": "num_beam_groups > 1",
    "constrained_beam_search": "constraints / force_words_ids",
    "contrastive_search": "penalty_alpha (contrastive search)",
    "assisted_generation": "assisted generation (assistant_model / prompt_lookup_num_tokens / "
                           "assistant_early_exit / use_mtp)",
    "dola_generation": "dola_layers",
}
# model keyword arguments HF's generate prepares for every decoder-only call
_KNOWN_MODEL_KWARGS = ("attention_mask", "position_ids", "use_cache", "logits_to_keep") + CACHE_NAMES


def _err(msg: str, op: str = _OP) -> str:
    return f"{op}: {msg}"


# --------------------------------------------------------------------------------------------
# statistics


@dataclasses.dataclass
class _Record:
    last: Any = None                 # tokenkernels.spec.SpecStats of the last call (None: no call yet)
    calls: int = 0
    target_forwards: int = 0
    new_tokens: int = 0
    steps: int = 0
    accepted: int = 0                # accepted draft tokens, summed over steps and active rows
    row_steps: int = 0               # (step, active row) pairs
    row_forwards: int = 0            # rows x target forwards, summed over calls


def _record(model, stats, rows: int) -> None:
    rec = model.__dict__.get(_STATS)
    if rec is None:
        rec = _Record()
        model.__dict__[_STATS] = rec
    rec.last = stats
    rec.calls += 1
    rec.target_forwards += stats.target_forwards
    rec.new_tokens += stats.new_tokens
    rec.steps += stats.steps
    lens = [a for step in stats.accept_lengths for a in step if a >= 0]
    rec.accepted += sum(lens)
    rec.row_steps += len(lens)
    rec.row_forwards += rows * stats.target_forwards


def spec_stats(model: torch.nn.Module) -> dict:
    """Statistics of the speculative ``generate`` calls of ``model``.

    Returns a dict: the last call's :meth:`tokenkernels.spec.SpecStats.as_dict` (``target_forwards``,
    ``steps``, ``new_tokens``, ``tokens_per_forward``, ``mean_accepted``, ``tree_tokens``, the
    timings, the attention-path counts; zeros before the first call), plus ``calls`` and
    ``total``: the sums since :func:`enable_speculative_decoding` / :func:`reset_spec_stats` /
    the first call (``target_forwards``, ``new_tokens``, ``steps``, ``mean_accepted`` = accepted
    draft tokens per step and active row over all those calls, ``tokens_per_forward`` =
    new tokens / (rows x target forwards)).

    Raises ValueError when the model was never enabled and never ran :func:`speculative_generate`.
    """
    from ..spec import SpecStats

    rec = model.__dict__.get(_STATS) if isinstance(model, torch.nn.Module) else None
    if rec is None:
        raise ValueError("tokenkernels.spec_stats: model has no speculative decoding statistics (call "
                         "enable_speculative_decoding(model, ...) or model.generate(..., "
                         "custom_generate=speculative_generate) first)")
    out = (rec.last if rec.last is not None else SpecStats()).as_dict()
    out["calls"] = rec.calls
    out["total"] = {
        "target_forwards": rec.target_forwards,
        "new_tokens": rec.new_tokens,
        "steps": rec.steps,
        "mean_accepted": rec.accepted / rec.row_steps if rec.row_steps else 0.0,
        "tokens_per_forward": rec.new_tokens / rec.row_forwards if rec.row_forwards else 0.0,
    }
    return out


def reset_spec_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Zero :func:`spec_stats`' totals and forget the last call. Raises ValueError when the
    model was never enabled and never ran :func:`speculative_generate`."""
    if not isinstance(model, torch.nn.Module) or _STATS not in model.__dict__:
        raise ValueError("tokenkernels.reset_spec_stats: model has no speculative decoding statistics (call "
                         "enable_speculative_decoding(model, ...) or model.generate(..., "
                         "custom_generate=speculative_generate) first)")
    model.__dict__[_STATS] = _Record()
    return model


# --------------------------------------------------------------------------------------------
# the generation config -> spec.generate


def _caller_generate_locals() -> dict:
    """The arguments of the ``GenerationMixin.generate`` call that invoked us, when it did.

    With a callable ``custom_generate`` HF passes only the keywords the callable adds to
    ``_sample``'s signature; ``streamer`` (already given the prompt by ``generate``),
    ``assistant_model`` and ``synced_gpus`` are dropped. They are public parameters of
    ``generate``, so they are read from its frame to refuse them instead of ignoring them."""
    f = sys._getframe(2)
    if f is not None and f.f_code.co_name == "generate" and "custom_generate" in f.f_locals:
        return f.f_locals
    return {}


def _warp_from(processors, do_sample: bool):
    """(temperature, top_k, top_p) of HF's processor list, or a ValueError for anything else."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    temperature, top_k, top_p = 1.0, None, None
    order = {TemperatureLogitsWarper: 0, TopKLogitsWarper: 1, TopPLogitsWarper: 2}
    last = -1
    for p in list(processors or []):
        cls = type(p)
        name = cls.__name__
        if cls not in order or not do_sample:
            opt = _PROCESSOR_OPTIONS.get(name)
            what = f"{opt!s} (HF's {name})" if opt else f"the logits processor {name}"
            raise ValueError(_err(f"{what} is not supported: the speculative loop applies only greedy "
                                  f"decoding or HF's temperature / top_k / top_p sampling warp"))
        if order[cls] <= last or getattr(p, "min_tokens_to_keep", 1) != 1 or \
                getattr(p, "filter_value", float("-inf")) != float("-inf"):
            raise ValueError(_err(f"the logits processor {name} is not supported in this order or with these "
                                  f"settings (the loop warps temperature, then top_k, then top_p, keeping at "
                                  f"least one token)"))
        last = order[cls]
        if cls is TemperatureLogitsWarper:
            temperature = float(p.temperature)
        elif cls is TopKLogitsWarper:
            top_k = int(p.top_k)
        else:
            top_p = float(p.top_p)
    return temperature, top_k, top_p


def _stops_from(criteria, input_len: int):
    """(max_new_tokens, eos ids) of HF's stopping criteria, or a ValueError for anything else."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    max_length, eos = None, []
    for c in list(criteria or []):
        name = type(c).__name__
        if isinstance(c, MaxLengthCriteria):
            max_length = int(c.max_length) if max_length is None else min(max_length, int(c.max_length))
        elif isinstance(c, EosTokenCriteria):
            ids = c.eos_token_id
            eos += ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        else:
            opt = _CRITERIA_OPTIONS.get(name)
            what = f"{opt} (HF's {name})" if opt else f"the stopping criterion {name}"
            raise ValueError(_err(f"{what} is not supported: the speculative loop stops only at max_length / "
                                  f"max_new_tokens and at eos_token_id"))
    if max_length is None:
        raise ValueError(_err("generation needs max_new_tokens or max_length"))
    new = max_length - input_len
    if new < 1:
        raise ValueError(_err(f"max_length={max_length} leaves no new token after the {input_len} prompt tokens"))
    return new, eos


def _check_config(model, gc) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(_err(f"encoder-decoder models are not supported (got {type(model).__name__})"))
    mode = gc.get_generation_mode()
    mode = getattr(mode, "value", mode)
    if mode not in ("greedy_search", "sample"):
        raise ValueError(_err(f"{_MODE_OPTIONS.get(mode, mode)} is not supported (generation mode {mode!r}); "
                              f"the speculative loop does greedy decoding or sampling"))
    if (gc.num_return_sequences or 1) > 1:
        raise ValueError(_err(f"num_return_sequences={gc.num_return_sequences} is not supported (one sequence "
                              f"per prompt; repeat the prompt in the batch instead)"))
    if gc.return_dict_in_generate:
        for opt in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
            if getattr(gc, opt, False):
                raise ValueError(_err(f"{opt}=True is not supported (the loop scores whole trees per step, "
                                      f"not one token per step); return_dict_in_generate alone is"))
    impl = gc.cache_implementation
    if impl not in (None, "dynamic", "static"):
        raise ValueError(_err(f'cache_implementation={impl!r} is not supported (None / "dynamic" / "static")'))


def _cache_choice(gc, model_kwargs) -> str:
    cache = "static" if gc.cache_implementation == "static" else "dynamic"
    for name in CACHE_NAMES:
        c = model_kwargs.get(name)
        if c is None:
            continue
        seen = c.get_seq_length() if hasattr(c, "get_seq_length") else None
        if seen is None or int(seen) > 0:
            raise ValueError(_err(f"{name}= holding {seen} tokens is not supported (the loop starts from the "
                                  f"prompt with a cache of its own)"))
        from transformers import StaticCache

        if isinstance(c, StaticCache):
            cache = "static"
    return cache


def _check_model_kwargs(model_kwargs, input_ids, attention_mask) -> None:
    for k, v in model_kwargs.items():
        if k not in _KNOWN_MODEL_KWARGS and v is not None:
            raise ValueError(_err(f"the model input {k}= is not supported (the loop feeds input_ids and "
                                  f"attention_mask only)"))
    pos = model_kwargs.get("position_ids")
    if pos is not None:
        am = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        want = am.cumsum(-1) - 1
        ok = pos.shape == input_ids.shape and bool(((pos.to(want.device) == want) | (am == 0)).all())
        if not ok:
            raise ValueError(_err("position_ids= other than attention_mask.cumsum(-1) - 1 are not supported "
                                  "(the loop derives the positions from attention_mask)"))


def _output_cache(out, input_len: int, attention_mask):
    """The loop's cache when its slots hold exactly the tokens of ``sequences[:, :-1]`` at the
    same slots (HF's layout; spec.generate already cut it to that length), else None."""
    cache, valid = out.cache, out.cache_valid
    if cache is None or valid is None:
        return None
    Lf = out.sequences.shape[1]
    if valid.shape[1] != Lf - 1:
        return None
    want = torch.ones(valid.shape[0], Lf - 1, dtype=torch.bool, device=valid.device)
    if attention_mask is not None:
        want[:, :input_len] = attention_mask.bool().to(valid.device)
    return cache if torch.equal(valid, want) else None


def speculative_generate(model, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None,
                         generation_config=None, synced_gpus: bool = False, streamer=None, *,
                         draft_model=None, drafter=None, spec_tree=None, verify: str = "specinfer",
                         generator: Optional[torch.Generator] = None, **model_kwargs):
    """A ``custom_generate`` callable for transformers' ``model.generate``: runs
    :func:`tokenkernels.spec.generate` with the call's generation config.

    Use it as ``model.generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=...,
    custom_generate=speculative_generate, draft_model=draft, drafter=None, spec_tree=None,
    verify="specinfer", generator=None)``; HF calls it like ``GenerationMixin._sample``
    (``model``, ``input_ids``, the prepared ``logits_processor`` / ``stopping_criteria`` /
    ``generation_config``, ``synced_gpus``, ``streamer``, the model keyword arguments).

    Args (the ones it adds to ``generate``):
        draft_model: the draft model of ``drafter="model"`` (same vocabulary as ``model``).
        drafter: ``tokenkernels.spec.generate``'s ``drafter`` (``"model"``, the default when
            ``draft_model`` is given, ``"recycling"``, ``"lookup"`` or a
            :class:`tokenkernels.spec.Drafter` object).
        spec_tree: ``tokenkernels.spec.generate``'s ``tree`` (the drafter's tree shape / sizes).
        verify: ``"specinfer"`` or ``"rsd"`` (sampling only; greedy decoding verifies greedily).
        generator: the ``torch.Generator`` of the draws (None: torch's global RNG).

    What the config maps to: ``do_sample=False`` -> greedy (the sequences equal HF's greedy
    ``generate``); ``do_sample=True`` -> exact sampling with the temperature / top_k / top_p of the
    warpers HF built for the call (HF's defaults apply, e.g. top_k=50); ``max_length`` /
    ``max_new_tokens`` -> ``max_new_tokens``; the eos criterion's ids (none: no eos); pad id
    ``pad_token_id`` (else the first eos, as HF); ``attention_mask``;
    ``cache_implementation="static"`` (or an empty ``StaticCache``) -> ``cache="static"``;
    ``use_cache`` does not matter (the loop always keeps a KV cache; the output is the same).

    Returns the (B, L + new) sequences (``pad_token_id`` after a row's eos), or with
    ``return_dict_in_generate=True`` a ``GenerateDecoderOnlyOutput`` with ``sequences`` and, in
    the cache field, the target's KV cache cropped to ``sequences[:, :-1]`` when its slots are
    HF's layout -- else None (a batch whose rows accepted different lengths in some step, or
    where a row finished early, leaves masked holes in the cache). The call's statistics go to
    :func:`spec_stats`.

    Raises ValueError, naming the option, for what the loop cannot honour exactly: other logits
    processors (repetition_penalty, min_new_tokens, bad_words_ids, ...), other stopping criteria
    (max_time, stop_strings, ...), beams and other generation modes, num_return_sequences > 1, a
    streamer, ``assistant_model``, ``synced_gpus``, output_scores / output_logits / attentions /
    hidden states, encoder-decoder models, a non-empty cache, other model inputs
    (``inputs_embeds``, ``pixel_values``, ...).
    """
    require_transformers()
    from .. import spec

    caller = _caller_generate_locals()
    for name, v in (("streamer", streamer if streamer is not None else caller.get("streamer")),
                    ("assistant_model", caller.get("assistant_model"))):
        if v is not None:
            raise ValueError(_err(f"{name}= is not supported with custom_generate=speculative_generate"))
    if synced_gpus or caller.get("synced_gpus"):
        raise ValueError(_err("synced_gpus=True is not supported"))
    if generation_config is None:
        raise ValueError(_err("generation_config is required (call it through model.generate(..., "
                              "custom_generate=speculative_generate))"))
    if verify not in _VERIFY:
        raise ValueError(_err(f'verify must be "specinfer" or "rsd", got {verify!r}'))
    gc = generation_config
    _check_config(model, gc)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(_err("input_ids must be a (B, L) tensor of token ids with L >= 1 (inputs_embeds "
                              "are not supported)"))
    attention_mask = model_kwargs.get("attention_mask")
    _check_model_kwargs(model_kwargs, input_ids, attention_mask)
    cache = _cache_choice(gc, model_kwargs)
    do_sample = bool(gc.do_sample)
    temperature, top_k, top_p = _warp_from(logits_processor, do_sample)
    max_new, eos = _stops_from(stopping_criteria, input_ids.shape[1])
    pad = gc.pad_token_id
    if isinstance(pad, torch.Tensor):
        pad = int(pad.reshape(-1)[0])
    elif isinstance(pad, (list, tuple)):
        pad = int(pad[0]) if pad else None
    if pad is None:
        pad = eos[0] if eos else 0
    out = spec.generate(model, input_ids, draft=draft_model, drafter=drafter, tree=spec_tree,
                        max_new_tokens=max_new, temperature=temperature if do_sample else 0.0,
                        top_k=top_k, top_p=top_p, verify=verify, attention_mask=attention_mask,
                        eos_token_id=eos, pad_token_id=int(pad), generator=generator, cache=cache)
    _record(model, out.stats, input_ids.shape[0])
    if not gc.return_dict_in_generate:
        return out.sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    fields = {"sequences": out.sequences}
    try:
        fields[output_cache_field(GenerateDecoderOnlyOutput)] = _output_cache(out, input_ids.shape[1],
                                                                              attention_mask)
    except TypeError:
        pass
    return GenerateDecoderOnlyOutput(**fields)


# --------------------------------------------------------------------------------------------
# enable / disable: an instance-level generate


@dataclasses.dataclass
class _SpecPatch:
    original_generate: Optional[object]    # the instance attribute we replaced (None: the class's)
    draft: Optional[torch.nn.Module]
    drafter: Any
    tree: Any
    verify: str


_SPEC_KEYS = ("draft_model", "drafter", "spec_tree", "verify", "generator")
_HF_OWN = ("custom_generate", "assistant_model", "prompt_lookup_num_tokens")


def _check_drafter(drafter, draft, op: str) -> None:
    if drafter is None or isinstance(drafter, str):
        if drafter is not None and drafter not in _DRAFTER_NAMES:
            raise ValueError(_err(f'drafter must be "model", "recycling", "lookup" or a Drafter, got {drafter!r}', op))
        if drafter == "model" and draft is None:
            raise ValueError(_err('drafter="model" needs a draft model: pass draft=', op))
        return
    if not all(callable(getattr(drafter, m, None)) for m in ("reset", "draft", "update")):
        raise TypeError(_err(f"drafter must be a name or an object with reset/draft/update methods "
                             f"(tokenkernels.spec.Drafter), got {type(drafter).__name__}", op))


def _original_generate(model, st: _SpecPatch):
    if st.original_generate is not None:
        return st.original_generate
    return types.MethodType(type(model).generate, model)


def _call_arguments(fn, args, kwargs) -> dict:
    """Every argument of the call ``fn(*args, **kwargs)`` by name (positional ones included,
    the ``**kwargs`` of ``fn`` flattened in)."""
    try:
        sig = inspect.signature(fn)
        bound = sig.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return dict(kwargs)
    out = {}
    for name, v in bound.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(v)
        else:
            out[name] = v
    return out


def _patched_generate(self, *args, **kwargs):
    st: _SpecPatch = self.__dict__[_PATCH]
    orig = _original_generate(self, st)
    given = _call_arguments(orig, args, kwargs)
    if any(given.get(k) is not None for k in _HF_OWN):
        # an explicit custom_generate= / assistant_model= / prompt lookup: HF's own generate
        return orig(*args, **kwargs)
    if given.get("streamer") is not None:
        raise ValueError(_err("streamer= is not supported while speculative decoding is enabled "
                              "(disable_speculative_decoding(model) to stream)"))
    opts = {"draft_model": st.draft, "drafter": st.drafter, "spec_tree": st.tree, "verify": st.verify,
            "generator": None}
    for k in _SPEC_KEYS:
        if k in kwargs:
            opts[k] = kwargs.pop(k)
    return orig(*args, custom_generate=speculative_generate, **opts, **kwargs)


def enable_speculative_decoding(model: torch.nn.Module, draft: Optional[torch.nn.Module] = None, *,
                                drafter=None, tree=None, verify: str = "specinfer") -> torch.nn.Module:
    """Make plain ``model.generate(...)`` run speculative decoding (:func:`speculative_generate`).

    Replaces the *instance's* ``generate`` (the class and other instances keep HF's) with one that
    calls the previous ``generate`` with ``custom_generate=speculative_generate`` and these
    options; every generation option works as in :func:`speculative_generate` (unsupported ones
    raise ValueError). A call may override the options with ``draft_model=``, ``drafter=``,
    ``spec_tree=``, ``verify=`` and pass ``generator=``. A call that passes ``custom_generate=``,
    ``assistant_model=`` or ``prompt_lookup_num_tokens=`` explicitly (or ``assistant_model``
    positionally) is HF's own ``generate`` unchanged: the explicit choice overrides the patch for
    that call. A ``streamer=`` raises ValueError.

    Args:
        model: an HF decoder-only causal LM.
        draft: the draft model (``drafter="model"``, the default when it is given).
        drafter, tree, verify: :func:`tokenkernels.spec.generate`'s ``drafter``, ``tree`` and
            ``verify``.

    Returns the model (patched in place). Enabling again replaces the options (the undo stays
    the original ``generate``) and zeroes :func:`spec_stats`; :func:`disable_speculative_decoding`
    undoes it.
    """
    require_transformers()
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(_err(f"model must be an HF model with generate(), got {type(model).__name__}", _ENABLE))
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(_err(f"encoder-decoder models are not supported (got {type(model).__name__})", _ENABLE))
    if draft is not None and not isinstance(draft, torch.nn.Module):
        raise TypeError(_err(f"draft must be an HF model or None, got {type(draft).__name__}", _ENABLE))
    _check_drafter(drafter, draft, _ENABLE)
    if verify not in _VERIFY:
        raise ValueError(_err(f'verify must be "specinfer" or "rsd", got {verify!r}', _ENABLE))
    prev = model.__dict__.get(_PATCH)
    original = prev.original_generate if prev is not None else model.__dict__.get("generate")
    model.__dict__[_PATCH] = _SpecPatch(original_generate=original, draft=draft, drafter=drafter, tree=tree,
                                        verify=verify)
    model.generate = types.MethodType(_patched_generate, model)
    model.__dict__[_STATS] = _Record()
    return model


def disable_speculative_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable_speculative_decoding`: the instance's previous ``generate`` comes back
    (a no-op on a model that is not enabled). :func:`spec_stats` stays readable."""
    return restore_method(model, _PATCH, "generate")


def is_speculative_decoding_enabled(model: torch.nn.Module) -> bool:
    return _PATCH in getattr(model, "__dict__", {})


__all__: List[str] = ["speculative_generate", "enable_speculative_decoding", "disable_speculative_decoding",
                      "spec_stats", "reset_spec_stats"]
