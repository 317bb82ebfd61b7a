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


# ---------------------------------------- defects found by tests/fuzz, fixed
_P2 = lambda device="cpu": torch.tensor([-1, 0], device=device)  # noqa: E731


def _verify_inputs(device):
    t = tk.tree.build(torch.tensor([[-1, 0, 0, 1]], device=device))
    d = torch.zeros(1, 4, dtype=torch.long, device=device)
    probs = torch.full((1, 4, 3), 1 / 3, device=device)
    return t, d, probs


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("kw,match", [
    pytest.param(dict(max_depth=2**31, max_leaves=1), r"max_depth = 2147483648 must lie in \[0, n - 1 = 1\]",
                 id="max_depth-2**31"),
    pytest.param(dict(max_depth=2, max_leaves=1), r"max_depth = 2 must lie in \[0, n - 1 = 1\]", id="max_depth-n"),
    pytest.param(dict(max_depth=1, max_leaves=2**31), r"max_leaves = 2147483648 must lie in \[0, n = 2\]",
                 id="max_leaves-2**31"),
    pytest.param(dict(max_depth=1, max_leaves=3), r"max_leaves = 3 must lie in \[0, n = 2\]", id="max_leaves-n+1"),
])
def test_build_sizes_bounded_by_n(device, impl, kw, match):
    """max_depth / max_leaves beyond what a tree of n nodes can need: an error naming them, not
    a 34-275 GB allocation (tree-sizes-unbounded)."""
    with pytest.raises(RuntimeError, match="paths: " + match):
        tk.tree.build(_P2(device), impl=impl, **kw)
    t = tk.tree.build(_P2(device), max_depth=1, max_leaves=2, impl=impl)   # the bounds themselves
    assert t.paths.shape == (1, 2, 2)


@pytest.mark.parametrize("op", ["paths", "verify_greedy", "verify_sampling"])
def test_raw_ops_sizes_bounded_by_n(device, op):
    t, d, probs = _verify_inputs(device)
    one = torch.ones(1, 4, device=device)
    calls = {
        "paths": lambda md: _OPS.tree_paths(t.parents, t.depth, t.first_child, None, 4, md),
        "verify_greedy": lambda md: _OPS.tree_verify_greedy(t.first_child, t.next_sibling, d, d, md),
        "verify_sampling": lambda md: _OPS.tree_verify_sampling(t.first_child, t.next_sibling, d, probs, None, one,
                                                                torch.rand(1, device=device), md, True),
    }
    with pytest.raises(RuntimeError, match=rf"{op}: max_depth = 4 must lie in \[0, n - 1 = 3\]"):
        calls[op](4)
    calls[op](3)
    if op == "paths":
        with pytest.raises(RuntimeError, match=r"paths: max_leaves = 5 must lie in \[0, n = 4\]"):
            _OPS.tree_paths(t.parents, t.depth, t.first_child, None, 5, 3)


