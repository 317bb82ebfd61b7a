"""The proven/unproven table of CUDA variants: complete, and "auto" on CUDA runs the safe variant
while any variant of the family is unproven (CPU calls are unaffected)."""
from __future__ import annotations

import pytest
import torch

from tokenkernels import variants as V
from tokenkernels.ops import cross_entropy, kcenter, kv_select, tree

OPS = {"kcenter": kcenter, "cross_entropy": cross_entropy, "kv_select": kv_select, "tree": tree}


@pytest.mark.parametrize("family", sorted(OPS))
def test_table_lists_every_variant_of_the_op_module(family):
    names = set(OPS[family]._IMPLS) - {"auto"}
    assert set(V.CUDA_VARIANTS[family]) == names
    assert V.SAFE[family] in names
    assert all(s in (V.PROVEN, V.UNPROVEN) for s in V.CUDA_VARIANTS[family].values())


@pytest.mark.parametrize("family", sorted(OPS))
def test_auto_on_cuda_runs_the_safe_variant_until_all_are_proven(family, monkeypatch):
    codes = OPS[family]._IMPLS
    cuda = torch.device("cuda", 0)
    for name in codes:
        # CPU: unchanged; an explicit name: unchanged on every device
        assert V.impl_code(family, name, codes, torch.device("cpu")) == codes[name]
        if name != "auto":
            assert V.impl_code(family, name, codes, cuda) == codes[name]
    table = {k: dict(v) for k, v in V.CUDA_VARIANTS.items()}
    if not V.all_proven(family):
        assert V.impl_code(family, "auto", codes, cuda) == codes[V.SAFE[family]]
    table[family] = {k: V.PROVEN for k in table[family]}
    monkeypatch.setattr(V, "CUDA_VARIANTS", table)
    assert V.impl_code(family, "auto", codes, cuda) == codes["auto"]      # the kernels' heuristic
    table[family][next(iter(table[family]))] = V.UNPROVEN
    assert V.impl_code(family, "auto", codes, cuda) == codes[V.SAFE[family]]


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
