"""Vocabulary parallelism: 2 processes (gloo, CPU), each holding a slice of the vocabulary, give
the single-process loss, lse, arg-max and entropy; hidden.grad equals the full gradient and
weight.grad / bias.grad equal the slices of the single-process gradients. For the kernels and
for impl="reference" (which all-gathers the shards)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# (name, V, split (rank 0 holds [0, split)), dtype, options, make-inputs options)
CONFIGS = [
    ("even", 40, 20, "float32", dict(), dict()),
    ("uneven_bias_smoothing", 37, 10, "float32",
     dict(label_smoothing=0.1, return_lse=True, return_aux=True), dict(bias=True)),
    ("softcap_ignore_none", 37, 29, "float32",
     dict(softcap=2.0, reduction="none", return_lse=True, return_aux=True),
     dict(bias=True, ignore=True)),
    ("all_sum_shift_zloss", 50, 13, "float32",
     dict(softcap=3.0, label_smoothing=0.2, z_loss=0.01, shift=True, reduction="sum",
          return_lse=True, return_aux=True), dict(bias=True, ignore=True)),
    ("argmax_tie_across_shards", 30, 15, "float32", dict(return_aux=True), dict(tie=True)),
    ("all_ignored", 30, 11, "float32", dict(label_smoothing=0.1), dict(all_ignored=True)),
    ("bf16", 64, 24, "bfloat16", dict(label_smoothing=0.1, return_lse=True, return_aux=True),
     dict(bias=True, ignore=True)),
]


def _inputs(V, dtype, bias=False, ignore=False, tie=False, all_ignored=False):
    g = torch.Generator().manual_seed(V)
    B, T, D = 3, 6, 16
    h = torch.randn(B, T, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 2 / D ** 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    t = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        t[0, 1] = t[2, 4] = -100
    if all_ignored:
        t[:] = -100
    if tie:  # the same (large) row in both shards: the arg-max must be the lower index
        w[3] = w[V - 2] = w[3] * 4
    return h, w, t, b


def _run(h, w, t, b, opts, vp=None, start=0, stop=None, impl="auto"):
    import tokenkernels as tk

    stop = w.shape[0] if stop is None else stop
    hh = h.clone().requires_grad_()
    ww = w[start:stop].clone().requires_grad_()
    bb = None if b is None else b[start:stop].clone().requires_grad_()
    res = tk.linear_cross_entropy(hh, ww, t, bb, vocab_parallel=vp, filter_eps=None, impl=impl,
                                  **opts)
    res = res if isinstance(res, tuple) else (res,)
    g = torch.Generator().manual_seed(7)
    obj = (res[0] * (torch.rand(res[0].shape, generator=g) + 0.5)).sum()
    if opts.get("return_lse"):
        obj = obj + (res[1] * torch.rand(res[1].shape, generator=g)).sum()
    obj.backward()
    return [r.detach() for r in res], hh.grad, ww.grad, (None if bb is None else bb.grad)


def _close(a, b, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=what)
    else:  # two shards' bf16 partial gradients are summed: a few bf16 roundings apart
        scale = max(b.double().abs().max().item(), 1e-6)
        err = (a.double() - b.double()).abs().max().item() / scale
        assert err <= 2 ** -6, f"{what}: {err}"


def _worker(rank, world, port, configs):
    import tokenkernels as tk

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        for name, V, split, dtype, opts, inp in configs:
            dtype = getattr(torch, dtype)
            h, w, t, b = _inputs(V, dtype, **inp)
            start, stop = (0, split) if rank == 0 else (split, V)
            vp = tk.VocabParallel(group=None, start=start, stop=stop)
            for impl in ("auto", "reference"):
                _check_shard(name, rank, dtype, opts, inp, b, start, stop,
                             _run(h, w, t, b, opts, vp, start, stop, impl=impl),
                             _run(h, w, t, b, opts, impl=impl), impl)
    finally:
        dist.destroy_process_group()


def _check_shard(name, rank, dtype, opts, inp, b, start, stop, got, want, impl):
    """A shard's results against the single-process results of the same impl."""
    part, pdh, pdw, pdb = got
    full, fdh, fdw, fdb = want
    where = f"[{name}, rank {rank}, {impl}]"
    assert len(part) == len(full), where
    names = ["loss"] + (["lse"] if opts.get("return_lse") else []) + (
        ["argmax", "entropy"] if opts.get("return_aux") else [])
    for n, p, f in zip(names, part, full):
        assert p.shape == f.shape and p.dtype == f.dtype, (where, n)
        if n == "argmax":
            assert torch.equal(p, f), (where, n, p, f)
        else:
            _close(p, f, dtype if n != "loss" else torch.float32, f"{where} {n}")
    _close(pdh, fdh, dtype, f"{where} hidden.grad")
    _close(pdw, fdw[start:stop], dtype, f"{where} weight.grad")
    if b is not None:
        _close(pdb, fdb[start:stop], dtype, f"{where} bias.grad")
    if inp.get("all_ignored"):
        assert part[0].item() == 0.0 and not pdh.abs().any(), where


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_two_processes_gloo():
    """All configurations in one 2-process group (process start-up dominates the time)."""
    mp.spawn(_worker, args=(2, _free_port(), CONFIGS), nprocs=2, join=True)


def test_vocab_parallel_single_process_group_equals_plain():
    """World size 1 (the whole vocabulary in one shard) must equal the plain call exactly."""
    port = _free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        import tokenkernels as tk

        h, w, t, b = _inputs(23, torch.float32, bias=True, ignore=True)
        opts = dict(label_smoothing=0.1, return_lse=True, return_aux=True)
        a = _run(h, w, t, b, opts)
        c = _run(h, w, t, b, opts, tk.VocabParallel(group=None, start=0, stop=23))
        for x, y in zip(a[0] + list(a[1:]), c[0] + list(c[1:])):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()