def _tree_type_calls():
    t, d, probs = _verify_inputs("cpu")
    q, k = torch.randn(1, 4, 2, 32), torch.randn(1, 20, 2, 32)
    P = torch.tensor([3])
    return [
        pytest.param(lambda i: tk.tree.build(_P2(), check="yes", impl=i), TypeError,
                     "tree.build: check must be a bool, got str", id="build-check-str"),
        pytest.param(lambda i: tk.tree.build(_P2(), check=1, impl=i), TypeError,
                     "tree.build: check must be a bool, got int", id="build-check-int"),
        pytest.param(lambda i: tk.tree.build(_P2(), max_depth=2**64, max_leaves=1, impl=i), ValueError,
                     "tree.build: max_depth must fit in int64, got 18446744073709551616", id="build-max_depth-2**64"),
        pytest.param(lambda i: tk.tree.build(_P2(), max_depth=1, max_leaves=-(2**64), impl=i), ValueError,
                     "tree.build: max_leaves must fit in int64", id="build-max_leaves--2**64"),
        pytest.param(lambda i: tk.tree.build(_P2(), tree_lens=[2**64], impl=i), ValueError,
                     "tree.build: tree_lens must fit in int64", id="build-tree_lens-list-2**64"),
        pytest.param(lambda i: tk.tree.attention(q, k, k, P, t, check="yes", impl=i), TypeError,
                     "tree.attention: check must be a bool, got str", id="attention-check-str"),
        pytest.param(lambda i: tk.tree.attention(q, k, k, P, t, return_lse="no", impl=i), TypeError,
                     "tree.attention: return_lse must be a bool, got str", id="attention-return_lse-str"),
        pytest.param(lambda i: tk.tree.attention(q, k, k, P, t.mask, tree_lens=2**64, impl=i), ValueError,
                     "tree.attention: tree_lens must fit in int64", id="attention-tree_lens-2**64"),
        pytest.param(lambda i: tk.tree.attention(q, k, k, P, t.mask, tree_lens="x", impl=i), TypeError,
                     "tree.attention: tree_lens must be an integer tensor", id="attention-tree_lens-str"),
        pytest.param(lambda i: tk.tree.attention(q, k, k, P, t, block_table=[[2**64]], impl=i), ValueError,
                     "tree.attention: block_table must fit in int64", id="attention-block_table-2**64"),
        pytest.param(lambda i: tk.tree.attention(q, k, k, 2**64, t, impl=i), ValueError,
                     "tree.attention: prefix_lens must fit in int64", id="attention-prefix_lens-2**64"),
        pytest.param(lambda i: tk.tree.verify_greedy(t, d, d, check="yes", impl=i), TypeError,
                     "tree.verify_greedy: check must be a bool, got str", id="verify_greedy-check-str"),
        pytest.param(lambda i: tk.tree.verify_sampling(t, d, probs, check=None, impl=i), TypeError,
                     "tree.verify_sampling: check must be a bool, got NoneType", id="verify_sampling-check-none"),
        pytest.param(lambda i: tk.tree.select_frontier(torch.zeros(1, 2), torch.zeros(1, 2, 3), 2**64, impl=i),
                     ValueError, "tree.select_frontier: m must fit in int64", id="select_frontier-m-2**64"),
        pytest.param(lambda i: tk.tree.select_tree(torch.zeros(1, 2), torch.tensor([[-1, 0]]), 2**64, impl=i),
                     ValueError, "tree.select_tree: n must fit in int64", id="select_tree-n-2**64"),
        pytest.param(lambda i: tk.tree.select_tree(torch.zeros(1, 2), torch.tensor([[-1, 0]]), True, impl=i),
                     TypeError, "tree.select_tree: n must be an integer, got bool", id="select_tree-n-bool"),
    ]


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("call,exc,match", _tree_type_calls())
def test_wrapper_python_types(call, exc, match, impl):
    """Bool options are real bools ("yes" was silently truthy) and ints past int64 are errors
    naming the argument, not torch's schema-parser message (tree-wrapper-types)."""
    with pytest.raises(exc, match=match):
        call(impl)


def test_bool_options_accept_numpy_bools():
    np = pytest.importorskip("numpy")
    t = tk.tree.build(_P2(), check=np.True_)
    t2, d, _ = _verify_inputs("cpu")
    acc, alen, bonus = tk.tree.verify_greedy(t2, d, d, check=np.False_)
    assert t.max_depth == 1 and acc.shape == (1, 3)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_build_meta_parents(impl):
    """Meta parents: an error naming them when the sizes would have to be read back (it was
    'Cannot copy out of meta tensor'), a meta Tree of the right shapes when they are given
    (tree-build-meta)."""
    p = torch.tensor([[-1, 0, 0]], device="meta")
    with pytest.raises(ValueError, match="tree.build: parents is on meta: pass max_depth and max_leaves"):
        tk.tree.build(p, impl=impl)
    with pytest.raises(ValueError, match="tree.build: parents is on meta"):
        tk.tree.build(p, max_depth=1, impl=impl)
    if impl == "auto":
        t = tk.tree.build(p, max_depth=1, max_leaves=2)
        assert t.paths.device.type == "meta" and t.paths.shape == (1, 2, 2) and t.mask.shape == (1, 3, 1)


