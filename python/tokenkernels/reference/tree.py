"""tree family: pure-PyTorch reference of the speculative-decoding token-tree ops (the oracle).

Conventions (shared with the kernels and documented in ``tokenkernels.tree``):

* ``parents`` (B, n): node 0 of every tree is the root (``parents[b, 0] == -1``), and
  ``0 <= parents[b, i] < i`` for ``1 <= i < tree_lens[b]`` (parents before children). Nodes at
  or past ``tree_lens[b]`` are padding: their parents are ignored.
* ``mask`` (B, n, ceil(n/32)) int32, bit-packed little-endian: bit ``j % 32`` of word ``j // 32``
  of row ``i`` is set iff ``j`` is ``i`` or an ancestor of ``i``. Padding rows are all zero.
* ``depth`` (B, n) int64 (root 0, padding 0); ``first_child`` / ``next_sibling`` (B, n) int64,
  -1 = none; children are linked in increasing node order.
* ``paths`` (B, L_max, depth_max + 1) int64: one root-to-leaf path per leaf, leaves in increasing
  node order, padded with -1 (Medusa's "retrieve indices").

Every public op of :mod:`tokenkernels.tree` has its reference here with the same signature and
return type (:func:`build` returns the same :class:`tokenkernels.tree.Tree`); the public ops run
it with ``impl="reference"``. Bad values raise ``ValueError`` naming the argument (the
reference validates whatever ``check`` says, like the CPU kernels); walks over child links are
guarded exactly as in the kernels (``tokenkernels/tree.h``), so a direct call with corrupt
links ends the walk instead of looping. Everything here is written for clarity, not speed.
"""
from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple

import torch

# ------------------------------------------------------------------------------------- helpers

def _tree_class():
    """The public :class:`tokenkernels.tree.Tree` (imported late: its module imports this one)."""
    from .._ops.tree import Tree
    return Tree


def _err(op: str, msg: str) -> str:
    return f"tokenkernels.tree.{op}: {msg}"


def _lens_or_full(parents: torch.Tensor, tree_lens: Optional[torch.Tensor]) -> torch.Tensor:
    B, n = parents.shape
    if tree_lens is None:
        return torch.full((B,), n, dtype=torch.long, device=parents.device)
    return tree_lens.to(device=parents.device, dtype=torch.long)


def _validate_parents(parents: torch.Tensor, tree_lens: Optional[torch.Tensor], op: str) -> None:
    """Raise ValueError naming the first offending entry."""
    B, n = parents.shape
    lens = _lens_or_full(parents, tree_lens)
    for b in range(B):
        L = int(lens[b])
        if not 1 <= L <= n:
            raise ValueError(_err(op, f"tree_lens[{b}] = {L} must lie in [1, n = {n}]"))
        p = parents[b, :L].tolist()
        if p[0] != -1:
            raise ValueError(_err(op, f"parents[{b}, 0] = {p[0]}: the root's parent must be -1"))
        for i in range(1, L):
            if not 0 <= p[i] < i:
                raise ValueError(_err(op, f"parents[{b}, {i}] = {p[i]} must lie in [0, {i}) "
                                          "(parents before children, no cycles; -1 only for the root)"))


def _link_ok(nxt: int, cur: int, n: int) -> bool:
    """A child link the walks follow (tree.h link_ok): forward, inside the tree."""
    return cur < nxt < n


def _validate_links(fc: torch.Tensor, ns: torch.Tensor, op: str) -> None:
    B, n = fc.shape
    for name, t in (("first_child", fc), ("next_sibling", ns)):
        for b in range(B):
            for u, x in enumerate(t[b].tolist()):
                if x != -1 and not _link_ok(x, u, n):
                    raise ValueError(_err(op, f"{name}[{b}, {u}] = {x} is not -1 or a node in ({u}, n = {n}) "
                                              "(corrupt child link; use tree.build)"))


def _visited(fc: List[int], ns: List[int]) -> List[bool]:
    """The nodes verification can visit: the root and every (valid) link target."""
    n = len(fc)
    seen = [False] * n
    seen[0] = True
    for u in range(n):
        for x in (fc[u], ns[u]):
            if _link_ok(x, u, n):
                seen[x] = True
    return seen


