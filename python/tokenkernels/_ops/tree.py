"""tree family: token trees for speculative decoding (SpecInfer, Medusa, EAGLE-2, Sequoia, DySpec).

Node 0 of every tree is the root (the last token already accepted). ``parents`` (B, n) int32/int64
has ``parents[b, 0] == -1`` and ``0 <= parents[b, i] < i`` (parents before children); ragged trees
in one batch give ``tree_lens`` (B,), nodes past it are padding. n may be 1024 or more.

* :func:`build` -> :class:`Tree` (bit-packed masks, depths, paths, child/sibling links);
* :func:`from_paths` Medusa/EAGLE ``choices`` -> parents in Medusa's canonical node order;
* :func:`attention`: every tree token attends the whole KV prefix (no mask read) plus its
  ancestors in the tree (packed mask), merged by log-sum-exp; contiguous or paged caches, GQA;
* :func:`verify_greedy`, :func:`verify_sampling` (lossless multi-candidate speculative sampling:
  SpecInfer's rule, or Recursive Speculative Decoding for siblings drawn without replacement);
* dynamic trees: :func:`select_frontier`, :func:`select_tree` and :class:`DynamicTreeDrafter`.

Every shape / dtype / device / value check is in C++ (``csrc/tree/tree_args.h``), the same on
CPU and CUDA; these wrappers convert types, fill defaults, pick the implementation
(``impl=``: ``"auto"``, the CUDA variants ``"plain"`` / ``"simt"`` / ``"tuned"``, or ``"reference"``, the
pure-PyTorch :mod:`tokenkernels.reference.tree` with the same signature) and document. (The
only checks left here are what the conversions need: Python objects that are not tensors, bool
options that are not bools, ints beyond int64, and q's rank, which attention's defaults read;
and the fake kernels' refusal of a meta tensor among CPU / CUDA ones.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Tuple

import torch

from .. import variants as _variants
from .._common import as_bool, as_int
from ..reference import tree as _ref

_ops = torch.ops.tokenkernels
_REFERENCE = _variants.REFERENCE


def _choose(impl, device, op: str) -> str:
    """"reference" or the op-level impl string of the schema (validates ``impl``)."""
    return _variants.choose("tree", impl, device, f"tree.{op}")


def _err(op: str, msg: str) -> str:
    return f"tokenkernels.tree.{op}: {msg}"


def _tensor(t, name: str, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(_err(op, f"{name} must be a torch.Tensor, got {type(t).__name__}"))
    return t


def _per_node(t, name: str, op: str) -> torch.Tensor:
    """Per-node values: a (B, n) tensor, or (n,) for a single tree (made (1, n))."""
    t = _tensor(t, name, op)
    return t.unsqueeze(0) if t.dim() == 1 else t


def _int_arg(v, name: str, op: str) -> int:
    """A Python / NumPy / 0-d tensor integer (not a bool, not a float) in int64 as an int."""
    return as_int(v, name, f"tree.{op}")


def _flag(v, name: str, op: str) -> bool:
    """A bool option (check, return_lse): a real bool, never the truthiness of "yes"."""
    return as_bool(v, name, f"tree.{op}")


def _as_index(t, name: str, op: str, device) -> torch.Tensor:
    """A tensor, or an integer / sequence of integers made into an int64 tensor on `device`."""
    if isinstance(t, torch.Tensor):
        return t
    if hasattr(t, "__index__") and not isinstance(t, bool):   # an int: in int64 (ValueError past it)
        t = as_int(t, name, f"tree.{op}")
    try:
        t = torch.as_tensor(t, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        if "verflow" in str(e):   # a sequence holding an int beyond int64
            raise ValueError(_err(op, f"{name} must fit in int64, got {t!r}")) from None
        raise TypeError(_err(op, f"{name} must be an integer tensor, got {type(t).__name__}")) from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(_err(op, f"{name} must be an integer tensor, got {t.dtype}"))
    return t


def _lens(t, device, name: str, op: str) -> Optional[torch.Tensor]:
    """tree_lens: None, a tensor, or integers (made an int64 tensor on `device`); 0-d -> (1,)."""
    if t is None:
        return None
    t = _as_index(t, name, op, device)
    return t.reshape(1) if t.dim() == 0 else t


@dataclasses.dataclass
class Tree:
    """A batch of token trees, as built by :func:`build`.

    Attributes:
        parents: (B, n) int64, as given (padding entries kept).
        mask: (B, n, ceil(n/32)) int32, bit-packed little-endian: bit ``j % 32`` of word
            ``j // 32`` of row ``i`` is set iff ``j`` is ``i`` or an ancestor of ``i``.
        depth: (B, n) int64, root 0 (padding 0).
        paths: (B, L_max, max_depth + 1) int64 root-to-leaf node indices, one row per leaf in
            increasing leaf order, padded with -1 (Medusa's retrieve indices).
        first_child, next_sibling: (B, n) int64, -1 = none; children are linked in node order.
        tree_lens: (B,) int64 or None (all trees have n nodes).
        max_depth: the largest depth in the batch (a Python int).
    """
    parents: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    paths: torch.Tensor
    first_child: torch.Tensor
    next_sibling: torch.Tensor
    tree_lens: Optional[torch.Tensor]
    max_depth: int

    @property
    def n(self) -> int:
        return self.parents.shape[1]

    @property
    def batch(self) -> int:
        return self.parents.shape[0]

    def dense_mask(self) -> torch.Tensor:
        """(B, n, n) bool: ``[b, i, j]`` iff j is i or an ancestor of i."""
        return _ref.unpack_bits(self.mask, self.n)

    def to(self, device) -> "Tree":
        """The same tree with every tensor on ``device``."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def positions(self, prefix_lens) -> torch.Tensor:
        """(B, n) int64 position ids of the tree tokens: ``prefix_len + depth``."""
        prefix_lens = _as_index(prefix_lens, "prefix_lens", "Tree.positions", self.depth.device)
        if prefix_lens.dim() == 0:
            prefix_lens = prefix_lens.reshape(1).expand(self.batch)
        if prefix_lens.shape != (self.batch,):
            raise ValueError(_err("Tree.positions", f"prefix_lens must have shape ({self.batch},), "
                                  f"got {tuple(prefix_lens.shape)}"))
        return prefix_lens.to(self.depth.device, torch.long)[:, None] + self.depth


def build(parents: torch.Tensor, tree_lens: Optional[torch.Tensor] = None, *,
          max_depth: Optional[int] = None, max_leaves: Optional[int] = None,
          check: bool = True, impl: str = "auto") -> Tree:
    """Build the tree buffers from parent arrays.

    Args:
        parents: (n,) or (B, n) int32/int64, ``parents[b, 0] == -1``, ``0 <= parents[b, i] < i``.
        tree_lens: (B,) number of real nodes per tree (ragged batch), each in [1, n].
        max_depth, max_leaves: sizes of ``paths`` (and of the verify outputs). Left None they are
            read from the built tree (one host sync on CUDA); pass both to avoid it. On CPU too
            small values raise; on CUDA deeper nodes / extra leaves are dropped. They lie in
            ``[0, n - 1]`` and ``[0, n]`` (what a tree of n nodes can need; larger values
            raise). Meta ``parents`` have no values to read the sizes from: pass both.
        check: validate parents and tree_lens (always done on CPU; one host sync on CUDA).
            With ``check=False`` on CUDA bad values are not errors but have a defined result:
            a node whose parent is not in ``[0, i)`` (a second -1, itself, a later node, a value
            >= n, an int64 beyond int32 -- never wrapped) is the root of a detached subtree: its
            own and its descendants' ancestor walks stop at it (mask rows, depths and paths), it
            is nobody's child (``next_sibling`` -1, not in its parent's list); ``tree_lens`` are
            clamped into ``[0, n]``. Nothing loops or is read out of bounds.
        impl: "auto" | "plain" | "simt" | "tuned" (CUDA variants; the CPU has one kernel) | "reference"
            (:func:`tokenkernels.reference.tree.build`); see :mod:`tokenkernels.variants` for
            what ``"auto"`` runs on CUDA.

    With ``check=False`` and both ``max_depth`` and ``max_leaves`` given, a CUDA build never
    syncs with the host (CUDA graphs).
    """
    op = "build"
    parents = _per_node(parents, "parents", op)
    lens = _lens(tree_lens, parents.device, "tree_lens", op)
    if max_depth is not None:
        max_depth = _int_arg(max_depth, "max_depth", op)
    if max_leaves is not None:
        max_leaves = _int_arg(max_leaves, "max_leaves", op)
    check = _flag(check, "check", op)
    which = _choose(impl, parents.device, op)
    if parents.device.type == "meta" and (max_depth is None or max_leaves is None):
        raise ValueError(_err(op, "parents is on meta: pass max_depth and max_leaves (otherwise they are read "
                              "from the built tree, which a meta tensor does not hold)"))
    if which == _REFERENCE:
        return _ref.build(parents, lens, max_depth=max_depth, max_leaves=max_leaves, check=check)
    mask, depth, first_child, next_sibling = _ops.tree_build(parents, lens, check, which)
    B, n = parents.shape
    if lens is not None:
        lens = lens.long()
    if B == 0:   # an empty batch: nothing to read the sizes from
        max_depth = 0 if max_depth is None else max_depth
        max_leaves = 0 if max_leaves is None else max_leaves
    if max_depth is None or max_leaves is None:
        valid = torch.arange(n, device=parents.device)[None, :] < (
            lens[:, None] if lens is not None else n)
        leaves = ((first_child < 0) & valid).sum(1)
        md, ml = torch.stack([depth.max(), leaves.max()]).tolist()
        max_depth = md if max_depth is None else max_depth
        max_leaves = ml if max_leaves is None else max_leaves
    paths = _ops.tree_paths(parents, depth, first_child, lens, int(max_leaves), int(max_depth))
    return Tree(parents.long(), mask, depth, paths, first_child, next_sibling, lens, int(max_depth))


def from_paths(choices: Sequence[Sequence[int]]) -> torch.Tensor:
    """Medusa / EAGLE ``choices`` (tuples of child ranks, e.g. ``[(0,), (1,), (0, 0)]``) ->
    parents (n,) int64 with n = len(choices) + 1.

    Nodes are in Medusa's canonical order: the root 0, then the choices sorted by length and then
    lexicographically; so :func:`build`'s masks, depths and (as a set) paths line up with
    Medusa's own ``medusa_attn_mask``, ``medusa_position_ids`` and ``retrieve_indices``. Node
    ``k + 1`` holds the candidate of rank ``choice[-1]`` of the draft head ``len(choice) - 1``.
    Every prefix of a choice must itself be a choice."""
    try:
        return _ref.from_paths(choices)
    except (ValueError, TypeError) as e:
        raise type(e)(_err("from_paths", str(e))) from None


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_lens,
              mask, *, tree_lens: Optional[torch.Tensor] = None,
              block_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              return_lse: bool = False, out: Optional[torch.Tensor] = None,
              lse_out: Optional[torch.Tensor] = None, check: bool = True, impl: str = "auto"):
    """Attention of the n tree tokens of each request over its KV prefix and its tree.

    Args:
        q: (B, n, H_q, D) float32/float16/bfloat16 queries of the tree tokens.
        k_cache, v_cache: (B, N, H_kv, D), or paged (num_pages, page_size, H_kv, D) with
            ``block_table``; same dtype as q. Any strides: the CPU kernel reads q, k_cache and
            v_cache in place when their last dim is contiguous (HF's (B, H_kv, N, D) caches
            passed as ``transpose(1, 2)`` views are not copied), else copies them once. The tree
            tokens' K/V are already written at positions ``prefix_lens[b] + j`` (j = 0 .. n-1).
        prefix_lens: (B,) integer tensor: tokens before the tree (including none of the tree).
        mask: a :class:`Tree` or its bit-packed (B, n, ceil(n/32)) int32 mask.
        tree_lens: (B,) real tree sizes (taken from the Tree when a Tree is passed); query rows
            past it are zero with lse = -inf, tree keys past it are ignored.
        block_table: (B, max_pages) int32/int64 page indices (paged layout).
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the (B, n, H_q) float32 log-sum-exp (natural log).
        out, lse_out: preallocated outputs (contiguous; CUDA-graph friendly). ``lse_out`` may be
            omitted, then a scratch one is allocated.
        check: validate ``prefix_lens`` (>= 0, prefix + tree fits the cache), ``tree_lens``
            (in [0, n]) and the used ``block_table`` entries (pages in [0, num_pages)): always
            on CPU, one host sync on CUDA. With ``check=False`` on CUDA the call is sync-free and
            bad values are clamped instead of raising (never an out-of-bounds read): tree_lens
            into [0, n], prefix_lens into [0, capacity - tree_len] (capacity = N, or max_pages *
            page_size), tree keys past the capacity are skipped, page indices are clamped into
            [0, num_pages).
        impl: "auto" | "plain" | "simt" | "tuned" (CUDA variants; the CPU has one kernel) | "reference"
            (:func:`tokenkernels.reference.tree.attention`); see :mod:`tokenkernels.variants`
            for what ``"auto"`` runs on CUDA. "tuned" runs the tensor-core attention core
            (fp16 / bf16 with head_dim 64 or 128; fp32 and other head sizes run "simt"):
            QK^T and PV on tensor cores with fp32 accumulation, the probabilities rounded to
            the input dtype before PV (as FlashAttention does).

    Tree token i attends every prefix token and the tree tokens whose bit is set in its mask row
    (itself and its ancestors). H_q must be a multiple of H_kv (GQA). Computed in fp32.
    """
    op = "attention"
    if isinstance(mask, Tree):
        if tree_lens is None:
            tree_lens = mask.tree_lens
        mask = mask.mask
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("mask", mask)):
        _tensor(t, name, op)
    if q.dim() != 4:   # the defaults below read q's batch and head dim
        raise ValueError(_err(op, f"q must be 4-D (B, n, H_q, D), got shape {tuple(q.shape)}"))
    check = _flag(check, "check", op)
    return_lse = _flag(return_lse, "return_lse", op)
    which = _choose(impl, q.device, op)
    B = q.shape[0]
    prefix_lens = _as_index(prefix_lens, "prefix_lens", op, q.device)
    tree_lens = _lens(tree_lens, q.device, "tree_lens", op)
    if block_table is not None:
        block_table = _as_index(block_table, "block_table", op, q.device)
    if prefix_lens.dim() == 0:
        prefix_lens = prefix_lens.reshape(1).expand(B)
    if scale is not None:
        try:
            if isinstance(scale, (bool, str, bytes)):
                raise TypeError
            scale = float(scale)
        except (TypeError, ValueError):
            raise TypeError(_err(op, f"scale must be a real number or None, got {scale!r}")) from None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if which == _REFERENCE:
        return _ref.attention(q, k_cache, v_cache, prefix_lens, mask, tree_lens=tree_lens, block_table=block_table,
                              scale=scale, return_lse=return_lse, out=out, lse_out=lse_out, check=check)
    if out is None and lse_out is None:
        o, lse = _ops.tree_attention(q, k_cache, v_cache, prefix_lens, mask, tree_lens, block_table,
                                     scale, check, which)
    else:
        o = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
        lse = q.new_empty(q.shape[:3], dtype=torch.float32) if lse_out is None else lse_out
        _ops.tree_attention_out(q, k_cache, v_cache, prefix_lens, mask, tree_lens, block_table,
                                scale, check, which, o, lse)
    return (o, lse) if return_lse else o


