"""torch.library.opcheck of every kv_select op, and torch.compile(fullgraph=True) of a decode step."""
import pytest
import torch

from tokenkernels import kv_select as kv

from .cases import make_case

OPS = torch.ops.tokenkernels


def _samples(device):
    c = make_case([40, 9, 0], G=4, D=64, page_size=16, device=device)
    h = make_case([33, 20], G=2, D=64, dtype=torch.bfloat16, device=device, strided=True)
    s = kv.score(c.q, c.k, c.seq_lens, block_table=c.block_table)
    idx = kv.topk(s, 6, c.seq_lens, n_sink=2, n_local=3)
    hs = kv.score(h.q, h.k, h.seq_lens)
    hidx = kv.topk(hs, 4, h.seq_lens, n_sink=1, n_local=2)
    return c, h, s, idx, hs, hidx


def test_opcheck(device):
    c, h, s, idx, hs, hidx = _samples(device)
    skip = torch.tensor([False, True, False], device=device)
    torch.library.opcheck(OPS.kv_score.default, (c.q, c.k, c.seq_lens, c.block_table, 1.0, None, True, 0))
    torch.library.opcheck(OPS.kv_score.default, (c.q, c.k, c.seq_lens, c.block_table, 0.5, skip, True, 1))
    torch.library.opcheck(OPS.kv_score.default, (h.q, h.k, h.seq_lens, None, 1.0, None, True, 2))
    torch.library.opcheck(OPS.kv_topk.default, (s, 6, c.seq_lens, 2, 3, None, None))
    reuse = idx[:, 2:8].contiguous()
    torch.library.opcheck(OPS.kv_topk.default, (s, 6, c.seq_lens, 2, 3, reuse, skip))
    torch.library.opcheck(OPS.kv_topk_out.default,
                          (s, 6, c.seq_lens, 2, 3, None, None, torch.empty_like(idx)))
    dargs = (c.q, c.k, c.v, idx, c.seq_lens, c.block_table, 0.125, True, 0)
    # (request 2 attends nothing: lse -inf, which opcheck compares exactly)
    torch.library.opcheck(OPS.kv_sparse_decode.default, dargs)
    torch.library.opcheck(OPS.kv_sparse_decode.default, (h.q, h.k, h.v, hidx, h.seq_lens, None, 0.125, True, 1))
    torch.library.opcheck(OPS.kv_sparse_decode_out.default,
                          dargs + (torch.empty_like(c.q), torch.empty(3, 8, device=device)))
    p = make_case([30, 12], G=2, D=64, device=device, C=4)
    cs = torch.tensor([26, 10], dtype=torch.int32, device=device)
    pidx = torch.arange(6, dtype=torch.int32, device=device).expand(2, 6).contiguous()
    pargs = (p.q, p.k, p.v, pidx, p.seq_lens, cs, None, 0.125, True)
    torch.library.opcheck(OPS.kv_sparse_prefill.default, pargs)
    torch.library.opcheck(OPS.kv_sparse_prefill_out.default,
                          pargs + (torch.empty_like(p.q), torch.empty(2, 4, 4, device=device)))


def test_compile_fullgraph_decode_step(device):
    c = make_case([200, 77], G=4, D=64, page_size=16, device=device)
    bt = c.block_table

    def step(q, k, v, sl, out, lse):
        idx = kv.select(q, k, sl, k=16, n_sink=4, n_local=8, block_table=bt, check=False)
        kv.sparse_decode(q, k, v, idx, sl, block_table=bt, out=out, lse=lse, check=False)
        return idx, kv.sparse_decode(q, k, v, idx, sl, block_table=bt, check=False)

    o1, l1 = torch.empty_like(c.q), torch.empty(2, 8, device=device)
    o2, l2 = torch.empty_like(c.q), torch.empty(2, 8, device=device)
    eager = step(c.q, c.k, c.v, c.seq_lens, o1, l1)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(c.q, c.k, c.v, c.seq_lens, o2, l2)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_compile_fullgraph_prefill(device):
    p = make_case([30, 12], G=2, D=64, device=device, C=4)
    cs = torch.tensor([26, 10], dtype=torch.int32, device=device)

    def f(q, k, v, sl):
        idx = kv.select(q, k, cs, k=4, n_sink=1, n_local=2)
        return kv.sparse_prefill(q, k, v, idx, sl, cs, return_lse=True)

    e = f(p.q, p.k, p.v, p.seq_lens)
    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, backend="aot_eager")(p.q, p.k, p.v, p.seq_lens)
    assert torch.equal(e[0], g[0]) and torch.equal(e[1], g[1])