def pack_bits(dense: torch.Tensor) -> torch.Tensor:
    """(..., n) bool -> (..., ceil(n/32)) int32, bit j%32 of word j//32 = dense[..., j]."""
    n = dense.shape[-1]
    W = (n + 31) // 32
    padded = torch.zeros(*dense.shape[:-1], W * 32, dtype=torch.int64, device=dense.device)
    padded[..., :n] = dense.to(torch.int64)
    weights = (torch.ones(32, dtype=torch.int64, device=dense.device) << torch.arange(32, device=dense.device))
    words = (padded.view(*dense.shape[:-1], W, 32) * weights).sum(-1)   # in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)           # two's complement int32
    return words.to(torch.int32)


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    """(..., W) int32 -> (..., n) bool (inverse of :func:`pack_bits`)."""
    shifts = torch.arange(32, device=mask.device, dtype=torch.int64)
    bits = (mask.to(torch.int64).unsqueeze(-1) >> shifts) & 1             # (..., W, 32)
    return bits.flatten(-2)[..., :n].bool()


# --------------------------------------------------------------------------------------- build


def build(parents: torch.Tensor, tree_lens: Optional[torch.Tensor] = None, *,
          max_depth: Optional[int] = None, max_leaves: Optional[int] = None, check: bool = True):
    """Reference of :func:`tokenkernels.tree.build` (the same arguments but ``impl``): a
    :class:`tokenkernels.tree.Tree`. Parents and tree_lens are always validated (as on CPU; the
    argument ``check`` is accepted for the signature); too small ``max_depth`` / ``max_leaves``
    raise."""
    del check
    if parents.dim() == 1:
        parents = parents.unsqueeze(0)
    if tree_lens is not None:
        tree_lens = torch.as_tensor(tree_lens, device=parents.device)
        if tree_lens.dim() == 0:
            tree_lens = tree_lens.reshape(1)
        tree_lens = tree_lens.long()
    _validate_parents(parents, tree_lens, "build")
    B, n = parents.shape
    dev = parents.device
    lens = _lens_or_full(parents, tree_lens)
    valid = torch.arange(n, device=dev)[None, :] < lens[:, None]           # (B, n)
    par = torch.where(valid, parents.long(), torch.full_like(parents.long(), -1))
    if n:
        par[:, 0] = -1

    # dense ancestor-or-self matrix by walking every node up one level per step
    dense = torch.zeros(B, n, n, dtype=torch.bool, device=dev)
    cur = torch.arange(n, device=dev).expand(B, n).clone()                 # current ancestor
    cur = torch.where(valid, cur, torch.full_like(cur, -1))
    depth = torch.zeros(B, n, dtype=torch.long, device=dev)
    bi = torch.arange(B, device=dev)[:, None].expand(B, n)
    ii = torch.arange(n, device=dev)[None, :].expand(B, n)
    while bool((cur >= 0).any()):
        on = cur >= 0
        dense[bi[on], ii[on], cur[on]] = True
        nxt = torch.gather(par, 1, cur.clamp_min(0))
        cur = torch.where(on, nxt, cur)
        depth += (cur >= 0).long()
    mask = pack_bits(dense)

    # children linked in increasing node order: sort nodes by (parent, index)
    first_child = torch.full((B, n), -1, dtype=torch.long, device=dev)
    next_sibling = torch.full((B, n), -1, dtype=torch.long, device=dev)
    for b in range(B):
        L = int(lens[b])
        kids = torch.arange(1, L, device=dev)
        order = kids[torch.argsort(par[b, 1:L], stable=True)]               # grouped by parent
        p_sorted = par[b, order]
        if len(order):
            same = p_sorted[1:] == p_sorted[:-1]
            next_sibling[b, order[:-1][same]] = order[1:][same]
            starts = torch.ones(len(order), dtype=torch.bool, device=dev)
            starts[1:] = ~same
            first_child[b, p_sorted[starts]] = order[starts]
    leaf = (first_child < 0) & valid
    if max_depth is None:
        max_depth = int(depth.max()) if B else 0
    if max_leaves is None:
        max_leaves = int(leaf.sum(1).max()) if B else 0
    max_depth, max_leaves = operator.index(max_depth), operator.index(max_leaves)
    # the kernels' bounds (csrc/tree/tree_args.h): no tree of n nodes needs more
    if not 0 <= max_leaves <= n:
        raise RuntimeError(_err("paths", f"max_leaves = {max_leaves} must lie in [0, n = {n}] (a tree of n "
                                         f"nodes has at most n leaves)"))
    if not 0 <= max_depth <= n - 1:
        raise RuntimeError(_err("paths", f"max_depth = {max_depth} must lie in [0, n - 1 = {n - 1}] (a tree "
                                         f"of n nodes is at most n - 1 deep)"))
    paths = _paths(par, depth, leaf, max_leaves, max_depth)
    return _tree_class()(parents.long(), mask, depth, paths, first_child, next_sibling, tree_lens, max_depth)


