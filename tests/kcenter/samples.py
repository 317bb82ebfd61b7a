"""Named op-level sample calls of the kcenter family's schema (opcheck, the fuzz suite, the
sanitizer runs): every op at least once, each option value, with and without padding."""
from __future__ import annotations

from typing import List

import torch

from tokenkernels.testing import Sample

SELECT = torch.ops.tokenkernels.kcenter_select.default
COVERAGE = torch.ops.tokenkernels.kcenter_coverage_select.default


def _select_samples(device) -> List[Sample]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 8, generator=g).to(device)
    xh = torch.randn(2, 9, 5, generator=g).to(torch.float16).to(device)
    xb = torch.randn(1, 33, 16, generator=g).to(torch.bfloat16).to(device)
    L = lambda v: torch.tensor(v, device=device)  # noqa: E731
    ex = torch.zeros(3, 20, dtype=torch.bool)
    ex[0, [3, 7]] = True
    ex[1, 5] = True
    ex[2, 1] = True
    ex = ex.to(device)
    exb = torch.zeros(1, 33, dtype=torch.bool)
    exb[0, [0, 9]] = True
    exb = exb.to(device)
    # (x, k, k_per_item, lengths, exclude, start_index, metric, sorted, check, impl)
    cases = [
        ("isolated-cosine", (x, 5, None, None, None, None, "cosine", False, True, "auto")),
        ("start-l2", (x, 5, None, None, None, L([0, 0, 0]), "l2", False, True, "auto")),
        ("all-args-sorted-padded",
         (x, 6, L([6, 2, 0]), L([20, 11, 4]), ex, L([0, 0, 0]), "cosine", True, True, "auto")),
        ("ragged-isolated-l2-unchecked-plain",
         (x, 4, L([4, 4, 1]), L([20, 11, 4]), ex, None, "l2", True, False, "plain")),
        ("ragged-start-l2-unpadded",
         (x, 3, L([3, 3, 3]), L([20, 11, 4]), ex, L([1, 2, 3]), "l2", False, True, "auto")),
        ("fp16-start-simt", (xh, 3, None, L([9, 5]), None, L([8, 2]), "cosine", False, True, "simt")),
        ("fp16-start-tuned", (xh, 3, None, L([9, 5]), None, L([8, 2]), "cosine", False, True, "tuned")),
        ("bf16-isolated-ragged-l2-sorted-unchecked-tuned",
         (xb, 6, L([6]), L([30]), exb, None, "l2", True, False, "tuned")),
        ("bf16-isolated-l2-sorted-stream",
         (xb, 7, None, None, None, None, "l2", True, True, "stream")),
    ]
    return [Sample(f"kcenter_select-{name}", SELECT, args) for name, args in cases]


def _coverage_samples(device) -> List[Sample]:
    g = torch.Generator().manual_seed(1)
    s = torch.rand(3, 12, 20, generator=g).to(device)
    sh = torch.rand(2, 7, 5, generator=g).to(torch.float16).to(device)
    L = lambda v: torch.tensor(v, device=device)  # noqa: E731
    ex = (torch.rand(3, 20, generator=g) < 0.2).to(device)
    # (sim, k, k_per_item, lengths, row_lengths, exclude, check)
    cases = [
        ("dense", (s, 5, None, None, None, None, True)),
        ("all-args-padded", (s, 5, L([5, 3, 0]), L([20, 13, 2]), L([12, 0, 5]), ex, True)),
        ("k-tensor-row-lengths-unchecked", (s, 6, L([6, 6, 6]), None, L([12, 12, 1]), None, False)),
        ("all-args-unpadded", (s, 2, L([2, 2, 2]), L([20, 13, 2]), L([12, 0, 5]), ex, True)),
        ("fp16-lengths", (sh, 2, None, L([5, 4]), None, None, True)),
    ]
    return [Sample(f"kcenter_coverage_select-{name}", COVERAGE, args) for name, args in cases]


def op_samples(device) -> List[Sample]:
    """Every sample of the family on ``device``; names are unique and device-independent."""
    return _select_samples(device) + _coverage_samples(device)
