"""CUDA-only properties of the kcenter family (skipped without CUDA):

* batches beyond the 65535 limit of gridDim.y (row kernels are launched in chunks of items).
"""
from __future__ import annotations

import pytest
import torch

import tokenkernels as tk

from ..conftest import HAS_CUDA
from .oracle import replay_kcenter

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")


# ------------------------------------------------------------------------------ B > 65535
@pytest.mark.parametrize("impl,start", [("plain", "isolated"), ("tuned", "isolated"),
                                        ("auto", "first"), ("stream", "first")])
def test_batch_beyond_grid_y_limit(impl, start):
    """B = 70001 > 65535 items: nn_keys (isolated start) and the streaming steps put items on
    gridDim.y, whose limit is 65535; every item, including those of the second launch chunk,
    must be computed, and computed for its own index (b0 offset)."""
    P, Lv, N, D, k = 7, 5, 9, 16, 4
    R = P * Lv                                  # 35 distinct (features, length) combinations
    B = 70001
    g = torch.Generator().manual_seed(11)
    base = torch.randn(P, N, D, generator=g)
    b = torch.arange(B)
    x = base[b % P].cuda()                      # item b has the inputs of item b % R
    lengths = (N - Lv + 1 + b % Lv).cuda()      # 5 .. 9 valid tokens
    idx, rad = tk.kcenter(x, k, lengths=lengths, start=start, impl=impl, return_radii=True)
    assert idx.shape == (B, k)
    rs = "isolated" if start == "isolated" else [0] * R
    replay_kcenter(x[:R], idx[:R], rad[:R], k=k, metric="cosine", start=rs, lengths=lengths[:R])
    rep = (b % R).cuda()
    assert torch.equal(idx, idx[rep]), "items past 65535 differ from their identical twins"
    assert torch.equal(rad, rad[rep])