def _paths(parents: torch.Tensor, depth: torch.Tensor, leaf: torch.Tensor, max_leaves: int,
           max_depth: int) -> torch.Tensor:
    """Root-to-leaf paths (B, max_leaves, max_depth + 1), leaves in node order, padded -1."""
    B, n = parents.shape
    paths = torch.full((B, max_leaves, max_depth + 1), -1, dtype=torch.long, device=parents.device)
    for b in range(B):
        leaves = torch.nonzero(leaf[b]).flatten().tolist()
        if len(leaves) > max_leaves:
            raise ValueError(_err("build", f"tree {b} has {len(leaves)} leaves > max_leaves = {max_leaves}"))
        for r, j in enumerate(leaves):
            if int(depth[b, j]) > max_depth:
                raise ValueError(_err("build", f"node {j} of tree {b} has depth {int(depth[b, j])} "
                                               f"> max_depth = {max_depth}"))
            while j >= 0:
                paths[b, r, int(depth[b, j])] = j
                j = int(parents[b, j])
    return paths


# ----------------------------------------------------------------------------------- from_paths


def _canonical_choices(choices: Sequence[Sequence[int]]) -> List[Tuple[int, ...]]:
    """Medusa's canonical node order (after the root): by length, then lexicographically."""
    if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
        raise TypeError(f"choices must be a sequence of tuples of child ranks, got {type(choices).__name__}")
    out = []
    for ch in choices:
        if isinstance(ch, (str, bytes)) or not hasattr(ch, "__iter__"):
            raise TypeError(f"choices: every choice must be a tuple of child ranks, got {ch!r}")
        ranks = []
        for c in ch:
            if isinstance(c, bool) or not hasattr(c, "__index__"):
                raise TypeError(f"choices: child ranks must be integers, got {c!r} in {ch!r}")
            ranks.append(operator.index(c))
        out.append(tuple(ranks))
    return sorted(out, key=lambda x: (len(x), x))


def from_paths(choices: Sequence[Sequence[int]]) -> torch.Tensor:
    """Reference of :func:`tokenkernels.tree.from_paths` (the public op calls this one): Medusa /
    EAGLE choices (tuples of child ranks) -> parents (n,) int64, n = len(choices) + 1."""
    order = _canonical_choices(choices)
    index = {(): 0}
    for k, ch in enumerate(order):
        if len(ch) == 0:
            raise ValueError("choices: the empty path is the root, do not list it")
        if ch in index:
            raise ValueError(f"choices: {list(ch)} appears twice")
        index[ch] = k + 1
    parents = [-1]
    for ch in order:
        if len(ch) == 0:
            raise ValueError("choices: the empty path is the root, do not list it")
        if ch[:-1] not in index:
            raise ValueError(f"choices: {list(ch)} has no parent path {list(ch[:-1])}")
        parents.append(index[ch[:-1]])
    return torch.tensor(parents, dtype=torch.long)


# ------------------------------------------------------------------------------------ attention


