"""torch.library.opcheck of every tree op, and torch.compile(fullgraph=True) smoke tests."""
import pytest
import torch

import tokenkernels as tk

from tokenkernels.testing import random_parents

OPS = torch.ops.tokenkernels


def _samples(device):
    g = torch.Generator().manual_seed(0)
    par = random_parents(2, 40, seed=1)
    lens = torch.tensor([40, 17])
    tree = tk.tree.build(par, lens)
    d = lambda t: t.to(device)  # noqa: E731
    q = torch.randn(2, 40, 4, 32, generator=g)   # D = 32: the smallest head dim CUDA takes
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
    return [
        (OPS.tree_build.default, (d(par), d(lens), True, 0)),
        (OPS.tree_build.default, (d(par.int()), None, True, 0)),
        (OPS.tree_paths.default, (d(par), d(tree.depth), d(fc), d(lens), tree.paths.shape[1], tree.max_depth)),
        (OPS.tree_attention.default, (d(q), d(k), d(v), d(P), d(tree.mask), d(lens), None, 0.25, True, 0)),
        (OPS.tree_attention.default, (d(q.half()), d(kp.half()), d(vp.half()), d(P), d(tree.mask), None, d(table),
                                      0.25, False, 0)),
        (OPS.tree_attention_out.default, (d(q), d(kp), d(vp), d(P), d(tree.mask), d(lens), d(table), 0.25, True, 0,
                                          d(torch.empty_like(q)), d(torch.empty(2, 40, 4)))),
        (OPS.tree_verify_greedy.default, (d(fc), d(ns), d(draft), d(am), tree.max_depth)),
        (OPS.tree_verify_sampling.default, (d(fc), d(ns), d(draft), d(tp), d(dp), d(coins), d(bu), tree.max_depth,
                                            True)),
        (OPS.tree_verify_sampling.default, (d(fc), d(ns), d(draft), d(tp), None, d(coins), d(bu), tree.max_depth,
                                            False)),
        (OPS.tree_select_frontier.default, (d(cum), d(child), 7)),
        (OPS.tree_select_tree.default, (d(cum), d(random_parents(2, 5, seed=2)), 3)),
    ]


UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("i", range(11))
def test_opcheck(device, i):
    op, args = _samples(device)[i]
    # the padded attention rows carry lse = -inf, which assert_close accepts (inf == inf)
    torch.library.opcheck(op, args, test_utils=UTILS)


def _pipeline(parents, q, k, v, P, draft, am):
    tree = tk.tree.build(parents, max_depth=5, max_leaves=8)
    out = tk.tree.attention(q, k, v, P, tree)
    acc, alen, bonus = tk.tree.verify_greedy(tree, draft, am)
    return tree.mask, tree.paths, out, acc, alen, bonus


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    parents = tk.tree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (2,)])[None].expand(2, 8)
    q = torch.randn(2, 8, 4, 32, generator=g)
    k = torch.randn(2, 40, 2, 32, generator=g)
    v = torch.randn(2, 40, 2, 32, generator=g)
    P = torch.tensor([20, 31])
    draft = torch.randint(0, 3, (2, 8), generator=g)
    am = torch.randint(0, 3, (2, 8), generator=g)
    inputs = [t.to(device) for t in (parents.contiguous(), q, k, v, P, draft, am)]
    want = _pipeline(*inputs)
    try:
        got = torch.compile(_pipeline, fullgraph=True)(*inputs)
    except Exception as e:  # pragma: no cover - only when inductor cannot compile C++ here
        if "InductorError" not in type(e).__name__ and "CppCompileError" not in repr(e):
            raise
        torch._dynamo.reset()
        got = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")(*inputs)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, rtol=0, atol=0)
