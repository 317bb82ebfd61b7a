"""Tiny HF target / draft pairs for the spec tests (no downloads)."""
from __future__ import annotations

import copy

import torch

from ..integrations.hf_models import causal_lm


def noisy_copy(model: torch.nn.Module, rel: float, seed: int = 1) -> torch.nn.Module:
    """A draft correlated with ``model``: its weights plus Gaussian noise of ``rel`` times each
    tensor's standard deviation (high acceptance, not total)."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g) * (rel * float(p.std())))
    return d


def pair(name: str = "llama", rel: float = 0.3, **overrides):
    """(target, noisy draft) of model type ``name``."""
    t = causal_lm(name, seed=0, **overrides)
    return t, noisy_copy(t, rel)


def prompt(B: int, L: int, seed: int, vocab: int = 512, pad_left=()) -> tuple:
    """(input_ids, attention_mask): random tokens in [3, vocab), row b left-padded by
    ``pad_left[b]`` tokens (0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    am = torch.ones_like(ids)
    for b, p in enumerate(pad_left):
        am[b, :p] = 0
    return ids * am, am
