"""HF transformers integrations, end to end on small randomly initialised models:

* loss patch: one training step (forward + backward) of a small Llama (D256, 2 layers) with a
  large vocabulary, HF's loss (materialised logits) vs ``patch_causal_lm_loss``, in one run:
  step time (``vs hf`` = HF's median / the patched one's: >= 1.0 means the patch is faster) and
  peak memory of the step (CPU: peak resident set above the start of the step, in a fresh
  process per variant; CUDA: max_memory_allocated), metric ``peak MiB`` and ``mem vs hf`` = HF's
  peak / this one's (> 1: the patch needs less). The full run's shape, V=128256 and B2 x L2048
  (4096 tokens), makes the (N, V) logits (2 GiB in fp32) dominate the step's memory and time;
* TokenSelect: one decode step at a long context, SDPA vs ``"tokenselect"`` (select + sparse
  decode on a Selection Cache miss, and the hit path), for the whole model step (HF's
  DynamicCache appends with ``torch.cat``, an O(N) copy both variants pay) and for one layer's
  attention call alone;
* visual pruning: LLaVA prefill (vision tower + projector + LM over the prompt), unpruned vs
  ``apply_visual_token_pruning`` (kcenter / coverage, keep=0.098).

Rows: each case against HF's own path (``hf``, ``sdpa``, ``unpruned``; the attention call also
against ``sdpa grouped``, the fastest dense form on CPU), so ``vs X`` = HF time / this one
(> 1: the integration saves); metrics ``peak MiB`` and ``mem vs hf`` for the loss patch.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import List

import torch

from . import Context, Row

DESCRIPTION = "HF transformers integrations: loss patch, TokenSelect decode, visual pruning (end to end)"


# ------------------------------------------------------------------------------ cases
def _loss_shape(quick: bool):
    # V, B, L: the full run's 4096 tokens x V=128256 make the logits (2 GiB fp32) dominate
    return (32000, 1, 256) if quick else (128256, 2, 2048)


def _tokenselect_shape(quick: bool, cuda: bool):
    N = 8192 if quick else 32768
    return N, 32, 8, 128, 2, (torch.bfloat16 if cuda else torch.float32)   # N Hq Hkv D layers dtype


def _visual_images(quick: bool) -> int:
    return 2 if quick else 4


VISUAL_TEXT = (16, 64)   # text tokens before each image, after the last one


def loss_labels(quick: bool, cuda: bool) -> List[str]:
    V, B, L = _loss_shape(quick)
    return [f"train step llama D256 2L V{V} B{B} L{L}"]


def tokenselect_labels(quick: bool, cuda: bool) -> List[str]:
    N, Hq, Hkv, D, layers, dt = _tokenselect_shape(quick, cuda)
    return [f"decode step llama {layers}L Hq{Hq} Hkv{Hkv} D{D} N{N} {str(dt).split('.')[-1]}",
            f"attention call Hq{Hq} Hkv{Hkv} D{D} N{N}"]


def visual_labels(quick: bool, cuda: bool) -> List[str]:
    n_img = _visual_images(quick)
    txt = VISUAL_TEXT[0] * n_img + VISUAL_TEXT[1]
    return [f"llava prefill {n_img}x576 img + {txt} txt, LM D1024 4L"]


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


# ------------------------------------------------------------------------------ loss patch
def _loss_model(V: int, device):
    T = _quiet_transformers()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return T.LlamaForCausalLM(cfg).to(device)


_MEM_SNIPPET = r"""
import gc, json, sys, torch
sys.path.insert(0, {path!r})
from tokenkernels.bench.integrations import _loss_model
from tokenkernels.integrations.transformers import patch_causal_lm_loss
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
model = _loss_model({V}, "cpu")
if {patched}:
    patch_causal_lm_loss(model)
