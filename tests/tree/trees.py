"""Test-only oracles of the tree tests: an independent Medusa-style buffer builder and an
unchecked build. The shared trees and generators live in :mod:`tokenkernels.testing`."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

# The tensors of a built tree besides its inputs (parents, tree_lens): what build computes.
FIELDS = ("mask", "depth", "first_child", "next_sibling", "paths")


def buffers(tree) -> Tuple[torch.Tensor, ...]:
    """A :class:`tokenkernels.tree.Tree`'s :data:`FIELDS`, in that order (as :func:`unchecked_build`)."""
    return tuple(getattr(tree, name) for name in FIELDS)


def medusa_buffers(choices: Sequence[Sequence[int]]):
    """Independent re-implementation of Medusa's generate_medusa_buffers bookkeeping:
    (attention mask (n, n) bool, position ids (n,), retrieve indices as a sorted list of paths)."""
    sorted_choices = sorted([list(c) for c in choices], key=lambda x: (len(x), x))
    n = len(sorted_choices) + 1
    attn = torch.eye(n, dtype=torch.bool)
    attn[:, 0] = True
    for i, c in enumerate(sorted_choices):
        for j in range(len(c) - 1):
            attn[i + 1, sorted_choices.index(c[: j + 1]) + 1] = True
    pos = torch.tensor([0] + [len(c) for c in sorted_choices])
    paths: List[Tuple[int, ...]] = []
    for c in sorted_choices:
        if any(len(o) > len(c) and o[: len(c)] == c for o in sorted_choices):
            continue   # not a leaf
        paths.append(tuple([0] + [sorted_choices.index(c[: j + 1]) + 1 for j in range(len(c))]))
    return attn, pos, sorted(paths)


def unchecked_build(parents: torch.Tensor, lens=None):
    """The documented result of ``build(..., check=False)`` on CUDA for *any* parents (brute force):
    node i (< tree_lens[b], clamped into [0, n]) follows parents[b, i] only if it lies in [0, i);
    otherwise it is the root of a detached subtree (its ancestor walk stops at it, it is nobody's
    child). Returns the tree's :data:`FIELDS` (mask, depth, first_child, next_sibling, paths)."""
    from tokenkernels.reference import tree as ref

    B, n = parents.shape
    eff = torch.full((B, n), -1, dtype=torch.long)
    Ls = []
    for b in range(B):
        L = n if lens is None else min(max(int(lens[b]), 0), n)
        Ls.append(L)
        for i in range(1, L):
            p = int(parents[b, i])
            if 0 <= p < i:
                eff[b, i] = p
    dense = torch.zeros(B, n, n, dtype=torch.bool)
    depth = torch.zeros(B, n, dtype=torch.long)
    fc = torch.full((B, n), -1, dtype=torch.long)
    ns = torch.full((B, n), -1, dtype=torch.long)
    for b in range(B):
        last = {}
        for i in range(Ls[b]):
            j, d = i, -1
            while j >= 0:
                dense[b, i, j] = True
                d += 1
                j = int(eff[b, j])
            depth[b, i] = d
            p = int(eff[b, i])
            if p >= 0:
                if p in last:
                    ns[b, last[p]] = i
                else:
                    fc[b, p] = i
                last[p] = i
    leaves = [[i for i in range(Ls[b]) if fc[b, i] < 0] for b in range(B)]
    L_max = max(len(x) for x in leaves)
    D_max = int(depth.max())
    paths = torch.full((B, L_max, D_max + 1), -1, dtype=torch.long)
    for b in range(B):
        for r, i in enumerate(leaves[b]):
            j = i
            while j >= 0:
                paths[b, r, depth[b, j]] = j
                j = int(eff[b, j])
    return ref.pack_bits(dense), depth, fc, ns, paths
