"""Named op-level sample inputs of the tree family: one valid call of every schema op (``_out``
variant included), for opcheck, the bad-input fuzz suite and the sanitizer runs."""
from __future__ import annotations

from typing import List

import torch

import tokenkernels as tk
from tokenkernels.testing import Sample, random_parents

OPS = torch.ops.tokenkernels


def op_samples(device) -> List[Sample]:
    """Valid calls of every ``tokenkernels::tree_*`` op on ``device`` (names unique, the pytest
    ids). D = 32: the smallest head dim CUDA takes."""
    g = torch.Generator().manual_seed(0)
    par = random_parents(2, 40, seed=1)
    lens = torch.tensor([40, 17])
    tree = tk.tree.build(par, lens)
    d = lambda t: t.to(device)  # noqa: E731
    q = torch.randn(2, 40, 4, 32, generator=g)
    k = torch.randn(2, 80, 2, 32, generator=g)
    v = torch.randn(2, 80, 2, 32, generator=g)
    kp = torch.randn(30, 8, 2, 32, generator=g)
    vp = torch.randn(30, 8, 2, 32, generator=g)
    table = torch.randperm(30, generator=g)[:20].view(2, 10)
    P = torch.tensor([30, 5])
    V = 6
    draft = torch.randint(0, V, (2, 40), generator=g)
    am = torch.randint(0, V, (2, 40), generator=g)
    tp = torch.softmax(torch.randn(2, 40, V, generator=g), -1)
    dp = torch.softmax(torch.randn(2, 40, V, generator=g), -1)
    coins, bu = torch.rand(2, 40, generator=g), torch.rand(2, generator=g)
    fc, ns = tree.first_child, tree.next_sibling
    cum = torch.randn(2, 5, generator=g)
    child = torch.randn(2, 5, 3, generator=g)
    md, ml = tree.max_depth, tree.paths.shape[1]
    # D = 64 bf16: the tensor-core attention core (impl="tuned"; D = 32 above runs simt)
    q64 = torch.randn(2, 40, 4, 64, generator=g).bfloat16()
    kp64 = torch.randn(30, 8, 2, 64, generator=g).bfloat16()
    vp64 = torch.randn(30, 8, 2, 64, generator=g).bfloat16()
    return [
        Sample("tree_attention-paged-bf16-D64-ragged-tuned", OPS.tree_attention.default,
               (d(q64), d(kp64), d(vp64), d(P), d(tree.mask), d(lens), d(table), 0.25, True, "tuned")),
        Sample("tree_build-int64-ragged", OPS.tree_build.default, (d(par), d(lens), True, "auto")),
        Sample("tree_build-int32-no-lens-plain", OPS.tree_build.default, (d(par.int()), None, True, "plain")),
        Sample("tree_build-unchecked-tuned", OPS.tree_build.default, (d(par), d(lens), False, "tuned")),
        Sample("tree_paths-ragged", OPS.tree_paths.default, (d(par), d(tree.depth), d(fc), d(lens), ml, md)),
        Sample("tree_attention-contiguous-fp32-ragged", OPS.tree_attention.default,
               (d(q), d(k), d(v), d(P), d(tree.mask), d(lens), None, 0.25, True, "auto")),
        Sample("tree_attention-paged-fp16-unchecked-simt", OPS.tree_attention.default,
               (d(q.half()), d(kp.half()), d(vp.half()), d(P), d(tree.mask), None, d(table), 0.25, False, "simt")),
        Sample("tree_attention-paged-fp16-unchecked-tuned", OPS.tree_attention.default,
               (d(q.half()), d(kp.half()), d(vp.half()), d(P), d(tree.mask), None, d(table), 0.25, False, "tuned")),
        Sample("tree_attention_out-paged-fp32-plain", OPS.tree_attention_out.default,
               (d(q), d(kp), d(vp), d(P), d(tree.mask), d(lens), d(table), 0.25, True, "plain",
                d(torch.empty_like(q)), d(torch.empty(2, 40, 4)))),
        Sample("tree_verify_greedy-checked", OPS.tree_verify_greedy.default,
               (d(fc), d(ns), d(draft), d(am), md, True)),
        Sample("tree_verify_greedy-unchecked", OPS.tree_verify_greedy.default,
               (d(fc), d(ns), d(draft), d(am), md, False)),
        Sample("tree_verify_sampling-draft-probs", OPS.tree_verify_sampling.default,
               (d(fc), d(ns), d(draft), d(tp), d(dp), d(coins), d(bu), md, True)),
        Sample("tree_verify_sampling-one-hot-unchecked", OPS.tree_verify_sampling.default,
               (d(fc), d(ns), d(draft), d(tp), None, d(coins), d(bu), md, False)),
        Sample("tree_verify_sampling-rsd", OPS.tree_verify_sampling.default,
               (d(fc), d(ns), d(draft), d(tp), d(dp), d(coins), d(bu), md, True, "rsd")),
        Sample("tree_verify_sampling-rsd-fp64-unchecked", OPS.tree_verify_sampling.default,
               (d(fc), d(ns), d(draft), d(tp.double()), d(dp.double()), d(coins), d(bu), md, False, "rsd")),
        Sample("tree_select_frontier", OPS.tree_select_frontier.default, (d(cum), d(child), 7)),
        Sample("tree_select_tree", OPS.tree_select_tree.default, (d(cum), d(random_parents(2, 5, seed=2)), 3)),
    ]


def names() -> List[str]:
    """The sample names (the same on every device)."""
    return [s.name for s in op_samples("cpu")]