def _tree(tree, op: str) -> Tree:
    if not isinstance(tree, Tree):
        raise TypeError(_err(op, f"tree must be a tokenkernels.tree.Tree, got {type(tree).__name__}"))
    return tree


def verify_greedy(tree: Tree, draft_tokens: torch.Tensor, target_argmax: torch.Tensor, *,
                  check: bool = True, impl: str = "auto"):
    """Greedy tree verification.

    From the root, repeatedly move to the first child (in node order) whose draft token equals
    the target's arg-max at the current node.

    Args:
        tree: from :func:`build`.
        draft_tokens: (B, n) token of every node (node 0, the root, is ignored).
        target_argmax: (B, n) the target model's arg-max token after each node.
        check: verify that the child links are the tree's (the same error on CPU and CUDA; one
            host sync on CUDA). With ``check=False`` the CUDA call is sync-free and a corrupt
            child link ends the walk. The CPU validates the links in any case.
        impl: "auto" (one kernel per device) | "plain" | "simt" | "tuned" (the same kernel: CUDA
            variants are per family) | "reference" (:func:`tokenkernels.reference.tree.verify_greedy`).

    Returns:
        accepted (B, max_depth + 1) int64 node indices, the root first, padded -1;
        accept_len (B,) int64 number of accepted draft nodes (the root not counted), so
        ``accepted[b, :accept_len[b] + 1]`` is the accepted path; bonus (B,) int64 = target
        arg-max at the last accepted node.
    """
    op = "verify_greedy"
    tree = _tree(tree, op)
    draft_tokens = _per_node(draft_tokens, "draft_tokens", op)
    target_argmax = _per_node(target_argmax, "target_argmax", op)
    check = _flag(check, "check", op)
    if _choose(impl, tree.parents.device, op) == _REFERENCE:
        return _ref.verify_greedy(tree, draft_tokens, target_argmax, check=check)
    return _ops.tree_verify_greedy(tree.first_child, tree.next_sibling, draft_tokens,
                                   target_argmax, tree.max_depth, check)


