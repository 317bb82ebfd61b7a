"""ModelDrafter: its dynamic tree is EAGLE-2's (tokenkernels.tree.DynamicTreeDrafter over the
same draft model, recomputed without a cache), its draft-side KV cache follows the accepted
path, and its sampled children follow the verify mode."""
from __future__ import annotations

import pytest
import torch

import tokenkernels as tk
import tokenkernels.spec as spec

from .models import pair, prompt


def _ctx(ids, root, verify="greedy", temperature=0.0, generator=None):
    B = ids.shape[0]
    return spec.DraftContext(sequences=torch.cat([ids, root[:, None]], 1),
                             valid=torch.ones(B, ids.shape[1] + 1, dtype=torch.bool), root=root,
                             active=torch.ones(B, dtype=torch.bool), verify=verify, temperature=temperature,
                             top_k=None, top_p=None, generator=generator, vocab_size=512, max_tree_tokens=256)


def _recompute_step(draft, ids):
    """DynamicTreeDrafter's step: the draft's log-probs after each frontier node, from a plain
    forward over the prompt + the node's path (no cache, no tree attention)."""
    def step(tokens, parents, frontier):
        out = []
        for b in range(tokens.shape[0]):
            rows = []
            for f in frontier[b].tolist():
                path = []
                while f >= 0:
                    path.append(int(tokens[b, f]))
                    f = int(parents[b, f])
                seq = torch.cat([ids[b], torch.tensor(path[::-1])])[None]
                with torch.no_grad():
                    rows.append(torch.log_softmax(draft(seq).logits[0, -1].float(), -1))
            out.append(torch.stack(rows))
        return torch.stack(out)
    return step


@pytest.mark.parametrize("sizes", [dict(top_k=3, depth=3, total_tokens=8), dict(top_k=4, depth=4, total_tokens=40)])
def test_dynamic_tree_is_eagle2(sizes):
    _, draft = pair("llama", 0.2)
    ids, _ = prompt(2, 7, 0)
    root = torch.tensor([17, 300])
    md = spec.ModelDrafter(draft, **sizes)
    md.reset(ids, torch.ones_like(ids))
    got = md.draft(_ctx(ids, root))
    tokens, parents, _ = tk.tree.DynamicTreeDrafter(_recompute_step(draft, ids), **sizes).draft(root)
    assert torch.equal(got.tokens, tokens)
    assert torch.equal(got.parents, parents)
    assert got.draft_probs is None


def test_draft_cache_follows_the_accepted_path():
    """After an update the draft's cache holds exactly the context + accepted tokens: its next
    tree equals a fresh drafter's over the longer prompt."""
    _, draft = pair("llama", 0.2)
    ids, _ = prompt(1, 6, 1)
    md = spec.ModelDrafter(draft, top_k=3, depth=3, total_tokens=10)
    md.reset(ids, torch.ones_like(ids))
    root = torch.tensor([42])
    t = md.draft(_ctx(ids, root))
    # accept the path to the deepest node of the first branch, then a bonus token
    built = tk.tree.build(t.parents)
    leaf = int(built.paths[0, 0][built.paths[0, 0] >= 0][-1])
    path = built.paths[0, 0][built.paths[0, 0] >= 0]
    acc = torch.full((1, built.max_depth + 1), -1)
    acc[0, :path.numel()] = path
    bonus = torch.tensor([7])
    res = spec.StepResult(acc, torch.tensor([path.numel() - 1]), bonus, torch.zeros(1, t.n, 512))
    md.update(_ctx(ids, root), t, res)
    new_ids = torch.cat([ids, t.tokens[:, path]], 1)
    nxt = md.draft(_ctx(new_ids, bonus))
    fresh = spec.ModelDrafter(draft, top_k=3, depth=3, total_tokens=10)
    fresh.reset(new_ids, torch.ones_like(new_ids))
    ref = fresh.draft(_ctx(new_ids, bonus))
    assert leaf > 0
    assert torch.equal(nxt.tokens, ref.tokens) and torch.equal(nxt.parents, ref.parents)


@pytest.mark.parametrize("verify", ["specinfer", "rsd"])
def test_sampled_children(verify):
    """Under sampling the tree has 1 + depth * top_k nodes, draft_probs rows are distributions,
    and under "rsd" no two siblings share a token (drawn without replacement)."""
    _, draft = pair("llama", 0.2)
    ids, _ = prompt(2, 6, 2)
    md = spec.ModelDrafter(draft, top_k=4, depth=3)
    md.reset(ids, torch.ones_like(ids))
    g = torch.Generator().manual_seed(0)
    t = md.draft(_ctx(ids, torch.tensor([5, 6]), verify=verify, temperature=1.0, generator=g))
    assert t.n == 1 + 3 * 4
    torch.testing.assert_close(t.draft_probs.sum(-1), torch.ones(2, t.n))
    tk.tree.build(t.parents)
    if verify == "rsd":
        for b in range(2):
            kids = {}
            for i in range(1, t.n):
                kids.setdefault(int(t.parents[b, i]), []).append(int(t.tokens[b, i]))
            assert all(len(set(v)) == len(v) for v in kids.values())
