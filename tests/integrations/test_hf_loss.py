"""patch_causal_lm_loss: the loss and every parameter gradient of a patched tiny HF causal LM
equal the unpatched model's (HF logits + F.cross_entropy) within the per-dtype tolerance."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tokenkernels.integrations.transformers import (patch_causal_lm_loss, unpatch_causal_lm_loss)
from tokenkernels.integrations._hf_loss import is_loss_patched

from tokenkernels.testing import tol
from .hf_models import CAUSAL_LMS, causal_lm

V = 512


@pytest.fixture(scope="module")
def models():
    """One fp32 model per type; lm_head scaled x10 so the logits are O(1) (softmax far from
    uniform, Gemma 2's softcap 0.5 strongly non-linear)."""
    out = {}
    for name in CAUSAL_LMS:
        m = causal_lm(name)
        with torch.no_grad():
            m.lm_head.weight.mul_(10)
        out[name] = m
    return out


def _batch(padding: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 21), generator=g)
    am = torch.ones_like(ids)
    labels = ids.clone()
    if padding:
        am[1, :6] = 0                      # left padding
        am[2, -4:] = 0                     # right padding
        labels = labels.masked_fill(am == 0, -100)
        labels[0, 3:7] = -100              # ignored labels inside a sequence
    return ids, am, labels


def _step(model, ids, am, labels, **kw):
    """One forward + backward; returns the outputs, every parameter gradient (fp64) and the
    final (normed) hidden states the LM head sees."""
    store = {}
    hook = model.model.norm.register_forward_hook(lambda mod, a, out: store.__setitem__("h", out.detach()))
    try:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=am, labels=labels, **kw)
        out.loss.backward()
    finally:
        hook.remove()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out, grads, store["h"]


def _truth(model, hidden, labels, *, ignore_index=-100, shift_labels=None, num_items_in_batch=None):
    """fp64 loss and LM-head weight gradient from the same final hidden states."""
    W = model.lm_head.weight.detach().double().requires_grad_()
    z = hidden.double() @ W.T
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    if shift_labels is None:
        shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], 1)
    red = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), shift_labels.reshape(-1),
                                             ignore_index=ignore_index, reduction=red)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    loss.backward()
    return loss.item(), W.grad


def _compare(model, dtype, kind, *, ids, am, labels, patch_kw=None, **kw):
    """Unpatched then patched: loss and every gradient within the per-dtype tolerance; in
    fp16/bf16 also the precision rule against the fp64 loss / LM-head gradient computed from
    the same final hidden states (the kernel no worse than HF's own rounding, + ce_rule)."""
    ref, g_ref, hidden = _step(model, ids, am, labels, **kw)
    patch_causal_lm_loss(model, **(patch_kw or {}))
    try:
        out, g, hidden2 = _step(model, ids, am, labels, **kw)
    finally:
        unpatch_causal_lm_loss(model)
    assert out.logits is None                      # never materialised
    assert torch.equal(hidden, hidden2)
    assert set(g) == set(g_ref) and len(g) == len(list(model.parameters()))
    l_ref, l = ref.loss.double().item(), out.loss.double().item()
    assert abs(l - l_ref) <= tol(dtype, "hf_loss" + kind) * abs(l_ref), (l, l_ref)
    for n in g_ref:
        err = ((g[n] - g_ref[n]).norm() / g_ref[n].norm().clamp_min(1e-30)).item()
        assert err <= tol(dtype, "hf_grad" + kind), f"{n}: gradient error {err:.3e}"
    if dtype != torch.float32:
        l64, gw64 = _truth(model, hidden, labels, **kw)
        rule = tol(dtype, "ce_rule")
        assert abs(l - l64) <= abs(l_ref - l64) + rule * abs(l64), (l, l_ref, l64)
        tied = model.lm_head.weight is model.get_input_embeddings().weight
        if not tied:    # a tied weight's gradient also holds the embedding path
            e_tk = ((g["lm_head.weight"] - gw64).norm() / gw64.norm()).item()
            e_hf = ((g_ref["lm_head.weight"] - gw64).norm() / gw64.norm()).item()
            assert e_tk <= e_hf + rule, (e_tk, e_hf)
    return l_ref, l


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_loss_and_grads_match_hf(models, name, dtype, padding):
    model = copy.deepcopy(models[name]).to(dtype)
    ids, am, labels = _batch(padding)
    kind = "_softcap" if name == "gemma2" else ""
    _compare(model, dtype, kind, ids=ids, am=am, labels=labels)
    assert not is_loss_patched(model)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_impl_reference_matches_hf(models, name):
    """patch_causal_lm_loss(impl="reference") runs tokenkernels.reference's linear_cross_entropy
    (the same arguments as the kernel's, Gemma 2's softcap included): HF's loss and gradients."""
    model = copy.deepcopy(models[name])
    ids, am, labels = _batch(True)
    kind = "_softcap" if name == "gemma2" else ""
    _compare(model, torch.float32, kind, ids=ids, am=am, labels=labels,
             patch_kw=dict(impl="reference"))


