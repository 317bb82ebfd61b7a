"""Prompt / context n-gram lookup as a token tree (model-free drafter).

HF's prompt lookup decoding (transformers' ``PromptLookupCandidateGenerator``) proposes, as one
chain, the tokens that followed the first earlier occurrence of the row's last n-gram. This
drafter takes the same n-gram and merges the continuations after *all* its earlier occurrences
into a trie rooted at the row's last token; ``max_matches=1`` gives exactly HF's chain.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._common import as_int
from ._types import DraftContext, DraftTree, StepResult

_NAME = "spec.LookupDrafter"
_ORDERS = ("first", "recent")


def _err(where: str, msg: str) -> str:
    return f"tokenkernels.{_NAME}{where}: {msg}"


class LookupDrafter:
    """n-gram lookup drafter: a trie of every continuation of the row's suffix n-gram.

    Args:
        max_ngram: the longest suffix n-gram tried (HF's ``max_matching_ngram_size``). Default 3.
        min_ngram: the shortest one; a row whose suffix matches nowhere with at least this many
            tokens gets the root alone (HF tries down to 1). Default 1.
        num_tokens: the most tokens taken after each occurrence (HF's
            ``prompt_lookup_num_tokens``; the trie's depth). Default 10.
        max_matches: use only the first this many occurrences (in ``order``); None = all.
            ``max_matches=1, order="first"`` is HF's candidate chain.
        order: which occurrences come first: ``"first"`` (default, HF's: left to right) or
            ``"recent"`` (right to left, the latest occurrence first). It decides which
            occurrences ``max_matches`` keeps and breaks ties between equally frequent nodes.

    Rules per row (its real tokens ``ctx.row(b)`` = s_0 .. s_{L-1}, the root s_{L-1}), as HF:
    the n-gram is the longest suffix s_{L-n} .. s_{L-1}, n from ``min(max_ngram, L - 1)`` down to
    ``min_ngram``, that also occurs ending at some position p <= L - 2 (occurrences may overlap
    the suffix); each occurrence contributes the continuation s_{p+1} .. s_{min(p + num_tokens,
    L - 1)} (at least one token). The search is one vectorised comparison of the last
    ``max_ngram`` tokens against every position (no loop over positions).

    The trie: continuations sharing a prefix share its nodes; a node's *count* is how many
    occurrences pass through it (an estimate of how likely its path is to be accepted). When
    the trie has more than ``ctx.max_tree_tokens`` nodes the most frequent are kept (count
    descending, then shallower first, then earlier occurrence in ``order``): a child never
    outranks its parent, so what is kept is a tree. Nodes are ordered by depth, then by the same
    key (parents first; node 0 = the root). Inactive rows and rows without a match get the root
    alone; the batch is ragged (``tree_lens``; padding nodes: token 0, parent 0). Candidates
    are deterministic functions of the context: ``draft_probs`` is None.

    Unlike HF, no end-of-sequence cut is made (the loop stops a row at its EOS) and the
    generation's ``max_length`` is not known here (the loop's ``max_tree_tokens`` bounds the tree).
    The drafter keeps no state: ``reset`` and ``update`` do nothing.
    """

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 10,
                 max_matches: Optional[int] = None, order: str = "first"):
        max_ngram = as_int(max_ngram, "max_ngram", _NAME)
        min_ngram = as_int(min_ngram, "min_ngram", _NAME)
        num_tokens = as_int(num_tokens, "num_tokens", _NAME)
        if min_ngram < 1:
            raise ValueError(_err("", f"min_ngram must be >= 1, got {min_ngram}"))
        if max_ngram < min_ngram:
            raise ValueError(_err("", f"max_ngram must be >= min_ngram, got max_ngram={max_ngram}, "
                                      f"min_ngram={min_ngram}"))
        if num_tokens < 1:
            raise ValueError(_err("", f"num_tokens must be >= 1, got {num_tokens}"))
        if max_matches is not None:
            max_matches = as_int(max_matches, "max_matches", _NAME)
            if max_matches < 1:
                raise ValueError(_err("", f"max_matches must be >= 1 or None, got {max_matches}"))
        if order not in _ORDERS:
            raise ValueError(_err("", f"order must be one of {list(_ORDERS)}, got {order!r}"))
        self.max_ngram, self.min_ngram, self.num_tokens = max_ngram, min_ngram, num_tokens
        self.max_matches, self.order = max_matches, order

    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Nothing to do (the drafter reads everything from the context)."""

    def update(self, ctx: DraftContext, tree: DraftTree, result: StepResult) -> None:
        """Nothing to do (the drafter reads everything from the context)."""

    # -------------------------------------------------------------------------------- search

    def matches(self, row: torch.Tensor) -> Tuple[int, torch.Tensor]:
        """(n, starts): the n-gram size used for ``row`` (L,) (0 if none) and the positions where
        the continuations start (p + 1 for every occurrence ending at p), in ``order``, cut to
        ``max_matches``."""
        L = row.numel()
        n_max = min(self.max_ngram, L - 1)
        empty = torch.zeros(0, dtype=torch.long, device=row.device)
        if n_max < self.min_ngram:
            return 0, empty
        p = torch.arange(L - 1, device=row.device)                   # occurrence ends p <= L - 2
        j = torch.arange(n_max, device=row.device)
        back = p[None, :] - j[:, None]                                # (n_max, L - 1)
        eq = (back >= 0) & (row[back.clamp(min=0)] == row[L - 1 - j][:, None])
        run = eq.long().cumprod(0).sum(0)                            # matched suffix length at p
        n = int(run.max())
        if n < self.min_ngram:
            return 0, empty
        starts = (run >= n).nonzero().squeeze(1) + 1
        if self.order == "recent":
            starts = starts.flip(0)
        if self.max_matches is not None:
            starts = starts[:self.max_matches]
        return n, starts

    def _row_tree(self, row: torch.Tensor, cap: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens, parents) of one row's trie, at most ``cap`` nodes, node 0 = row[-1]."""
        dev = row.device
        L = row.numel()
        _, starts = self.matches(row)
        root_only = (row[-1:].clone(), torch.full((1,), -1, dtype=torch.long, device=dev))
        if starts.numel() == 0 or cap == 1:
            return root_only
        T = self.num_tokens
        offs = torch.arange(T, device=dev)
        pos = starts[:, None] + offs[None, :]                         # (m, T)
        alive = pos < L
        cont = torch.where(alive, row[pos.clamp(max=L - 1)], -1)
        m = starts.numel()
        rank = torch.arange(m, device=dev)                            # occurrence rank in `order`
        # the trie, one level at a time: a node is a distinct (parent node, token) pair
        node_of = torch.zeros(m, dtype=torch.long, device=dev)        # node 0 = root
        tok, par, cnt, first, dep = [], [], [], [], []
        next_id = 1
        for t in range(T):
            live = alive[:, t].nonzero().squeeze(1)
            if live.numel() == 0:
                break
            keys = torch.stack([node_of[live], cont[live, t]], 1)
            uniq, inv, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
            u = uniq.shape[0]
            fst = torch.full((u,), m, dtype=torch.long, device=dev).scatter_reduce(
                0, inv, rank[live], reduce="amin")
            par.append(uniq[:, 0]); tok.append(uniq[:, 1]); cnt.append(counts)
            first.append(fst); dep.append(torch.full((u,), t + 1, dtype=torch.long, device=dev))
            node_of[live] = next_id + inv
            next_id += u
        tok, par, cnt = torch.cat(tok), torch.cat(par), torch.cat(cnt)
        first, dep = torch.cat(first), torch.cat(dep)
        N = tok.numel()                                               # nodes besides the root

        def by(*keys):                                                # lexicographic, first key major
            idx = torch.arange(keys[0].numel(), device=dev)
            for key in reversed(keys):
                idx = idx[torch.sort(key[idx], stable=True).indices]
            return idx

        sel = by(-cnt, dep, first)[:cap - 1]                          # the most frequent nodes
        sel = sel[by(dep[sel], -cnt[sel], first[sel])]                # parents first
        position = torch.full((N + 1,), -1, dtype=torch.long, device=dev)
        position[0] = 0
        position[sel + 1] = torch.arange(1, sel.numel() + 1, device=dev)
        tokens = torch.cat([row[-1:], tok[sel]])
        parents = torch.cat([torch.full((1,), -1, dtype=torch.long, device=dev), position[par[sel]]])
        return tokens, parents

    # ------------------------------------------------------------------------------- drafting

    def draft(self, ctx: DraftContext) -> DraftTree:
        """One trie per row (see the class docstring)."""
        where = ".draft"
        cap = as_int(ctx.max_tree_tokens, "ctx.max_tree_tokens", _NAME + where)
        if cap < 1:
            raise ValueError(_err(where, f"ctx.max_tree_tokens must be >= 1, got {cap}"))
        seq, valid = ctx.sequences, ctx.valid
        if not isinstance(seq, torch.Tensor) or seq.dim() != 2:
            raise ValueError(_err(where, f"ctx.sequences must be a 2-D (B, L) tensor, got "
                                         f"{getattr(seq, 'shape', type(seq).__name__)}"))
        if not isinstance(valid, torch.Tensor) or valid.shape != seq.shape:
            raise ValueError(_err(where, f"ctx.valid must have the shape of ctx.sequences {tuple(seq.shape)}, "
                                         f"got {getattr(valid, 'shape', type(valid).__name__)}"))
        B = seq.shape[0]
        dev = seq.device
        root = ctx.root.to(dev).long()
        active = ctx.active.to(dev).bool().tolist()
        counts = valid.sum(1).tolist()
        empty = [b for b in range(B) if counts[b] == 0]
        if empty:
            raise ValueError(_err(where, f"ctx.valid has rows without a real token (the root must be one): "
                                         f"{empty}"))
        if B:
            last = (seq.shape[1] - 1) - valid.long().flip(1).argmax(1)   # the last real position
            wrong = (seq.gather(1, last[:, None]).squeeze(1) != root) & ctx.active.to(dev).bool()
            if bool(wrong.any()):
                raise ValueError(_err(where, f"ctx.root must be the last real token of its row, rows "
                                             f"{wrong.nonzero().squeeze(1).tolist()} differ"))
        rows = []
        for b in range(B):
            if active[b]:
                rows.append(self._row_tree(seq[b][valid[b]].long(), cap))
            else:
                rows.append((root[b:b + 1], torch.full((1,), -1, dtype=torch.long, device=dev)))
        width = max((t.numel() for t, _ in rows), default=1)
        tokens = torch.zeros(B, width, dtype=torch.long, device=dev)
        parents = torch.zeros(B, width, dtype=torch.long, device=dev)
        lens = torch.tensor([t.numel() for t, _ in rows], dtype=torch.long, device=dev)
        for b, (t, p) in enumerate(rows):
            tokens[b, :t.numel()] = t
            parents[b, :p.numel()] = p
        return DraftTree(tokens=tokens, parents=parents, tree_lens=lens, draft_probs=None)
