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
