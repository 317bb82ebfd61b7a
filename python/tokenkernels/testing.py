"""Shared test data of tokenkernels: the one tolerance table, token trees and generators.

The test suite (tests/) and the benchmarks (tokenkernels.bench) import from here; nothing is
copied between families. Also useful to users testing their own kernels against ours.

* :func:`tol` ``(dtype, kind)``: the tolerance of one comparison; kinds are prefixed by family
  (kcenter ``dist``/``gain``/``tie_*``, cross_entropy ``ce_*``, HF integrations ``hf_*``, tree
  ``tree_*``, kv_select ``kv_*``); :data:`DTYPES` the dtypes every op is tested in.
* :data:`MEDUSA_63`, :func:`chain`, :func:`star`, :func:`random_parents`: token trees.
* :class:`Sample`: one named op-level call (``torch.ops.tokenkernels.*`` overload and its
  arguments); each family's ``tests/<family>/samples.py`` lists them (``op_samples(device)``) for
  opcheck, the fuzz suite and the sanitizer runs.

Tolerances: the one per-dtype table of the test suite.

Every kernel computes in fp32 whatever the input dtype (fp16/bf16 inputs are upcast exactly), so
the oracle is always fp64 arithmetic on the *same* low-precision values upcast
(``x.double()``), and the tolerances only have to absorb fp32 rounding of the kernel (and, on
CUDA, cuBLAS/tensor-core accumulation order). They are relative to a per-item scale:

* kcenter, ``"dist"``: the greedy compares "keys" (cosine: d = 1 - cos, in [0, 2]; l2: d², whose
  fp32 rounding error is proportional to the squared norms). Keys are normalised by 1 (cosine)
  or by the largest squared norm of the item's valid tokens (l2), then compared with ``dist``.
* coverage_select, ``"gain"``: marginal gains are normalised by (valid rows) x (largest valid
  similarity), the bound on the fp32 summation error, then compared with ``gain``.
* ``"tie_dist"`` / ``"tie_gain"``: the fp64 greedy's margin (best - second best candidate, same
  normalisation) above which the data count as tie-free, so picks must equal the reference
  exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch

# Measured on CPU (random gaussians, N <= 577, D <= 4096, fp32 and bf16 inputs): normalised
# fp32-vs-fp64 key errors stay below ~1.5e-6 and normalised gain errors far below 1e-6, so the
# validity tolerances leave a >10x margin; a fp64 margin above the tie threshold makes both the
# kernel and the fp32 reference follow the fp64 greedy exactly.
TOLERANCES = {
    torch.float32: dict(dist=2e-5, gain=2e-5, tie_dist=5e-5, tie_gain=5e-5),
    torch.float16: dict(dist=4e-5, gain=4e-5, tie_dist=1e-4, tie_gain=1e-4),
    torch.bfloat16: dict(dist=4e-5, gain=4e-5, tie_dist=1e-4, tie_gain=1e-4),
}


# cross_entropy family (kinds prefixed "ce_"). Errors are relative to max|fp64 truth| of each
# output (per-token loss / lse / entropy, or a whole gradient tensor):
# * ``ce_loss`` / ``ce_grad``: fp32 kernel vs the fp64 reference on the same inputs, max-abs
#   error relative to max|truth| (per-token loss / lse / entropy: to max(|truth|, the logits'
#   scale max sum_d |h_d w_d| + |b|), since an fp32 logit is only that accurate). Measured on
#   CPU over the option / shape grid and the hypothesis cases (N <= 1000, D <= 4096,
#   V <= 50257): loss/lse/entropy <= 5.6e-7, gradients <= 6.4e-6; the tolerances leave ~8-9x.
# * ``ce_rule``: the "no worse than the same-dtype reference" rule for fp16/bf16, on normwise
#   relative errors: ||kernel - truth|| / ||truth|| <= (the same for the reference) + ce_rule.
#   ce_rule = u/32 with u the unit roundoff (bf16 2^-8, fp16 2^-11), while one rounding of an
#   output costs ~u/3 normwise: an extra rounding step of the kernel shows, the same arithmetic
#   passes. Where the kernel and torch round the logits identically (no bias) the measured
#   ratios of the two errors are 1.00 - 1.04 on one tile in each direction (with a bias see
#   BIAS_FACTOR in tests/cross_entropy/common.py). The fp16/bf16 ce_loss / ce_grad entries
#   repeat fp32's (those kernels also compute in fp32); the tests use the rule for them.
# * ``ce_filter``: extra normwise error that gradient filtering (filter_eps="auto": 2^-12 bf16,
#   2^-15 fp16) may add over the exact kernel. Random logits never leave a whole tile below the
#   threshold (measured extra: 0); on data built so that half the vocabulary is negligible the
#   measured extra is 5e-5 (bf16) and 0 (fp16), so the tolerance is the threshold itself.
_CE = {
    torch.float32: dict(ce_loss=5e-6, ce_grad=5e-5, ce_rule=0.0, ce_filter=0.0),
    torch.float16: dict(ce_loss=5e-6, ce_grad=5e-5, ce_rule=2.0 ** -16, ce_filter=2.0 ** -15),
    torch.bfloat16: dict(ce_loss=5e-6, ce_grad=5e-5, ce_rule=2.0 ** -13, ce_filter=2.0 ** -12),
}
for _dt, _kinds in _CE.items():
    TOLERANCES[_dt].update(_kinds)



# ---- tree family (kinds prefixed "tree_") -------------------------------------------------------------------------------
# tree.attention computes in fp32 whatever the input dtype and rounds the output once, so the
# error vs the fp64 truth (same low-precision inputs upcast) is the output rounding (half an ulp
# of |out| <= max|v|) plus fp32 accumulation: "attn" is an absolute bound for |v| <= ~4
# (gaussian values), "lse" the absolute bound on the fp32 log-sum-exp. Measured on CPU: fp32
# <= 1e-6, fp16 <= 5e-4, bf16 <= 8e-3 (the rounding of the output itself).
_TREE = {
    torch.float32: dict(tree_attn=2e-5, tree_lse=2e-5),
    torch.float16: dict(tree_attn=2e-3, tree_lse=2e-5),
    torch.bfloat16: dict(tree_attn=1.6e-2, tree_lse=2e-5),
}
for _dt, _kinds in _TREE.items():
    TOLERANCES[_dt].update(_kinds)

# HF integrations (kinds prefixed "hf_"): a patched tiny HF model against the same model
# unpatched (HF's own logits + F.cross_entropy), on CPU; errors relative:
# * ``hf_loss``: |loss_patched - loss_hf| / |loss_hf|;
# * ``hf_grad``: per parameter, ||g_patched - g_hf|| / ||g_hf||.
# In fp32 both sides compute the same function: measured (Llama/Mistral/Qwen2/Qwen3/Gemma 2,
# vocab 512, logits O(1), padding and ignored labels) loss <= 1.9e-7, gradients <= 8.8e-7.
# In bf16/fp16 HF rounds the logits (and the softmax gradient) to the model dtype while the
# kernel keeps them in fp32, so the gap is HF's own rounding error, of the order of the unit
# roundoff u (bf16 2^-8, fp16 2^-11). Measured with the kernel that computes low precision in
# fp32 end to end: bf16 loss <= 9.5e-5, gradients <= 1.4e-2 (Gemma 2 with its softcap
# included); fp16 (Llama) loss 3.2e-6, gradients 9.6e-4 (a kernel rounding the logits to the
# model dtype like HF matches it to ~1e-6). The tolerances leave a 3-5x margin; the tests also
# hold the low-precision loss to the precision rule (error vs the fp64 loss of the same final
# hidden states no worse than HF's + ``ce_rule``), which the loose tolerances alone would not.
_HF = {
    torch.float32: dict(hf_loss=2e-6, hf_grad=1e-5, hf_loss_softcap=2e-6, hf_grad_softcap=1e-5),
    torch.float16: dict(hf_loss=4e-5, hf_grad=5e-3, hf_loss_softcap=4e-5, hf_grad_softcap=5e-3),
    torch.bfloat16: dict(hf_loss=4e-4, hf_grad=4e-2, hf_loss_softcap=4e-4, hf_grad_softcap=4e-2),
}
for _dt, _kinds in _HF.items():
    TOLERANCES[_dt].update(_kinds)
# ---- kv_select family (kinds prefixed "kv_") ------------------------------------------------------------------------
# The kernels compute in fp32 from the (exactly upcast) fp16/bf16 inputs; the oracle is the
# fp64 reference on the same upcast values. Absolute tolerances for:
#   score: criticality sums (each head's probabilities sum to 1; scaled by H_q in the tests);
#   out:   attention outputs (random N(0,1) values: |out| <= ~3), dominated by the rounding of the
#          output to the input dtype (fp16 2^-11, bf16 2^-8 relative);
#   lse:   log-sum-exp of the scaled logits (fp32 accumulation).
# Measured on CPU (D 64-256, G 1/4/8, N <= 1000, both layouts): score errors < 5e-7 * H_q;
# out errors fp32 5.4e-7 (the fp32 torch reference: 6.9e-7), fp16 9.3e-4, bf16 6.7e-3 (both
# exactly the same-dtype reference's, i.e. output rounding); lse errors < 5.1e-7. The margins
# (>= 10x for score and lse, >= 4x for out) leave room for CUDA's __expf and summation order.
_KV = {
    torch.float32: dict(kv_score=5e-6, kv_out=2e-5, kv_lse=5e-5),
    torch.float16: dict(kv_score=5e-6, kv_out=4e-3, kv_lse=5e-5),
    torch.bfloat16: dict(kv_score=5e-6, kv_out=3e-2, kv_lse=5e-5),
}
for _dt, _kinds in _KV.items():
    TOLERANCES[_dt].update(_kinds)


DTYPES = list(TOLERANCES)


def tol(dtype: torch.dtype, kind: str) -> float:
    """The tolerance of ``kind`` for inputs of ``dtype`` (see the table above)."""
    try:
        return TOLERANCES[dtype][kind]
    except KeyError:
        raise KeyError(f"tokenkernels.testing.tol: no tolerance {kind!r} for {dtype}") from None


# ---- token trees -------------------------------------------------------------------------------
# Medusa's default 63-node tree (mc_sim_7b_63; the root is implicit).
MEDUSA_63 = [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4],
             [2, 0], [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8],
             [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0],
             [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0],
             [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2],
             [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0],
             [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]]


def chain(n: int) -> torch.Tensor:
    return torch.arange(-1, n - 1)


def star(n: int) -> torch.Tensor:
    p = torch.zeros(n, dtype=torch.long)
    p[0] = -1
    return p


def random_parents(B: int, n: int, seed: int, bushy: float = 0.5) -> torch.Tensor:
    """Random trees, parents before children: a mix of uniform attachment (bushy, shallow) and
    attachment to one of the last few nodes (deep)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(B, n, dtype=torch.long)
    p[:, 0] = -1
    for i in range(1, n):
        uni = torch.randint(0, i, (B,), generator=g)
        recent = (i - 1 - torch.randint(0, min(i, 3), (B,), generator=g)).clamp_min(0)
        p[:, i] = torch.where(torch.rand(B, generator=g) < bushy, uni, recent)
    return p


# ---- op-level samples ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One valid call of an op: ``op(*args)``. ``name`` is unique within its family and is the
    pytest id (``"<schema>-<what>"``, e.g. ``"tree_build-int32-no-lens"``)."""
    name: str
    op: Any                      # a torch._ops.OpOverload, e.g. torch.ops.tokenkernels.tree_build.default
    args: Tuple[Any, ...]

    def __call__(self):
        return self.op(*self.args)
