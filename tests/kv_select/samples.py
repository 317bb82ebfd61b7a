"""Named op-level samples of the kv_select family (opcheck; the fuzz and sanitizer suites):
every op of the schema, the _out variants included, in both KV layouts."""
from __future__ import annotations

from typing import List

import torch

from tokenkernels.testing import Sample

from .cases import make_case

OPS = torch.ops.tokenkernels


def op_samples(device) -> List[Sample]:
    c = make_case([40, 9, 0], G=4, D=64, page_size=16, device=device)                 # paged, B 3
    h = make_case([33, 20], G=2, D=64, dtype=torch.bfloat16, device=device, strided=True)   # HF layout
    s = OPS.kv_select_score(c.q, c.k, c.seq_lens, c.block_table, 1.0, None, None, True, "auto")
    idx = OPS.kv_select_topk(s, 6, c.seq_lens, 2, 3, None, None, True)
    hs = OPS.kv_select_score(h.q, h.k, h.seq_lens, None, 1.0, None, None, True, "auto")
    hidx = OPS.kv_select_topk(hs, 4, h.seq_lens, 1, 2, None, None, True)
    skip = torch.tensor([False, True, False], device=device)
    valid = torch.arange(c.k.shape[1] * c.block_table.shape[1], device=device)[None, :] % 3 != 1
    valid = valid.expand(3, -1).contiguous()
    reuse = idx[:, 2:8].contiguous()
    dargs = (c.q, c.k, c.v, idx, c.seq_lens, c.block_table, 0.125, True, "auto")
    p = make_case([30, 12], G=2, D=64, device=device, C=4)
    cs = torch.tensor([26, 10], dtype=torch.int32, device=device)
    pidx = torch.arange(6, dtype=torch.int32, device=device).expand(2, 6).contiguous()
    pargs = (p.q, p.k, p.v, pidx, p.seq_lens, cs, None, 0.125, True)
    pb = make_case([30, 12], G=2, D=64, dtype=torch.bfloat16, device=device, C=4, page_size=16)   # tuned: 16-bit
    pbargs = (pb.q, pb.k, pb.v, pidx, pb.seq_lens, cs, pb.block_table, 0.125, True)
    return [
        Sample("kv_select_score-paged", OPS.kv_select_score.default,
               (c.q, c.k, c.seq_lens, c.block_table, 1.0, None, None, True, "auto")),
        Sample("kv_select_score-paged-skip-plain", OPS.kv_select_score.default,
               (c.q, c.k, c.seq_lens, c.block_table, 0.5, skip, None, True, "plain")),
        Sample("kv_select_score-paged-valid-unchecked", OPS.kv_select_score.default,
               (c.q, c.k, c.seq_lens, c.block_table, 1.0, None, valid, False, "auto")),
        Sample("kv_select_score-hf-strided-bf16-simt", OPS.kv_select_score.default,
               (h.q, h.k, h.seq_lens, None, 1.0, None, None, True, "simt")),
        Sample("kv_select_score-hf-strided-bf16-tuned", OPS.kv_select_score.default,
               (h.q, h.k, h.seq_lens, None, 1.0, None, None, True, "tuned")),
        Sample("kv_select_score-int64-seq-lens", OPS.kv_select_score.default,
               (h.q, h.k, h.seq_lens.long(), None, 1.0, None, None, True, "auto")),
        Sample("kv_select_topk-plain", OPS.kv_select_topk.default, (s, 6, c.seq_lens, 2, 3, None, None, True)),
        Sample("kv_select_topk-reuse", OPS.kv_select_topk.default, (s, 6, c.seq_lens, 2, 3, reuse, skip, True)),
        Sample("kv_select_topk-unchecked", OPS.kv_select_topk.default, (hs, 4, h.seq_lens, 1, 2, None, None, False)),
        Sample("kv_select_topk-reuse-tuned", OPS.kv_select_topk.default,
               (s, 6, c.seq_lens, 2, 3, reuse, skip, True, "tuned")),
        Sample("kv_select_topk-hf-tuned", OPS.kv_select_topk.default, (hs, 4, h.seq_lens, 1, 2, None, None, False, "tuned")),
        Sample("kv_select_topk_out", OPS.kv_select_topk_out.default,
               (s, 6, c.seq_lens, 2, 3, None, None, True, torch.empty_like(idx))),
        Sample("kv_select_topk_out-tuned", OPS.kv_select_topk_out.default,
               (s, 6, c.seq_lens, 2, 3, None, None, True, torch.empty_like(idx), "tuned")),
        # (request 2 attends nothing: lse -inf, which opcheck compares exactly)
        Sample("kv_select_sparse_decode-paged", OPS.kv_select_sparse_decode.default, dargs),
        Sample("kv_select_sparse_decode-hf-strided-bf16-plain", OPS.kv_select_sparse_decode.default,
               (h.q, h.k, h.v, hidx, h.seq_lens, None, 0.125, True, "plain")),
        Sample("kv_select_sparse_decode-int64-indices-simt", OPS.kv_select_sparse_decode.default,
               (h.q, h.k, h.v, hidx.long(), h.seq_lens, None, 0.125, False, "simt")),
        Sample("kv_select_sparse_decode-int64-indices-tuned", OPS.kv_select_sparse_decode.default,
               (h.q, h.k, h.v, hidx.long(), h.seq_lens, None, 0.125, False, "tuned")),
        Sample("kv_select_sparse_decode_out", OPS.kv_select_sparse_decode_out.default,
               dargs + (torch.empty_like(c.q), torch.empty(3, 8, device=device))),
        Sample("kv_select_sparse_prefill", OPS.kv_select_sparse_prefill.default, pargs),
        Sample("kv_select_sparse_prefill-int64-chunk-start", OPS.kv_select_sparse_prefill.default,
               pargs[:5] + (cs.long(),) + pargs[6:]),
        Sample("kv_select_sparse_prefill_out", OPS.kv_select_sparse_prefill_out.default,
               pargs + (torch.empty_like(p.q), torch.empty(2, 4, 4, device=device))),
        Sample("kv_select_sparse_prefill-paged-bf16-tuned", OPS.kv_select_sparse_prefill.default, pbargs + ("tuned",)),
        Sample("kv_select_sparse_prefill_out-paged-bf16-tuned", OPS.kv_select_sparse_prefill_out.default,
               pbargs + (torch.empty_like(pb.q), torch.empty(2, 4, 4, device=device), "tuned")),
    ]
