"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure"): a model-free drafter that
recycles the target's own verification logits.

An adjacency matrix ``M`` (V, k) holds, for every token t, the top-k candidates the target
proposed the last time it read t (``M[t, r]`` is the rank-r candidate). A step drafts a tree by
expanding a fixed template of child ranks from the root through ``M``; after the verification
every real tree node's row of ``M`` is overwritten with the top-k of the target's logits after
that node. The candidates are deterministic functions of the context (``draft_probs`` None),
so verification is exact in every verify mode.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple

import torch

from .._common import as_int
from ..tree import from_paths
from ._types import DraftContext, DraftTree, StepResult

_NAME = "spec.RecyclingDrafter"

# The default static tree: 72 nodes (the root and these 71 paths of child ranks), depth 6, level
# widths 8 / 16 / 16 / 13 / 11 / 7 -- wide near the root, narrow deep. It is the 71 paths of depth
# <= 6 with the largest product of per-rank priors (0.6, 0.15, 0.07, 0.045, 0.03, 0.02, 0.015,
# 0.012 for ranks 0..7): a rough acceptance rate of the rank-r candidate of the target, so a path's
# product estimates the chance that all of it is accepted (the principle of the paper's 81-node
# tree and of Medusa's trees: keep the nodes most likely to be accepted). Every prefix of a path is
# in the list (a product of priors < 1 shrinks along a path), so it is a valid template.
DEFAULT_TEMPLATE: Tuple[Tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,),
    (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1),
    (3, 0), (4, 0), (5, 0), (6, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4), (0, 1, 0), (0, 1, 1), (0, 2, 0),
    (0, 3, 0), (0, 4, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 3), (0, 0, 1, 0), (0, 0, 2, 0),
    (0, 0, 3, 0), (0, 1, 0, 0), (0, 2, 0, 0), (0, 3, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0),
    (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0),
    (0, 0, 1, 0, 0), (0, 0, 2, 0, 0), (0, 1, 0, 0, 0), (0, 2, 0, 0, 0), (1, 0, 0, 0, 0),
    (2, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 0, 1, 0), (0, 0, 0, 1, 0, 0),
    (0, 0, 1, 0, 0, 0), (0, 1, 0, 0, 0, 0), (1, 0, 0, 0, 0, 0),
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _err(where: str, msg: str) -> str:
    return f"tokenkernels.{_NAME}{where}: {msg}"


def _template_arrays(template, k: int):
    """template -> (parents (n,), ranks (n,), depth (n,)) int64 in from_paths' node order."""
    if isinstance(template, (str, bytes)) or not hasattr(template, "__iter__"):
        raise TypeError(_err("", f"template must be a sequence of tuples of child ranks, got "
                                 f"{type(template).__name__}"))
    paths = []
    for ch in template:
        if isinstance(ch, (str, bytes)) or not hasattr(ch, "__iter__"):
            raise TypeError(_err("", f"template: every entry must be a tuple of child ranks, got {ch!r}"))
        ranks = []
        for r in ch:
            if isinstance(r, bool) or not hasattr(r, "__index__"):
                raise TypeError(_err("", f"template: child ranks must be integers, got {r!r} in {ch!r}"))
            r = operator.index(r)
            if not 0 <= r < k:
                raise ValueError(_err("", f"template: child ranks must be in [0, k) = [0, {k}), got "
                                          f"{r} in {tuple(ch)!r}"))
            ranks.append(r)
        paths.append(tuple(ranks))
    try:
        parents = from_paths(paths)   # checks: no empty path, no duplicate, every prefix listed
    except (ValueError, TypeError) as e:
        raise type(e)(_err("", f"template is not a tree ({e})")) from None
    order = sorted(paths, key=lambda c: (len(c), c))   # from_paths' node order (node j + 1 = order[j])
    ranks = torch.tensor([0] + [c[-1] for c in order], dtype=torch.long)
    depth = torch.tensor([0] + [len(c) for c in order], dtype=torch.long)
    return parents, ranks, depth


