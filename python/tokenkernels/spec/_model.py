"""The "model" drafter: a small HF draft model grows a token tree (EAGLE-2 / DySpec dynamic tree,
or a static template such as a chain or a Medusa-style tree), with its own KV cache kept in step
with the accepted path."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import tree as _tree
from .._common import as_int_min
from . import _hf
from ._types import DraftContext, DraftTree, StepResult, sampling_probs

_NAME = "tokenkernels.spec.ModelDrafter"


def chain(k: int):
    """The template of a chain of ``k`` draft tokens (HF-style assisted decoding): choices
    ``[(0,), (0, 0), ...]``."""
    k = as_int_min(k, 1, "k", "spec.chain")
    return [(0,) * d for d in range(1, k + 1)]


def _template_levels(choices):
    """Per depth d >= 1: (parent index among depth d-1 nodes, rank, ordinal among its siblings)
    of every depth-d node, in Medusa's canonical order (= the node order of
    :func:`tokenkernels.tree.from_paths`)."""
    _tree.from_paths(choices)                     # validates the choices
    ordered = sorted((tuple(int(r) for r in c) for c in choices), key=lambda c: (len(c), c))
    index_in_level = {(): 0}
    n_children = {}
    levels = []
    for c in ordered:
        d = len(c)
        while len(levels) < d:
            levels.append([])
        index_in_level[c] = len(levels[d - 1])
        ordinal = n_children.get(c[:-1], 0)
        n_children[c[:-1]] = ordinal + 1
        levels[d - 1].append((index_in_level[c[:-1]], c[-1], ordinal))
    return levels


class ModelDrafter:
    """Draft with a small HF causal LM.

    Args:
        model: the draft model (same vocabulary as the target).
        tree: ``"dynamic"`` (default): the EAGLE-2 / DySpec tree -- each of ``depth`` rounds
            keeps the ``top_k`` (frontier node, child) pairs with the largest cumulative draft
            log-probability (:func:`tokenkernels.tree.select_frontier`); under greedy
            verification the ``total_tokens`` best nodes are kept at the end
            (:func:`tokenkernels.tree.select_tree`). Or a static template: Medusa / EAGLE
            ``choices`` (tuples of child ranks, e.g. :func:`chain`): the node with choice
            ``(..., r)`` holds the r-th most likely draft token after its parent.
        top_k, depth, total_tokens: the dynamic tree's sizes. The defaults (4, 4, 16) were the
            fastest on CPU with the shipped benchmark pair (bench/RESULTS.md, spec); EAGLE-2's
            (10, 6, 60) pay off where a target forward over 60 tokens costs about what one over
            a single token does (large models on GPUs).

    Under sampling (``verify`` "specinfer" or "rsd") the tokens are drawn, not ranked: a node's
    children are drawn from its (warped) draft distribution -- i.i.d. for "specinfer", without
    replacement (Gumbel-top-k, in draw order) for "rsd" -- and their number is fixed before they
    are drawn (by the template, or for the dynamic tree by the deterministic ranking of the
    node's top candidates against the frontier), which is what keeps verification exact. The
    final re-ranking is skipped there (it would drop nodes by their own draws): a dynamic tree
    then has ``1 + depth * top_k`` nodes.

    The draft's KV cache holds the committed context; each step feeds the tokens it has not seen
    (the last accepted ones, the root) in one forward, then one forward per level over the
    frontier (tree attention, the 4-D mask path); after verification it keeps the KV of the
    accepted nodes it had fed and drops the rest.
    """

    def __init__(self, model, *, tree: Union[str, Sequence[Sequence[int]], None] = "dynamic",
                 top_k: int = 4, depth: int = 4, total_tokens: int = 16, impl: str = "auto"):
        top_k, depth, total_tokens = (as_int_min(v, 1, name, _NAME[len("tokenkernels."):]) for name, v in
                                      (("top_k", top_k), ("depth", depth), ("total_tokens", total_tokens)))
        self.model = model
        self.top_k, self.depth, self.total_tokens, self.impl = top_k, depth, total_tokens, impl
        if tree is None or (isinstance(tree, str) and tree == "dynamic"):
            self.levels = None
        elif isinstance(tree, str):
            raise ValueError(f"{_NAME}: tree must be 'dynamic' or a list of choices, got {tree!r}")
        else:
            try:
                self.levels = _template_levels(tree)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{_NAME}: bad tree template: {e}") from None
            if not self.levels:
                raise ValueError(f"{_NAME}: the tree template has no draft node")
        self.cache = None

    # -------------------------------------------------------------- sizes
    def max_nodes(self, verify: str) -> int:
        if self.levels is not None:
            return 1 + sum(len(lv) for lv in self.levels)
        if verify == "greedy":
            return min(self.total_tokens, 1 + self.depth * self.top_k)
        return 1 + self.depth * self.top_k

    # -------------------------------------------------------------- protocol
    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        _hf.check_cache(self.cache)
        _hf.forward_prefill(self.model, self.cache, input_ids, attention_mask)
        self.valid = attention_mask.bool().clone()            # (B, Ld) slots of the draft cache
        self.pos = attention_mask.long().sum(1)                # (B,) next position
        B = input_ids.shape[0]
        self.pending = torch.zeros(B, 0, dtype=torch.long, device=input_ids.device)
        self.pending_len = torch.zeros(B, dtype=torch.long, device=input_ids.device)

    def _feed(self, tokens, positions, prefix_mask, anc):
        L = _hf.cache_len(self.cache)
        step = _hf.TreeStep(L, prefix_mask, anc)
        return _hf.forward_tree(self.model, self.cache, step, tokens, positions)

    @torch.no_grad()
    def draft(self, ctx: DraftContext) -> DraftTree:
        if self.cache is None:
            raise RuntimeError(f"{_NAME}: draft() before reset()")
        dev = ctx.root.device
        B = ctx.root.shape[0]
        ar = lambda k: torch.arange(k, device=dev)                                      # noqa: E731
        # 1. the tokens the draft has not seen: pending (accepted last step, unfed) + the root
        pl = self.pending_len
        P = int(pl.max()) + 1 if B else 1
        chunk = torch.zeros(B, P, dtype=torch.long, device=dev)
        if self.pending.shape[1]:
            w = min(self.pending.shape[1], P)
            chunk[:, :w] = self.pending[:, :w]
        chunk.scatter_(1, pl[:, None], ctx.root[:, None].long())
        cvalid = ar(P)[None, :] <= pl[:, None]                                         # (B, P)
        causal = torch.tril(torch.ones(P, P, dtype=torch.bool, device=dev))
        canc = causal[None] & cvalid[:, None, :]
        canc |= torch.eye(P, dtype=torch.bool, device=dev)[None]       # padding rows see themselves
        cpos = self.pos[:, None] + ar(P)[None, :]
        self.base_len = _hf.cache_len(self.cache)
        logits = self._feed(chunk, cpos, self.valid, canc)                                # (B, P, V)
        root_logits = torch.gather(logits, 1, pl[:, None, None].expand(B, 1, logits.shape[-1]))[:, 0]
        self.chunk_valid = cvalid
        self.root_pos = self.pos + pl                                                    # (B,)
        base_valid = torch.cat([self.valid, cvalid], 1)                                  # (B, S_base)
        S_base = base_valid.shape[1]

        sampling = ctx.verify != "greedy"
        V = root_logits.shape[-1]
        tokens = ctx.root.long().reshape(B, 1)
        parents = torch.full((B, 1), -1, dtype=torch.long, device=dev)
        depth_t = torch.zeros(B, 1, dtype=torch.long, device=dev)
        cum = torch.zeros(B, 1, device=dev)
        anc = torch.ones(B, 1, 1, dtype=torch.bool, device=dev)                     # (B, T, T) self/ancestors
        slot = torch.full((B, 1), -1, dtype=torch.long, device=dev)            # cache slot of fed nodes
        probs_rows = []                                                          # (node index, (B, F, V))
        frontier = torch.zeros(B, 1, dtype=torch.long, device=dev)
        f_logits = root_logits[:, None]                                              # (B, F, V)
        fed_nodes = torch.zeros(B, 0, dtype=torch.long, device=dev)  # node index of each slot >= S_base
        n_levels = len(self.levels) if self.levels is not None else self.depth
        for d in range(n_levels):
            F = frontier.shape[1]
            if sampling:
                q = sampling_probs(f_logits, ctx.temperature, ctx.top_k, ctx.top_p)     # (B, F, V)
                probs_rows.append((frontier, q))
                logq = q.clamp_min(1e-30).log().masked_fill(q <= 0, float("-inf"))
            else:
                logq = torch.log_softmax(f_logits.float(), -1)
            if self.levels is not None:
                lv = self.levels[d]
                # deterministic: the rank-th most likely token; drawn: the ordinal-th draw (the
                # siblings must be the first draws, for "rsd" a prefix of a draw without replacement)
                col = 2 if sampling else 1
                par_f = torch.tensor([e[0] for e in lv], dtype=torch.long, device=dev).expand(B, -1)
                rank = torch.tensor([e[col] for e in lv], dtype=torch.long, device=dev).expand(B, -1)
                k = min(int(rank.max()) + 1, V)
            else:
                k = min(self.top_k, V)
                m = min(self.top_k, F * k)
                top_v, _ = logq.topk(k, dim=-1)
                par_f, rank, _ = _tree.select_frontier(torch.gather(cum, 1, frontier), top_v, m, impl=self.impl)
                if sampling:   # the count per frontier node, then its children in rank order
                    cnt = torch.zeros(B, F, dtype=torch.long, device=dev).scatter_add_(1, par_f, torch.ones_like(par_f))
                    sel = ar(k)[None, None, :] < cnt[:, :, None]                           # (B, F, k)
                    flat = torch.argsort((~sel).reshape(B, F * k).to(torch.int8), dim=1, stable=True)[:, :m]
                    par_f, rank = flat // k, flat % k
            if sampling:
                if ctx.verify == "rsd":
                    u = torch.rand(logq.shape, generator=ctx.generator, device=dev).clamp_(1e-20, 1.0)
                    draws = torch.topk(logq - torch.log(-torch.log(u)), k, dim=-1).indices      # (B, F, k)
                else:
                    draws = torch.multinomial(q.reshape(B * F, V), k, replacement=True,
                                              generator=ctx.generator).reshape(B, F, k)
                cand = draws
            else:
                cand = logq.topk(k, dim=-1).indices
            new_tok = torch.gather(cand.reshape(B, F * k), 1, par_f * k + rank)
            new_lp = torch.gather(logq.gather(2, cand).reshape(B, F * k), 1, par_f * k + rank)
            par_node = torch.gather(frontier, 1, par_f)
            score = torch.gather(cum, 1, par_node) + new_lp
            T = tokens.shape[1]
            m = new_tok.shape[1]
            tokens = torch.cat([tokens, new_tok], 1)
            parents = torch.cat([parents, par_node], 1)
            depth_t = torch.cat([depth_t, torch.gather(depth_t, 1, par_node) + 1], 1)
            cum = torch.cat([cum, score], 1)
            anc_new = torch.gather(anc, 1, par_node[:, :, None].expand(B, m, T))          # (B, m, T)
            anc = torch.cat([torch.cat([anc, torch.zeros(B, T, m, dtype=torch.bool, device=dev)], 2),
                             torch.cat([anc_new, torch.eye(m, dtype=torch.bool, device=dev).expand(B, m, m)], 2)], 1)
            slot = torch.cat([slot, torch.full((B, m), -1, dtype=torch.long, device=dev)], 1)
            frontier = T + ar(m)[None, :].expand(B, m)
            if d + 1 < n_levels:       # feed the new frontier: its logits expand the next level
                S = _hf.cache_len(self.cache)
                pm = torch.zeros(B, m, S, dtype=torch.bool, device=dev)
                pm[:, :, :S_base] = base_valid[:, None, :]
                if fed_nodes.shape[1]:
                    pm[:, :, S_base:] = torch.gather(anc_new, 2, fed_nodes[:, None, :].expand(B, m, fed_nodes.shape[1]))
                pos = (self.root_pos[:, None] + torch.gather(depth_t, 1, frontier))
                f_logits = self._feed(new_tok, pos, pm, torch.eye(m, dtype=torch.bool, device=dev).expand(B, m, m).clone())
                slot[:, T:T + m] = S + ar(m)[None, :]
                fed_nodes = torch.cat([fed_nodes, frontier], 1)
        Tn = tokens.shape[1]
        draft_probs = None
        if sampling:
            draft_probs = torch.full((B, Tn, V), 1.0 / V, device=dev)
            for fr, q in probs_rows:
                draft_probs.scatter_(1, fr[:, :, None].expand(B, fr.shape[1], V), q)
        if not sampling and self.levels is None and Tn > self.total_tokens:
            idx, parents, _ = _tree.select_tree(cum, parents, self.total_tokens, impl=self.impl)
            tokens = torch.gather(tokens, 1, idx)
            slot = torch.gather(slot, 1, idx)
        self.node_slot = slot
        return DraftTree(tokens=tokens, parents=parents, draft_probs=draft_probs)

    @torch.no_grad()
    def update(self, ctx: DraftContext, tree: DraftTree, result: StepResult) -> None:
        dev = ctx.root.device
        B = ctx.root.shape[0]
        acc, alen = result.accepted, result.accept_len
        A = acc.shape[1]
        path = acc.clamp_min(0)
        on_path = torch.arange(A, device=dev)[None, :] <= alen[:, None]
        on_path[:, 0] = False                                        # the root is in the chunk
        pslot = torch.gather(self.node_slot, 1, path)                 # (B, A) -1 = not fed
        fed = on_path & (pslot >= 0)
        unfed = on_path & (pslot < 0)
        cnt = fed.sum(1)
        A2 = int(cnt.max()) if B else 0
        order = torch.argsort((~fed).to(torch.int8), dim=1, stable=True)[:, :A2]     # fed path entries first
        keep = torch.gather(pslot, 1, order).clamp_min(self.base_len + self.chunk_valid.shape[1])
        S_base = self.base_len + self.chunk_valid.shape[1]
        _hf.commit(self.cache, S_base, keep - S_base)
        kv = torch.arange(A2, device=dev)[None, :] < cnt[:, None]
        self.valid = torch.cat([self.valid, self.chunk_valid, kv], 1)
        self.pos = self.root_pos + 1 + cnt
        # pending: the accepted nodes the draft has not fed, in path order
        ucnt = unfed.sum(1)
        U = int(ucnt.max()) if B else 0
        uorder = torch.argsort((~unfed).to(torch.int8), dim=1, stable=True)[:, :U]
        self.pending = torch.gather(torch.gather(tree.tokens, 1, path), 1, uorder)
        self.pending_len = ucnt