def verify_sampling(tree: Tree, draft_tokens: torch.Tensor, target_probs: torch.Tensor, *,
                    draft_probs: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None, check: bool = True,
                    coins: Optional[torch.Tensor] = None, bonus_u: Optional[torch.Tensor] = None,
                    impl: str = "auto", mode: str = "specinfer"):
    """Lossless multi-candidate speculative sampling over a token tree (SpecInfer's rule, or
    Recursive Speculative Decoding with ``mode="rsd"``).

    At node u with residual distribution p (initially ``target_probs[u]``) the children are tried
    in node order:

    * with ``draft_probs``, ``mode="specinfer"`` (children drawn i.i.d. from ``q = draft_probs[u]``):
      accept child c (token t) with probability ``min(1, p(t) / q(t))``, else
      ``p <- normalise(max(p - q, 0))``;
    * with ``draft_probs``, ``mode="rsd"`` (RSD, Jeon et al. 2024: children drawn from q *without
      replacement*, e.g. Gumbel-top-k, in node order): the same with the draft residual q'
      (initially ``q / sum(q)``) in place of q, and after a rejection also ``q'(t) <- 0``,
      renormalised (the next sibling was drawn without t). A child whose token has ``q'(t) = 0`` (q's
      support exhausted by its earlier siblings) is a deterministic candidate (the rule below);
    * without ``draft_probs`` (deterministic candidates, q = one-hot; the two modes coincide):
      accept with probability ``p(t)``, else ``p(t) <- 0`` and renormalise.

    An accepted child becomes the current node (p = its target distribution); when no child is
    accepted (or at a leaf) the bonus token is drawn from p. The emitted tokens are distributed
    exactly as sampling from the target, provided the children were drawn as ``mode`` says
    (SpecInfer's rule on siblings drawn without replacement is lossy; RSD's assumes them).
    The rules, their edge cases and the proof: ``csrc/include/tokenkernels/tree.h``, VerifyMode.

    CPU and CUDA compute the residual and every decision in fp64 with the same formulas, so
    with the same coins they return the same result (up to ties within the last bits of the
    summation order). A residual that rounding would empty is not applied (p is kept). A node
    whose target row has no usable mass (sum not > 0 or not finite; only with ``check=False``)
    accepts no child, and its bonus is the row's last positive entry (token 0 if none) -- never
    a division by zero.

    Args:
        tree, draft_tokens: as in :func:`verify_greedy`.
        target_probs: (B, n, V) the target's (temperature-adjusted) probabilities after each node.
        draft_probs: (B, n, V) the draft distribution each node's children were drawn from.
        generator: for the uniforms (B*n + B of them, drawn on the tree's device).
        check: verify that the probability rows verification reads (the root's and every linked
            node's: the real nodes of a built tree) are distributions (entries >= 0, sum 1
            within max(1e-3, the dtype's eps)), that the child links
            are the tree's and that the draft tokens of the nodes verification can visit are in
            ``[0, V)`` (the same errors on CPU and CUDA; host syncs on CUDA). With
            ``check=False`` the CUDA call is sync-free; an out-of-range draft token is then never
            accepted (and leaves the residual unchanged), a corrupt child link ends the walk.
            The CPU validates links and tokens in any case.
        coins, bonus_u: the uniforms themselves ((B, n) and (B,)), overriding ``generator``
            (tests, replay).
        impl: "auto" (one kernel per device) | "plain" | "simt" | "tuned" (the same kernel: CUDA
            variants are per family) | "reference" (:func:`tokenkernels.reference.tree.verify_sampling`,
            which draws the uniforms the same way).
        mode: "specinfer" | "rsd", how the siblings were drawn (above). Both use one coin per
            visited child and bonus_u for the bonus, and decide in fp64 on every device.

    Returns: as :func:`verify_greedy`.
    """
    op = "verify_sampling"
    tree = _tree(tree, op)
    draft_tokens = _per_node(draft_tokens, "draft_tokens", op)
    for name, t in (("target_probs", target_probs), ("draft_probs", draft_probs),
                    ("coins", coins), ("bonus_u", bonus_u)):
        if (t is not None or name == "target_probs") and not isinstance(t, torch.Tensor):
            raise TypeError(_err(op, f"{name} must be a floating-point tensor, got {type(t).__name__}"))
    check = _flag(check, "check", op)
    if not isinstance(mode, str):   # (a str option in the schema: its parser's message otherwise)
        raise TypeError(_err(op, f"mode must be a str, got {type(mode).__name__}"))
    B, n = tree.batch, tree.n
    dev = tree.parents.device
    if _choose(impl, dev, op) == _REFERENCE:
        return _ref.verify_sampling(tree, draft_tokens, target_probs, draft_probs=draft_probs, generator=generator,
                                    check=check, coins=coins, bonus_u=bonus_u, mode=mode)
    if coins is None:
        coins = torch.rand((B, n), generator=generator, device=dev)
    if bonus_u is None:
        bonus_u = torch.rand((B,), generator=generator, device=dev)
    return _ops.tree_verify_sampling(tree.first_child, tree.next_sibling, draft_tokens,
                                     target_probs, draft_probs, coins, bonus_u, tree.max_depth,
                                     check, mode)


