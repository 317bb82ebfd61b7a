"""The model-free drafters of tokenkernels.spec: RecyclingDrafter (Token Recycling) and
LookupDrafter (n-gram lookup trie): hand-built cases, invariants on random inputs, HF's prompt
lookup chain, bad inputs."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenkernels as tk
from tokenkernels.spec._lookup import LookupDrafter
from tokenkernels.spec._recycling import DEFAULT_TEMPLATE, RecyclingDrafter
from tokenkernels.spec._types import DraftContext, DraftTree, Drafter, StepResult


def make_ctx(rows, V=32, cap=64, active=None, verify="greedy", device="cpu"):
    """A left-padded context from a list of token lists (pad token 0)."""
    B, L = len(rows), max(len(r) for r in rows)
    seq = torch.zeros(B, L, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            seq[b, L - len(r):] = torch.tensor(r)
            valid[b, L - len(r):] = True
    act = torch.ones(B, dtype=torch.bool) if active is None else torch.tensor(active)
    seq, valid, act = seq.to(device), valid.to(device), act.to(device)
    return DraftContext(sequences=seq, valid=valid, root=seq[:, -1].clone(), active=act, verify=verify,
                        temperature=1.0, top_k=None, top_p=None, generator=None, vocab_size=V,
                        max_tree_tokens=cap)


def step_result(tree: DraftTree, logits, accepted=None):
    B = tree.tokens.shape[0]
    if accepted is None:
        accepted = torch.tensor([[0, -1]] * B, device=tree.tokens.device)
    return StepResult(accepted=accepted, accept_len=(accepted[:, 1:] >= 0).sum(1),
                      bonus=torch.zeros(B, dtype=torch.long, device=tree.tokens.device),
                      target_logits=logits)


def check_tree(tree: DraftTree, ctx: DraftContext):
    """Protocol invariants, and tokenkernels.tree.build accepts the tree."""
    B, n = tree.tokens.shape
    assert tree.parents.shape == (B, n) and tree.tokens.dtype == torch.long and tree.parents.dtype == torch.long
    assert tree.draft_probs is None
    lens = tree.tree_lens
    assert lens is not None and lens.shape == (B,)
    assert 1 <= n <= ctx.max_tree_tokens
    assert torch.equal(tree.tokens[:, 0], ctx.root)
    assert (tree.parents[:, 0] == -1).all()
    for b in range(B):
        m = int(lens[b])
        assert 1 <= m <= min(n, ctx.max_tree_tokens)
        if not bool(ctx.active[b]):
            assert m == 1
        idx = torch.arange(1, m)
        assert ((tree.parents[b, 1:m] >= 0) & (tree.parents[b, 1:m] < idx)).all()
        assert (tree.parents[b, m:] == 0).all() and (tree.tokens[b, m:] == 0).all()
        assert ((tree.tokens[b, :m] >= 0) & (tree.tokens[b, :m] < ctx.vocab_size)).all()
    built = tk.tree.build(tree.parents, lens)
    assert built.mask.device == tree.parents.device and torch.equal(built.tree_lens.long(), lens)


def paths(tree: DraftTree, b: int):
    """Every node's path of tokens below the root (row b), as tuples, in node order."""
    out = [()]
    for i in range(1, int(tree.tree_lens[b])):
        out.append(out[int(tree.parents[b, i])] + (int(tree.tokens[b, i]),))
    return out


def test_both_are_drafters():
    assert isinstance(RecyclingDrafter(), Drafter) and isinstance(LookupDrafter(), Drafter)
    ids, mask = torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)
    for d in (RecyclingDrafter(), LookupDrafter()):
        assert d.reset(ids, mask) is None


# ---------------------------------------------------------------------------------- recycling


def test_default_template_shape():
    d = RecyclingDrafter(vocab_size=100)
    assert d.num_nodes == len(DEFAULT_TEMPLATE) + 1 == 72
    widths = [sum(len(c) == depth for c in DEFAULT_TEMPLATE) for depth in range(1, 8)]
    assert widths == [8, 16, 16, 13, 11, 7, 0]
    assert all(c[:-1] in set(DEFAULT_TEMPLATE) | {()} for c in DEFAULT_TEMPLATE)
    assert torch.equal(d._parents, tk.tree.from_paths(DEFAULT_TEMPLATE))
    # k < 8: the default without the paths through ranks >= k
    assert RecyclingDrafter(k=4).num_nodes == 59 and RecyclingDrafter(k=2).num_nodes == 32
    assert RecyclingDrafter(k=1).template == tuple((0,) * j for j in range(1, 7))


