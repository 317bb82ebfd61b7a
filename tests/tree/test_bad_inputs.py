"""Bad inputs raise clear errors naming the argument (never a crash or an out-of-bounds read)."""
import pytest
import torch

import tokenkernels as tk

from tokenkernels.testing import random_parents


@pytest.mark.parametrize("parents,match", [
    pytest.param([[0, 0, 1]], r"parents\[0, 0\] = 0: the root's parent must be -1", id="root-not-minus-1"),
    pytest.param([[-1, 1, 0]], r"parents\[0, 1\] = 1 must lie in \[0, 1\)", id="self-loop"),
    pytest.param([[-1, 0, 3, 1]], r"parents\[0, 2\] = 3 must lie in \[0, 2\)", id="forward-parent"),   # a cycle
    pytest.param([[-1, 0, -1]], r"parents\[0, 2\] = -1", id="second-root"),
    pytest.param([[-1, 0, -5]], r"parents\[0, 2\] = -5", id="below-minus-1"),
    pytest.param([[-1, 0, 0], [-1, 7, 0]], r"parents\[1, 1\] = 7", id="out-of-range"),
    pytest.param([[-1, 0, 2**32]], r"parents\[0, 2\] = 4294967296 must lie", id="int64-not-wrapped"),
])
def test_bad_parents(device, parents, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        tk.tree.build(torch.tensor(parents, device=device))


def test_bad_tree_lens(device):
    p = random_parents(2, 5, seed=0).to(device)
    with pytest.raises((RuntimeError, ValueError), match=r"tree_lens\[1\] = 6 must lie in \[1, n = 5\]"):
        tk.tree.build(p, torch.tensor([5, 6], device=device))
    with pytest.raises((RuntimeError, ValueError), match=r"tree_lens\[0\] = 0"):
        tk.tree.build(p, torch.tensor([0, 3], device=device))
    with pytest.raises(ValueError, match="tree_lens must have shape"):
        tk.tree.build(p, torch.tensor([5, 5, 5], device=device))
    with pytest.raises(TypeError, match="tree_lens must be an integer tensor"):
        tk.tree.build(p, torch.tensor([5.0, 5.0], device=device))


def test_bad_parents_type():
    with pytest.raises(TypeError, match="parents must be int32 or int64"):
        tk.tree.build(torch.tensor([[-1.0, 0.0]]))
    with pytest.raises(ValueError, match="parents must be 2-D"):
        tk.tree.build(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="parents must be a torch.Tensor"):
        tk.tree.build([[-1, 0]])


def test_paths_too_small():
    p = random_parents(1, 30, seed=2)
    t = tk.tree.build(p)
    with pytest.raises(RuntimeError, match="leaves > max_leaves"):
        tk.tree.build(p, max_depth=t.max_depth, max_leaves=t.paths.shape[1] - 1)
    with pytest.raises(RuntimeError, match="> max_depth"):
        tk.tree.build(p, max_depth=t.max_depth - 1, max_leaves=t.paths.shape[1])


def _attn_inputs(device):
    p = random_parents(2, 6, seed=1).to(device)
    t = tk.tree.build(p)
    q = torch.randn(2, 6, 4, 32, device=device)
    k = torch.randn(2, 20, 2, 32, device=device)
    return t, q, k, k.clone(), torch.tensor([10, 14], device=device)


def test_bad_attention(device):
    t, q, k, v, P = _attn_inputs(device)
    A = tk.tree.attention
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, n, H_q, D\)"):
        A(q[0], k, v, P, t.mask)
    with pytest.raises(RuntimeError, match=r"q must be 4-D \(B, n, H_q, D\)"):   # the op itself
        torch.ops.tokenkernels.tree_attention(q[0], k, v, P, t.mask, None, None, 1.0, True, "auto")
    with pytest.raises(RuntimeError, match="mask must have shape"):
        A(q, k, v, P, t.mask[:, :5])
    with pytest.raises(RuntimeError, match="mask must be int32"):
        A(q, k, v, P, t.mask.long())
    with pytest.raises(RuntimeError, match="multiple of the cache's H_kv"):
        A(q[:, :, :3], k, v, P, t.mask)
    with pytest.raises(RuntimeError, match="must have q's dtype"):
        A(q, k.half(), v.half(), P, t.mask)
    with pytest.raises(RuntimeError, match="head dim"):
        A(q, k[..., :4], v[..., :4], P, t.mask)
    with pytest.raises(RuntimeError, match="prefix_lens must have shape"):
        A(q, k, v, P[:1], t.mask)
    with pytest.raises(RuntimeError, match="must be float32, float16 or bfloat16"):
        A(q.double(), k.double(), v.double(), P, t.mask)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        A(q, k, v, P, t.mask, out=torch.empty(2, 6, 4, 31, device=device))
    with pytest.raises(RuntimeError, match="lse must be a contiguous float32"):
        A(q, k, v, P, t.mask, lse_out=torch.empty(2, 6, 4, dtype=torch.float16, device=device))


