"""torch.library.opcheck of every kv_select op (the named samples of samples.py), and
torch.compile(fullgraph=True) of a decode step (also with a Selection Cache and valid=)."""
import pytest
import torch

from tokenkernels import kv_select as kv

from .cases import make_case

from .samples import op_samples

# the samples' names, collected without building them (CPU tensors; the device is a parameter)
NAMES = [s.name for s in op_samples("cpu")]


def test_samples_cover_every_op():
    names = {s.op.name() for s in op_samples("cpu")}
    schema = {f"tokenkernels::{n}" for n in ("kv_select_score", "kv_select_topk", "kv_select_topk_out",
                                              "kv_select_sparse_decode", "kv_select_sparse_decode_out",
                                              "kv_select_sparse_prefill", "kv_select_sparse_prefill_out")}
    assert names == schema
    assert len(set(NAMES)) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(device, name):
    sample = {s.name: s for s in op_samples(device)}[name]
    torch.library.opcheck(sample.op, sample.args)


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


def test_compile_fullgraph_select_cache_valid(device):
    """select with a SelectionCache and valid= (masked-token removal) traces as one graph."""
    c = make_case([200, 77], G=4, D=64, device=device)
    valid = torch.ones(2, 200, dtype=torch.bool, device=device)
    valid[1, :9] = False
    valid[0, 50:60] = False

    def step(q, k, sl, sc):
        return kv.select(q, k, sl, k=16, n_sink=4, n_local=8, cache=sc, valid=valid, check=False)

    e1, e2 = kv.SelectionCache(0.5), kv.SelectionCache(0.5)
    eager = [step(c.q, c.k, c.seq_lens, e1) for _ in range(2)]
    torch._dynamo.reset()
    f = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled = [f(c.q, c.k, c.seq_lens, e2) for _ in range(2)]
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert torch.equal(e1.hits, e2.hits) and int(e2.hit_count) == 2
