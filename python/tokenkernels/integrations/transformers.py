"""HF transformers integrations of tokenkernels.

* :func:`patch_causal_lm_loss` / :func:`unpatch_causal_lm_loss`: causal-LM loss via the fused
  linear cross-entropy (Llama, Mistral, Qwen2, Qwen3, Gemma 2), logits never materialised.
* :func:`apply_visual_token_pruning` / :func:`remove_visual_token_pruning`: DivPrune (kcenter)
  or MMTok (coverage) pruning of LLaVA / LLaVA-NeXT image tokens before the language model.

Tested with transformers 5.23 (the pinned range is ``transformers>=5.23,<6``).
"""
from ._hf_loss import SUPPORTED_LOSS_MODELS, patch_causal_lm_loss, unpatch_causal_lm_loss
from ._hf_visual import (SUPPORTED_VISUAL_MODELS, apply_visual_token_pruning,
                         remove_visual_token_pruning, visual_pruning_stats)

__all__ = ["patch_causal_lm_loss", "unpatch_causal_lm_loss", "SUPPORTED_LOSS_MODELS",
           "apply_visual_token_pruning", "remove_visual_token_pruning", "visual_pruning_stats",
           "SUPPORTED_VISUAL_MODELS"]