def test_recycling_fresh_matrix_drafts_the_root_alone():
    ctx = make_ctx([[1, 2, 3], [4, 5]], V=10)
    d = RecyclingDrafter(k=3)
    tree = d.draft(ctx)
    assert d.M.shape == (10, 3) and (d.M == -1).all()
    assert tree.tokens.tolist() == [[3], [5]] and tree.tree_lens.tolist() == [1, 1]
    check_tree(tree, ctx)


def test_recycling_template_expansion_hand_built():
    # template in from_paths order: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0), 6 (0,0,0)
    template = [(0, 0, 0), (1,), (0,), (0, 1), (1, 0), (0, 0)]
    d = RecyclingDrafter(vocab_size=10, k=2, template=template, device="cpu")
    d.M[3] = torch.tensor([4, 5])
    d.M[4] = torch.tensor([6, 7])
    d.M[5] = torch.tensor([8, 9])
    d.M[6] = torch.tensor([1, 2])
    ctx = make_ctx([[9, 3]], V=10)
    tree = d.draft(ctx)
    assert tree.tokens.tolist() == [[3, 4, 5, 6, 7, 8, 1]]
    assert tree.parents.tolist() == [[-1, 0, 0, 1, 1, 2, 3]]
    assert tree.tree_lens.tolist() == [7]
    check_tree(tree, ctx)
    # M[8] and M[7] are empty: nothing below them, and the cap keeps the first nodes
    ctx = make_ctx([[9, 3]], V=10, cap=4)
    tree = d.draft(ctx)
    assert tree.tokens.tolist() == [[3, 4, 5, 6]] and tree.parents.tolist() == [[-1, 0, 0, 1]]
    check_tree(tree, ctx)


def test_recycling_prunes_empty_candidates_and_compacts():
    template = [(0,), (1,), (0, 0), (1, 0), (1, 1)]      # nodes: 1 (0,), 2 (1,), 3 (0,0), 4 (1,0), 5 (1,1)
    d = RecyclingDrafter(vocab_size=10, k=2, template=template, device="cpu")
    d.M[1] = torch.tensor([2, 3])
    d.M[2] = torch.tensor([-1, -1])                        # (0, 0) pruned
    d.M[3] = torch.tensor([4, -1])                         # (1, 1) pruned, (1, 0) -> 4
    tree = d.draft(make_ctx([[1]], V=10))
    assert tree.tokens.tolist() == [[1, 2, 3, 4]] and tree.parents.tolist() == [[-1, 0, 0, 2]]
    # a pruned node takes its subtree with it; a ragged batch pads with token 0, parent 0
    d.M[5] = torch.tensor([6, 7])
    ctx = make_ctx([[1], [9, 5]], V=10)
    tree = d.draft(ctx)
    assert tree.tree_lens.tolist() == [4, 3]
    assert tree.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert tree.parents.tolist() == [[-1, 0, 0, 2], [-1, 0, 0, 0]]
    check_tree(tree, ctx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_recycling_update_sets_topk_rows(dtype):
    V, k = 12, 3
    d = RecyclingDrafter(k=k, template=[(0,), (1,), (0, 0)])
    ctx = make_ctx([[1, 2], [3, 4]], V=V)
    tree = DraftTree(tokens=torch.tensor([[2, 5, 6, 7], [4, 8, 0, 0]]),
                     parents=torch.tensor([[-1, 0, 0, 1], [-1, 0, 0, 0]]),
                     tree_lens=torch.tensor([4, 2]))
    logits = torch.randn(2, 4, V).to(dtype)
    d.update(ctx, tree, step_result(tree, logits))
    top = logits.topk(k, dim=-1).indices
    for b, i in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]:
        assert d.M[tree.tokens[b, i]].tolist() == top[b, i].tolist()
    assert (d.M[[1, 3, 9, 10, 11]] == -1).all()          # padding nodes (token 0) are not real
    assert (d.M[0] == -1).all()
    # the next draft reads them: root 2 -> M[2] ranks 0, 1; (0, 0) -> M[M[2, 0]][0]
    tree2 = d.draft(make_ctx([[2]], V=V))
    a, b_ = int(top[0, 0, 0]), int(top[0, 0, 1])
    assert tree2.tokens[0, :3].tolist() == [2, a, b_]


