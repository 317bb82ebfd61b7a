"""HF transformers integrations of tokenkernels.

* :func:`patch_causal_lm_loss` / :func:`unpatch_causal_lm_loss`: causal-LM loss via the fused
  linear cross-entropy (Llama, Mistral, Qwen2, Qwen3, Gemma 2), logits never materialised.

Tested with transformers 5.23 (the pinned range is ``transformers>=5.23,<6``).
"""
from ._hf_loss import SUPPORTED_LOSS_MODELS, patch_causal_lm_loss, unpatch_causal_lm_loss

__all__ = ["patch_causal_lm_loss", "unpatch_causal_lm_loss", "SUPPORTED_LOSS_MODELS"]
