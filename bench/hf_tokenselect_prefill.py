"""Time to first token of a long prompt: HF's SDPA prefill vs chunked TokenSelect sparse prefill.

    python bench/hf_tokenselect_prefill.py            # 32K tokens (minutes on a small CPU)
    python bench/hf_tokenselect_prefill.py --quick    # 4K tokens, a check that it runs
    python bench/hf_tokenselect_prefill.py --tokens 16384 --csv out.csv

The model: a Llama with Llama-3-8B's attention shapes (hidden 4096, 32 query heads, 8 KV heads,
head_dim 128, RoPE theta 500000), random weights, ``--layers`` decoder layers (2) and a small
MLP (``--intermediate`` 1024 instead of 14336, so that the MLP, the same in both variants, does
not dominate the time), vocabulary 32000 with tied embeddings. Time to first token = one
forward over the prompt with ``use_cache=True, logits_to_keep=1`` (the prefill ``generate``
runs), no padding (HF's SDPA then takes its causal flash path), batch 1.

Implementations (one row each, in one run, same weights and prompt):

* ``sdpa``: HF's own attention (``attn_implementation="sdpa"``), the baseline;
* ``tokenselect gather`` / ``tokenselect kernel``: ``enable_tokenselect_attention(model, k=2048,
  n_sink=128, n_local=512, prefill_chunk=512, prefill_impl=...)``: per 512-token chunk, the
  keys before it are scored with the chunk's mean query and the chunk attends sink + top-k +
  local + itself (``"gather"``: SDPA over the gathered picks, the CPU default; ``"kernel"``:
  ``kv_select.sparse_prefill``). Chunks whose prefix is within the budget (2688) run dense.

dtype: ``--dtype auto`` (default) times HF's SDPA prefill in fp32 and bf16 at a small size
(``--probe-tokens``) and runs every implementation in the faster one (printed).

Columns: median / min ms of ``--repeats`` timed forwards (after a short warm-up forward),
``vs sdpa`` = SDPA's median / this one's (> 1: faster), metrics of the TokenSelect rows: chunks
run sparse / dense per layer, mean keys attended per chunk, their attention time (the
integration's ``prefill_ms``), whether the first token (argmax of the last logits) equals
SDPA's and the largest logit difference; ``load`` = cores other processes kept busy meanwhile
(a loaded machine gives noisy, slower figures).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

try:
    from tokenkernels.bench import harness
except ImportError:  # run from a checkout without the package on the path
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    from tokenkernels.bench import harness

FAMILY = "hf_tokenselect_prefill"
VOCAB = 32000


def build_model(tokens: int, layers: int, intermediate: int, seed: int = 0):
    import transformers as T

    T.logging.set_verbosity_error()
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, max_position_embeddings=max(tokens, 8192) + 1, rope_theta=500000.0,
                        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(cfg).eval()


def prefill(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1].float()


def set_variant(model, name: str, args) -> None:
    from tokenkernels.integrations.transformers import (disable_tokenselect_attention,
                                                        enable_tokenselect_attention)

    disable_tokenselect_attention(model)
    if name == "sdpa":
        model.set_attn_implementation("sdpa")
    else:
        enable_tokenselect_attention(model, k=args.k, n_sink=args.n_sink, n_local=args.n_local,
                                     prefill_chunk=args.chunk, prefill_impl=name.split()[-1])


def time_forward(model, ids, repeats: int):
    samples, out = [], None
    meter = harness.LoadMeter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = prefill(model, ids)
        samples.append((time.perf_counter() - t0) * 1e3)
    other = meter.other_cores()
    samples.sort()
    t = harness.Timing(samples[len(samples) // 2], len(samples), float("nan") if other is None else other,
                       samples[0])
    return t, out


def choose_dtype(base, args) -> torch.dtype:
    """The dtype in which HF's SDPA prefill is fastest, at --probe-tokens (printed)."""
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, args.probe_tokens), generator=g)
    best, times = None, {}
    for dt in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(base).to(dt)
        m.set_attn_implementation("sdpa")
        prefill(m, ids[:, :256])                              # warm-up
        t, _ = time_forward(m, ids, 1)
        times[str(dt).split(".")[-1]] = t.ms
        if best is None or t.ms < times[str(best).split(".")[-1]]:
            best = dt
        del m
    print(f"dtype probe (HF SDPA prefill, {args.probe_tokens} tokens): "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in times.items()) + f" -> {str(best).split('.')[-1]}",
          file=sys.stderr, flush=True)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096 tokens (a check), 1 repeat")
    ap.add_argument("--tokens", type=int, default=None, help="prompt length (default 32768; --quick 4096)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    ap.add_argument("--probe-tokens", type=int, default=1024)
    ap.add_argument("--impls", default="sdpa,tokenselect gather,tokenselect kernel",
                    help="comma-separated: sdpa, 'tokenselect gather', 'tokenselect kernel'")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--n-sink", type=int, default=128)
    ap.add_argument("--n-local", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=512, help="prefill_chunk")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--csv", default=None, help="write the rows to this CSV (bench/README.md's format)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    N = args.tokens or (4096 if args.quick else 32768)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    for name in impls:
        if name not in ("sdpa", "tokenselect gather", "tokenselect kernel"):
            ap.error(f"--impls: unknown implementation {name!r}")
    if "sdpa" not in impls:
        impls.insert(0, "sdpa")                               # the baseline (and the first token to compare)

    import transformers

    t_start = time.perf_counter()
    base = build_model(N, args.layers, args.intermediate)
    dtype = choose_dtype(base, args)
    model = base.to(dtype)
    ids = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(0))
    dt_name = str(dtype).split(".")[-1]
    case = (f"TTFT llama3-8B attn (Hq32 Hkv8 D128) {args.layers}L mlp{args.intermediate} N{N} {dt_name}")
    row = harness.Row(FAMILY, case, baselines=("sdpa",))
    ref_logits = None
    budget = args.n_sink + args.k + args.n_local
    for name in impls:
        set_variant(model, name, args)
        prefill(model, ids[:, :min(N, budget + 2 * args.chunk)])   # warm-up, a few sparse chunks
        if name != "sdpa":
            from tokenkernels.integrations.transformers import reset_tokenselect_stats

            reset_tokenselect_stats(model)                  # count the timed forwards only
        print(f"{name}: {N} tokens x {args.repeats} ...", file=sys.stderr, flush=True)
        t, logits = time_forward(model, ids, args.repeats)
        metrics = {"load": "-" if t.other != t.other else f"{t.other:.1f}"}
        if name == "sdpa":
            ref_logits = logits
        else:
            from tokenkernels.integrations.transformers import tokenselect_stats

            st = tokenselect_stats(model)
            per_layer = args.layers * args.repeats
            metrics["sparse/dense chunks"] = (f"{st['prefill_sparse_chunks'] // per_layer}/"
                                              f"{st['prefill_dense_chunks'] // per_layer}")
            metrics["mean attended"] = round(st["prefill_mean_attended"] or 0.0, 1)
            metrics["attn ms"] = round(st["prefill_ms"] or 0.0, 1)
            metrics["token=sdpa"] = str(bool((logits.argmax(-1) == ref_logits.argmax(-1)).all()))
            metrics["max dlogit"] = f"{float((logits - ref_logits).abs().max()):.3g}"
        row.add(name, t, metrics=metrics)
        print(harness.case_line(f"[{impls.index(name) + 1}/{len(impls)}]", [row], t.ms * t.n / 1e3,
                                None if t.other != t.other else t.other), file=sys.stderr, flush=True)
    set_variant(model, "sdpa", args)
    notes = [f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
             f"{transformers.__version__}; batch 1, no padding, {N} tokens, random weights; MLP intermediate "
             f"size {args.intermediate} (Llama-3-8B: 14336) so that the MLP does not dominate; vocab {VOCAB} "
             f"(tied), logits_to_keep=1. TokenSelect: k={args.k}, n_sink={args.n_sink}, "
             f"n_local={args.n_local}, prefill_chunk={args.chunk}. Whole run {time.perf_counter() - t_start:.0f} s.",
             "token=sdpa / max dlogit are no quality measure: random weights attend diffusely (no critical "
             "tokens), so a sparse prefill moves their logits far more than a trained model's."]
    harness.print_family(FAMILY, [row], notes)
    if args.csv:
        harness.write_csv(args.csv, [row], "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
