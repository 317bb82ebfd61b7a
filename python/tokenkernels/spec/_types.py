"""The drafter protocol of :mod:`tokenkernels.spec` and the sampling warp shared by target and draft.

A drafter proposes a token tree rooted at the last emitted token of every row; the loop runs the
target once over all its nodes, verifies, and tells the drafter what was accepted. Anything with
``reset`` / ``draft`` / ``update`` methods of these signatures is a drafter (:class:`Drafter`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Protocol, runtime_checkable

import torch

VERIFY_MODES = ("greedy", "specinfer", "rsd")


@dataclasses.dataclass
class DraftContext:
    """What a drafter sees at each step.

    Attributes:
        sequences: (B, L) int64 every token so far (the prompt, left padding included, and every
            emitted token, the root last); row b's real tokens, in order, are
            ``sequences[b][valid[b]]`` (:meth:`row`), and its last real token is ``root[b]``.
            Invalid entries may be anywhere before the root: left padding, and in a batch the
            slots of rows that accepted fewer tokens than another row at some step (the layout
            of the target's KV cache, plus the root).
        valid: (B, L) bool, the real tokens of ``sequences`` (``valid[:, -1]`` is all True).
        root: (B,) int64, the last emitted token of each row (node 0 of its next tree; its KV is
            not in any cache yet).
        active: (B,) bool, rows still generating (a finished row's tree is ignored: draft a
            1-node tree or anything for it).
        verify: "greedy" | "specinfer" | "rsd" -- how the children of a node must be drawn for the
            verification to be exact: "greedy": any deterministic tree; "specinfer": children
            i.i.d. from the node's ``draft_probs`` row, or deterministic (``draft_probs`` None);
            "rsd": children drawn *without replacement* from the node's ``draft_probs`` row, in
            node order (e.g. Gumbel-top-k), or deterministic. How many children a node gets must
            not depend on the draws of those children themselves (only on what was known before
            they were drawn).
        temperature, top_k, top_p: the sampling warp (:func:`warp_logits`); draft distributions
            must be warped the same way.
        generator: the torch.Generator of the generation (None: the global one).
        vocab_size: the target's vocabulary size V.
        max_tree_tokens: the most nodes a tree may have (the loop's limit).
    """
    sequences: torch.Tensor
    valid: torch.Tensor
    root: torch.Tensor
    active: torch.Tensor
    verify: str
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    generator: Optional[torch.Generator]
    vocab_size: int
    max_tree_tokens: int

    def row(self, b: int) -> torch.Tensor:
        """(L_b,) the real tokens of row b, the root last."""
        return self.sequences[b][self.valid[b]]


@dataclasses.dataclass
class DraftTree:
    """A drafted batch of trees.

    Attributes:
        tokens: (B, n) int64, ``tokens[:, 0]`` the root (``DraftContext.root``).
        parents: (B, n) int64, ``parents[:, 0] == -1``, ``0 <= parents[b, i] < i``.
        tree_lens: (B,) int64 real nodes per row (ragged batch; None = all n). Nodes past it are
            padding (any token, parent 0).
        draft_probs: (B, n, V) float, the distribution node i's children were drawn from
            (warped like the target), or None when the candidates are deterministic functions of
            the context (then verification needs no draft probabilities and is exact for any
            such tree).
    """
    tokens: torch.Tensor
    parents: torch.Tensor
    tree_lens: Optional[torch.Tensor] = None
    draft_probs: Optional[torch.Tensor] = None

    @property
    def n(self) -> int:
        return self.tokens.shape[1]


@dataclasses.dataclass
class StepResult:
    """The verification of one step, as passed to :meth:`Drafter.update`.

    Attributes:
        accepted: (B, D + 1) int64 node indices of the accepted path, the root first, -1 padded.
        accept_len: (B,) int64 accepted draft nodes (root not counted).
        bonus: (B,) int64 the token emitted after the accepted path (the next root).
        target_logits: (B, n, V) the target's raw logits after every tree node (fp32).
    """
    accepted: torch.Tensor
    accept_len: torch.Tensor
    bonus: torch.Tensor
    target_logits: torch.Tensor


@runtime_checkable
class Drafter(Protocol):
    """Proposes token trees. ``reset`` once per generation (the prompt: ``input_ids`` (B, L) and
    ``attention_mask`` (B, L), 0 = left padding), ``draft`` every step, ``update`` after every
    verification (before the next ``draft``)."""

    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None: ...

    def draft(self, ctx: DraftContext) -> DraftTree: ...

    def update(self, ctx: DraftContext, tree: DraftTree, result: StepResult) -> None: ...


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None) -> torch.Tensor:
    """HF's sampling warp of ``logits`` (..., V): divide by ``temperature``, then keep the
    ``top_k`` largest (ties with the k-th kept), then the smallest set of most likely tokens
    whose probability reaches ``top_p`` (at least one); removed entries are -inf. Returns fp32
    logits (softmax them for the sampling distribution), in the order and with the rules of
    transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    if top_k is not None and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False                    # keep at least the most likely token
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return x


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                   top_p: Optional[float]) -> torch.Tensor:
    """softmax(:func:`warp_logits`) in fp32."""
    return torch.softmax(warp_logits(logits, temperature, top_k, top_p), dim=-1)