ids = torch.randint(0, {V}, ({B}, {L}))
model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()   # warm-up, allocates grads
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
model(input_ids=ids, labels=ids).loss.backward()
print(json.dumps(dict(extra=status("VmHWM") - base)))
"""


def _cpu_step_peak(V, B, L, patched) -> float:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _MEM_SNIPPET.format(path=here, V=V, B=B, L=L, patched=bool(patched))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=900, check=True, env=env).stdout.strip().splitlines()[-1]
        return json.loads(out)["extra"]
    except Exception:  # noqa: BLE001
        return math.nan


def bench_loss(ctx: Context) -> None:
    from ..integrations.transformers import patch_causal_lm_loss, unpatch_causal_lm_loss

    V, B, L = _loss_shape(ctx.quick)
    case, = loss_labels(ctx.quick, ctx.cuda)
    model = _loss_model(V, ctx.device)
    ids = torch.randint(0, V, (B, L), device=ctx.device)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    started = time.perf_counter()
    row = Row("integrations", case, baselines=("hf",))
    for name, patched in (("hf", False), ("tokenkernels", True)):
        if patched:
            patch_causal_lm_loss(model)
        t = ctx.time(step)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
            base = torch.cuda.memory_allocated(ctx.device)
            step()
            torch.cuda.synchronize(ctx.device)
            peak = torch.cuda.max_memory_allocated(ctx.device) - base
        else:
            peak = _cpu_step_peak(V, B, L, patched)
        unpatch_causal_lm_loss(model)
        row.add(name, t, metrics={} if math.isnan(peak) else {"peak MiB": round(peak / 2**20)})
    hf_peak = row.results["hf"].metrics.get("peak MiB")
    for r in row.results.values():   # HF's peak / this one's: > 1 = less memory than HF
        mine = r.metrics.get("peak MiB")
        r.metrics["mem vs hf"] = (round(hf_peak / mine, 2) if hf_peak and mine else math.nan)
    ctx.add(row, started)
    mem = {k: r.metrics.get("peak MiB") for k, r in row.results.items()}
    logits_mib = B * L * V * 4 / 2**20
    if mem.get("hf") and mem.get("tokenkernels"):
        ctx.note(f"{case}: step time {row.ms('hf'):.0f} ms (HF) -> {row.ms('tokenkernels'):.0f} ms "
                 f"patched (vs hf {row.ratio('tokenkernels', 'hf'):.2f}x: >= 1.0 = the patch is "
                 f"faster); peak memory of the step {mem['hf']} MiB (HF) -> {mem['tokenkernels']} MiB "
                 f"({mem['hf'] / mem['tokenkernels']:.2f}x less; the fp32 logits alone: "
                 f"{logits_mib:.0f} MiB)")
    else:
        ctx.note(f"{case}: peak memory not measured (the fresh-process step failed)")


# ------------------------------------------------------------------------------ TokenSelect
def bench_tokenselect(ctx: Context) -> None:
    T = _quiet_transformers()
    from transformers import DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..integrations.transformers import (disable_tokenselect_attention,
                                             enable_tokenselect_attention, tokenselect_stats)
    from ..integrations._hf_common import forward_cache_name
    from ..integrations._hf_tokenselect import tokenselect_attention_forward

    N, Hq, Hkv, D, layers, dt = _tokenselect_shape(ctx.quick, ctx.cuda)
    case, case1 = tokenselect_labels(ctx.quick, ctx.cuda)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024,
                        num_hidden_layers=layers, num_attention_heads=Hq, num_key_value_heads=Hkv,
                        head_dim=D, max_position_embeddings=N + 16)
    model = T.LlamaForCausalLM(cfg).to(ctx.device, dt).eval()
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=cfg)
    g = torch.Generator().manual_seed(1)
    for layer in range(layers):
        k = torch.randn(1, Hkv, N, D, generator=g).to(ctx.device, dt)
        v = torch.randn(1, Hkv, N, D, generator=g).to(ctx.device, dt)
        cache.update(k, v, layer)
    tok = torch.tensor([[7]], device=ctx.device)
    pos = torch.tensor([[N]], device=ctx.device)

    cache_kw = forward_cache_name(model.forward)   # "cache" from transformers 5.24, "past_key_values" before

    def step():
        with torch.no_grad():
            model(input_ids=tok, position_ids=pos, use_cache=True, **{cache_kw: cache})
        cache.crop(-1)                 # back to N tokens (HF 5.x: negative = tokens to drop)

    budget = (128, 2048, 512)
    started = time.perf_counter()
    row = Row("integrations", case, baselines=("sdpa",))
    row.add("sdpa", ctx.time(step))
    for name, thr in (("tokenselect miss", 2.0), ("tokenselect hit", -1.0)):
        enable_tokenselect_attention(model, k=budget[1], n_sink=budget[0], n_local=budget[2],
                                     cache_threshold=thr)
        step()
        t = ctx.time(step)
        st = tokenselect_stats(model)
        row.add(name, t, metrics={"hit rate": round(st["hit_rate"], 2),
                                  "attended": int(st["last_attended"][0][0])})
        disable_tokenselect_attention(model)
    ctx.add(row, started)

    # one layer's attention call alone (the cache tensors as HF passes them)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, Hq, 1, D, generator=g).to(ctx.device, dt)
    key, value = cache.layers[0].keys, cache.layers[0].values
    started = time.perf_counter()
    t_sdpa = ctx.time(lambda: sdpa_attention_forward(attn, q, key, value, None, scaling=D ** -0.5))
    # the fastest dense form on CPU: each KV head's G queries as rows of one head (what HF's
    # sdpa does for a decode step with a mask; without one it uses enable_gqa, above)
    qg = q.reshape(1, Hkv, Hq // Hkv, D)
    t_grp = ctx.time(lambda: torch.nn.functional.scaled_dot_product_attention(qg, key, value,
                                                                             scale=D ** -0.5))
    row = Row("integrations", case1, baselines=("sdpa", "sdpa grouped"))
    row.add("sdpa", t_sdpa)
    row.add("sdpa grouped", t_grp)
    for name, thr in (("tokenselect miss", 2.0), ("tokenselect hit", -1.0)):
        enable_tokenselect_attention(model, k=budget[1], n_sink=budget[0], n_local=budget[2],
                                     cache_threshold=thr)
        fn = lambda: tokenselect_attention_forward(attn, q, key, value, None, scaling=D ** -0.5)  # noqa: E731
        fn()
        row.add(name, ctx.time(fn))
        disable_tokenselect_attention(model)
    ctx.add(row, started)


# ------------------------------------------------------------------------------ visual pruning
def bench_visual(ctx: Context) -> None:
    T = _quiet_transformers()
    from ..integrations.transformers import apply_visual_token_pruning, remove_visual_token_pruning

    n_img = _visual_images(ctx.quick)
    vc = T.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=4, image_size=336, patch_size=14, projection_dim=256)
    tc = T.LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                       num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=64, pad_token_id=0)
    cfg = T.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=1000, image_seq_length=576)
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration(cfg).to(ctx.device).eval()
    g = torch.Generator().manual_seed(0)
    parts = []
    for _ in range(n_img):
        parts += [torch.randint(1, 1000, (VISUAL_TEXT[0],), generator=g), torch.full((576,), 1000)]
    parts.append(torch.randint(1, 1000, (VISUAL_TEXT[1],), generator=g))
    ids = torch.cat(parts)[None].to(ctx.device)
    pix = torch.randn(n_img, 3, 336, 336, generator=g).to(ctx.device)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pix, logits_to_keep=1, use_cache=True)

    case, = visual_labels(ctx.quick, ctx.cuda)
    assert f"+ {ids.shape[1] - 576 * n_img} txt" in case, case
    started = time.perf_counter()
    row = Row("integrations", case, baselines=("unpruned",))
    row.add("unpruned", ctx.time(prefill))
    for method in ("kcenter", "coverage"):
        apply_visual_token_pruning(model, keep=0.098, method=method)
        row.add(f"{method} keep=0.098", ctx.time(prefill))
        remove_visual_token_pruning(model)
    ctx.add(row, started)


# (part, its case labels); a part that fails is noted and the others still run
PARTS = ((bench_loss, loss_labels), (bench_tokenselect, tokenselect_labels),
         (bench_visual, visual_labels))


def cases(quick: bool, cuda: bool = False) -> List[str]:
    """The case labels :func:`run` adds, in order (one progress line each)."""
    return [label for _, labels in PARTS for label in labels(quick, cuda)]


def run(ctx: Context) -> None:
    ctx.total_cases = len(cases(ctx.quick, ctx.cuda))
    for fn, _ in PARTS:
        try:
            fn(ctx)
        except Exception as e:  # noqa: BLE001  (one part failing must not hide the others)
            ctx.note(f"integrations: {fn.__name__} failed: {type(e).__name__}: {e}")
    ctx.note("TokenSelect 'miss' = select + sparse "
             "decode every step (Selection Cache disabled), 'hit' = cached picks (sparse decode "
             "only); budget 128 + 2048 + 512. Model step includes HF's DynamicCache torch.cat "
             "(an O(N) copy of K and V per layer, paid by both).")