def test_recycling_update_repeated_token_prefers_accepted_then_last():
    V, k = 10, 2
    d = RecyclingDrafter(vocab_size=V, k=k, template=[(0,), (1,)])
    ctx = make_ctx([[1, 2], [1, 2]], V=V)
    tree = DraftTree(tokens=torch.tensor([[2, 7, 7], [2, 7, 3]]),
                     parents=torch.tensor([[-1, 0, 0], [-1, 0, 0]]))
    logits = torch.zeros(2, 3, V)
    for b in range(2):
        for i in range(3):
            logits[b, i, 3 * b + i] = 5.0
            logits[b, i, (3 * b + i + 1) % V] = 4.0
    # row 0 accepted node 1 (token 7): it wins over the later token-7 nodes (0, 2) and (1, 1)
    acc = torch.tensor([[0, 1], [0, -1]])
    d.update(ctx, tree, step_result(tree, logits, acc))
    assert d.M[7].tolist() == [1, 2]
    # token 2 (both roots, both accepted): the later row wins
    assert d.M[2].tolist() == [3, 4]
    # nothing accepted among the 7s: the last (row, node) wins
    d.clear()
    assert (d.M == -1).all()
    d.update(ctx, tree, step_result(tree, logits))
    assert d.M[7].tolist() == [4, 5]


def test_recycling_update_skips_inactive_rows():
    V = 10
    d = RecyclingDrafter(vocab_size=V, k=2, template=[(0,)])
    ctx = make_ctx([[1, 2], [3, 4]], V=V, active=[True, False])
    tree = DraftTree(tokens=torch.tensor([[2, 5], [4, 6]]), parents=torch.tensor([[-1, 0], [-1, 0]]))
    d.update(ctx, tree, step_result(tree, torch.randn(2, 2, V)))
    assert (d.M[2] >= 0).all() and (d.M[5] >= 0).all()
    assert (d.M[4] == -1).all() and (d.M[6] == -1).all()


def test_recycling_prime_from_prefill(device):
    V, k = 10, 2
    d = RecyclingDrafter(k=k, index_dtype=torch.int32)
    ids = torch.tensor([[0, 0, 4, 5, 4], [6, 7, 8, 9, 1]], device=device)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=device)
    logits = torch.randn(2, 5, V, dtype=torch.bfloat16).to(device)
    d.prime(ids, logits, mask)
    assert d.M.dtype == torch.int32 and d.M.shape == (V, k)
    top = logits.float().topk(k, dim=-1).indices
    assert d.M[4].tolist() == top[0, 4].tolist()          # the last occurrence of 4
    assert d.M[5].tolist() == top[0, 3].tolist()
    for j, t in enumerate([6, 7, 8, 9, 1]):
        assert d.M[t].tolist() == top[1, j].tolist()
    assert (d.M[[0, 2, 3]] == -1).all()                   # left padding (token 0) skipped
    # the drafted tree follows the primed candidates
    tree = d.draft(make_ctx([[4]], V=V, device=device))
    assert tree.tokens[0, 1:3].tolist() == top[0, 4].tolist()
    d.reset(ids, mask)                                     # kept across generations
    assert d.M[4].tolist() == top[0, 4].tolist()


def test_recycling_batch_left_padding_and_inactive_row(device):
    V = 16
    d = RecyclingDrafter(vocab_size=V, k=2, template=[(0,), (1,), (0, 0)])
    d.prime(torch.arange(V, device=device)[None], torch.randn(1, V, V, device=device))
    ctx = make_ctx([[3, 4, 5], [7], [1, 2]], V=V, active=[True, True, False], device=device)
    tree = d.draft(ctx)
    check_tree(tree, ctx)
    assert tree.tree_lens.tolist() == [4, 4, 1]
    for b in range(2):
        r = int(ctx.root[b])
        c0, c1 = d.M[r].tolist()
        assert tree.tokens[b].tolist() == [r, c0, c1, int(d.M[c0, 0])]
        assert tree.parents[b].tolist() == [-1, 0, 0, 1]