def _gather_kv(cache: torch.Tensor, b: int, count: int, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """The first `count` positions of request b as (count, H_kv, D)."""
    if block_table is None:
        return cache[b, :count]
    page_size = cache.shape[1]
    pos = torch.arange(count, device=cache.device)
    pages = block_table[b].long()[pos // page_size]
    return cache[pages, pos % page_size]


def attention(q, k_cache, v_cache, prefix_lens, mask, *, tree_lens=None, block_table=None, scale=None,
              return_lse=False, out=None, lse_out=None, check=True):
    """Reference of :func:`tokenkernels.tree.attention` (the same arguments but ``impl``; ``mask``
    a Tree or its packed mask): out (B, n, H_q, D) in q's dtype, with ``return_lse`` also the
    natural-log lse (B, n, H_q) -- float32, or float64 for float64 inputs (the fp64 oracle of the
    tests; the kernels take float32/float16/bfloat16). ``out`` / ``lse_out`` receive the results.

    Computed in float32 (float64 if q is float64) with a dense bool mask over prefix + tree.
    Query rows at or past tree_lens are zero with lse = -inf. Lengths and pages are always
    validated (``check`` is accepted for the signature)."""
    del check
    if isinstance(mask, _tree_class()):
        if tree_lens is None:
            tree_lens = mask.tree_lens
        mask = mask.mask
    B, n, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    prefix_lens = torch.as_tensor(prefix_lens, device=q.device)
    if prefix_lens.dim() == 0:
        prefix_lens = prefix_lens.reshape(1).expand(B)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lens = torch.full((B,), n, dtype=torch.long) if tree_lens is None else tree_lens.long().cpu()
    cap = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    o = torch.zeros(B, n, Hq, D, dtype=cdt, device=q.device)
    lse = torch.full((B, n, Hq), -math.inf, dtype=cdt, device=q.device)
    tree = unpack_bits(mask, n)
    for b in range(B):
        P, L = int(prefix_lens[b]), int(lens[b])
        if P < 0 or not 0 <= L <= n or P + L > cap:
            raise ValueError(_err("attention", f"request {b}: prefix_lens = {P} and tree_lens = {L} do not fit "
                                               f"the cache ({cap} positions, n = {n})"))
        if block_table is not None:
            used = block_table[b, : (P + L + k_cache.shape[1] - 1) // k_cache.shape[1]].long()
            if bool(((used < 0) | (used >= k_cache.shape[0])).any()):
                raise ValueError(_err("attention", f"block_table[{b}] holds a page outside [0, {k_cache.shape[0]})"))
        k = _gather_kv(k_cache, b, P + L, block_table).to(cdt).repeat_interleave(G, dim=1)  # (P+L, Hq, D)
        v = _gather_kv(v_cache, b, P + L, block_table).to(cdt).repeat_interleave(G, dim=1)
        allowed = torch.cat([torch.ones(L, P, dtype=torch.bool, device=q.device), tree[b, :L, :L]], 1)
        s = torch.einsum("ihd,jhd->hij", q[b, :L].to(cdt), k) * scale           # (Hq, L, P+L)
        s = s.masked_fill(~allowed, -math.inf)
        row_lse = torch.logsumexp(s, -1)                                         # (Hq, L)
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)
        o[b, :L] = torch.einsum("hij,jhd->ihd", p, v)
        lse[b, :L] = row_lse.transpose(0, 1)
    o = o.to(q.dtype)
    if out is not None:
        o = out.copy_(o)
    if lse_out is not None:
        lse = lse_out.copy_(lse)
    return (o, lse) if return_lse else o


def attention_sdpa(q, k_cache, v_cache, prefix_lens, mask, *, scale=None):
    """The dense-mask SDPA baseline (contiguous caches, full trees): one padded SDPA call."""
    B, n, Hq, D = q.shape
    N = int(prefix_lens.max()) + n
    Hkv = k_cache.shape[2]
    tree = unpack_bits(mask, n)
    pos = torch.arange(N, device=q.device)
    P = prefix_lens.to(q.device).long()[:, None, None]
    col = pos[None, None, :]
    in_tree = (col >= P) & (col < P + n)
    tree_col = (col - P).clamp(0, n - 1).expand(B, n, N)
    allowed = (col < P) | (in_tree & torch.gather(tree, 2, tree_col))
    k = k_cache[:, :N].transpose(1, 2)
    v = v_cache[:, :N].transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=allowed[:, None], scale=scale, enable_gqa=Hq != Hkv)
    return o.transpose(1, 2)


# ------------------------------------------------------------------------------------- verify


def _per_node(t: torch.Tensor) -> torch.Tensor:
    """(n,) per-node values of a single tree -> (1, n), as the public ops accept them."""
    return t.unsqueeze(0) if t.dim() == 1 else t


def verify_greedy(tree, draft_tokens, target_argmax, *, check=True):
    """Reference of :func:`tokenkernels.tree.verify_greedy` (the same arguments but ``impl``).

    Walk from the root: move to the first child whose draft token equals the target's arg-max
    at the current node. accepted (B, max_depth+1) starts with the root (0); accept_len counts
    the accepted draft nodes (root excluded); bonus = target arg-max at the last accepted node.
    ``check``: raise on child links that are not the tree's; without it a corrupt link ends the
    walk (as in the kernels)."""
    draft_tokens, target_argmax = _per_node(draft_tokens).cpu(), _per_node(target_argmax).cpu()
    fc, ns = tree.first_child.cpu(), tree.next_sibling.cpu()
    if check:
        _validate_links(fc, ns, "verify_greedy")
    B, n = fc.shape
    max_depth = tree.max_depth
    accepted = torch.full((B, max_depth + 1), -1, dtype=torch.long)
    accept_len = torch.zeros(B, dtype=torch.long)
    bonus = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        u, k = 0, 0
        accepted[b, 0] = 0
        while k < max_depth:
            want = int(target_argmax[b, u])
            prev, c = u, int(fc[b, u])
            while _link_ok(c, prev, n) and int(draft_tokens[b, c]) != want:
                prev, c = c, int(ns[b, c])
            if not _link_ok(c, prev, n):
                break
            k += 1
            accepted[b, k] = c
            u = c
        accept_len[b] = k
        bonus[b] = int(target_argmax[b, u])
    dev = tree.first_child.device
    return accepted.to(dev), accept_len.to(dev), bonus.to(dev)


def _usable(S: float) -> bool:
    """A residual sum the acceptance tests may divide by (not zero, NaN or inf)."""
    return S > 0.0 and math.isfinite(S)


def _sample_inverse_cdf(r: torch.Tensor, total: float, u: float) -> int:
    """First index whose running sum exceeds u * total (last positive entry if rounding says
    none)."""
    c = torch.cumsum(r, 0)
    hit = torch.nonzero(c > u * total).flatten()
    if len(hit):
        return int(hit[0])
    pos = torch.nonzero(r > 0).flatten()
    return int(pos[-1]) if len(pos) else 0


def _validate_sampling(fc, ns, draft_tokens, target_probs, draft_probs) -> None:
    B, n = fc.shape
    V = target_probs.shape[-1]
    _validate_links(fc, ns, "verify_sampling")
    for b in range(B):
        seen = _visited(fc[b].tolist(), ns[b].tolist())
        for c in range(1, n):
            t = int(draft_tokens[b, c])
            if seen[c] and not 0 <= t < V:
                raise ValueError(_err("verify_sampling", f"draft_tokens[{b}, {c}] = {t} is not in [0, V = {V})"))
    for name, t in (("target_probs", target_probs), ("draft_probs", draft_probs)):
        if t is None:
            continue
        s, mn = t.double().sum(-1), t.double().amin(-1)
        tol = max(1e-3, torch.finfo(t.dtype).eps)
        for b in range(B):
            seen = _visited(fc[b].tolist(), ns[b].tolist())
            for i in range(n):
                sb = float(s[b, i])
                if seen[i] and not (math.isfinite(sb) and abs(sb - 1) <= tol and not float(mn[b, i]) < 0):
                    raise ValueError(_err("verify_sampling", f"{name}[{b}, {i}] is not a probability distribution "
                                                             f"(sum {sb:.6g}, entries must be >= 0 and sum to 1)"))


_VERIFY_MODES = ("specinfer", "rsd")


def verify_sampling(tree, draft_tokens, target_probs, *, draft_probs=None, generator=None, check=True,
                    coins=None, bonus_u=None, mode="specinfer"):
    """Reference of :func:`tokenkernels.tree.verify_sampling` (the same arguments but ``impl``):
    lossless multi-candidate speculative sampling over the tree (SpecInfer's rule or Recursive
    Speculative Decoding), in float64. The uniforms are drawn as the public op draws them (coins
    (B, n), then bonus_u (B,), from ``generator`` on the tree's device), so the same generator
    state gives the same result.

    At node u with residual p (initially target_probs[u]) the children c are tried in order
    with the uniform coins[b, c]:
      * draft_probs given, mode "specinfer" (children drawn i.i.d. from q = draft_probs[u]):
        accept iff coin * q(t) < p(t) (probability min(1, p/q)); else p <- normalise(max(p - q, 0));
      * draft_probs given, mode "rsd" (children drawn from q without replacement, in node
        order): the same test and residual with the draft residual q' (initially q / sum(q))
        instead of q, and after each rejection q' <- q' with t removed, renormalised. A token
        with q'(t) = 0 (q's support exhausted, or a draft row without usable mass) is a
        deterministic candidate: the rule below, q' unchanged;
      * draft_probs None (deterministic candidates, q = one-hot; both modes): accept iff
        coin < p(t); else p(t) <- 0, renormalised.
    Accepted: continue at c with p = target_probs[c] (and q' = draft_probs[c]). No child accepted
    (or a leaf): the bonus token is drawn from p by inverse CDF with bonus_u[b]. (The rules, their
    edge cases and why RSD is lossless: ``tokenkernels/tree.h``, VerifyMode.)

    ``check``: raise on corrupt child links, out-of-range draft tokens of visited nodes and
    probability rows that are not distributions. Inputs the kernels accept only with
    check=False behave as there: a residual without usable mass (sum not > 0 or not finite)
    accepts no child and its bonus is the last positive entry (0 if none); a draft token
    outside [0, V) is never accepted and leaves p unchanged; a corrupt link ends the walk."""
    if not isinstance(mode, str):
        raise TypeError(_err("verify_sampling", f"mode must be a str, got {type(mode).__name__}"))
    if mode not in _VERIFY_MODES:
        raise ValueError(_err("verify_sampling", f"mode must be one of 'specinfer', 'rsd', got {mode!r}"))
    rsd = mode == "rsd" and draft_probs is not None
    B, n = tree.batch, tree.n
    dev = tree.parents.device
    if coins is None:
        coins = torch.rand((B, n), generator=generator, device=dev)
    if bonus_u is None:
        bonus_u = torch.rand((B,), generator=generator, device=dev)
    draft_tokens = _per_node(draft_tokens).cpu()
    fc, ns = tree.first_child.cpu(), tree.next_sibling.cpu()
    if check:
        _validate_sampling(fc, ns, draft_tokens, target_probs, draft_probs)
    max_depth = tree.max_depth
    accepted = torch.full((B, max_depth + 1), -1, dtype=torch.long)
    accept_len = torch.zeros(B, dtype=torch.long)
    bonus = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        u, k = 0, 0
        accepted[b, 0] = 0
        r = target_probs[b, 0].double().cpu()
        S = float(r.sum())
        V = r.numel()
        if rsd:   # the draft residual q' = qr / Q
            qr = draft_probs[b, 0].double().cpu()
            Q = float(qr.sum())
        while True:
            prev, c = u, int(fc[b, u])
            got = -1
            while _link_ok(c, prev, n) and _usable(S):
                t = int(draft_tokens[b, c])
                coin = float(coins[b, c])
                qinv = 1.0 / Q if rsd and _usable(Q) else 0.0
                q_t = float(qr[t]) * qinv if rsd and 0 <= t < V else 0.0
                if not 0 <= t < V:
                    pass
                elif rsd and q_t > 0.0:
                    if coin * q_t < float(r[t]) / S:
                        got = c
                        break
                    new = (r * (1.0 / S) - qr * qinv).clamp_min(0.0)   # max(p - q', 0)
                    if float(new.sum()) > 0.0:
                        r = new
                        S = float(r.sum())
                    qr = qr.clone()                                     # q' without t
                    qr[t] = 0.0
                    Q = float(qr.sum())
                elif draft_probs is not None and not rsd:
                    q = draft_probs[b, u].double().cpu()
                    if coin * float(q[t]) < float(r[t]) / S:
                        got = c
                        break
                    new = (r * (1.0 / S) - q).clamp_min(0.0)      # max(p - q, 0), p = r / S
                    if float(new.sum()) > 0.0:
                        r = new
                        S = float(r.sum())
                else:
                    if coin * S < float(r[t]):
                        got = c
                        break
                    if S - float(r[t]) > 0.0:
                        S = S - float(r[t])
                        r = r.clone()
                        r[t] = 0.0
                prev, c = c, int(ns[b, c])
            if got < 0 or k >= max_depth:
                break
            k += 1
            accepted[b, k] = got
            u = got
            r = target_probs[b, u].double().cpu()
            S = float(r.sum())
            if rsd:
                qr = draft_probs[b, u].double().cpu()
                Q = float(qr.sum())
        accept_len[b] = k
        if _usable(S):
            bonus[b] = _sample_inverse_cdf(r, S, float(bonus_u[b]))
        else:
            pos = torch.nonzero(r > 0).flatten()
            bonus[b] = int(pos[-1]) if len(pos) else 0
    return accepted.to(dev), accept_len.to(dev), bonus.to(dev)


# -------------------------------------------------------------------------------- dynamic trees


def select_frontier(cum_logp: torch.Tensor, child_logp: torch.Tensor, m: int):
    """Reference of :func:`tokenkernels.tree.select_frontier` (the same arguments but ``impl``).
    EAGLE-2 expansion step: scores cum_logp[b, f] + child_logp[b, f, k] (float32); the m best
    (ties: lowest flat index f*K + k). Returns (parent f (B, m) int64, child rank k (B, m) int64,
    score (B, m) float32), best first."""
    B, F, K = child_logp.shape
    if not 0 <= m <= F * K:
        raise ValueError(_err("select_frontier", f"m = {m} must lie in [0, F*K = {F * K}]"))
    score = (cum_logp.float()[:, :, None] + child_logp.float()).reshape(B, F * K)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :m]
    return order // K, order % K, torch.gather(score, 1, order)


