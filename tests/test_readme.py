"""Every ```python block of README.md runs as written on CPU.

Blocks under the HF transformers section load models with ``from_pretrained``; nothing may be
downloaded here, so for those (and only those) calls the test hands back tiny randomly
initialised models of the same classes (tests/integrations/hf_models.py), a small tokenizer and
a LLaVA processor stand-in. Everything else in the block runs as written. A block that needs a
name it does not define fails with NameError, as it would for a reader."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks():
    text = README.read_text()
    out, heading = [], ""
    for m in re.finditer(r"^(#{1,4} [^\n]*)$|^```python\n(.*?)^```", text, re.S | re.M):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        else:
            line = text[:m.start()].count("\n") + 1
            out.append(pytest.param(m.group(2), id=f"L{line}-{re.sub(r'[^A-Za-z0-9]+', '-', heading)[:40]}"))
    return out


BLOCKS = _blocks()


def test_readme_has_the_tours():
    ids = " ".join(p.id for p in BLOCKS)
    for name in ("kcenter", "cross-entropy", "tree", "kv-select", "loss", "TokenSelect", "Visual",
                 "Speculative"):
        assert name in ids, f"no python block under a heading with {name!r}: {ids}"


class _Tokenizer:
    """Characters -> ids below the tiny models' vocabulary; pads on the requested side."""

    def __init__(self, vocab, padding_side="right"):
        self.vocab, self.padding_side, self.pad_token_id = vocab, padding_side, 0

    def __call__(self, texts, return_tensors=None, padding=False):
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [[1 + (ord(c) % (self.vocab - 2)) for c in t] for t in texts]
        L = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        am = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            sl = slice(L - len(r), L) if self.padding_side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            am[i, sl] = 1
        return {"input_ids": ids, "attention_mask": am}


class _LlavaProcessor:
    """LLaVA-1.5's processor contract for the tiny model: "<image>" becomes the model's
    placeholder tokens, images become (n, 3, 32, 32) pixel values."""

    def __init__(self, image_token, image_tokens, vocab):
        self.tok = _Tokenizer(vocab, "left")
        self.image_token, self.image_tokens = image_token, image_tokens

    def __call__(self, images=None, text=None, return_tensors=None):
        text = [text] if isinstance(text, str) else list(text)
        rows = []
        for t in text:
            parts = t.split("<image>")
            ids = []
            for j, p in enumerate(parts):
                ids += self.tok([p])["input_ids"][0].tolist() if p else []
                if j < len(parts) - 1:
                    ids += [self.image_token] * self.image_tokens
            rows.append(ids)
        L = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), L, dtype=torch.long)
        am = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, L - len(r):] = torch.tensor(r)
            am[i, L - len(r):] = 1
        pix = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32)
                                            ).permute(2, 0, 1) / 255.0 for im in images])
        return {"input_ids": input_ids, "attention_mask": am, "pixel_values": pix}


@pytest.fixture
def offline_hf(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from .integrations import hf_models as H

    def causal(*args, dtype=None, **kwargs):
        m = H.causal_lm("qwen3")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return m.to(dtype) if dtype is not None else m

    def llava(*args, **kwargs):
        return H.llava()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", causal)
    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", llava)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, padding_side="right", **k: _Tokenizer(512, padding_side))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda *a, **k: _LlavaProcessor(H.IMAGE_TOKEN, H.IMAGE_TOKENS, 512))


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_block_runs(code, request):
    if "from_pretrained" in code:
        request.getfixturevalue("offline_hf")
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