def select_frontier(cum_logp: torch.Tensor, child_logp: torch.Tensor, m: int, *, impl: str = "auto"):
    """One EAGLE-2 / DySpec expansion step: among every (frontier node f, child rank k) pair, the
    m with the largest ``cum_logp[b, f] + child_logp[b, f, k]`` (fp32; ties to the lower flat
    index ``f*K + k``), best first.

    Args:
        cum_logp: (B, F) cumulative draft log-probabilities of the frontier nodes.
        child_logp: (B, F, K) log-probabilities of each frontier node's top-K children.
        m: how many to keep (<= F*K).
        impl: "auto" | "plain" | "simt" | "tuned" (one kernel per device) | "reference"
            (:func:`tokenkernels.reference.tree.select_frontier`).

    Returns: parent (B, m) int64 frontier index, rank (B, m) int64 child rank, score (B, m) fp32.
    """
    op = "select_frontier"
    if not isinstance(cum_logp, torch.Tensor) or not isinstance(child_logp, torch.Tensor):
        raise TypeError(_err(op, "cum_logp and child_logp must be tensors"))
    m = _int_arg(m, "m", op)
    if _choose(impl, cum_logp.device, op) == _REFERENCE:
        return _ref.select_frontier(cum_logp, child_logp, m)
    return _ops.tree_select_frontier(cum_logp, child_logp, m)


