"""The one per-dtype tolerance table of the test suite.

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

DTYPES = list(TOLERANCES)


def tol(dtype: torch.dtype, kind: str) -> float:
    return TOLERANCES[dtype][kind]


# ---- tree family -------------------------------------------------------------------------------
# tree.attention computes in fp32 whatever the input dtype and rounds the output once, so the
# error vs the fp64 truth (same low-precision inputs upcast) is the output rounding (half an ulp
# of |out| <= max|v|) plus fp32 accumulation: "attn" is an absolute bound for |v| <= ~4
# (gaussian values), "lse" the absolute bound on the fp32 log-sum-exp. Measured on CPU: fp32
# <= 1e-6, fp16 <= 5e-4, bf16 <= 8e-3 (the rounding of the output itself).
TREE_TOLERANCES = {
    torch.float32: dict(attn=2e-5, lse=2e-5),
    torch.float16: dict(attn=2e-3, lse=2e-5),
    torch.bfloat16: dict(attn=1.6e-2, lse=2e-5),
}


def tree_tol(dtype: torch.dtype, kind: str) -> float:
    return TREE_TOLERANCES[dtype][kind]
