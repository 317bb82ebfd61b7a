"""HF transformers integrations of tokenkernels.

* :func:`patch_causal_lm_loss` / :func:`unpatch_causal_lm_loss`: causal-LM loss via the fused
  linear cross-entropy (Llama, Mistral, Qwen2, Qwen3, Gemma 2), logits never materialised.
* :func:`enable_tokenselect_attention` / :func:`disable_tokenselect_attention`: TokenSelect
  decode attention (``kv_select``) registered as ``"tokenselect"`` in HF's AttentionInterface;
  :func:`tokenselect_stats` reports Selection Cache hit rates and attended tokens.
* :func:`apply_visual_token_pruning` / :func:`remove_visual_token_pruning`: DivPrune (kcenter)
  or MMTok (coverage) pruning of LLaVA / LLaVA-NeXT image tokens before the language model.
* :func:`speculative_generate` (``model.generate(..., custom_generate=speculative_generate,
  draft_model=...)``) and :func:`enable_speculative_decoding` / :func:`disable_speculative_decoding`
  (plain ``model.generate`` runs it): speculative decoding over token trees
  (:func:`tokenkernels.spec.generate`) from HF's generation config; :func:`spec_stats` /
  :func:`reset_spec_stats` report accepted tokens and target forwards.

Supported: transformers ``>=5.17,<6`` (tested with 5.17.0 and 5.24.0; see ``_hf_common``).
"""
from ._hf_loss import SUPPORTED_LOSS_MODELS, patch_causal_lm_loss, unpatch_causal_lm_loss
from ._hf_spec import (disable_speculative_decoding, enable_speculative_decoding, reset_spec_stats,
                       spec_stats, speculative_generate)
from ._hf_tokenselect import (disable_tokenselect_attention, enable_tokenselect_attention,
                              reset_tokenselect_stats, tokenselect_attention_forward,
                              tokenselect_stats)
from ._hf_visual import (SUPPORTED_VISUAL_MODELS, apply_visual_token_pruning,
                         remove_visual_token_pruning, visual_pruning_stats)

__all__ = ["patch_causal_lm_loss", "unpatch_causal_lm_loss", "SUPPORTED_LOSS_MODELS",
           "enable_tokenselect_attention", "disable_tokenselect_attention", "tokenselect_stats",
           "reset_tokenselect_stats", "tokenselect_attention_forward",
           "apply_visual_token_pruning", "remove_visual_token_pruning", "visual_pruning_stats",
           "SUPPORTED_VISUAL_MODELS", "speculative_generate", "enable_speculative_decoding",
           "disable_speculative_decoding", "spec_stats", "reset_spec_stats"]
