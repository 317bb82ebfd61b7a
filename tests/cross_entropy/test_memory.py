"""Extra memory of the fused op stays far below the N x V logits (CPU).

The op runs in a fresh subprocess. Once the inputs exist, the resident-set high-water mark is
reset (``/proc/self/clear_refs`` = 5, Linux) and the current RSS noted; after forward + backward
the high-water mark (``VmHWM``) minus that RSS, minus the gradients the op must return, is the
op's extra peak. A positive control in the same process checks that the method sees an
allocation of the size of the bound.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="needs /proc/self (Linux)")

SCRIPT = textwrap.dedent(r"""
    import gc, json, resource, sys
    import torch
    import tokenkernels as tk
    torch.set_num_threads(1)

    N, D, V = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    dtype = getattr(torch, sys.argv[4])
    def status(key):  # bytes
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)
    def reset():  # reset the high-water mark to the current RSS; return the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")
    def peak():
        return status("VmHWM")

    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    # warm up the op on a small slice (thread pool, BLAS workspaces, first-call allocations)
    tk.linear_cross_entropy(h[:8], w[:4096], t[:8] % 4096).backward()
    h.grad = None; w.grad = None
    gc.collect()
    base = reset()
    loss, lse, am, ent = tk.linear_cross_entropy(h, w, t, label_smoothing=0.1, z_loss=1e-4,
                                                 return_lse=True, return_aux=True)
    (loss + lse.mean()).backward()
    after = peak()
    grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
    ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(w.grad).all())
    # positive control: a buffer of `probe` bytes, touched, must show in the high-water mark
    probe = int(sys.argv[5])
    base2 = reset()
    buf = torch.ones(probe // 4, dtype=torch.float32)
    after2 = peak()
    print(json.dumps(dict(extra=after - base - grads, grads=grads, finite=ok,
                          probe_seen=after2 - base2)))
""")


def _run(N, D, V, dtype, probe):
    # A fixed glibc mmap threshold (4 MiB): every buffer above it is mapped on allocation and
    # unmapped on free, so the RSS follows live memory (with the dynamic threshold, freed large
    # buffers stay resident in the heap and are reused unseen). Smaller buffers (tiles) live in
    # the heap; whatever it retains counts as extra, so the measure errs on the strict side.
    # One thread: the memory bound does not depend on it (per-thread state is a few rows), and
    # fine-grained parallel regions per tile slow down 10-20x on an oversubscribed machine.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 20), MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(N), str(D), str(V), dtype, str(probe)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_extra_memory_far_below_logits(dtype):
    N, D, V = 4096, 16, 128256
    elt = 4 if dtype == "float32" else 2
    logits = N * V * 4  # the fp32 logits a materialising implementation holds: ~2.1 GB
    bound = 0.02 * logits  # 2% (~42 MB): the benchmark target for extra memory
    res = _run(N, D, V, dtype, probe=int(bound))
    assert res["finite"]
    # the method can see an allocation as large as the bound
    assert res["probe_seen"] >= 0.9 * bound, res
    assert res["extra"] < bound, (
        f"extra peak {res['extra'] / 2**20:.1f} MiB >= 2% of the logits "
        f"({bound / 2**20:.1f} MiB); inputs {(N * D + V * D) * elt / 2**20:.1f} MiB")