class RecyclingDrafter:
    """Token Recycling drafter (model-free; deterministic candidates, ``draft_probs`` None).

    Args:
        vocab_size: V, the rows of the adjacency matrix. None: taken from the first
            ``DraftContext.vocab_size`` (or the first logits given to :meth:`prime` /
            :meth:`update`), whichever comes first.
        k: candidates kept per token (columns of ``M``), >= 1 and <= V. Default 8.
        template: the static tree, Medusa-style paths of child ranks (every prefix of a path
            listed, ranks in [0, k)), e.g. ``[(0,), (1,), (0, 0)]``; the node with path
            (..., r) under a node of token t gets token ``M[t, r]``. Default
            :data:`DEFAULT_TEMPLATE` (72 nodes with the root, depth 6), without its paths through
            a rank >= k when k < 8 (k = 4: 59 nodes, k = 2: 32).
        device: where ``M`` lives. None: the device of the first tensors the drafter sees.
        index_dtype: ``torch.int64`` (default) or ``torch.int32`` storage of ``M`` (V * k * 8
            bytes: 2 MB for V = 32000, k = 8; half that in int32).

    State: ``M`` starts as -1 everywhere, "no candidate". A node whose candidate is -1 (or whose
    parent is pruned) is **pruned**: the tree keeps the template nodes whose whole path has
    candidates, compacted in template order (parents first), so before any update a row's tree
    is the root alone (one plain decoding step) and grows as ``M`` fills. ``M`` is **kept across
    generations** (:meth:`reset` does not clear it: what one generation recycled serves the
    next); :meth:`clear` empties it.

    Steps: ``draft`` expands the template breadth-first from every row's root (one gather per
    template level over the whole batch), prunes, and keeps the first ``ctx.max_tree_tokens``
    surviving nodes in template order (by depth, then by ranks; still a tree); inactive rows get
    the root alone; the batch is ragged (``tree_lens``, width = the largest tree). ``update``
    recycles ``result.target_logits``: for every real node i
    (``i < tree_lens[b]``) of every active row, ``M[tokens[b, i]] = topk(target_logits[b, i],
    k).indices``. When a token occurs at several nodes of the step, the row is taken from a node
    on an accepted path if there is one (its context is the one that really happened), else from
    the last such node in (row, node) order -- deterministic on every device. The loop should
    call :meth:`prime` after the prefill, when the drafter has it (``hasattr(drafter,
    "prime")``), to seed ``M`` from the prompt's logits as the paper does.
    """

    def __init__(self, vocab_size: Optional[int] = None, *, k: int = 8,
                 template: Optional[Sequence[Sequence[int]]] = None,
                 device: Optional[torch.device] = None, index_dtype: torch.dtype = torch.int64):
        k = as_int(k, "k", _NAME)
        if k < 1:
            raise ValueError(_err("", f"k must be >= 1, got {k}"))
        if vocab_size is not None:
            vocab_size = as_int(vocab_size, "vocab_size", _NAME)
            if vocab_size < 1:
                raise ValueError(_err("", f"vocab_size must be >= 1, got {vocab_size}"))
            if k > vocab_size:
                raise ValueError(_err("", f"k must be <= vocab_size, got k={k}, vocab_size={vocab_size}"))
        if index_dtype not in (torch.int64, torch.int32):
            raise TypeError(_err("", f"index_dtype must be torch.int64 or torch.int32, got {index_dtype}"))
        self.k = k
        self.vocab_size = vocab_size
        self.index_dtype = index_dtype
        if template is None:   # the default, without the paths through ranks >= k (still a tree)
            template = [c for c in DEFAULT_TEMPLATE if max(c) < k]
        self._parents, self._ranks, self._depth = _template_arrays(template, k)
        self.template = tuple(tuple(c) for c in template)
        self._device = None if device is None else torch.device(device)
        self.M: Optional[torch.Tensor] = None
        if vocab_size is not None and self._device is not None:
            self._alloc(vocab_size, self._device)

    # -------------------------------------------------------------------------------- state

    @property
    def num_nodes(self) -> int:
        """Nodes of the full template tree (the root included)."""
        return self._parents.numel()

    def _alloc(self, V: int, device: torch.device) -> None:
        if self.k > V:
            raise ValueError(_err("", f"k must be <= vocab_size, got k={self.k}, vocab_size={V}"))
        self.vocab_size = V
        self._device = device
        self.M = torch.full((V, self.k), -1, dtype=self.index_dtype, device=device)

    def _ensure(self, V: int, device: torch.device, where: str) -> None:
        """Allocate ``M`` on first use; afterwards V and the device must match."""
        if self.M is None:
            if self.vocab_size is not None and V != self.vocab_size:
                raise ValueError(_err(where, f"vocabulary size {V} differs from vocab_size={self.vocab_size}"))
            self._alloc(V, self._device if self._device is not None else device)
        elif V != self.vocab_size:
            raise ValueError(_err(where, f"vocabulary size {V} differs from the drafter's {self.vocab_size}"))
        if device != self.M.device:
            raise ValueError(_err(where, f"tensors are on {device} but the adjacency matrix is on "
                                         f"{self.M.device}"))

    def clear(self) -> None:
        """Forget every candidate (``M`` back to -1)."""
        if self.M is not None:
            self.M.fill_(-1)

    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """A new generation: nothing to do (``M`` is kept across generations; see :meth:`clear`)."""

    # ------------------------------------------------------------------------------- updates

    def _write(self, tokens: torch.Tensor, rows: torch.Tensor, priority: torch.Tensor,
               logits: torch.Tensor, where: str) -> None:
        """M[tokens[j]] = topk(logits[rows[j]], k) for one winner j per distinct token: the
        largest ``priority[j]`` (distinct values >= 0). Only the winners' logits rows are read."""
        if tokens.numel() == 0:
            return
        V = self.vocab_size
        if int(tokens.min()) < 0 or int(tokens.max()) >= V:
            raise ValueError(_err(where, f"token ids must be in [0, {V}), got "
                                         f"[{int(tokens.min())}, {int(tokens.max())}]"))
        best = torch.full((V,), -1, dtype=priority.dtype, device=tokens.device)
        best.scatter_reduce_(0, tokens, priority, reduce="amax")
        win = best[tokens] == priority
        top = torch.topk(logits[rows[win]], self.k, dim=-1).indices
        self.M[tokens[win]] = top.to(self.index_dtype)

    def _check_logits(self, logits, name: str, where: str, lead: Tuple[int, ...]) -> None:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(_err(where, f"{name} must be a torch.Tensor, got {type(logits).__name__}"))
        if logits.dim() != len(lead) + 1 or tuple(logits.shape[:-1]) != lead:
            raise ValueError(_err(where, f"{name} must have shape {lead + ('V',)}, got {tuple(logits.shape)}"))
        if logits.dtype not in _FLOATS:
            raise TypeError(_err(where, f"{name} must be float32, float16 or bfloat16, got {logits.dtype}"))

    def prime(self, input_ids: torch.Tensor, logits: torch.Tensor,
              attention_mask: Optional[torch.Tensor] = None) -> None:
        """Seed ``M`` from the prefill: ``input_ids`` (B, L), ``logits`` (B, L, V) the target's
        logits after every prompt token, ``attention_mask`` (B, L) (0 = padding, skipped; None =
        all real). For every real prompt token t, ``M[t]`` = the top-k of the logits after it;
        a token occurring several times takes its last occurrence (the largest (row, position))."""
        where = ".prime"
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(_err(where, f"input_ids must be a 2-D (B, L) tensor, got "
                                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"))
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(_err(where, f"input_ids must be int64 or int32, got {input_ids.dtype}"))
        B, L = input_ids.shape
        self._check_logits(logits, "logits", where, (B, L))
        if attention_mask is None:
            real = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
        else:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
                raise ValueError(_err(where, f"attention_mask must have shape {(B, L)}, got "
                                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}"))
            real = attention_mask.bool()
        self._ensure(logits.shape[-1], logits.device, where)
        flat = real.reshape(-1).nonzero().squeeze(1)
        self._write(input_ids.reshape(-1)[flat].long(), flat, flat, logits.reshape(B * L, -1), where)

    def update(self, ctx: DraftContext, tree: DraftTree, result: StepResult) -> None:
        """Recycle the verification: ``M[t_i]`` = top-k of ``result.target_logits[b, i]`` for
        every real node i of every active row (see the class docstring for repeated tokens)."""
        where = ".update"
        B, n = tree.tokens.shape
        self._check_logits(result.target_logits, "result.target_logits", where, (B, n))
        self._ensure(result.target_logits.shape[-1], result.target_logits.device, where)
        dev = tree.tokens.device
        lens = torch.full((B,), n, dtype=torch.long, device=dev) if tree.tree_lens is None \
            else tree.tree_lens.to(dev).long()
        node = torch.arange(n, device=dev)
        real = (node[None, :] < lens[:, None]) & ctx.active.to(dev).bool()[:, None]
        # nodes on an accepted path win over the others; then the later (row, node)
        acc = result.accepted.to(dev).long()
        on_path = torch.zeros(B, n + 1, dtype=torch.bool, device=dev)
        on_path.scatter_(1, torch.where(acc < 0, n, acc), True)
        priority = torch.arange(B * n, device=dev) + on_path[:, :n].reshape(-1).long() * (B * n)
        flat = real.reshape(-1).nonzero().squeeze(1)
        self._write(tree.tokens.reshape(-1)[flat].long(), flat, priority[flat],
                    result.target_logits.reshape(B * n, -1), where)

    # ------------------------------------------------------------------------------- drafting

    def draft(self, ctx: DraftContext) -> DraftTree:
        """Expand the template from every row's root through ``M`` (see the class docstring)."""
        where = ".draft"
        root = ctx.root
        dev = root.device
        self._ensure(int(ctx.vocab_size), dev, where)
        cap = as_int(ctx.max_tree_tokens, "ctx.max_tree_tokens", _NAME + where)
        if cap < 1:
            raise ValueError(_err(where, f"ctx.max_tree_tokens must be >= 1, got {cap}"))
        B = root.shape[0]
        root = root.long()
        active = ctx.active.to(dev).bool()
        bad = active & ((root < 0) | (root >= self.vocab_size))
        if bool(bad.any()):
            raise ValueError(_err(where, f"ctx.root of an active row must be a token id in [0, "
                                         f"{self.vocab_size}), got {root[bad].tolist()}"))
        n = self.num_nodes
        parents_t = self._parents.to(dev)
        ranks_t = self._ranks.to(dev)
        depth_t = self._depth
        tokens = torch.full((B, n), -1, dtype=torch.long, device=dev)
        tokens[:, 0] = root
        M = self.M
        for d in range(1, int(depth_t.max()) + 1):          # one gather per level, whole batch
            idx = (depth_t == d).nonzero().squeeze(1).to(dev)
            par = tokens[:, parents_t[idx]]                  # (B, w); -1 = pruned parent
            cand = M[par.clamp(min=0), ranks_t[idx][None, :]].long()
            tokens[:, idx] = torch.where(par < 0, -1, cand)
        keep = tokens >= 0
        keep[:, 1:] &= active[:, None]
        keep &= keep.long().cumsum(1) <= cap               # the first `cap` surviving nodes
        # compact the kept nodes (a prefix-closed set, so template order stays parents-first)
        new_index = keep.long().cumsum(1) - 1               # (B, n) position of a kept node
        lens = keep.sum(1)
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
        out_tokens = tokens.gather(1, order)
        old_par = parents_t[None, :].expand(B, n).gather(1, order)
        out_par = new_index.gather(1, old_par.clamp(min=0))
        pos = torch.arange(n, device=dev)[None, :]
        pad = pos >= lens[:, None]
        out_tokens = out_tokens.masked_fill(pad, 0)
        out_par = out_par.masked_fill(pad, 0)
        out_par[:, 0] = -1
        width = max(int(lens.max()), 1) if B else 1
        return DraftTree(tokens=out_tokens[:, :width].contiguous(), parents=out_par[:, :width].contiguous(),
                         tree_lens=lens, draft_probs=None)
