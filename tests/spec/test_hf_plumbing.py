"""tokenkernels.spec._hf: the tree attention function (tree.attention path, 4-D mask path, the
eager path for softcapping) against a direct computation, and the KV commit of DynamicCache /
StaticCache layers."""
from __future__ import annotations

import math

import pytest
import torch

import tokenkernels as tk
from tokenkernels.spec import _hf

from ..integrations.hf_models import causal_lm


def _direct(q, k, v, allowed, scale, softcap=None):
    """q (B, H, m, D), k/v (B, Hkv, N, D), allowed (B, m, N) -> (B, m, H, D)."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    s = torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double()) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhmn,bhnd->bhmd", s.softmax(-1), v.double()).transpose(1, 2).float()


def _setup(B=2, H=4, Hkv=2, D=16, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2]] * B)
    tree = tk.tree.build(parents)
    m = tree.n
    N = L + m
    q = torch.randn(B, H, m, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    return tree, q, k, v, L


def _module(name="llama"):
    return causal_lm(name).model.layers[0].self_attn


@pytest.mark.parametrize("fast", [True, False])
def test_tree_attention_paths_match_direct(fast):
    tree, q, k, v, L = _setup()
    B, m = q.shape[0], q.shape[2]
    prefix = torch.ones(B, L, dtype=torch.bool)
    if not fast:
        prefix[1, :3] = False                       # left padding of row 1
    anc = tree.dense_mask() | torch.eye(m, dtype=torch.bool)
    step = _hf.TreeStep(L, prefix, anc, packed=tree.mask, fast=fast)
    scale = 1 / math.sqrt(q.shape[-1])
    _hf._STATE = step
    try:
        out, _ = _hf.tree_attention_forward(_module(), q, k, v, None, scaling=scale)
    finally:
        _hf._STATE = None
    allowed = torch.cat([prefix[:, None, :].expand(B, m, L), anc], -1)
    torch.testing.assert_close(out, _direct(q, k, v, allowed, scale), rtol=1e-4, atol=1e-5)
    assert (step.fast_calls, step.dense_calls) == ((1, 0) if fast else (0, 1))


def test_tree_attention_per_query_prefix_and_static_capacity():
    """(B, m, L) prefix masks (draft levels) and a cache longer than L + m (StaticCache)."""
    tree, q, k, v, L = _setup(L=7)
    B, m = q.shape[0], q.shape[2]
    extra = 5
    k = torch.cat([k, torch.randn(B, k.shape[1], extra, k.shape[-1])], 2)
    v = torch.cat([v, torch.randn(B, v.shape[1], extra, v.shape[-1])], 2)
    pm = torch.rand(B, m, L, generator=torch.Generator().manual_seed(1)) < 0.6
    pm[:, :, 0] = True
    anc = tree.dense_mask() | torch.eye(m, dtype=torch.bool)
    _hf._STATE = _hf.TreeStep(L, pm, anc)
    try:
        out, _ = _hf.tree_attention_forward(_module(), q, k, v, None, scaling=0.3)
    finally:
        _hf._STATE = None
    allowed = torch.cat([pm, anc, torch.zeros(B, m, extra, dtype=torch.bool)], -1)
    torch.testing.assert_close(out, _direct(q, k, v, allowed, 0.3), rtol=1e-4, atol=1e-5)


def test_softcap_goes_through_eager_with_the_mask():
    tree, q, k, v, L = _setup()
    B, m = q.shape[0], q.shape[2]
    prefix = torch.ones(B, L, dtype=torch.bool)
    anc = tree.dense_mask() | torch.eye(m, dtype=torch.bool)
    mod = _module("gemma2")          # its eager attention applies the softcap
    _hf._STATE = _hf.TreeStep(L, prefix, anc, packed=tree.mask, fast=True)
    try:
        out, _ = _hf.tree_attention_forward(mod, q, k, v, None, scaling=0.25, softcap=2.0)
    finally:
        _hf._STATE = None
    allowed = torch.cat([prefix[:, None, :].expand(B, m, L), anc], -1)
    torch.testing.assert_close(out, _direct(q, k, v, allowed, 0.25, softcap=2.0), rtol=1e-4, atol=1e-5)


def test_outside_a_tree_forward_is_an_error():
    tree, q, k, v, L = _setup()
    with pytest.raises(RuntimeError, match="outside a tree forward"):
        _hf.tree_attention_forward(_module(), q, k, v, None)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_commit_moves_each_rows_accepted_slots(kind):
    from transformers import DynamicCache, StaticCache

    model = causal_lm("llama")
    B, L, n = 2, 4, 5
    cache = DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config, max_cache_len=16)
    H, D = model.config.num_key_value_heads, model.config.head_dim
    g = torch.Generator().manual_seed(0)
    for layer_idx in range(model.config.num_hidden_layers):
        kv = torch.randn(B, H, L + n, D, generator=g)
        cache.update(kv, kv + 1, layer_idx)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    keep = torch.tensor([[0, 3, 4], [0, 1, 0]])       # row 1 keeps 2 (its third entry unused)
    _hf.commit(cache, L, keep)
    assert _hf.cache_len(cache) == L + 3
    for (k0, v0), layer in zip(before, cache.layers):
        for b in range(B):
            for j in range(3 if b == 0 else 2):
                torch.testing.assert_close(layer.keys[b, :, L + j], k0[b, :, L + int(keep[b, j])])
                torch.testing.assert_close(layer.values[b, :, L + j], v0[b, :, L + int(keep[b, j])])
            torch.testing.assert_close(layer.keys[b, :, :L], k0[b, :, :L])
