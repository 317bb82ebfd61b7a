"""linear_cross_entropy under FSDP2 (torch.distributed.fsdp.fully_shard), 2 processes on CPU (gloo).

A tiny model (embedding, a linear layer, an lm_head with bias) is sharded with ``fully_shard``
and the loss is computed *outside* the lm_head's forward, from ``model.lm_head.weight`` directly
(what HF's loss patch does). Depending on how the model is sharded that weight is the plain
unsharded parameter (root unit, not resharded after forward) or the sharded DTensor (lm_head its
own unit, or a root resharded after forward): both must give the single-process loss and
gradients of the global batch (split across the ranks by data parallelism), over two SGD steps.
Also: a tensor-parallel DTensor weight (every rank the same tokens) gives the single-rank
gradient; DTensor hidden states, and a DTensor weight split over the vocab_parallel group used
with vocab_parallel, raise; and vocabulary parallelism combined with FSDP2 data parallelism on a
2 x 2 mesh (4 processes) gives the single-process loss and gradients."""
import faulthandler
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

V, D, B, T = 37, 16, 4, 5          # V odd: uneven dim-0 shards (19 + 18 rows)
WORLD = 2
# (name, lm_head its own FSDP unit, root reshard_after_forward, impl)
CONFIGS = [
    ("root_unit", False, None, "auto"),             # weight: the unsharded plain parameter
    ("head_unit", True, None, "auto"),              # weight: the sharded DTensor -> gathered
    ("root_resharded", False, True, "auto"),        # weight: the sharded DTensor -> gathered
    ("head_unit_reference", True, None, "reference"),
]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.proj = torch.nn.Linear(D, D)
        self.lm_head = torch.nn.Linear(D, V)

    def forward(self, ids):          # the hidden states only; the loss is computed outside
        return torch.tanh(self.proj(self.emb(ids)))


def _model():
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        m.lm_head.weight.mul_(4)     # O(1) logits: a softmax far from uniform
    return m


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def _loss(model, ids, tgt, impl):
    import tokenkernels as tk

    h = model(ids)
    return tk.linear_cross_entropy(h, model.lm_head.weight, tgt, model.lm_head.bias,
                                   filter_eps=None, impl=impl)


