"""A correlated byte-level target / draft pair for the speculative-decoding benchmark.

Random-weight models agree on almost nothing, so speculative decoding with them measures only
overhead. This module trains a small HF ``LlamaForCausalLM`` target and a much cheaper draft on
the one corpus every machine has -- the ``.py`` sources of the Python standard library -- and
loads the pair shipped in the repository (``bench/spec_pair/{target,draft}/``, fp16 safetensors).

    python -m tokenkernels.bench.spec_pair --train OUT [--steps N] [--draft-steps N] [--threads T]
    python -m tokenkernels.bench.spec_pair --eval [DIR]

Tokens are bytes: vocabulary 256, token id = byte value, no special tokens (no BOS / EOS; the
generation config's ``pad_token_id`` is 0, a byte that Python sources do not contain). Both
models are trained on windows of :data:`SEQ` = 512 bytes, and their ``max_position_embeddings``
says so: prompt + generated tokens + the deepest draft tree must stay within 512 positions.

Corpus (deterministic for a given standard library): every ``*.py`` under
``sysconfig.get_paths()["stdlib"]`` outside ``site-packages`` / ``dist-packages``, sorted by
relative path; every :data:`HOLDOUT_EVERY`-th file (index ``% HOLDOUT_EVERY == HOLDOUT_EVERY - 1``)
is held out. Training text: the training files in a seeded permutation, the first
:data:`FILE_CAP` bytes of each, joined by newlines until :data:`BYTE_BUDGET` bytes. Training
batches are windows of :data:`SEQ` bytes at seeded random offsets. Held-out material is cut from
the held-out files at training time and written to ``heldout.json`` beside the weights: the
benchmark prompts (:data:`PROMPT_BYTES` ASCII bytes starting at a line start) and evaluation
windows (:data:`EVAL_BYTES`), so the benchmark and the tests read the same text on every machine
whatever its Python version.

Training (one process, ``torch.set_num_threads(threads)``, seed :data:`SEED`): the target first
on next-byte cross-entropy; then the draft, distilled from the trained target (cross-entropy
against the target's softmax on the same windows: the draft learns to predict the *target*,
which is what speculative decoding rewards). AdamW, linear warm-up then cosine decay. Progress
lines (step, loss, bytes/s, ETA) go to stderr. The weights are saved in fp16; the evaluation
(``pair.json``) is of the saved fp16 weights loaded back in fp32: held-out loss (nats/byte) of
both, and the greedy agreement of draft and target -- the fraction of positions where their
argmax next bytes agree, teacher-forced on the held-out windows and along the target's own
greedy continuations of the prompts (what chain drafting meets).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

VOCAB = 256
SEED = 0
PAD_TOKEN_ID = 0
SEQ = 512
BATCH = 8
BYTE_BUDGET = 4 << 20
FILE_CAP = 16 << 10
HOLDOUT_EVERY = 16
PROMPT_BYTES = 200
N_PROMPTS = 8
EVAL_BYTES = 512
N_EVAL = 16
TARGET_STEPS = 360
DRAFT_STEPS = 300

# target 2.76M parameters, draft 0.16M: the target costs ~17x the draft's flops per token
TARGET_CONFIG = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=4)
DRAFT_CONFIG = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=1,
                    num_attention_heads=3, num_key_value_heads=3)
LR = {"target": 3e-3, "draft": 5e-3}

#: the shipped pair: <repository>/bench/spec_pair
# the shipped pair: $TOKENKERNELS_SPEC_PAIR, else bench/spec_pair of the checkout this module is in
PAIR_DIR = Path(os.environ.get("TOKENKERNELS_SPEC_PAIR")
                or Path(__file__).resolve().parents[3] / "bench" / "spec_pair")


# ------------------------------------------------------------------------------ corpus
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Optional[Path] = None) -> List[str]:
    """Sorted relative (posix) paths of the standard library's ``.py`` files."""
    root = stdlib_root() if root is None else Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in filenames:
            if name.endswith(".py"):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def split_files(files: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(training files, held-out files): every HOLDOUT_EVERY-th file is held out."""
    train = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    held = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return train, held


def training_bytes(root: Path, train: Sequence[str], budget: Optional[int] = None,
                   cap: Optional[int] = None, seed: int = SEED) -> bytes:
    """The training text: files in a seeded permutation, ``cap`` bytes each (default
    :data:`FILE_CAP`), until ``budget`` bytes (default :data:`BYTE_BUDGET`)."""
    budget = BYTE_BUDGET if budget is None else budget
    cap = FILE_CAP if cap is None else cap
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g).tolist()
    parts, n = [], 0
    for i in order:
        data = (root / train[i]).read_bytes()[:cap] + b"\n"
        parts.append(data)
        n += len(data)
        if n >= budget:
            break
    return b"".join(parts)[:budget]


def _ascii_window(data: bytes, length: int, start_frac: float) -> Optional[bytes]:
    """``length`` ASCII bytes of ``data`` starting at the first line start after
    ``start_frac`` of it (trying later line starts while the window is not ASCII)."""
    pos = data.find(b"\n", int(len(data) * start_frac)) + 1
    while 0 < pos and pos + length <= len(data):
        w = data[pos:pos + length]
        if w.isascii() and w.strip():
            return w
        pos = data.find(b"\n", pos) + 1
    return None


def heldout_material(root: Path, held: Sequence[str]) -> Dict[str, object]:
    """Prompts and evaluation windows cut from distinct held-out files (in sorted order)."""
    prompts, evals = [], []
    for f in held:
        data = (root / f).read_bytes()
        if len(prompts) < N_PROMPTS:
            w = _ascii_window(data, PROMPT_BYTES, 0.3)
            if w is not None:
                prompts.append({"file": f, "text": w.decode("ascii")})
                continue
        if len(evals) < N_EVAL:
            w = _ascii_window(data, EVAL_BYTES, 0.5)
            if w is not None:
                evals.append({"file": f, "text": w.decode("ascii")})
        if len(prompts) >= N_PROMPTS and len(evals) >= N_EVAL:
            break
    return {"prompt_bytes": PROMPT_BYTES, "prompts": prompts, "eval_bytes": EVAL_BYTES,
            "eval": evals}


# ------------------------------------------------------------------------------ models
def make_config(kind: str):
    from transformers import LlamaConfig

    spec = {"target": TARGET_CONFIG, "draft": DRAFT_CONFIG}[kind]
    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                       pad_token_id=PAD_TOKEN_ID, **spec)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def encode(text) -> torch.Tensor:
    """(1, n) int64 byte ids of a str (UTF-8) or bytes."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()[None]


def decode(ids: torch.Tensor) -> str:
    """The bytes of a 1-D id tensor as text (invalid UTF-8 replaced)."""
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def load_pair(device="cpu", dtype: torch.dtype = torch.float32, path=None,
              attn_implementation: Optional[str] = None):
    """(target, draft): the shipped pair (or the one in ``path``), in eval mode on ``device`` in
    ``dtype`` (fp32 by default; the files are fp16)."""
    from transformers import LlamaForCausalLM

    path = PAIR_DIR if path is None else Path(path)
    missing = [k for k in ("target", "draft") if not (path / k / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenkernels.bench.spec_pair.load_pair: path {str(path)!r} has no {'/'.join(missing)} "
            f"model; train one with: python -m tokenkernels.bench.spec_pair --train {path}")
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    models = []
    for k in ("target", "draft"):
        m = LlamaForCausalLM.from_pretrained(path / k, dtype=dtype, **kw)
        models.append(m.to(device).eval())
    return models[0], models[1]


def load_heldout(path=None) -> Dict[str, object]:
    """The held-out prompts and evaluation windows saved with the pair (``heldout.json``)."""
    path = PAIR_DIR if path is None else Path(path)
    return json.loads((path / "heldout.json").read_text())


def load_prompts(path=None) -> List[str]:
    return [p["text"] for p in load_heldout(path)["prompts"]]


# ------------------------------------------------------------------------------ training
def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _lr(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _batches(data: torch.Tensor, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hi = data.numel() - SEQ - 1
    for _ in range(steps):
        off = torch.randint(0, hi, (BATCH,), generator=g)
        idx = off[:, None] + torch.arange(SEQ + 1)
        yield data[idx]


def train_model(kind: str, data: torch.Tensor, steps: int, teacher=None, log=sys.stderr):
    """Train a fresh ``kind`` model; with ``teacher``, distil (cross-entropy against the
    teacher's softmax) instead of next-byte cross-entropy. Returns (model, final loss: the mean
    of the last 10 steps, seconds)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED + (1 if kind == "draft" else 0))
    model = LlamaForCausalLM(make_config(kind)).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": other, "weight_decay": 0.0}],
                            lr=LR[kind], betas=(0.9, 0.95))
    print(f"[{kind}] {n_params(model) / 1e6:.3f}M parameters, {steps} steps of {BATCH}x{SEQ} bytes"
          + (", distilled from the target" if teacher is not None else ""), file=log, flush=True)
    t0 = time.perf_counter()
    recent: List[float] = []
    for step, batch in enumerate(_batches(data, steps, SEED + (11 if kind == "draft" else 10))):
        for grp in opt.param_groups:
            grp["lr"] = _lr(step, steps, LR[kind])
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=x).logits.float()
        if teacher is None:
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        else:
            with torch.no_grad():
                soft = teacher(input_ids=x).logits.float().softmax(-1)
            loss = -(soft * logits.log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-10:]
        if step % 10 == 9 or step == steps - 1:
            el = time.perf_counter() - t0
            eta = el / (step + 1) * (steps - step - 1)
            print(f"[{kind}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                  f"lr {_lr(step, steps, LR[kind]):.2e} {BATCH * SEQ * (step + 1) / el:.0f} bytes/s "
                  f"elapsed {_fmt_s(el)} ETA {_fmt_s(eta)}", file=log, flush=True)
    return model.eval(), sum(recent) / len(recent), time.perf_counter() - t0


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def agreement(target, draft, ids: torch.Tensor, start: int = 0) -> Tuple[int, int]:
    """(positions where the argmax next tokens of draft and target agree, positions), teacher-
    forced on ``ids`` (B, n), counting the predictions after positions ``start`` .. n - 1."""
    a = target(input_ids=ids).logits[:, start:].argmax(-1)
    b = draft(input_ids=ids).logits[:, start:].argmax(-1)
    return int((a == b).sum()), a.numel()


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids[:, :-1]).logits.float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))


@torch.no_grad()
def evaluate(target, draft, heldout: Dict[str, object], new_tokens: int = 128) -> Dict[str, float]:
    """Held-out losses and greedy agreement (see the module docstring)."""
    ev = torch.cat([encode(e["text"]) for e in heldout["eval"]])
    hit, n = agreement(target, draft, ev)
    hit_g, n_g = 0, 0
    for p in heldout["prompts"]:
        ids = encode(p["text"])
        out = target.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=PAD_TOKEN_ID)
        h, m = agreement(target, draft, out[:, :-1], start=ids.shape[1] - 1)
        hit_g, n_g = hit_g + h, n_g + m
    return {"target_heldout_loss": heldout_loss(target, ev), "draft_heldout_loss": heldout_loss(draft, ev),
            "agreement_heldout": hit / n, "agreement_target_greedy": hit_g / n_g,
            "eval_positions": n, "greedy_positions": n_g}


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def train(out: Path, target_steps: int = TARGET_STEPS, draft_steps: int = DRAFT_STEPS,
          threads: int = 1, log=sys.stderr) -> Dict[str, object]:
    torch.set_num_threads(threads)
    out = Path(out)
    root = stdlib_root()
    files = stdlib_files(root)
    train_files, held = split_files(files)
    raw = training_bytes(root, train_files)
    digest = hashlib.sha256(raw).hexdigest()
    print(f"corpus: {len(files)} .py files under {root} ({len(train_files)} train, {len(held)} "
          f"held out), {len(raw)} training bytes, sha256 {digest[:16]}", file=log, flush=True)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    held_mat = heldout_material(root, held)
    t0 = time.perf_counter()
    target, t_loss, t_s = train_model("target", data, target_steps, log=log)
    draft, d_loss, d_s = train_model("draft", data, draft_steps, teacher=target, log=log)
    for kind, m in (("target", target), ("draft", draft)):
        m.generation_config.pad_token_id = PAD_TOKEN_ID
        m.to(torch.float16).save_pretrained(out / kind)
    (out / "heldout.json").write_text(json.dumps(held_mat, indent=1) + "\n")
    tl, dl = load_pair("cpu", torch.float32, out)
    metrics = evaluate(tl, dl, held_mat)
    meta = {
        "command": f"python -m tokenkernels.bench.spec_pair --train OUT --steps {target_steps} "
                   f"--draft-steps {draft_steps} --threads {threads}",
        "python": sys.version.split()[0], "torch": torch.__version__,
        "corpus": {"files": len(files), "train_files": len(train_files), "heldout_files": len(held),
                   "bytes": len(raw), "sha256": digest, "file_cap": FILE_CAP,
                   "holdout_every": HOLDOUT_EVERY},
        "training": {"seq": SEQ, "batch": BATCH, "seed": SEED, "lr": LR,
                     "target_steps": target_steps, "draft_steps": draft_steps, "threads": threads,
                     "target_s": round(t_s, 1), "draft_s": round(d_s, 1),
                     "total_s": round(time.perf_counter() - t0, 1),
                     "target_final_train_loss": round(t_loss, 4),
                     "draft_final_distill_loss": round(d_loss, 4)},
        "params": {"target": n_params(tl), "draft": n_params(dl)},
        "config": {"target": TARGET_CONFIG, "draft": DRAFT_CONFIG},
        "eval_fp16_weights": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
    }
    (out / "pair.json").write_text(json.dumps(meta, indent=1) + "\n")
    meta["size_bytes"] = dir_size(out)
    print(json.dumps(meta, indent=1), file=log, flush=True)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenkernels.bench.spec_pair",
                                description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--train", metavar="OUT", help="train the pair and write it to OUT")
    g.add_argument("--eval", metavar="DIR", nargs="?", const=str(PAIR_DIR),
                   help="evaluate a saved pair (default: the shipped one)")
    p.add_argument("--steps", type=int, default=TARGET_STEPS, help="target training steps")
    p.add_argument("--draft-steps", type=int, default=DRAFT_STEPS, help="draft training steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.draft_steps < 1 or a.threads < 1:
        p.error("--steps, --draft-steps and --threads must be >= 1")
    if a.train:
        train(Path(a.train), a.steps, a.draft_steps, a.threads)
    else:
        torch.set_num_threads(a.threads)
        t, d = load_pair("cpu", torch.float32, a.eval)
        print(json.dumps(evaluate(t, d, load_heldout(a.eval)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
