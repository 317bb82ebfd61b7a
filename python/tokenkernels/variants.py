"""Which CUDA kernel variants have passed their tests on a GPU: the one table.

Every family has several CUDA variants, selectable by name with ``impl=``; every public op also
takes ``impl="reference"`` (the pure-PyTorch :mod:`tokenkernels.reference`, same signature).
:data:`CUDA_VARIANTS` is the one table of implementation names: ``impls(family)`` is
``"auto"``, the family's variants and ``"reference"``, and :func:`choose` is the one place a
wrapper validates ``impl`` and learns what runs. A variant is
``"proven"`` once its whole CUDA test suite has passed on a GPU (``make gpu-proof`` writes
``proven.json`` with the per-variant verdicts; a developer copies a verdict here, with the
device, driver, torch and CUDA named in bench/RESULTS.md). Until *every* variant the kernels'
own heuristic can pick is proven, ``impl="auto"`` on CUDA runs the family's :data:`SAFE`
variant -- the one most likely to be right (the simplest kernel; for cross_entropy the cuBLAS
tile path) -- instead of that heuristic. Unproven variants stay selectable by name.

CPU kernels have one implementation each and are unaffected (``impl`` is ignored there).
The op-level ``impl`` string ``"auto"`` (``torch.ops.tokenkernels.*`` called directly) is the
kernels' own heuristic; the Python API's ``"auto"`` is this proof-gated choice.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

PROVEN = "proven"
REFERENCE = "reference"   # every public op: the pure-PyTorch reference, same signature
UNPROVEN = "unproven"

# family -> variant -> status. No CUDA kernel of this library has run on a GPU yet.
CUDA_VARIANTS: Dict[str, Dict[str, str]] = {
# "plain" / "simt" ("wmma" for cross_entropy) / "stream" are the first generation of kernels;
# "tuned" is the fast-by-design generation of issue #13 (tensor-core attention core, radix top-k,
# bandwidth-bound scoring, CUTLASS cross-entropy, symmetric-Gram k-center): opt-in by name
# until proven on a GPU, and never what the kernels' own "auto" heuristic picks before then.
    "kcenter": {"plain": UNPROVEN, "simt": UNPROVEN, "tuned": UNPROVEN, "stream": UNPROVEN},
    "cross_entropy": {"plain": UNPROVEN, "wmma": UNPROVEN, "tuned": UNPROVEN},
    "kv_select": {"plain": UNPROVEN, "simt": UNPROVEN, "tuned": UNPROVEN},
    "tree": {"plain": UNPROVEN, "simt": UNPROVEN, "tuned": UNPROVEN},
}

# what "auto" runs on CUDA while any variant of the family is unproven
SAFE: Dict[str, str] = {
    "kcenter": "plain",         # global-memory greedy (falls back to streaming for huge N)
    "cross_entropy": "plain",   # cuBLAS logit tiles + fold/dZ kernels, cuBLAS gradient GEMMs
    "kv_select": "plain",       # plain scoring, single-split decode
    "tree": "plain",
}


def all_proven(family: str) -> bool:
    return all(s == PROVEN for s in CUDA_VARIANTS[family].values())


def resolve(family: str, impl: str, device) -> str:
    """The variant name a call runs: ``impl`` itself, except ``"auto"`` on CUDA while some
    variant of ``family`` is unproven, which becomes ``SAFE[family]``."""
    if family not in CUDA_VARIANTS:
        raise KeyError(f"tokenkernels.variants: unknown family {family!r}")
    if impl == "auto" and torch.device(device).type == "cuda" and not all_proven(family):
        return SAFE[family]
    return impl


def impls(family: str) -> Tuple[str, ...]:
    """Every ``impl=`` name the public ops of ``family`` accept."""
    if family not in CUDA_VARIANTS:
        raise KeyError(f"tokenkernels.variants: unknown family {family!r}")
    return ("auto",) + tuple(CUDA_VARIANTS[family]) + (REFERENCE,)


def choose(family: str, impl, device, op: str) -> str:
    """What a call of the public op ``op`` (e.g. ``"tree.attention"``) with ``impl`` runs on
    ``device``: ``"reference"``, or the op-level variant name passed to the schema's ``str impl``
    (``"auto"`` on CUDA resolved by :func:`resolve`). An unknown name raises ``ValueError``
    naming the op, the argument and the accepted names."""
    names = impls(family)
    if not isinstance(impl, str) or impl not in names:
        raise ValueError(f"tokenkernels.{op}: impl must be one of {list(names)}, got {impl!r}")
    if impl == REFERENCE:
        return REFERENCE
    return resolve(family, impl, device)


def table() -> str:
    """The table as Markdown (README's "CUDA variants" section is this text)."""
    rows = ["| family | variant | status on a GPU | `impl=\"auto\"` on CUDA runs |", "|---|---|---|---|"]
    for fam, variants in CUDA_VARIANTS.items():
        auto = "the kernels' heuristic" if all_proven(fam) else f"`{SAFE[fam]}`"
        for i, (name, status) in enumerate(variants.items()):
            rows.append(f"| {fam if i == 0 else ''} | `{name}` | {status} | {auto if i == 0 else ''} |")
    return "\n".join(rows)
