"""``tokenkernels.spec.generate``: the speculative decoding loop over token trees."""
from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Sequence, Union

import torch

from .. import tree as _tree
from .._common import as_int_min
from . import _hf
from ._types import VERIFY_MODES, DraftContext, DraftTree, Drafter, StepResult, sampling_probs

_OP = "tokenkernels.spec.generate"


def _err(msg: str) -> str:
    return f"{_OP}: {msg}"


@dataclasses.dataclass
class SpecStats:
    """Statistics of one :func:`generate` call.

    Attributes:
        target_forwards: forwards of the target (the prefill and one per step).
        steps: draft-verify steps (target forwards after the prefill).
        new_tokens: generated tokens, summed over rows (as in ``sequences``, eos included,
            padding not).
        tokens_per_forward: ``new_tokens / (rows * target_forwards)`` -- the prefill counted,
            as HF's own forward counts are.
        mean_accepted: mean accepted draft tokens per step and active row (the bonus token not
            counted): a step emits ``mean_accepted + 1`` tokens on average.
        accept_lengths: per step, the accepted draft tokens of every row (-1 = the row had
            finished).
        tree_tokens: mean tree size (nodes, the root included) per step.
        draft_s, target_s, verify_s, commit_s, total_s: wall-clock seconds (synchronised) of
            the drafter (draft + update), the target's tree forwards, the verification, the KV
            commits and the whole call (the prefill included).
        fast_attention_calls, dense_attention_calls: target attention-layer calls through
            ``tokenkernels.tree.attention`` and through the 4-D mask fallback.
    """
    target_forwards: int = 0
    steps: int = 0
    new_tokens: int = 0
    tokens_per_forward: float = 0.0
    mean_accepted: float = 0.0
    accept_lengths: List[List[int]] = dataclasses.field(default_factory=list)
    tree_tokens: float = 0.0
    draft_s: float = 0.0
    target_s: float = 0.0
    verify_s: float = 0.0
    commit_s: float = 0.0
    total_s: float = 0.0
    fast_attention_calls: int = 0
    dense_attention_calls: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("accept_lengths")
        return d


@dataclasses.dataclass
class SpecOutput:
    """``sequences`` (B, L + new) int64 (the prompt, then the generated tokens, ``pad_token_id``
    after a row's eos, as HF's ``generate``); ``stats`` (:class:`SpecStats`); ``cache``: the
    target's KV cache at the end, holding the prompt and every emitted token but the last (ready
    to continue from the last), whose slot s of row b holds a real token iff
    ``cache_valid[b, s]`` (False: left padding, and slots a batch left unused)."""
    sequences: torch.Tensor
    stats: SpecStats
    cache: object = None
    cache_valid: Optional[torch.Tensor] = None


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _vocab(model) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def _eos_list(eos, model) -> List[int]:
    if eos is None:
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        eos = eos.reshape(-1).tolist()
    if isinstance(eos, int) and not isinstance(eos, bool):
        return [eos]
    try:
        out = [int(e) for e in eos]
    except (TypeError, ValueError):
        raise TypeError(_err(f"eos_token_id must be an int, a list of ints or None, got {eos!r}")) from None
    return out


def _make_drafter(drafter, draft, tree, V: int):
    from ._model import ModelDrafter

    if drafter is None:
        drafter = "model" if draft is not None else "recycling"
    if isinstance(drafter, str):
        if drafter == "model":
            if draft is None:
                raise ValueError(_err('drafter="model" needs a draft model: pass draft='))
            dv = _vocab(draft)
            if dv != V:
                raise ValueError(_err(f"the draft model's vocabulary ({dv}) differs from the target's ({V}); "
                                      f"the drafts must use the target's token ids"))
            kw = tree if isinstance(tree, dict) else {}
            shape = "dynamic" if (tree is None or isinstance(tree, dict)) else tree
            try:
                return ModelDrafter(draft, tree=shape, **kw)
            except TypeError as e:
                raise ValueError(_err(f"bad tree= for the model drafter: {e}")) from None
        if drafter == "recycling":
            from ._recycling import RecyclingDrafter

            kw = {}
            if tree is not None:
                kw = dict(tree) if isinstance(tree, dict) else dict(template=tree)
            return RecyclingDrafter(V, **kw)
        if drafter == "lookup":
            from ._lookup import LookupDrafter

            return LookupDrafter(**(dict(tree) if isinstance(tree, dict) else {}))
        raise ValueError(_err(f'drafter must be "model", "recycling", "lookup" or a Drafter, got {drafter!r}'))
    if not all(callable(getattr(drafter, m, None)) for m in ("reset", "draft", "update")):
        raise TypeError(_err(f"drafter must be a name or an object with reset/draft/update methods "
                             f"(tokenkernels.spec.Drafter), got {type(drafter).__name__}"))
    return drafter