def test_bad_attention_values(device):
    """check=True (the default): the same errors on CPU and CUDA (one host sync there)."""
    t, q, k, v, P = _attn_inputs(device)
    A = tk.tree.attention
    d = lambda x: torch.tensor(x, device=device)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"request 1 needs 21 cache positions .* k_cache holds 20"):
        A(q, k, v, d([10, 15]), t)
    with pytest.raises(RuntimeError, match=r"prefix_lens\[0\] = -1 < 0"):
        A(q, k, v, d([-1, 3]), t)
    with pytest.raises(RuntimeError, match=r"tree_lens\[1\] = 7 must lie in \[0, n = 6\]"):
        A(q, k, v, P, t.mask, tree_lens=d([6, 7]))
    kp = torch.randn(5, 4, 2, 32, device=device)
    table = d([[0, 1, 2, 3], [4, 0, 9, 1]])
    with pytest.raises(RuntimeError, match=r"block_table\[1, 2\] = 9 is not a page index in \[0, 5\)"):
        A(q, kp, kp, d([3, 9]), t, block_table=table)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 0\] = -1 is not a page index"):
        A(q, kp, kp, d([3, 9]), t, block_table=table.int() - (table == 0).int())
    with pytest.raises(RuntimeError, match="needs 5 pages but block_table has 4"):
        A(q, kp, kp, d([3, 14]), t, block_table=table)
    if device == "cuda":
        torch.cuda.synchronize()   # nothing was launched with the bad values: no sticky error
    with pytest.raises(RuntimeError, match="block_table must have 2 rows"):
        A(q, kp, kp, P, t, block_table=table[:1])


def _verify_inputs(device):
    p = random_parents(2, 9, seed=3).to(device)
    t = tk.tree.build(p)
    draft = torch.randint(0, 5, (2, 9), device=device)
    probs = torch.softmax(torch.randn(2, 9, 5, device=device), -1)
    return t, draft, probs


def test_bad_verify(device):
    t, draft, probs = _verify_inputs(device)
    with pytest.raises(ValueError, match=r"draft_tokens must have shape \(2, 9\)"):
        tk.tree.verify_greedy(t, draft[:, :8], draft)
    with pytest.raises(ValueError, match="target_argmax must have shape"):
        tk.tree.verify_greedy(t, draft, draft[:1])
    with pytest.raises(TypeError, match="draft_tokens must be int32 or int64"):
        tk.tree.verify_greedy(t, draft.float(), draft)
    with pytest.raises(TypeError, match="tree must be a tokenkernels.tree.Tree"):
        tk.tree.verify_greedy(t.mask, draft, draft)
    with pytest.raises(ValueError, match=r"target_probs\[0, 3\] is not a probability distribution"):
        bad = probs.clone()
        bad[0, 3] *= 1.5
        tk.tree.verify_sampling(t, draft, bad)
    with pytest.raises(ValueError, match=r"draft_probs\[1, 0\] is not a probability"):
        bad = probs.clone()
        bad[1, 0, 0] = -0.1
        tk.tree.verify_sampling(t, draft, probs, draft_probs=bad)
    with pytest.raises(ValueError, match="target_probs must have shape"):
        tk.tree.verify_sampling(t, draft, probs[:, :4])
    with pytest.raises(ValueError, match="draft_probs .* must match target_probs"):
        tk.tree.verify_sampling(t, draft, probs, draft_probs=probs[..., :4])


def test_bad_verify_token_range(device):
    """The same error on CPU and CUDA (check=True): the lowest linked node of the first tree."""
    t, draft, probs = _verify_inputs(device)
    draft[:, 1:] = 5   # V = 5
    with pytest.raises(RuntimeError, match=r"draft_tokens\[0, 1\] = 5 is not in \[0, V = 5\)"):
        tk.tree.verify_sampling(t, draft, probs)
    draft[:] = 0
    draft[1, 8] = -3
    with pytest.raises(RuntimeError, match=r"draft_tokens\[1, 8\] = -3 is not in \[0, V = 5\)"):
        tk.tree.verify_sampling(t, draft, probs, draft_probs=probs)
    draft[0, 0] = 99   # the root's token is never used
    draft[1, 8] = 0
    tk.tree.verify_sampling(t, draft, probs)