def _oracle_recycling_tree(M, template, root, cap):
    """Per-node Python oracle: expand every template path, drop paths that hit -1, keep the first cap."""
    order = sorted((tuple(c) for c in template), key=lambda c: (len(c), c))
    tok = {(): root}
    for c in order:
        par = tok.get(c[:-1])
        if par is not None and int(M[par, c[-1]]) >= 0:
            tok[c] = int(M[par, c[-1]])
    kept = [()] + [c for c in order if c in tok][:cap - 1]
    return [tok[c] for c in kept], [-1] + [kept.index(c[:-1]) for c in kept[1:]]


@settings(max_examples=40)
@given(st.data())
def test_recycling_random_matches_oracle(device, data):
    V = data.draw(st.integers(2, 12))
    k = data.draw(st.integers(1, min(V, 4)))
    template = [c for c in DEFAULT_TEMPLATE if max(c) < k]
    B = data.draw(st.integers(1, 4))
    cap = data.draw(st.integers(1, 80))
    rows = [data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=5)) for _ in range(B)]
    active = data.draw(st.lists(st.booleans(), min_size=B, max_size=B))
    ctx = make_ctx(rows, V=V, cap=cap, active=active, device=device)
    dtype = data.draw(st.sampled_from([torch.int64, torch.int32]))
    d = RecyclingDrafter(k=k, template=template, index_dtype=dtype)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    for _ in range(data.draw(st.integers(0, 3))):         # a few update rounds fill parts of M
        tree = d.draft(ctx)
        check_tree(tree, ctx)
        logits = torch.randn(B, tree.n, V, generator=g).to(device)
        before = None if d.M is None else d.M.clone()
        d.update(ctx, tree, step_result(tree, logits))
        # oracle: per token, an accepted node (the roots here) wins, then the last (row, node)
        winner = {}
        for b in range(B):
            for i in range(int(tree.tree_lens[b]) if active[b] else 0):
                t = int(tree.tokens[b, i])
                key = (i == 0, b * tree.n + i)
                if t not in winner or key > winner[t][0]:
                    winner[t] = (key, b, i)
        for t, (_, b, i) in winner.items():
            assert d.M[t].tolist() == logits[b, i].topk(k).indices.tolist()
        if before is not None:
            touched = set(int(t) for b in range(B) if active[b]
                          for t in tree.tokens[b, :int(tree.tree_lens[b])])
            for t in range(V):
                if t not in touched:
                    assert torch.equal(d.M[t], before[t])
    tree = d.draft(ctx)
    check_tree(tree, ctx)
    for b in range(B):
        if active[b]:
            toks, pars = _oracle_recycling_tree(d.M, template, int(ctx.root[b]), cap)
            m = len(toks)
            assert tree.tokens[b, :m].tolist() == toks and tree.parents[b, :m].tolist() == pars
            assert int(tree.tree_lens[b]) == m


