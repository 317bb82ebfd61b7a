"""The fuzz suite's one way to the pure-PyTorch reference: one function per public op, taking
the public op's arguments and calling the public op with ``impl="reference"`` (which runs
:mod:`tokenkernels.reference` with the same signature). ``mmtok_similarity`` has no kernel (the
public function *is* the reference), so its oracle is the defining formula in fp64, written out
here.
"""
from __future__ import annotations

import torch

import tokenkernels as tk


def _ref(fn, *args, **kw):
    kw.pop("impl", None)
    return fn(*args, **kw, impl="reference")


# ---- kcenter family
def kcenter(x, k, **kw):
    return _ref(tk.kcenter, x, k, **kw)


def coverage_select(sim, k, **kw):
    return _ref(tk.coverage_select, sim, k, **kw)


def mmtok_similarity(text, vision, *, alpha=0.5, tau_tv=0.02, tau_vv=None, text_lengths=None,
                     vision_lengths=None):
    # the reference module has none: the defining formula (fp64), written out here
    t = torch.nn.functional.normalize(text.double(), dim=-1)
    v = torch.nn.functional.normalize(vision.double(), dim=-1)
    squeeze = t.dim() == 2
    if squeeze:
        t, v = t[None], v[None]
    B, T, V = t.shape[0], t.shape[1], v.shape[1]
    tau_vv = tau_tv if tau_vv is None else tau_vv
    col = torch.ones(B, V, dtype=torch.bool) if vision_lengths is None else (
        torch.arange(V)[None] < vision_lengths.cpu()[:, None])
    row = torch.ones(B, T, dtype=torch.bool) if text_lengths is None else (
        torch.arange(T)[None] < text_lengths.cpu()[:, None])
    neg = torch.finfo(torch.float64).min
    s_tv = torch.softmax((t @ v.transpose(1, 2) / tau_tv).masked_fill(~col[:, None], neg), -1) * row[:, :, None]
    s_vv = torch.softmax((v @ v.transpose(1, 2) / tau_vv).masked_fill(~col[:, None], neg), -1) * col[:, :, None]
    out = torch.cat([alpha * s_tv, (1.0 - alpha) * s_vv], 1)
    return out[0] if squeeze else out


# ---- cross_entropy family
def linear_cross_entropy(hidden, weight, targets, bias=None, **kw):
    return _ref(tk.linear_cross_entropy, hidden, weight, targets, bias, **kw)


# ---- tree family
def tree_build(parents, tree_lens=None, **kw):
    t = _ref(tk.tree.build, parents, tree_lens, **kw)
    return dict(mask=t.mask, depth=t.depth, first_child=t.first_child, next_sibling=t.next_sibling,
                paths=t.paths)


def tree_from_paths(choices):
    return tk.tree.from_paths(choices)


def tree_attention(*args, **kw):
    return _ref(tk.tree.attention, *args, **kw)


def tree_verify_greedy(*args, **kw):
    return _ref(tk.tree.verify_greedy, *args, **kw)


def tree_verify_sampling(*args, **kw):
    return _ref(tk.tree.verify_sampling, *args, **kw)


def tree_select_frontier(*args, **kw):
    return _ref(tk.tree.select_frontier, *args, **kw)


def tree_select_tree(*args, **kw):
    return _ref(tk.tree.select_tree, *args, **kw)


# ---- kv_select family
def kv_score(*args, **kw):
    return _ref(tk.kv_select.score, *args, **kw)


def kv_topk(*args, **kw):
    return _ref(tk.kv_select.topk, *args, **kw)


def kv_sparse_decode(*args, **kw):
    return _ref(tk.kv_select.sparse_decode, *args, **kw)


def kv_sparse_prefill(*args, **kw):
    return _ref(tk.kv_select.sparse_prefill, *args, **kw)


def kv_select(*args, **kw):
    return _ref(tk.kv_select.select, *args, **kw)