def test_fp16_llama(models):
    model = copy.deepcopy(models["llama"]).to(torch.float16)
    ids, am, labels = _batch(True)
    _compare(model, torch.float16, "", ids=ids, am=am, labels=labels)


def test_gemma2_softcap_is_applied(models):
    """The patched loss equals HF's capped loss and differs from the uncapped one."""
    model = copy.deepcopy(models["gemma2"])
    ids, am, labels = _batch(False)
    with torch.no_grad():
        l_hf = model(input_ids=ids, labels=labels).loss.item()
        patch_causal_lm_loss(model)
        l_tk = model(input_ids=ids, labels=labels).loss.item()
        model.config.final_logit_softcapping = None
        l_uncapped = model(input_ids=ids, labels=labels).loss.item()
    assert abs(l_tk - l_hf) <= tol(torch.float32, "hf_loss") * abs(l_hf)
    assert abs(l_uncapped - l_hf) > 0.05 * abs(l_hf)


def test_num_items_in_batch_and_shift_labels(models):
    """Trainer's gradient-accumulation path (sum / num_items_in_batch) and pre-shifted labels."""
    model = copy.deepcopy(models["qwen2"])
    ids, am, labels = _batch(True)
    n = torch.tensor(37)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    for kw in (dict(num_items_in_batch=n), dict(shift_labels=shifted), dict(ignore_index=7)):
        lab = labels if "ignore_index" not in kw else labels.masked_fill(labels == -100, 7)
        _compare(model, torch.float32, "", ids=ids, am=am, labels=lab, **kw)


def test_logits_on_request_and_tuple_output(models):
    model = copy.deepcopy(models["llama"])
    ids, am, labels = _batch(True)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, labels=labels)
        patch_causal_lm_loss(model)
        out = model(input_ids=ids, attention_mask=am, labels=labels, return_logits=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
        tup = model(input_ids=ids, attention_mask=am, labels=labels, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], out.loss)
        # no labels: plain HF behaviour (logits, no loss)
        plain = model(input_ids=ids, attention_mask=am)
        assert plain.loss is None and torch.equal(plain.logits, ref.logits)
        patch_causal_lm_loss(model, return_logits=True)
        assert model(input_ids=ids, labels=labels).logits is not None
    unpatch_causal_lm_loss(model)
    assert "forward" not in model.__dict__


def test_generate_unchanged(models):
    model = copy.deepcopy(models["mistral"])
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(3))
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    patch_causal_lm_loss(model)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), ref)


def test_rejects_unsupported_models():
    import transformers as T
    cfg = T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match="not supported"):
        patch_causal_lm_loss(T.GPT2LMHeadModel(cfg))


# ---------------------------------------------------------------------------------------------
# peak memory of a training step, measured in fresh processes (see tests/cross_entropy/test_memory)
MEM_SCRIPT = textwrap.dedent(r"""
    import gc, json, sys
    import torch, transformers as T
    from tokenkernels.integrations.transformers import patch_causal_lm_loss
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=65536, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = T.LlamaForCausalLM(cfg)
    if sys.argv[1] == "patched":
        patch_causal_lm_loss(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 256))
    small = ids[:, :8]
    model(input_ids=small, labels=small).loss.backward()   # warm up; allocates the grads
    gc.collect()
    base = reset()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    print(json.dumps(dict(extra=status("VmHWM") - base, loss=float(loss))))
""")


def _peak(mode):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    r = subprocess.run([sys.executable, "-c", MEM_SCRIPT, mode], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self (Linux)")
def test_training_step_peak_memory_lower():
    logits = 2 * 256 * 65536 * 4           # the fp32 (B, L, V) logits: 128 MiB
    hf, tk = _peak("hf"), _peak("patched")
    assert abs(hf["loss"] - tk["loss"]) <= 1e-5 * abs(hf["loss"])
    assert hf["extra"] >= logits, hf       # the method sees the logits HF materialises
    assert tk["extra"] < 0.25 * hf["extra"], (tk, hf)