def test_recycling_bad_inputs():
    name = "tokenkernels.spec.RecyclingDrafter"
    with pytest.raises(ValueError, match=f"{name}: k must be >= 1, got 0"):
        RecyclingDrafter(k=0)
    with pytest.raises(TypeError, match=f"{name}: k must be an integer"):
        RecyclingDrafter(k=2.5)
    with pytest.raises(ValueError, match=f"{name}: k must be <= vocab_size"):
        RecyclingDrafter(vocab_size=4, k=8)
    with pytest.raises(ValueError, match=f"{name}: vocab_size must be >= 1"):
        RecyclingDrafter(vocab_size=0)
    with pytest.raises(ValueError, match=rf"{name}: template: child ranks must be in \[0, k\)"):
        RecyclingDrafter(k=2, template=[(0,), (2,)])
    with pytest.raises(ValueError, match=f"{name}: template is not a tree .*no parent path"):
        RecyclingDrafter(k=2, template=[(0,), (1, 0, 0)])
    with pytest.raises(ValueError, match=f"{name}: template is not a tree .*appears twice"):
        RecyclingDrafter(k=2, template=[(0,), (0,)])
    with pytest.raises(ValueError, match=f"{name}: template is not a tree .*empty path"):
        RecyclingDrafter(k=2, template=[(), (0,)])
    with pytest.raises(TypeError, match=f"{name}: template: child ranks must be integers"):
        RecyclingDrafter(k=2, template=[(0.5,)])
    with pytest.raises(TypeError, match=f"{name}: template must be a sequence"):
        RecyclingDrafter(k=2, template="01")
    with pytest.raises(TypeError, match=f"{name}: index_dtype"):
        RecyclingDrafter(index_dtype=torch.float32)
    d = RecyclingDrafter(vocab_size=10, k=2)
    with pytest.raises(ValueError, match=f"{name}.draft: vocabulary size 12 differs"):
        d.draft(make_ctx([[1]], V=12))
    with pytest.raises(ValueError, match=rf"{name}.draft: ctx.root of an active row must be a token id in \[0, 10\)"):
        d.draft(make_ctx([[11]], V=10))
    with pytest.raises(ValueError, match=f"{name}.draft: ctx.max_tree_tokens must be >= 1"):
        d.draft(make_ctx([[1]], V=10, cap=0))
    ctx = make_ctx([[1]], V=10)
    tree = d.draft(ctx)
    with pytest.raises(ValueError, match=f"{name}.update: result.target_logits must have shape"):
        d.update(ctx, tree, step_result(tree, torch.randn(1, 3, 10)))
    with pytest.raises(TypeError, match=f"{name}.update: result.target_logits must be float32"):
        d.update(ctx, tree, step_result(tree, torch.zeros(1, 1, 10, dtype=torch.long)))
    with pytest.raises(ValueError, match=f"{name}.update: vocabulary size 11 differs"):
        d.update(ctx, tree, step_result(tree, torch.randn(1, 1, 11)))
    with pytest.raises(ValueError, match=f"{name}.prime: logits must have shape"):
        d.prime(torch.tensor([[1, 2]]), torch.randn(1, 3, 10))
    with pytest.raises(ValueError, match=f"{name}.prime: token ids must be in"):
        d.prime(torch.tensor([[1, 20]]), torch.randn(1, 2, 10))
    with pytest.raises(TypeError, match=f"{name}.prime: input_ids must be int64 or int32"):
        d.prime(torch.tensor([[1.0, 2.0]]), torch.randn(1, 2, 10))
    with pytest.raises(ValueError, match=f"{name}.prime: attention_mask must have shape"):
        d.prime(torch.tensor([[1, 2]]), torch.randn(1, 2, 10), torch.ones(1, 3))


# ------------------------------------------------------------------------------------- lookup


def test_lookup_overlapping_matches_share_a_trie():
    # suffix bigram (1, 2) ends at 2 and 4 (the second overlaps the suffix's own continuation)
    ctx = make_ctx([[5, 1, 2, 1, 2, 1, 2]])
    tree = LookupDrafter(max_ngram=2).draft(ctx)
    assert tree.tokens.tolist() == [[2, 1, 2, 1, 2]] and tree.parents.tolist() == [[-1, 0, 1, 2, 3]]
    check_tree(tree, ctx)
    n, starts = LookupDrafter(max_ngram=2).matches(ctx.row(0))
    assert n == 2 and starts.tolist() == [3, 5]
    # the trigram (2, 1, 2) matches at 4 only... (1, 2, 1, 2) with max_ngram=4: ends at 4, from 5
    n, starts = LookupDrafter(max_ngram=4).matches(ctx.row(0))
    assert n == 4 and starts.tolist() == [5]


