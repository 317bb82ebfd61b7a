"""Visual token pruning on a Qwen2.5-VL-like model: prefill time and the LM's prompt length,
unpruned vs ``apply_visual_token_pruning(keep=0.1)`` (kcenter / coverage).

Random weights, nothing downloaded: a small Qwen2.5-VL vision tower (patch 14, 2x2 merge,
window attention) and a language model of realistic width (D1536, 4 layers by default), with 4
images of 672x672 (4 x 576 = 2304 visual tokens) or, with ``--video``, a 16-frame 448x448 clip
(8 temporal steps x 256 = 2048 tokens, per-frame budgets). Prefill = the whole forward of the
prompt (vision tower, selection, LM, last-token logits). ``--quick``: tiny sizes, one repeat
(checks that it runs; its numbers mean little).

    python bench/hf_visual_qwen.py [--quick] [--video] [--repeats N] [--threads N] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _model(T, quick: bool, device):
    vis = dict(depth=2 if quick else 4, hidden_size=128 if quick else 256,
               intermediate_size=256 if quick else 1024, num_heads=4, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=112,
               fullatt_block_indexes=[1] if quick else [3], tokens_per_second=2,
               out_hidden_size=512 if quick else 1536)
    text = dict(vocab_size=2048, hidden_size=512 if quick else 1536,
                intermediate_size=1024 if quick else 8960, num_hidden_layers=2 if quick else 4,
                num_attention_heads=8 if quick else 12, num_key_value_heads=2,
                max_position_embeddings=32768, pad_token_id=0,
                rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24] if not quick
                                     else [8, 12, 12], rope_theta=1000000.0))
    cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vis, image_token_id=2000,
                             video_token_id=2001, vision_start_token_id=2002,
                             vision_end_token_id=2003)
    torch.manual_seed(0)
    return T.Qwen2_5_VLForConditionalGeneration(cfg).to(device).eval()


def _inputs(quick: bool, video: bool, device):
    g = torch.Generator().manual_seed(0)
    D = 3 * 2 * 14 * 14
    txt = lambda n: torch.randint(1, 2000, (n,), generator=g)
    if video:
        t, hw = (4, 16) if quick else (8, 32)          # temporal steps, patches per side
        items = [("video", 2001, 2, [t, hw, hw])]
    else:
        hw = 16 if quick else 48
        items = [("image", 2000, 1, [1, hw, hw])] * (2 if quick else 4)
    ids, types, grids, pix = [txt(12)], [torch.zeros(12, dtype=torch.long)], {}, {}
    for kind, tok, code, grid in items:
        n = grid[0] * grid[1] * grid[2] // 4
        ids += [torch.tensor([2002]), torch.full((n,), tok), torch.tensor([2003]), txt(8)]
        types += [torch.zeros(1, dtype=torch.long), torch.full((n,), code), torch.zeros(9, dtype=torch.long)]
        grids.setdefault(kind, []).append(grid)
        pix.setdefault(kind, []).append(torch.randn(grid[0] * grid[1] * grid[2], D, generator=g))
    ids.append(txt(32))
    types.append(torch.zeros(32, dtype=torch.long))
    kw = dict(input_ids=torch.cat(ids)[None], mm_token_type_ids=torch.cat(types)[None])
    if "image" in pix:
        kw.update(pixel_values=torch.cat(pix["image"]), image_grid_thw=torch.tensor(grids["image"]))
    if "video" in pix:
        kw.update(pixel_values_videos=torch.cat(pix["video"]), video_grid_thw=torch.tensor(grids["video"]))
    return {k: v.to(device) for k, v in kw.items()}


def _time(fn, repeats: int, device) -> float:
    fn()                                                     # warm-up
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    ap.add_argument("--video", action="store_true", help="a 16-frame clip instead of 4 images")
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers as T
    T.logging.set_verbosity_error()
    from tokenkernels.integrations.transformers import (apply_visual_token_pruning,
                                                        remove_visual_token_pruning,
                                                        visual_pruning_stats)

    device = torch.device(args.device)
    repeats = args.repeats or (1 if args.quick else 5)
    model = _model(T, args.quick, device)
    kw = _inputs(args.quick, args.video, device)
    n_vis = int((kw["mm_token_type_ids"] != 0).sum())
    L = kw["input_ids"].shape[1]

    def prefill():
        with torch.no_grad():
            model(**kw, logits_to_keep=1, use_cache=True)

    what = "16-frame video" if args.video else f"{kw['image_grid_thw'].shape[0]} images"
    print(f"Qwen2.5-VL-like (LM D{model.config.text_config.hidden_size} x "
          f"{model.config.text_config.num_hidden_layers} layers), {what}: {n_vis} visual tokens, "
          f"prompt {L} tokens; device {device}, {torch.get_num_threads()} threads, "
          f"median of {repeats}{' (--quick)' if args.quick else ''}")
    base = _time(prefill, repeats, device)
    rows = [("unpruned", base, L)]
    for method in ("kcenter", "coverage"):
        apply_visual_token_pruning(model, keep=args.keep, method=method, video_budget="frame")
        ms = _time(prefill, repeats, device)
        rows.append((f"{method} keep={args.keep:g}", ms, visual_pruning_stats(model)["lm_prompt_len"]))
        remove_visual_token_pruning(model)
    print(f"{'':<22}{'prefill ms':>12}{'LM prompt':>11}{'speed-up':>10}")
    for name, ms, n in rows:
        print(f"{name:<22}{ms:>12.1f}{n:>11d}{base / ms:>9.2f}x")


if __name__ == "__main__":
    main()
