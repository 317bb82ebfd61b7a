"""The version layer of the HF integrations: the supported range is enforced with a clear error,
and the KV cache is read / passed under the name the installed release uses (``cache`` from
transformers 5.24, ``past_key_values`` before)."""
from __future__ import annotations

import pytest
import torch
import transformers

from tokenkernels.integrations import _hf_common as C
from tokenkernels.integrations.transformers import patch_causal_lm_loss

from .hf_models import causal_lm


@pytest.mark.parametrize("v", ["5.17.0", "5.24.0", "5.30.0.dev0", "5.99.1rc2"])
def test_supported_versions_pass(v):
    C.check_transformers_version(v)


@pytest.mark.parametrize("v,needle", [("5.16.1", ">= 5.17"), ("4.57.6", ">= 5.17"),
                                      ("6.0.0", ">=5.17,<6"), ("6.1.0rc1", ">=5.17,<6")])
def test_unsupported_versions_raise_naming_the_range(v, needle):
    with pytest.raises(RuntimeError, match=needle.replace(".", r"\.")) as e:
        C.check_transformers_version(v)
    assert v in str(e.value)


def test_installed_release_is_in_range():
    C.require_transformers()
    assert C.MIN_TRANSFORMERS <= C._version_tuple(transformers.__version__) < C.MAX_TRANSFORMERS_EXCLUSIVE


def test_cache_names_match_the_installed_release():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = causal_lm("llama")
    name = C.forward_cache_name(type(model).forward)
    assert name == C.output_cache_field(CausalLMOutputWithPast)
    new = C._version_tuple(transformers.__version__) >= (5, 24)
    assert name == ("cache" if new else "past_key_values")
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = C.cache_of(out)
    assert cache is not None and cache.get_seq_length() == 6
    assert C.cache_from_kwargs({name: cache, "x": 1}) is cache
    assert C.cache_from_kwargs({}) is None


def test_loss_patch_passes_the_cache_through_positionally_and_by_name():
    model = causal_lm("llama")
    ref = causal_lm("llama")
    patch_causal_lm_loss(model)
    name = C.forward_cache_name(type(model).forward)
    ids = torch.randint(0, 512, (2, 5))
    nxt = torch.randint(0, 512, (2, 1))
    with torch.no_grad():
        c_ref = C.cache_of(ref(input_ids=ids, use_cache=True))
        want = ref(input_ids=nxt, use_cache=True, **{name: c_ref}).logits
        c1 = C.cache_of(model(input_ids=ids, use_cache=True))
        by_name = model(input_ids=nxt, use_cache=True, **{name: c1})
        c2 = C.cache_of(model(input_ids=ids, use_cache=True))
        positional = model(nxt, None, None, c2, use_cache=True)
    assert torch.allclose(by_name.logits, want, atol=1e-6)
    assert torch.allclose(positional.logits, want, atol=1e-6)
    assert C.cache_of(by_name).get_seq_length() == 6
