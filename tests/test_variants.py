"""The proven/unproven table of CUDA variants: complete, and "auto" on CUDA runs the safe variant
while any variant of the family is unproven (CPU calls are unaffected)."""
from __future__ import annotations

import pytest
import torch

from tokenkernels import variants as V
FAMILIES = sorted(V.CUDA_VARIANTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_table_lists_auto_every_variant_and_the_reference(family):
    names = V.impls(family)
    assert names[0] == "auto" and names[-1] == V.REFERENCE
    assert set(names[1:-1]) == set(V.CUDA_VARIANTS[family])
    assert V.SAFE[family] in V.CUDA_VARIANTS[family]
    assert all(s in (V.PROVEN, V.UNPROVEN) for s in V.CUDA_VARIANTS[family].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_on_cuda_runs_the_safe_variant_until_all_are_proven(family, monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for name in V.impls(family):
        # CPU: unchanged; an explicit name: unchanged on every device
        assert V.choose(family, name, cpu, "op") == name
        if name != "auto":
            assert V.choose(family, name, cuda, "op") == name
    table = {k: dict(v) for k, v in V.CUDA_VARIANTS.items()}
    if not V.all_proven(family):
        assert V.choose(family, "auto", cuda, "op") == V.SAFE[family]
    table[family] = {k: V.PROVEN for k in table[family]}
    monkeypatch.setattr(V, "CUDA_VARIANTS", table)
    assert V.choose(family, "auto", cuda, "op") == "auto"      # the kernels' heuristic
    table[family][next(iter(table[family]))] = V.UNPROVEN
    assert V.choose(family, "auto", cuda, "op") == V.SAFE[family]


@pytest.mark.parametrize("bad", ["fast", "", "AUTO", 1, None])
def test_unknown_impl_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"tokenkernels\.tree\.attention: impl must be one of .*'reference'"):
        V.choose("tree", bad, "cpu", "tree.attention")


def test_every_proven_variant_has_a_recorded_gpu_run():
    # "proven" needs its GPU run in bench/RESULTS.md (device, driver, torch, CUDA named), where
    # the variant is named as family/variant
    from pathlib import Path

    results = (Path(__file__).resolve().parents[1] / "bench" / "RESULTS.md").read_text()
    for fam, variants in V.CUDA_VARIANTS.items():
        for name, status in variants.items():
            if status == V.PROVEN:
                assert f"{fam}/{name}" in results, f"{fam}/{name} is marked proven without a GPU run"


def test_readme_shows_the_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert V.table() in readme, "README's CUDA variants table differs from tokenkernels.variants.table()"


def test_unknown_family():
    with pytest.raises(KeyError):
        V.resolve("nope", "auto", "cuda")
