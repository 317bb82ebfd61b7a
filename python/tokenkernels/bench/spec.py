"""spec family: speculative decoding end to end on the shipped byte-level pair
(:mod:`tokenkernels.bench.spec_pair`: a 6-layer target and a 1-layer draft trained on the Python
standard library), on held-out code prompts, batch 1.

One case per decoding mode -- greedy (temperature 0) and sampling (temperature 0.7, top_p 0.9,
no top-k) -- over the same prompts (quick: 2 prompts, 64 new tokens; full: 4 prompts, 128 new
tokens; every prompt 200 bytes cut from a held-out file). Implementations, all on the same
target, the same draft and the same prompts, one prompt after the other:

* ``hf generate``: plain ``target.generate`` (one target forward per token: the 1x baseline);
* ``hf assisted``: ``target.generate(assistant_model=draft)``, HF's chain assisted decoding
  with its defaults (up to 20 draft tokens a step, drafting stops below 0.4 draft confidence);
* ``hf prompt_lookup``: ``target.generate(prompt_lookup_num_tokens=10)`` (n-gram lookup in the
  prompt and the output so far);
* ``spec model`` / ``spec recycling`` / ``spec lookup``: ``tokenkernels.spec.generate`` with
  ``drafter="model"`` (the draft model, dynamic tree), ``"recycling"`` (Token Recycling) and
  ``"lookup"`` (n-gram lookup), when :mod:`tokenkernels.spec` is importable (else a note).

Each implementation's median is the wall time of generating every prompt's tokens; sampling
runs are seeded per prompt (``torch.manual_seed`` for HF, a ``torch.Generator`` for ours), so
every repeat does the same work. Metrics, from one counted run before the timing: ``tok/s``
(new tokens over the median), ``tok/fwd`` (new tokens per target forward: HF's and ours are
counted by the same forward hook on the target's decoder, ``target.model``; the prompt's
prefill is a forward), ``fwd/tok`` (its inverse); greedy only: ``=greedy``, the prompts whose
output equals plain greedy ``target.generate`` token for token (it must be all of them); ours
also, from :class:`tokenkernels.spec.SpecStats`: ``draft %`` / ``verify %`` / ``target %`` /
``commit %``, the shares of ``draft_s`` / ``verify_s`` / ``target_s`` / ``commit_s`` in
``total_s`` (the rest: the prefill and the loop's own Python), ``acc/step`` (mean accepted
draft tokens per step, the bonus token not counted), ``tree`` (mean tree nodes per step) and
``tree attn %`` (the target's attention calls through ``tokenkernels.tree.attention``, the rest
through the 4-D mask fallback). Rows against ``hf generate`` (``vs hf generate`` > 1: faster than
plain decoding) and ``hf assisted``.

Models run in fp32 (CPU and CUDA): greedy equality is then a property of the algorithms, not of
low-precision rounding that differs between a 1-token and a many-token forward.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import Context, Row
from . import spec_pair

DESCRIPTION = ("speculative decoding end to end: tokenkernels.spec.generate vs HF assisted / "
               "prompt lookup / plain generate on the shipped byte-level pair")

MODES = {"greedy": dict(temperature=0.0, top_p=None),
         "sampling": dict(temperature=0.7, top_p=0.9)}
PROMPT_LOOKUP_TOKENS = 10
SEED = 1234


def _sizes(quick: bool) -> Tuple[int, int]:
    """(prompts, new tokens per prompt)."""
    return (2, 64) if quick else (4, 128)


def case_label(mode: str, quick: bool) -> str:
    k, new = _sizes(quick)
    t = MODES[mode]
    how = "T0" if mode == "greedy" else f"T{t['temperature']} top_p{t['top_p']}"
    return f"{mode} {how} {k} prompts x{spec_pair.PROMPT_BYTES}B +{new} B1"


def cases(quick: bool, cuda: bool = False) -> List[str]:
    return [case_label(m, quick) for m in MODES]


class ForwardCounter:
    """Counts forwards of a module (a forward hook): the target's decoder."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def close(self) -> None:
        self._h.remove()


def _hf_kwargs(mode: str, new: int) -> Dict[str, object]:
    t = MODES[mode]
    kw: Dict[str, object] = dict(max_new_tokens=new, pad_token_id=spec_pair.PAD_TOKEN_ID)
    if t["temperature"] == 0.0:
        kw["do_sample"] = False
    else:
        kw.update(do_sample=True, temperature=t["temperature"], top_p=t["top_p"], top_k=0)
    return kw