def test_lookup_branching_frequency_order_and_cap():
    seq = [1, 8, 1, 9, 1, 8, 3, 1]                         # unigram 1 at 0, 2, 4: [8, 1] [9, 1] [8, 3]
    ctx = make_ctx([seq])
    d = LookupDrafter(max_ngram=1, num_tokens=2)
    tree = d.draft(ctx)
    assert tree.tokens.tolist() == [[1, 8, 9, 1, 1, 3]] and tree.parents.tolist() == [[-1, 0, 0, 1, 2, 1]]
    check_tree(tree, ctx)
    tree = d.draft(make_ctx([seq], cap=4))                 # most frequent first, then shallow, then first
    assert tree.tokens.tolist() == [[1, 8, 9, 1]] and tree.parents.tolist() == [[-1, 0, 0, 1]]
    tree = d.draft(make_ctx([seq], cap=1))
    assert tree.tokens.tolist() == [[1]] and tree.tree_lens.tolist() == [1]
    recent = LookupDrafter(max_ngram=1, num_tokens=2, order="recent")
    tree = recent.draft(ctx)
    assert tree.tokens.tolist() == [[1, 8, 9, 3, 1, 1]] and tree.parents.tolist() == [[-1, 0, 0, 1, 2, 1]]
    one = LookupDrafter(max_ngram=1, num_tokens=2, order="recent", max_matches=1).draft(ctx)
    assert one.tokens.tolist() == [[1, 8, 3]] and one.parents.tolist() == [[-1, 0, 1]]
    one = LookupDrafter(max_ngram=1, num_tokens=2, max_matches=1).draft(ctx)
    assert one.tokens.tolist() == [[1, 8, 1]]


def test_lookup_longest_ngram_wins():
    # the bigram (4, 7) matches once (at 1..2), the unigram 7 three times: only the bigram is used
    seq = [7, 4, 7, 5, 7, 6, 4, 7]
    tree = LookupDrafter(max_ngram=3, num_tokens=3).draft(make_ctx([seq]))
    assert tree.tokens.tolist() == [[7, 5, 7, 6]] and tree.parents.tolist() == [[-1, 0, 1, 2]]
    # min_ngram=3: no trigram matches -> the root alone
    tree = LookupDrafter(max_ngram=3, min_ngram=3).draft(make_ctx([seq]))
    assert tree.tokens.tolist() == [[7]] and tree.tree_lens.tolist() == [1]


@pytest.mark.parametrize("row", [[1, 2, 3, 4], [6], [2, 2]])
def test_lookup_no_match_or_short_row(row):
    ctx = make_ctx([row])
    tree = LookupDrafter().draft(ctx)
    if row == [2, 2]:                                      # 2 ends at 0: continuation [2]
        assert tree.tokens.tolist() == [[2, 2]]
    else:
        assert tree.tokens.tolist() == [[row[-1]]] and tree.parents.tolist() == [[-1]]
    check_tree(tree, ctx)


def test_lookup_batch_left_padding_and_inactive_row(device):
    rows = [[5, 1, 2, 1, 2, 1, 2], [3, 1, 3], [1, 2, 1, 2], [9]]
    ctx = make_ctx(rows, active=[True, True, False, True], device=device)
    d = LookupDrafter()
    tree = d.draft(ctx)
    check_tree(tree, ctx)
    assert tree.tree_lens.tolist() == [3, 3, 1, 1]        # row 0: the trigram (2, 1, 2) ends at 4 only
    assert tree.tokens[1, :3].tolist() == [3, 1, 3] and tree.parents[1, :3].tolist() == [-1, 0, 1]
    for b in (0, 1, 3):                                    # every row as drafted alone
        alone = d.draft(make_ctx([rows[b]]))
        m = int(alone.tree_lens[0])
        assert tree.tokens[b, :m].tolist() == alone.tokens[0].tolist()
        assert tree.parents[b, :m].tolist() == alone.parents[0].tolist()


def _continuations(row, d: LookupDrafter):
    """Oracle: every continuation prefix of the longest suffix n-gram's occurrences (Python loops)."""
    L = len(row)
    for n in range(min(d.max_ngram, L - 1), d.min_ngram - 1, -1):
        ends = [p for p in range(n - 1, L - 1) if row[p - n + 1:p + 1] == row[L - n:]]
        if ends:
            if d.order == "recent":
                ends = ends[::-1]
            if d.max_matches is not None:
                ends = ends[:d.max_matches]
            return {tuple(row[p + 1:p + 1 + t]) for p in ends
                    for t in range(1, min(d.num_tokens, L - 1 - p) + 1)}
    return set()