def test_bad_dynamic(device):
    cum = torch.randn(2, 4, device=device)
    with pytest.raises(RuntimeError, match=r"m = 13 must lie in \[0, F\*K = 12\]"):
        tk.tree.select_frontier(cum, torch.randn(2, 4, 3, device=device), 13)
    with pytest.raises(RuntimeError, match="child_logp must be a floating"):
        tk.tree.select_frontier(cum, torch.randn(2, 5, 3, device=device), 2)
    par = random_parents(2, 4, seed=0).to(device)
    with pytest.raises(RuntimeError, match=r"n = 5 must lie in \[1, T = 4\]"):
        tk.tree.select_tree(cum, par, 5)
    par[1, 2] = 2
    with pytest.raises(RuntimeError, match=r"parents\[1, 2\] = 2"):
        tk.tree.select_tree(cum, par, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need CUDA")
def test_mixed_devices():
    t, q, k, v, P = _attn_inputs("cuda")
    with pytest.raises(RuntimeError, match="prefix_lens is on cpu"):
        tk.tree.attention(q, k, v, P.cpu(), t)
    t2, draft, probs = _verify_inputs("cuda")
    with pytest.raises(ValueError, match="draft_tokens is on cpu"):
        tk.tree.verify_greedy(t2, draft.cpu(), draft)


def test_bad_impl(device):
    """impl names are validated by the wrappers (variants.choose) and by the ops themselves."""
    t, q, k, v, P = _attn_inputs(device)
    pat = r"tokenkernels\.tree\.{}: impl must be one of .*'reference'.*got 'fast'"
    cum = torch.randn(2, 4, device=device)
    calls = {
        "build": lambda: tk.tree.build(t.parents, impl="fast"),
        "attention": lambda: tk.tree.attention(q, k, v, P, t, impl="fast"),
        "verify_greedy": lambda: tk.tree.verify_greedy(t, t.parents, t.parents, impl="fast"),
        "verify_sampling": lambda: tk.tree.verify_sampling(t, t.parents, torch.ones(2, 6, 1, device=device),
                                                           impl="fast"),
        "select_frontier": lambda: tk.tree.select_frontier(cum, cum[..., None], 1, impl="fast"),
        "select_tree": lambda: tk.tree.select_tree(cum, random_parents(2, 4, seed=0).to(device), 1, impl="fast"),
        "DynamicTreeDrafter": lambda: tk.tree.DynamicTreeDrafter(lambda *a: None, impl="fast"),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match=pat.format(op)):
            call()
    ops = torch.ops.tokenkernels
    with pytest.raises(ValueError, match=r"tokenkernels\.tree\.build: impl must be one of 'auto', 'plain', "
                                         r"'simt', 'tuned', got 'reference'"):
        ops.tree_build(t.parents, None, True, "reference")   # the reference is a Python-level choice
    with pytest.raises(ValueError, match=r"tokenkernels\.tree\.attention: impl must be one of"):
        ops.tree_attention(q, k, v, P, t.mask, None, None, 1.0, True, "1")
    with pytest.raises(ValueError, match=r"tokenkernels\.tree\.attention: impl must be one of"):
        ops.tree_attention_out(q, k, v, P, t.mask, None, None, 1.0, True, "", torch.empty_like(q),
                               torch.empty(2, 6, 4, device=device))


def test_raw_ops_validate_like_wrappers(device):
    """Called directly, every op raises the wrappers' errors (the checks live in C++ only)."""
    t, draft, probs = _verify_inputs(device)
    ops = torch.ops.tokenkernels
    fc, ns, md = t.first_child, t.next_sibling, t.max_depth
    coins, bu = torch.rand(2, 9, device=device), torch.rand(2, device=device)
    with pytest.raises(ValueError, match=r"verify_greedy: draft_tokens must have shape \(2, 9\)"):
        ops.tree_verify_greedy(fc, ns, draft[:, :8], draft, md)
    with pytest.raises(TypeError, match="verify_greedy: target_argmax must be int32 or int64"):
        ops.tree_verify_greedy(fc, ns, draft, draft.float(), md, False)
    with pytest.raises(ValueError, match=r"verify_sampling: target_probs\[0, 3\] is not a probability"):
        bad = probs.clone()
        bad[0, 3] *= 1.5
        ops.tree_verify_sampling(fc, ns, draft, bad, None, coins, bu, md, True)
    ops.tree_verify_sampling(fc, ns, draft, bad, None, coins, bu, md, False)   # rows unchecked
    with pytest.raises(ValueError, match="verify_sampling: coins must have shape"):
        ops.tree_verify_sampling(fc, ns, draft, probs, None, coins[:, :3], bu, md, True)
    with pytest.raises(TypeError, match="verify_sampling: bonus_u must be a floating-point tensor"):
        ops.tree_verify_sampling(fc, ns, draft, probs, None, coins, bu.long(), md, True)
    with pytest.raises(TypeError, match="build: parents must be int32 or int64"):
        ops.tree_build(t.parents.float(), None, True, "auto")
    with pytest.raises(ValueError, match=r"build: tree_lens must have shape \(2,\)"):
        ops.tree_build(t.parents, torch.tensor([9], device=device), True, "auto")
    with pytest.raises(TypeError, match="paths: depth must be int32 or int64"):
        ops.tree_paths(t.parents, t.depth.float(), fc, None, 4, md)
