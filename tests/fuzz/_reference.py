"""The fuzz suite's one way to the pure-PyTorch reference: one function per public op, taking
the public op's arguments.

Today each calls :mod:`tokenkernels.reference` as it is (whose signatures differ a little from
the public ops': ``tree.attention`` takes a Tree's mask, the verify ops take its links).
Once every public op takes ``impl="reference"``, each body becomes ``return <op>(*args,
**kwargs, impl="reference")`` -- here and nowhere else in tests/fuzz.
"""
from __future__ import annotations

import math

import torch

from tokenkernels import reference as R
from tokenkernels._ops.tree import Tree


def _strip(kwargs, *names):
    return {k: v for k, v in kwargs.items() if k not in names}


# ---- kcenter family
def kcenter(x, k, **kw):
    return R.kcenter.kcenter(x, k, **_strip(kw, "k_max", "check", "impl"), dtype=torch.float64)


def coverage_select(sim, k, **kw):
    return R.kcenter.coverage_select(sim, k, **_strip(kw, "k_max", "check"), dtype=torch.float64)


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
    kw = _strip(kw, "filter_eps", "accum_fp32", "check", "impl", "vocab_parallel")
    return R.cross_entropy.linear_cross_entropy(hidden, weight, targets, bias, **kw, dtype=torch.float64)


# ---- tree family
def tree_build(parents, tree_lens=None, **kw):
    p = parents if parents.dim() == 2 else parents[None]
    mask, depth, first_child, next_sibling, paths = R.tree.build(p, tree_lens)
    return dict(mask=mask, depth=depth, first_child=first_child, next_sibling=next_sibling, paths=paths)


def tree_from_paths(choices):
    return R.tree.from_paths(choices)


def tree_attention(q, k_cache, v_cache, prefix_lens, mask, *, tree_lens=None, block_table=None,
                   scale=None, return_lse=False, **kw):
    if isinstance(mask, Tree):
        tree_lens = mask.tree_lens if tree_lens is None else tree_lens
        mask = mask.mask
    if not isinstance(prefix_lens, torch.Tensor):
        prefix_lens = torch.as_tensor(prefix_lens)
    if prefix_lens.dim() == 0:
        prefix_lens = prefix_lens.reshape(1).expand(q.shape[0])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = R.tree.attention(q.double(), k_cache.double(), v_cache.double(), prefix_lens, mask,
                                tree_lens=tree_lens, block_table=block_table, scale=scale)
    return (out, lse) if return_lse else out


def tree_verify_greedy(tree, draft_tokens, target_argmax):
    d = draft_tokens if draft_tokens.dim() == 2 else draft_tokens[None]
    t = target_argmax if target_argmax.dim() == 2 else target_argmax[None]
    return R.tree.verify_greedy(tree.first_child, tree.next_sibling, d, t, tree.max_depth)


def tree_verify_sampling(tree, draft_tokens, target_probs, *, draft_probs=None, coins=None,
                         bonus_u=None, **kw):
    d = draft_tokens if draft_tokens.dim() == 2 else draft_tokens[None]
    return R.tree.verify_sampling(tree.first_child, tree.next_sibling, d, target_probs, draft_probs,
                                  coins, bonus_u, tree.max_depth)


def tree_select_frontier(cum_logp, child_logp, m):
    return R.tree.select_frontier(cum_logp, child_logp, m)


def tree_select_tree(cum_logp, parents, n):
    return R.tree.select_tree(cum_logp, parents, n)


# ---- kv_select family
def kv_score(q, k_cache, seq_lens, *, block_table=None, scale=1.0, skip=None, **kw):
    s = R.kv_select.score(q.double(), k_cache.double(), seq_lens, block_table=block_table, scale=scale)
    if skip is not None:
        s = s.masked_fill(skip.to(s.device)[:, None], float("-inf"))
    return s


def kv_topk(scores, k, seq_lens, *, n_sink=128, n_local=512, reuse=None, reuse_mask=None, **kw):
    return R.kv_select.topk(scores, k, seq_lens, n_sink=n_sink, n_local=n_local, reuse=reuse,
                            reuse_mask=reuse_mask)


def kv_sparse_decode(q, k_cache, v_cache, indices, seq_lens, *, block_table=None, scale=None,
                     return_lse=False, **kw):
    return R.kv_select.sparse_decode(q.double(), k_cache.double(), v_cache.double(), indices, seq_lens,
                                     block_table=block_table, scale=scale, return_lse=return_lse)


def kv_sparse_prefill(q, k_cache, v_cache, indices, seq_lens, chunk_start, *, block_table=None,
                      scale=None, return_lse=False, **kw):
    if isinstance(chunk_start, int):
        chunk_start = torch.full((q.shape[0],), chunk_start, dtype=torch.int32)
    return R.kv_select.sparse_prefill(q.double(), k_cache.double(), v_cache.double(), indices, seq_lens,
                                      chunk_start, block_table=block_table, scale=scale,
                                      return_lse=return_lse)


def kv_select(q, k_cache, seq_lens, *, k, n_sink=128, n_local=512, block_table=None, scale=1.0, **kw):
    return R.kv_select.select(q, k_cache, seq_lens, k=k, n_sink=n_sink, n_local=n_local,
                              block_table=block_table, scale=scale)
