"""The hot path is sync-free: with check=False, linear_cross_entropy's forward and backward
never synchronise the host with a CUDA device (every impl and dtype, deterministic mode and
vocab_parallel included), checked under torch.cuda.set_sync_debug_mode("error"). On the CPU the
vocab_parallel part still checks that every collective gets a tensor on hidden's device (an
NCCL group rejects CPU tensors; the total vocabulary size was once all-reduced as a CPU tensor
and read back with int())."""
import contextlib

import pytest
import torch
import torch.distributed as dist

import tokenkernels as tk
from tokenkernels.testing import DTYPES

from ..conftest import HAS_CUDA
from .common import make_inputs

OPTS = [
    dict(),
    dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=20.0, return_lse=True,
         return_aux=True),
    dict(reduction="sum", shift=2, filter_eps=1e-3),
]


@contextlib.contextmanager
def _no_host_sync(device):
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def _step(h, w, t, b, seeds, **opts):
    """Forward + backward with precomputed device-side seeds (no host values inside)."""
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    bb = None if b is None else b.detach().clone().requires_grad_()
    res = tk.linear_cross_entropy(hh, ww, t, bb, check=False, **opts)
    res = res if isinstance(res, tuple) else (res,)
    obj = (res[0] * seeds[0].reshape(res[0].shape)).sum() if res[0].dim() else res[0]
    if opts.get("return_lse"):
        obj = obj + (res[1] * seeds[1]).sum()
    obj.backward()
    return [r.detach() for r in res], hh.grad, ww.grad, None if bb is None else bb.grad


def _seeds(t, device):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(t.shape, generator=g).to(device) + 0.5,
            torch.rand(t.shape, generator=g).to(device))


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("impl", ["auto", "plain", "wmma", "tuned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_check_false_is_sync_free_cuda(dtype, impl, deterministic):
    h, w, t, b = make_inputs((3, 50), 32, 700, dtype, bias=True, ignore_frac=0.1,
                             device="cuda")
    seeds = _seeds(t, "cuda")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for opts in OPTS:
            with _no_host_sync("cuda"):
                out, dh, dw, db = _step(h, w, t, b, seeds, impl=impl, **opts)
            torch.cuda.synchronize()
            assert torch.isfinite(dh).all() and torch.isfinite(dw).all(), opts
    finally:
        torch.use_deterministic_algorithms(prev)


class _FakeWorld1:
    """torch.distributed collectives of a one-process group, recording the devices they get."""

    def __init__(self):
        self.devices = []

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self.devices.append(tensor.device)

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        self.devices.append(tensor.device)
        self.devices += [x.device for x in tensor_list]
        tensor_list[0].copy_(tensor)

    def get_world_size(self, group=None):
        return 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_parallel_collectives_on_device_and_sync_free(device, monkeypatch, dtype):
    # the full-vocabulary run on the same arithmetic as the shard's (not the CPU fused path)
    monkeypatch.setenv("TOKENKERNELS_CE_FUSED", "0")
    fake = _FakeWorld1()
    for name in ("all_reduce", "all_gather", "get_world_size"):
        monkeypatch.setattr(dist, name, getattr(fake, name))
    h, w, t, b = make_inputs((2, 40), 16, 90, dtype, bias=True, ignore_frac=0.1, device=device)
    seeds = _seeds(t, device)
    vp = tk.VocabParallel(group=None, start=0, stop=90)
    for opts in OPTS:
        with _no_host_sync(device):
            part = _step(h, w, t, b, seeds, vocab_parallel=vp, **opts)
        full = _step(h, w, t, b, seeds, **opts)
        for x, y in zip(part[0] + list(part[1:]), full[0] + list(full[1:])):
            if x.dtype == torch.int64:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-5)
    assert fake.devices and all(d == h.device for d in fake.devices), fake.devices


def test_vocab_parallel_target_held_by_no_shard(monkeypatch):
    """A target outside every shard: check=True raises naming it, check=False gives NaN for
    that token only (the total vocabulary is only known after the all-reduce)."""
    fake = _FakeWorld1()
    for name in ("all_reduce", "all_gather", "get_world_size"):
        monkeypatch.setattr(dist, name, getattr(fake, name))
    h, w, t, b = make_inputs(12, 8, 30, torch.float32, bias=True)
    vp = tk.VocabParallel(group=None, start=0, stop=30)
    for bad in (30, -1, 1000):
        tb = t.clone()
        tb[4] = bad
        with pytest.raises(RuntimeError, match=r"targets\[4\].*outside \[0, V=30\)"):
            tk.linear_cross_entropy(h, w, tb, b, vocab_parallel=vp)
        per_tok = tk.linear_cross_entropy(h, w, tb, b, vocab_parallel=vp, check=False,
                                          reduction="none", label_smoothing=0.1)
        assert torch.isnan(per_tok[4]) and torch.isfinite(per_tok[torch.arange(12) != 4]).all()
