"""patch_causal_lm_loss under FSDP2 (torch.distributed.fsdp.fully_shard), 2 processes on CPU (gloo).

A tiny random Llama, ``fully_shard`` on every decoder layer and on the root (tied and untied
embeddings), and with the lm_head as its own FSDP unit (then the patched forward sees the
sharded DTensor weight and runs the fused loss as lm_head's forward, so FSDP gathers the weight
and reduce-scatters its gradient). Each rank takes half of the global batch; the loss (averaged
over the ranks) and every parameter's gathered gradient equal the single-process unpatched HF
model's on the whole batch, over two SGD steps."""
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")   # in the lock: runs in CI

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD, B, L, V = 2, 4, 12, 512
# (name, tie_word_embeddings, lm_head its own FSDP unit, patch before fully_shard)
CONFIGS = [
    ("untied", False, False, False),
    ("tied", True, False, True),
    ("head_unit", False, True, False),
]


def _model(tied):
    from tests.integrations.hf_models import causal_lm

    m = causal_lm("llama", tie_word_embeddings=tied)
    with torch.no_grad():
        m.lm_head.weight.mul_(10)   # O(1) logits (tied: the embeddings too)
    return m


def _batch(step):
    g = torch.Generator().manual_seed(10 + step)
    return torch.randint(0, V, (B, L), generator=g)


def _train(model, rows, steps=2, gather=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(steps):
        ids = _batch(step)[rows]
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        loss = loss.detach().clone()
        if gather:
            dist.all_reduce(loss)     # equal token counts per rank: mean of the ranks' means
            loss /= WORLD
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        else:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out.append((loss, grads))
        opt.step()
    return out


def _worker(rank, world, port):
    from torch.distributed.fsdp import fully_shard

    from tokenkernels.integrations._hf_loss import is_loss_patched
    from tokenkernels.integrations.transformers import patch_causal_lm_loss

    import tokenkernels._ops.cross_entropy as ce
    from torch.distributed.tensor import DTensor

    fused = ce.linear_cross_entropy
    seen = []

    def spy(hidden, weight, *args, **kwargs):
        seen.append((tuple(weight.shape), isinstance(weight, DTensor)))
        return fused(hidden, weight, *args, **kwargs)

    ce.linear_cross_entropy = spy    # the patched forward imports it at each call
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        for name, tied, head_unit, patch_first in CONFIGS:
            want = _train(_model(tied), slice(None))           # HF's own loss, whole batch
            model = _model(tied)
            assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied, name
            if patch_first:
                patch_causal_lm_loss(model)
            for layer in model.model.layers:
                fully_shard(layer)
            if head_unit:
                fully_shard(model.lm_head)
            fully_shard(model)
            if not patch_first:
                patch_causal_lm_loss(model)
            assert is_loss_patched(model), name
            half = B // world
            seen.clear()
            got = _train(model, slice(rank * half, (rank + 1) * half), gather=True)
            # the fused loss always saw the whole, unsharded weight (never a DTensor): the
            # root's forward holds it, or the loss ran as the lm_head unit's forward
            assert seen and all(s == ((V, 64), False) for s in seen), (name, seen)
            for step, ((gl, gg), (wl, wg)) in enumerate(zip(got, want)):
                where = f"[{name}, rank {rank}, step {step}]"
                torch.testing.assert_close(gl, wl, rtol=1e-5, atol=1e-6, msg=f"{where} loss")
                assert gg.keys() == wg.keys(), where
                for n in wg:
                    torch.testing.assert_close(gg[n], wg[n], rtol=1e-4, atol=1e-6,
                                               msg=f"{where} {n}.grad")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_patched_loss_fsdp2_two_processes_gloo():
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port()), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("FSDP2 workers did not finish within 120 s")
