"""Tree generators and an independent Medusa-style buffer builder for the tree tests."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

# Medusa's default 63-node tree (mc_sim_7b_63; the root is implicit).
MEDUSA_63 = [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4],
             [2, 0], [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8],
             [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0],
             [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0],
             [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2],
             [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0],
             [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]]


def chain(n: int) -> torch.Tensor:
    return torch.arange(-1, n - 1)


def star(n: int) -> torch.Tensor:
    p = torch.zeros(n, dtype=torch.long)
    p[0] = -1
    return p


def random_parents(B: int, n: int, seed: int, bushy: float = 0.5) -> torch.Tensor:
    """Random trees, parents before children: a mix of uniform attachment (bushy, shallow) and
    attachment to one of the last few nodes (deep)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(B, n, dtype=torch.long)
    p[:, 0] = -1
    for i in range(1, n):
        uni = torch.randint(0, i, (B,), generator=g)
        recent = (i - 1 - torch.randint(0, min(i, 3), (B,), generator=g)).clamp_min(0)
        p[:, i] = torch.where(torch.rand(B, generator=g) < bushy, uni, recent)
    return p


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
    child). Returns (mask, depth, first_child, next_sibling, paths) as ``reference.tree.build``."""
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
