"""Issue #16 bad-input campaign (tree): errors naming the op and argument, never a crash / hang."""
import pytest
import torch

import tokenkernels as tk

from .test_bad_inputs import _attn_inputs

_OPS = torch.ops.tokenkernels
_L = lambda *x: torch.tensor(x, dtype=torch.long).view(1, -1)  # noqa: E731


def test_raw_ops_empty_tree(device):
    """n = 0 straight into the ops: an error, not a null dereference / division by zero."""
    z = torch.empty(1, 0, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match="verify_greedy: the tree must have at least one node"):
        _OPS.tree_verify_greedy(z, z, z, z, 3)
    with pytest.raises(RuntimeError, match="verify_sampling: the tree must have at least one node"):
        _OPS.tree_verify_sampling(z, z, z, torch.empty(1, 0, 5, device=device), None,
                                  torch.empty(1, 0, device=device), torch.rand(1, device=device), 3, True)
    with pytest.raises(RuntimeError, match="paths: parents must have at least one node"):
        _OPS.tree_paths(z, z, z, None, 1, 1)


def test_raw_verify_corrupt_links():
    """CPU always validates links: a huge index, a next_sibling or first_child cycle raise."""
    d = torch.zeros(1, 4, dtype=torch.long)
    none = _L(-1, -1, -1, -1)
    with pytest.raises(RuntimeError, match=r"first_child\[0, 0\] = 1000000000000 is not -1"):
        _OPS.tree_verify_greedy(_L(10**12, -1, -1, -1), none, d, d, 3)
    with pytest.raises(RuntimeError, match=r"next_sibling\[0, 2\] = 1 is not -1"):
        _OPS.tree_verify_greedy(_L(1, -1, -1, -1), _L(-1, 2, 1, -1), _L(0, 5, 5, 5), d, 3)
    with pytest.raises(RuntimeError, match=r"first_child\[0, 0\] = 0 is not -1"):
        _OPS.tree_verify_greedy(_L(0, -1, -1, -1), none, d, d, 3)


def test_raw_paths_bad_values_in_bounds():
    """Inconsistent parents / depths in a direct tree_paths call: in-bounds result, no hang."""
    t = tk.tree.build(torch.tensor([[-1, 0, 0, 1]]))
    for par, dep in [(t.parents, _L(0, -5, 1, 2)), (_L(-1, 10**12, 0, 1), t.depth), (_L(2, 2, 1, 1), t.depth)]:
        out = _OPS.tree_paths(par, dep, t.first_child, None, 4, 3)
        assert out.shape == (1, 4, 4) and int(out.min()) >= -1 and int(out.max()) < 4
    with pytest.raises(RuntimeError, match="has depth 200 > max_depth = 3"):
        _OPS.tree_paths(t.parents, _L(0, 1, 1, 200), t.first_child, None, 4, 3)


def test_raw_ops_max_depth_overflow(device):
    t = tk.tree.build(torch.tensor([[-1, 0, 0, 1]], device=device))
    d = torch.zeros(1, 4, dtype=torch.long, device=device)
    M = 2**63 - 1
    with pytest.raises(RuntimeError, match="paths: max_depth = 9223372036854775807 must lie in"):
        _OPS.tree_paths(t.parents, t.depth, t.first_child, None, 4, M)
    with pytest.raises(RuntimeError, match="verify_greedy: max_depth = 9223372036854775807"):
        _OPS.tree_verify_greedy(t.first_child, t.next_sibling, d, d, M)
    with pytest.raises(RuntimeError, match="verify_sampling: max_depth = 9223372036854775807"):
        _OPS.tree_verify_sampling(t.first_child, t.next_sibling, d, torch.ones(1, 4, 1, device=device), None,
                                  torch.ones(1, 4, device=device), torch.rand(1, device=device), M, True)


def test_attention_prefix_overflow(device):
    """prefix_lens near 2^63: P + tree_len must not wrap (it passed the fit check, then the CPU
    planned chunks without bound)."""
    t, q, k, v, _ = _attn_inputs(device)
    P = torch.tensor([2**63 - 2, 0], device=device)
    with pytest.raises(RuntimeError, match=r"request 0 needs 9223372036854775806 \+ 6 cache positions"):
        tk.tree.attention(q, k, v, P, t)
    kp = torch.randn(5, 4, 2, 32, device=device)
    table = torch.zeros(2, 4, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match="request 0 needs 2305843009213693953 pages but block_table has 4"):
        tk.tree.attention(q, kp, kp, P, t, block_table=table)


def test_build_empty_batch(device):
    t = tk.tree.build(torch.empty(0, 4, dtype=torch.long, device=device))
    assert t.paths.shape == (0, 0, 1) and t.max_depth == 0


def test_verify_sampling_bf16_softmax():
    """A valid bf16 softmax may sum to 1 -+ ~2^-9: the check's tolerance follows the dtype."""
    t = tk.tree.build(torch.tensor([[-1, 0, 0, 1]]))
    d = torch.zeros(1, 4, dtype=torch.long)
    probs = torch.full((1, 4, 8), 1 / 8, dtype=torch.bfloat16)
    probs[..., 0] -= 2**-9 * 1.9
    assert abs(float(probs.double().sum(-1)[0, 0]) - 1) > 1e-3
    tk.tree.verify_sampling(t, d, probs)
    with pytest.raises(ValueError, match="not a probability distribution"):
        tk.tree.verify_sampling(t, d, probs.float())   # the same numbers in fp32: off by > 1e-3


def test_python_argument_messages():
    p = torch.tensor([[-1, 0, 0, 1]])
    t = tk.tree.build(p)
    with pytest.raises(ValueError, match=r"from_paths: choices: the empty path is the root"):
        tk.tree.from_paths([()])
    with pytest.raises(TypeError, match="from_paths: choices must be a sequence"):
        tk.tree.from_paths(None)
    with pytest.raises(TypeError, match="from_paths: choices: child ranks must be integers"):
        tk.tree.from_paths([("a",)])
    with pytest.raises(TypeError, match="build: max_depth must be an integer"):
        tk.tree.build(p, max_depth="x", max_leaves=2)
    with pytest.raises(TypeError, match="build: tree_lens must be an integer tensor"):
        tk.tree.build(p, tree_lens="a")
    q, k = torch.randn(1, 4, 2, 32), torch.randn(1, 20, 2, 32)
    with pytest.raises(TypeError, match="attention: prefix_lens must be an integer tensor"):
        tk.tree.attention(q, k, k, None, t)
    with pytest.raises(TypeError, match="attention: scale must be a real number"):
        tk.tree.attention(q, k, k, 1, t, scale="x")
    with pytest.raises(TypeError, match="verify_sampling: target_probs must be a floating-point tensor"):
        tk.tree.verify_sampling(t, torch.zeros(1, 4, dtype=torch.long), None)
    with pytest.raises(TypeError, match="select_frontier: m must be an integer"):
        tk.tree.select_frontier(torch.zeros(1, 2), torch.zeros(1, 2, 2), None)
    with pytest.raises(TypeError, match="select_tree: n must be an integer"):
        tk.tree.select_tree(torch.zeros(1, 2), torch.tensor([[-1, 0]]), 1.5)
    with pytest.raises(TypeError, match="Tree.positions: prefix_lens must be an integer tensor"):
        t.positions(None)
    with pytest.raises(TypeError, match="DynamicTreeDrafter: top_k must be an integer"):
        tk.tree.DynamicTreeDrafter(lambda *a: None, top_k=None)
