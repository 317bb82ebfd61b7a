"""Named op-level samples of the cross_entropy family: valid calls of every schema op
(``torch.ops.tokenkernels.cross_entropy_forward`` / ``cross_entropy_backward``; the family has no
``_out`` variants), for opcheck and the fuzz / sanitizer runs."""
from __future__ import annotations

from typing import List

import torch

from tokenkernels.testing import Sample

FWD = torch.ops.tokenkernels.cross_entropy_forward.default
BWD = torch.ops.tokenkernels.cross_entropy_backward.default


def _forward_samples(device) -> List[Sample]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 8, generator=g).to(device).requires_grad_()
    w = (torch.randn(13, 8, generator=g) / 3).to(device).requires_grad_()
    b = torch.randn(13, generator=g).to(device).requires_grad_()
    t = torch.randint(0, 13, (9,), generator=g)
    t[2] = -100
    t = t.to(device)
    hb = torch.randn(5, 16, generator=g).to(torch.bfloat16).to(device)
    wb = torch.randn(7, 16, generator=g).to(torch.bfloat16).to(device)
    tb = torch.randint(0, 7, (5,), generator=g).to(torch.int32).to(device)
    hh = torch.randn(4, 6, generator=g).to(torch.float16).to(device).requires_grad_()
    wh = torch.randn(11, 6, generator=g).to(torch.float16).to(device).requires_grad_()
    bh = torch.randn(11, generator=g).to(torch.float16).to(device)
    th = torch.randint(0, 11, (4,), generator=g).to(device)
    bb = torch.randn(7, generator=g).to(torch.bfloat16).to(device)  # D = 16: the tuned kernels
    # (hidden, weight, targets, bias, ignore_index, softcap, vocab_start, vocab_total, sum_z,
    #  aux, check, filter_eps, accum_fp32, impl)
    cases = [
        ("fp32-plain-args", (h, w, t, None, -100, None, 0, 13, False, False, True, 0.0, False,
                             "auto")),
        ("fp32-bias-softcap-sumz-aux", (h, w, t, b, -100, 3.0, 0, 13, True, True, True, 0.0,
                                        False, "auto")),
        ("fp32-ignore-index-in-vocab-unchecked-plain",
         (h, w, torch.where(t < 0, 5, t), b, 5, None, 0, 13, True, False, False, 0.0, False,
          "plain")),
        ("fp32-shard", (h, w, t.clamp(min=0) + 4, b, -100, None, 4, 20, True, True, True, 0.0,
                        False, "auto")),
        ("bf16-int32-softcap-filter", (hb, wb, tb, None, -100, 30.0, 0, 7, False, True, True,
                                       2.0 ** -12, False, "auto")),
        ("fp16-bias-accum-wmma", (hh, wh, th, bh, -100, None, 0, 11, True, False, True, 0.0,
                                  True, "wmma")),
        ("fp16-bias-accum-tuned", (hh, wh, th, bh, -100, None, 0, 11, True, False, True, 0.0,
                                   True, "tuned")),
        ("bf16-bias-softcap-sumz-filter-tuned", (hb, wb, tb, bb, -100, 30.0, 0, 7, True, False,
                                                 True, 2.0 ** -12, False, "tuned")),
    ]
    return [Sample(f"cross_entropy_forward-{name}", FWD, args) for name, args in cases]


def _backward_samples(device) -> List[Sample]:
    out = []
    g = torch.Generator().manual_seed(1)
    for s in _forward_samples(device):
        h, w, t, b, ii, cap, v0, vt, sz, aux, chk, feps, acc, impl = s.args
        lse = s()[0].detach()
        N = h.shape[0]
        cp = torch.randn(N, generator=g).to(device)
        ct = -torch.rand(N, generator=g).to(device)
        c1 = torch.randn(N, generator=g).to(device) if sz else None
        h, w = h.detach(), w.detach()
        b = None if b is None else b.detach()
        base = s.name[len("cross_entropy_forward-"):]
        for need, what in (((True, True, b is not None), "all"), ((True, False, False), "dh"),
                           ((False, True, False), "dw")):
            out.append(Sample(f"cross_entropy_backward-{base}-{what}", BWD,
                              (h, w, t, b, lse, cp, ct, c1, ii, cap, v0, feps, *need, acc, impl)))
    return out


def op_samples(device) -> List[Sample]:
    """Every sample, forward then backward; names unique (``<schema>-<what>``)."""
    return _forward_samples(device) + _backward_samples(device)