def select_tree(cum_logp: torch.Tensor, parents: torch.Tensor, n: int, *, impl: str = "auto"):
    """Keep the n best nodes of a drafted tree (EAGLE-2's final re-ranking).

    The root (node 0) is always kept; the others by ``cum_logp`` (ties to the lower index). Kept
    nodes stay in their original (parents-first) order, so the result is ready for
    :func:`build`. With cumulative log-probabilities (non-increasing from parent to child) the
    kept set is closed under ancestors; otherwise a node is re-attached to its nearest kept
    ancestor.

    Args:
        cum_logp: (B, T) scores of the T drafted nodes.
        parents: (B, T) int32/int64 parents of the drafted tree (parents before children).
        n: nodes to keep (1 <= n <= T).
        impl: "auto" | "plain" | "simt" | "tuned" (one kernel per device) | "reference"
            (:func:`tokenkernels.reference.tree.select_tree`).

    Returns: indices (B, n) int64 into the T nodes (ascending), parents (B, n) int64 re-indexed,
    score (B, n) fp32.
    """
    op = "select_tree"
    if not isinstance(cum_logp, torch.Tensor) or not isinstance(parents, torch.Tensor):
        raise TypeError(_err(op, "cum_logp and parents must be tensors"))
    n = _int_arg(n, "n", op)
    if _choose(impl, cum_logp.device, op) == _REFERENCE:
        return _ref.select_tree(cum_logp, parents, n)
    return _ops.tree_select_tree(cum_logp, parents, n)


