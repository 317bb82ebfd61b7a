"""``tokenkernels.spec``: speculative decoding over token trees, end to end.

* :func:`generate` -- the loop: draft a token tree, run the target once over it
  (:func:`tokenkernels.tree.attention` as an HF attention implementation), verify
  (:func:`tokenkernels.tree.verify_greedy` / :func:`tokenkernels.tree.verify_sampling`, SpecInfer or
  RSD), commit the accepted path's KV, continue from the bonus token;
* drafters (:class:`Drafter` protocol): :class:`ModelDrafter` (a small HF draft model: dynamic
  EAGLE-2 tree or a static template such as :func:`chain`), :class:`RecyclingDrafter` (Token
  Recycling, model-free), :class:`LookupDrafter` (n-gram lookup in the context, a tree of all
  matches);
* :func:`warp_logits` / :func:`sampling_probs`: HF's temperature / top-k / top-p warp, shared by
  target and draft.

HF ``model.generate`` integration: :mod:`tokenkernels.integrations.transformers`
(``enable_speculative_decoding``, ``spec_stats``).
"""
from ._lookup import LookupDrafter
from ._loop import SpecOutput, SpecStats, generate
from ._model import ModelDrafter, chain
from ._recycling import RecyclingDrafter
from ._types import DraftContext, Drafter, DraftTree, StepResult, sampling_probs, warp_logits

__all__ = ["generate", "SpecOutput", "SpecStats", "ModelDrafter", "chain", "RecyclingDrafter", "LookupDrafter", "Drafter", "DraftContext",
           "DraftTree", "StepResult", "warp_logits", "sampling_probs"]