def select_tree(cum_logp: torch.Tensor, parents: torch.Tensor, n: int):
    """Reference of :func:`tokenkernels.tree.select_tree` (the same arguments but ``impl``).
    Keep the n best nodes of a drafted tree (the root always; ties: lowest index), in their
    original (parents-first) order. Returns (indices (B, n) int64 into the T nodes, new parents
    (B, n) int64 re-indexed: the nearest kept ancestor, root -1, score (B, n) float32)."""
    B, T = cum_logp.shape
    if not 1 <= n <= T:
        raise ValueError(_err("select_tree", f"n = {n} must lie in [1, T = {T}]"))
    _validate_parents(parents, None, "select_tree")
    score = cum_logp.float().clone()
    key = score.clone()
    key[:, 0] = math.inf
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :n]
    idx = torch.sort(order, dim=1).values
    new_par = torch.full((B, n), -1, dtype=torch.long, device=cum_logp.device)
    for b in range(B):
        pos = {int(j): r for r, j in enumerate(idx[b].tolist())}
        for r, j in enumerate(idx[b].tolist()):
            a = int(parents[b, j]) if j > 0 else -1
            while a >= 0 and a not in pos:
                a = int(parents[b, a])
            new_par[b, r] = pos[a] if a >= 0 else -1
    return idx, new_par, torch.gather(score, 1, idx)
