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