def _impls(target, draft, mode: str, new: int, spec) -> Dict[str, Callable]:
    """name -> fn(ids, seed) -> (sequences (1, L + new), SpecStats or None)."""
    kw = _hf_kwargs(mode, new)
    t = MODES[mode]

    def hf(**extra):
        def fn(ids, seed):
            torch.manual_seed(seed)
            return target.generate(ids, **kw, **extra), None
        return fn

    out = {"hf generate": hf(), "hf assisted": hf(assistant_model=draft),
           "hf prompt_lookup": hf(prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)}
    if spec is None:
        return out

    def ours(drafter, **extra):
        def fn(ids, seed):
            g = torch.Generator(device=ids.device).manual_seed(seed)
            o = spec.generate(target, ids, drafter=drafter, max_new_tokens=new,
                              temperature=t["temperature"], top_p=t["top_p"], generator=g, **extra)
            return o.sequences, o.stats
        return fn

    out["spec model"] = ours("model", draft=draft)
    out["spec recycling"] = ours("recycling")
    out["spec lookup"] = ours("lookup")
    return out


def _import_spec():
    try:
        from tokenkernels import spec
        spec.generate  # noqa: B018  (the loop, not only the protocol module)
        return spec, None
    except (ImportError, AttributeError) as e:
        return None, f"tokenkernels.spec.generate unavailable ({type(e).__name__}: {e}): no 'spec' rows"


def run(ctx: Context) -> None:
    dev = ctx.device
    quick = ctx.quick
    ctx.total_cases = len(cases(quick, ctx.cuda))
    k, new = _sizes(quick)
    target, draft = spec_pair.load_pair(dev, torch.float32)
    prompts = [spec_pair.encode(p).to(dev) for p in spec_pair.load_prompts()[:k]]
    spec, why = _import_spec()
    if why:
        ctx.note(why)
    counter = ForwardCounter(target.model)
    greedy_ref: Optional[List[torch.Tensor]] = None
    try:
        for mode in MODES:
            started = time.perf_counter()
            row = Row("spec", case_label(mode, quick), baselines=("hf generate", "hf assisted"))
            for name, fn in _impls(target, draft, mode, new, spec).items():
                def all_prompts(fn=fn):
                    return [fn(ids, SEED + i) for i, ids in enumerate(prompts)]
                try:
                    counter.n = 0
                    with torch.no_grad():
                        res = all_prompts()
                    ctx.sync()
                    forwards = counter.n
                    with torch.no_grad():
                        timing = ctx.time(all_prompts)
                except Exception as e:   # one implementation failing must not hide the others
                    ctx.note(f"{case_label(mode, quick)}: {name} failed: {type(e).__name__}: {e}")
                    continue
                seqs = [s for s, _ in res]
                made = sum(s.shape[1] - p.shape[1] for s, p in zip(seqs, prompts))
                metrics: Dict[str, object] = {
                    "tok/s": made / (timing.ms * 1e-3) if timing.ms > 0 else math.nan,
                    "tok/fwd": made / forwards if forwards else math.nan,
                    "fwd/tok": forwards / made if made else math.nan,
                }
                if mode == "greedy":
                    if name == "hf generate":
                        greedy_ref = [s.cpu() for s in seqs]
                    if greedy_ref is not None:
                        same = sum(bool(torch.equal(s.cpu(), r)) for s, r in zip(seqs, greedy_ref))
                        metrics["=greedy"] = f"{same}/{len(seqs)}"
                stats = [st for _, st in res if st is not None]
                if stats:
                    total = sum(st.total_s for st in stats) or math.nan
                    metrics["draft %"] = 100 * sum(st.draft_s for st in stats) / total
                    metrics["verify %"] = 100 * sum(st.verify_s for st in stats) / total
                    metrics["target %"] = 100 * sum(st.target_s for st in stats) / total
                    metrics["commit %"] = 100 * sum(st.commit_s for st in stats) / total
                    steps = sum(st.steps for st in stats)
                    metrics["acc/step"] = (sum(st.mean_accepted * st.steps for st in stats) / steps
                                           if steps else math.nan)
                    metrics["tree"] = (sum(st.tree_tokens * st.steps for st in stats) / steps
                                       if steps else math.nan)
                    fast = sum(st.fast_attention_calls for st in stats)
                    dense = sum(st.dense_attention_calls for st in stats)
                    metrics["tree attn %"] = 100 * fast / (fast + dense) if fast + dense else math.nan
                    own = sum(st.target_forwards for st in stats)
                    if own != forwards:
                        ctx.note(f"{row.case}: {name}: SpecStats.target_forwards {own} != "
                                 f"{forwards} forwards of target.model counted by the hook")
                row.add(name, timing, metrics=metrics)
            ctx.add(row, started)
    finally:
        counter.close()
    ctx.note(f"pair: {spec_pair.PAIR_DIR.name} (target {spec_pair.n_params(target) / 1e6:.2f}M "
             f"params, draft {spec_pair.n_params(draft) / 1e6:.2f}M), fp32; hf assisted: HF's "
             f"defaults (num_assistant_tokens 20, constant schedule, confidence threshold 0.4); "
             f"hf prompt_lookup: prompt_lookup_num_tokens={PROMPT_LOOKUP_TOKENS}")
