"""HF transformers integrations, end to end on small randomly initialised models:

* loss patch: one training step (forward + backward) of a Llama with a large vocabulary,
  HF's loss (materialised logits) vs ``patch_causal_lm_loss``: time and peak memory (CPU: peak
  resident set above the start of the step, in a fresh process; CUDA: max_memory_allocated);
* TokenSelect: one decode step at a long context, SDPA vs ``"tokenselect"`` (select + sparse
  decode on a Selection Cache miss, and the hit path), for the whole model step (HF's
  DynamicCache appends with ``torch.cat``, an O(N) copy both variants pay) and for one layer's
  attention call alone;
* visual pruning: LLaVA prefill (vision tower + projector + LM over the prompt), unpruned vs
  ``apply_visual_token_pruning`` (kcenter / coverage, keep=0.098).

Ratios are "HF time (or memory) / this one" (> 1: the integration saves).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List

import torch

from . import Context, Row, fmt_ms, fmt_x

DESCRIPTION = "HF transformers integrations: loss patch, TokenSelect decode, visual pruning (end to end)"


# ------------------------------------------------------------------------------ cases
def _loss_shape(quick: bool):
    return (32000, 1, 256) if quick else (128256, 2, 512)        # V, B, L


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


def bench_loss(ctx: Context, lines: List[str]) -> None:
    from ..integrations.transformers import patch_causal_lm_loss, unpatch_causal_lm_loss

    V, B, L = _loss_shape(ctx.quick)
    case, = loss_labels(ctx.quick, ctx.cuda)
    model = _loss_model(V, ctx.device)
    ids = torch.randint(0, V, (B, L), device=ctx.device)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    started = time.perf_counter()
    res: Dict[str, tuple] = {}
    rows = []
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
        res[name] = (t.ms, peak)
        rows.append(Row("integrations", case, name, t))
    ctx.add(rows, started)
    (th, mh), (tt, mt) = res["hf"], res["tokenkernels"]
    lines.append(f"| {case} | loss patch | {fmt_ms(th)} | {fmt_ms(tt)} | {fmt_x(th / tt)} | "
                 f"{mh / 2**20:.0f} MiB -> {mt / 2**20:.0f} MiB ({fmt_x(mh / mt)}) |")


# ------------------------------------------------------------------------------ TokenSelect
def bench_tokenselect(ctx: Context, lines: List[str]) -> None:
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
    rows, res = [], {}
    t = ctx.time(step)
    res["sdpa"] = t.ms
    rows.append(Row("integrations", case, "sdpa", t))
    for name, thr in (("tokenselect miss", 2.0), ("tokenselect hit", -1.0)):
        enable_tokenselect_attention(model, k=budget[1], n_sink=budget[0], n_local=budget[2],
                                     cache_threshold=thr)
        step()
        t = ctx.time(step)
        st = tokenselect_stats(model)
        res[name] = t.ms
        rows.append(Row("integrations", case, name, t,
                        note=f"hit rate {st['hit_rate']:.2f}, attended {st['last_attended'][0][0]}"))
        disable_tokenselect_attention(model)
    ctx.add(rows, started)
    for name in ("tokenselect miss", "tokenselect hit"):
        lines.append(f"| {case} | {name} (model step) | {fmt_ms(res['sdpa'])} | {fmt_ms(res[name])} | "
                     f"{fmt_x(res['sdpa'] / res[name])} | - |")

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
    rows = [Row("integrations", case1, "sdpa", t_sdpa), Row("integrations", case1, "sdpa grouped", t_grp)]
    out = {}
    for name, thr in (("tokenselect miss", 2.0), ("tokenselect hit", -1.0)):
        enable_tokenselect_attention(model, k=budget[1], n_sink=budget[0], n_local=budget[2],
                                     cache_threshold=thr)
        fn = lambda: tokenselect_attention_forward(attn, q, key, value, None, scaling=D ** -0.5)  # noqa: E731
        fn()
        t = ctx.time(fn)
        out[name] = t.ms
        rows.append(Row("integrations", case1, name, t))
        disable_tokenselect_attention(model)
    ctx.add(rows, started)
    for name, ms in out.items():
        lines.append(f"| {case1} | {name} | {fmt_ms(t_sdpa.ms)} | {fmt_ms(ms)} | {fmt_x(t_sdpa.ms / ms)} | - |")
    for name, ms in out.items():
        lines.append(f"| {case1} | {name} vs grouped-query SDPA | {fmt_ms(t_grp.ms)} | {fmt_ms(ms)} | "
                     f"{fmt_x(t_grp.ms / ms)} | - |")


# ------------------------------------------------------------------------------ visual pruning
def bench_visual(ctx: Context, lines: List[str]) -> None:
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
    t0 = ctx.time(prefill)
    rows, res = [Row("integrations", case, "unpruned", t0)], {}
    for method in ("kcenter", "coverage"):
        apply_visual_token_pruning(model, keep=0.098, method=method)
        t = ctx.time(prefill)
        res[method] = t.ms
        rows.append(Row("integrations", case, f"{method} keep=0.098", t))
        remove_visual_token_pruning(model)
    ctx.add(rows, started)
    for method, ms in res.items():
        lines.append(f"| {case} | {method} keep=0.098 | {fmt_ms(t0.ms)} | {fmt_ms(ms)} | "
                     f"{fmt_x(t0.ms / ms)} | - |")


# (part, its case labels); a part that fails is noted and the others still run
PARTS = ((bench_loss, loss_labels), (bench_tokenselect, tokenselect_labels),
         (bench_visual, visual_labels))


def cases(quick: bool, cuda: bool = False) -> List[str]:
    """The case labels :func:`run` adds, in order (one progress line each)."""
    return [label for _, labels in PARTS for label in labels(quick, cuda)]


def run(ctx: Context) -> None:
    ctx.total_cases = len(cases(ctx.quick, ctx.cuda))
    lines = ["| case | integration | HF ms | with tokenkernels ms | speed-up | peak memory HF -> ours |",
             "|---|---|--:|--:|--:|--:|"]
    for fn, _ in PARTS:
        try:
            fn(ctx, lines)
        except Exception as e:  # noqa: BLE001  (one part failing must not hide the others)
            ctx.note(f"integrations: {fn.__name__} failed: {type(e).__name__}: {e}")
    ctx.note("\n".join(lines))
    ctx.note("speed-up = HF time / time with the integration. TokenSelect 'miss' = select + sparse "
             "decode every step (Selection Cache disabled), 'hit' = cached picks (sparse decode "
             "only); budget 128 + 2048 + 512. Model step includes HF's DynamicCache torch.cat "
             "(an O(N) copy of K and V per layer, paid by both).")