def _check_tree(dt, B: int, root: torch.Tensor, max_nodes: int, V: int) -> None:
    if not isinstance(dt, DraftTree):
        raise TypeError(_err(f"the drafter returned {type(dt).__name__}, not a DraftTree"))
    if dt.tokens.dim() != 2 or dt.tokens.shape[0] != B or dt.parents.shape != dt.tokens.shape:
        raise ValueError(_err(f"the drafter's tree must have tokens and parents of shape ({B}, n), got "
                              f"{tuple(dt.tokens.shape)} and {tuple(dt.parents.shape)}"))
    n = dt.tokens.shape[1]
    if n > max_nodes:
        raise ValueError(_err(f"the drafter's tree has {n} nodes, more than max_tree_tokens={max_nodes} "
                              f"(at most the model's max_position_embeddings)"))
    if not torch.equal(dt.tokens[:, 0], root):
        raise ValueError(_err("the drafter's tree must have the root token (ctx.root) at node 0"))
    if dt.draft_probs is not None and tuple(dt.draft_probs.shape) != (B, n, V):
        raise ValueError(_err(f"draft_probs must have shape ({B}, {n}, {V}), got {tuple(dt.draft_probs.shape)}"))


def _check_int(v, name: str, lo: int, allow_none: bool = False):
    return as_int_min(v, lo, name, "spec.generate", none_ok=allow_none)