def _mixed_meta_calls():
    t, d, probs = _verify_inputs("cpu")
    m = lambda x: x.to("meta")  # noqa: E731
    q, k = torch.randn(1, 4, 2, 32), torch.randn(1, 20, 2, 32)
    P, one, bu = torch.tensor([3]), torch.ones(1, 4), torch.rand(1)
    out, lse = torch.empty_like(q), torch.empty(1, 4, 2)
    return [
        pytest.param(lambda: tk.tree.build(_P2().view(1, 2), tree_lens=m(torch.tensor([2]))), ValueError,
                     "tree.build: tree_lens is on meta but parents is on cpu", id="build-tree_lens"),
        pytest.param(lambda: _OPS.tree_paths(t.parents, m(t.depth), t.first_child, None, 2, 2), RuntimeError,
                     "tree.paths: depth is on meta but parents is on cpu", id="paths-depth"),
        pytest.param(lambda: _OPS.tree_paths(t.parents, t.depth, t.first_child, m(torch.tensor([4])), 2, 2),
                     ValueError, "tree.paths: tree_lens is on meta", id="paths-tree_lens"),
        pytest.param(lambda: tk.tree.attention(q, k, k, P, t, block_table=m(torch.zeros(1, 2, dtype=torch.long))),
                     RuntimeError, "tree.attention: block_table is on meta but q is on cpu", id="attention-block_table"),
        pytest.param(lambda: tk.tree.attention(m(q), k, k, P, t), RuntimeError,
                     "tree.attention: k_cache is on cpu but q is on meta", id="attention-q"),
        pytest.param(lambda: tk.tree.attention(q, k, k, P, t, out=out, lse_out=m(lse)), RuntimeError,
                     "tree.attention: lse is on meta but q is on cpu", id="attention_out-lse"),
        pytest.param(lambda: tk.tree.verify_greedy(t, m(d), d), ValueError,
                     "tree.verify_greedy: draft_tokens is on meta but the tree is on cpu", id="verify_greedy-draft"),
        pytest.param(lambda: _OPS.tree_verify_greedy(t.first_child, m(t.next_sibling), d, d, 2), RuntimeError,
                     "tree.verify_greedy: next_sibling is on meta but first_child is on cpu", id="verify_greedy-links"),
        pytest.param(lambda: tk.tree.verify_sampling(t, d, probs, coins=m(one), bonus_u=bu), ValueError,
                     "tree.verify_sampling: coins is on meta", id="verify_sampling-coins"),
        pytest.param(lambda: tk.tree.verify_sampling(t, d, m(probs)), ValueError,
                     "tree.verify_sampling: target_probs is on meta", id="verify_sampling-target_probs"),
        pytest.param(lambda: tk.tree.select_frontier(torch.zeros(1, 2, device="meta"), torch.zeros(1, 2, 3), 2),
                     RuntimeError, "tree.select_frontier: child_logp is on cpu but cum_logp is on meta",
                     id="select_frontier-cum_logp"),
        pytest.param(lambda: tk.tree.select_tree(torch.zeros(1, 2), m(torch.tensor([[-1, 0]])), 1), RuntimeError,
                     "tree.select_tree: parents is on meta but cum_logp is on cpu", id="select_tree-parents"),
    ]


@pytest.mark.parametrize("call,exc,match", _mixed_meta_calls())
def test_fakes_refuse_mixed_meta(call, exc, match):
    """One meta tensor among CPU tensors reaches the fake kernel: it raises (naming the argument,
    with the C++ check's exception type) instead of a shape-only or uninitialised result
    (fakes-accept-mixed-meta)."""
    with pytest.raises(exc, match=match):
        call()
