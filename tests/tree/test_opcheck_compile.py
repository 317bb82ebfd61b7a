"""torch.library.opcheck of every tree op, and torch.compile(fullgraph=True) smoke tests."""
import pytest
import torch

import tokenkernels as tk

from .samples import names, op_samples

SAMPLE_NAMES = names()


UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_samples_cover_every_op():
    """Every tree schema op has a sample, and the names are unique."""
    ops = {str(s.op).split(".")[-2] for s in op_samples("cpu")}
    schemas = {name.split("::")[1] for name in tk.op_names() if name.startswith("tokenkernels::tree_")}
    assert ops == schemas and len(set(SAMPLE_NAMES)) == len(SAMPLE_NAMES)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_opcheck(device, name):
    sample = {s.name: s for s in op_samples(device)}[name]
    # the padded attention rows carry lse = -inf, which assert_close accepts (inf == inf)
    torch.library.opcheck(sample.op, sample.args, test_utils=UTILS)


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