@settings(max_examples=60)
@given(st.data())
def test_lookup_random_invariants(device, data):
    V = data.draw(st.integers(1, 5))
    B = data.draw(st.integers(1, 4))
    rows = [data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=24)) for _ in range(B)]
    active = data.draw(st.lists(st.booleans(), min_size=B, max_size=B))
    cap = data.draw(st.integers(1, 40))
    min_ngram = data.draw(st.integers(1, 3))
    d = LookupDrafter(max_ngram=data.draw(st.integers(min_ngram, 4)), min_ngram=min_ngram,
                      num_tokens=data.draw(st.integers(1, 6)),
                      max_matches=data.draw(st.one_of(st.none(), st.integers(1, 4))),
                      order=data.draw(st.sampled_from(["first", "recent"])))
    ctx = make_ctx(rows, V=V, cap=cap, active=active, device=device)
    tree = d.draft(ctx)
    check_tree(tree, ctx)
    full = d.draft(make_ctx(rows, V=V, cap=10 ** 6, active=active, device=device))
    for b in range(B):
        if not active[b]:
            continue
        want = _continuations(rows[b], d)
        got = paths(tree, b)
        assert len(set(got)) == len(got)                  # a trie: no two nodes share a path
        assert set(got[1:]) <= want                       # every path is a real continuation
        assert set(paths(full, b)[1:]) == want            # uncapped: all of them
        assert int(tree.tree_lens[b]) == min(cap, len(want) + 1)


def _hf_chain(row, max_ngram, num_tokens):
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
    gen = PromptLookupCandidateGenerator(num_output_tokens=num_tokens, max_matching_ngram_size=max_ngram,
                                         max_length=10 ** 6)
    ids = torch.tensor([row])
    cand, _ = gen.get_candidates(ids)
    return cand[0, len(row):].tolist()


@settings(max_examples=80)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(1, 4), st.integers(1, 8))
def test_lookup_single_match_is_hf_prompt_lookup_chain(row, max_ngram, num_tokens):
    d = LookupDrafter(max_ngram=max_ngram, num_tokens=num_tokens, max_matches=1)
    tree = d.draft(make_ctx([row], V=4, cap=num_tokens + 1))
    chain = _hf_chain(row, max_ngram, num_tokens)
    assert tree.tokens[0, 1:].tolist() == chain
    assert tree.parents[0].tolist() == list(range(-1, len(chain)))


def test_lookup_hf_chain_hand_case():
    row = [1, 2, 3, 4, 1, 2, 5, 1, 2]
    assert _hf_chain(row, 3, 10) == [3, 4, 1, 2, 5, 1, 2]
    tree = LookupDrafter(max_matches=1).draft(make_ctx([row]))
    assert tree.tokens[0, 1:].tolist() == [3, 4, 1, 2, 5, 1, 2]


def test_lookup_bad_inputs():
    name = "tokenkernels.spec.LookupDrafter"
    with pytest.raises(ValueError, match=f"{name}: max_ngram must be >= min_ngram, got max_ngram=1, min_ngram=2"):
        LookupDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match=f"{name}: min_ngram must be >= 1, got 0"):
        LookupDrafter(min_ngram=0)
    with pytest.raises(ValueError, match=f"{name}: num_tokens must be >= 1, got 0"):
        LookupDrafter(num_tokens=0)
    with pytest.raises(ValueError, match=f"{name}: max_matches must be >= 1 or None, got 0"):
        LookupDrafter(max_matches=0)
    with pytest.raises(TypeError, match=f"{name}: max_ngram must be an integer"):
        LookupDrafter(max_ngram="3")
    with pytest.raises(ValueError, match=f"{name}: order must be one of"):
        LookupDrafter(order="last")
    d = LookupDrafter()
    with pytest.raises(ValueError, match=f"{name}.draft: ctx.max_tree_tokens must be >= 1"):
        d.draft(make_ctx([[1, 1]], cap=0))
    ctx = make_ctx([[1, 2, 1]])
    ctx.root = torch.tensor([2])
    with pytest.raises(ValueError, match=f"{name}.draft: ctx.root must be the last real token"):
        d.draft(ctx)
    ctx = make_ctx([[1, 2, 1], [3]])
    ctx.valid[1] = False
    with pytest.raises(ValueError, match=f"{name}.draft: ctx.valid has rows without a real token"):
        d.draft(ctx)
    ctx = make_ctx([[1, 2, 1]])
    ctx.valid = ctx.valid[:, :2]
    with pytest.raises(ValueError, match=f"{name}.draft: ctx.valid must have the shape"):
        d.draft(ctx)