@torch.no_grad()
def generate(target, input_ids: torch.Tensor, *, draft=None, drafter: Union[str, Drafter, None] = None,
             tree=None, max_new_tokens: int = 32, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, verify: str = "specinfer",
             attention_mask: Optional[torch.Tensor] = None, eos_token_id=None,
             pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             cache: str = "dynamic", max_tree_tokens: Optional[int] = None) -> SpecOutput:
    """Generate with speculative decoding over token trees.

    Each step drafts a token tree rooted at the last emitted token, runs ``target`` once over all
    its nodes (positions = context length + depth; each node attends the whole context and its
    ancestors: :func:`tokenkernels.tree.attention` as an HF attention implementation, or a 4-D
    mask where the batch has padding), verifies it, commits the KV of the accepted path only,
    and continues from the bonus token.

    Args:
        target: an HF causal LM (``DynamicCache`` / ``StaticCache`` capable, full attention).
        input_ids: (B, L) int64 prompts (left-padded for B > 1 with ``attention_mask``).
        draft: the draft model for ``drafter="model"`` (same vocabulary).
        drafter: ``"model"`` (default when ``draft`` is given: a dynamic EAGLE-2 tree grown by the
            draft model, :class:`~tokenkernels.spec.ModelDrafter`), ``"recycling"`` (default
            otherwise: Token Recycling, model-free), ``"lookup"`` (n-gram lookup in the context,
            a tree of all matches), or any :class:`~tokenkernels.spec.Drafter`.
        tree: the drafter's tree: for "model" ``None`` / a dict of ModelDrafter's sizes
            (``top_k``, ``depth``, ``total_tokens``) for the dynamic tree, or a static template
            (Medusa ``choices``, e.g. ``tokenkernels.spec.chain(5)``); for "recycling" a
            template or a dict of RecyclingDrafter's arguments; for "lookup" a dict of
            LookupDrafter's arguments.
        max_new_tokens: tokens to generate per row (HF's meaning: a row stops after this many,
            or at eos).
        temperature: 0 = greedy (the output equals ``target.generate(do_sample=False)``);
            > 0 = sampling, exact: the output is distributed as the target's own sampling with
            the same temperature / top_k / top_p (HF's warpers, applied to target and draft).
        top_k, top_p: the sampling warp (None = off; note HF's generation config defaults to
            top_k=50 when sampling, pass it explicitly to compare).
        verify: "specinfer" (multi-candidate speculative sampling; siblings drawn i.i.d.) or
            "rsd" (Recursive Speculative Decoding: siblings drawn without replacement). Only
            used when sampling; model-free drafters propose deterministic candidates, for which
            the two coincide.
        attention_mask: (B, L) 1 = token, 0 = (left) padding.
        eos_token_id: int or list (default: the target's generation config's).
        pad_token_id: written after a row's eos (default: the generation config's, else the
            first eos, else 0).
        generator: torch.Generator for sampling (draws, coins).
        cache: ``"dynamic"`` (HF ``DynamicCache``) or ``"static"`` (``StaticCache`` sized for
            the call).
        max_tree_tokens: the largest tree a drafter may propose (default and upper bound: the
            target's ``max_position_embeddings``).

    Returns: :class:`SpecOutput` (``sequences``, ``stats``). Batches: every row may accept a
    different number of tokens per step; rows that accepted fewer leave unused slots in the
    shared KV cache (masked), and such steps use the 4-D mask path.
    """
    t_start = time.perf_counter()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(_err(f"input_ids must be a (B, L) int64 tensor, got "
                              f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"))
    B, L0 = input_ids.shape
    if B < 1 or L0 < 1:
        raise ValueError(_err(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}"))
    input_ids = input_ids.long()
    dev = input_ids.device
    max_new_tokens = _check_int(max_new_tokens, "max_new_tokens", 1)
    top_k = _check_int(top_k, "top_k", 1, allow_none=True)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(_err(f"temperature must be a number >= 0, got {temperature!r}"))
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(_err(f"top_p must be in (0, 1] or None, got {top_p!r}"))
    if verify not in ("specinfer", "rsd"):
        raise ValueError(_err(f'verify must be "specinfer" or "rsd", got {verify!r}'))
    if cache not in ("dynamic", "static"):
        raise ValueError(_err(f'cache must be "dynamic" or "static", got {cache!r}'))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(_err(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                              f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}"))
    attention_mask = attention_mask.to(dev).long()
    if bool((attention_mask.sum(1) == 0).any()):
        raise ValueError(_err("attention_mask has a row without any token"))
    mode = "greedy" if temperature == 0 else verify
    V = _vocab(target)
    max_pos = getattr(target.config, "max_position_embeddings", None)
    if max_tree_tokens is None:
        max_tree_tokens = min(1024, max_pos) if max_pos else 1024
    max_tree_tokens = _check_int(max_tree_tokens, "max_tree_tokens", 1)
    if max_pos is not None and max_tree_tokens > max_pos:
        raise ValueError(_err(f"max_tree_tokens={max_tree_tokens} is larger than the target's "
                              f"max_position_embeddings={max_pos}"))
    eos = _eos_list(eos_token_id, target)
    if pad_token_id is None:
        gc = getattr(target, "generation_config", None)
        pad_token_id = getattr(gc, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    dr = _make_drafter(drafter, draft, tree, V)
    if hasattr(dr, "max_nodes"):
        need = dr.max_nodes(mode)
        if need > max_tree_tokens:
            raise ValueError(_err(f"the drafter's tree has up to {need} nodes, more than max_tree_tokens="
                                  f"{max_tree_tokens} (the model's positions: {max_pos})"))

    from transformers import DynamicCache, StaticCache

    if cache == "static":
        cap = L0 + B * max_new_tokens + max_tree_tokens + 1
        kv = StaticCache(config=target.config, max_cache_len=cap)
    else:
        kv = DynamicCache(config=target.config)
    _hf.check_cache(kv)
    stats = SpecStats()

    # prefill (the target's own attention and masks) and the first token
    prime = getattr(dr, "prime", None)
    _sync(dev)
    t0 = time.perf_counter()
    if callable(prime):   # the drafter learns from every prompt position (Token Recycling)
        all_logits = _hf.forward_prefill(target, kv, input_ids, attention_mask, all_positions=True)
        logits0 = all_logits[:, -1]
    else:
        logits0 = _hf.forward_prefill(target, kv, input_ids, attention_mask)
    _sync(dev)
    stats.target_s += time.perf_counter() - t0
    stats.target_forwards += 1
    if mode == "greedy":
        root = logits0.argmax(-1)
    else:
        root = torch.multinomial(sampling_probs(logits0, temperature, top_k, top_p), 1, generator=generator)[:, 0]
    t0 = time.perf_counter()
    dr.reset(input_ids, attention_mask)
    if callable(prime):
        prime(input_ids, all_logits, attention_mask)
        del all_logits
    _sync(dev)
    stats.draft_s += time.perf_counter() - t0

    slot_tok = input_ids.clone()
    slot_valid = attention_mask.bool()
    pos = attention_mask.sum(1)                       # (B,) position of the root
    root_h = root.tolist()
    emitted: List[List[int]] = [[t] for t in root_h]
    eos_set = set(eos)
    done = [t in eos_set or max_new_tokens <= 1 for t in root_h]
    active = torch.tensor([not d for d in done], dtype=torch.bool, device=dev)
    accepted_total = 0
    active_steps = 0
    nodes_total = 0

    while not all(done):
        ctx = DraftContext(sequences=torch.cat([slot_tok, root[:, None]], 1),
                           valid=torch.cat([slot_valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1),
                           root=root, active=active, verify=mode, temperature=float(temperature), top_k=top_k,
                           top_p=top_p, generator=generator, vocab_size=V, max_tree_tokens=max_tree_tokens)
        t0 = time.perf_counter()
        dt = dr.draft(ctx)
        _sync(dev)
        stats.draft_s += time.perf_counter() - t0
        _check_tree(dt, B, root, max_tree_tokens, V)
        T = _tree.build(dt.parents, dt.tree_lens)
        n = dt.tokens.shape[1]
        L = slot_tok.shape[1]
        step = _hf.TreeStep(L, slot_valid, None, packed=T.mask, tree_lens=T.tree_lens, fast=bool(slot_valid.all()))
        t0 = time.perf_counter()
        logits = _hf.forward_tree(target, kv, step, dt.tokens, pos[:, None] + T.depth)
        _sync(dev)
        stats.target_s += time.perf_counter() - t0
        stats.target_forwards += 1
        stats.steps += 1
        stats.fast_attention_calls += step.fast_calls
        stats.dense_attention_calls += step.dense_calls
        t0 = time.perf_counter()
        if mode == "greedy":
            acc, alen, bonus = _tree.verify_greedy(T, dt.tokens, logits.argmax(-1))
        else:
            tp = sampling_probs(logits, temperature, top_k, top_p)
            acc, alen, bonus = _tree.verify_sampling(T, dt.tokens, tp, draft_probs=dt.draft_probs,
                                                     generator=generator, mode=verify)
        _sync(dev)
        stats.verify_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        dr.update(ctx, dt, StepResult(acc, alen, bonus, logits))
        _sync(dev)
        stats.draft_s += time.perf_counter() - t0

        # emit (host): the accepted draft tokens, then the bonus; stop at eos / max_new_tokens
        t0 = time.perf_counter()
        acc_tok = torch.gather(dt.tokens, 1, acc.clamp_min(0))
        alen_h, acc_tok_h, bonus_h = alen.tolist(), acc_tok.tolist(), bonus.tolist()
        step_lens = []
        for b in range(B):
            if done[b]:
                step_lens.append(-1)
                continue
            step_lens.append(alen_h[b])
            accepted_total += alen_h[b]
            active_steps += 1
            for t in acc_tok_h[b][1:alen_h[b] + 1] + [bonus_h[b]]:
                emitted[b].append(t)
                if t in eos_set or len(emitted[b]) >= max_new_tokens:
                    done[b] = True
                    break
        stats.accept_lengths.append(step_lens)
        nodes_total += n
        # commit the KV of the accepted path (root first) at slots L, L + 1, ...
        A = int(max((alen_h[b] for b in range(B) if step_lens[b] >= 0), default=0)) + 1
        keep = acc[:, :A].clamp_min(0)
        _hf.commit(kv, L, keep)
        new_valid = (torch.arange(A, device=dev)[None, :] <= alen[:, None]) & active[:, None]
        slot_tok = torch.cat([slot_tok, torch.gather(dt.tokens, 1, keep)], 1)
        slot_valid = torch.cat([slot_valid, new_valid], 1)
        pos = pos + (alen + 1) * active
        root = bonus
        active = torch.tensor([not d for d in done], dtype=torch.bool, device=dev)
        _sync(dev)
        stats.commit_s += time.perf_counter() - t0

    # a step cut by eos / max_new_tokens committed more than was emitted: keep the cache in step
    # with `sequences` (every emitted token but the last), dropping trailing unused slots
    allowed = attention_mask.sum(1) + torch.tensor([len(e) - 1 for e in emitted], device=dev)
    slot_valid = slot_valid & (slot_valid.long().cumsum(1) <= allowed[:, None])
    used = slot_valid.any(0).nonzero()
    last = int(used.max()) + 1 if used.numel() else 0
    if last < slot_valid.shape[1]:
        _hf.commit(kv, last, torch.zeros(B, 0, dtype=torch.long, device=dev))
        slot_valid = slot_valid[:, :last]
    W = max(len(e) for e in emitted)
    gen_t = torch.full((B, W), int(pad_token_id), dtype=torch.long)
    for b, e in enumerate(emitted):
        gen_t[b, :len(e)] = torch.tensor(e, dtype=torch.long)
    stats.new_tokens = sum(len(e) for e in emitted)
    stats.tokens_per_forward = stats.new_tokens / (B * stats.target_forwards)
    stats.mean_accepted = accepted_total / active_steps if active_steps else 0.0
    stats.tree_tokens = nodes_total / stats.steps if stats.steps else 0.0
    _sync(dev)
    stats.total_s = time.perf_counter() - t_start
    return SpecOutput(torch.cat([input_ids, gen_t.to(dev)], 1), stats, kv, slot_valid)