def _single(impl, steps=2):
    """Single-process losses and gradients over the whole batch."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for step in range(steps):
        ids, tgt = _batch(step)
        opt.zero_grad()
        loss = _loss(model, ids, tgt, impl)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return out


def _sharded(rank, head_unit, reshard, impl, steps=2):
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    model = _model()
    if head_unit:
        fully_shard(model.lm_head)
    fully_shard(model, reshard_after_forward=reshard)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)   # this rank's sequences
    out, weight_types = [], set()
    for step in range(steps):
        ids, tgt = _batch(step)
        opt.zero_grad()
        h = model(ids[rows])
        w = model.lm_head.weight
        weight_types.add(type(w).__name__)
        import tokenkernels as tk
        loss = tk.linear_cross_entropy(h, w, tgt[rows], model.lm_head.bias, filter_eps=None,
                                       impl=impl)
        loss.backward()
        g = loss.detach().clone()
        dist.all_reduce(g)            # equal token counts per rank: global mean = mean of means
        grads = {}
        for n, p in model.named_parameters():
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), n
            grads[n] = p.grad.full_tensor()
        out.append((g / WORLD, grads))
        opt.step()
    assert isinstance(model, FSDPModule)
    return out, weight_types


def _tensor_parallel(rank):
    """A Shard(0) DTensor weight, every rank the same tokens: the single-rank gradient."""
    import tokenkernels as tk
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(6, D, generator=g)
    w0 = torch.randn(V, D, generator=g)
    t = torch.randint(0, V, (6,), generator=g)
    w = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
    h = h0.clone().requires_grad_()
    loss = tk.linear_cross_entropy(h, w, t, reduction="sum", filter_eps=None)
    loss.backward()
    wr, hr = w0.clone().requires_grad_(), h0.clone().requires_grad_()
    ref = tk.linear_cross_entropy(hr, wr, t, reduction="sum", filter_eps=None)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-6, atol=1e-6)
    assert tuple(w.grad.placements) == (Shard(0),)
    torch.testing.assert_close(w.grad.full_tensor(), wr.grad, rtol=1e-6, atol=1e-6)
    # no grad wanted: the gather alone
    with torch.no_grad():
        torch.testing.assert_close(tk.linear_cross_entropy(h0, w, t, reduction="sum"),
                                   ref.detach(), rtol=1e-6, atol=1e-6)
    # bad inputs: DTensor hidden states; a DTensor weight with vocab_parallel
    hd = distribute_tensor(h0.clone(), mesh, [Shard(0)])
    with pytest.raises(TypeError, match=r"linear_cross_entropy: hidden is a DTensor"):
        tk.linear_cross_entropy(hd, w, t)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: weight is a DTensor sharded "
                                         r"over the vocab_parallel group"):
        tk.linear_cross_entropy(h0, w, t, vocab_parallel=tk.VocabParallel(None, 0, V))
    with pytest.raises(TypeError, match=r"linear_cross_entropy: vocab_parallel must be"):
        tk.linear_cross_entropy(h0, w, t, vocab_parallel=(0, V))


def _worker(rank, world, store):
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # stacks on a hang
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        for name, head_unit, reshard, impl in CONFIGS:
            want = _single(impl)
            got, weight_types = _sharded(rank, head_unit, reshard, impl)
            # the path each configuration is meant to exercise
            assert weight_types == ({"Parameter"} if name == "root_unit" else {"DTensor"}), (
                name, weight_types)
            for step, ((gl, gg), (wl, wg)) in enumerate(zip(got, want)):
                where = f"[{name}, rank {rank}, step {step}]"
                torch.testing.assert_close(gl, wl, rtol=1e-5, atol=1e-6, msg=f"{where} loss")
                assert gg.keys() == wg.keys(), where
                for n in wg:
                    torch.testing.assert_close(gg[n], wg[n], rtol=1e-5, atol=1e-6,
                                               msg=f"{where} {n}.grad")
        _tensor_parallel(rank)
        # both ranks done before either tears gloo down (a rank destroying its group while the
        # other's gloo threads still work was seen to abort the process: std::terminate)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn, nprocs, tmp_path, limit=120):
    """``nprocs`` processes running ``fn(rank, nprocs, store)``, ``store`` a fresh file for the
    rendezvous (no TCP port to race for); a hang fails after ``limit`` seconds instead of
    blocking."""
    ctx = mp.start_processes(fn, args=(nprocs, str(tmp_path / "store")), nprocs=nprocs,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:      # each worker prints its Python stacks to stderr
                if p.is_alive():
                    os.kill(p.pid, signal.SIGUSR1)
            time.sleep(2)
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"workers did not finish within {limit} s")


def test_fsdp2_two_processes_gloo(tmp_path):
    """Every configuration in one 2-process group (process start-up dominates the time)."""
    _spawn(_worker, WORLD, tmp_path)


# ---- vocab parallel x data parallel: a 2 x 2 mesh, 4 processes ---------------------------------
SPLIT = 20   # vocabulary rows [0, 20) on vp rank 0, [20, 37) on vp rank 1


def _vp_dp_worker(rank, world, store):
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # stacks on a hang
    import tokenkernels as tk
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        want = _single("auto")
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "vp"))
        dp, vp = mesh.get_local_rank("dp"), mesh.get_local_rank("vp")
        start, stop = (0, SPLIT) if vp == 0 else (SPLIT, V)
        model = _model()
        head = torch.nn.Linear(D, stop - start)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight[start:stop])
            head.bias.copy_(model.lm_head.bias[start:stop])
        model.lm_head = head                       # this rank's vocabulary rows
        fully_shard(model.lm_head, mesh=mesh["dp"])  # FSDP over data parallel only
        fully_shard(model, mesh=mesh["dp"])
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        par = tk.VocabParallel(group=mesh.get_group("vp"), start=start, stop=stop)
        rows = slice(dp * B // 2, (dp + 1) * B // 2)   # the vp pair shares its dp rank's rows
        for step in range(2):
            ids, tgt = _batch(step)
            opt.zero_grad()
            h = model(ids[rows])
            w, b = model.lm_head.weight, model.lm_head.bias
            assert isinstance(w, DTensor) and isinstance(b, DTensor)   # gathered over dp
            loss = tk.linear_cross_entropy(h, w, tgt[rows], b, vocab_parallel=par,
                                           filter_eps=None)
            loss.backward()
            g = loss.detach().clone()
            dist.all_reduce(g, group=mesh.get_group("dp"))
            wl, wg = want[step]
            where = f"[vp x dp, rank {rank}, step {step}]"
            torch.testing.assert_close(g / 2, wl, rtol=1e-5, atol=1e-6, msg=f"{where} loss")
            for n, p in model.named_parameters():
                full = p.grad.full_tensor()
                ref = wg[n][start:stop] if n.startswith("lm_head.") else wg[n]
                torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-6,
                                           msg=f"{where} {n}.grad")
            opt.step()
        dist.barrier()   # every rank done before any tears gloo down
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_with_fsdp2_data_parallel_four_processes_gloo(tmp_path):
    """Vocabulary split over one mesh dimension, FSDP2 data parallelism over the other: the
    loss and every gradient (lm_head: this vocabulary shard's rows) equal the single process."""
    _spawn(_vp_dp_worker, 4, tmp_path)