class DynamicTreeDrafter:
    """Grows a draft tree greedily by cumulative draft probability (EAGLE-2 / DySpec).

    ``step(tokens, parents, frontier) -> log_probs`` is any draft model: given the current tree
    (``tokens`` (B, T) with the root's token at 0, ``parents`` (B, T)) and the indices
    ``frontier`` (B, F) of the nodes to expand, it returns (B, F, V) log-probabilities of the next
    token after each frontier node (build the masks/positions with :func:`build` on ``parents``).

    Each of ``depth`` rounds takes every frontier node's ``top_k`` children, keeps the ``top_k``
    best by cumulative log-probability (:func:`select_frontier`) as the next frontier, and
    finally keeps the ``total_tokens`` best nodes overall (:func:`select_tree`). ``impl`` is
    passed to both (``"reference"``: the pure-PyTorch selections).
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 *, top_k: int = 10, depth: int = 6, total_tokens: int = 60, impl: str = "auto"):
        top_k, depth, total_tokens = (_int_arg(v, name, "DynamicTreeDrafter") for v, name in
                                      ((top_k, "top_k"), (depth, "depth"), (total_tokens, "total_tokens")))
        if top_k < 1 or depth < 1 or total_tokens < 1:
            raise ValueError(_err("DynamicTreeDrafter", "top_k, depth and total_tokens must be >= 1"))
        _variants.choose("tree", impl, "cpu", "tree.DynamicTreeDrafter")   # validate the name now
        self.step, self.top_k, self.depth, self.total_tokens, self.impl = step, top_k, depth, total_tokens, impl

    @torch.no_grad()
    def draft(self, root_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """root_tokens (B,) -> (tokens (B, n), parents (B, n), cum_logp (B, n)) of the kept tree."""
        B = root_tokens.shape[0]
        dev = root_tokens.device
        tokens = root_tokens.long().reshape(B, 1)
        parents = torch.full((B, 1), -1, dtype=torch.long, device=dev)
        cum = torch.zeros(B, 1, device=dev)
        frontier = torch.zeros(B, 1, dtype=torch.long, device=dev)
        for _ in range(self.depth):
            logp = self.step(tokens, parents, frontier).float()                  # (B, F, V)
            k = min(self.top_k, logp.shape[-1])
            child_logp, child_tok = logp.topk(k, dim=-1)                        # (B, F, k)
            m = min(self.top_k, frontier.shape[1] * k)
            par_f, rank, score = select_frontier(torch.gather(cum, 1, frontier), child_logp, m, impl=self.impl)
            new_tok = torch.gather(child_tok.reshape(B, -1), 1, par_f * k + rank)
            T = tokens.shape[1]
            tokens = torch.cat([tokens, new_tok], 1)
            parents = torch.cat([parents, torch.gather(frontier, 1, par_f)], 1)
            cum = torch.cat([cum, score], 1)
            frontier = torch.arange(T, T + m, device=dev).expand(B, m)
        n = min(self.total_tokens, tokens.shape[1])
        idx, new_par, score = select_tree(cum, parents, n, impl=self.impl)
        return torch.gather(tokens, 1, idx), new_par, score


# ------------------------------------------------------------------ fake (meta) implementations
# A meta tensor among CPU / CUDA tensors makes the dispatcher pick these shape-only kernels, so
# they refuse mixed devices first, with the device messages (and exception types) of
# csrc/tree/tree_args.h; the other checks are the real kernels'.
def _same_device(op: str, ref, ref_name: str, exc=RuntimeError, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise exc(_err(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}"))


@torch.library.register_fake("tokenkernels::tree_build")
def _build_fake(parents, tree_lens, check, impl):
    _same_device("build", parents, "parents", ValueError, tree_lens=tree_lens)
    B, n = parents.shape
    W = (n + 31) // 32
    lng = dict(dtype=torch.long)
    return (parents.new_empty((B, n, W), dtype=torch.int32), parents.new_empty((B, n), **lng),
            parents.new_empty((B, n), **lng), parents.new_empty((B, n), **lng))


@torch.library.register_fake("tokenkernels::tree_paths")
def _paths_fake(parents, depth, first_child, tree_lens, max_leaves, max_depth):
    _same_device("paths", parents, "parents", depth=depth, first_child=first_child)
    _same_device("paths", parents, "parents", ValueError, tree_lens=tree_lens)
    return parents.new_empty((parents.shape[0], max_leaves, max_depth + 1), dtype=torch.long)


@torch.library.register_fake("tokenkernels::tree_attention")
def _attention_fake(q, k_cache, v_cache, prefix_lens, mask, tree_lens, block_table, scale, check, impl):
    _same_device("attention", q, "q", k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                 prefix_lens=prefix_lens, mask=mask, tree_lens=tree_lens)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("tokenkernels::tree_attention_out")
def _attention_out_fake(q, k_cache, v_cache, prefix_lens, mask, tree_lens, block_table, scale, check, impl,
                        out, lse):
    _same_device("attention", q, "q", k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                 prefix_lens=prefix_lens, mask=mask, tree_lens=tree_lens, out=out, lse=lse)
    return None


def _verify_fake_outputs(first_child, max_depth):
    B = first_child.shape[0]
    return (first_child.new_empty((B, max_depth + 1), dtype=torch.long),
            first_child.new_empty((B,), dtype=torch.long), first_child.new_empty((B,), dtype=torch.long))


@torch.library.register_fake("tokenkernels::tree_verify_greedy")
def _verify_greedy_fake(first_child, next_sibling, draft_tokens, target_argmax, max_depth, check=True):
    _same_device("verify_greedy", first_child, "first_child", next_sibling=next_sibling)
    _same_device("verify_greedy", first_child, "the tree", ValueError, draft_tokens=draft_tokens,
                 target_argmax=target_argmax)
    return _verify_fake_outputs(first_child, max_depth)


@torch.library.register_fake("tokenkernels::tree_verify_sampling")
def _verify_sampling_fake(first_child, next_sibling, draft_tokens, target_probs, draft_probs, coins,
                          bonus_u, max_depth, check, mode="specinfer"):
    _same_device("verify_sampling", first_child, "first_child", next_sibling=next_sibling)
    _same_device("verify_sampling", first_child, "the tree", ValueError, draft_tokens=draft_tokens,
                 target_probs=target_probs, draft_probs=draft_probs, coins=coins, bonus_u=bonus_u)
    return _verify_fake_outputs(first_child, max_depth)


@torch.library.register_fake("tokenkernels::tree_select_frontier")
def _select_frontier_fake(cum_logp, child_logp, m):
    _same_device("select_frontier", cum_logp, "cum_logp", child_logp=child_logp)
    B = cum_logp.shape[0]
    return (cum_logp.new_empty((B, m), dtype=torch.long), cum_logp.new_empty((B, m), dtype=torch.long),
            cum_logp.new_empty((B, m), dtype=torch.float32))


@torch.library.register_fake("tokenkernels::tree_select_tree")
def _select_tree_fake(cum_logp, parents, n):
    _same_device("select_tree", cum_logp, "cum_logp", parents=parents)
    B = cum_logp.shape[0]
    return (cum_logp.new_empty((B, n), dtype=torch.long), cum_logp.new_empty((B, n), dtype=torch.long),
            cum_logp.new_empty((B, n), dtype=torch.float32))
